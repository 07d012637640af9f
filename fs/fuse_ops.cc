// Thin FUSE handlers: unpack the request, call the Filesystem, reply exactly once. No exception
// crosses into libfuse: every handler body runs inside guard(), which turns one into EIO.
#include "fs/fuse_ops.h"

#include <dirent.h>
#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <new>
#include <vector>

#include "fs/aligned_buffer.h"
#include "fs/fuse_channel.h"
#include "fs/fuse_ring.h"
#include "fs/errno_map.h"
#include "fs/filesystem.h"
#include "fs/log.h"

namespace envelopefs {
namespace {

Filesystem& fs_of(fuse_req_t req) { return *static_cast<Filesystem*>(fuse_req_userdata(req)); }

// libfuse 3.14 has no way from a request to its session.
std::atomic<fuse_session*> notification_session{nullptr};

// fi->fh of a regular file (directories hold a DirHandle there): whether this open may write.
// A GETATTR that names the handle comes from the kernel's write path (or lseek, or a read:
// the kernel refreshes the size before each) on that open.
constexpr uint64_t kWritableHandle = 1;

Filesystem::Caller caller(fuse_req_t req) {
  const fuse_ctx* c = fuse_req_ctx(req);
  return {c->uid, c->gid, fs_of(req).posix_acls() ? c->umask : mode_t{0}};
}

// Every request that may use a key: through the key gate (EKEYREVOKED while the root is
// revoked, fs/key_watch.h), with exceptions turned into errors.
template <typename F>
void guard(fuse_req_t req, F&& body) {
  KeyGateScope gate(fs_of(req).gate());
  if (!gate.ok()) {
    fuse_reply_err(req, EKEYREVOKED);
    return;
  }
  try {
    body();
  } catch (const std::bad_alloc&) {
    fuse_reply_err(req, ENOMEM);
  } catch (const std::exception& e) {
    log_error(std::string("internal error: ") + e.what());
    fuse_reply_err(req, EIO);
  }
}

void reply_status(fuse_req_t req, const Status& st, const char* what, fuse_ino_t ino) {
  fuse_reply_err(req, st.ok() ? 0 : to_errno(st, what, ino));
}

void reply_entry(fuse_req_t req, const Status& st, const Entry& e, const char* what, fuse_ino_t ino) {
  if (!st.ok()) return reply_status(req, st, what, ino);
  fuse_entry_param p{};
  p.ino = e.ino;
  p.attr = e.attr;
  p.attr_timeout = fs_of(req).options().attr_timeout;
  p.entry_timeout = fs_of(req).options().entry_timeout;
  fuse_reply_entry(req, &p);
}

// Directory handles hold the decrypted listing taken at opendir, so offsets stay stable. A
// read from offset 0 after the first one (rewinddir) takes it again: POSIX has rewinddir show
// the directory as it is now, as a new opendir would.
struct DirHandle {
  std::vector<DirEntry> entries;
  bool read = false;
};

void op_init(void* userdata, fuse_conn_info* conn) {
  auto* fs = static_cast<Filesystem*>(userdata);
  if (fs->options().writeback_cache && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) {
    conn->want |= FUSE_CAP_WRITEBACK_CACHE;
  }
  // POSIX ACLs: the kernel checks them (they imply default_permissions) and the backing
  // filesystem keeps them. DONT_MASK leaves the umask to us, which must not apply it where the
  // parent directory has a default ACL.
  const uint64_t acls = FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK;
  if (fs->can_store_acls() && (conn->capable & acls) == acls) {
    conn->want |= acls;
    fs->use_posix_acls();
  } else if (fs->can_store_acls()) {
    // The other reasons were said before the mount was ready (fs/mount.cc).
    log_error("--acl: POSIX ACLs are off: the kernel cannot leave the umask to the daemon");
  }
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  conn->max_write = 1 << 20;
  conn->max_readahead = 1 << 20;
  conn->max_background = 64;
  conn->congestion_threshold = 48;
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guard(req, [&] {
    Entry e;
    Status st = fs_of(req).lookup(parent, name, &e);
    if (st.code() == Code::kNotFound || (st.code() == Code::kIoError && st.sys_errno() == ENOENT)) {
      // Negative entry: the kernel may cache the absence (we are the only writer).
      fuse_entry_param p{};
      p.entry_timeout = fs_of(req).options().entry_timeout;
      fuse_reply_entry(req, &p);
      return;
    }
    reply_entry(req, st, e, "lookup", parent);
  });
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  fs_of(req).forget(ino, nlookup);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) fs_of(req).forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guard(req, [&] {
    // With the writeback cache, write() reaches us only as this refresh of the file's size
    // and mode, which a failed writeback WRITE made stale (op_write): the writer learns of it
    // here, as it would from write() on a local filesystem that ran out of space.
    if (fi != nullptr && fi->fh == kWritableHandle) {
      if (int err = fs_of(req).take_writeback_error(ino); err != 0) return (void)fuse_reply_err(req, err);
    }
    struct stat st;
    Status s = fs_of(req).getattr(ino, &st);
    if (!s.ok()) return reply_status(req, s, "getattr", ino);
    fuse_reply_attr(req, &st, fs_of(req).options().attr_timeout);
  });
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  guard(req, [&] {
    struct stat st;
    Status s = request_kills_suidgid() ? fs_of(req).kill_suidgid(ino) : Status::Ok();
    if (s.ok()) s = fs_of(req).setattr(ino, *attr, to_set, &st);
    if (!s.ok()) return reply_status(req, s, "setattr", ino);
    fuse_reply_attr(req, &st, fs_of(req).options().attr_timeout);
  });
}

void op_readlink(fuse_req_t req, fuse_ino_t ino) {
  guard(req, [&] {
    std::string target;
    Status s = fs_of(req).readlink(ino, &target);
    if (!s.ok()) return reply_status(req, s, "readlink", ino);
    fuse_reply_readlink(req, target.c_str());
  });
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  guard(req, [&] {
    Entry e;
    Status s = fs_of(req).mknod(parent, name, mode, rdev, caller(req), &e);
    reply_entry(req, s, e, "mknod", parent);
  });
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  guard(req, [&] {
    Entry e;
    Status s = fs_of(req).mkdir(parent, name, mode, caller(req), &e);
    reply_entry(req, s, e, "mkdir", parent);
  });
}

void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  guard(req, [&] {
    Entry e;
    Status s = fs_of(req).symlink(link, parent, name, caller(req), &e);
    reply_entry(req, s, e, "symlink", parent);
  });
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name) {
  guard(req, [&] {
    Entry e;
    Status s = fs_of(req).link(ino, parent, name, &e);
    reply_entry(req, s, e, "link", ino);
  });
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guard(req, [&] { reply_status(req, fs_of(req).unlink(parent, name), "unlink", parent); });
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  guard(req, [&] { reply_status(req, fs_of(req).rmdir(parent, name), "rmdir", parent); });
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
               const char* newname, unsigned int flags) {
  guard(req, [&] {
    reply_status(req, fs_of(req).rename(parent, name, newparent, newname, flags), "rename", parent);
  });
}

