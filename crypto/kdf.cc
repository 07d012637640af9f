#include "crypto/kdf.h"

#include <openssl/core_names.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

namespace envelopefs {
namespace {

EVP_MAC* hmac_algorithm() {
  static EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  return mac;
}

}  // namespace

Result<SecretBytes> hkdf_sha256(ByteView ikm, ByteView salt, ByteView info, size_t length) {
  static EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  if (kdf == nullptr) return Status(Code::kInternal, "OpenSSL has no HKDF");
  EVP_KDF_CTX* ctx = EVP_KDF_CTX_new(kdf);
  if (ctx == nullptr) return Status(Code::kInternal, "HKDF context");
  // Empty salt or info are left out: OpenSSL rejects zero-length octet parameters, and RFC 5869
  // defines an absent salt as HashLen zero bytes, which is what HKDF does without one.
  char digest[] = "SHA256";
  OSSL_PARAM params[5];
  size_t n = 0;
  params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
  params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(ikm.data()), ikm.size());
  if (!salt.empty()) {
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<uint8_t*>(salt.data()), salt.size());
  }
  if (!info.empty()) {
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<uint8_t*>(info.data()), info.size());
  }
  params[n] = OSSL_PARAM_construct_end();
  SecretBytes out(length);
  int ok = EVP_KDF_derive(ctx, out.data(), length, params);
  EVP_KDF_CTX_free(ctx);
  if (ok != 1) return Status(Code::kInternal, "HKDF-SHA256 failed");
  return out;
}

HmacSha256::HmacSha256(const SecretBytes& key) : key_(key.clone()) {}

Result<Mac256> HmacSha256::mac(std::initializer_list<ByteView> parts) {
  auto& slot = pool_.mine();
  std::lock_guard lock(slot.mu);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  bool fresh = slot.ctx == nullptr;
  if (fresh) {
    if (hmac_algorithm() == nullptr || (slot.ctx = EVP_MAC_CTX_new(hmac_algorithm())) == nullptr) {
      return Status(Code::kInternal, "HMAC context");
    }
  }
  // The first init sets the key; later inits pass no key and reuse the keyed state.
  int ok = fresh ? EVP_MAC_init(slot.ctx, key_.data(), key_.size(), params)
                 : EVP_MAC_init(slot.ctx, nullptr, 0, nullptr);
  for (ByteView p : parts) {
    if (ok == 1 && !p.empty()) ok = EVP_MAC_update(slot.ctx, p.data(), p.size());
  }
  Mac256 out{};
  size_t len = 0;
  if (ok != 1 || EVP_MAC_final(slot.ctx, out.data(), &len, out.size()) != 1 || len != 32) {
    return Status(Code::kInternal, "HMAC-SHA256 failed");
  }
  return out;
}

}  // namespace envelopefs
