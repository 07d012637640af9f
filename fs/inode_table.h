// FUSE inode numbers ↔ backing files. Each inode holds an O_PATH descriptor of its backing file
// and a lookup count; FUSE numbers are our own counter (never pointers, so a stale number from
// the kernel is ESTALE, not a use-after-free). Hard links share one Inode, keyed by the backing
// (dev, ino).
//
// The kernel remembers an inode until memory runs short, so a walk over a large tree leaves
// one descriptor per file it met: more than RLIMIT_NOFILE allows (fs.nr_open, 1,048,576, for
// root; the hard limit, often far less, for anyone else), and then every request failed with
// EMFILE. So the table keeps at most a budget of descriptors (limit_descriptors): past it, the
// descriptors of inodes that are not open and were not used lately are closed, and the file
// handle of each (name_to_handle_at) opens it again when the kernel next asks about it. That
// needs CAP_DAC_READ_SEARCH (open_by_handle_at) and a backing filesystem with file handles;
// without them there is no budget, as before.
//
// Lock order: InodeTable::mu_ before Inode::mu before Inode::path_mu. None is held across
// backing I/O of file data.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
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

// An O_PATH descriptor of a backing node (never of what a symlink names), closed when the last
// holder lets go: a request keeps working with it while the table takes it from its inode.
struct BackingPath {
  explicit BackingPath(int f) : fd(f) {}
  ~BackingPath();
  BackingPath(const BackingPath&) = delete;
  BackingPath& operator=(const BackingPath&) = delete;
  const int fd;
};
using PathRef = std::shared_ptr<const BackingPath>;

struct Inode {
  uint64_t id = 0;
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
  int8_t default_acl = -1;      // directories: has a default ACL (1), has none (0), unknown (-1)
  // The errno of a WRITE from the kernel's page cache that failed and that no writer has been
  // told of yet (Filesystem::note_writeback_error); 0 if none.
  std::atomic<int> writeback_error{0};

  // The descriptor, through InodeTable::path (which may have to open it again).
  std::mutex path_mu;                 // guards the four below
  PathRef path;                       // null while the table has closed it
  std::vector<unsigned char> handle;  // a struct file_handle, once the descriptor was closed
  bool keep_path = false;             // never closed: the root, an unlinked node, no file handle
  bool in_table = true;               // counted in the table's descriptors
  std::atomic<bool> used{false};      // again since it came in, or since the clock last passed
};

class InodeTable {
 public:
  explicit InodeTable(int root_fd);
  ~InodeTable();
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;
  // nullptr if the kernel names an inode we do not have (ESTALE).
  std::shared_ptr<Inode> get(uint64_t id);
  // The inode's backing descriptor, opened again from its file handle if the table closed it
  // (ESTALE if the node is gone from the backing filesystem). Hold it while it is used.
  Result<PathRef> path(Inode& inode);
  // From now on at most `budget` descriptors (a few more while requests hold them). False,
  // with `why`, where closed descriptors could not be opened again: no budget then.
  bool limit_descriptors(size_t budget, std::string* why);
  // The inode of backing node `entry` of `dir_fd`, if the kernel knows it, keeps its
  // descriptor from now on: called before the node's last link may go (unlink, rmdir, a
  // rename over it), after which its file handle would open nothing, while the kernel may
  // still ask about it (the SETATTR after an UNLINK, an O_PATH descriptor of it in a process).
  void keep_before_removal(int dir_fd, const char* entry);
  size_t budget() const { return budget_.load(std::memory_order_relaxed); }
  size_t descriptors() const { return held_.load(std::memory_order_relaxed); }
  uint64_t reopened() const { return reopened_.load(std::memory_order_relaxed); }
  // Finds the inode for backing (dev, ino) or adopts `fd` as a new one; bumps its lookup
  // count. Takes ownership of `fd` (closed if an inode already existed, unless that one's own
  // descriptor had been closed: then `fd` takes its place). `parent` 0: the
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
  // Closes unused descriptors, clock-wise from where the last pass stopped, down to the budget
  // less an eighth of it (4,096 at most).
  void trim();

  const int root_fd_;
  dev_t root_dev_ = 0;
  int mount_fd_ = -1;  // the cipher dir opened for open_by_handle_at, once a budget is set
  std::atomic<size_t> held_{1};
  std::atomic<size_t> budget_{SIZE_MAX};
  std::atomic<size_t> trim_at_{SIZE_MAX};  // the count above which a request calls trim()
  std::atomic<bool> trimmed_{false};
  std::atomic<uint64_t> reopened_{0};
  std::mutex trim_mu_;  // one pass at a time; guards hand_
  uint64_t hand_ = 0;

  std::mutex mu_;
  uint64_t next_ = 2;
  std::map<uint64_t, std::shared_ptr<Inode>> by_id_;
  std::map<std::pair<dev_t, ino_t>, uint64_t> by_backing_;
};

}  // namespace envelopefs
