// The seam between the block format and the backing store (like LevelDB's Env): everything
// that touches a backing file's bytes goes through an IoBackend. Two implementations here:
// pread(v)/pwrite(v) in the calling thread, and io_uring, which puts O_DIRECT requests on a
// ring and does buffered ones as the first does (uring_backend.cc says why); tests add
// fault-injecting ones.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "crypto/status.h"

namespace envelopefs {

struct IoRequest {
  int fd = -1;
  uint8_t* buf = nullptr;
  size_t len = 0;
  uint64_t offset = 0;
  bool write = false;
  size_t done = 0;  // out: bytes transferred (a read stops early at end of file)
  bool direct = false;  // fd is an O_DIRECT descriptor (set by CipherFile::route)
};

class IoBackend {
 public:
  virtual ~IoBackend() = default;
  virtual const char* name() const = 0;
  // Runs every request to completion; short transfers are continued, errors returned.
  virtual Status run(std::span<IoRequest> requests) = 0;
  // Every request in `first` completes before any request in `then` starts: metadata pages
  // reach the file before the data they describe, so a crash leaves old or new, never neither.
  // A `then` request that starts where a `first` one ends may go in the same write after it
  // (one pwritev is copied in offset order), which keeps that promise.
  virtual Status run_ordered(std::span<IoRequest> first, std::span<IoRequest> then) {
    ENVELOPEFS_RETURN_IF_ERROR(run(first));
    return run(then);
  }
  // Each request completes before the next one starts, in the order given. Writes that make
  // a backing file longer go this way, lowest offset first: the file's length is what says
  // how long its last blocks are, so it must never reach past a block whose data has not
  // landed (fs/FORMAT.md, "Growing, shrinking, holes"). A request that starts where the one
  // before it ends may go in the same write (one pwritev is copied in offset order).
  virtual Status run_in_order(std::span<IoRequest> requests) {
    for (IoRequest& r : requests) ENVELOPEFS_RETURN_IF_ERROR(run({&r, 1}));
    return Status::Ok();
  }
  virtual Status sync(int fd, bool data_only) = 0;
  virtual Status truncate(int fd, uint64_t size) = 0;
  virtual Status punch_hole(int fd, uint64_t offset, uint64_t len) = 0;
  // Reserves space for [offset, offset+len) without changing the file size, so a growing
  // write reports ENOSPC before it has changed anything. A backing filesystem without
  // fallocate is not an error.
  virtual Status reserve(int fd, uint64_t offset, uint64_t len) = 0;
};

std::unique_ptr<IoBackend> make_posix_backend();
// Whether the filesystem holding directory `dir_fd` does O_DIRECT I/O: a 4 KiB aligned write
// and read back of a file that has no name (O_TMPFILE, or one unlinked as soon as it is
// made). Some accept an O_DIRECT open and then refuse every such transfer with EINVAL (a
// FUSE filesystem without direct I/O, for one); a mount would then fail every write it sends
// there. The error says what failed.
Status probe_direct_io(int dir_fd);
// nullptr (and `why` filled in) where io_uring is not available or not permitted.
std::unique_ptr<IoBackend> make_uring_backend(std::string* why);
// io_uring when `prefer_uring` and available, else pread/pwrite with one log line on stderr.
std::unique_ptr<IoBackend> make_io_backend(bool prefer_uring);

}  // namespace envelopefs
