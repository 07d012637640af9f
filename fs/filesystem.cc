#include "fs/filesystem.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "fs/log.h"

namespace envelopefs {
namespace {

std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

Status errno_status(const char* what) { return Status::Io(errno, what); }

constexpr const char* kAclAccess = "system.posix_acl_access";
constexpr const char* kAclDefault = "system.posix_acl_default";

bool acl_xattr(std::string_view name) { return name == kAclAccess || name == kAclDefault; }

// Whether the filesystem under `fd` keeps POSIX ACLs: asking for one is ENODATA (none there)
// rather than EOPNOTSUPP.
bool backing_has_acls(int fd) {
  return ::getxattr(proc_path(fd).c_str(), kAclAccess, nullptr, 0) >= 0 || errno == ENODATA;
}

// Closes a descriptor when the scope ends.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) close(fd);
  }
};

Status stat_with_deferred_times(int fd, const DeferredTimes& t, struct stat* out) {
  // A stat of an open file with deferred times (DeferredTimes, fs/inode_table.h). Without
  // STATX_MTIME|STATX_CTIME when the deferred times replace both: a backing filesystem with
  // multigrain timestamps (ext4 since Linux 6.13) would otherwise note that they were looked
  // at and give the file's next write a fine-grained time, marking its inode dirty again,
  // which is what deferring the times avoids.
  const bool has_mtime = t.mtime.tv_nsec != UTIME_OMIT;
  unsigned mask = STATX_BASIC_STATS;
  if (has_mtime) mask &= ~(STATX_MTIME | STATX_CTIME);
  struct statx x;
  if (statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, mask, &x) != 0) return errno_status("stat");
  *out = {};
  out->st_dev = makedev(x.stx_dev_major, x.stx_dev_minor);
  out->st_ino = x.stx_ino;
  out->st_mode = x.stx_mode;
  out->st_nlink = x.stx_nlink;
  out->st_uid = x.stx_uid;
  out->st_gid = x.stx_gid;
  out->st_rdev = makedev(x.stx_rdev_major, x.stx_rdev_minor);
  out->st_size = static_cast<off_t>(x.stx_size);
  out->st_blksize = x.stx_blksize;
  out->st_blocks = static_cast<blkcnt_t>(x.stx_blocks);
  auto ts = [](const statx_timestamp& s) { return timespec{s.tv_sec, static_cast<long>(s.tv_nsec)}; };
  out->st_atim = t.atime.tv_nsec != UTIME_OMIT ? t.atime : ts(x.stx_atime);
  out->st_mtim = has_mtime ? t.mtime : ts(x.stx_mtime);
  out->st_ctim = t.ctime;
  const timespec backing_ctime = ts(x.stx_ctime);
  if (!has_mtime && (backing_ctime.tv_sec > t.ctime.tv_sec ||
                     (backing_ctime.tv_sec == t.ctime.tv_sec && backing_ctime.tv_nsec > t.ctime.tv_nsec))) {
    out->st_ctim = backing_ctime;  // changed since (chmod, a write): the later of the two
  }
  return Status::Ok();
}

}  // namespace

// volume.provider is not kept: the key watcher (fs/key_watch.h) asks a fresh provider each
// time, as a mount would, so a token or key service is really asked again (a session kept
// open could answer from a state the service no longer has).
Filesystem::Filesystem(std::string cipher_dir, int root_fd, OpenedVolume volume,
                       std::unique_ptr<IoBackend> io, FsOptions options)
    : cipher_dir_(std::move(cipher_dir)),
      config_(std::move(volume.config)),
      keys_(std::move(volume.keys)),
      io_(std::move(io)),
      options_(options),
      inodes_(root_fd),
      layout_(keys_->block_size()),
      as_root_(geteuid() == 0),
      acl_capable_(options.posix_acls && as_root_ && backing_has_acls(root_fd)),
      nonce_store_(nonce_store_of(config_)),
      root_fd_(root_fd) {}

std::string Filesystem::acl_refusal() const {
  if (!options_.posix_acls || acl_capable_) return "";
  return as_root_ ? "the backing filesystem of " + cipher_dir_ + " keeps none"
                  : "the daemon is not root, and must be to reach every backing node";
}

Result<std::shared_ptr<Inode>> Filesystem::inode(uint64_t ino) {
  auto i = inodes_.get(ino);
  if (!i) return Status::Io(ESTALE, "unknown inode " + std::to_string(ino));
  return i;
}

Result<Filesystem::Placed> Filesystem::place(uint64_t parent, const char* name) {
  auto dir = inode(parent);
  if (!dir.ok()) return dir.status();
  auto nonce = nonce_of(**dir);
  if (!nonce.ok()) return nonce.status();
  if (std::strlen(name) > kMaxPlainName) return Status::Io(ENAMETOOLONG, "name");
  auto bn = encrypt_name(*keys_, *nonce, name);
  if (!bn.ok()) return bn.status();
  auto path = inodes_.path(**dir);
  if (!path.ok()) return path.status();
  return Placed{std::move(dir).value(), std::move(path).value(), std::move(bn).value()};
}

Result<Filesystem::Placed> Filesystem::place_new(uint64_t parent, const char* name) {
  auto pl = place(parent, name);
  if (!pl.ok() || !pl->name.is_long()) return pl;
  auto dfd = open_dir_fd(*pl->dir);
  if (!dfd.ok()) return dfd.status();
  FdGuard g{*dfd};
  ENVELOPEFS_RETURN_IF_ERROR(write_long_name(*dfd, pl->name));
  return pl;
}

