#include "fs/key_watch.h"

#include "fs/log.h"

namespace envelopefs {

KeyWatch::KeyWatch(fuse_session* se, Filesystem& fs, std::string cipher_dir, ProviderOptions provider,
                   KeyWatchOptions options, std::function<void()> keys_changed)
    : se_(se),
      fs_(fs),
      cipher_dir_(std::move(cipher_dir)),
      provider_(std::move(provider)),
      options_(options),
      keys_changed_(std::move(keys_changed)),
      last_good_(std::chrono::steady_clock::now()) {
  if (options_.interval.count() > 0) thread_ = std::thread([this] { run(); });
}

KeyWatch::~KeyWatch() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void KeyWatch::run() {
  std::unique_lock lock(mu_);
  while (!wake_.wait_for(lock, options_.interval, [&] { return stop_; })) {
    lock.unlock();
    check();
    lock.lock();
  }
}

void KeyWatch::check() {
  const bool revoked = fs_.gate().closed();
  // Only the watcher closes or pauses the gate and replaces the keys; recheck_root only reads
  // them, and builds any new ones apart, to be swapped in behind the gate.
  std::unique_ptr<VolumeKeys> fresh;
  Status st = recheck_root(cipher_dir_, provider_, fs_.keys(), &fresh);
  if (st.ok()) {
    last_good_ = std::chrono::steady_clock::now();
    if (revoked) {
      fs_.keys() = std::move(*fresh);
      fs_.gate().open();
      log_info("root key available again: keys restored, the volume is back in service");
      record("restored", "ok", "keys unwrapped again; requests are served");
      keys_changed_();
    } else if (fresh) {
      // A new active DEK version (envelopefs rotate-dek): requests wait a moment, not fail.
      const uint32_t before = fs_.keys().active_version();
      fs_.gate().pause();
      fs_.keys() = std::move(*fresh);
      fs_.gate().open();
      const std::string what = "DEK v" + std::to_string(fs_.keys().active_version()) + " is active (was v" +
                               std::to_string(before) + "); new writes are sealed under it";
      log_info(what);
      record("dek-switch", "ok", what);
      keys_changed_();
    }
    return;
  }
  if (revoked) return;  // still revoked; nothing more to do
  if (st.code() == Code::kUnreachable) {
    const auto away = std::chrono::steady_clock::now() - last_good_;
    if (away < options_.grace) {
      log_error("root key unreachable (" + st.to_string() + "); keys kept for up to " +
                std::to_string(options_.grace.count()) + " s since the last good check");
      return;
    }
    revoke("unreachable for more than " + std::to_string(options_.grace.count()) + " s: " + st.to_string());
    return;
  }
  revoke(st.to_string());
}

void KeyWatch::revoke(const std::string& why) {
  drop_kernel_caches();  // dirty pages are written back while the keys still work
  fs_.gate().close();
  fs_.keys().wipe();
  drop_kernel_caches();  // anything read in the meantime
  log_error("root key revoked (" + why +
            "): keys zeroized; every request now fails with "
            "EKEYREVOKED until the root key is available again");
  record("revoked", "keys zeroized", why);
}

void KeyWatch::record(const std::string& event, const std::string& outcome, const std::string& detail) {
  audit_from_daemon({event, outcome, to_hex(fs_.keys().volume_id()), cipher_dir_, "", detail});
}

void KeyWatch::drop_kernel_caches() {
  // Not from a request handler (this is the watcher's own thread), so no request of ours can
  // be waiting on the inode the kernel locks here. ENOENT: the kernel forgot it meanwhile.
  for (uint64_t ino : fs_.inode_ids()) (void)fuse_lowlevel_notify_inval_inode(se_, ino, 0, 0);
}

}  // namespace envelopefs
