#include "crypto/aead_gcm.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <climits>

#include "crypto/evp_util.h"
#include "crypto/random.h"

namespace envelopefs {
namespace {

struct ThreadCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  bool initialized = false;
  ~ThreadCtx() { EVP_CIPHER_CTX_free(ctx); }
};

EVP_CIPHER_CTX* thread_ctx(bool encrypt) {
  thread_local ThreadCtx enc, dec;
  ThreadCtx& t = encrypt ? enc : dec;
  if (!t.initialized) {
    // Set the cipher once; later calls only re-key. IV length 12 is GCM's default.
    int ok = encrypt ? EVP_EncryptInit_ex(t.ctx, evp::aes256_gcm(), nullptr, nullptr, nullptr)
                     : EVP_DecryptInit_ex(t.ctx, evp::aes256_gcm(), nullptr, nullptr, nullptr);
    if (ok != 1) return nullptr;
    t.initialized = true;
  }
  return t.ctx;
}

Status check_sizes(ByteView key, ByteView iv, size_t tag) {
  if (key.size() != kGcmKeySize || iv.size() != kGcmIvSize || tag != kGcmTagSize) {
    return Status(Code::kInvalidArgument, "AES-256-GCM: wrong key, IV or tag size");
  }
  return Status::Ok();
}

}  // namespace

Status gcm_seal(ByteView key, ByteView iv, ByteView aad, ByteView plaintext, uint8_t* out,
                MutByteView tag) {
  ENVELOPEFS_RETURN_IF_ERROR(check_sizes(key, iv, tag.size()));
  if (plaintext.size() > INT_MAX) return Status(Code::kInvalidArgument, "message too large");
  EVP_CIPHER_CTX* ctx = thread_ctx(true);
  int len = 0;
  if (ctx == nullptr || EVP_EncryptInit_ex(ctx, nullptr, nullptr, key.data(), iv.data()) != 1 ||
      (!aad.empty() &&
       EVP_EncryptUpdate(ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1) ||
      (!plaintext.empty() && EVP_EncryptUpdate(ctx, out, &len, plaintext.data(),
                                               static_cast<int>(plaintext.size())) != 1) ||
      EVP_EncryptFinal_ex(ctx, out + plaintext.size(), &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, kGcmTagSize, tag.data()) != 1) {
    return Status(Code::kInternal, "AES-256-GCM seal failed");
  }
  return Status::Ok();
}

Status gcm_open(ByteView key, ByteView iv, ByteView aad, ByteView ciphertext, ByteView tag,
                uint8_t* out) {
  ENVELOPEFS_RETURN_IF_ERROR(check_sizes(key, iv, tag.size()));
  if (ciphertext.size() > INT_MAX) return Status(Code::kInvalidArgument, "message too large");
  EVP_CIPHER_CTX* ctx = thread_ctx(false);
  int len = 0;
  if (ctx == nullptr || EVP_DecryptInit_ex(ctx, nullptr, nullptr, key.data(), iv.data()) != 1 ||
      (!aad.empty() &&
       EVP_DecryptUpdate(ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1) ||
      (!ciphertext.empty() && EVP_DecryptUpdate(ctx, out, &len, ciphertext.data(),
                                                static_cast<int>(ciphertext.size())) != 1) ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, kGcmTagSize,
                          const_cast<uint8_t*>(tag.data())) != 1) {
    return Status(Code::kInternal, "AES-256-GCM open failed");
  }
  if (EVP_DecryptFinal_ex(ctx, out + ciphertext.size(), &len) != 1) {
    if (!ciphertext.empty()) OPENSSL_cleanse(out, ciphertext.size());
    return Status(Code::kAuthFailed, "AES-256-GCM tag mismatch");
  }
  return Status::Ok();
}

Result<Bytes> gcm_seal_random_iv(ByteView key, ByteView aad, ByteView plaintext) {
  Bytes out(kGcmIvSize + plaintext.size() + kGcmTagSize);
  ENVELOPEFS_RETURN_IF_ERROR(random_fill({out.data(), kGcmIvSize}));
  ENVELOPEFS_RETURN_IF_ERROR(gcm_seal(key, {out.data(), kGcmIvSize}, aad, plaintext,
                                      out.data() + kGcmIvSize,
                                      {out.data() + kGcmIvSize + plaintext.size(), kGcmTagSize}));
  return out;
}

Status gcm_open_random_iv(ByteView key, ByteView aad, ByteView sealed, MutByteView out) {
  if (sealed.size() != kGcmIvSize + out.size() + kGcmTagSize) {
    return Status(Code::kCorrupt, "sealed value has the wrong length");
  }
  return gcm_open(key, sealed.first(kGcmIvSize), aad,
                  sealed.subspan(kGcmIvSize, out.size()), sealed.last(kGcmTagSize), out.data());
}

}  // namespace envelopefs
