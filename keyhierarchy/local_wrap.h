// Wrapping under a root key held in this process (file: and pass: providers):
// AES-256-GCM with a random IV, key = HKDF(root, info "root wrap"), AAD = the wrap context.
#pragma once

#include "crypto/bytes.h"
#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

Result<Bytes> local_wrap(const SecretBytes& root, const SecretBytes& key, ByteView context);
// kAuthFailed covers both a wrong root key and an altered wrapped value.
Result<SecretBytes> local_unwrap(const SecretBytes& root, ByteView wrapped, ByteView context,
                                 size_t key_size);

}  // namespace envelopefs
