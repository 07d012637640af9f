#include "fs/salvage.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "crypto/random.h"
#include "fs/cipher_file.h"
#include "fs/layout.h"
#include "fs/metadata_page.h"

namespace envelopefs {
namespace {

// A page as it is on disk, unchecked; zeros where the file is short of it.
Status read_page(int fd, const Layout& layout, uint64_t index, MetaPage* page) {
  *page = MetaPage();
  ssize_t n = pread(fd, page->data(), kMetaPageSize, static_cast<off_t>(layout.page_offset(index)));
  if (n < 0) return Status::Io(errno, "read of a metadata page");
  return Status::Ok();
}

Status write_page(int fd, const Layout& layout, uint64_t index, const MetaPage& page) {
  ssize_t n = pwrite(fd, page.data(), kMetaPageSize, static_cast<off_t>(layout.page_offset(index)));
  if (n != static_cast<ssize_t>(kMetaPageSize)) return Status::Io(n < 0 ? errno : EIO, "write of a metadata page");
  return Status::Ok();
}

// The blocks of the file in `fd` that fail to authenticate, and how many fail otherwise.
Result<std::vector<uint64_t>> unauthentic_blocks(int fd, VolumeKeys& keys, IoBackend& io, uint64_t* other) {
  auto f = CipherFile::open(fd, keys, io);
  if (!f.ok()) return f.status();
  const uint32_t bs = keys.block_size();
  std::vector<uint8_t> buf(bs);
  std::vector<uint64_t> bad;
  *other = 0;
  for (uint64_t off = 0; off < (*f)->size(); off += bs) {
    auto n = (*f)->read(off, buf);
    if (n.ok()) continue;
    if (n.status().code() == Code::kAuthFailed) bad.push_back(off / bs);
    else ++*other;
  }
  return bad;
}

}  // namespace

Result<SalvageReport> salvage_file(int fd, VolumeKeys& keys, IoBackend& io) {
  SalvageReport r;
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::Io(errno, "stat of backing file");
  if (st.st_size == 0) return r;
  if (static_cast<uint64_t>(st.st_size) < kMetaPageSize) {
    // Its first write did not land whole: nothing in it was ever readable.
    if (ftruncate(fd, 0) != 0 || fdatasync(fd) != 0) return Status::Io(errno, "truncate of backing file");
    r.emptied = true;
    return r;
  }
  const uint32_t bs = keys.block_size();
  const Layout layout(bs);
  const uint64_t size = layout.plaintext_size(static_cast<uint64_t>(st.st_size));
  const uint64_t pages = layout.page_count(size);
  const uint64_t blocks = layout.block_count(size);
  // One page in memory at a time: a file of a TiB has 8 million of them.
  MetaPage raw;

  // The file id: that of a page that authenticates under the id it names, else the one page 0
  // names, else a new one (no block opens then, and the file reads as zeros).
  FileId id{};
  bool known = false;
  for (uint64_t p = 0; p < pages && !known; ++p) {
    ENVELOPEFS_RETURN_IF_ERROR(read_page(fd, layout, p, &raw));
    known = raw.verify(keys, raw.file_id(), p).ok();
    if (known) id = raw.file_id();
  }
  if (!known) {
    ENVELOPEFS_RETURN_IF_ERROR(read_page(fd, layout, 0, &raw));
    if (raw.names_position(0, bs)) id = raw.file_id();
    else ENVELOPEFS_RETURN_IF_ERROR(random_fill(id));
  }

  for (uint64_t p = 0; p < pages; ++p) {
    ENVELOPEFS_RETURN_IF_ERROR(read_page(fd, layout, p, &raw));
    if (raw.verify(keys, id, p).ok()) continue;
    MetaPage page = MetaPage::fresh(id, p, bs);
    const bool a_page = raw.names_position(p, bs);
    // The entries of the file's blocks; those past its end stay empty, as a write leaves them.
    for (uint64_t b = p * kBlocksPerGroup; a_page && b < std::min(blocks, (p + 1) * kBlocksPerGroup); ++b) {
      for (int w = 0; w < 2; ++w) page.set_slot(Layout::entry_of(b), w, raw.slot(Layout::entry_of(b), w));
    }
    ENVELOPEFS_RETURN_IF_ERROR(page.seal(keys));
    ENVELOPEFS_RETURN_IF_ERROR(write_page(fd, layout, p, page));
    (a_page ? r.pages_resealed : r.pages_replaced).push_back(p);
  }

  uint64_t other = 0;
  auto bad = unauthentic_blocks(fd, keys, io, &other);
  if (!bad.ok()) return bad.status();
  for (size_t k = 0; k < bad->size();) {  // in order: the blocks of one page are together
    const uint64_t p = Layout::page_of((*bad)[k]);
    ENVELOPEFS_RETURN_IF_ERROR(read_page(fd, layout, p, &raw));
    for (; k < bad->size() && Layout::page_of((*bad)[k]) == p; ++k) {
      raw.clear_entry(Layout::entry_of((*bad)[k]));
    }
    ENVELOPEFS_RETURN_IF_ERROR(raw.seal(keys));
    ENVELOPEFS_RETURN_IF_ERROR(write_page(fd, layout, p, raw));
  }
  r.blocks_given_up = std::move(bad).value();
  r.still_failing = other;
  if (r.changed() && fdatasync(fd) != 0) return Status::Io(errno, "fdatasync of backing file");
  return r;
}

}  // namespace envelopefs