Result<DirNonce> Filesystem::nonce_of(Inode& dir) {
  std::lock_guard lock(dir.mu);
  if (dir.nonce) return *dir.nonce;
  if (dir.type != S_IFDIR) return Status::Io(ENOTDIR, "not a directory");
  auto path = inodes_.path(dir);
  if (!path.ok()) return path.status();
  auto n = read_dir_nonce((*path)->fd);
  if (!n.ok() && n.status().code() == Code::kNotFound) {
    auto empty = holds_only_nonce((*path)->fd);
    if (!empty.ok() || !*empty) {
      // Entries named under a nonce that is gone: damage, not "no such file".
      return Status(Code::kCorrupt, "directory nonce is missing and the directory holds entries");
    }
    // An empty directory whose nonce is gone: a crash between removing the nonce and removing
    // (or replacing) the directory leaves one, and so does a power cut that kept a new
    // directory's entry in its parent but not the directory's own first entry. Nothing in it
    // is named under the old nonce, so a fresh one loses nothing (fs/FORMAT.md, "Names").
    auto dfd = open_dir_fd(dir);
    if (!dfd.ok()) return dfd.status();
    FdGuard g{*dfd};
    n = create_dir_nonce(*dfd, nonce_store_);
  }
  if (!n.ok()) return n.status();
  dir.nonce = *n;
  return *n;
}

