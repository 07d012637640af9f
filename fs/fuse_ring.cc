#include "fs/fuse_ring.h"

#include <liburing.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "fs/fuse_channel.h"
#include "fs/log.h"

namespace envelopefs {
namespace {

// The FUSE-over-io_uring ABI (include/uapi/linux/fuse.h, protocol 7.42). Debian 12's kernel
// headers predate it, so the wire structures are spelled out here.
constexpr uint32_t kCmdRegister = 1;
constexpr uint32_t kCmdCommitAndFetch = 2;
constexpr size_t kInOutHeaderSize = 128;
constexpr size_t kOpInSize = 128;

struct RingEntInOut {
  uint64_t flags;
  uint64_t commit_id;  // request -> daemon: the request's unique id, echoed in the commit
  uint32_t payload_sz;  // both ways: bytes in the payload buffer
  uint32_t padding;
  uint64_t reserved;
};

// iov[0] of an entry: the fuse_in_header (request) or fuse_out_header (reply), the per-op
// struct (request only), and the in/out sizes.
struct RingHeaders {
  uint8_t in_out[kInOutHeaderSize];
  uint8_t op_in[kOpInSize];
  RingEntInOut ent;
};
static_assert(sizeof(RingHeaders) == 288);

// The command area of a 128-byte SQE.
struct RingCmd {
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};

// The payload buffer starts one page into the entry's area: the request header and per-op
// struct are copied right in front of it, so libfuse sees one contiguous request without
// the payload (up to 1 MiB of WRITE data) being moved; and it stays page-aligned for a READ
// decrypted in place.
constexpr size_t kFront = 4096;

// The request this thread is serving through the ring.
struct Current {
  uint64_t unique;
  RingHeaders* headers;
  uint8_t* payload;
  size_t capacity;
  bool replied;
};
thread_local Current* t_current = nullptr;

unsigned possible_cpus() {
  // "0-1", "0-3,8-11": the kernel makes one queue per possible CPU (num_possible_cpus), and
  // the ring is used only once every queue has an entry.
  std::ifstream f("/sys/devices/system/cpu/possible");
  std::string s;
  if (!(f >> s) || s.empty()) return 0;
  size_t cut = s.find_last_of(",-");
  std::string last = cut == std::string::npos ? s : s.substr(cut + 1);
  char* end = nullptr;
  unsigned long n = std::strtoul(last.c_str(), &end, 10);
  return (end == last.c_str() || n > 4095) ? 0 : static_cast<unsigned>(n + 1);
}

// Queues one FUSE command on the thread's ring (which holds at most one in flight, so an SQE
// is always free) and submits it.
int submit_cmd(io_uring* ring, int fd, uint32_t op, unsigned qid, uint64_t commit_id, iovec* iov) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  if (sqe == nullptr) return -EBUSY;
  std::memset(static_cast<void*>(sqe), 0, 128);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd;
  sqe->cmd_op = op;
  sqe->addr = reinterpret_cast<uintptr_t>(iov);
  sqe->len = iov == nullptr ? 0 : 2;
  RingCmd cmd{};
  cmd.qid = static_cast<uint16_t>(qid);
  cmd.commit_id = commit_id;
  std::memcpy(sqe->cmd, &cmd, sizeof cmd);
  return io_uring_submit(ring);
}

// Copies the gathered reply: its first bytes are the fuse_out_header, the rest the payload.
// A READ built in place (iov base == payload) is not copied.
bool copy_reply(Current& c, const iovec* iov, int count, size_t* total_out) {
  size_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  *total_out = total;
  if (total < sizeof(fuse_out_header) || total - sizeof(fuse_out_header) > c.capacity) return false;
  size_t at = 0;
  for (int i = 0; i < count; ++i) {
    const auto* src = static_cast<const uint8_t*>(iov[i].iov_base);
    size_t len = iov[i].iov_len;
    if (at < sizeof(fuse_out_header)) {
      size_t h = std::min(len, sizeof(fuse_out_header) - at);
      std::memcpy(c.headers->in_out + at, src, h);
      at += h, src += h, len -= h;
    }
    if (len == 0) continue;
    uint8_t* dst = c.payload + (at - sizeof(fuse_out_header));
    if (dst != src) std::memmove(dst, src, len);
    at += len;
  }
  RingEntInOut ent{};
  ent.payload_sz = static_cast<uint32_t>(total - sizeof(fuse_out_header));
  std::memcpy(&c.headers->ent, &ent, sizeof ent);
  return true;
}

void reply_error(Current& c, int error) {
  fuse_out_header out{};
  out.len = sizeof out;
  out.error = -error;
  out.unique = c.unique;
  std::memcpy(c.headers->in_out, &out, sizeof out);
  RingEntInOut ent{};
  std::memcpy(&c.headers->ent, &ent, sizeof ent);
  c.replied = true;
}

}  // namespace

