// AES-256-GCM seal/open of one message with associated data. Each thread keeps one reusable
// context (cipher fetched once), so a call costs a key schedule and the cipher itself.
#pragma once

#include "crypto/bytes.h"
#include "crypto/status.h"

namespace envelopefs {

inline constexpr size_t kGcmKeySize = 32;
inline constexpr size_t kGcmIvSize = 12;
inline constexpr size_t kGcmTagSize = 16;

// `out` must hold plaintext.size() bytes and may equal plaintext.data() (in place).
Status gcm_seal(ByteView key, ByteView iv, ByteView aad, ByteView plaintext, uint8_t* out,
                MutByteView tag);
// Returns kAuthFailed if the tag does not match; `out` is then zeroized.
Status gcm_open(ByteView key, ByteView iv, ByteView aad, ByteView ciphertext, ByteView tag,
                uint8_t* out);

// Convenience for small secrets (root wraps): random 12-byte IV; output iv || ct || tag.
Result<Bytes> gcm_seal_random_iv(ByteView key, ByteView aad, ByteView plaintext);
Status gcm_open_random_iv(ByteView key, ByteView aad, ByteView sealed, MutByteView out);

}  // namespace envelopefs
