// cutfs: a test filesystem that imitates a power cut. A passthrough FUSE filesystem over a
// backing directory that remembers everything not yet made durable:
//   - file data: an undo record (old bytes, old size) per write/truncate since the file's last
//     fsync;
//   - directory entries: creations, unlinks and renames since that directory's last fsync.
// On SIGUSR1 it undoes all of it, newest first, as a power cut would lose it, and touches the
// file named by CUTFS_DONE: stricter than real filesystems in what it loses (ext4 journals
// more than asked), though always in order. SIGUSR2 cuts as ext4 may out of order: the same,
// but a file that had grown from a length inside a 4 KiB block keeps its new length up to
// the end of that block, reading zeros there (ext4 journals the length of a write into a
// block it has allocated when the write is made, and writes the data back later). SIGRTMIN
// cuts the other way round, as a filesystem that writes a file's data back before its inode
// may (ext4 without a journal; with one, a writeback between a write and the commit of its
// length): a file keeps every change made within the length it had at its last fsync, and
// goes back to that length; one that is shorter now than then loses everything, as on SIGUSR1.
// Test tool only; not part of envelopefs.
//   cutfs BACKING MOUNTPOINT [fuse options]     (runs in the foreground)
#define FUSE_USE_VERSION 312
#include <fuse.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::string g_root;
std::mutex g_mu;
uint64_t g_seq = 0;

struct DataUndo {
  uint64_t off;
  std::string old;     // bytes that were at [off, off + old.size())
  uint64_t old_size;   // file size before the change
};
struct FileLog {
  int fd = -1;
  std::vector<DataUndo> undo;
};
std::map<ino_t, FileLog> g_files;

enum class Kind { kCreate, kUnlink, kRename };
struct MetaOp {
  uint64_t seq;
  Kind kind;
  std::string p1, p2;   // backing paths: created/unlinked path, or rename from → to
  std::string stash;    // a hard link keeping an unlinked or replaced file
};
std::map<ino_t, std::vector<MetaOp>> g_dirs;  // pending ops by the directory they live in

std::string full(const char* path) { return g_root + path; }
std::string parent_of(const std::string& p) { return p.substr(0, p.rfind('/')); }
ino_t ino_of(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0 ? st.st_ino : 0;
}
std::string stash_path() { return g_root + "/.cutfs-stash/" + std::to_string(++g_seq); }

void record_meta(const std::string& dir, MetaOp op) {
  op.seq = ++g_seq;
  g_dirs[ino_of(dir)].push_back(std::move(op));
}

// Records the bytes [off, off+len) and the size of the file before they change.
void record_data(const std::string& path, int fd, uint64_t off, uint64_t len) {
  struct stat st;
  if (fstat(fd, &st) != 0) return;
  FileLog& log = g_files[st.st_ino];
  if (log.fd < 0) log.fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  DataUndo u;
  u.off = off;
  u.old_size = static_cast<uint64_t>(st.st_size);
  if (off < u.old_size) {
    u.old.resize(std::min<uint64_t>(len, u.old_size - off));
    ssize_t n = pread(fd, u.old.data(), u.old.size(), static_cast<off_t>(off));
    u.old.resize(n > 0 ? static_cast<size_t>(n) : 0);
  }
  log.undo.push_back(std::move(u));
}

int rm_entry(const char* p, const struct stat*, int type, struct FTW*) {
  return type == FTW_DP ? rmdir(p) : unlink(p);
}

enum class CutKind { kInOrder, kExt4Tail, kDataBeforeLength };