struct FuseRing::Worker {
  io_uring ring{};
  bool ring_ok = false;
  unsigned qid = 0;
  RingHeaders headers{};
  uint8_t* area = nullptr;
  size_t area_len = 0;
  iovec iov[2]{};
  std::thread thread;
  std::atomic<uint64_t> served{0};
  std::atomic<bool> done{false};

  ~Worker() {
    if (ring_ok) io_uring_queue_exit(&ring);
    if (area != nullptr) munmap(area, area_len);
  }
  uint8_t* payload() const { return area + kFront; }
  size_t capacity() const { return area_len - kFront; }
};

bool kernel_allows_fuse_uring(bool* exists) {
  std::ifstream f("/sys/module/fuse/parameters/enable_uring");
  *exists = f.good();
  std::string v;
  return *exists && (f >> v) && (v == "Y" || v == "1");
}

bool allow_fuse_uring(std::string* why) {
  std::ofstream f("/sys/module/fuse/parameters/enable_uring");
  if (!(f << "Y" << std::flush)) {
    *why = std::string("cannot write /sys/module/fuse/parameters/enable_uring: ") + std::strerror(errno);
    return false;
  }
  return true;
}

std::unique_ptr<FuseRing> FuseRing::create(fuse_session* se, unsigned threads, std::string* why) {
  std::unique_ptr<FuseRing> r(new FuseRing);
  r->se_ = se;
  r->dev_fd_ = fuse_session_fd(se);
  r->queues_ = possible_cpus();
  if (r->queues_ == 0) {
    *why = "cannot read /sys/devices/system/cpu/possible";
    return nullptr;
  }
  // At least two per queue: one thread in a backing fsync must not hold up every other
  // request from its CPU.
  r->per_queue_ = std::max(2u, (threads + r->queues_ - 1) / r->queues_);
  r->workers_ = std::make_unique<Worker[]>(r->worker_count());
  for (size_t i = 0; i < r->worker_count(); ++i) {
    Worker& w = r->workers_[i];
    w.qid = static_cast<unsigned>(i / r->per_queue_);
    // One entry in flight per thread: the ring needs room for its command only.
    int rc = io_uring_queue_init(4, &w.ring, IORING_SETUP_SQE128);
    if (rc < 0) {
      *why = std::string("io_uring with 128-byte entries: ") + std::strerror(-rc);
      return nullptr;
    }
    w.ring_ok = true;
    // 1 MiB is what op_init asks for (max_write); start() checks the size INIT settled on.
    w.area_len = kFront + (size_t{1} << 20);
    void* a = mmap(nullptr, w.area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) {
      *why = std::string("ring buffers: ") + std::strerror(errno);
      return nullptr;
    }
    w.area = static_cast<uint8_t*>(a);
    w.iov[0] = {&w.headers, sizeof(RingHeaders)};
    w.iov[1] = {w.payload(), w.capacity()};
  }
  return r;
}

FuseRing::~FuseRing() { stop(); }

void FuseRing::start(bool accepted, size_t payload_size) {
  if (!accepted || started_) return;
  started_ = true;
  const size_t n = worker_count();
  if (payload_size > workers_[0].capacity()) {
    // The kernel would refuse these buffers anyway; an entry it refuses turns io_uring off
    // for the connection, so requests keep flowing through /dev/fuse.
    log_error("FUSE over io_uring: the kernel wants " + std::to_string(payload_size) +
              "-byte payloads; staying on /dev/fuse");
    (void)submit_cmd(&workers_[0].ring, dev_fd_, kCmdRegister, 0, 0, nullptr);
    for (size_t i = 0; i < n; ++i) workers_[i].done = true;
    return;
  }
  used_ = true;
  for (size_t i = 0; i < n; ++i) {
    Worker* w = &workers_[i];
    w->thread = std::thread([this, w] { run(w); });
  }
  log_info("FUSE transport: io_uring, " + std::to_string(queues_) + " queues x " + std::to_string(per_queue_) +
           " threads");
}

