// pread(v)/pwrite(v) backend: all buffered backing I/O (the io_uring backend hands it here),
// and O_DIRECT I/O too where io_uring is not permitted or --no-uring asks.
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "crypto/bytes.h"
#include "crypto/random.h"
#include "fs/aligned_buffer.h"
#include "fs/io_backend.h"

namespace envelopefs {
namespace {

class PosixBackend final : public IoBackend {
 public:
  const char* name() const override { return "pread/pwrite"; }
  // Requests in one batch are independent (the io_uring backend runs them in parallel).
  // Writes go one by one; reads are gathered into spans, each one preadv (see read_spans).
  Status run(std::span<IoRequest> requests) override {
    std::vector<IoRequest*> reads;
    for (IoRequest& r : requests) {
      if (r.write) {
        ENVELOPEFS_RETURN_IF_ERROR(write_all(r));
      } else {
        reads.push_back(&r);
      }
    }
    return read_spans(reads);
  }
  // A metadata page and the data run right behind it in the file (its group's first blocks)
  // go out as one pwritev. The kernel copies a pwritev in offset order, so the page still
  // reaches the file before its data, as the ordering asks; data is only ever described by
  // the page of its own group, so other pages need not precede it. A small file's first write
  // is then one system call instead of two, a sequential write's 1 MiB eight instead of 16.
  Status run_ordered(std::span<IoRequest> first, std::span<IoRequest> then) override {
    std::vector<bool> merged(then.size(), false);
    for (IoRequest& page : first) {
      IoRequest* data = nullptr;
      for (size_t k = 0; k < then.size() && data == nullptr; ++k) {
        if (!merged[k] && one_write(page, then[k])) {
          data = &then[k];
          merged[k] = true;
        }
      }
      ENVELOPEFS_RETURN_IF_ERROR(data ? write_pair(page, *data) : run({&page, 1}));
    }
    for (size_t k = 0; k < then.size(); ++k) {
      if (!merged[k]) ENVELOPEFS_RETURN_IF_ERROR(run({&then[k], 1}));
    }
    return Status::Ok();
  }
  // A growing file's page and the data run right behind it are one pwritev here too, through
  // O_DIRECT as well (both are aligned; the file grows when the whole write completes).
  Status run_in_order(std::span<IoRequest> requests) override {
    for (size_t k = 0; k < requests.size(); ++k) {
      if (k + 1 < requests.size() && one_write(requests[k], requests[k + 1], true)) {
        ENVELOPEFS_RETURN_IF_ERROR(write_pair(requests[k], requests[k + 1]));
        ++k;
      } else {
        ENVELOPEFS_RETURN_IF_ERROR(run({&requests[k], 1}));
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

 private:
  // Longest hole between two reads that one preadv reads through (into a throwaway buffer):
  // a cached metadata page between two groups' data runs, or a few hole blocks. Copying that
  // much from the page cache costs less than a second system call.
  static constexpr size_t kMaxGap = 16384;
  static constexpr size_t kMaxPieces = 64;  // iovecs per preadv, well under IOV_MAX

  // Whether `b` can go in the same pwritev right after `a` (O_DIRECT ones only if `direct_ok`;
  // one descriptor is either O_DIRECT or not, so both are, or neither).
  static bool one_write(const IoRequest& a, const IoRequest& b, bool direct_ok = false) {
    return a.write && b.write && (direct_ok || (!a.direct && !b.direct)) && a.fd == b.fd &&
           b.offset == a.offset + a.len;
  }

  // One write, continued after a short one.
  static Status write_all(IoRequest& r) {
    r.done = 0;
    while (r.done < r.len) {
      const ssize_t n = pwrite(r.fd, r.buf + r.done, r.len - r.done, static_cast<off_t>(r.offset + r.done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::Io(errno, "backing write");
      }
      if (n == 0) return Status::Io(EIO, "backing write made no progress");
      r.done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  // Reads of one file that follow each other with at most kMaxGap bytes between them are one
  // preadv, in offset order: a 1 MiB READ is nine data runs separated by metadata pages (and,
  // the first time, the pages themselves), so one system call instead of up to 18, and one
  // sequential access for the backing file's readahead. O_DIRECT reads are left alone: the
  // throwaway gap buffer would have to meet their alignment, and they go on a ring anyway.
  static Status read_spans(std::vector<IoRequest*>& reads) {
    std::sort(reads.begin(), reads.end(), [](const IoRequest* a, const IoRequest* b) {
      return a->fd != b->fd ? a->fd < b->fd : a->offset < b->offset;
    });
    struct Piece {
      uint8_t* buf;
      size_t len;
      IoRequest* req;  // nullptr: a gap, read into the throwaway buffer
    };
    std::vector<Piece> span;
    for (size_t k = 0; k < reads.size();) {
      IoRequest* head = reads[k++];
      head->done = 0;
      span.assign(1, {head->buf, head->len, head});
      uint64_t end = head->offset + head->len;
      while (!head->direct && k < reads.size() && span.size() + 2 <= kMaxPieces) {
        IoRequest* next = reads[k];
        if (next->fd != head->fd || next->direct || next->offset < end || next->offset - end > kMaxGap) break;
        if (next->offset > end) span.push_back({gap_buffer(), next->offset - end, nullptr});
        next->done = 0;
        span.push_back({next->buf, next->len, next});
        end = next->offset + next->len;
        ++k;
      }
      ENVELOPEFS_RETURN_IF_ERROR(read_span(head->fd, head->offset, span));
    }
    return Status::Ok();
  }

  // One span, continued after a short read until it is complete or the file ends.
  template <typename Piece>
  static Status read_span(int fd, uint64_t offset, const std::vector<Piece>& span) {
    size_t first = 0, into_first = 0;  // where the next byte goes
    while (first < span.size()) {
      iovec iov[kMaxPieces];
      int n_iov = 0;
      for (size_t i = first; i < span.size(); ++i) {
        const size_t skip = i == first ? into_first : 0;
        iov[n_iov++] = {span[i].buf + skip, span[i].len - skip};
      }
      const ssize_t n = preadv(fd, iov, n_iov, static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::Io(errno, "backing read");
      }
      if (n == 0) break;  // end of file: the requests past it stay short
      offset += static_cast<uint64_t>(n);
      for (size_t left = static_cast<size_t>(n); left > 0;) {
        const Piece& p = span[first];
        const size_t take = std::min(left, p.len - into_first);
        if (p.req != nullptr) p.req->done += take;
        left -= take;
        into_first += take;
        if (into_first == p.len) {
          ++first;
          into_first = 0;
        }
      }
    }
    return Status::Ok();
  }

  static uint8_t* gap_buffer() {
    thread_local std::unique_ptr<uint8_t[]> buf(new uint8_t[kMaxGap]);
    return buf.get();
  }

  // `a` then `b`, contiguous in the file, in one pwritev; a short write is continued.
  static Status write_pair(IoRequest& a, IoRequest& b) {
    a.done = b.done = 0;
    while (a.done + b.done < a.len + b.len) {
      iovec iov[2];
      int n_iov = 0;
      if (a.done < a.len) iov[n_iov++] = {a.buf + a.done, a.len - a.done};
      iov[n_iov++] = {b.buf + b.done, b.len - b.done};
      const ssize_t n = pwritev(a.fd, iov, n_iov, static_cast<off_t>(a.offset + a.done + b.done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::Io(errno, "backing write");
      }
      if (n == 0) return Status::Io(EIO, "backing write made no progress");
      const size_t to_a = std::min(static_cast<size_t>(n), a.len - a.done);
      a.done += to_a;
      b.done += static_cast<size_t>(n) - to_a;
    }
    return Status::Ok();
  }
};

}  // namespace

std::unique_ptr<IoBackend> make_posix_backend() { return std::make_unique<PosixBackend>(); }

Status probe_direct_io(int dir_fd) {
  int fd = openat(dir_fd, ".", O_TMPFILE | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == ENOENT)) {
    // No O_TMPFILE here: a name of our own, gone before anything is written to it. (A crash
    // in between leaves an empty file whose '.' keeps it out of listings.)
    uint8_t r[8];
    if (!random_fill({r, sizeof r}).ok()) return Status::Io(EIO, "probe name");
    const std::string name = "envelopefs.probe." + to_hex({r, sizeof r});
    fd = openat(dir_fd, name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
    if (fd >= 0) unlinkat(dir_fd, name.c_str(), 0);
  }
  if (fd < 0) return Status::Io(errno, "O_DIRECT open");
  AlignedBuffer out(4096), in(4096);
  std::memset(out.data(), 0x5a, 4096);
  Status st;
  if (pwrite(fd, out.data(), 4096, 0) != 4096) {
    st = Status::Io(errno, "O_DIRECT write of 4 KiB");
  } else if (pread(fd, in.data(), 4096, 0) != 4096) {
    st = Status::Io(errno, "O_DIRECT read of 4 KiB");
  } else if (std::memcmp(in.data(), out.data(), 4096) != 0) {
    st = Status::Io(EIO, "O_DIRECT read gave back other bytes than were written");
  }
  close(fd);
  return st;
}

}  // namespace envelopefs