void cut(CutKind kind) {
  std::lock_guard lock(g_mu);
  std::vector<MetaOp> ops;
  for (auto& [ino, v] : g_dirs) ops.insert(ops.end(), v.begin(), v.end());
  std::sort(ops.begin(), ops.end(), [](const MetaOp& a, const MetaOp& b) { return a.seq > b.seq; });
  size_t undone = 0;
  for (const MetaOp& op : ops) {
    switch (op.kind) {
      case Kind::kCreate:
        nftw(op.p1.c_str(), rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        break;
      case Kind::kUnlink:
        link(op.stash.c_str(), op.p1.c_str());
        break;
      case Kind::kRename:
        rename(op.p2.c_str(), op.p1.c_str());
        if (!op.stash.empty()) link(op.stash.c_str(), op.p2.c_str());
        break;
    }
    ++undone;
  }
  size_t writes = 0;
  for (auto& [ino, log] : g_files) {
    struct stat st;
    // The two kinds that keep changes past the fsynced length need the present size.
    const bool sized = kind != CutKind::kInOrder && log.fd >= 0 && fstat(log.fd, &st) == 0;
    const uint64_t size_now = sized ? static_cast<uint64_t>(st.st_size) : 0;  // before the undo
    const uint64_t synced = log.undo.empty() ? 0 : log.undo.front().old_size;
    if (kind == CutKind::kDataBeforeLength && sized && !log.undo.empty() && size_now >= synced) {
      (void)!ftruncate(log.fd, static_cast<off_t>(synced));
      writes += log.undo.size();
      log.undo.clear();
    }
    for (auto it = log.undo.rbegin(); it != log.undo.rend(); ++it) {
      if (!it->old.empty()) (void)!pwrite(log.fd, it->old.data(), it->old.size(), static_cast<off_t>(it->off));
      (void)!ftruncate(log.fd, static_cast<off_t>(it->old_size));
      ++writes;
    }
    if (kind == CutKind::kExt4Tail && sized && !log.undo.empty()) {
      const uint64_t block_end = (synced + 4095) / 4096 * 4096;
      if (size_now > synced) (void)!ftruncate(log.fd, static_cast<off_t>(std::min(size_now, block_end)));
    }
    if (log.fd >= 0) {
      fsync(log.fd);
      close(log.fd);
    }
  }
  g_files.clear();
  g_dirs.clear();
  std::fprintf(stderr, "cutfs: cut: undid %zu directory operations and %zu writes\n", undone, writes);
  if (const char* done = std::getenv("CUTFS_DONE")) {
    int fd = open(done, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) close(fd);
  }
}

void* signal_thread(void*) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGUSR2);
  sigaddset(&set, SIGRTMIN);
  for (;;) {
    int sig;
    if (sigwait(&set, &sig) != 0) continue;
    cut(sig == SIGUSR1   ? CutKind::kInOrder
        : sig == SIGUSR2 ? CutKind::kExt4Tail
                         : CutKind::kDataBeforeLength);
  }
  return nullptr;
}

int err(int rc) { return rc < 0 ? -errno : rc; }

