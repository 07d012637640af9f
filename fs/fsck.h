// `envelopefs fsck`: decrypt every name and link target and authenticate every block of every
// file, listing each failure with its path and block. Read-only, but for `--repair`.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "keyhierarchy/root_provider.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {

struct FsckReport {
  uint64_t dirs = 0, files = 0, symlinks = 0, blocks = 0, problems = 0;
  uint64_t repaired_files = 0;  // with `repair`
  // Block keys (slots) per DEK version that wraps them, and metadata pages per DEK version
  // that seals them: what a rotation still needs (fs/block_rewrap.h).
  std::map<uint32_t, uint64_t> keys_by_dek, pages_by_dek;
};

// Returns the process exit code: 0 clean, 1 problems found, 2 could not check.
// With `repair` (the volume unmounted: it is locked meanwhile), every damaged file is salvaged
// (fs/salvage.h) and the volume checked again: 0 if it is clean then, 1 if problems are left
// (names and link targets are never repaired), 2 could not check.
int run_fsck(const std::string& cipher_dir, const ProviderOptions& provider, bool quiet, bool repair = false);

// Which DEK versions the files of an open volume use, from every metadata page of every file
// (no data block is read): the report's dirs, files, keys_by_dek, pages_by_dek and problems
// (a file or page that could not be read or does not authenticate, printed as fsck does).
// For `envelopefs drop-dek`, which may only drop a version nothing uses.
FsckReport scan_dek_use(VolumeKeys& keys, int root_fd, bool quiet);

}  // namespace envelopefs
