// Small private helpers over OpenSSL 3 EVP: fetched-once algorithms and a pool of keyed
// contexts shared by threads. Not part of the crypto/ public interface.
#pragma once

#include <openssl/evp.h>

#include <array>
#include <atomic>
#include <mutex>

namespace envelopefs::evp {

// Fetched on first use and kept for the life of the process (no provider look-up per block).
const EVP_CIPHER* aes256_gcm();
const EVP_CIPHER* aes256_ecb();
const EVP_CIPHER* aes256_siv();
const EVP_CIPHER* aes128_siv();

// Index of the calling thread, stable for its life; spreads threads over pool slots.
unsigned thread_slot();

// A fixed set of contexts keyed with the same key. A keyed EVP context is not safe to use from
// two threads at once, so each slot has its own lock; threads mostly hit distinct slots.
// Freeing the pool frees (and so cleanses) every key schedule.
template <typename Ctx, void (*Free)(Ctx*)>
class ContextPool {
 public:
  static constexpr unsigned kSlots = 8;
  ContextPool() = default;
  ContextPool(const ContextPool&) = delete;
  ContextPool& operator=(const ContextPool&) = delete;
  ~ContextPool() {
    for (auto& s : slots_) {
      if (s.ctx) Free(s.ctx);
    }
  }
  struct Slot {
    std::mutex mu;
    Ctx* ctx = nullptr;
  };
  Slot& mine() { return slots_[thread_slot() % kSlots]; }
  std::array<Slot, kSlots>& all() { return slots_; }

 private:
  std::array<Slot, kSlots> slots_;
};

}  // namespace envelopefs::evp
