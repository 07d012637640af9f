// Where envelopefs volumes are mounted, as this mount namespace's mount table says, and the
// mounts whose daemon has gone.
//
// A daemon that dies without unmounting (SIGKILL, the OOM killer, a crash) leaves its mount in
// the table: every access to it fails with ENOTCONN ("Transport endpoint is not connected")
// until it is unmounted. That is failing closed, and it is kept so: were the mount taken away
// by itself, a database still running would create its next files in the directory beneath,
// in plaintext. Clearing it is left to whoever mounts the volume again (`envelopefs mount`
// replaces its own volume's dead mount) or unmounts it.
#pragma once

#include <string>
#include <vector>

#include "crypto/status.h"

namespace envelopefs {

// An envelopefs mount: cipher dir (the fsname) and mountpoint, unescaped.
struct MountEntry {
  std::string source, target;
};
std::vector<MountEntry> envelopefs_mounts();

// `path` made absolute and normalised, symlinks left as they are: how a mount names its cipher
// dir (the fsname `envelopefs_mounts` reads back as `source`).
std::string absolute_path(const std::string& path);

// `path` made absolute with its symlinks resolved, as the mount table names mountpoints. A
// dead mount cannot be looked at (ENOTCONN), so then only the directories leading to it are
// resolved.
std::string resolve_path(const std::string& path);

// Whether `path` is a FUSE mount whose daemon has gone (ENOTCONN).
bool is_dead_mount(const std::string& path);

// The cipher dir of the envelopefs mount at resolved mountpoint `target`, the topmost where
// mounts stack ("" if there is none).
std::string volume_mounted_at(const std::string& target);

// Unmounts the mount at `path`: umount2() as root, `fusermount3 -u` otherwise. `detach`: lazily
// (MNT_DETACH, `-z`), for a dead mount, whose files a process may still hold open.
Status unmount_path(const std::string& path, bool detach);

}  // namespace envelopefs