Result<int> Filesystem::open_dir_fd(Inode& dir) {
  auto path = inodes_.path(dir);
  if (!path.ok()) return path.status();
  int fd = openat((*path)->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno_status("open backing directory");
  return fd;
}

Status Filesystem::stat_inode(Inode& inode, struct stat* out, const struct stat* fresh) {
  std::shared_ptr<OpenFile> open = inode.type == S_IFREG ? opened(inode) : nullptr;
  std::unique_lock<std::mutex> times_lock;
  if (open) times_lock = std::unique_lock(open->times_mu);  // deferred times and stat agree
  if (open && open->deferred) {
    ENVELOPEFS_RETURN_IF_ERROR(stat_with_deferred_times(open->fd, *open->deferred, out));
  } else if (fresh != nullptr && !open) {
    *out = *fresh;
  } else if (open) {
    if (fstat(open->fd, out) != 0) return errno_status("stat");
  } else {
    auto path = inodes_.path(inode);
    if (!path.ok()) return path.status();
    if (fstatat((*path)->fd, "", out, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno_status("stat");
  }
  if (S_ISREG(out->st_mode)) {
    uint64_t backing = static_cast<uint64_t>(out->st_size);
    out->st_size = static_cast<off_t>(open ? open->file->size()
                                           : backing < kMetaPageSize ? 0 : layout_.plaintext_size(backing));
  } else if (S_ISLNK(out->st_mode)) {
    std::string t;
    if (readlink(inode.id, &t).ok()) out->st_size = static_cast<off_t>(t.size());
  }
  out->st_blksize = static_cast<blksize_t>(keys_->block_size());
  return Status::Ok();
}

Status Filesystem::make_entry(uint64_t parent, int dir_fd, const std::string& backing, Entry* out,
                              bool fresh) {
  int fd = openat(dir_fd, backing.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno_status("open");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return Status::Io(err, "stat");
  }
  auto inode = inodes_.adopt(fd, st, parent);
  if (fresh) {
    std::lock_guard lock(inode->mu);
    inode->entry_unsynced = true;
  }
  out->ino = inode->id;
  Status s = stat_inode(*inode, &out->attr, &st);
  if (!s.ok()) inodes_.forget(inode->id, 1);
  return s;
}

mode_t Filesystem::creation_mode(Inode& dir, int dir_fd, mode_t mode, Caller who) {
  if ((mode & who.umask) == 0) return mode;  // also whenever the kernel applied it (umask 0)
  return has_default_acl(dir, dir_fd) ? mode : mode & ~who.umask;
}

bool Filesystem::has_default_acl(Inode& dir, int dir_fd) {
  {
    std::lock_guard lock(dir.mu);
    if (dir.default_acl >= 0) return dir.default_acl == 1;
  }
  // Set and removed only through us (setxattr, removexattr), which forget the answer.
  const bool has = ::getxattr(proc_path(dir_fd).c_str(), kAclDefault, nullptr, 0) > 0;
  std::lock_guard lock(dir.mu);
  dir.default_acl = has ? 1 : 0;
  return has;
}

Status Filesystem::own(int dir_fd, const std::string& backing, Caller who, mode_t mode) {
  if (!as_root_) return Status::Ok();
  // Made by root for root (as is every node a root cp makes): group 0, or the set-group-ID
  // directory's, which the backing filesystem gave it already. Nothing to change or stat.
  if (who.uid == 0 && who.gid == 0) return Status::Ok();
  // In a set-group-ID directory the new node keeps the directory's group, which the backing
  // filesystem already gave it (System V semantics, as ext4 and every local fs).
  struct stat dir;
  if (fstat(dir_fd, &dir) != 0) return errno_status("stat parent");
  const bool inherit_gid = dir.st_mode & S_ISGID;
  // The daemon (root) made the node, so it belongs to 0 and to group 0 or the inherited one.
  // Nothing to change for a root caller; skipping the chown also keeps the node's ctime at
  // the coarse clock tick the kernel compares against (a changed ctime after a stat is
  // fine-grained, and the mismatch costs a SETATTR round trip per written file).
  if (who.uid == 0 && (inherit_gid || who.gid == 0)) return Status::Ok();
  if (fchownat(dir_fd, backing.c_str(), who.uid, inherit_gid ? static_cast<gid_t>(-1) : who.gid,
               AT_SYMLINK_NOFOLLOW) != 0) {
    return errno_status("chown");
  }
  // chown clears set-user-ID/set-group-ID on files; a node created with them must keep them.
  // Its permission bits are taken as they are now, not from `mode`: a default ACL inherited
  // from the directory may have narrowed them, and chmod would widen its ACL again.
  if (!S_ISLNK(mode) && (mode & (S_ISUID | S_ISGID))) {
    struct stat now;
    if (fstatat(dir_fd, backing.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0) return errno_status("stat");
    if (fchmodat(dir_fd, backing.c_str(), (now.st_mode & 0777) | (mode & 07000), 0) != 0) {
      return errno_status("chmod");
    }
  }
  return Status::Ok();
}

Status Filesystem::kill_suidgid(uint64_t ino) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  auto path = inodes_.path(**i);
  if (!path.ok()) return path.status();
  struct stat st;
  if (fstatat((*path)->fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno_status("stat");
  if (!S_ISREG(st.st_mode)) return Status::Ok();
  mode_t mode = st.st_mode & 07777;
  mode_t killed = mode & ~S_ISUID;
  if (mode & S_IXGRP) killed &= ~S_ISGID;
  if (killed != mode && fchmodat(AT_FDCWD, proc_path((*path)->fd).c_str(), killed, 0) != 0) {
    return errno_status("chmod");
  }
  return Status::Ok();
}

Status Filesystem::lookup(uint64_t parent, const char* name, Entry* out) {
  auto pl = place(parent, name);
  if (!pl.ok()) return pl.status();
  return make_entry(parent, pl->dir_fd(), pl->name.entry, out, false);
}

Status Filesystem::getattr(uint64_t ino, struct stat* out) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  return stat_inode(**i, out);
}

void Filesystem::note_writeback_error(uint64_t ino, int err) {
  if (auto i = inodes_.get(ino)) i->writeback_error.store(err);
}

int Filesystem::take_writeback_error(uint64_t ino) {
  auto i = inodes_.get(ino);
  return i ? i->writeback_error.exchange(0) : 0;
}

Status Filesystem::setattr(uint64_t ino, const struct stat& attr, int to_set, struct stat* out) {
  auto ip = inode(ino);
  if (!ip.ok()) return ip.status();
  Inode& i = **ip;
  const bool is_link = i.type == S_IFLNK;
  auto path = inodes_.path(i);
  if (!path.ok()) return path.status();
  const int fd = (*path)->fd;
  if ((to_set & (1 << 0)) && !is_link) {  // FUSE_SET_ATTR_MODE
    if (fchmodat(AT_FDCWD, proc_path(fd).c_str(), attr.st_mode & 07777, 0) != 0) return errno_status("chmod");
  }
  if (to_set & ((1 << 1) | (1 << 2))) {  // FUSE_SET_ATTR_UID / GID
    uid_t uid = (to_set & (1 << 1)) ? attr.st_uid : static_cast<uid_t>(-1);
    gid_t gid = (to_set & (1 << 2)) ? attr.st_gid : static_cast<gid_t>(-1);
    if (fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno_status("chown");
  }
  if (to_set & (1 << 3)) {  // FUSE_SET_ATTR_SIZE
    if (i.type != S_IFREG) return Status::Io(EINVAL, "truncate of a non-regular file");
    auto of = open_file(i);
    if (!of.ok()) return of.status();
    Status st = (*of)->file->truncate(static_cast<uint64_t>(attr.st_size));
    release(ino);
    ENVELOPEFS_RETURN_IF_ERROR(st);
  }
  // FUSE_SET_ATTR_ATIME(4) MTIME(5) ATIME_NOW(7) MTIME_NOW(8); CTIME(10) comes with them
  // from the kernel's own time updates, and the backing filesystem sets ctime itself.
  constexpr int kTimes = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8), kCtime = 1 << 10;
  if (to_set & kTimes) {
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    timespec ts[2];
    ts[0].tv_nsec = ts[1].tv_nsec = UTIME_OMIT;
    if (to_set & (1 << 7)) ts[0] = now;
    else if (to_set & (1 << 4)) ts[0] = attr.st_atim;
    if (to_set & (1 << 8)) ts[1] = now;
    else if (to_set & (1 << 5)) ts[1] = attr.st_mtim;
    std::shared_ptr<OpenFile> of = i.type == S_IFREG ? opened(i) : nullptr;
    if (of && options_.writeback_cache && (to_set & ~(kTimes | kCtime)) == 0) {
      // Times alone, of an open file: kept until its close or a full fsync (DeferredTimes).
      of->defer_times(ts, (to_set & kCtime) ? attr.st_ctim : now);
      return stat_inode(i, out);
    }
    // An open file through its descriptor; anything else through its O_PATH handle, naming the
    // node itself: a symlink's own times too (`touch -h`), where a path through /proc would be
    // followed to the target, ciphertext naming nothing.
    if (of) {
      ENVELOPEFS_RETURN_IF_ERROR(of->set_times(ts));
    } else if (utimensat(fd, "", ts, AT_EMPTY_PATH) != 0) {
      return errno_status("utimens");
    }
  }
  return stat_inode(i, out);
}

Status Filesystem::readlink(uint64_t ino, std::string* target) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  auto path = inodes_.path(**i);
  if (!path.ok()) return path.status();
  char buf[PATH_MAX + 1];
  ssize_t n = readlinkat((*path)->fd, "", buf, sizeof buf - 1);
  if (n < 0) return errno_status("readlink");
  auto t = load_symlink(*keys_, root_fd_, std::string_view(buf, static_cast<size_t>(n)));
  if (!t.ok()) return t.status();
  *target = std::move(t).value();
  return Status::Ok();
}

Status Filesystem::mknod(uint64_t parent, const char* name, mode_t mode, dev_t rdev, Caller who,
                         Entry* out) {
  return make_node(parent, name, mode, rdev, who, out, false);
}

Status Filesystem::make_node(uint64_t parent, const char* name, mode_t mode, dev_t rdev,
                             Caller who, Entry* out, bool keep_open) {
  auto pl = place_new(parent, name);
  if (!pl.ok()) return pl.status();
  const int pfd = pl->dir_fd();
  const BackingName* bn = &pl->name;
  mode = (mode & S_IFMT) | creation_mode(*pl->dir, pfd, mode & 07777, who);
  std::shared_ptr<OpenFile> opened;
  if (S_ISREG(mode)) {
    int fd = openat(pfd, bn->entry.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, mode & 07777);
    if (fd < 0) return errno_status("create");
    opened = std::make_shared<OpenFile>();
    opened->fd = fd;
    auto f = CipherFile::create(fd, *keys_, *io_);
    if (!f.ok()) {
      unlinkat(pfd, bn->entry.c_str(), 0);
      return f.status();
    }
    opened->file = std::move(f).value();
    if (options_.writeback_cache) {
      // With the writeback cache the kernel keeps the file's mtime itself and, if its first
      // write() moves it, sends a SETATTR at close. It stamps that write with the coarse clock
      // raised to the latest fine-grained time handed out (multigrain timestamps, Linux 6.13+),
      // which the creation in the backing directory has just advanced past the new inode's
      // times. "Now" taken here is that same value, so the write() leaves the time as it is: no
      // SETATTR round trip per copied file (5,500 of 8,151 in a cp -r of /usr/include without
      // it). It used to come free with writing the header at creation. Only a speed-up.
      (void)futimens(fd, nullptr);
    }
    opened->direct_fd = open_direct(fd);
    opened->file->set_direct_fd(opened->direct_fd);
  } else if (mknodat(pfd, bn->entry.c_str(), mode, rdev) != 0) {
    return errno_status("mknod");
  }
  ENVELOPEFS_RETURN_IF_ERROR(own(pfd, bn->entry, who, mode));
  ENVELOPEFS_RETURN_IF_ERROR(make_entry(parent, pfd, bn->entry, out, true));
  if (keep_open && opened) {
    // Hand the descriptor we created with to the inode: no second open of the new file.
    auto i = inodes_.get(out->ino);
    if (!i) return Status::Io(ESTALE, "create");
    std::lock_guard lock(i->mu);
    if (!i->open) i->open = std::move(opened);
    i->open_count++;
  }
  return Status::Ok();
}

Status Filesystem::create(uint64_t parent, const char* name, mode_t mode, Caller who, Entry* out) {
  return make_node(parent, name, S_IFREG | (mode & 07777), 0, who, out, true);
}

Status Filesystem::mkdir(uint64_t parent, const char* name, mode_t mode, Caller who, Entry* out) {
  auto pl = place_new(parent, name);
  if (!pl.ok()) return pl.status();
  const int pfd = pl->dir_fd();
  const BackingName* bn = &pl->name;
  mode = creation_mode(*pl->dir, pfd, mode & 07777, who);
  // Root can put the nonce into a directory of any mode, so it makes the directory with its
  // mode at once: the backing filesystem then passes down the parent's default ACL and
  // set-group-ID bit as POSIX says. Another user makes it owner-writable for the nonce, and
  // sets the mode after (there are no ACLs then).
  if (mkdirat(pfd, bn->entry.c_str(), as_root_ ? mode : 0700) != 0) return errno_status("mkdir");
  int fd = openat(pfd, bn->entry.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno_status("open new directory");
  FdGuard g{fd};
  auto nonce = create_dir_nonce(fd, nonce_store_);
  Status st = nonce.status();
  if (!as_root_) {
    // A directory made in a set-group-ID directory inherits the bit (the kernel does not send it).
    struct stat parent_st;
    if (st.ok() && fstat(pfd, &parent_st) == 0 && (parent_st.st_mode & S_ISGID)) mode |= S_ISGID;
    if (st.ok() && fchmod(fd, mode) != 0) st = errno_status("chmod");
  }
  if (st.ok()) st = own(pfd, bn->entry, who, S_IFDIR | mode);
  if (!st.ok()) {
    if (auto n = read_dir_nonce(fd); n.ok()) (void)remove_dir_nonce(fd, *n);
    unlinkat(pfd, bn->entry.c_str(), AT_REMOVEDIR);
    return st;
  }
  ENVELOPEFS_RETURN_IF_ERROR(make_entry(parent, pfd, bn->entry, out, true));
  // Known already: the first name looked up in it need not search the directory for it.
  if (auto i = inodes_.get(out->ino)) {
    std::lock_guard lock(i->mu);
    if (!i->nonce) i->nonce = *nonce;
  }
  return Status::Ok();
}

Status Filesystem::symlink(const char* target, uint64_t parent, const char* name, Caller who,
                           Entry* out) {
  auto pl = place_new(parent, name);
  if (!pl.ok()) return pl.status();
  const int pfd = pl->dir_fd();
  const BackingName* bn = &pl->name;
  auto stored = store_symlink(*keys_, root_fd_, target);
  if (!stored.ok()) return stored.status();
  int rc = symlinkat(stored->c_str(), pfd, bn->entry.c_str());
  if (rc != 0 && errno == ENAMETOOLONG && !is_symlink_record_ref(*stored)) {
    // The backing filesystem's symlinks are shorter than PATH_MAX (XFS: 1,024 bytes, which
    // an encrypted target of ~750 bytes fills): the target goes to a record instead.
    stored = store_symlink(*keys_, root_fd_, target, true);
    if (!stored.ok()) return stored.status();
    rc = symlinkat(stored->c_str(), pfd, bn->entry.c_str());
  }
  if (rc != 0) {
    Status st = errno_status("symlink");
    drop_symlink_record(root_fd_, *stored);
    return st;
  }
  ENVELOPEFS_RETURN_IF_ERROR(own(pfd, bn->entry, who, S_IFLNK | 0777));
  return make_entry(parent, pfd, bn->entry, out, true);
}

Status Filesystem::link(uint64_t ino, uint64_t parent, const char* name, Entry* out) {
  auto src = inode(ino);
  if (!src.ok()) return src.status();
  auto pl = place_new(parent, name);
  if (!pl.ok()) return pl.status();
  const int pfd = pl->dir_fd();
  const BackingName* bn = &pl->name;
  auto src_path = inodes_.path(**src);
  if (!src_path.ok()) return src_path.status();
  if (linkat(AT_FDCWD, proc_path((*src_path)->fd).c_str(), pfd, bn->entry.c_str(), AT_SYMLINK_FOLLOW) != 0) {
    return errno_status("link");
  }
  struct stat st;
  if (tracking_moves_.load(std::memory_order_relaxed) && fstat((*src_path)->fd, &st) == 0) note_move(st);
  return make_entry(parent, pfd, bn->entry, out, true);
}

Status Filesystem::unlink(uint64_t parent, const char* name) {
  auto pl = place(parent, name);
  if (!pl.ok()) return pl.status();
  const std::string record = symlink_record_of(pl->dir_fd(), pl->name.entry);
  inodes_.keep_before_removal(pl->dir_fd(), pl->name.entry.c_str());
  if (unlinkat(pl->dir_fd(), pl->name.entry.c_str(), 0) != 0) return errno_status("unlink");
  remove_long_name(pl->dir_fd(), pl->name);
  if (!record.empty()) drop_symlink_record(root_fd_, record);
  return Status::Ok();
}

namespace {

// Runs `op`, a backing call that needs directory `dir_fd` empty (rmdir, rename over it), with
// the directory's nonce taken out, and puts the nonce back if `op` fails. ENOTEMPTY without
// touching anything if the directory holds more than its nonce.
template <typename Op>
Status with_nonce_out(int dir_fd, NonceStore store, const char* what, Op op) {
  auto empty = holds_only_nonce(dir_fd);
  if (!empty.ok()) return empty.status();
  if (!*empty) return Status::Io(ENOTEMPTY, what);
  auto saved = read_dir_nonce(dir_fd);
  if (!saved.ok() && saved.status().code() != Code::kNotFound) return saved.status();  // damage: EIO
  if (saved.ok()) ENVELOPEFS_RETURN_IF_ERROR(remove_dir_nonce(dir_fd, *saved));
  if (op() != 0) {
    int err = errno;
    if (saved.ok()) restore_dir_nonce(dir_fd, *saved, store);  // the directory stays as it was
    return Status::Io(err, what);
  }
  return Status::Ok();
}

}  // namespace

Status Filesystem::rmdir(uint64_t parent, const char* name) {
  auto pl = place(parent, name);
  if (!pl.ok()) return pl.status();
  const int pfd = pl->dir_fd();
  const BackingName* bn = &pl->name;
  int fd = openat(pfd, bn->entry.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno_status("rmdir");
  FdGuard g{fd};
  inodes_.keep_before_removal(pfd, bn->entry.c_str());
  ENVELOPEFS_RETURN_IF_ERROR(
      with_nonce_out(fd, nonce_store_, "rmdir", [&] { return unlinkat(pfd, bn->entry.c_str(), AT_REMOVEDIR); }));
  remove_long_name(pfd, *bn);
  return Status::Ok();
}

Status Filesystem::rename(uint64_t parent, const char* name, uint64_t newparent,
                          const char* newname, unsigned flags) {
  auto from = place(parent, name);
  if (!from.ok()) return from.status();
  auto to = place_new(newparent, newname);
  if (!to.ok()) return to.status();
  const BackingName& b1 = from->name;
  const BackingName& b2 = to->name;
  // A symlink replaced by the rename loses its last link: its record goes too. (Not when
  // both names are links of one inode: then the rename changes nothing.)
  std::string replaced_record;
  if (!(flags & RENAME_EXCHANGE)) {
    replaced_record = symlink_record_of(to->dir_fd(), b2.entry);
    struct stat a, b;
    if (!replaced_record.empty() &&
        (fstatat(from->dir_fd(), b1.entry.c_str(), &a, AT_SYMLINK_NOFOLLOW) != 0 ||
         fstatat(to->dir_fd(), b2.entry.c_str(), &b, AT_SYMLINK_NOFOLLOW) != 0 ||
         (a.st_dev == b.st_dev && a.st_ino == b.st_ino))) {
      replaced_record.clear();
    }
  }
  if (!(flags & RENAME_EXCHANGE)) inodes_.keep_before_removal(to->dir_fd(), b2.entry.c_str());
  if (renameat2(from->dir_fd(), b1.entry.c_str(), to->dir_fd(), b2.entry.c_str(), flags) != 0) {
    if ((errno != ENOTEMPTY && errno != EEXIST) || flags != 0) return errno_status("rename");
    ENVELOPEFS_RETURN_IF_ERROR(rename_over_empty_dir(from->dir_fd(), b1.entry, to->dir_fd(), b2.entry));
  }
  if (!(flags & RENAME_EXCHANGE) && !(parent == newparent && b1.entry == b2.entry)) {
    remove_long_name(from->dir_fd(), b1);
  }
  if (!replaced_record.empty()) drop_symlink_record(root_fd_, replaced_record);
  struct stat st;
  if ((flags & RENAME_EXCHANGE) && tracking_moves_.load(std::memory_order_relaxed) &&
      fstatat(from->dir_fd(), b1.entry.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    note_move(st);
  }
  if (fstatat(to->dir_fd(), b2.entry.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    note_move(st);
    if (auto moved = inodes_.find(st.st_dev, st.st_ino)) {
      std::lock_guard lock(moved->mu);
      moved->parent = newparent;
      moved->entry_unsynced = true;
    }
  }
  return Status::Ok();
}

// A directory that is empty on the mount still holds its nonce, so the backing rename refuses
// to replace it: as for rmdir, the nonce goes out first (with_nonce_out). A crash in between
// leaves an empty directory without a nonce, which nonce_of() heals.
Status Filesystem::rename_over_empty_dir(int from_dir, const std::string& from, int to_dir,
                                         const std::string& to) {
  int fd = openat(to_dir, to.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status::Io(ENOTEMPTY, "rename");
  FdGuard g{fd};
  return with_nonce_out(fd, nonce_store_, "rename",
                        [&] { return renameat2(from_dir, from.c_str(), to_dir, to.c_str(), 0); });
}

std::string Filesystem::symlink_record_of(int dir_fd, const std::string& entry) {
  struct stat st;
  if (fstatat(dir_fd, entry.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISLNK(st.st_mode) || st.st_nlink != 1) {
    return {};
  }
  char buf[PATH_MAX];
  ssize_t n = readlinkat(dir_fd, entry.c_str(), buf, sizeof buf);
  if (n <= 0 || n >= static_cast<ssize_t>(sizeof buf)) return {};
  std::string stored(buf, static_cast<size_t>(n));
  return is_symlink_record_ref(stored) ? stored : std::string();
}

int Filesystem::open_direct(int fd) {
  if (!options_.direct_backing) return -1;
  int dfd = ::open(proc_path(fd).c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (dfd < 0 && (errno == EACCES || errno == EROFS)) {
    dfd = ::open(proc_path(fd).c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  }
  if (dfd < 0) {
    static std::once_flag once;
    int err = errno;
    std::call_once(once, [err] {
      log_error(std::string("direct backing I/O not available (") + std::strerror(err) +
                "); using the page cache");
    });
  }
  return dfd;
}

std::shared_ptr<OpenFile> Filesystem::opened(Inode& i) {
  std::lock_guard lock(i.mu);
  return i.open;
}

Result<std::shared_ptr<OpenFile>> Filesystem::open_file(Inode& i, bool will_read) {
  std::lock_guard lock(i.mu);
  if (i.open) {
    i.open_count++;
    return i.open;
  }
  auto backing = inodes_.path(i);
  if (!backing.ok()) return backing.status();
  std::string path = proc_path((*backing)->fd);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && (errno == EACCES || errno == EROFS)) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_status("open backing file");
  auto of = std::make_shared<OpenFile>();
  of->fd = fd;
  // Reading a file costs a disk request for its header at OPEN and another for its data at the
  // first READ; reading ahead one group (its page and 31 blocks: all of a small file) at open
  // makes them one. Not with --direct-backing, whose reads bypass the backing page cache.
  const uint64_t prefetch = will_read && !options_.direct_backing ? layout_.group_size() : 0;
  auto f = CipherFile::open(fd, *keys_, *io_, prefetch);
  if (!f.ok()) return f.status();  // ~OpenFile closes fd
  of->file = std::move(f).value();
  of->direct_fd = open_direct(fd);
  of->file->set_direct_fd(of->direct_fd);
  i.open = of;
  i.open_count = 1;
  return of;
}

Status Filesystem::open(uint64_t ino, int flags) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  if ((*i)->type != S_IFREG) return Status::Io(EINVAL, "open of a non-regular file");
  auto of = open_file(**i, (flags & O_ACCMODE) != O_WRONLY && !(flags & O_TRUNC));
  if (!of.ok()) return of.status();
  if (flags & O_TRUNC) {
    // The kernel leaves O_TRUNC to the open (libfuse asks for FUSE_CAP_ATOMIC_O_TRUNC) and
    // takes the file as empty once we answer; with the writeback cache it sends no size
    // change of its own afterwards, so a truncate not done here never happens.
    Status st = (*of)->file->truncate(0);
    if (!st.ok()) {
      release(ino);
      return st;
    }
  }
  return Status::Ok();
}

void Filesystem::release(uint64_t ino) {
  auto i = inodes_.get(ino);
  if (!i) return;
  std::lock_guard lock(i->mu);
  if (--i->open_count <= 0) {
    i->open_count = 0;
    i->open.reset();
  }
}

Result<size_t> Filesystem::read(uint64_t ino, uint64_t off, MutByteView out) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  std::shared_ptr<OpenFile> of = opened(**i);
  if (!of) return Status::Io(EBADF, "read of a file that is not open");
  return of->file->read(off, out);
}

Status Filesystem::write(uint64_t ino, uint64_t off, ByteView data) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  std::shared_ptr<OpenFile> of = opened(**i);
  if (!of) return Status::Io(EBADF, "write to a file that is not open");
  return of->file->write(off, data);
}

Status Filesystem::sync_parent_if_needed(Inode& start) {
  // Walk up while entries are new: a fsynced file in a directory created just before must
  // survive a power cut with its whole path.
  std::shared_ptr<Inode> cur;
  Inode* node = &start;
  for (int depth = 0; depth < 4096; ++depth) {
    uint64_t parent;
    {
      std::lock_guard lock(node->mu);
      if (!node->entry_unsynced || node->id == 1) return Status::Ok();
      parent = node->parent;
    }
    auto p = inodes_.get(parent);
    if (!p) return Status::Ok();
    auto dfd = open_dir_fd(*p);
    if (!dfd.ok()) return dfd.status();
    int rc = ::fsync(*dfd);
    close(*dfd);
    if (rc != 0) return errno_status("fsync of directory");
    {
      std::lock_guard lock(node->mu);
      node->entry_unsynced = false;
    }
    cur = p;
    node = cur.get();
  }
  return Status::Ok();
}

Status Filesystem::fsync(uint64_t ino, bool datasync) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  std::shared_ptr<OpenFile> of = opened(**i);
  if (of && !datasync) ENVELOPEFS_RETURN_IF_ERROR(of->apply_deferred_times());
  if (of) ENVELOPEFS_RETURN_IF_ERROR(of->file->sync(datasync));
  return sync_parent_if_needed(**i);
}

Status Filesystem::fallocate(uint64_t ino, int mode, uint64_t off, uint64_t len) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  std::shared_ptr<OpenFile> of = opened(**i);
  if (!of) return Status::Io(EBADF, "fallocate");
  CipherFile& f = *of->file;
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE) return f.allocate(off, len, keep_size);
  if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) return f.punch_hole(off, len);
  if (mode == FALLOC_FL_ZERO_RANGE || mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
    // Zeros as authenticated holes, and the range's space reserved as fallocate(2) promises.
    ENVELOPEFS_RETURN_IF_ERROR(f.punch_hole(off, len));
    return f.allocate(off, len, keep_size);
  }
  return Status::Io(EOPNOTSUPP, "fallocate mode");
}

Status Filesystem::readdir(uint64_t ino, std::vector<DirEntry>* out) {
  auto dir = inode(ino);
  if (!dir.ok()) return dir.status();
  auto nonce = nonce_of(**dir);
  if (!nonce.ok()) return nonce.status();
  auto dfd = open_dir_fd(**dir);
  if (!dfd.ok()) return dfd.status();
  DIR* d = fdopendir(*dfd);
  if (d == nullptr) {
    close(*dfd);
    return errno_status("opendir");
  }
  while (dirent* e = ::readdir(d)) {
    std::string_view n = e->d_name;
    if (n == "." || n == "..") continue;
    if (ino == 1 && n.rfind("envelopefs.conf", 0) == 0) continue;
    auto plain = decrypt_name(*keys_, *nonce, dirfd(d), n);
    if (!plain.ok()) {
      if (plain.status().code() != Code::kNotFound) {
        log_error_rate_limited("readdir: inode " + std::to_string(ino) + ": skipping entry '" +
                               std::string(n) + "': " + plain.status().to_string());
      }
      continue;
    }
    out->push_back({std::move(plain).value(), e->d_ino, e->d_type});
  }
  closedir(d);
  return Status::Ok();
}

Status Filesystem::fsyncdir(uint64_t ino) {
  auto dir = inode(ino);
  if (!dir.ok()) return dir.status();
  auto dfd = open_dir_fd(**dir);
  if (!dfd.ok()) return dfd.status();
  int rc = ::fsync(*dfd);
  close(*dfd);
  if (rc != 0) return errno_status("fsyncdir");
  return sync_parent_if_needed(**dir);
}

namespace {

// Attributes the volume does not store: system.*, but for the POSIX ACLs of a mount that has
// them (set_acl, asked before this), and security.capability. That would be file capabilities,
// which a FUSE mount does not honour by default (nosuid) and which FUSE_HANDLE_KILLPRIV_V2
// would oblige us to strip on every write, chown and truncate: refused, so a copy tool warns
// instead of storing one that means nothing.
bool unsupported_xattr(std::string_view name) {
  return name.rfind("system.", 0) == 0 || name == "security.capability";
}

// A name outside the namespaces Linux defines is EOPNOTSUPP on every local filesystem; the
// kernel hands FUSE any name, so the daemon refuses it (it would otherwise store "foo.bar").
bool unknown_xattr_namespace(std::string_view name) {
  for (std::string_view ns : {"user.", "trusted.", "security.", "system."}) {
    if (name.rfind(ns, 0) == 0) return false;
  }
  return true;
}

}  // namespace

Status Filesystem::statfs(struct statvfs* out) {
  if (fstatvfs(root_fd_, out) != 0) return errno_status("statfs");
  out->f_namemax = kMaxPlainName;
  return Status::Ok();
}

Status Filesystem::setxattr(uint64_t ino, const char* name, ByteView value, int flags,
                            const std::function<bool(gid_t)>& keeps_setgid) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  if (posix_acls_ && acl_xattr(name)) return set_acl(**i, name, value, flags, &keeps_setgid);
  if (unsupported_xattr(name) || unknown_xattr_namespace(name)) {
    return Status::Io(EOPNOTSUPP, "setxattr");
  }
  auto enc = encrypt_xattr_name(*keys_, name);
  if (!enc.ok()) return Status::Io(ERANGE, "xattr name too long");
  auto val = encrypt_xattr_value(*keys_, *enc, value);
  if (!val.ok()) return val.status();
  auto path = inodes_.path(**i);
  if (!path.ok()) return path.status();
  if (::setxattr(proc_path((*path)->fd).c_str(), enc->c_str(), val->data(), val->size(), flags) != 0) {
    return errno_status("setxattr");
  }
  return Status::Ok();
}

Result<Bytes> Filesystem::getxattr(uint64_t ino, const char* name) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  // This is also the answer to the kernel's question before the first write to each file
  // ("any security.capability to strip?", fs/fuse_channel.h), without touching the disk.
  const bool acl = posix_acls_ && acl_xattr(name);
  std::string stored;
  if (acl) {
    stored = name;  // an ACL is stored under its own name, in the clear
  } else {
    if (unknown_xattr_namespace(name)) return Status::Io(EOPNOTSUPP, "getxattr");
    if (unsupported_xattr(name)) return Status::Io(ENODATA, "getxattr");
    auto enc = encrypt_xattr_name(*keys_, name);
    if (!enc.ok()) return Status::Io(ENODATA, "getxattr");
    stored = std::move(enc).value();
  }
  // An open file's descriptor saves a path walk through /proc, and the size probe saves a
  // 64 KiB buffer in the usual case of no such attribute.
  std::shared_ptr<OpenFile> of = (*i)->type == S_IFREG ? opened(**i) : nullptr;
  PathRef backing;
  if (!of) {
    auto p = inodes_.path(**i);
    if (!p.ok()) return p.status();
    backing = std::move(p).value();
  }
  std::string path = of ? std::string() : proc_path(backing->fd);
  auto get = [&](void* buf, size_t size) {
    return of ? ::fgetxattr(of->fd, stored.c_str(), buf, size)
              : ::getxattr(path.c_str(), stored.c_str(), buf, size);
  };
  ssize_t n = get(nullptr, 0);
  if (n < 0) return errno_status("getxattr");
  Bytes buf(static_cast<size_t>(n));
  n = get(buf.data(), buf.size());
  if (n < 0) return errno_status("getxattr");  // ERANGE if it grew meanwhile: the caller retries
  buf.resize(static_cast<size_t>(n));
  if (acl) return buf;
  return decrypt_xattr_value(*keys_, stored, buf);
}

Result<std::vector<std::string>> Filesystem::listxattr(uint64_t ino) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  auto backing = inodes_.path(**i);
  if (!backing.ok()) return backing.status();
  std::string path = proc_path((*backing)->fd);
  std::vector<std::string> out;
  ssize_t n = ::listxattr(path.c_str(), nullptr, 0);
  if (n < 0) {
    if (errno == ENOTSUP) return out;
    return errno_status("listxattr");
  }
  std::string buf(static_cast<size_t>(n), '\0');
  n = ::listxattr(path.c_str(), buf.data(), buf.size());
  if (n < 0) return errno_status("listxattr");
  buf.resize(static_cast<size_t>(n));
  for (size_t pos = 0; pos < buf.size();) {
    std::string stored = buf.c_str() + pos;
    pos += stored.size() + 1;
    if (posix_acls_ && acl_xattr(stored)) {
      out.push_back(std::move(stored));
      continue;
    }
    auto plain = decrypt_xattr_name(*keys_, stored);
    if (plain.ok()) out.push_back(std::move(plain).value());
  }
  return out;
}

