#include "crypto/name_cipher.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <climits>
#include <memory>

#include "crypto/evp_util.h"

namespace envelopefs {
namespace {

using CtxPtr = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

}  // namespace

NameCipher::NameCipher(const SecretBytes& key) : key_(key.clone()) {
  if (!check_key().ok()) return;
  enc_template_ = EVP_CIPHER_CTX_new();
  dec_template_ = EVP_CIPHER_CTX_new();
  if (enc_template_ && EVP_EncryptInit_ex(enc_template_, cipher(), nullptr, key_.data(), nullptr) != 1) {
    EVP_CIPHER_CTX_free(enc_template_);
    enc_template_ = nullptr;
  }
  if (dec_template_ && EVP_DecryptInit_ex(dec_template_, cipher(), nullptr, key_.data(), nullptr) != 1) {
    EVP_CIPHER_CTX_free(dec_template_);
    dec_template_ = nullptr;
  }
}

NameCipher::~NameCipher() {
  EVP_CIPHER_CTX_free(enc_template_);
  EVP_CIPHER_CTX_free(dec_template_);
}

EVP_CIPHER_CTX* NameCipher::keyed_ctx(bool encrypt) const {
  EVP_CIPHER_CTX* tmpl = encrypt ? enc_template_ : dec_template_;
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  if (ctx == nullptr) return nullptr;
  if (tmpl != nullptr && EVP_CIPHER_CTX_copy(ctx, tmpl) == 1) return ctx;
  int ok = encrypt ? EVP_EncryptInit_ex(ctx, cipher(), nullptr, key_.data(), nullptr)
                   : EVP_DecryptInit_ex(ctx, cipher(), nullptr, key_.data(), nullptr);
  if (ok != 1) {
    EVP_CIPHER_CTX_free(ctx);
    return nullptr;
  }
  return ctx;
}

// Volumes use 64-byte keys (AES-256-SIV); 32-byte keys (AES-128-SIV) exist for the RFC 5297
// known-answer test.
const EVP_CIPHER* NameCipher::cipher() const {
  return key_.size() == kSivKeySize ? evp::aes256_siv() : evp::aes128_siv();
}

Status NameCipher::check_key() const {
  if (key_.size() != kSivKeySize && key_.size() != 32) {
    return Status(Code::kInvalidArgument, "SIV key must be 64 (or 32) bytes");
  }
  return Status::Ok();
}

Result<Bytes> NameCipher::seal(ByteView associated, ByteView plaintext) const {
  ENVELOPEFS_RETURN_IF_ERROR(check_key());
  if (plaintext.size() > INT_MAX / 2) return Status(Code::kInvalidArgument, "name too long");
  CtxPtr ctx(keyed_ctx(true), EVP_CIPHER_CTX_free);
  Bytes out(kSivTagSize + plaintext.size());
  int len = 0;
  if (!ctx || EVP_EncryptUpdate(ctx.get(), nullptr, &len, associated.data(),
                        static_cast<int>(associated.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), out.data() + kSivTagSize, &len, plaintext.data(),
                        static_cast<int>(plaintext.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), nullptr, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_GET_TAG, kSivTagSize, out.data()) != 1) {
    return Status(Code::kInternal, "AES-256-SIV seal failed");
  }
  return out;
}

Result<Bytes> NameCipher::open(ByteView associated, ByteView sealed) const {
  ENVELOPEFS_RETURN_IF_ERROR(check_key());
  if (sealed.size() < kSivTagSize || sealed.size() > INT_MAX / 2) {
    return Status(Code::kCorrupt, "sealed name has a bad length");
  }
  CtxPtr ctx(keyed_ctx(false), EVP_CIPHER_CTX_free);
  Bytes out(sealed.size() - kSivTagSize);
  int len = 0;
  if (!ctx || EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_SET_TAG, kSivTagSize,
                          const_cast<uint8_t*>(sealed.data())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, associated.data(),
                        static_cast<int>(associated.size())) != 1) {
    return Status(Code::kInternal, "AES-256-SIV open failed");
  }
  if (EVP_DecryptUpdate(ctx.get(), out.data(), &len, sealed.data() + kSivTagSize,
                        static_cast<int>(out.size())) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), nullptr, &len) != 1) {
    OPENSSL_cleanse(out.data(), out.size());
    return Status(Code::kAuthFailed, "name does not authenticate");
  }
  return out;
}

}  // namespace envelopefs
