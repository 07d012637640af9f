// Seal and open one data block under a fresh per-block key (fs/FORMAT.md, "Data blocks"):
// key = 32 random bytes, wrapped under the DEK (RFC 3394) into the slot; AES-256-GCM with a
// zero IV (every key seals exactly one message) and AAD binding volume, file and block index,
// so a block moved to another offset or file does not authenticate. Volumes made before the
// "rewrappable-blocks" feature also bind the DEK version that wraps the key; newer ones put 0
// there, which is what lets rewrap_slots() move a block key to another DEK without touching
// the block (the version is still authenticated, by the page MAC, and a key relabelled with
// the wrong DEK fails its RFC 3394 integrity check anyway).
#pragma once

#include "fs/metadata_page.h"

namespace envelopefs {

inline constexpr size_t kBlockAadSize = 48;
using BlockAad = std::array<uint8_t, kBlockAadSize>;
BlockAad block_aad(const VolumeId& volume, const FileId& file, uint64_t index, uint32_t dek_version);

// Seals `plaintext` (<= block size) into `ciphertext` (same length); fills slot's dek_version,
// wrapped_key and tag (the caller sets seq).
Status seal_block(VolumeKeys& keys, const FileId& file, uint64_t index, ByteView plaintext,
                  uint8_t* ciphertext, Slot* slot);
// kAuthFailed if anything does not match.
Status open_block(VolumeKeys& keys, const FileId& file, uint64_t index, const Slot& slot,
                  ByteView ciphertext, uint8_t* plaintext);

// Batched forms for multi-block requests: block keys are drawn, wrapped and unwrapped many at
// a time (KeyWrapper::wrap32_many), which is what makes large requests cheap.
// Seals blocks [first, first+count), back to back in `plain` (each block_size long but the
// last, last_len) into `cipher` at the same positions; fills slots[k] except seq.
Status seal_blocks(VolumeKeys& keys, const FileId& file, uint64_t first, size_t count,
                   uint32_t block_size, uint32_t last_len, const uint8_t* plain, uint8_t* cipher,
                   Slot* slots);

struct BlockToOpen {
  uint64_t index;
  const Slot* slot;
  uint8_t* data;  // ciphertext in, plaintext out (in place)
  uint32_t len;
  Status result;
};
// Opens every block in place; each result says whether it authenticated.
void open_blocks(VolumeKeys& keys, const FileId& file, std::span<BlockToOpen> blocks);

// Re-wraps, under the active DEK, the block key of every slot of `page` that another DEK
// version wraps (both slots of an entry: after a crash the older one may be the one that
// matches the data). Seq and tag stay; the blocks are not touched. Only for volumes with
// rewrappable blocks (kUnsupported otherwise). Returns how many slots changed; the caller
// seals the page again (which moves its MAC to the active DEK too).
Result<size_t> rewrap_slots(VolumeKeys& keys, MetaPage& page);
// True when some slot of `page`, or its MAC, is under a DEK version other than the active one.
bool needs_rewrap(const VolumeKeys& keys, const MetaPage& page);

}  // namespace envelopefs
