// The gate every FUSE request passes to use the volume keys. Open while the root key is known
// good; closed when it is revoked (fs/key_watch.h), and then requests are answered
// EKEYREVOKED without touching a key. close() returns only once no request is inside, so the
// keys can be wiped right after it with nothing still using them.
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
  bool enter() {
    inflight_.fetch_add(1);
    if (closed_.load()) {
      leave();
      return false;
    }
    return true;
  }
  void leave() {
    if (inflight_.fetch_sub(1) == 1 && closed_.load()) {
      std::lock_guard lock(mu_);  // close() is waiting, or about to: it cannot miss this
      drained_.notify_all();
    }
  }
  // Refuses new requests and waits for the ones inside to finish.
  void close() {
    closed_.store(true);
    std::unique_lock lock(mu_);
    drained_.wait(lock, [&] { return inflight_.load() == 0; });
  }
  void open() { closed_.store(false); }
  bool closed() const { return closed_.load(); }

 private:
  std::atomic<long> inflight_{0};
  std::atomic<bool> closed_{false};
  std::mutex mu_;
  std::condition_variable drained_;
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
