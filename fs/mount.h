// Mounting: open the volume, start a FUSE session, go to the background once the mount is
// ready (the calling process returns only then, with the daemon's first error if any).
#pragma once

#include <string>

#include "fs/filesystem.h"
#include "keyhierarchy/root_provider.h"

namespace envelopefs {

struct MountOptions {
  std::string cipher_dir;
  std::string mountpoint;
  bool foreground = false;
  bool allow_other = false;
  // Mount over a directory that has entries (they are hidden while mounted); refused otherwise.
  bool nonempty = false;
  bool use_uring = true;
  std::string fuse_options;  // extra -o options for libfuse and the kernel
  bool read_only = false;    // -o ro (also in fuse_options): the daemon writes nothing of its own
  std::string log_file;
  int threads = 8;
  // How requests reach the daemon: "dev" (/dev/fuse) or "io_uring" (FUSE over io_uring,
  // fuse_ring.h; root switches the kernel's enable_uring on).
  std::string fuse_transport = "dev";
  ProviderOptions provider;
  FsOptions fs;
  // Root key re-validation while mounted (fs/key_watch.h): every key_check_interval seconds
  // (0: never); an unreachable root is trusted for key_unreachable_grace seconds.
  int key_check_interval = 60;
  int key_unreachable_grace = 300;
  // The block re-wrap after a DEK rotation (fs/block_rewrap.h) reads at most this many
  // metadata pages a second (0: no limit).
  int rewrap_rate = 0;
};

// Returns the process exit code.
int run_mount(const MountOptions& options);
// `lazy`: detach even while files are open on it (their daemon serves them until closed).
int run_unmount(const std::string& mountpoint, bool lazy = false);

}  // namespace envelopefs
