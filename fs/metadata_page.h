// One metadata page: the page header (with the file header in page 0) and 31 entries of two
// slots each. Byte layout in fs/FORMAT.md, "Metadata page". The page is authenticated as a
// whole (HMAC-SHA256 under a DEK-derived key), so whether a block is written or a hole is part
// of what is authenticated: zeroing an entry or the page is detected, never read as a hole.
#pragma once

#include <array>
#include <cstdint>

#include "crypto/bytes.h"
#include "crypto/status.h"
#include "fs/layout.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {

using FileId = std::array<uint8_t, 16>;

inline constexpr uint8_t kPageMagic[4] = {'E', 'F', 'S', 'M'};
inline constexpr uint16_t kPageFormatVersion = 1;
inline constexpr size_t kWrappedKeySize = 40;

struct Slot {
  uint32_t seq = 0;  // 0: empty. Newer of two slots: seq_newer(a, b) (serial-number arithmetic)
  uint32_t dek_version = 0;
  std::array<uint8_t, kWrappedKeySize> wrapped_key{};
  std::array<uint8_t, 16> tag{};
  bool empty() const { return seq == 0; }
};

// True when serial number `a` is newer than `b` (RFC 1982 style on 32 bits, 0 never used).
inline bool seq_newer(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) > 0; }
inline uint32_t seq_next(uint32_t s) { return s + 1 == 0 ? 1 : s + 1; }
// Index (0 or 1) of the newer of an entry's two slots; an empty slot is never the newer one
// unless both are empty (then 1, whose seq is 0).
inline int newer_slot(const Slot& s0, const Slot& s1) {
  if (s0.empty()) return 1;
  if (s1.empty()) return 0;
  return seq_newer(s1.seq, s0.seq) ? 1 : 0;
}

class MetaPage {
 public:
  MetaPage() { bytes_.fill(0); }
  // A fresh page: header filled in, every entry a hole, not yet sealed.
  static MetaPage fresh(const FileId& file_id, uint64_t page_index, uint32_t block_size);

  uint8_t* data() { return bytes_.data(); }
  const uint8_t* data() const { return bytes_.data(); }
  bool all_zero() const;

  FileId file_id() const;
  uint64_t page_index() const;
  uint32_t block_size() const;
  // The DEK version whose page MAC key sealed the page.
  uint32_t mac_version() const;

  Slot slot(uint64_t entry, int which) const;
  void set_slot(uint64_t entry, int which, const Slot& s);
  void clear_entry(uint64_t entry);
  bool entry_is_hole(uint64_t entry) const { return slot(entry, 0).empty() && slot(entry, 1).empty(); }

  // Computes the checksum and the MAC under the volume's active DEK.
  Status seal(VolumeKeys& keys);
  // Checks magic, version, flags, file id, page index, block size and the MAC.
  // kAuthFailed for a MAC failure (tampering, or a torn page: torn_checksum() tells which).
  Status verify(VolumeKeys& keys, const FileId& expected_file, uint64_t expected_index) const;
  // True if the page's own XXH3 checksum fails: a torn write rather than a forgery.
  bool checksum_fails() const;
  // True if the unauthenticated header says this is page `index` of a file of `block_size`
  // blocks in a format this build reads: what a repair needs to take the entries of a page
  // that does not authenticate (fs/salvage.h).
  bool names_position(uint64_t index, uint32_t block_size) const;

 private:
  Result<Mac256> compute_mac(VolumeKeys& keys, uint32_t dek_version) const;
  uint64_t compute_checksum() const;
  // Page-aligned so a page can be written and read with O_DIRECT.
  alignas(kMetaPageSize) std::array<uint8_t, kMetaPageSize> bytes_;
};

}  // namespace envelopefs
