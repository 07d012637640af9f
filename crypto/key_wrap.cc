#include "crypto/key_wrap.h"

#include <openssl/crypto.h>

#include <cstring>

namespace envelopefs {
namespace {

constexpr uint8_t kDefaultIv[8] = {0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6};

// Keys the slot's context on first use.
EVP_CIPHER_CTX* keyed(EVP_CIPHER_CTX*& ctx, const SecretBytes& kek, bool encrypt) {
  if (ctx != nullptr) return ctx;
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (c == nullptr) return nullptr;
  int ok = encrypt ? EVP_EncryptInit_ex(c, evp::aes256_ecb(), nullptr, kek.data(), nullptr)
                   : EVP_DecryptInit_ex(c, evp::aes256_ecb(), nullptr, kek.data(), nullptr);
  if (ok != 1 || EVP_CIPHER_CTX_set_padding(c, 0) != 1) {
    EVP_CIPHER_CTX_free(c);
    return nullptr;
  }
  ctx = c;
  return ctx;
}

void xor_counter(uint8_t a[8], uint64_t t) {
  for (int k = 7; k >= 0 && t != 0; --k, t >>= 8) a[k] ^= static_cast<uint8_t>(t);
}

}  // namespace

KeyWrapper::KeyWrapper(const SecretBytes& kek) : kek_(kek.clone()) {}

Status KeyWrapper::wrap(ByteView key, MutByteView out) {
  if (key.size() < 16 || key.size() % 8 != 0 || out.size() != key.size() + kKeyWrapOverhead) {
    return Status(Code::kInvalidArgument, "key wrap: bad key or output length");
  }
  auto& slot = enc_.mine();
  std::lock_guard lock(slot.mu);
  EVP_CIPHER_CTX* ctx = keyed(slot.ctx, kek_, true);
  if (ctx == nullptr) return Status(Code::kInternal, "key wrap: cannot key AES");
  const size_t n = key.size() / 8;
  uint8_t* a = out.data();
  uint8_t* r = out.data() + 8;
  std::memcpy(a, kDefaultIv, 8);
  std::memmove(r, key.data(), key.size());
  uint8_t b[16];
  // EVP_Cipher goes straight to the provider's block function: half the cost of
  // EVP_EncryptUpdate's buffering for one 16-byte block, 24 times per wrap.
  for (uint64_t j = 0; j < 6; ++j) {
    for (size_t i = 0; i < n; ++i) {
      std::memcpy(b, a, 8);
      std::memcpy(b + 8, r + 8 * i, 8);
      if (EVP_Cipher(ctx, b, b, 16) <= 0) {
        OPENSSL_cleanse(out.data(), out.size());
        return Status(Code::kInternal, "key wrap: AES failed");
      }
      std::memcpy(a, b, 8);
      xor_counter(a, n * j + i + 1);
      std::memcpy(r + 8 * i, b + 8, 8);
    }
  }
  OPENSSL_cleanse(b, sizeof b);
  return Status::Ok();
}

Status KeyWrapper::unwrap(ByteView wrapped, MutByteView out) {
  if (wrapped.size() < 24 || wrapped.size() % 8 != 0 ||
      out.size() != wrapped.size() - kKeyWrapOverhead) {
    return Status(Code::kInvalidArgument, "key unwrap: bad wrapped or output length");
  }
  auto& slot = dec_.mine();
  std::lock_guard lock(slot.mu);
  EVP_CIPHER_CTX* ctx = keyed(slot.ctx, kek_, false);
  if (ctx == nullptr) return Status(Code::kInternal, "key unwrap: cannot key AES");
  const size_t n = out.size() / 8;
  uint8_t a[8];
  std::memcpy(a, wrapped.data(), 8);
  uint8_t* r = out.data();
  std::memmove(r, wrapped.data() + 8, out.size());
  uint8_t b[16];
  for (uint64_t j = 6; j-- > 0;) {
    for (size_t i = n; i-- > 0;) {
      std::memcpy(b, a, 8);
      xor_counter(b, n * j + i + 1);
      std::memcpy(b + 8, r + 8 * i, 8);
      if (EVP_Cipher(ctx, b, b, 16) <= 0) {
        OPENSSL_cleanse(out.data(), out.size());
        return Status(Code::kInternal, "key unwrap: AES failed");
      }
      std::memcpy(a, b, 8);
      std::memcpy(r + 8 * i, b + 8, 8);
    }
  }
  OPENSSL_cleanse(b, sizeof b);
  if (CRYPTO_memcmp(a, kDefaultIv, 8) != 0) {
    OPENSSL_cleanse(out.data(), out.size());
    return Status(Code::kAuthFailed, "key unwrap: integrity check failed");
  }
  return Status::Ok();
}

Status KeyWrapper::wrap32_many(const uint8_t* keys, uint8_t* wrapped, size_t count) {
  if (count > kMaxBatch) return Status(Code::kInvalidArgument, "key wrap: batch too large");
  auto& slot = enc_.mine();
  std::lock_guard lock(slot.mu);
  EVP_CIPHER_CTX* ctx = keyed(slot.ctx, kek_, true);
  if (ctx == nullptr) return Status(Code::kInternal, "key wrap: cannot key AES");
  constexpr size_t n = 4;  // 64-bit semiblocks in a 32-byte key
  uint8_t b[kMaxBatch * 16];
  for (size_t k = 0; k < count; ++k) {
    std::memcpy(wrapped + 40 * k, kDefaultIv, 8);
    std::memcpy(wrapped + 40 * k + 8, keys + 32 * k, 32);
  }
  Status st;
  for (uint64_t j = 0; j < 6 && st.ok(); ++j) {
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < count; ++k) {
        std::memcpy(b + 16 * k, wrapped + 40 * k, 8);
        std::memcpy(b + 16 * k + 8, wrapped + 40 * k + 8 + 8 * i, 8);
      }
      if (EVP_Cipher(ctx, b, b, static_cast<unsigned>(16 * count)) <= 0) {
        st = Status(Code::kInternal, "key wrap: AES failed");
        break;
      }
      for (size_t k = 0; k < count; ++k) {
        uint8_t* a = wrapped + 40 * k;
        std::memcpy(a, b + 16 * k, 8);
        xor_counter(a, n * j + i + 1);
        std::memcpy(a + 8 + 8 * i, b + 16 * k + 8, 8);
      }
    }
  }
  OPENSSL_cleanse(b, sizeof b);
  if (!st.ok()) OPENSSL_cleanse(wrapped, 40 * count);
  return st;
}

