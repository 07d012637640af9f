// The filesystem: every FUSE operation as a method that does the work and returns a Status.
// fuse_ops.cc holds the thin libfuse handlers that call these and reply exactly once.
#pragma once

#include <sys/stat.h>
#include <sys/statvfs.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "fs/inode_table.h"
#include "fs/io_backend.h"
#include "fs/key_gate.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {

struct FsOptions {
  // We are the only writer of the cipher dir, so the kernel may trust what it caches.
  double attr_timeout = 10.0;
  double entry_timeout = 10.0;
  bool writeback_cache = true;
  // Whole-block backing I/O with O_DIRECT, so plaintext (in the FUSE page cache) is not
  // cached a second time as ciphertext.
  bool direct_backing = false;
  // POSIX ACLs (--acl), where they can be kept (Filesystem::can_store_acls). Off by default for
  // their cost: the kernel asks whether a node has an ACL when a user other than its owner
  // passes a mode with group bits, and never caches the answer for the mount's root, whose
  // inode it makes before INIT has said that the mount has ACLs. So with them, every path
  // walk through the root by such a user is a GETXATTR round trip: a stat of a cached path
  // 2.2 → 32-42 µs, an open and close 55-61 → 85-88 µs (bench/README).
  bool posix_acls = false;
};

struct Entry {
  uint64_t ino = 0;
  struct stat attr {};
};

struct DirEntry {
  std::string name;
  ino_t ino;
  unsigned type;  // DT_*
};

class Filesystem {
 public:
  Filesystem(std::string cipher_dir, int root_fd, OpenedVolume volume,
             std::unique_ptr<IoBackend> io, FsOptions options);
  const FsOptions& options() const { return options_; }
  IoBackend& io() { return *io_; }
  // Revocation (fs/key_watch.h): requests pass the gate; the keys are wiped and rebuilt behind it.
  KeyGate& gate() { return gate_; }
  VolumeKeys& keys() { return *keys_; }
  // The inodes the kernel holds, for dropping its caches of them.
  std::vector<uint64_t> inode_ids() { return inodes_.ids(); }
  InodeTable& inodes() { return inodes_; }
  // POSIX ACLs (fs/FORMAT.md, "Extended attributes"): kept as the backing filesystem's own,
  // which then does what POSIX asks of them (the mode's group bits as the mask, a default ACL
  // passed down to new nodes, chmod). Possible when the daemon runs as root (it must reach
  // every backing node whatever its ACL says) on a backing filesystem that has them, when the
  // mount asks for them (FsOptions::posix_acls); on once
  // INIT has settled them with the kernel (use_posix_acls), which checks them itself.
  bool can_store_acls() const { return acl_capable_; }
  // Why the ACLs the mount asked for cannot be kept here; empty when they can, or were not
  // asked for. The kernel's own refusal comes later, at INIT.
  std::string acl_refusal() const;
  void use_posix_acls() { posix_acls_ = true; }
  bool posix_acls() const { return posix_acls_; }

  // Caller identity for new files (set per request from fuse_req_ctx).
  struct Caller {
    uid_t uid;
    gid_t gid;
    // With POSIX ACLs the kernel leaves the umask to us (FUSE_DONT_MASK): applied unless the
    // parent has a default ACL. 0 otherwise: the kernel has applied it to the mode.
    mode_t umask = 0;
  };

