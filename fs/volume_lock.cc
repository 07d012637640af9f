#include "fs/volume_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "fs/log.h"
#include "fs/mount_table.h"
#include "keyhierarchy/volume_config.h"

namespace envelopefs {

namespace {

// An open-file-description lock of the whole file (F_OFD_SETLK): released with the last
// descriptor of that open, or the process's death; and F_OFD_GETLK can look without taking.
struct flock whole_file(short type) {
  struct flock l {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  return l;
}

}  // namespace

VolumeLock::~VolumeLock() {
  if (fd_ < 0) return;
  if (write_back_ && syncfs(fd_) != 0) {
    log_error(std::string("unmount: syncfs of the cipher dir: ") + std::strerror(errno));
  }
  close(fd_);  // the lock goes with it
}

Result<VolumeLock> lock_volume(const std::string& cipher_dir, bool read_only) {
  const std::string path = cipher_dir + "/" + kVolumeLockName;
  // A read-only mount writes nothing, not even this file (init makes it): a volume from before
  // it existed is mounted read-only without a lock, and a read-write mount beside it is not
  // refused. The read-only one may then read the other's changes as damage (EIO) or miss new
  // names, but it writes nothing that could hurt the volume.
  int fd = open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0 && errno == ENOENT) {
    // Only a volume gets the lock file it lacks: a mount of a directory that is not one (a
    // mistyped path) writes nothing into it.
    if (Status st = require_config(cipher_dir); !st.ok()) return st;
    if (read_only) return VolumeLock();
    fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  }
  if (fd < 0) return Status::Io(errno, "open " + path);
  // A daemon killed a moment ago may still be exiting, its files (and the lock) not yet
  // closed: a crash test or a script remounting right after `kill -9` waits for that a little,
  // rather than being told the volume is mounted.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  int err = 0;
  for (;;) {
    struct flock l = whole_file(read_only ? F_RDLCK : F_WRLCK);
    if (fcntl(fd, F_OFD_SETLK, &l) == 0) return VolumeLock(fd);
    err = errno;
    if ((err != EAGAIN && err != EACCES) || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  struct flock held = whole_file(F_WRLCK);  // what stands in the way: a reader's or a writer's
  const bool by_reader = fcntl(fd, F_OFD_GETLK, &held) == 0 && held.l_type == F_RDLCK;
  close(fd);
  if (err != EAGAIN && err != EACCES) return Status::Io(err, "lock " + path);
  // The caller's cipher dir may be relative; a mount names it as absolute_path() makes it.
  const std::string source = absolute_path(cipher_dir);
  std::string where;
  for (const MountEntry& m : envelopefs_mounts()) {
    if (m.source == source) where += (where.empty() ? " on " : ", ") + m.target;
  }
  return Status(Code::kIoError,
                cipher_dir + " is mounted already" + (by_reader ? " read-only" : " read-write") +
                    (where.empty() ? " (by a daemon this mount namespace does not show)" : where) +
                    ": two daemons writing one volume would overwrite each other's block keys",
                EBUSY);
}

bool wait_for_release(const std::string& cipher_dir, int quiet_for, int limit) {
  const auto start = std::chrono::steady_clock::now();
  bool said = false;
  while (volume_in_use(cipher_dir)) {
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > std::chrono::seconds(limit)) return false;
    if (!said && waited > std::chrono::seconds(quiet_for)) {
      std::fprintf(stderr, "envelopefs: waiting for the daemon to write %s back to disk...\n",
                   cipher_dir.c_str());
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

bool volume_in_use(const std::string& cipher_dir) {
  const std::string path = cipher_dir + "/" + kVolumeLockName;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  struct flock l = whole_file(F_RDLCK);  // what a reader would meet: a writer's lock
  const bool held = fcntl(fd, F_OFD_GETLK, &l) == 0 && l.l_type != F_UNLCK;
  close(fd);
  return held;
}

}  // namespace envelopefs
