// Where things are in a backing file (fs/FORMAT.md, "Backing file layout"): groups of one
// 4 KiB metadata page followed by 31 data blocks, all at 4 KiB-aligned offsets. The plaintext
// size is a pure function of the backing size, so stat never decrypts.
#pragma once

#include <cstdint>

namespace envelopefs {

inline constexpr uint64_t kMetaPageSize = 4096;
inline constexpr uint64_t kPageHeaderSize = 128;
inline constexpr uint64_t kEntrySize = 128;
inline constexpr uint64_t kSlotSize = 64;
inline constexpr uint64_t kBlocksPerGroup = (kMetaPageSize - kPageHeaderSize) / kEntrySize;
static_assert(kBlocksPerGroup == 31);
static_assert(kPageHeaderSize + kBlocksPerGroup * kEntrySize == kMetaPageSize);
static_assert(2 * kSlotSize == kEntrySize);

class Layout {
 public:
  explicit Layout(uint32_t block_size)
      : bs_(block_size), group_(kMetaPageSize + kBlocksPerGroup * block_size) {}

  uint32_t block_size() const { return bs_; }
  uint64_t group_size() const { return group_; }
  static uint64_t page_of(uint64_t block) { return block / kBlocksPerGroup; }
  static uint64_t entry_of(uint64_t block) { return block % kBlocksPerGroup; }
  uint64_t page_offset(uint64_t page) const { return page * group_; }
  uint64_t data_offset(uint64_t block) const {
    return page_of(block) * group_ + kMetaPageSize + entry_of(block) * bs_;
  }
  // The data block holding backing byte `offset` (which must lie in a data area).
  uint64_t block_at(uint64_t offset) const {
    uint64_t r = offset % group_;
    return offset / group_ * kBlocksPerGroup + (r < kMetaPageSize ? 0 : (r - kMetaPageSize) / bs_);
  }
  // Number of blocks a file of `size` plaintext bytes has.
  uint64_t block_count(uint64_t size) const { return (size + bs_ - 1) / bs_; }
  // Plaintext length of block `index` in a file of `size` bytes (0 past the end).
  uint32_t block_length(uint64_t index, uint64_t size) const {
    uint64_t start = index * bs_;
    if (start >= size) return 0;
    return static_cast<uint32_t>(size - start < bs_ ? size - start : bs_);
  }
  // A backing file shorter than one metadata page has no header: corrupt.
  uint64_t plaintext_size(uint64_t backing) const {
    uint64_t g = backing / group_, r = backing % group_;
    return g * kBlocksPerGroup * bs_ + (r > kMetaPageSize ? r - kMetaPageSize : 0);
  }
  uint64_t backing_size(uint64_t plaintext) const {
    if (plaintext == 0) return kMetaPageSize;
    uint64_t last = (plaintext - 1) / bs_;
    return data_offset(last) + (plaintext - last * bs_);
  }
  // Number of metadata pages a file of `size` bytes has (page 0 always exists).
  uint64_t page_count(uint64_t size) const {
    return size == 0 ? 1 : page_of(block_count(size) - 1) + 1;
  }

 private:
  uint32_t bs_;
  uint64_t group_;
};

}  // namespace envelopefs
