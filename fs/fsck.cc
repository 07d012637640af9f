#include "fs/fsck.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <optional>
#include <vector>

#include "fs/cipher_file.h"
#include "fs/names.h"
#include "fs/salvage.h"
#include "fs/volume_lock.h"
#include "keyhierarchy/audit_log.h"

namespace envelopefs {
namespace {

class Checker {
 public:
  // `read_blocks` false: metadata pages only (scan_dek_use). `repair`: a file found damaged is
  // salvaged (fs/salvage.h) once it has been checked.
  Checker(VolumeKeys& keys, IoBackend& io, int root_fd, bool quiet, bool read_blocks = true,
          bool repair = false)
      : keys_(keys), io_(io), root_fd_(root_fd), quiet_(quiet), read_blocks_(read_blocks), repair_(repair) {}

  void dir(int dir_fd, const std::string& plain_path, const std::string& backing_path) {
    report_.dirs++;
    auto nonce = read_dir_nonce(dir_fd);
    if (!nonce.ok()) {
      // An empty directory without a nonce is what a power cut leaves when the directory's entry
      // in its parent was made durable and its own first entry, the nonce, was not (or between
      // "nonce out" and rmdir). Nothing is named under a lost nonce; the mount makes a new one at
      // first use (fs/FORMAT.md, "Names"). Not damage.
      if (nonce.status().code() == Code::kNotFound) {
        auto empty = holds_only_nonce(dir_fd);
        if (empty.ok() && *empty) return;
      }
      return problem(plain_path + "/", nonce.status().to_string());
    }
    int dup_fd = dup(dir_fd);
    DIR* d = fdopendir(dup_fd);
    if (d == nullptr) return problem(plain_path + "/", "cannot list");
    rewinddir(d);  // the duplicate shares the offset a walk before this one left at the end
    std::vector<std::pair<std::string, unsigned char>> entries;
    while (dirent* e = readdir(d)) entries.emplace_back(e->d_name, e->d_type);
    closedir(d);
    for (auto& [backing, type] : entries) {
      if (backing == "." || backing == "..") continue;
      if (plain_path.empty() && backing.rfind("envelopefs.conf", 0) == 0) continue;
      auto name = decrypt_name(keys_, *nonce, dir_fd, backing);
      if (!name.ok()) {
        if (name.status().code() != Code::kNotFound) {
          problem(backing_path + "/" + backing, "name: " + name.status().to_string());
        }
        continue;
      }
      std::string path = plain_path + "/" + *name;
      struct stat st;
      if (fstatat(dir_fd, backing.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
      if (S_ISDIR(st.st_mode)) {
        int fd = openat(dir_fd, backing.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
          problem(path, "cannot open directory");
          continue;
        }
        dir(fd, path, backing_path + "/" + backing);
        close(fd);
      } else if (S_ISREG(st.st_mode)) {
        file(dir_fd, backing, path);
      } else if (S_ISLNK(st.st_mode)) {
        report_.symlinks++;
        char buf[PATH_MAX + 1];
        ssize_t n = readlinkat(dir_fd, backing.c_str(), buf, sizeof buf - 1);
        auto t = n < 0 ? Result<std::string>(Status(Code::kIoError, "readlink"))
                       : load_symlink(keys_, root_fd_, std::string_view(buf, static_cast<size_t>(n)));
        if (!t.ok()) problem(path, "symlink target: " + t.status().to_string());
      }
    }
  }

  void file(int dir_fd, const std::string& backing, const std::string& path) {
    report_.files++;
    const uint64_t before = report_.problems;
    check_file(dir_fd, backing, path);
    if (repair_ && report_.problems > before) salvage(dir_fd, backing, path);
  }

  const FsckReport& report() const { return report_; }

 private:
  void check_file(int dir_fd, const std::string& backing, const std::string& path) {
    int fd = openat(dir_fd, backing.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return problem(path, "cannot open");
    struct stat st;
    fstat(fd, &st);
    if (st.st_size == 0) {  // created and never written (or cut short): an empty file
      close(fd);
      return;
    }
    auto f = CipherFile::open(fd, keys_, io_);
    if (!f.ok()) {
      close(fd);
      return problem(path, "header: " + f.status().to_string());
    }
    if (Status counted = (*f)->count_key_versions(&report_.keys_by_dek, &report_.pages_by_dek); !counted.ok()) {
      problem(path, "metadata: " + counted.to_string());
    }
    const uint32_t bs = keys_.block_size();
    std::vector<uint8_t> buf(bs);
    const uint64_t size = read_blocks_ ? (*f)->size() : 0;
    for (uint64_t off = 0; off < size; off += bs) {
      report_.blocks++;
      auto n = (*f)->read(off, buf);
      const uint64_t block = off / bs;
      if (!n.ok() && n.status().message().find("metadata page") != std::string::npos) {
        // The group's page: every block of the group fails with it, said once for all of them.
        const uint64_t group_end = (Layout::page_of(block) + 1) * kBlocksPerGroup;
        const uint64_t last = std::min(group_end, (size + bs - 1) / bs) - 1;
        problem(path, "blocks " + std::to_string(block) + "-" + std::to_string(last) + ": " +
                          n.status().to_string());
        report_.blocks += last - block;
        off = last * bs;
      } else if (!n.ok()) {
        problem(path, "block " + std::to_string(block) + ": " + n.status().to_string());
      }
      progress();
    }
    f->reset();
    close(fd);
    if (!read_blocks_) progress();
  }

  void salvage(int dir_fd, const std::string& backing, const std::string& path) {
    int fd = openat(dir_fd, backing.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
      std::printf("NOT REPAIRED %s: cannot open it for writing\n", path.c_str());
      return;
    }
    auto r = salvage_file(fd, keys_, io_);
    close(fd);
    if (!r.ok()) {
      std::printf("NOT REPAIRED %s: %s\n", path.c_str(), r.status().to_string().c_str());
      return;
    }
    const uint64_t bs = keys_.block_size();
    if (r->emptied) std::printf("REPAIRED %s: shorter than its header, now an empty file\n", path.c_str());
    auto group = [](uint64_t p) {
      const uint64_t first = p * kBlocksPerGroup;
      return "blocks " + std::to_string(first) + "-" + std::to_string(first + kBlocksPerGroup - 1);
    };
    for (uint64_t p : r->pages_resealed) {
      std::printf("REPAIRED %s: metadata page %lu sealed again from its entries: %s kept where they "
                  "authenticate\n", path.c_str(), static_cast<unsigned long>(p), group(p).c_str());
    }
    for (uint64_t p : r->pages_replaced) {
      std::printf("REPAIRED %s: metadata page %lu was not one: replaced, %s read as zeros\n", path.c_str(),
                  static_cast<unsigned long>(p), group(p).c_str());
    }
    for (uint64_t b : r->blocks_given_up) {
      std::printf("REPAIRED %s: block %lu (bytes %lu-%lu) is a hole now: it reads as zeros\n", path.c_str(),
                  static_cast<unsigned long>(b), static_cast<unsigned long>(b * bs),
                  static_cast<unsigned long>((b + 1) * bs - 1));
    }
    if (r->still_failing) {
      std::printf("NOT REPAIRED %s: %lu blocks still do not read (not an authentication failure)\n",
                  path.c_str(), static_cast<unsigned long>(r->still_failing));
    }
    if (r->changed()) report_.repaired_files++;
  }

  void problem(const std::string& path, const std::string& what) {
    report_.problems++;
    std::printf("FAIL %s: %s\n", path.c_str(), what.c_str());
  }
  void progress() {
    if (quiet_ || (read_blocks_ && report_.blocks % 4096 != 0)) return;
    auto now = std::chrono::steady_clock::now();
    if (now - last_ < std::chrono::seconds(1)) return;
    last_ = now;
    if (read_blocks_) {
      std::fprintf(stderr, "fsck: %lu files, %lu blocks checked, %lu problems\r",
                   static_cast<unsigned long>(report_.files), static_cast<unsigned long>(report_.blocks),
                   static_cast<unsigned long>(report_.problems));
    } else {
      std::fprintf(stderr, "scanning: %lu files, %lu problems\r", static_cast<unsigned long>(report_.files),
                   static_cast<unsigned long>(report_.problems));
    }
  }

  VolumeKeys& keys_;
  IoBackend& io_;
  int root_fd_;
  bool quiet_;
  const bool read_blocks_;
  const bool repair_;
  FsckReport report_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace

FsckReport scan_dek_use(VolumeKeys& keys, int root_fd, bool quiet) {
  auto io = make_posix_backend();
  Checker c(keys, *io, root_fd, quiet, false);
  c.dir(root_fd, "", "");
  return c.report();
}

namespace {

void print_summary(const FsckReport& r, const char* when) {
  std::printf("fsck%s: %lu directories, %lu files, %lu symlinks, %lu blocks checked; %lu problems\n", when,
              static_cast<unsigned long>(r.dirs), static_cast<unsigned long>(r.files),
              static_cast<unsigned long>(r.symlinks), static_cast<unsigned long>(r.blocks),
              static_cast<unsigned long>(r.problems));
}

}  // namespace

int run_fsck(const std::string& cipher_dir, const ProviderOptions& provider, bool quiet, bool repair) {
  std::optional<VolumeLock> lock;  // a repair holds the volume as a mount would
  if (repair) {
    auto locked = lock_volume(cipher_dir, false);
    if (!locked.ok()) {
      std::fprintf(stderr, "envelopefs fsck --repair: %s; nothing was changed\n",
                   locked.status().message().c_str());
      return 2;
    }
    lock.emplace(std::move(locked).value());
  } else if (volume_in_use(cipher_dir)) {
    // Still checked (its keys are what the check needs, not the daemon's), but a file written
    // while the check reads it can look damaged for a moment: said first, not found later.
    std::fprintf(stderr,
                 "envelopefs fsck: %s is mounted read-write: what changes while it is checked may show as "
                 "problems; unmount it for a check to trust\n",
                 cipher_dir.c_str());
  }
  auto volume = open_volume(cipher_dir, provider);
  if (!volume.ok()) {
    AuditRecord a = audit_failure("fsck", cipher_dir, volume.status());
    audit(a);
    std::fprintf(stderr, "envelopefs fsck: cannot open volume: %s\n", volume.status().to_string().c_str());
    return 2;
  }
  audit({"fsck", "ok", to_hex(volume->config.volume_id), cipher_dir, volume->config.root_uri,
         repair ? "keys unwrapped to check and repair" : "keys unwrapped to check"});
  int root = open(cipher_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) {
    std::perror("envelopefs fsck");
    return 2;
  }
  auto io = make_posix_backend();
  Checker c(*volume->keys, *io, root, quiet, true, repair);
  c.dir(root, "", cipher_dir);
  print_summary(c.report(), "");
  FsckReport r = c.report();
  if (r.repaired_files > 0) {
    std::printf("fsck: %lu files repaired; checking again\n", static_cast<unsigned long>(r.repaired_files));
    Checker again(*volume->keys, *io, root, quiet);
    again.dir(root, "", cipher_dir);
    r = again.report();
    print_summary(r, " after repair");
  }
  close(root);
  // Which DEK versions the blocks still need: after `rotate-dek` and a completed re-wrap, only
  // the active one (fs/block_rewrap.h).
  std::string keys;
  for (const auto& [version, n] : r.keys_by_dek) {
    keys += (keys.empty() ? "" : ", ") + std::to_string(n) + " under DEK v" + std::to_string(version);
  }
  std::printf("fsck: block keys: %s (active: v%u)\n", keys.empty() ? "none" : keys.c_str(),
              volume->keys->active_version());
  return r.problems == 0 ? 0 : 1;
}

}  // namespace envelopefs