void set_open_flags(fuse_file_info* fi) {
  // We are the only writer of the cipher dir, so cached pages stay valid across opens.
  fi->keep_cache = 1;
  fi->fh = (fi->flags & O_ACCMODE) != O_RDONLY ? kWritableHandle : 0;
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  guard(req, [&] {
    Filesystem& fs = fs_of(req);
    Entry e;
    Status s = fs.create(parent, name, mode, caller(req), &e);
    if (!s.ok()) return reply_status(req, s, "create", parent);
    set_open_flags(fi);
    fuse_entry_param p{};
    p.ino = e.ino;
    p.attr = e.attr;
    p.attr_timeout = fs.options().attr_timeout;
    p.entry_timeout = fs.options().entry_timeout;
    if (fuse_reply_create(req, &p, fi) != 0) fs.release(e.ino);  // interrupted: undo the open
  });
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guard(req, [&] {
    Status s = request_kills_suidgid() ? fs_of(req).kill_suidgid(ino) : Status::Ok();
    if (s.ok()) s = fs_of(req).open(ino, fi->flags);
    if (!s.ok()) return reply_status(req, s, "open", ino);
    set_open_flags(fi);
    if (fuse_reply_open(req, fi) != 0) fs_of(req).release(ino);
  });
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  guard(req, [&] {
    // Page-aligned, so whole blocks can be read into it with O_DIRECT and decrypted in place.
    // A request that came through the ring is answered from its entry's payload buffer,
    // which the reply then needs no copy into.
    uint8_t* out = ring_reply_buffer(size);
    if (out == nullptr) {
      thread_local AlignedBuffer buf;
      if (buf.capacity() < size) buf = AlignedBuffer(size);  // bad_alloc: ENOMEM, in guard()
      out = buf.data();
    }
    auto n = fs_of(req).read(ino, static_cast<uint64_t>(off), {out, size});
    if (!n.ok()) return reply_status(req, n.status(), "read", ino);
    fuse_reply_buf(req, reinterpret_cast<const char*>(out), *n);
  });
}

