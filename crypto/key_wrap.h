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

  // The same for `count` 32-byte keys at once (keys back to back, wrapped values 40 bytes
  // each). RFC 3394's 24 steps are sequential for one key but independent across keys, so
  // each step is one multi-block ECB call: the call overhead is shared and AES-NI pipelines.
  static constexpr size_t kMaxBatch = 64;
  Status wrap32_many(const uint8_t* keys, uint8_t* wrapped, size_t count);
  // ok[k] tells whether key k passed its integrity check; failed keys are zeroized.
  Status unwrap32_many(const uint8_t* wrapped, uint8_t* keys, bool* ok, size_t count);

 private:
  SecretBytes kek_;
  evp::ContextPool<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free> enc_, dec_;
};

}  // namespace envelopefs
