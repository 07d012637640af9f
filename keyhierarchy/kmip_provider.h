// kmip://HOST[:PORT]/?name=KEY&ca=CA.pem&cert=CLIENT.pem&key=CLIENT.key — the root key is an
// AES-256 symmetric key held by a KMIP server (KMIP 1.4 over TLS 1.2+, mutual certificate
// authentication; PyKMIP in the tests). The server does the wrapping: Encrypt and Decrypt with
// AES-GCM, our random 12-byte IV, the wrap context as additional authenticated data. The key
// never leaves the server.
//
// `init` finds the key by `name` (Locate) or creates it (Create, usage Encrypt|Decrypt, then
// Activate), and stores the URI with its `uid=` so that later mounts use the object itself.
// PORT defaults to 5696. The server's certificate must be signed by `ca` and name HOST; the
// client key file must not be readable by others. Revoking, deactivating or destroying the key
// on the server makes every later unwrap fail: access denied.
#pragma once

#include "keyhierarchy/root_provider.h"

namespace envelopefs {

Result<std::unique_ptr<RootKeyProvider>> make_kmip_provider(const std::string& uri, bool creating);

}  // namespace envelopefs