// A WRITE of the kernel's page cache failed. The kernel keeps the error for the file's next
// fsync or close, and meanwhile takes every write() into its cache as if there were room: a
// writer that never syncs (`cat /dev/zero > f` on a full disk) would fill the cache and lose
// it for ever. So the error is kept, and the file's attributes made stale: the kernel then
// refreshes them (GETATTR naming the writer's handle, op_getattr) before the next write().
// Attributes only (offset -1): no page is locked, so this is safe from a request handler.
void note_writeback_error(fuse_req_t req, fuse_ino_t ino, int err) {
  fs_of(req).note_writeback_error(ino, err);
  if (fuse_session* se = notification_session.load()) (void)fuse_lowlevel_notify_inval_inode(se, ino, -1, 0);
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char* data, size_t size, off_t off, fuse_file_info* fi) {
  guard(req, [&] {
    Status s = request_kills_suidgid() ? fs_of(req).kill_suidgid(ino) : Status::Ok();
    if (s.ok()) s = fs_of(req).write(ino, static_cast<uint64_t>(off), {reinterpret_cast<const uint8_t*>(data), size});
    if (!s.ok()) {
      const int err = to_errno(s, "write", ino);
      if (fi->writepage) note_writeback_error(req, ino, err);
      return (void)fuse_reply_err(req, err);
    }
    fuse_reply_write(req, size);
  });
}

// Nothing to do at close: writes are on the backing store before we reply to them, and
// POSIX locks are the kernel's (no FUSE_POSIX_LOCKS). ENOSYS tells the kernel so once and
// for all (fc->no_flush): it still writes back dirty pages at close, but stops sending a
// FLUSH round trip per close (cp -r: one per file).
void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, ENOSYS); }

void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  // A writeback error kept for a writer (op_write) has been told by this close, if not before.
  if (fi->fh == kWritableHandle) (void)fs_of(req).take_writeback_error(ino);
  fs_of(req).release(ino);
  fuse_reply_err(req, 0);
}

void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  guard(req, [&] { reply_status(req, fs_of(req).fsync(ino, datasync != 0), "fsync", ino); });
}

void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, fuse_file_info*) {
  guard(req, [&] {
    reply_status(req, fs_of(req).fallocate(ino, mode, static_cast<uint64_t>(off), static_cast<uint64_t>(len)),
                 "fallocate", ino);
  });
}

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  guard(req, [&] {
    auto h = std::make_unique<DirHandle>();
    Status s = fs_of(req).readdir(ino, &h->entries);
    if (!s.ok()) return reply_status(req, s, "opendir", ino);
    fi->fh = reinterpret_cast<uint64_t>(h.get());
    fi->cache_readdir = 0;
    if (fuse_reply_open(req, fi) == 0) h.release();
  });
}

void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi, bool plus) {
  guard(req, [&] {
    Filesystem& fs = fs_of(req);
    auto* h = reinterpret_cast<DirHandle*>(fi->fh);
    if (off == 0 && h->read) {
      std::vector<DirEntry> now;
      Status s = fs.readdir(ino, &now);
      if (!s.ok()) return reply_status(req, s, "readdir", ino);
      h->entries = std::move(now);
    }
    h->read = true;
    std::vector<char> buf(size);
    size_t used = 0;
    // Offsets: 0 ".", 1 "..", 2+k entry k.
    for (size_t idx = static_cast<size_t>(off); idx < h->entries.size() + 2; ++idx) {
      std::string name;
      struct stat st {};
      fuse_entry_param p{};
      bool looked_up = false;
      if (idx < 2) {
        name = idx == 0 ? "." : "..";
        st.st_ino = idx == 0 ? ino : 1;
        st.st_mode = S_IFDIR;
      } else {
        const DirEntry& de = h->entries[idx - 2];
        name = de.name;
        st.st_ino = de.ino;
        st.st_mode = static_cast<mode_t>(de.type << 12)  /* DTTOIF */;
        if (plus) {
          Entry e;
          if (!fs.lookup(ino, name.c_str(), &e).ok()) continue;  // vanished meanwhile
          looked_up = true;
          p.ino = e.ino;
          p.attr = e.attr;
          p.attr_timeout = fs.options().attr_timeout;
          p.entry_timeout = fs.options().entry_timeout;
        }
      }
      size_t need;
      if (plus) {
        if (!looked_up) p.attr = st;
        need = fuse_add_direntry_plus(req, buf.data() + used, size - used, name.c_str(), &p,
                                      static_cast<off_t>(idx + 1));
      } else {
        need = fuse_add_direntry(req, buf.data() + used, size - used, name.c_str(), &st,
                                 static_cast<off_t>(idx + 1));
      }
      if (need > size - used) {
        if (looked_up) fs.forget(p.ino, 1);  // not sent: the kernel never saw this lookup
        break;
      }
      used += need;
    }
    fuse_reply_buf(req, buf.data(), used);
  });
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, false);
}
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, true);
}

