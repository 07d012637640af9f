#include "fs/block_rewrap.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

#include "crypto/bytes.h"
#include "fs/log.h"
#include "fs/names.h"

namespace envelopefs {
namespace {

// A backing entry that may be a file with block keys: an encrypted name, or a long name's
// entry (not its `.name` side file). Every other reserved name is envelopefs' own.
bool holds_plaintext_node(std::string_view name) {
  if (!is_reserved_name(name)) return true;
  return name.rfind(kLongNamePrefix, 0) == 0 && !name.ends_with(kLongNameSuffix);
}

}  // namespace

uint32_t rewrapped_version(const std::string& cipher_dir) {
  std::ifstream in(cipher_dir + "/" + kRewrappedRecord);
  unsigned long v = 0;
  if (!(in >> v) || v > UINT32_MAX) return 0;
  return static_cast<uint32_t>(v);
}

BlockRewrap::BlockRewrap(Filesystem& fs, std::string cipher_dir, bool read_only, unsigned pages_per_second)
    : fs_(fs),
      cipher_dir_(std::move(cipher_dir)),
      read_only_(read_only),
      pages_per_second_(pages_per_second) {
  kicked_ = true;  // the first round checks whether a walk is needed
  thread_ = std::thread([this] { run(); });
}

BlockRewrap::~BlockRewrap() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void BlockRewrap::kick() {
  {
    std::lock_guard lock(mu_);
    kicked_ = true;
  }
  wake_.notify_all();
}

bool BlockRewrap::stopping() {
  std::lock_guard lock(mu_);
  return stop_;
}

bool BlockRewrap::go_on(const Tally& t) {
  std::unique_lock lock(mu_);
  if (pages_per_second_ != 0) {
    // The pages read so far are due no sooner than this since the walk began.
    const auto due =
        walk_started_ +
        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(static_cast<double>(t.pages.pages_read) / pages_per_second_));
    wake_.wait_until(lock, due, [&] { return stop_; });
  }
  return !stop_;
}

void BlockRewrap::run() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      wake_.wait(lock, [&] { return stop_ || kicked_; });
      if (stop_) return;
      kicked_ = false;
    }
    if (needed()) walk();
  }
}

bool BlockRewrap::needed() {
  KeyGateScope gate(fs_.gate());
  if (!gate.ok() || fs_.keys().dek_versions() < 2) return false;
  if (!fs_.keys().rewrappable_blocks()) {
    if (!said_not_rewrappable_) {
      said_not_rewrappable_ = true;
      log_info(
          "this volume was made before block keys could be re-wrapped (no rewrappable-blocks "
          "feature): each block keeps the DEK version it was sealed under until it is written "
          "again, so older DEK versions stay needed");
    }
    return false;
  }
  if (rewrapped_version(cipher_dir_) == fs_.keys().active_version()) return false;
  struct statvfs vfs;
  if (read_only_ || (statvfs(cipher_dir_.c_str(), &vfs) == 0 && (vfs.f_flag & ST_RDONLY))) {
    if (!said_read_only_) {
      said_read_only_ = true;
      log_info("block keys are owed a re-wrap under DEK v" + std::to_string(fs_.keys().active_version()) +
               ", but this mount (or its backing filesystem) is read-only: a read-write mount does it");
    }
    return false;
  }
  return true;
}