  Status lookup(uint64_t parent, const char* name, Entry* out);
  // Clears set-user-ID, and set-group-ID if group-executable, as a write or truncate by an
  // unprivileged user does (the kernel leaves this to us: fs/fuse_channel.h).
  Status kill_suidgid(uint64_t ino);
  void forget(uint64_t ino, uint64_t n) { inodes_.forget(ino, n); }
  Status getattr(uint64_t ino, struct stat* out);
  // A WRITE of the kernel's page cache (writeback) failed with `err`: nobody waits for its
  // reply, and the kernel goes on taking writes into the cache, so the error is kept for the
  // file's next writer (fuse_ops.cc). take_ returns it once, or 0.
  void note_writeback_error(uint64_t ino, int err);
  int take_writeback_error(uint64_t ino);
  Status setattr(uint64_t ino, const struct stat& attr, int to_set, struct stat* out);
  Status readlink(uint64_t ino, std::string* target);
  Status mknod(uint64_t parent, const char* name, mode_t mode, dev_t rdev, Caller who, Entry* out);
  Status mkdir(uint64_t parent, const char* name, mode_t mode, Caller who, Entry* out);
  Status symlink(const char* target, uint64_t parent, const char* name, Caller who, Entry* out);
  Status link(uint64_t ino, uint64_t parent, const char* name, Entry* out);
  Status unlink(uint64_t parent, const char* name);
  Status rmdir(uint64_t parent, const char* name);
  Status rename(uint64_t parent, const char* name, uint64_t newparent, const char* newname,
                unsigned flags);
  // Creates and opens: the new file comes back open (release() closes it).
  Status create(uint64_t parent, const char* name, mode_t mode, Caller who, Entry* out);
  // `flags` are the open(2) flags: an opener that will read gets the file's start read ahead.
  Status open(uint64_t ino, int flags);
  void release(uint64_t ino);
  Result<size_t> read(uint64_t ino, uint64_t off, MutByteView out);
  Status write(uint64_t ino, uint64_t off, ByteView data);
  Status fsync(uint64_t ino, bool datasync);
  Status fallocate(uint64_t ino, int mode, uint64_t off, uint64_t len);
  Status readdir(uint64_t ino, std::vector<DirEntry>* out);
  Status fsyncdir(uint64_t ino);
  Status statfs(struct statvfs* out);
  // `keeps_setgid(gid)`: whether the caller may keep the set-group-ID bit of a node of group
  // `gid` (is in that group, or root). Setting an access ACL clears the bit otherwise, as chmod
  // would; the kernel leaves that to the daemon (FUSE_SETXATTR_ACL_KILL_SGID, which libfuse
  // 3.14 does not pass on, so it is worked out here).
  Status setxattr(uint64_t ino, const char* name, ByteView value, int flags,
                  const std::function<bool(gid_t)>& keeps_setgid);
  Result<Bytes> getxattr(uint64_t ino, const char* name);
  Result<std::vector<std::string>> listxattr(uint64_t ino);
  Status removexattr(uint64_t ino, const char* name);

  // The block half of DEK rotation, for one backing file (fs/block_rewrap.h): re-wraps every
  // block key of regular file `entry` of backing directory `dir_fd` under the active DEK,
  // through the file's shared OpenFile, a batch of metadata pages at a time, each batch inside
  // the key gate. Keeps the file's mtime. Adds the pages it reads and rewrites to `progress`.
  // Ok also when the entry is gone or is not a regular file; kKeyUnavailable when the keys are
  // revoked. `go_on` is asked before each batch (it may wait, to pace the walk); when it says
  // no, Ok: the rest is for another walk. `entry` empty: `dir_fd` is the file itself (an O_PATH
  // descriptor from reopen_known).
  struct RewrapProgress {
    uint64_t pages_read = 0;
    uint64_t pages_written = 0;
  };
  Status rewrap_block_keys(int dir_fd, const std::string& entry, const std::function<bool()>& go_on,
                           RewrapProgress* progress);
  // While `on`, the backing nodes renamed or linked through the mount are noted: a walk of the
  // backing tree may have passed a node by, moved from a directory it had not reached yet
  // into one it had left. take_moves() hands them over (and whether there were too many to
  // note, kMaxTrackedMoves); reopen_known() gives an O_PATH descriptor of one the kernel still
  // knows: -1 if it forgot it, kNoBlockKeys if it is neither a directory nor a regular file.
  void track_moves(bool on);
  std::vector<std::pair<dev_t, ino_t>> take_moves(bool* overflowed);
  int reopen_known(dev_t dev, ino_t ino);
  static constexpr int kNoBlockKeys = -2;
  static constexpr size_t kMaxTrackedMoves = 1 << 16;