Status KeyWrapper::unwrap32_many(const uint8_t* wrapped, uint8_t* keys, bool* ok, size_t count) {
  if (count > kMaxBatch) return Status(Code::kInvalidArgument, "key unwrap: batch too large");
  auto& slot = dec_.mine();
  std::lock_guard lock(slot.mu);
  EVP_CIPHER_CTX* ctx = keyed(slot.ctx, kek_, false);
  if (ctx == nullptr) return Status(Code::kInternal, "key unwrap: cannot key AES");
  constexpr size_t n = 4;
  uint8_t a[kMaxBatch * 8];
  uint8_t b[kMaxBatch * 16];
  for (size_t k = 0; k < count; ++k) {
    std::memcpy(a + 8 * k, wrapped + 40 * k, 8);
    std::memcpy(keys + 32 * k, wrapped + 40 * k + 8, 32);
  }
  Status st;
  for (uint64_t j = 6; j-- > 0 && st.ok();) {
    for (size_t i = n; i-- > 0;) {
      for (size_t k = 0; k < count; ++k) {
        std::memcpy(b + 16 * k, a + 8 * k, 8);
        xor_counter(b + 16 * k, n * j + i + 1);
        std::memcpy(b + 16 * k + 8, keys + 32 * k + 8 * i, 8);
      }
      if (EVP_Cipher(ctx, b, b, static_cast<unsigned>(16 * count)) <= 0) {
        st = Status(Code::kInternal, "key unwrap: AES failed");
        break;
      }
      for (size_t k = 0; k < count; ++k) {
        std::memcpy(a + 8 * k, b + 16 * k, 8);
        std::memcpy(keys + 32 * k + 8 * i, b + 16 * k + 8, 8);
      }
    }
  }
  OPENSSL_cleanse(b, sizeof b);
  for (size_t k = 0; k < count; ++k) {
    ok[k] = st.ok() && CRYPTO_memcmp(a + 8 * k, kDefaultIv, 8) == 0;
    if (!ok[k]) OPENSSL_cleanse(keys + 32 * k, 32);
  }
  return st;
}

}  // namespace envelopefs
