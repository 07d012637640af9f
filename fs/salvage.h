// `envelopefs fsck --repair`: makes a damaged backing file readable again by giving up what
// does not authenticate, and nothing else (fs/FORMAT.md, "Repair").
//
// A block that opens under neither slot (a power cut that kept a short last block's longer data
// but not its length, bit rot, an edit) becomes a hole: it reads as zeros, the rest of the file
// as before. A metadata page that does not authenticate (torn, damaged) is sealed again from
// the entries it holds, each of which is then kept only if its block opens under it: the block
// key is wrapped under a DEK and the block's tag binds volume, file and position, so what
// opens is this file's data at this position (of some version: the page MAC that said which
// one is what was lost). A page that is not one at all (zeroed, overwritten) is replaced by a
// page of holes.
#pragma once

#include <cstdint>
#include <vector>

#include "fs/io_backend.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {

struct SalvageReport {
  std::vector<uint64_t> pages_resealed;   // metadata pages sealed again from their entries
  std::vector<uint64_t> pages_replaced;   // not pages at all: replaced by pages of holes
  std::vector<uint64_t> blocks_given_up;  // holes now: they read as zeros
  bool emptied = false;                   // shorter than its header: now an empty file
  uint64_t still_failing = 0;             // blocks that failed otherwise, left as they are
  bool changed() const {
    return emptied || !pages_resealed.empty() || !pages_replaced.empty() || !blocks_given_up.empty();
  }
};

// `fd`: the backing file, open read-write, which nothing else uses meanwhile (an unmounted
// volume, under its lock). Only authentication failures are given up: a block that fails to
// read for any other reason (an I/O error, a DEK the volume no longer has) is left as it is
// and counted in still_failing. Changes reach the disk (fdatasync) before this returns. The
// file is not read again afterwards: `fsck --repair` checks the whole volume again.
Result<SalvageReport> salvage_file(int fd, VolumeKeys& keys, IoBackend& io);

}  // namespace envelopefs
