#include "fs/fuse_channel.h"

#include "fs/fuse_ring.h"

#include <linux/fuse.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>

namespace envelopefs {
namespace {

thread_local bool t_kill_suidgid = false;
std::atomic<uint64_t> g_init_unique{0};
std::atomic<bool> g_kernel_offers_v2{false};
std::atomic<bool> g_kernel_offers_uring{false};
FuseRing* g_ring = nullptr;
// FUSE_OVER_IO_URING (1ULL << 41), as it sits in the flags2 word of INIT.
constexpr uint32_t kOverIoUring2 = 1u << (41 - 32);

template <typename T>
bool view(const void* buf, size_t len, size_t at, T* out) {
  if (len < at + sizeof(T)) return false;
  std::memcpy(out, static_cast<const uint8_t*>(buf) + at, sizeof(T));
  return true;
}

// Whether the request body (a T after the header) has `bit` set in its field `field`.
template <typename T>
bool has_flag(const void* buf, size_t len, uint32_t T::*field, uint32_t bit) {
  T body;
  return view(buf, len, sizeof(fuse_in_header), &body) && (body.*field & bit);
}

ssize_t channel_read(int fd, void* buf, size_t len, void*) {
  ssize_t n = ::read(fd, buf, len);
  const size_t got = n > 0 ? static_cast<size_t>(n) : 0;
  note_request(buf, got);
  fuse_in_header in;
  fuse_init_in init;
  if (view(buf, got, 0, &in) && in.opcode == FUSE_INIT && view(buf, got, sizeof in, &init)) {
    g_kernel_offers_v2 = (init.flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
    g_kernel_offers_uring = (init.flags & FUSE_INIT_EXT) && (init.flags2 & kOverIoUring2);
    g_init_unique = in.unique;
  }
  return n;
}

// The INIT reply, with the capabilities libfuse 3.14 does not know about added. Returns
// whether it announced FUSE_OVER_IO_URING, and the largest request body the kernel will send.
bool patch_init_reply(fuse_init_out* reply, size_t len, size_t* payload) {
  if (g_kernel_offers_v2) reply->flags |= FUSE_HANDLE_KILLPRIV_V2;
  const bool has_flags2 = len >= offsetof(fuse_init_out, flags2) + sizeof reply->flags2;
  const bool uring = g_ring != nullptr && g_kernel_offers_uring && has_flags2;
  if (uring) {
    reply->flags |= FUSE_INIT_EXT;
    reply->flags2 |= kOverIoUring2;
  }
  // As the kernel sizes an entry's payload: max(FUSE_MIN_READ_BUFFER, max_write, max_pages pages).
  size_t pages = (reply->flags & FUSE_MAX_PAGES) ? reply->max_pages : 32;
  *payload = std::max<size_t>({8192, reply->max_write, pages * 4096});
  return uring;
}

ssize_t channel_writev(int fd, iovec* iov, int count, void*) {
  fuse_out_header out;
  if (count < 1 || iov[0].iov_len < sizeof out) return ::writev(fd, iov, count);
  std::memcpy(&out, iov[0].iov_base, sizeof out);
  ssize_t taken = 0;
  if (ring_take_reply(out.unique, iov, count, &taken)) return taken;
  const uint64_t init_unique = g_init_unique.load();
  if (init_unique == 0 || out.unique != init_unique || out.error != 0 || count != 2 ||
      iov[1].iov_len < offsetof(fuse_init_out, flags) + 4 || iov[1].iov_len > sizeof(fuse_init_out)) {
    return ::writev(fd, iov, count);
  }
  g_init_unique = 0;
  fuse_init_out reply;
  std::memset(&reply, 0, sizeof reply);
  std::memcpy(&reply, iov[1].iov_base, iov[1].iov_len);
  size_t payload = 0;
  const bool uring = patch_init_reply(&reply, iov[1].iov_len, &payload);
  iovec patched[2] = {iov[0], {&reply, iov[1].iov_len}};
  ssize_t n = ::writev(fd, patched, 2);
  // The kernel has processed the reply when writev returns: the ring may register now.
  if (g_ring != nullptr) g_ring->start(uring && n >= 0, payload);
  return n;
}

}  // namespace

void note_request(const void* buf, size_t len) {
  t_kill_suidgid = false;
  fuse_in_header in;
  if (!view(buf, len, 0, &in)) return;
  switch (in.opcode) {
    case FUSE_WRITE:
      t_kill_suidgid = has_flag<fuse_write_in>(buf, len, &fuse_write_in::write_flags, FUSE_WRITE_KILL_SUIDGID);
      break;
    case FUSE_OPEN:
      t_kill_suidgid = has_flag<fuse_open_in>(buf, len, &fuse_open_in::open_flags, FUSE_OPEN_KILL_SUIDGID);
      break;
    case FUSE_SETATTR:
      t_kill_suidgid = has_flag<fuse_setattr_in>(buf, len, &fuse_setattr_in::valid, FATTR_KILL_SUIDGID);
      break;
    default:
      break;
  }
}

bool install_fuse_channel(fuse_session* se, FuseRing* ring) {
  g_ring = ring;
  fuse_custom_io io{};
  io.read = channel_read;
  io.writev = channel_writev;
  return fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0;
}

bool request_kills_suidgid() { return t_kill_suidgid; }

}  // namespace envelopefs
