// Deterministic authenticated encryption of names: AES-256-SIV (RFC 5297) from OpenSSL 3.
// Deterministic so a lookup can encrypt the name it is asked for instead of scanning the
// directory; the per-directory nonce is the associated data, so equal names in two directories
// encrypt differently and a name moved to another directory does not decrypt.
#pragma once

#include <string>
#include <string_view>

#include <openssl/types.h>

#include "crypto/bytes.h"
#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

inline constexpr size_t kSivKeySize = 64;  // two AES-256 keys (MAC and CTR)
inline constexpr size_t kSivTagSize = 16;

class NameCipher {
 public:
  explicit NameCipher(const SecretBytes& key);  // 64 bytes
  ~NameCipher();
  NameCipher(const NameCipher&) = delete;
  NameCipher& operator=(const NameCipher&) = delete;

  // Returns the synthetic IV (16 bytes) followed by the ciphertext.
  Result<Bytes> seal(ByteView associated, ByteView plaintext) const;
  // kAuthFailed when the value was changed or belongs to another directory.
  Result<Bytes> open(ByteView associated, ByteView sealed) const;

 private:
  const EVP_CIPHER* cipher() const;
  Status check_key() const;
  // Keyed once; every message works on a copy (EVP_CIPHER_CTX_copy), which skips the key
  // schedules and CMAC subkey derivation that a fresh context pays per name.
  EVP_CIPHER_CTX* keyed_ctx(bool encrypt) const;
  SecretBytes key_;
  EVP_CIPHER_CTX* enc_template_ = nullptr;
  EVP_CIPHER_CTX* dec_template_ = nullptr;
};

}  // namespace envelopefs
