// pkcs11:URI — the root key is an AES-256 secret key object on a PKCS#11 token (an HSM, or
// SoftHSM2 in the tests). It is generated on the token by `init`, sensitive and not
// extractable, so it never leaves the token: wrap and unwrap are AES-256-GCM operations the
// token performs (CKM_AES_GCM, the wrap context as additional authenticated data).
//
// The URI is RFC 7512, parsed by p11-kit:
//   pkcs11:token=envelopefs;object=root?module-path=/usr/lib/softhsm/libsofthsm2.so
//          &pin-source=file:/etc/envelopefs/token.pin
// `token` (or the other token attributes) picks the token, `object` (CKA_LABEL) and `id`
// (CKA_ID) the key. The user PIN comes from `pin-source`, else --passfile, else the
// environment variable ENVELOPEFS_PKCS11_PIN. A URI carrying `pin-value` is refused: the URI
// is stored in the volume config, and the config never holds a secret.
#pragma once

#include "keyhierarchy/root_provider.h"

namespace envelopefs {

// `creating`: generate the key on the token when no key matches the URI (init).
Result<std::unique_ptr<RootKeyProvider>> make_pkcs11_provider(const std::string& uri,
                                                              const ProviderOptions& options,
                                                              bool creating);

}  // namespace envelopefs
