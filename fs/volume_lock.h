// One daemon per volume. Each daemon caches what it read of the backing files it serves
// (metadata pages with the block keys, file sizes, directory nonces) and writes them back as
// if no one else did, so two mounts of one cipher dir writing side by side would overwrite
// each other's block keys: blocks that no longer authenticate, data gone. The mount holds a
// lock of `envelopefs.lock` in the cipher root for the daemon's whole life (the kernel drops
// it when the daemon dies, SIGKILL included): a write lock for a read-write mount, a read lock
// for a read-only one, which writes nothing and may run beside others like it.
#pragma once

#include <string>

#include "crypto/status.h"

namespace envelopefs {

inline constexpr char kVolumeLockName[] = "envelopefs.lock";

// The lock, held until the object is destroyed. Its release is the daemon's last act: once
// the unmounted daemon has closed every file, `write_back()` asked for it makes the release
// wait for the backing filesystem's syncfs, so that `envelopefs unmount`, which waits for the
// release, returns with the volume on disk, as a disk filesystem's unmount does. (Nothing
// else would: the kernel sends a FUSE daemon no syncfs, and the backing files' page cache
// could hold the last writes for half a minute after the unmount.)
class VolumeLock {
 public:
  VolumeLock() = default;
  explicit VolumeLock(int fd) : fd_(fd) {}
  VolumeLock(VolumeLock&& o) noexcept : fd_(o.fd_), write_back_(o.write_back_) { o.fd_ = -1; }
  VolumeLock& operator=(VolumeLock&&) = delete;
  VolumeLock(const VolumeLock&) = delete;
  ~VolumeLock();
  void write_back() { write_back_ = true; }

 private:
  int fd_ = -1;  // -1: no lock (a read-only mount where none could be made)
  bool write_back_ = false;
};

// A read-only mount that finds no lock file (a volume made before `init` made one; the mount
// makes nothing) gets an empty lock. A volume mounted already: EBUSY, with a message naming
// where, if this mount namespace shows it.
Result<VolumeLock> lock_volume(const std::string& cipher_dir, bool read_only);

// After the unmount of a volume mounted read-write: waits until its daemon has let the lock go
// (written it back and exited), saying so on stderr after `quiet_for` seconds; false if it
// still holds it after `limit` seconds.
bool wait_for_release(const std::string& cipher_dir, int quiet_for, int limit);

// Whether a daemon holds the volume read-write now (for fsck and status: what a check reads
// while the mount writes can look damaged).
bool volume_in_use(const std::string& cipher_dir);

}  // namespace envelopefs
