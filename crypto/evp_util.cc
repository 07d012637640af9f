#include "crypto/evp_util.h"

#include <cstdio>
#include <cstdlib>

namespace envelopefs::evp {
namespace {

const EVP_CIPHER* fetch_or_die(const char* name) {
  EVP_CIPHER* c = EVP_CIPHER_fetch(nullptr, name, nullptr);
  if (c == nullptr) {
    std::fprintf(stderr, "envelopefs: OpenSSL has no %s\n", name);
    std::abort();
  }
  return c;
}

}  // namespace

const EVP_CIPHER* aes256_gcm() {
  static const EVP_CIPHER* c = fetch_or_die("AES-256-GCM");
  return c;
}
const EVP_CIPHER* aes256_ecb() {
  static const EVP_CIPHER* c = fetch_or_die("AES-256-ECB");
  return c;
}
const EVP_CIPHER* aes128_siv() {
  static const EVP_CIPHER* c = fetch_or_die("AES-128-SIV");
  return c;
}
const EVP_CIPHER* aes256_siv() {
  static const EVP_CIPHER* c = fetch_or_die("AES-256-SIV");
  return c;
}

unsigned thread_slot() {
  static std::atomic<unsigned> next{0};
  thread_local unsigned mine = next.fetch_add(1, std::memory_order_relaxed);
  return mine;
}

}  // namespace envelopefs::evp
