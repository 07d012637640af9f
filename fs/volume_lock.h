// One daemon per volume. Each daemon caches what it read of the backing files it serves
// (metadata pages with the block keys, file sizes, directory nonces) and writes them back as
// if no one else did, so two mounts of one cipher dir writing side by side would overwrite
// each other's block keys: blocks that no longer authenticate, data gone. The mount holds a
// lock of `envelopefs.lock` in the cipher root for the daemon's whole life (the kernel drops
// it when the daemon dies, SIGKILL included): a write lock for a read-write mount, a read lock
// for a read-only one, which writes nothing and may run beside others like it.
#pragma once

#include <string>
#include <vector>

#include "crypto/status.h"

namespace envelopefs {

inline constexpr char kVolumeLockName[] = "envelopefs.lock";

// The locked descriptor (for the daemon to keep open; close-on-exec), or -1 where a
// read-only mount finds no lock file and cannot make one (a read-only backing filesystem:
// nothing can write the volume there). A volume mounted already: EBUSY, with a message naming
// where, if this mount namespace shows it.
Result<int> lock_volume(const std::string& cipher_dir, bool read_only);

// Whether a daemon holds the volume read-write now (for fsck and status: what a check reads
// while the mount writes can look damaged).
bool volume_in_use(const std::string& cipher_dir);

// The envelopefs mounts of this mount namespace: cipher dir (the fsname) and mountpoint.
struct MountEntry {
  std::string source, target;
};
std::vector<MountEntry> envelopefs_mounts();

}  // namespace envelopefs
