// FUSE inode numbers ↔ backing files. Each inode holds an O_PATH descriptor of its backing file
// and a lookup count; FUSE numbers are our own counter (never pointers, so a stale number from
// the kernel is ESTALE, not a use-after-free). Hard links share one Inode, keyed by the backing
// (dev, ino).
//
// Lock order: InodeTable::mu_ before Inode::mu. Neither is held across backing I/O of file data.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "fs/cipher_file.h"
#include "fs/names.h"

namespace envelopefs {

// File times set through the mount that the backing file does not carry yet. With the
// writeback cache the kernel keeps a written file's mtime and ctime itself and sends them in
// a SETATTR before every fsync and close of it. Applied at once, each marks the backing inode
// dirty, and a backing ext4 without a journal then writes the inode block at the next
// fdatasync too: one disk write in four of an append+fdatasync log. So an open file keeps them
// here until a full fsync, a SETATTR that changes more than times, or its last close, and
// stat reports them meanwhile (Filesystem::stat_inode). fdatasync need not make times durable
// (POSIX); if the daemon dies first, the backing file keeps the time of its last write.
struct DeferredTimes {
  timespec atime{0, UTIME_OMIT};
  timespec mtime{0, UTIME_OMIT};
  timespec ctime{0, 0};  // what the kernel said, or when the SETATTR came
};

// A regular file with open handles: one backing fd and one CipherFile, shared by all handles.
struct OpenFile {
  int fd = -1;
  int direct_fd = -1;  // the same file opened O_DIRECT (--direct-backing), or -1
  std::unique_ptr<CipherFile> file;

  std::mutex times_mu;  // guards `deferred`, and is held across a stat that reports it
  std::optional<DeferredTimes> deferred;

  // Keeps `times` (UTIME_NOW already resolved; UTIME_OMIT keeps what was deferred before).
  void defer_times(const timespec times[2], const timespec& ctime);
  // futimens with `times` (UTIME_OMIT fields take deferred ones), clearing what was deferred.
  Status set_times(const timespec times[2]);
  Status apply_deferred_times() {
    const timespec omit[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
    return set_times(omit);
  }
  ~OpenFile();  // applies deferred times
};

struct Inode {
  uint64_t id = 0;
  int fd = -1;  // O_PATH | O_NOFOLLOW
  dev_t dev = 0;
  ino_t ino = 0;
  mode_t type = 0;  // S_IFMT bits
  std::atomic<uint64_t> nlookup{0};

  std::mutex mu;  // guards everything below
  std::optional<DirNonce> nonce;   // directories, read on first use
  std::shared_ptr<OpenFile> open;  // regular files with open handles
  int open_count = 0;
  uint64_t parent = 0;          // a directory holding this inode (last seen)
  bool entry_unsynced = false;  // created or renamed since that directory was fsynced

  ~Inode();
};

class InodeTable {
 public:
  explicit InodeTable(int root_fd);
  // nullptr if the kernel names an inode we do not have (ESTALE).
  std::shared_ptr<Inode> get(uint64_t id);
  // Finds the inode for backing (dev, ino) or adopts `fd` as a new one; bumps its lookup
  // count. Takes ownership of `fd` (closed if an inode already existed). `parent` 0: the
  // daemon's own use (fs/block_rewrap.h), which counts as a lookup, given back with
  // forget(id, 1), so the kernel's forgets cannot drop the inode (and a later LOOKUP make a
  // second one) while the daemon works on it; the inode's parent is left as it was.
  std::shared_ptr<Inode> adopt(int fd, const struct stat& st, uint64_t parent);
  void forget(uint64_t id, uint64_t n);
  // The inode for backing (dev, ino) if the kernel knows it; does not change lookup counts.
  std::shared_ptr<Inode> find(dev_t dev, ino_t ino);
  size_t size();
  std::vector<uint64_t> ids();

 private:
  std::mutex mu_;
  uint64_t next_ = 2;
  std::map<uint64_t, std::shared_ptr<Inode>> by_id_;
  std::map<std::pair<dev_t, ino_t>, uint64_t> by_backing_;
};

}  // namespace envelopefs
