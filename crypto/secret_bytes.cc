#include "crypto/secret_bytes.h"

#include <openssl/crypto.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "crypto/random.h"

namespace envelopefs {
namespace {

size_t round_to_page(size_t n) {
  constexpr size_t kPage = 4096;
  return (n + kPage - 1) / kPage * kPage;
}

}  // namespace

SecretBytes::SecretBytes(size_t size) : size_(size) {
  if (size == 0) return;
  mapped_ = round_to_page(size);
  void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fputs("envelopefs: cannot allocate key memory\n", stderr);
    std::abort();
  }
  if (mlock(p, mapped_) != 0) {
    std::fputs("envelopefs: cannot lock key memory (mlock); raise RLIMIT_MEMLOCK\n", stderr);
    std::abort();
  }
  madvise(p, mapped_, MADV_DONTDUMP);
  madvise(p, mapped_, MADV_DONTFORK);
  data_ = static_cast<uint8_t*>(p);
}

SecretBytes::SecretBytes(const uint8_t* data, size_t size) : SecretBytes(size) {
  if (size) std::memcpy(data_, data, size);
}

SecretBytes::~SecretBytes() { wipe(); }

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    wipe();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
  }
  return *this;
}

void SecretBytes::wipe() {
  if (data_ == nullptr) return;
  OPENSSL_cleanse(data_, mapped_);
  munlock(data_, mapped_);
  munmap(data_, mapped_);
  data_ = nullptr;
  size_ = 0;
  mapped_ = 0;
}

Result<SecretBytes> SecretBytes::random(size_t size) {
  SecretBytes s(size);
  ENVELOPEFS_RETURN_IF_ERROR(random_fill(s.mut_view()));
  return s;
}

void harden_process() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  // Keys are small, but every thread keeps a locked scratch page; make room where we may.
  rlimit mem;
  if (getrlimit(RLIMIT_MEMLOCK, &mem) == 0 && mem.rlim_cur != RLIM_INFINITY) {
    rlimit want{mem.rlim_max, mem.rlim_max};
    setrlimit(RLIMIT_MEMLOCK, &want);
  }
}

}  // namespace envelopefs
