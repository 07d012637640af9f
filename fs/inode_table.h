// FUSE inode numbers ↔ backing files. Each inode holds an O_PATH descriptor of its backing file
// and a lookup count; FUSE numbers are our own counter (never pointers, so a stale number from
// the kernel is ESTALE, not a use-after-free). Hard links share one Inode, keyed by the backing
// (dev, ino).
//
// Lock order: InodeTable::mu_ before Inode::mu. Neither is held across backing I/O of file data.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "fs/cipher_file.h"
#include "fs/names.h"

namespace envelopefs {

// A regular file with open handles: one backing fd and one CipherFile, shared by all handles.
struct OpenFile {
  int fd = -1;
  int direct_fd = -1;  // the same file opened O_DIRECT (--direct-backing), or -1
  std::unique_ptr<CipherFile> file;
  ~OpenFile();
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
  // count. Takes ownership of `fd` (closed if an inode already existed).
  std::shared_ptr<Inode> adopt(int fd, const struct stat& st, uint64_t parent);
  void forget(uint64_t id, uint64_t n);
  // The inode for backing (dev, ino) if the kernel knows it; does not change lookup counts.
  std::shared_ptr<Inode> find(dev_t dev, ino_t ino);
  size_t size();

 private:
  std::mutex mu_;
  uint64_t next_ = 2;
  std::map<uint64_t, std::shared_ptr<Inode>> by_id_;
  std::map<std::pair<dev_t, ino_t>, uint64_t> by_backing_;
};

}  // namespace envelopefs
