// FUSE over io_uring (Linux 6.14+): the kernel hands each request to a ring entry of the queue
// of the CPU that issued it, and the daemon answers and fetches the next request with one
// io_uring command, instead of a read() and a writev() on /dev/fuse per request.
//
// What it buys, and costs (2-core VM, bench/README.md): every queue's threads are pinned to
// its CPU, so a caller that sleeps until the answer is served on the CPU it sleeps on, with no
// cross-CPU wake-up (an inter-processor interrupt, a VM exit): rm -rf of a source tree takes
// half the time of /dev/fuse, cp -r 4-13% less. But all requests of one caller land on one
// CPU, so bulk data (readahead, 16 requests in flight, 4 KiB random reads) loses the second
// core: seq read -28 to -33%, random read -12 to -33%, randrw at queue depth 16 -35 to -39%.
// Hence opt-in (--fuse-transport io_uring), for trees of small files; /dev/fuse stays the
// default.
//
// The kernel takes this path only when the daemon announces FUSE_OVER_IO_URING in its INIT
// reply and /sys/module/fuse/parameters/enable_uring is Y (the mount switches it on as root).
// INIT, FORGET and INTERRUPT still come through /dev/fuse, so the classic loop keeps running
// beside the ring threads. Requests
// are handed to libfuse unchanged (fuse_session_process_buf): the entry's header and per-op
// struct are copied in front of the payload, which stays where the kernel put it; libfuse's
// reply comes back through the channel's writev hook (fuse_channel.cc), which copies it into
// the entry instead of writing /dev/fuse.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <sys/uio.h>

#include "fs/fuse_ops.h"  // FUSE_USE_VERSION, fuse_lowlevel.h

namespace envelopefs {

// "Y" in /sys/module/fuse/parameters/enable_uring. `exists` tells a kernel without the
// feature (no parameter) from one where it is switched off.
bool kernel_allows_fuse_uring(bool* exists);
// Writes Y there (root only); false with `why` filled in.
bool allow_fuse_uring(std::string* why);

class FuseRing {
 public:
  // Makes one io_uring per thread (`threads` spread over one queue per possible CPU, at least
  // two per queue) before the mount answers INIT, so the only failure left after INIT is the
  // kernel refusing the registration (which turns the transport off for this mount: requests
  // keep using /dev/fuse).
  static std::unique_ptr<FuseRing> create(fuse_session* se, unsigned threads, std::string* why);
  ~FuseRing();

  // From the channel, once the INIT reply is on its way: `accepted` is whether that reply
  // announced FUSE_OVER_IO_URING; payload_size is the largest request or reply body.
  void start(bool accepted, size_t payload_size);
  // After the session is unmounted: waits for the threads (their commands end with ENOTCONN).
  void stop();

  // Whether start() set the threads going (INIT accepted the ring).
  bool used() const { return used_; }
  unsigned queues() const { return queues_; }
  unsigned threads_per_queue() const { return per_queue_; }
  uint64_t served() const;

  FuseRing(const FuseRing&) = delete;
  FuseRing& operator=(const FuseRing&) = delete;

 private:
  struct Worker;
  FuseRing() = default;
  void run(Worker* w);
  size_t worker_count() const { return size_t{queues_} * per_queue_; }

  fuse_session* se_ = nullptr;
  int dev_fd_ = -1;
  unsigned queues_ = 0, per_queue_ = 0;
  std::unique_ptr<Worker[]> workers_;
  bool started_ = false;
  bool used_ = false;
};

// The reply sink of the request this thread is handling through the ring, if any: the
// channel's writev hook hands a reply for `unique` here instead of writing /dev/fuse.
// Returns false when this thread is not serving a ring request with that id.
bool ring_take_reply(uint64_t unique, const iovec* iov, int count, ssize_t* result);
// Where a READ handler may build its reply in place (page-aligned, at least `size` bytes),
// or nullptr when the request did not come through the ring.
uint8_t* ring_reply_buffer(size_t size);

}  // namespace envelopefs