void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  delete reinterpret_cast<DirHandle*>(fi->fh);
  fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  guard(req, [&] { reply_status(req, fs_of(req).fsyncdir(ino), "fsyncdir", ino); });
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  guard(req, [&] {
    struct statvfs st;
    Status s = fs_of(req).statfs(&st);
    if (!s.ok()) return reply_status(req, s, "statfs", 1);
    fuse_reply_statfs(req, &st);
  });
}

// As the kernel's in_group_or_capable: root, or a member of `gid` (its primary group or one
// of its supplementary groups, which libfuse reads from /proc).
bool caller_in_group(fuse_req_t req, gid_t gid) {
  const fuse_ctx* c = fuse_req_ctx(req);
  if (c->uid == 0 || c->gid == gid) return true;
  std::vector<gid_t> groups(32);
  int n = fuse_req_getgroups(req, static_cast<int>(groups.size()), groups.data());
  if (n > static_cast<int>(groups.size())) {
    groups.resize(static_cast<size_t>(n));
    n = fuse_req_getgroups(req, n, groups.data());
  }
  if (n <= 0) return false;
  groups.resize(std::min(groups.size(), static_cast<size_t>(n)));
  return std::find(groups.begin(), groups.end(), gid) != groups.end();
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags) {
  guard(req, [&] {
    auto keeps_setgid = [req](gid_t gid) { return caller_in_group(req, gid); };
    reply_status(req,
                 fs_of(req).setxattr(ino, name, {reinterpret_cast<const uint8_t*>(value), size}, flags,
                                     keeps_setgid),
                 "setxattr", ino);
  });
}

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  guard(req, [&] {
    auto v = fs_of(req).getxattr(ino, name);
    if (!v.ok()) return reply_status(req, v.status(), "getxattr", ino);
    if (size == 0) return (void)fuse_reply_xattr(req, v->size());
    if (size < v->size()) return (void)fuse_reply_err(req, ERANGE);
    fuse_reply_buf(req, reinterpret_cast<const char*>(v->data()), v->size());
  });
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  guard(req, [&] {
    auto names = fs_of(req).listxattr(ino);
    if (!names.ok()) return reply_status(req, names.status(), "listxattr", ino);
    std::string list;
    for (const std::string& n : *names) list.append(n).push_back('\0');
    if (size == 0) return (void)fuse_reply_xattr(req, list.size());
    if (size < list.size()) return (void)fuse_reply_err(req, ERANGE);
    fuse_reply_buf(req, list.data(), list.size());
  });
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  guard(req, [&] { reply_status(req, fs_of(req).removexattr(ino, name), "removexattr", ino); });
}

fuse_lowlevel_ops make_table() {
  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.lookup = op_lookup;
  ops.forget = op_forget;
  ops.forget_multi = op_forget_multi;
  ops.getattr = op_getattr;
  ops.setattr = op_setattr;
  ops.readlink = op_readlink;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.symlink = op_symlink;
  ops.link = op_link;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.rename = op_rename;
  ops.create = op_create;
  ops.open = op_open;
  ops.read = op_read;
  ops.write = op_write;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.fallocate = op_fallocate;
  ops.opendir = op_opendir;
  ops.readdir = op_readdir;
  ops.readdirplus = op_readdirplus;
  ops.releasedir = op_releasedir;
  ops.fsyncdir = op_fsyncdir;
  ops.statfs = op_statfs;
  ops.setxattr = op_setxattr;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  ops.removexattr = op_removexattr;
  return ops;
}

}  // namespace

void set_notification_session(fuse_session* se) { notification_session.store(se); }

const fuse_lowlevel_ops& fuse_operations() {
  static const fuse_lowlevel_ops ops = make_table();
  return ops;
}

}  // namespace envelopefs