void FuseRing::run(Worker* w) {
  // Pinned to the queue's CPU: the kernel queues a request on the CPU of the caller, who
  // sleeps until the answer, so serving it there needs no cross-CPU wake-up. Best effort (a
  // CPU outside this process's cpuset simply issues no requests).
  cpu_set_t own;
  CPU_ZERO(&own);
  CPU_SET(w->qid, &own);
  (void)pthread_setaffinity_np(pthread_self(), sizeof own, &own);

  int rc = submit_cmd(&w->ring, dev_fd_, kCmdRegister, w->qid, 0, w->iov);
  // A queue whose every entry is gone would leave its CPU's callers waiting for ever, so an
  // entry lost to an unexpected error is registered again (a bounded number of times).
  constexpr int kMaxReregistrations = 16;
  int reregistered = 0;
  while (rc >= 0) {
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(&w->ring, &cqe);
    if (rc == -EINTR) {
      rc = 0;
      continue;
    }
    if (rc < 0) break;
    const int res = cqe->res;
    io_uring_cqe_seen(&w->ring, cqe);
    if (res < 0) {
      // ENOTCONN/ECANCELED: the mount is going away.
      if (res == -ENOTCONN || res == -ECANCELED) break;
      log_error(std::string("FUSE over io_uring: queue ") + std::to_string(w->qid) + ": " + std::strerror(-res) +
                (reregistered < kMaxReregistrations ? "; registering the entry again" : "; giving up this entry"));
      if (reregistered++ >= kMaxReregistrations) break;
      rc = submit_cmd(&w->ring, dev_fd_, kCmdRegister, w->qid, 0, w->iov);
      continue;
    }

    fuse_in_header in;
    std::memcpy(&in, w->headers.in_out, sizeof in);
    RingEntInOut ent;
    std::memcpy(&ent, &w->headers.ent, sizeof ent);
    Current cur{in.unique, &w->headers, w->payload(), w->capacity(), false};
    // The kernel puts the per-op struct in op_in and everything after it in the payload;
    // in.len counts all of it, so the struct's size is what is left.
    const size_t body = in.len >= sizeof in ? in.len - sizeof in : 0;
    if (in.len < sizeof in || ent.payload_sz > body || body - ent.payload_sz > kOpInSize ||
        ent.payload_sz > w->capacity()) {
      reply_error(cur, EIO);
    } else {
      const size_t op_size = body - ent.payload_sz;
      uint8_t* start = w->payload() - op_size - sizeof in;
      std::memcpy(start, &in, sizeof in);
      std::memcpy(start + sizeof in, w->headers.op_in, op_size);
      note_request(start, in.len);
      fuse_buf buf{};
      buf.mem = start;
      buf.size = in.len;
      t_current = &cur;
      fuse_session_process_buf(se_, &buf);
      t_current = nullptr;
      if (!cur.replied) reply_error(cur, ENOSYS);
    }
    w->served.fetch_add(1, std::memory_order_relaxed);
    rc = submit_cmd(&w->ring, dev_fd_, kCmdCommitAndFetch, w->qid, ent.commit_id, nullptr);
  }
  w->done = true;
}

void FuseRing::stop() {
  if (!started_) return;
  started_ = false;
  const size_t n = worker_count();
  // Unmounting ended every entry's command with ENOTCONN. A lazily unmounted, still busy
  // mount keeps its connection: then the threads are left to the process exit.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (size_t i = 0; i < n; ++i) {
    while (!workers_[i].done && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  bool all = true;
  for (size_t i = 0; i < n; ++i) all = all && workers_[i].done;
  for (size_t i = 0; i < n; ++i) {
    if (!workers_[i].thread.joinable()) continue;
    if (all) workers_[i].thread.join();
    else workers_[i].thread.detach();
  }
  if (!all) (void)workers_.release();  // still in use by detached threads
}

uint64_t FuseRing::served() const {
  uint64_t s = 0;
  if (!workers_) return 0;
  for (size_t i = 0; i < worker_count(); ++i) s += workers_[i].served.load(std::memory_order_relaxed);
  return s;
}

bool ring_take_reply(uint64_t unique, const iovec* iov, int count, ssize_t* result) {
  Current* c = t_current;
  if (c == nullptr || c->replied || c->unique != unique) return false;
  size_t total = 0;
  if (!copy_reply(*c, iov, count, &total)) {
    reply_error(*c, EIO);
    *result = -1;
    errno = EINVAL;
    return true;
  }
  c->replied = true;
  *result = static_cast<ssize_t>(total);
  return true;
}

uint8_t* ring_reply_buffer(size_t size) {
  Current* c = t_current;
  return (c != nullptr && !c->replied && size <= c->capacity) ? c->payload : nullptr;
}

}  // namespace envelopefs