void BlockRewrap::walk() {
  // Files renamed or linked during a pass may have been passed by; they are visited after it.
  fs_.track_moves(true);
  struct Untrack {
    Filesystem& fs;
    ~Untrack() { fs.track_moves(false); }
  } untrack{fs_};
  constexpr int kMaxPasses = 3;
  int passes = 0;
  for (;;) {
    uint32_t target;
    {
      KeyGateScope gate(fs_.gate());
      if (!gate.ok()) return;
      target = fs_.keys().active_version();
    }
    log_info("re-wrapping every block key under DEK v" + std::to_string(target) +
             " (metadata pages only; data blocks are not touched; " +
             (pages_per_second_ == 0 ? std::string("no rate limit")
                                     : "at most " + std::to_string(pages_per_second_) + " pages a second") +
             ")");
    const auto started = std::chrono::steady_clock::now();
    last_report_ = walk_started_ = started;
    Tally t;
    bool missed = false;
    int root = open(cipher_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    Outcome outcome = Outcome::kDone;
    if (root < 0) {
      log_error("re-wrap: cannot open " + cipher_dir_ + ": " + std::strerror(errno));
      t.failed++;
    } else {
      outcome = walk_dir(root, "", target, t);
      close(root);
      if (outcome == Outcome::kDone) outcome = walk_moved(target, t, &missed);
    }
    auto tally = [&] {
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - started;
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.1f", took.count());
      return std::to_string(t.files) + " files, " + std::to_string(t.pages.pages_written) +
             " metadata pages rewritten in " + secs + " s";
    };
    const std::string counts = tally();
    if (outcome == Outcome::kStopped) {
      log_info("re-wrap stopped at unmount (" + counts + "); the next mount goes on where it left off");
      return;
    }
    if (outcome == Outcome::kRevoked) {
      log_info("re-wrap stopped: keys revoked (" + counts + "); it resumes when they are restored");
      return;
    }
    uint32_t now;
    {
      KeyGateScope gate(fs_.gate());
      if (!gate.ok()) return;
      now = fs_.keys().active_version();
    }
    if (now != target) continue;  // rotated again meanwhile: pages done early are under target
    if (missed) {
      // A moved node the kernel had already forgotten, or too many moves to note: only a new
      // pass finds what was passed by (rewriting nothing it already did).
      if (++passes < kMaxPasses) {
        log_info("re-wrap: files moved during the walk could not all be followed (" + counts +
                 "); walking again");
        continue;
      }
      log_info("re-wrap: files kept moving during " + std::to_string(kMaxPasses) + " walks (" + counts +
               "); the next mount walks again");
      return;
    }
    AuditRecord r{"rewrap-blocks", "ok", to_hex(fs_.keys().volume_id()), cipher_dir_, "", ""};
    if (t.failed != 0) {
      r.outcome = "failed";
      r.detail = std::to_string(t.failed) +
                 " files could not be re-wrapped and still need older DEK versions; " + counts;
      log_error("re-wrap under DEK v" + std::to_string(target) + " incomplete: " + r.detail +
                ". The walk runs again at the next mount or key rotation.");
      audit_from_daemon(r);
      return;
    }
    // Every rewritten page was made durable file by file (Filesystem::rewrap_block_keys), so a
    // power cut cannot leave this record over pages still under an older DEK.
    Status st = replace_file(cipher_dir_, kRewrappedRecord, std::to_string(target) + "\n");
    r.detail = "every block key is under DEK v" + std::to_string(target) + "; " + tally() + " (synced)";
    if (!st.ok()) {
      r.outcome = "failed";
      r.detail += "; " + st.to_string();
    }
    log_info("re-wrap done: " + r.detail);
    audit_from_daemon(r);
    return;
  }
}

BlockRewrap::Outcome BlockRewrap::walk_dir(int dir_fd, const std::string& path, uint32_t target, Tally& t) {
  int dup_fd = dup(dir_fd);
  DIR* d = dup_fd < 0 ? nullptr : fdopendir(dup_fd);
  if (d == nullptr) {
    if (dup_fd >= 0) close(dup_fd);
    log_error("re-wrap: cannot list " + cipher_dir_ + path);
    t.failed++;
    return Outcome::kDone;
  }
  std::vector<std::pair<std::string, unsigned char>> entries;
  while (dirent* e = readdir(d)) {
    if (holds_plaintext_node(e->d_name)) entries.emplace_back(e->d_name, e->d_type);
  }
  closedir(d);
  for (auto& [name, type] : entries) {
    if (stopping()) return Outcome::kStopped;
    const std::string where = path + "/" + name;
    if (type == DT_UNKNOWN) {
      struct stat st;
      if (fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
      type = S_ISDIR(st.st_mode) ? DT_DIR : S_ISREG(st.st_mode) ? DT_REG : DT_LNK;
    }
    if (type == DT_DIR) {
      int fd = openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (fd < 0) {
        if (errno != ENOENT) {
          log_error("re-wrap: cannot open directory " + cipher_dir_ + where);
          t.failed++;
        }
        continue;
      }
      Outcome o = walk_dir(fd, where, target, t);
      close(fd);
      if (o != Outcome::kDone) return o;
    } else if (type == DT_REG) {
      if (rewrap_file(dir_fd, name, cipher_dir_ + where, target, t) == Outcome::kRevoked)
        return Outcome::kRevoked;
    }
  }
  return stopping() ? Outcome::kStopped : Outcome::kDone;
}

BlockRewrap::Outcome BlockRewrap::walk_moved(uint32_t target, Tally& t, bool* missed) {
  // Only a walk through a directory can pass a node by: every node was either reached by the
  // pass just finished or noted as moved during it, and a file is re-wrapped here by its own
  // descriptor. So each round visits what moved during the one before only if that round
  // walked a directory; a tree whose directories never stop moving is left to another pass.
  for (int round = 0; round < 16; ++round) {
    bool overflowed = false;
    const auto moved = fs_.take_moves(&overflowed);
    if (overflowed) *missed = true;
    if (moved.empty() || overflowed) return Outcome::kDone;
    bool walked_a_directory = false;
    for (const auto& [dev, ino] : moved) {
      if (stopping()) return Outcome::kStopped;
      int fd = fs_.reopen_known(dev, ino);
      if (fd == Filesystem::kNoBlockKeys) continue;  // a symlink, a device node...
      struct stat st;
      if (fd < 0 || fstat(fd, &st) != 0) {
        *missed = true;
        if (fd >= 0) close(fd);
        continue;
      }
      Outcome o = Outcome::kDone;
      if (S_ISDIR(st.st_mode)) {
        int dir = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir >= 0) {
          walked_a_directory = true;
          o = walk_dir(dir, "/(a directory moved during the walk)", target, t);
          close(dir);
        } else {
          *missed = true;
        }
      } else if (S_ISREG(st.st_mode)) {
        o = rewrap_file(fd, "", "a file moved during the walk", target, t);
      }
      close(fd);
      if (o != Outcome::kDone) return o;
    }
    if (!walked_a_directory) return Outcome::kDone;
  }
  *missed = true;
  return Outcome::kDone;
}

BlockRewrap::Outcome BlockRewrap::rewrap_file(int dir_fd, const std::string& entry, const std::string& where,
                                              uint32_t target, Tally& t) {
  Status st = fs_.rewrap_block_keys(
      dir_fd, entry, [&] { return go_on(t); }, &t.pages);
  if (st.code() == Code::kKeyUnavailable) return Outcome::kRevoked;
  t.files++;
  if (!st.ok()) {
    t.failed++;
    log_error("re-wrap: " + where + ": " + st.to_string());
  }
  report_progress(target, t);
  return Outcome::kDone;
}

void BlockRewrap::report_progress(uint32_t target, const Tally& t) {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_report_ < std::chrono::seconds(10)) return;
  last_report_ = now;
  log_info("re-wrapping under DEK v" + std::to_string(target) + ": " + std::to_string(t.files) + " files, " +
           std::to_string(t.pages.pages_written) + " metadata pages rewritten so far");
}

}  // namespace envelopefs