Status Filesystem::removexattr(uint64_t ino, const char* name) {
  auto i = inode(ino);
  if (!i.ok()) return i.status();
  if (posix_acls_ && acl_xattr(name)) return set_acl(**i, name, {}, 0, nullptr);
  if (unknown_xattr_namespace(name)) return Status::Io(EOPNOTSUPP, "removexattr");
  auto enc = encrypt_xattr_name(*keys_, name);
  if (!enc.ok()) return Status::Io(ENODATA, "removexattr");
  auto path = inodes_.path(**i);
  if (!path.ok()) return path.status();
  if (::removexattr(proc_path((*path)->fd).c_str(), enc->c_str()) != 0) return errno_status("removexattr");
  return Status::Ok();
}

Status Filesystem::set_acl(Inode& inode, const char* name, ByteView value, int flags,
                           const std::function<bool(gid_t)>* keeps_setgid) {
  auto path = inodes_.path(inode);
  if (!path.ok()) return path.status();
  // The backing filesystem checks the ACL, and an access ACL sets the mode's bits with it.
  const std::string at = proc_path((*path)->fd);
  const bool remove = keeps_setgid == nullptr;
  if (remove ? ::removexattr(at.c_str(), name) != 0
             : ::setxattr(at.c_str(), name, value.data(), value.size(), flags) != 0) {
    return errno_status(remove ? "removexattr" : "setxattr");
  }
  if (std::string_view(name) == kAclDefault) {
    std::lock_guard lock(inode.mu);
    inode.default_acl = -1;
    return Status::Ok();
  }
  // The daemon (root) may keep set-group-ID; the caller may not, unless in the node's group.
  struct stat st;
  if (!remove && fstatat((*path)->fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0 &&
      (st.st_mode & S_ISGID) && !(*keeps_setgid)(st.st_gid) &&
      fchmodat(AT_FDCWD, at.c_str(), st.st_mode & 07777 & ~S_ISGID, 0) != 0) {
    return errno_status("chmod");
  }
  return Status::Ok();
}

void Filesystem::track_moves(bool on) {
  std::lock_guard lock(moves_mu_);
  tracking_moves_ = on;
  moves_.clear();
  moves_overflowed_ = false;
}

void Filesystem::note_move(const struct stat& st) {
  if (!tracking_moves_.load(std::memory_order_relaxed)) return;  // no walk: the common case
  std::lock_guard lock(moves_mu_);
  if (!tracking_moves_) return;
  if (moves_.size() >= kMaxTrackedMoves) {
    moves_overflowed_ = true;
    return;
  }
  moves_.insert({st.st_dev, st.st_ino});
}

std::vector<std::pair<dev_t, ino_t>> Filesystem::take_moves(bool* overflowed) {
  std::lock_guard lock(moves_mu_);
  std::vector<std::pair<dev_t, ino_t>> out(moves_.begin(), moves_.end());
  moves_.clear();
  *overflowed = moves_overflowed_;
  moves_overflowed_ = false;
  return out;
}

int Filesystem::reopen_known(dev_t dev, ino_t ino) {
  std::shared_ptr<Inode> i = inodes_.find(dev, ino);
  if (!i) return -1;
  if (i->type != S_IFDIR && i->type != S_IFREG) return kNoBlockKeys;
  auto path = inodes_.path(*i);
  if (!path.ok()) return -1;
  // Not O_NOFOLLOW: that would open /proc's magic link itself instead of the node it names.
  return ::open(proc_path((*path)->fd).c_str(), O_PATH | O_CLOEXEC);
}

Status Filesystem::rewrap_block_keys(int dir_fd, const std::string& entry, const std::function<bool()>& go_on,
                                     RewrapProgress* progress) {
  int fd = entry.empty() ? fcntl(dir_fd, F_DUPFD_CLOEXEC, 0)
                         : openat(dir_fd, entry.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? Status::Ok() : errno_status("open backing file");
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
    close(fd);  // gone, not a file, or a file never written: no block keys
    return Status::Ok();
  }
  // Counted as a lookup of our own, so the inode (and with it the one OpenFile every FUSE
  // handle of this file shares) stays the only one for this backing file while we use it.
  std::shared_ptr<Inode> inode = inodes_.adopt(fd, st, 0);
  struct Held {
    InodeTable& table;
    uint64_t id;
    ~Held() { table.forget(id, 1); }
  } held{inodes_, inode->id};

  std::shared_ptr<OpenFile> of;
  Status result;
  const uint64_t written_before = progress->pages_written;
  for (uint64_t next = 0;;) {
    if (!go_on()) break;
    KeyGateScope gate(gate_);
    if (!gate.ok()) {
      result = Status(Code::kKeyUnavailable, "keys revoked");
      break;
    }
    if (!of) {
      auto opened = open_file(*inode);
      if (!opened.ok()) {
        result = opened.status();
        break;
      }
      of = *opened;
    }
    // Small enough that the file is held for well under a millisecond (16 pages: 496 blocks).
    constexpr uint64_t kPagesPerBatch = 16;
    of->file->prefetch_pages(next, kPagesPerBatch);  // disk reads before any lock is held
    // times_mu: a SETATTR of this file's times waits for the batch, so the mtime put back
    // below is never one the caller set meanwhile.
    std::lock_guard times(of->times_mu);
    struct stat before;
    if (fstat(of->fd, &before) != 0) {
      result = errno_status("stat backing file");
      break;
    }
    uint64_t written = 0;
    auto r = of->file->rewrap_keys(next, kPagesPerBatch, &progress->pages_read, &written);
    if (written > 0) {
      const timespec keep[2] = {{0, UTIME_OMIT}, before.st_mtim};
      if (futimens(of->fd, keep) != 0) log_error_rate_limited("re-wrap: could not keep a file's mtime");
      progress->pages_written += written;
    }
    if (!r.ok()) {
      result = r.status();
      break;
    }
    if (*r == CipherFile::kRewrapDone) break;
    next = *r;
  }
  if (of) {
    // Each file's rewritten pages are made durable before the walk moves on: its end is
    // recorded, and a record over pages a power cut took back would stop later mounts from
    // walking again. (syncfs would be one call for all, but on a FUSE backing filesystem it
    // reaches no one.)
    if (progress->pages_written != written_before && result.ok()) result = io_->sync(of->fd, true);
    of.reset();
    release(inode->id);
  }
  return result;
}

}  // namespace envelopefs
