// Re-validation of the root key while a volume is mounted, so that revoking it in the key
// service stops the volume: fails closed, and resumes once access returns.
//
// Every `interval` the watcher asks the root again exactly as a mount would (recheck_root:
// the config re-read, a fresh provider, every wrapped key unwrapped). When the root refuses
// (access denied: key destroyed, disabled, PIN changed; or the config no longer
// authenticates), or has been unreachable for longer than `grace`, the watcher
//   1. drops the kernel's caches of every inode (plaintext pages, attributes), writing back
//      dirty pages while the keys still work,
//   2. closes the key gate (fs/key_gate.h) and waits for requests in flight,
//   3. wipes every key (cleansed), drops the caches once more,
// after which every request is answered EKEYREVOKED. It keeps asking; once the root opens the
// volume again, the keys are rebuilt and the gate reopens. When the config names a new active
// DEK version (envelopefs rotate-dek), the keys are swapped behind a paused gate: requests
// wait for the swap instead of failing. Each transition is logged and audited.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "fs/filesystem.h"
#include "fs/fuse_ops.h"  // fuse_session

namespace envelopefs {

struct KeyWatchOptions {
  std::chrono::seconds interval{60};  // 0: never re-check
  std::chrono::seconds grace{300};    // how long an unreachable root is trusted
};

class KeyWatch {
 public:
  // `keys_changed` runs on the watcher's thread after a switch to a new DEK version and after
  // revoked keys are restored (it starts the block re-wrap, fs/block_rewrap.h).
  KeyWatch(fuse_session* se, Filesystem& fs, std::string cipher_dir, ProviderOptions provider,
           KeyWatchOptions options, std::function<void()> keys_changed);
  ~KeyWatch();  // stops the thread
  KeyWatch(const KeyWatch&) = delete;
  KeyWatch& operator=(const KeyWatch&) = delete;

 private:
  void run();
  void check();
  void revoke(const std::string& why);
  void drop_kernel_caches();
  void record(const std::string& event, const std::string& outcome, const std::string& detail);

  fuse_session* se_;
  Filesystem& fs_;
  const std::string cipher_dir_;
  const ProviderOptions provider_;
  const KeyWatchOptions options_;
  const std::function<void()> keys_changed_;
  std::chrono::steady_clock::time_point last_good_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace envelopefs
