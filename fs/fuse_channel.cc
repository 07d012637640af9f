#include "fs/fuse_channel.h"

#include <linux/fuse.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace envelopefs {
namespace {

thread_local bool t_kill_suidgid = false;
std::atomic<uint64_t> g_init_unique{0};
std::atomic<bool> g_kernel_offers_v2{false};

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
  t_kill_suidgid = false;
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header))) return n;
  fuse_in_header in;
  std::memcpy(&in, buf, sizeof in);
  const size_t got = static_cast<size_t>(n), body = sizeof(fuse_in_header);
  switch (in.opcode) {
    case FUSE_INIT: {
      fuse_init_in init;
      if (view(buf, got, body, &init)) {
        g_kernel_offers_v2 = (init.flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
        g_init_unique = in.unique;
      }
      break;
    }
    case FUSE_WRITE:
      t_kill_suidgid = has_flag<fuse_write_in>(buf, got, &fuse_write_in::write_flags, FUSE_WRITE_KILL_SUIDGID);
      break;
    case FUSE_OPEN:
      t_kill_suidgid = has_flag<fuse_open_in>(buf, got, &fuse_open_in::open_flags, FUSE_OPEN_KILL_SUIDGID);
      break;
    case FUSE_SETATTR:
      t_kill_suidgid = has_flag<fuse_setattr_in>(buf, got, &fuse_setattr_in::valid, FATTR_KILL_SUIDGID);
      break;
    default:
      break;
  }
  return n;
}

ssize_t channel_writev(int fd, iovec* iov, int count, void*) {
  fuse_out_header out;
  const uint64_t init_unique = g_init_unique.load();
  if (init_unique != 0 && count >= 2 && iov[0].iov_len >= sizeof out) {
    std::memcpy(&out, iov[0].iov_base, sizeof out);
    if (out.unique == init_unique && out.error == 0 && iov[1].iov_len >= offsetof(fuse_init_out, flags) + 4) {
      g_init_unique = 0;
      if (g_kernel_offers_v2) {
        fuse_init_out reply;
        std::memset(&reply, 0, sizeof reply);
        std::memcpy(&reply, iov[1].iov_base, std::min(iov[1].iov_len, sizeof reply));
        reply.flags |= FUSE_HANDLE_KILLPRIV_V2;
        iovec patched[2] = {iov[0], {&reply, iov[1].iov_len}};
        if (iov[1].iov_len <= sizeof reply) return ::writev(fd, patched, 2);
      }
    }
  }
  return ::writev(fd, iov, count);
}

}  // namespace

bool install_fuse_channel(fuse_session* se) {
  fuse_custom_io io{};
  io.read = channel_read;
  io.writev = channel_writev;
  return fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0;
}

bool request_kills_suidgid() { return t_kill_suidgid; }

}  // namespace envelopefs
