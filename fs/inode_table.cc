#include "fs/inode_table.h"

#include "fs/fuse_ops.h"
#include "fs/log.h"
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace envelopefs {

void OpenFile::defer_times(const timespec times[2], const timespec& ctime) {
  std::lock_guard lock(times_mu);
  if (!deferred) deferred.emplace();
  if (times[0].tv_nsec != UTIME_OMIT) deferred->atime = times[0];
  if (times[1].tv_nsec != UTIME_OMIT) deferred->mtime = times[1];
  deferred->ctime = ctime;
}

Status OpenFile::set_times(const timespec times[2]) {
  std::lock_guard lock(times_mu);
  timespec ts[2] = {times[0], times[1]};
  if (deferred) {
    if (ts[0].tv_nsec == UTIME_OMIT) ts[0] = deferred->atime;
    if (ts[1].tv_nsec == UTIME_OMIT) ts[1] = deferred->mtime;
  }
  if ((ts[0].tv_nsec != UTIME_OMIT || ts[1].tv_nsec != UTIME_OMIT) && futimens(fd, ts) != 0) {
    return Status::Io(errno, "utimens");
  }
  deferred.reset();
  return Status::Ok();
}

OpenFile::~OpenFile() {
  if (deferred && !apply_deferred_times().ok()) {
    log_error_rate_limited("close: could not set a file's times on its backing file");
  }
  file.reset();
  if (fd >= 0) close(fd);
  if (direct_fd >= 0) close(direct_fd);
}

BackingPath::~BackingPath() {
  if (fd >= 0) close(fd);
}

namespace {

// The file handle of `fd`'s node (struct file_handle and its bytes), or empty if it has none.
std::vector<unsigned char> handle_of(int fd) {
  alignas(file_handle) unsigned char buf[sizeof(file_handle) + MAX_HANDLE_SZ];
  auto* fh = reinterpret_cast<file_handle*>(buf);
  fh->handle_bytes = MAX_HANDLE_SZ;
  int mount_id = 0;
  if (name_to_handle_at(fd, "", fh, &mount_id, AT_EMPTY_PATH) != 0) return {};
  return std::vector<unsigned char>(buf, buf + sizeof(file_handle) + fh->handle_bytes);
}

int open_handle(int mount_fd, std::vector<unsigned char>& handle) {
  // O_PATH names the node itself, a symlink too: nothing is followed from a handle.
  // A node deleted behind our back was once answered ENOMEM, not ESTALE (a CI run, ext4,
  // Linux 6.18): ext4 reports "no inode from the inode cache" as out of memory, which is what
  // an inode still on its way out gives. Asked again a moment later, it is ESTALE.
  for (int attempt = 0;; ++attempt) {
    int fd = open_by_handle_at(mount_fd, reinterpret_cast<file_handle*>(handle.data()), O_PATH | O_CLOEXEC);
    if (fd >= 0 || errno != ENOMEM || attempt == 20) return fd;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

InodeTable::InodeTable(int root_fd) : root_fd_(root_fd) {
  struct stat st;
  fstat(root_fd, &st);
  auto root = std::make_shared<Inode>();
  root->id = FUSE_ROOT_ID;
  root->path = std::make_shared<const BackingPath>(root_fd);
  root->keep_path = true;
  root->dev = st.st_dev;
  root_dev_ = st.st_dev;
  root->ino = st.st_ino;
  root->type = S_IFDIR;
  root->nlookup = 1;  // the root is never forgotten
  by_id_[FUSE_ROOT_ID] = root;
  by_backing_[{st.st_dev, st.st_ino}] = FUSE_ROOT_ID;
}

InodeTable::~InodeTable() {
  if (mount_fd_ >= 0) close(mount_fd_);
}

std::shared_ptr<Inode> InodeTable::get(uint64_t id) {
  // Every request starts here, holding no lock: the place to give descriptors back.
  if (held_.load(std::memory_order_relaxed) > trim_at_.load(std::memory_order_relaxed)) trim();
  std::lock_guard lock(mu_);
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

Result<PathRef> InodeTable::path(Inode& i) {
  std::lock_guard lock(i.path_mu);
  if (i.path) {
    i.used.store(true, std::memory_order_relaxed);
  } else {
    // Closed by trim(), which kept the handle. No trim from here (the caller may hold the
    // inode's lock); the next request's get() brings the count back under the budget.
    int fd = i.handle.empty() ? -1 : open_handle(mount_fd_, i.handle);
    if (fd < 0) {
      const int err = i.handle.empty() ? EBADF : errno == ENOENT ? ESTALE : errno;
      return Status::Io(err, "open backing node by its handle");
    }
    // Not marked used: only a second use protects it, so a scan over more nodes than the
    // budget does not push out the ones used again and again.
    i.path = std::make_shared<const BackingPath>(fd);
    if (i.in_table) held_.fetch_add(1, std::memory_order_relaxed);
    reopened_.fetch_add(1, std::memory_order_relaxed);
  }
  return i.path;
}

bool InodeTable::limit_descriptors(size_t budget, std::string* why) {
  std::vector<unsigned char> h = handle_of(root_fd_);
  if (h.empty()) {
    *why = std::string("the backing filesystem gives no file handles (") + std::strerror(errno) + ")";
    return false;
  }
  // open_by_handle_at wants a real descriptor of the filesystem, not an O_PATH one.
  if (mount_fd_ < 0) mount_fd_ = openat(root_fd_, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (mount_fd_ < 0) {
    *why = std::string("the cipher dir cannot be opened (") + std::strerror(errno) + ")";
    return false;
  }
  int fd = open_handle(mount_fd_, h);
  if (fd < 0) {
    *why = std::string("file handles cannot be opened (") + std::strerror(errno) +
           (errno == EPERM ? "; that needs CAP_DAC_READ_SEARCH)" : ")");
    return false;
  }
  close(fd);
  budget_.store(std::max<size_t>(budget, 64), std::memory_order_relaxed);
  trim_at_.store(budget_.load());
  return true;
}

void InodeTable::trim() {
  std::unique_lock pass(trim_mu_, std::try_to_lock);
  if (!pass.owns_lock()) return;  // another thread is at it
  trimmed_.store(true);
  const size_t budget = budget_.load(std::memory_order_relaxed);
  // Room for a burst of new inodes before the next pass; at most 4,096 closed per pass (each
  // may cost a name_to_handle_at and a stat, ~2 us, with the table lock held).
  const size_t target = budget - std::min<size_t>(budget / 8, 4096);
  std::vector<PathRef> closing;               // closed once the table lock is released
  std::lock_guard lock(mu_);
  // Clock order from where the last pass stopped: an inode used since the hand last passed
  // it (or since it came in) gets a second chance. Two sweeps at most: the first may only
  // clear those marks.
  size_t steps = std::min<size_t>(2 * by_id_.size(), 1 << 16);
  auto it = by_id_.upper_bound(hand_);
  while (held_.load(std::memory_order_relaxed) > target && steps-- > 0) {
    if (it == by_id_.end()) it = by_id_.begin();
    hand_ = it->first;
    Inode& i = *it->second;
    ++it;
    if (i.used.exchange(false, std::memory_order_relaxed)) continue;
    // An inode's lock can be held across a disk read (an open reading its header): skipped,
    // so the table lock is never held waiting for one.
    std::unique_lock ilock(i.mu, std::try_to_lock);
    if (!ilock.owns_lock() || i.open) continue;
    std::lock_guard plock(i.path_mu);
    if (!i.path || i.keep_path) continue;
    if (i.handle.empty()) {
      // Only through the root's filesystem, and not a node without links: its handle would
      // open nothing, while a process may still hold it (an O_PATH descriptor, a cwd).
      struct stat st;
      if (i.dev != root_dev_ || fstat(i.path->fd, &st) != 0 || st.st_nlink == 0 ||
          (i.handle = handle_of(i.path->fd)).empty()) {
        i.keep_path = true;
        continue;
      }
    }
    closing.push_back(std::move(i.path));
    held_.fetch_sub(1, std::memory_order_relaxed);
  }
  // A pass that could not get down to the target (too many open files, or in use) is not
  // tried again by every request: only once another eighth of the budget has come on top.
  const size_t now = held_.load(std::memory_order_relaxed);
  trim_at_.store(now <= target ? budget : std::max(budget, now + budget / 8));
}

void InodeTable::keep_before_removal(int dir_fd, const char* entry) {
  // Nothing to do until a descriptor was ever closed (the usual case: no stat).
  if (!trimmed_.load(std::memory_order_relaxed)) return;
  struct stat st;
  if (fstatat(dir_fd, entry, &st, AT_SYMLINK_NOFOLLOW) != 0) return;
  std::shared_ptr<Inode> i = find(st.st_dev, st.st_ino);
  if (!i) return;
  {
    std::lock_guard lock(i->path_mu);
    i->keep_path = true;
  }
  (void)path(*i);
}

std::shared_ptr<Inode> InodeTable::adopt(int fd, const struct stat& st, uint64_t parent) {
  if (held_.load(std::memory_order_relaxed) > trim_at_.load(std::memory_order_relaxed)) trim();
  std::lock_guard lock(mu_);
  if (auto it = by_backing_.find({st.st_dev, st.st_ino}); it != by_backing_.end()) {
    auto inode = by_id_.at(it->second);
    inode->nlookup++;
    inode->used.store(true, std::memory_order_relaxed);
    {
      // A descriptor trim() closed comes back for free: the caller just opened the node.
      std::lock_guard plock(inode->path_mu);
      if (!inode->path) {
        inode->path = std::make_shared<const BackingPath>(fd);
        held_.fetch_add(1, std::memory_order_relaxed);
        fd = -1;
      }
    }
    if (fd >= 0) close(fd);
    if (parent != 0) {
      std::lock_guard ilock(inode->mu);
      inode->parent = parent;
    }
    return inode;
  }
  auto inode = std::make_shared<Inode>();
  inode->id = next_++;
  inode->path = std::make_shared<const BackingPath>(fd);
  inode->dev = st.st_dev;
  inode->ino = st.st_ino;
  inode->type = st.st_mode & S_IFMT;
  inode->nlookup = 1;
  inode->parent = parent;
  by_id_[inode->id] = inode;
  by_backing_[{st.st_dev, st.st_ino}] = inode->id;
  held_.fetch_add(1, std::memory_order_relaxed);
  return inode;
}

void InodeTable::forget(uint64_t id, uint64_t n) {
  if (id == FUSE_ROOT_ID) return;
  std::shared_ptr<Inode> gone;
  {
    std::lock_guard lock(mu_);
    auto it = by_id_.find(id);
    if (it == by_id_.end()) return;
    Inode& inode = *it->second;
    if (inode.nlookup.fetch_sub(n) > n) return;
    by_backing_.erase({inode.dev, inode.ino});
    gone = std::move(it->second);
    by_id_.erase(it);
    std::lock_guard plock(gone->path_mu);
    gone->in_table = false;
    if (gone->path) held_.fetch_sub(1, std::memory_order_relaxed);
  }
  // The Inode closes its fd when `gone` (or its last other user) drops it, outside the table
  // lock: for an unlinked file that close frees the blocks (and discards them, on a backing
  // filesystem mounted with discard), half a millisecond during which every other request
  // waited for the lock (rm -rf: GETATTR 46 us -> 258 us on average).
}

std::shared_ptr<Inode> InodeTable::find(dev_t dev, ino_t ino) {
  std::lock_guard lock(mu_);
  auto it = by_backing_.find({dev, ino});
  return it == by_backing_.end() ? nullptr : by_id_.at(it->second);
}

size_t InodeTable::size() {
  std::lock_guard lock(mu_);
  return by_id_.size();
}

std::vector<uint64_t> InodeTable::ids() {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> out;
  out.reserve(by_id_.size());
  for (const auto& [id, inode] : by_id_) out.push_back(id);
  return out;
}

}  // namespace envelopefs
