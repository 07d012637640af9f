// HKDF-SHA256 (RFC 5869) and HMAC-SHA256.
#pragma once

#include <array>

#include "crypto/bytes.h"
#include "crypto/evp_util.h"
#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

Result<SecretBytes> hkdf_sha256(ByteView ikm, ByteView salt, ByteView info, size_t length);

using Mac256 = std::array<uint8_t, 32>;

// HMAC-SHA256 with a key set once; safe to call from many threads (pooled contexts).
class HmacSha256 {
 public:
  explicit HmacSha256(const SecretBytes& key);
  HmacSha256(const HmacSha256&) = delete;
  HmacSha256& operator=(const HmacSha256&) = delete;

  // MAC over the concatenation of `parts`.
  Result<Mac256> mac(std::initializer_list<ByteView> parts);

 private:
  SecretBytes key_;
  evp::ContextPool<EVP_MAC_CTX, EVP_MAC_CTX_free> pool_;
};

}  // namespace envelopefs
