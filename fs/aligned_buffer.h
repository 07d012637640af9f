// A page-aligned heap buffer: whole blocks read into or written from it can go through an
// O_DIRECT descriptor (see CipherFile::set_direct_fd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

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

// A per-thread free list of AlignedBuffers. The write path needs a ciphertext buffer for every
// request; a fresh 1 MiB allocation is an mmap whose first touch faults in and zeroes every page,
// which cost ~15% of the daemon's CPU on a sequential write. Buffers come back here instead.
// Each thread keeps at most kKeep buffers of at most kMaxKept bytes.
class BufferPool {
 public:
  static constexpr size_t kKeep = 2;
  static constexpr size_t kMaxKept = size_t{4} << 20;

  static AlignedBuffer take(size_t n) {
    auto& free = list();
    for (size_t i = 0; i < free.size(); ++i) {
      if (free[i].capacity() >= n) {
        AlignedBuffer b = std::move(free[i]);
        free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
        return b;
      }
    }
    return AlignedBuffer(n);
  }
  static void give(AlignedBuffer b) {
    auto& free = list();
    if (b.capacity() == 0 || b.capacity() > kMaxKept) return;
    if (free.size() >= kKeep) free.erase(free.begin());  // keep the most recent
    free.push_back(std::move(b));
  }

 private:
  static std::vector<AlignedBuffer>& list() {
    thread_local std::vector<AlignedBuffer> free;
    return free;
  }
};

}  // namespace envelopefs
