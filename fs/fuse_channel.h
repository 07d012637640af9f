// The raw /dev/fuse channel, wrapped (fuse_session_custom_io) for the one thing libfuse 3.14
// cannot do: negotiate FUSE_HANDLE_KILLPRIV_V2 (and FUSE_OVER_IO_URING, see fuse_ring.h).
//
// Without it the kernel asks GETXATTR "security.capability" before every write() into the
// page cache: FUSE sets SB_NOSEC only under that capability, so "nothing to strip" is never
// cached in S_NOSEC. That was one synchronous round trip per write (4k random write: 5.4k
// writes/s with, 16.4k without). The capability's contract is that the filesystem clears
// set-user-ID/set-group-ID itself when the kernel flags a WRITE, an OPEN with O_TRUNC or a
// SETATTR (a CREATE makes a new file: nothing to clear). The flags are in the raw request,
// which libfuse 3.14 drops, so the read hook notes them for the handler that runs next on
// the same thread (libfuse's worker reads a request and then handles it).
#pragma once

#include <cstddef>

#include "fs/fuse_ops.h"  // FUSE_USE_VERSION, fuse_lowlevel.h

namespace envelopefs {

class FuseRing;

// Installs the hooks on a mounted session (call right after fuse_session_mount). With a ring,
// the INIT reply announces FUSE_OVER_IO_URING when the kernel offers it, the ring is started
// once INIT is answered, and replies to the requests it serves go back through it.
bool install_fuse_channel(fuse_session* se, FuseRing* ring);

// Notes what the raw request (fuse_in_header and what follows) asks beyond what libfuse
// passes on; the next handler on this thread reads it (request_kills_suidgid).
void note_request(const void* buf, size_t len);

// True when the request this thread is handling asked the filesystem to clear
// set-user-ID/set-group-ID (FUSE_WRITE_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID,
// FATTR_KILL_SUIDGID).
bool request_kills_suidgid();

}  // namespace envelopefs
