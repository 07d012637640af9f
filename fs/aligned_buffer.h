// A page-aligned heap buffer: whole blocks read into or written from it can go through an
// O_DIRECT descriptor (see CipherFile::set_direct_fd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

namespace envelopefs {

class AlignedBuffer {
 public:
  static constexpr size_t kAlign = 4096;
  AlignedBuffer() = default;
  // Uninitialised; rounded up to whole pages.
  explicit AlignedBuffer(size_t n)
      : cap_((n + kAlign - 1) / kAlign * kAlign), p_(static_cast<uint8_t*>(std::aligned_alloc(kAlign, cap_ ? cap_ : kAlign))) {
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(AlignedBuffer&& o) noexcept : cap_(std::exchange(o.cap_, 0)), p_(std::exchange(o.p_, nullptr)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(cap_, o.cap_);
    std::swap(p_, o.p_);
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() { return p_; }
  size_t capacity() const { return cap_; }

 private:
  size_t cap_ = 0;
  uint8_t* p_ = nullptr;
};

}  // namespace envelopefs
