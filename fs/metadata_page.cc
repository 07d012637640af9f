#include "fs/metadata_page.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "fs/endian.h"

namespace envelopefs {
namespace {

// Page header offsets (fs/FORMAT.md).
constexpr size_t kOffMagic = 0, kOffVersion = 4, kOffFlags = 6, kOffFileId = 8,
                 kOffPageIndex = 24, kOffBlockSize = 32, kOffMacVersion = 36, kOffMac = 64,
                 kOffChecksum = 96, kMacEnd = 104;
// Slot offsets within a slot.
constexpr size_t kSlotSeq = 0, kSlotDek = 4, kSlotKey = 8, kSlotTag = 48;
static_assert(kSlotTag + 16 == kSlotSize);
static_assert(kOffChecksum + 8 == kMacEnd && kMacEnd <= kPageHeaderSize);

constexpr std::array<uint8_t, kMacEnd - kOffMac> kZeros{};

size_t slot_offset(uint64_t entry, int which) {
  return kPageHeaderSize + entry * kEntrySize + static_cast<size_t>(which) * kSlotSize;
}

}  // namespace

MetaPage MetaPage::fresh(const FileId& file_id, uint64_t page_index, uint32_t block_size) {
  MetaPage p;
  std::memcpy(p.bytes_.data() + kOffMagic, kPageMagic, 4);
  le::put16(p.bytes_.data() + kOffVersion, kPageFormatVersion);
  le::put16(p.bytes_.data() + kOffFlags, 0);
  std::memcpy(p.bytes_.data() + kOffFileId, file_id.data(), 16);
  le::put64(p.bytes_.data() + kOffPageIndex, page_index);
  le::put32(p.bytes_.data() + kOffBlockSize, block_size);
  return p;
}

bool MetaPage::names_position(uint64_t index, uint32_t block_size) const {
  return std::memcmp(bytes_.data() + kOffMagic, kPageMagic, 4) == 0 &&
         le::get16(bytes_.data() + kOffVersion) == kPageFormatVersion &&
         le::get16(bytes_.data() + kOffFlags) == 0 &&
         page_index() == index && this->block_size() == block_size;
}

bool MetaPage::all_zero() const {
  return std::all_of(bytes_.begin(), bytes_.end(), [](uint8_t b) { return b == 0; });
}

FileId MetaPage::file_id() const {
  FileId id;
  std::memcpy(id.data(), bytes_.data() + kOffFileId, 16);
  return id;
}
uint64_t MetaPage::page_index() const { return le::get64(bytes_.data() + kOffPageIndex); }
uint32_t MetaPage::block_size() const { return le::get32(bytes_.data() + kOffBlockSize); }

uint32_t MetaPage::mac_version() const { return le::get32(bytes_.data() + kOffMacVersion); }

Slot MetaPage::slot(uint64_t entry, int which) const {
  const uint8_t* p = bytes_.data() + slot_offset(entry, which);
  Slot s;
  s.seq = le::get32(p + kSlotSeq);
  s.dek_version = le::get32(p + kSlotDek);
  std::memcpy(s.wrapped_key.data(), p + kSlotKey, kWrappedKeySize);
  std::memcpy(s.tag.data(), p + kSlotTag, 16);
  return s;
}

void MetaPage::set_slot(uint64_t entry, int which, const Slot& s) {
  uint8_t* p = bytes_.data() + slot_offset(entry, which);
  le::put32(p + kSlotSeq, s.seq);
  le::put32(p + kSlotDek, s.dek_version);
  std::memcpy(p + kSlotKey, s.wrapped_key.data(), kWrappedKeySize);
  std::memcpy(p + kSlotTag, s.tag.data(), 16);
}

void MetaPage::clear_entry(uint64_t entry) {
  std::memset(bytes_.data() + slot_offset(entry, 0), 0, kEntrySize);
}

Result<Mac256> MetaPage::compute_mac(VolumeKeys& keys, uint32_t dek_version) const {
  Dek* dek = keys.dek(dek_version);
  if (dek == nullptr) {
    return Status(Code::kAuthFailed, "metadata page names unknown DEK version " +
                                         std::to_string(dek_version));
  }
  const uint8_t* b = bytes_.data();
  return dek->page_mac.mac({keys.volume_id(), ByteView(b, kOffMac), kZeros,
                            ByteView(b + kMacEnd, kMetaPageSize - kMacEnd)});
}

uint64_t MetaPage::compute_checksum() const {
  XXH3_state_t st;
  XXH3_64bits_reset(&st);
  XXH3_64bits_update(&st, bytes_.data(), kOffChecksum);
  XXH3_64bits_update(&st, kZeros.data(), 8);
  XXH3_64bits_update(&st, bytes_.data() + kMacEnd, kMetaPageSize - kMacEnd);
  return XXH3_64bits_digest(&st);
}

bool MetaPage::checksum_fails() const {
  return compute_checksum() != le::get64(bytes_.data() + kOffChecksum);
}

Status MetaPage::seal(VolumeKeys& keys) {
  uint32_t v = keys.active_version();
  le::put32(bytes_.data() + kOffMacVersion, v);
  auto mac = compute_mac(keys, v);
  if (!mac.ok()) return mac.status();
  std::memcpy(bytes_.data() + kOffMac, mac->data(), mac->size());
  le::put64(bytes_.data() + kOffChecksum, compute_checksum());
  return Status::Ok();
}

Status MetaPage::verify(VolumeKeys& keys, const FileId& expected_file,
                        uint64_t expected_index) const {
  std::string where = "metadata page " + std::to_string(expected_index);
  if (std::memcmp(bytes_.data() + kOffMagic, kPageMagic, 4) != 0) {
    return Status(Code::kAuthFailed, where + ": bad magic (zeroed, torn or not an envelopefs file)");
  }
  if (le::get16(bytes_.data() + kOffVersion) != kPageFormatVersion) {
    return Status(Code::kUnsupported, where + ": unknown page format version");
  }
  if (le::get16(bytes_.data() + kOffFlags) != 0) {
    return Status(Code::kUnsupported, where + ": unknown feature flags");
  }
  auto mac = compute_mac(keys, le::get32(bytes_.data() + kOffMacVersion));
  if (!mac.ok()) return mac.status();
  if (!ct_equal(*mac, ByteView(bytes_.data() + kOffMac, 32))) {
    return Status(Code::kAuthFailed,
                  where + (checksum_fails() ? ": torn or damaged (checksum and MAC fail)"
                                            : ": MAC mismatch (modified)"));
  }
  // Authenticated from here on; a mismatch means the page was moved, not damaged.
  if (std::memcmp(bytes_.data() + kOffFileId, expected_file.data(), 16) != 0 ||
      page_index() != expected_index || block_size() != keys.block_size()) {
    return Status(Code::kAuthFailed, where + ": belongs to another file or position");
  }
  return Status::Ok();
}

}  // namespace envelopefs
