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

// A short last block whose growth in place reached the disk while the file's new length did
// not (fs/FORMAT.md, "Growing"): `ciphertext` is the first `len` bytes of what slot `grown`
// sealed at a greater length, and slot `before` sealed the block at `len`. GCM's ciphertext is
// the plaintext XOR a keystream of the key alone (the IV is zero), so grown's keystream gives
// back the plaintext grown sealed, as far as it reaches; it is accepted only if sealing it
// again under before's key reproduces before's tag, which only before's own plaintext does.
// A growth leaves the bytes before the old end as they were, unless the write that made it
// also changed them. Fills `plaintext` and, in `before_cipher`, the ciphertext that `before`
// describes (to be put back before either slot is replaced). kAuthFailed otherwise.
Status open_cut_growth(VolumeKeys& keys, const FileId& file, uint64_t index, const Slot& grown,
                       const Slot& before, ByteView ciphertext, uint8_t* plaintext,
                       uint8_t* before_cipher);

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
