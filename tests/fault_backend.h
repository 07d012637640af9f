// A fault-injecting IoBackend for tests: passes requests to a real backend, and on command
// imitates a crash between the metadata and the data of a write (the "then" half of an ordered
// batch is lost), or fails writes with an errno such as ENOSPC: the data half of a batch, or
// whichever group of writes comes after the first N (kFailAfterWrites, see fail_after).
// Writes that lengthen a file (run_in_order) count as the data half.
// Lives in tests/ only.
#pragma once

#include <cerrno>

#include "fs/io_backend.h"

namespace envelopefs::test {

class FaultBackend final : public IoBackend {
 public:
  enum class Mode { kPass, kCrashAfterMetadata, kFailData, kFailReserve, kFailAll, kFailAfterWrites };
  explicit FaultBackend(IoBackend& inner) : inner_(inner) {}
  void set(Mode m, int err = ENOSPC) {
    mode_ = m;
    err_ = err;
  }
  // kFailAfterWrites: `groups` groups of writes (one run() call, or one half of run_ordered)
  // complete; the next lands the first half of its first request's 4 KiB pages and fails
  // with `err`, and so does every one after it, as a full disk or a daemon killed at that
  // point would leave them.
  void fail_after(int groups, int err = ENOSPC) {
    set(Mode::kFailAfterWrites, err);
    writes_left_ = groups;
    killed_ = cut_ = false;
  }
  // The same, as a daemon killed there leaves the file: truncates, reserves and syncs count
  // as steps of their own, and after the cut nothing more reaches the file, not even the
  // truncate with which a failed growth takes itself back.
  void kill_after(int groups) {
    fail_after(groups, EIO);
    killed_ = true;
  }
  const char* name() const override { return "fault"; }
  Status run(std::span<IoRequest> r) override {
    if (mode_ == Mode::kFailAll) return Status::Io(err_, "injected");
    if (mode_ == Mode::kFailAfterWrites) return counted(r);
    return inner_.run(r);
  }
  Status run_ordered(std::span<IoRequest> first, std::span<IoRequest> then) override {
    if (mode_ == Mode::kFailAll) return Status::Io(err_, "injected");
    if (mode_ == Mode::kFailAfterWrites) {
      ENVELOPEFS_RETURN_IF_ERROR(counted(first));
      return counted(then);
    }
    ENVELOPEFS_RETURN_IF_ERROR(inner_.run(first));
    if (mode_ == Mode::kCrashAfterMetadata && !then.empty()) return Status::Io(EIO, "injected crash");
    if (mode_ == Mode::kFailData && !then.empty()) return half_lands(then[0]);
    return inner_.run(then);
  }
  // Writes that lengthen a file, one after the other: each is a group of its own for
  // kFailAfterWrites, and they are data (lost or cut short) for the other modes.
  Status run_in_order(std::span<IoRequest> r) override {
    if (r.empty() || mode_ == Mode::kPass || mode_ == Mode::kFailReserve) return inner_.run_in_order(r);
    if (mode_ == Mode::kFailAfterWrites) {
      for (IoRequest& q : r) ENVELOPEFS_RETURN_IF_ERROR(counted({&q, 1}));
      return Status::Ok();
    }
    if (mode_ == Mode::kFailData) return half_lands(r[0]);
    return Status::Io(mode_ == Mode::kCrashAfterMetadata ? EIO : err_, "injected");
  }
  Status sync(int fd, bool d) override {
    if (!step()) return Status::Io(err_, "injected");
    return inner_.sync(fd, d);
  }
  Status truncate(int fd, uint64_t s) override {
    if (!step()) return Status::Io(err_, "injected");
    return inner_.truncate(fd, s);
  }
  Status punch_hole(int fd, uint64_t o, uint64_t l) override {
    if (!step()) return Status::Io(err_, "injected");
    return inner_.punch_hole(fd, o, l);
  }
  Status reserve(int fd, uint64_t o, uint64_t l) override {
    if (mode_ == Mode::kFailReserve || mode_ == Mode::kFailAll || !step()) {
      return Status::Io(err_, "injected");
    }
    return inner_.reserve(fd, o, l);
  }

 private:
  Status counted(std::span<IoRequest> r) {
    bool writes = false;
    for (const IoRequest& q : r) writes |= q.write;
    if (!writes) return inner_.run(r);
    if (writes_left_ > 0) {
      --writes_left_;
      return inner_.run(r);
    }
    if (cut_) return Status::Io(err_, "injected");
    cut_ = true;
    IoRequest half = r[0];
    half.len = half.len / 2 / 4096 * 4096;  // whole blocks: a 4 KiB page is copied whole
    if (half.len > 0) (void)inner_.run({&half, 1});
    return Status::Io(err_, "injected");
  }
  // kFailData: half of the first data request lands, as a device that fills up mid-request
  // would leave it, and the rest fails.
  Status half_lands(IoRequest half) {
    half.len /= 2;
    (void)inner_.run({&half, 1});
    return Status::Io(err_, "injected");
  }
  // Whether a change other than a write may reach the file (kill_after counts it as a step).
  bool step() {
    if (mode_ != Mode::kFailAfterWrites || !killed_) return true;
    if (cut_ || writes_left_ == 0) {
      cut_ = true;
      return false;
    }
    --writes_left_;
    return true;
  }

  IoBackend& inner_;
  Mode mode_ = Mode::kPass;
  int err_ = ENOSPC;
  int writes_left_ = 0;
  bool killed_ = false;  // kill_after: nothing at all reaches the file after the cut
  bool cut_ = false;     // the write that was cut short has happened
};

}  // namespace envelopefs::test
