// The gate every FUSE request passes to use the volume keys. Open while the root key is known
// good; closed when it is revoked (fs/key_watch.h), and then requests are answered
// EKEYREVOKED without touching a key; paused for a moment while the keys are swapped for a
// new DEK version, and then requests wait. close() and pause() return only once no request
// is inside, so the keys can be wiped or replaced right after with nothing still using them.
//
// Cost per request: two atomic operations on a shared counter and one load (Dekker-style:
// the counter is raised before the flag is read, the flag is set before the counter is read,
// both sequentially consistent, so a request and a close cannot miss each other).
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>

namespace envelopefs {

class KeyGate {
 public:
  // False: the gate is closed; the caller must not use the keys (and must not call leave()).
  // While paused, waits until the gate opens or closes.
  bool enter() {
    for (;;) {
      inflight_.fetch_add(1);
      const int s = state_.load();
      if (s == kOpen) return true;
      leave();
      if (s == kClosed) return false;
      std::unique_lock lock(mu_);
      changed_.wait(lock, [&] { return state_.load() != kPaused; });
    }
  }
  void leave() {
    if (inflight_.fetch_sub(1) == 1 && state_.load() != kOpen) {
      std::lock_guard lock(mu_);  // pause() or close() is waiting, or about to: it cannot miss this
      changed_.notify_all();
    }
  }
  // Refuses new requests (EKEYREVOKED) and waits for the ones inside to finish.
  void close() { set_and_drain(kClosed); }
  // Holds new requests back (they wait, then go on) and waits for the ones inside to finish:
  // for swapping the keys while the volume stays in service.
  void pause() { set_and_drain(kPaused); }
  void open() {
    std::lock_guard lock(mu_);
    state_.store(kOpen);
    changed_.notify_all();
  }
  bool closed() const { return state_.load() == kClosed; }

 private:
  static constexpr int kOpen = 0, kPaused = 1, kClosed = 2;
  void set_and_drain(int state) {
    std::unique_lock lock(mu_);
    state_.store(state);
    changed_.notify_all();  // requests waiting on a pause learn of a close
    changed_.wait(lock, [&] { return inflight_.load() == 0; });
  }

  std::atomic<long> inflight_{0};
  std::atomic<int> state_{kOpen};
  std::mutex mu_;
  std::condition_variable changed_;
};

// enter()/leave() for one scope; `ok` says whether the request may go on.
class KeyGateScope {
 public:
  explicit KeyGateScope(KeyGate& gate) : gate_(gate), ok_(gate.enter()) {}
  ~KeyGateScope() {
    if (ok_) gate_.leave();
  }
  KeyGateScope(const KeyGateScope&) = delete;
  KeyGateScope& operator=(const KeyGateScope&) = delete;
  bool ok() const { return ok_; }

 private:
  KeyGate& gate_;
  bool ok_;
};

}  // namespace envelopefs
