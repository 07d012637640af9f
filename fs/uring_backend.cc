// io_uring backend: each thread gets its own ring (FUSE worker threads never share one) and a
// batch of requests (the data runs of a multi-block read or write) is one submission.
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "fs/io_backend.h"

namespace envelopefs {
namespace {

constexpr unsigned kRingEntries = 128;

struct ThreadRing {
  io_uring ring{};
  int init_error = -1;  // 0 once initialized
  ThreadRing() { init_error = io_uring_queue_init(kRingEntries, &ring, 0); }
  ~ThreadRing() {
    if (init_error == 0) io_uring_queue_exit(&ring);
  }
};

class UringBackend final : public IoBackend {
 public:
  const char* name() const override { return "io_uring"; }

  // What goes through the ring: O_DIRECT reads and writes, real asynchronous disk I/O, so a
  // batch (the data runs of a multi-block request) is one io_uring_enter and its requests
  // run in parallel. Buffered I/O is done here, in the calling thread:
  // - writes with pwrite: ext4 has no non-blocking buffered write, so io_uring would hand
  //   each one to an io-wq worker thread (measured: 36% of the daemon's CPU on a sequential
  //   write in those workers, plus a context switch per request);
  // - reads as one preadv per contiguous span (posix_backend.cc): with the nine data runs of
  //   a 1 MiB READ in parallel on the ring, a file not yet in the page cache read at 653 to
  //   1,264 MiB/s, against 2,039 to 2,115 as one preadv per span (fio 1 MiB sequential read
  //   of 512 MiB after drop_caches, one script alternating the two four times).
  // A single request gains nothing from a ring either.
  Status run(std::span<IoRequest> requests) override {
    auto ring_or_posix = [&](std::span<IoRequest> part) {
      return part.size() <= 1 ? posix_->run(part) : submit(part);
    };
    const size_t ring_count = static_cast<size_t>(std::count_if(requests.begin(), requests.end(), on_ring));
    if (ring_count == requests.size()) return ring_or_posix(requests);
    if (ring_count == 0) return posix_->run(requests);
    std::vector<IoRequest> ring_part, inline_part;
    for (const IoRequest& q : requests) (on_ring(q) ? ring_part : inline_part).push_back(q);
    ENVELOPEFS_RETURN_IF_ERROR(posix_->run(inline_part));
    ENVELOPEFS_RETURN_IF_ERROR(ring_or_posix(ring_part));
    size_t r = 0, i = 0;
    for (IoRequest& q : requests) q.done = (on_ring(q) ? ring_part[r++] : inline_part[i++]).done;
    return Status::Ok();
  }
  // Two submissions rather than one with IOSQE_IO_DRAIN: a drained request is always punted
  // to an io-wq worker, which cost more (measured: cp -r 2x slower) than the extra round trip.
  Status run_ordered(std::span<IoRequest> first, std::span<IoRequest> then) override {
    if (std::none_of(first.begin(), first.end(), on_ring) && std::none_of(then.begin(), then.end(), on_ring)) {
      return posix_->run_ordered(first, then);  // pwrite(v)s in this thread, as run() would
    }
    ENVELOPEFS_RETURN_IF_ERROR(run(first));
    return run(then);
  }
  // One request at a time (in parallel a later write could lengthen the file first), so
  // pwrite(v)s in this thread, O_DIRECT ones too.
  Status run_in_order(std::span<IoRequest> requests) override { return posix_->run_in_order(requests); }

  Status sync(int fd, bool data_only) override {
    if ((data_only ? fdatasync(fd) : fsync(fd)) != 0) return Status::Io(errno, "backing fsync");
    return Status::Ok();
  }
  Status truncate(int fd, uint64_t size) override { return posix_->truncate(fd, size); }
  Status punch_hole(int fd, uint64_t offset, uint64_t len) override {
    return posix_->punch_hole(fd, offset, len);
  }
  Status reserve(int fd, uint64_t offset, uint64_t len) override {
    return posix_->reserve(fd, offset, len);
  }

 private:
  static io_uring* ring() {
    thread_local ThreadRing t;
    return t.init_error == 0 ? &t.ring : nullptr;
  }

  // One batch: all of `reqs` in one io_uring_enter, then their completions.
  Status submit(std::span<IoRequest> reqs) {
    if (reqs.empty()) return Status::Ok();
    io_uring* r = ring();
    if (r == nullptr || reqs.size() > kRingEntries) return posix_->run(reqs);
    for (IoRequest& q : reqs) {
      q.done = 0;
      io_uring_sqe* sqe = io_uring_get_sqe(r);
      if (q.write) io_uring_prep_write(sqe, q.fd, q.buf, static_cast<unsigned>(q.len), q.offset);
      else io_uring_prep_read(sqe, q.fd, q.buf, static_cast<unsigned>(q.len), q.offset);
      io_uring_sqe_set_data(sqe, &q);
    }
    int rc = io_uring_submit_and_wait(r, static_cast<unsigned>(reqs.size()));
    if (rc < 0) return Status::Io(-rc, "io_uring submit");
    Status first_error;
    for (size_t seen = 0; seen < reqs.size(); ++seen) {
      io_uring_cqe* cqe = nullptr;
      rc = io_uring_wait_cqe(r, &cqe);
      if (rc < 0) return Status::Io(-rc, "io_uring wait");
      auto* q = static_cast<IoRequest*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(r, cqe);
      if (res < 0) {
        if (first_error.ok()) first_error = Status::Io(-res, q->write ? "backing write" : "backing read");
        continue;
      }
      q->done = static_cast<size_t>(res);
    }
    if (!first_error.ok()) return first_error;
    // Finish short transfers synchronously (rare: signals, end of file for reads).
    for (IoRequest& q : reqs) {
      if (q.done == q.len || (!q.write && q.done == 0)) continue;
      IoRequest rest{q.fd, q.buf + q.done, q.len - q.done, q.offset + q.done, q.write, 0};
      ENVELOPEFS_RETURN_IF_ERROR(posix_->run({&rest, 1}));
      q.done += rest.done;
    }
    return Status::Ok();
  }

  // O_DIRECT requests; buffered ones are pread(v)s and pwrite(v)s in the calling thread.
  static bool on_ring(const IoRequest& q) { return q.direct; }

  std::unique_ptr<IoBackend> posix_ = make_posix_backend();
};

}  // namespace

std::unique_ptr<IoBackend> make_uring_backend(std::string* why) {
  io_uring probe;
  int rc = io_uring_queue_init(4, &probe, 0);
  if (rc < 0) {
    if (why) *why = std::strerror(-rc);
    return nullptr;
  }
  io_uring_queue_exit(&probe);
  return std::make_unique<UringBackend>();
}

std::unique_ptr<IoBackend> make_io_backend(bool prefer_uring) {
  if (prefer_uring) {
    std::string why;
    if (auto b = make_uring_backend(&why)) return b;
    std::fprintf(stderr, "envelopefs: io_uring not available (%s); using pread/pwrite\n", why.c_str());
  }
  return make_posix_backend();
}

}  // namespace envelopefs