void* op_init(fuse_conn_info*, fuse_config* cfg) {
  cfg->use_ino = 1;
  cfg->direct_io = 1;  // no page cache above us: a cut must be visible at once
  cfg->entry_timeout = cfg->attr_timeout = cfg->negative_timeout = 0;
  return nullptr;
}
int op_getattr(const char* path, struct stat* st, fuse_file_info*) { return err(lstat(full(path).c_str(), st)); }
int op_readlink(const char* path, char* buf, size_t size) {
  ssize_t n = readlink(full(path).c_str(), buf, size - 1);
  if (n < 0) return -errno;
  buf[n] = '\0';
  return 0;
}
int op_readdir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*, fuse_readdir_flags) {
  DIR* d = opendir(full(path).c_str());
  if (!d) return -errno;
  while (dirent* e = readdir(d)) {
    if (std::strcmp(path, "/") == 0 && std::strcmp(e->d_name, ".cutfs-stash") == 0) continue;
    struct stat st {};
    st.st_ino = e->d_ino;
    st.st_mode = static_cast<mode_t>(e->d_type << 12);
    if (fill(buf, e->d_name, &st, 0, static_cast<fuse_fill_dir_flags>(0))) break;
  }
  closedir(d);
  return 0;
}
int op_mknod(const char* path, mode_t mode, dev_t rdev) {
  std::lock_guard lock(g_mu);
  std::string p = full(path);
  int rc = S_ISREG(mode) ? open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY, mode) : mknod(p.c_str(), mode, rdev);
  if (rc < 0) return -errno;
  if (S_ISREG(mode)) close(rc);
  record_meta(parent_of(p), {0, Kind::kCreate, p, "", ""});
  return 0;
}
int op_mkdir(const char* path, mode_t mode) {
  std::lock_guard lock(g_mu);
  std::string p = full(path);
  if (mkdir(p.c_str(), mode) != 0) return -errno;
  record_meta(parent_of(p), {0, Kind::kCreate, p, "", ""});
  return 0;
}
int op_symlink(const char* target, const char* path) {
  std::lock_guard lock(g_mu);
  std::string p = full(path);
  if (symlink(target, p.c_str()) != 0) return -errno;
  record_meta(parent_of(p), {0, Kind::kCreate, p, "", ""});
  return 0;
}
int op_link(const char* from, const char* to) {
  std::lock_guard lock(g_mu);
  std::string p = full(to);
  if (link(full(from).c_str(), p.c_str()) != 0) return -errno;
  record_meta(parent_of(p), {0, Kind::kCreate, p, "", ""});
  return 0;
}
int op_unlink(const char* path) {
  std::lock_guard lock(g_mu);
  std::string p = full(path), stash = stash_path();
  link(p.c_str(), stash.c_str());
  if (unlink(p.c_str()) != 0) return -errno;
  record_meta(parent_of(p), {0, Kind::kUnlink, p, "", stash});
  return 0;
}
int op_rmdir(const char* path) { return err(rmdir(full(path).c_str())); }
int op_rename(const char* from, const char* to, unsigned int flags) {
  if (flags != 0) return -EINVAL;
  std::lock_guard lock(g_mu);
  std::string p1 = full(from), p2 = full(to), stash;
  struct stat st;
  if (lstat(p2.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
    stash = stash_path();
    link(p2.c_str(), stash.c_str());
  }
  if (rename(p1.c_str(), p2.c_str()) != 0) return -errno;
  record_meta(parent_of(p2), {0, Kind::kRename, p1, p2, stash});
  return 0;
}
int op_chmod(const char* path, mode_t mode, fuse_file_info*) { return err(chmod(full(path).c_str(), mode)); }
int op_chown(const char* path, uid_t u, gid_t g, fuse_file_info*) { return err(lchown(full(path).c_str(), u, g)); }
int op_truncate(const char* path, off_t size, fuse_file_info* fi) {
  std::lock_guard lock(g_mu);
  std::string p = full(path);
  int fd = fi ? static_cast<int>(fi->fh) : open(p.c_str(), O_RDWR);
  if (fd < 0) return -errno;
  struct stat st;
  fstat(fd, &st);
  if (size < st.st_size) record_data(p, fd, static_cast<uint64_t>(size), static_cast<uint64_t>(st.st_size - size));
  else record_data(p, fd, static_cast<uint64_t>(st.st_size), 0);
  int rc = err(ftruncate(fd, size));
  if (!fi) close(fd);
  return rc;
}
int op_utimens(const char* path, const struct timespec ts[2], fuse_file_info*) {
  return err(utimensat(AT_FDCWD, full(path).c_str(), ts, AT_SYMLINK_NOFOLLOW));
}
int op_open(const char* path, fuse_file_info* fi) {
  int fd = open(full(path).c_str(), (fi->flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_APPEND)) | O_CLOEXEC);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}
