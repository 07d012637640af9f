// AES-256 key wrap, RFC 3394, run directly on a keyed AES-256 block primitive. The EVP
// "AES-256-WRAP" cipher costs ~4.5 us per 32-byte key; 24 block encryptions on a keyed ECB
// context cost ~0.3 us, and this wrap is on every block write.
#pragma once

#include "crypto/bytes.h"
#include "crypto/evp_util.h"
#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

inline constexpr size_t kKeyWrapOverhead = 8;

class KeyWrapper {
 public:
  // `kek` is 32 bytes. Copied into locked memory; contexts are keyed lazily, one per pool slot.
  explicit KeyWrapper(const SecretBytes& kek);
  KeyWrapper(const KeyWrapper&) = delete;
  KeyWrapper& operator=(const KeyWrapper&) = delete;

  // key.size() must be a multiple of 8 and at least 16; out.size() == key.size() + 8.
  Status wrap(ByteView key, MutByteView out);
  // Returns kAuthFailed (and zeroizes `out`) if the integrity check value does not match.
  Status unwrap(ByteView wrapped, MutByteView out);

 private:
  SecretBytes kek_;
  evp::ContextPool<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free> enc_, dec_;
};

}  // namespace envelopefs
