// pread/pwrite backend: the fallback where io_uring is not permitted, and the reference the
// io_uring backend is tested against.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "fs/io_backend.h"

namespace envelopefs {
namespace {

class PosixBackend final : public IoBackend {
 public:
  const char* name() const override { return "pread/pwrite"; }
  Status run(std::span<IoRequest> requests) override {
    for (IoRequest& r : requests) {
      r.done = 0;
      while (r.done < r.len) {
        ssize_t n = r.write ? pwrite(r.fd, r.buf + r.done, r.len - r.done, static_cast<off_t>(r.offset + r.done))
                            : pread(r.fd, r.buf + r.done, r.len - r.done, static_cast<off_t>(r.offset + r.done));
        if (n < 0) {
          if (errno == EINTR) continue;
          return Status::Io(errno, r.write ? "backing write" : "backing read");
        }
        if (n == 0) {
          if (r.write) return Status::Io(EIO, "backing write made no progress");
          break;  // end of file
        }
        r.done += static_cast<size_t>(n);
      }
    }
    return Status::Ok();
  }
  Status sync(int fd, bool data_only) override {
    if ((data_only ? fdatasync(fd) : fsync(fd)) != 0) return Status::Io(errno, "backing fsync");
    return Status::Ok();
  }
  Status truncate(int fd, uint64_t size) override {
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) return Status::Io(errno, "backing truncate");
    return Status::Ok();
  }
  Status punch_hole(int fd, uint64_t offset, uint64_t len) override {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) != 0 && errno != EOPNOTSUPP) {
      return Status::Io(errno, "backing punch hole");
    }
    return Status::Ok();
  }
  Status reserve(int fd, uint64_t offset, uint64_t len) override {
    if (fallocate(fd, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(len)) != 0 &&
        errno != EOPNOTSUPP && errno != ENOSYS) {
      return Status::Io(errno, "backing reserve");
    }
    return Status::Ok();
  }
};

}  // namespace

std::unique_ptr<IoBackend> make_posix_backend() { return std::make_unique<PosixBackend>(); }

}  // namespace envelopefs