int op_create(const char* path, mode_t mode, fuse_file_info* fi) {
  std::lock_guard lock(g_mu);
  std::string p = full(path);
  int fd = open(p.c_str(), (fi->flags | O_CREAT) & ~O_APPEND, mode);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  record_meta(parent_of(p), {0, Kind::kCreate, p, "", ""});
  return 0;
}
int op_read(const char*, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  return err(static_cast<int>(pread(static_cast<int>(fi->fh), buf, size, off)));
}
int op_write(const char* path, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  std::lock_guard lock(g_mu);
  int fd = static_cast<int>(fi->fh);
  record_data(full(path), fd, static_cast<uint64_t>(off), size);
  return err(static_cast<int>(pwrite(fd, buf, size, off)));
}
int op_statfs(const char* path, struct statvfs* st) { return err(statvfs(full(path).c_str(), st)); }
int op_release(const char*, fuse_file_info* fi) {
  close(static_cast<int>(fi->fh));
  return 0;
}
int op_fsync(const char*, int datasync, fuse_file_info* fi) {
  std::lock_guard lock(g_mu);
  int fd = static_cast<int>(fi->fh);
  struct stat st;
  if (fstat(fd, &st) == 0) {
    auto it = g_files.find(st.st_ino);
    if (it != g_files.end()) {
      if (it->second.fd >= 0) close(it->second.fd);
      g_files.erase(it);
    }
  }
  return err(datasync ? fdatasync(fd) : fsync(fd));
}
int op_fsyncdir(const char* path, int, fuse_file_info*) {
  std::lock_guard lock(g_mu);
  g_dirs.erase(ino_of(full(path)));
  return 0;
}
int op_fallocate(const char* path, int mode, off_t off, off_t len, fuse_file_info* fi) {
  std::lock_guard lock(g_mu);
  int fd = static_cast<int>(fi->fh);
  record_data(full(path), fd, static_cast<uint64_t>(off), static_cast<uint64_t>(len));
  return err(fallocate(fd, mode, off, len));
}
int op_setxattr(const char* path, const char* name, const char* value, size_t size, int flags) {
  return err(lsetxattr(full(path).c_str(), name, value, size, flags));
}
int op_getxattr(const char* path, const char* name, char* value, size_t size) {
  return err(static_cast<int>(lgetxattr(full(path).c_str(), name, value, size)));
}
int op_listxattr(const char* path, char* list, size_t size) {
  return err(static_cast<int>(llistxattr(full(path).c_str(), list, size)));
}
int op_removexattr(const char* path, const char* name) { return err(lremovexattr(full(path).c_str(), name)); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: cutfs BACKING MOUNTPOINT [fuse options]\n");
    return 2;
  }
  char* real = realpath(argv[1], nullptr);
  if (!real) {
    std::perror("cutfs: backing");
    return 2;
  }
  g_root = real;
  free(real);
  mkdir((g_root + "/.cutfs-stash").c_str(), 0700);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGUSR2);
  sigaddset(&set, SIGRTMIN);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  pthread_t t;
  pthread_create(&t, nullptr, signal_thread, nullptr);

  fuse_operations ops{};
  ops.init = op_init;
  ops.getattr = op_getattr;
  ops.readlink = op_readlink;
  ops.readdir = op_readdir;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.symlink = op_symlink;
  ops.link = op_link;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.rename = op_rename;
  ops.chmod = op_chmod;
  ops.chown = op_chown;
  ops.truncate = op_truncate;
  ops.utimens = op_utimens;
  ops.open = op_open;
  ops.create = op_create;
  ops.read = op_read;
  ops.write = op_write;
  ops.statfs = op_statfs;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.fsyncdir = op_fsyncdir;
  ops.fallocate = op_fallocate;
  ops.setxattr = op_setxattr;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  ops.removexattr = op_removexattr;
  std::vector<char*> args = {argv[0], argv[2], const_cast<char*>("-f"), const_cast<char*>("-o"),
                             const_cast<char*>("default_permissions,allow_other")};
  for (int i = 3; i < argc; ++i) args.push_back(argv[i]);
  return fuse_main(static_cast<int>(args.size()), args.data(), &ops, nullptr);
}