 private:
  Result<std::shared_ptr<Inode>> inode(uint64_t ino);
  // A directory and the backing name that `name` has in it.
  struct Placed {
    std::shared_ptr<Inode> dir;
    PathRef dir_path;  // held while the name is used
    BackingName name;
    int dir_fd() const { return dir_path->fd; }
  };
  Result<Placed> place(uint64_t parent, const char* name);
  // The same for an entry about to be created: a long name's record is written first.
  Result<Placed> place_new(uint64_t parent, const char* name);
  Result<DirNonce> nonce_of(Inode& dir);
  // Opens the backing directory for *at() calls that need a real (not O_PATH) descriptor.
  Result<int> open_dir_fd(Inode& dir);
  // The attributes the mount shows for `inode`; `fresh` is a stat of its backing node taken
  // just now, if the caller has one (saves a second fstat).
  Status stat_inode(Inode& inode, struct stat* out, const struct stat* fresh = nullptr);
  Status make_entry(uint64_t parent, int dir_fd, const std::string& backing, Entry* out,
                    bool fresh);
  // The mode to create a node with in `dir` (backing descriptor `dir_fd`): the caller's
  // umask applied, unless the directory has a default ACL, which then stands in for it.
  mode_t creation_mode(Inode& dir, int dir_fd, mode_t mode, Caller who);
  bool has_default_acl(Inode& dir, int dir_fd);
  // Sets (or removes, `keeps_setgid` null) POSIX ACL `name` on the backing node, as it is.
  Status set_acl(Inode& inode, const char* name, ByteView value, int flags,
                 const std::function<bool(gid_t)>* keeps_setgid);
  // Gives a node the daemon created to the caller; `mode` is the one it was created with.
  Status own(int dir_fd, const std::string& backing, Caller who, mode_t mode);
  // If `entry` in `dir_fd` is the last link of a symlink whose target lives in a record,
  // returns what it holds, so the record can be dropped once the entry is gone.
  std::string symlink_record_of(int dir_fd, const std::string& entry);
  Status rename_over_empty_dir(int from_dir, const std::string& from, int to_dir, const std::string& to);
  Result<std::shared_ptr<OpenFile>> open_file(Inode& inode, bool will_read = false);
  // The inode's open file if it has open handles, else nullptr; takes no reference.
  static std::shared_ptr<OpenFile> opened(Inode& inode);
  Status make_node(uint64_t parent, const char* name, mode_t mode, dev_t rdev, Caller who,
                   Entry* out, bool keep_open);
  Status sync_parent_if_needed(Inode& inode);
  // With direct_backing: a second, O_DIRECT descriptor of the backing file (-1 if the backing
  // filesystem refuses O_DIRECT; logged once).
  int open_direct(int fd);

  const std::string cipher_dir_;
  VolumeConfig config_;
  std::unique_ptr<VolumeKeys> keys_;
  KeyGate gate_;
  std::unique_ptr<IoBackend> io_;
  FsOptions options_;
  InodeTable inodes_;
  Layout layout_;
  const bool as_root_;
  const bool acl_capable_;
  bool posix_acls_ = false;  // set by INIT, before any other request
  const NonceStore nonce_store_;  // how this volume's directories keep their nonce
  const int root_fd_;  // the cipher root (O_PATH, owned by the inode table, never closed before it)
  void note_move(const struct stat& st);
  std::mutex moves_mu_;  // guards the two below, and changes of tracking_moves_
  std::atomic<bool> tracking_moves_{false};
  bool moves_overflowed_ = false;
  std::set<std::pair<dev_t, ino_t>> moves_;
};

}  // namespace envelopefs
