#include "fs/cipher_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "crypto/random.h"
#include "fs/aligned_buffer.h"

namespace envelopefs {
namespace {

std::atomic<size_t> g_cached_pages{0};  // metadata pages cached by all files
std::atomic<size_t> g_page_budget{CipherFile::kPageBudget};

}  // namespace

// Everything one write-like operation changes, flushed in one ordered batch.
struct WriteBatch {
  std::unordered_map<uint64_t, CipherFile::Page*> dirty;
  std::vector<IoRequest> holes;  // data of blocks that were holes: written before the pages
  std::vector<IoRequest> data;   // every other block's data: written after the pages
  std::vector<AlignedBuffer> buffers;  // from BufferPool, returned on destruction
  WriteBatch() = default;
  WriteBatch(const WriteBatch&) = delete;
  WriteBatch& operator=(const WriteBatch&) = delete;
  ~WriteBatch() { release_buffers(); }
  void release_buffers() {
    for (auto& b : buffers) BufferPool::give(std::move(b));
    buffers.clear();
  }
};

void CipherFile::route(std::span<IoRequest> requests) const {
  for (IoRequest& q : requests) {
    bool aligned = reinterpret_cast<uintptr_t>(q.buf) % 4096 == 0 && q.offset % 4096 == 0 && q.len % 4096 == 0;
    q.direct = dfd_ >= 0 && aligned;
    q.fd = q.direct ? dfd_ : fd_;
  }
}

CipherFile::CipherFile(int fd, VolumeKeys& keys, IoBackend& io, const FileId& id, uint64_t backing)
    : fd_(fd), keys_(keys), io_(io), layout_(keys.block_size()), id_(id),
      size_(layout_.plaintext_size(backing)),
      reserved_end_(backing) {}

CipherFile::~CipherFile() {
  // Space reserved past the end goes back when the last user closes the file (on ext4 a
  // truncate to the current size frees blocks preallocated beyond it).
  const uint64_t backing = backing_end(size_);
  if (reserved_end_ > backing && !keep_past_end_) (void)io_.truncate(fd_, backing);
  g_cached_pages.fetch_sub(pages_.size());
}

Result<std::unique_ptr<CipherFile>> CipherFile::create(int fd, VolumeKeys& keys, IoBackend& io) {
  FileId id;
  ENVELOPEFS_RETURN_IF_ERROR(random_fill(id));
  // The header is not written here: an empty backing file already reads as an empty file, and
  // the first write, truncate or fallocate writes page 0 anyway (with its entries). Writing it
  // at creation too cost every copied file a second 4 KiB write of the same page. Also no
  // truncate and no stat: on ext4 a truncate to zero marks the file for "replace via
  // truncate", whose close then forces writeback, and a stat makes the next timestamp
  // fine-grained, so it no longer equals the kernel's coarse clock and every written file cost
  // a SETATTR round trip at close.
  // Page 0 comes from page() as a fresh page while header_written_ is false.
  auto f = std::unique_ptr<CipherFile>(new CipherFile(fd, keys, io, id, 0));
  f->header_written_ = false;
  return f;
}

Result<std::unique_ptr<CipherFile>> CipherFile::open(int fd, VolumeKeys& keys, IoBackend& io,
                                                     uint64_t prefetch) {
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::Io(errno, "stat of backing file");
  if (prefetch != 0 && st.st_size > static_cast<off_t>(kMetaPageSize)) {
    // The header read below would be one disk request and the reader's first READ another;
    // started here, the readahead brings both in one (a small file is all of it). Advice only.
    (void)posix_fadvise(fd, 0, static_cast<off_t>(std::min<uint64_t>(prefetch, static_cast<uint64_t>(st.st_size))),
                        POSIX_FADV_WILLNEED);
  }
  // An empty backing file is a file created and never written (or whose creation was cut
  // short): an empty file. Anything else shorter than the header was cut by someone else.
  if (st.st_size == 0) return create(fd, keys, io);
  if (static_cast<uint64_t>(st.st_size) < kMetaPageSize) {
    return Status(Code::kAuthFailed, "backing file is shorter than its header (truncated)");
  }
  MetaPage header;
  IoRequest req{fd, header.data(), kMetaPageSize, 0, false, 0};
  ENVELOPEFS_RETURN_IF_ERROR(io.run({&req, 1}));
  if (req.done != kMetaPageSize) return Status(Code::kAuthFailed, "short header read");
  FileId id = header.file_id();
  ENVELOPEFS_RETURN_IF_ERROR(header.verify(keys, id, 0));
  auto f = std::unique_ptr<CipherFile>(
      new CipherFile(fd, keys, io, id, static_cast<uint64_t>(st.st_size)));
  auto p0 = std::make_unique<Page>();
  *p0->page = header;
  f->cache_page(0, std::move(p0));
  return f;
}

uint64_t CipherFile::size() const {
  std::shared_lock lock(rw_);
  return size_;
}

Status CipherFile::fail(uint64_t block, Status st) const {
  // The FUSE edge logs authentication failures (fs/errno_map.cc); here they get their place.
  return st.prefix("file " + to_hex(id_) + " block " + std::to_string(block));
}

CipherFile::Page* CipherFile::cache_page(uint64_t index, std::unique_ptr<Page> page) {
  Page* raw = page.get();
  pages_[index] = std::move(page);
  g_cached_pages++;
  return raw;
}

void CipherFile::set_page_budget(size_t pages) { g_page_budget = pages; }

void CipherFile::evict_if_over_budget() {
  if (g_cached_pages.load(std::memory_order_relaxed) < g_page_budget.load(std::memory_order_relaxed) ||
      pages_.size() <= 16) {
    return;
  }
  // Over budget: give back half of this file's clean pages.
  size_t n = 0, erased = 0;
  std::erase_if(pages_, [&](const auto& kv) {
    bool drop = kv.first != 0 && !kv.second->dirty && (n++ % 2 == 0);
    erased += drop;
    return drop;
  });
  g_cached_pages.fetch_sub(erased);
}

Result<MetaPage*> CipherFile::page(uint64_t index, bool beyond_eof_ok) {
  // cache_mu_ is held by the caller.
  if (auto it = pages_.find(index); it != pages_.end()) return it->second->page.get();
  evict_if_over_budget();
  auto p = std::make_unique<Page>();
  if (index == 0 && !header_written_) {
    *p->page = MetaPage::fresh(id_, 0, layout_.block_size());  // not on disk yet: an empty file's
  } else if (index >= layout_.page_count(size_)) {
    // Past the end of the file: whatever is there is stale; start a fresh page.
    if (!beyond_eof_ok) return fail(index * kBlocksPerGroup, Status(Code::kInternal, "page past end of file"));
    *p->page = MetaPage::fresh(id_, index, layout_.block_size());
  } else {
    IoRequest req{fd_, p->page->data(), kMetaPageSize, layout_.page_offset(index), false, 0};
    route({&req, 1});
    ENVELOPEFS_RETURN_IF_ERROR(io_.run({&req, 1}));
    if (req.done != kMetaPageSize) {
      return fail(index * kBlocksPerGroup, Status(Code::kAuthFailed, "metadata page missing (backing file truncated)"));
    }
    Status st = p->page->verify(keys_, id_, index);
    if (!st.ok()) return fail(index * kBlocksPerGroup, st);
  }
  return cache_page(index, std::move(p))->page.get();
}

Status CipherFile::read_block(uint64_t index, uint32_t len, uint8_t* out, int* current) {
  Slot slots[2];
  {
    std::lock_guard lock(cache_mu_);
    auto pg = page(Layout::page_of(index), false);
    if (!pg.ok()) return pg.status();
    slots[0] = (*pg)->slot(Layout::entry_of(index), 0);
    slots[1] = (*pg)->slot(Layout::entry_of(index), 1);
  }
  *current = -1;
  if (slots[0].empty() && slots[1].empty()) {
    std::memset(out, 0, len);
    return Status::Ok();
  }
  const int newer = newer_slot(slots[0], slots[1]);
  Status st;
  for (int which : {newer, 1 - newer}) {
    if (slots[which].empty()) continue;
    IoRequest req{fd_, out, len, layout_.data_offset(index), false, 0};
    route({&req, 1});
    ENVELOPEFS_RETURN_IF_ERROR(io_.run({&req, 1}));
    if (req.done != len) return fail(index, Status(Code::kAuthFailed, "data block truncated"));
    st = open_block(keys_, id_, index, slots[which], {out, len}, out);
    if (st.ok()) {
      *current = which;
      return st;
    }
  }
  std::vector<uint8_t> put_back;
  *current = open_interrupted_growth(index, len, slots, out, &put_back);
  if (*current < 0) return fail(index, st);
  if (!put_back.empty()) {
    // The data area holds the other slot's ciphertext, which only that slot's key makes
    // sense of: whichever slot the caller's write replaces, a crash between its page and its
    // data would leave neither. So the ciphertext of the slot that matches goes back first,
    // durably.
    IoRequest back{fd_, put_back.data(), len, layout_.data_offset(index), true, 0};
    st = io_.run({&back, 1});
    if (st.ok() && back.done != len) st = Status::Io(EIO, "short write putting a block back");
    if (st.ok()) st = io_.sync(fd_, true);
    if (!st.ok()) {
      std::memset(out, 0, len);
      return fail(index, st);
    }
  }
  return Status::Ok();
}

int CipherFile::open_interrupted_growth(uint64_t index, uint32_t len, const Slot slots[2], uint8_t* out,
                                        std::vector<uint8_t>* put_back) {
  thread_local std::vector<uint8_t> cipher;
  cipher.resize(len);
  IoRequest req{fd_, cipher.data(), len, layout_.data_offset(index), false, 0};
  if (!io_.run({&req, 1}).ok() || req.done != len) return -1;
  const int newer = newer_slot(slots[0], slots[1]);
  // The length landed, the data did not. Bytes past a file's end read as zeros once the end
  // moves (POSIX), so the short ciphertext ends at or after the last non-zero byte: 16 more
  // lengths cover the chance (2^-128) that it ended in zeros of its own. Only a message
  // sealed at that length under the slot's one-time key authenticates, so this accepts
  // nothing that was not written so.
  constexpr uint32_t kTrailingZerosTried = 16;
  uint32_t n = len;
  while (n > 0 && cipher[n - 1] == 0) --n;
  for (uint32_t s = std::max<uint32_t>(n, 1); s < len && s <= n + kTrailingZerosTried; ++s) {
    for (int which : {newer, 1 - newer}) {
      if (slots[which].empty()) continue;
      if (!open_block(keys_, id_, index, slots[which], {cipher.data(), s}, out).ok()) continue;
      std::memset(out + s, 0, len - s);
      return which;
    }
  }
  // The data landed, the length did not: the longer seal's ciphertext, cut at the old length
  // (only a short block grows in place).
  if (len >= layout_.block_size() || slots[0].empty() || slots[1].empty()) return -1;
  thread_local std::vector<uint8_t> before_cipher;
  before_cipher.resize(len);
  for (int grown : {newer, 1 - newer}) {
    const int before = 1 - grown;
    if (!open_cut_growth(keys_, id_, index, slots[grown], slots[before], cipher, out,
                         before_cipher.data()).ok()) {
      continue;
    }
    if (put_back != nullptr) put_back->assign(before_cipher.begin(), before_cipher.end());
    return before;
  }
  return -1;
}

Result<size_t> CipherFile::read(uint64_t offset, MutByteView out) {
  std::shared_lock lock(rw_);
  if (offset >= size_ || out.empty()) return size_t{0};
  const uint64_t n = std::min<uint64_t>(out.size(), size_ - offset);
  const uint32_t bs = layout_.block_size();
  const uint64_t first = offset / bs, last = (offset + n - 1) / bs;

  // Fast path for whole blocks: read the ciphertext straight into the caller's buffer and
  // decrypt in place. Edge blocks go through a scratch block.
  struct Pending {
    uint64_t index;
    uint32_t len;
    uint8_t* dst;      // where ciphertext lands and plaintext ends up
    uint64_t skip;     // for edge blocks: bytes of the block before the caller's range
    uint64_t copy;     // for edge blocks: bytes to copy out
    size_t req = SIZE_MAX;  // the request that reads it, and where in that request
    uint64_t at = 0;
    Slot slots[2];
    bool hole() const { return slots[0].empty() && slots[1].empty(); }
  };
  std::vector<Pending> blocks;
  blocks.reserve(last - first + 1);
  size_t edges = 0;
  for (uint64_t b = first; b <= last; ++b) {
    Pending p{};
    p.index = b;
    p.len = layout_.block_length(b, size_);
    uint64_t bstart = b * bs;
    uint64_t from = std::max<uint64_t>(bstart, offset), to = std::min<uint64_t>(bstart + p.len, offset + n);
    p.skip = from - bstart;
    p.copy = to - from;
    const bool whole = p.skip == 0 && p.copy == p.len;
    p.dst = whole ? out.data() + (bstart - offset) : nullptr;
    edges += !whole;
    blocks.push_back(p);
  }
  // Edge blocks (at most two) need scratch space of their own.
  std::vector<uint8_t> scratch(edges * bs);
  size_t next_edge = 0;
  for (Pending& p : blocks) {
    if (p.dst == nullptr) p.dst = scratch.data() + (next_edge++) * bs;
  }
  // Metadata pages not cached yet are read in the same batch as the data, then authenticated
  // before any slot is used. A multi-group read's pages and data runs are then one contiguous
  // preadv (posix_backend.cc), or parallel requests on the ring with --direct-backing: one
  // round trip to the disk instead of one per 128 KiB group.
  // Which pages are missing and the slots of the cached ones are taken in one critical section:
  // another reader may evict pages as soon as cache_mu_ is released.
  std::vector<std::pair<uint64_t, std::unique_ptr<Page>>> missing;
  std::vector<IoRequest> reqs;
  {
    std::lock_guard lock2(cache_mu_);
    evict_if_over_budget();
    for (uint64_t pg = Layout::page_of(first); pg <= Layout::page_of(last); ++pg) {
      if (!pages_.count(pg)) missing.emplace_back(pg, std::make_unique<Page>());
    }
    // Which blocks need their ciphertext: all of those in groups whose page is still to be
    // read (a hole there is found out afterwards), those with a slot in cached pages.
    for (Pending& p : blocks) {
      auto it = pages_.find(Layout::page_of(p.index));
      if (it != pages_.end()) {
        p.slots[0] = it->second->page->slot(Layout::entry_of(p.index), 0);
        p.slots[1] = it->second->page->slot(Layout::entry_of(p.index), 1);
        if (p.hole()) continue;
      }
      const uint64_t off = layout_.data_offset(p.index);
      // Blocks contiguous on disk (within a group) and in the buffer are one request.
      if (!reqs.empty() && reqs.back().offset + reqs.back().len == off &&
          reqs.back().buf + reqs.back().len == p.dst) {
        p.at = reqs.back().len;
        reqs.back().len += p.len;
      } else {
        reqs.push_back({fd_, p.dst, p.len, off, false, 0});
      }
      p.req = reqs.size() - 1;
    }
  }
  const size_t data_reqs = reqs.size();
  for (auto& [index, pg] : missing) {
    reqs.push_back({fd_, pg->page->data(), kMetaPageSize, layout_.page_offset(index), false, 0});
  }
  route(reqs);
  ENVELOPEFS_RETURN_IF_ERROR(io_.run(reqs));
  if (!missing.empty()) {
    std::lock_guard lock2(cache_mu_);
    for (size_t k = 0; k < missing.size(); ++k) {
      auto& [index, pg] = missing[k];
      if (reqs[data_reqs + k].done != kMetaPageSize) {
        return fail(index * kBlocksPerGroup,
                    Status(Code::kAuthFailed, "metadata page missing (backing file truncated)"));
      }
      Status st = pg->page->verify(keys_, id_, index);
      if (!st.ok()) return fail(index * kBlocksPerGroup, st);
      for (Pending& p : blocks) {
        if (Layout::page_of(p.index) != index) continue;
        p.slots[0] = pg->page->slot(Layout::entry_of(p.index), 0);
        p.slots[1] = pg->page->slot(Layout::entry_of(p.index), 1);
      }
      // Another reader may have cached the same page meanwhile (same bytes: writers are
      // excluded by rw_); the budget was checked above, a read adds at most its range's pages.
      if (!pages_.count(index)) cache_page(index, std::move(pg));
    }
  }
  for (const Pending& p : blocks) {
    if (!p.hole() && (p.req == SIZE_MAX || reqs[p.req].done < p.at + p.len)) {
      return fail(p.index, Status(Code::kAuthFailed, "data block truncated (backing file shorter than its size)"));
    }
  }
  // Decrypt every written block under its newer slot in one batch; a block whose newer slot
  // fails (a write interrupted between metadata and data) is retried under the older one.
  std::vector<BlockToOpen> opens;
  opens.reserve(blocks.size());
  std::vector<int> newer_of(blocks.size(), 0);
  for (size_t k = 0; k < blocks.size(); ++k) {
    Pending& p = blocks[k];
    if (p.hole()) continue;
    const int newer = newer_slot(p.slots[0], p.slots[1]);
    newer_of[k] = newer;
    opens.push_back({p.index, &p.slots[newer], p.dst, p.len, Status()});
  }
  open_blocks(keys_, id_, opens);
  size_t o = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    Pending& p = blocks[k];
    if (p.hole()) {
      std::memset(p.dst, 0, p.len);
    } else {
      Status st = opens[o++].result;
      const int older = 1 - newer_of[k];
      if (!st.ok() && !p.slots[older].empty()) {
        IoRequest again{fd_, p.dst, p.len, layout_.data_offset(p.index), false, 0};
        route({&again, 1});
        ENVELOPEFS_RETURN_IF_ERROR(io_.run({&again, 1}));
        if (again.done == p.len) st = open_block(keys_, id_, p.index, p.slots[older], {p.dst, p.len}, p.dst);
      }
      if (!st.ok() && open_interrupted_growth(p.index, p.len, p.slots, p.dst, nullptr) >= 0) {
        st = Status::Ok();
      }
      if (!st.ok()) return fail(p.index, st);
    }
    uint8_t* final_dst = out.data() + (p.index * bs + p.skip - offset);
    if (p.dst != final_dst) std::memcpy(final_dst, p.dst + p.skip, p.copy);
  }
  return static_cast<size_t>(n);
}

Status CipherFile::write_blocks(uint64_t first, uint64_t count, const uint8_t* plain,
                                uint32_t last_len, const int* current, WriteBatch& batch) {
  const uint32_t bs = layout_.block_size();
  const uint64_t old_count = layout_.block_count(size_);
  batch.buffers.push_back(BufferPool::take((count - 1) * bs + last_len));  // uninitialised
  uint8_t* cipher = batch.buffers.back().data();
  std::vector<Slot> sealed(count);
  Status sst = seal_blocks(keys_, id_, first, count, bs, last_len, plain, cipher, sealed.data());
  if (!sst.ok()) return fail(first, sst);
  std::lock_guard lock(cache_mu_);
  for (uint64_t k = 0; k < count; ++k) {
    const uint64_t b = first + k;
    const uint32_t len = k + 1 == count ? last_len : bs;
    auto pg = page(Layout::page_of(b), true);
    if (!pg.ok()) return pg.status();
    MetaPage& mp = **pg;
    Page* holder = pages_[Layout::page_of(b)].get();
    holder->dirty = true;
    batch.dirty[Layout::page_of(b)] = holder;
    const uint64_t e = Layout::entry_of(b);
    if (b >= old_count) mp.clear_entry(e);  // stale slots past the old end of file
    const Slot s[2] = {mp.slot(e, 0), mp.slot(e, 1)};
    const int newer = newer_slot(s[0], s[1]);
    // Keep the slot that matches the data when known; otherwise overwrite the older (or empty) one.
    const int target = current[k] >= 0 ? 1 - current[k] : 1 - newer;
    Slot fresh = sealed[k];
    fresh.seq = seq_next(s[newer].seq);
    mp.set_slot(e, target, fresh);
    // A hole inside the file has no old slot to fall back on: its data goes first, and it
    // reads as zeros until the page lands (fs/FORMAT.md, "The two-slot rule").
    const bool hole = b < old_count && s[0].empty() && s[1].empty();
    std::vector<IoRequest>& runs = hole ? batch.holes : batch.data;
    // Data blocks of one group are contiguous: extend the previous request when possible.
    uint64_t off = layout_.data_offset(b);
    if (!runs.empty() && runs.back().offset + runs.back().len == off &&
        runs.back().buf + runs.back().len == cipher + k * bs) {
      runs.back().len += len;
    } else {
      runs.push_back({fd_, cipher + k * bs, len, off, true, 0});
    }
  }
  return Status::Ok();
}

Status CipherFile::flush(WriteBatch& batch) {
  // Writes within the backing file's present length: pages, then the data they describe.
  // Writes past it make the file longer, and its length is what says how long its last blocks
  // are: they go one after the other, lowest offset first, so the file never reaches past a
  // block whose data has not landed (a page further on, written first, would have made a
  // short last block full length before its full-length data was there, and a crash then
  // left it unreadable under both slots).
  const uint64_t end = backing_end(size_);
  std::vector<IoRequest> pages, data, growth;
  {
    std::lock_guard lock(cache_mu_);
    for (auto& [index, p] : batch.dirty) {
      ENVELOPEFS_RETURN_IF_ERROR(p->page->seal(keys_));
      const uint64_t at = layout_.page_offset(index);
      IoRequest page{fd_, p->page->data(), kMetaPageSize, at, true, 0};
      (at + kMetaPageSize <= end ? pages : growth).push_back(page);
    }
  }
  for (const IoRequest& d : batch.data) (d.offset + d.len <= end ? data : growth).push_back(d);
  std::sort(growth.begin(), growth.end(),
            [](const IoRequest& a, const IoRequest& b) { return a.offset < b.offset; });
  route(batch.holes);
  route(pages);
  route(data);
  route(growth);
  // Holes first: a failure there (ENOSPC, since a hole takes new space) changes no page.
  if (!batch.holes.empty()) ENVELOPEFS_RETURN_IF_ERROR(io_.run(batch.holes));
  ENVELOPEFS_RETURN_IF_ERROR(io_.run_ordered(pages, data));
  ENVELOPEFS_RETURN_IF_ERROR(io_.run_in_order(growth));
  if (batch.dirty.contains(0)) header_written_ = true;
  std::lock_guard lock(cache_mu_);
  for (auto& [index, p] : batch.dirty) p->dirty = false;
  batch.dirty.clear();
  batch.holes.clear();
  batch.data.clear();
  batch.release_buffers();
  return Status::Ok();
}

void CipherFile::prefetch_pages(uint64_t from, uint64_t count) {
  if (dfd_ >= 0) return;  // O_DIRECT reads bypass the page cache
  uint64_t end;
  {
    std::shared_lock lock(rw_);
    end = std::min(backing_end(size_) == 0 ? 0 : layout_.page_count(size_), from + count);
  }
  // All asked for at once, 4 KiB each: read one by one, every miss would also read ahead into
  // the data blocks after it, which the re-wrap never needs.
  for (uint64_t p = from; p < end; ++p) {
    (void)posix_fadvise(fd_, static_cast<off_t>(layout_.page_offset(p)), kMetaPageSize, POSIX_FADV_WILLNEED);
  }
  alignas(kMetaPageSize) static thread_local uint8_t scratch[kMetaPageSize];
  for (uint64_t p = from; p < end; ++p) {
    (void)!pread(fd_, scratch, kMetaPageSize, static_cast<off_t>(layout_.page_offset(p)));
  }
}

Result<uint64_t> CipherFile::rewrap_keys(uint64_t from, uint64_t max_pages, uint64_t* read, uint64_t* written) {
  std::unique_lock lock(rw_);
  const uint64_t end = backing_end(size_) == 0 ? 0 : layout_.page_count(size_);
  const uint64_t stop = std::min(end, from + max_pages);
  WriteBatch batch;
  std::vector<uint64_t> loaded;  // pages not cached before this call
  Status st;
  {
    std::lock_guard cache(cache_mu_);
    for (uint64_t p = from; p < stop && st.ok(); ++p) {
      if (!pages_.contains(p)) loaded.push_back(p);
      auto pg = page(p, false);
      if (!pg.ok()) {
        st = pg.status();
        break;
      }
      if (!needs_rewrap(keys_, **pg)) continue;
      auto changed = rewrap_slots(keys_, **pg);
      if (!changed.ok()) {
        st = fail(p * kBlocksPerGroup, changed.status());
        // This page may be half re-wrapped in memory: it goes with the batch's below.
        Page* holder = pages_[p].get();
        holder->dirty = true;
        batch.dirty[p] = holder;
        break;
      }
      Page* holder = pages_[p].get();
      holder->dirty = true;
      batch.dirty[p] = holder;
    }
  }
  const size_t rewrapped = batch.dirty.size();
  if (st.ok()) st = flush(batch);
  if (!st.ok()) {
    abandon(batch);
    return st;
  }
  *written += rewrapped;
  if (stop > from) *read += stop - from;
  std::lock_guard cache(cache_mu_);
  for (uint64_t p : loaded) {
    if (p == 0) continue;  // the header stays, as it does for every open file
    auto it = pages_.find(p);
    if (it != pages_.end() && !it->second->dirty) {
      pages_.erase(it);
      g_cached_pages--;
    }
  }
  return stop >= end ? kRewrapDone : stop;
}

Status CipherFile::count_key_versions(std::map<uint32_t, uint64_t>* keys, std::map<uint32_t, uint64_t>* pages) {
  std::shared_lock lock(rw_);
  const uint64_t end = backing_end(size_) == 0 ? 0 : layout_.page_count(size_);
  std::lock_guard cache(cache_mu_);
  for (uint64_t p = 0; p < end; ++p) {
    auto pg = page(p, false);
    if (!pg.ok()) return pg.status();
    (*pages)[(*pg)->mac_version()]++;
    for (uint64_t e = 0; e < kBlocksPerGroup; ++e) {
      for (int which = 0; which < 2; ++which) {
        Slot slot = (*pg)->slot(e, which);
        if (!slot.empty()) (*keys)[slot.dek_version]++;
      }
    }
  }
  return Status::Ok();
}

void CipherFile::abandon(WriteBatch& batch) {
  // The cached pages may differ from the disk now; forget them, they are re-read.
  std::lock_guard lock(cache_mu_);
  for (auto& [index, p] : batch.dirty) g_cached_pages.fetch_sub(pages_.erase(index));
  batch.dirty.clear();
}

Status CipherFile::clear_entries(uint64_t from, uint64_t to, WriteBatch& batch) {
  for (uint64_t b = from; b < to;) {
    const uint64_t p = Layout::page_of(b);
    const uint64_t page_end = std::min<uint64_t>(to, (p + 1) * kBlocksPerGroup);
    {
      std::lock_guard lock(cache_mu_);
      auto pg = page(p, true);
      if (!pg.ok()) return pg.status();
      Page* holder = pages_[p].get();
      holder->dirty = true;
      batch.dirty[p] = holder;
      for (; b < page_end; ++b) (*pg)->clear_entry(Layout::entry_of(b));
    }
    // A long sparse extension materialises many pages; write them out as we go so the cache
    // stays bounded. Pages alone may go first: they only describe holes.
    if (batch.dirty.size() >= 64 && batch.data.empty() && batch.holes.empty()) {
      ENVELOPEFS_RETURN_IF_ERROR(flush(batch));
    }
  }
  return Status::Ok();
}

Status CipherFile::clear_entries_after_tail(uint64_t from, uint64_t to, WriteBatch& batch) {
  // A re-sealed last block goes out first: clear_entries writes the pages it makes as it goes
  // (past the file's end, they lengthen it) only while the batch holds no data, or the batch
  // of a long sparse growth from a short last block held every page at once (a truncate to
  // 16 GiB: 97 s and 590 MB).
  if (!batch.data.empty() || !batch.holes.empty()) ENVELOPEFS_RETURN_IF_ERROR(flush(batch));
  return clear_entries(from, to, batch);
}

Status CipherFile::check_growth(uint64_t new_size) {
  const uint64_t have = backing_end(size_) == 0 ? 0 : layout_.page_count(size_);
  const uint64_t need = layout_.page_count(new_size);
  if (need <= have + kQuickGrowthPages) return Status::Ok();
  const uint64_t last_page = layout_.page_offset(need - 1);
  if (last_page > static_cast<uint64_t>(INT64_MAX) - kMetaPageSize) {
    return Status::Io(EFBIG, "growth to " + std::to_string(new_size) + " bytes: past any backing file offset");
  }
  bool room = true;
  const uint64_t pages_bytes = (need - have) * kMetaPageSize;
  struct statvfs vfs;
  if (fstatvfs(fd_, &vfs) == 0) {
    // What an unprivileged writer may use: the blocks ext4 keeps back for root are not for
    // metadata pages of a file nobody may ever write.
    room = vfs.f_bavail >= pages_bytes / vfs.f_frsize + 1;
  }
  if (!room) {
    // Refused either way; only which refusal is asked of the backing filesystem, without
    // reserving anything: a hole punched past the end changes nothing, and the kernel refuses
    // it with EFBIG past the maximum file size (vfs_fallocate's own check, before the
    // filesystem's), as truncate(2) and pjdfstest's truncate/12.t want for such a size.
    ENVELOPEFS_RETURN_IF_ERROR(io_.punch_hole(fd_, last_page, kMetaPageSize));
    return Status::Io(ENOSPC, "growth to " + std::to_string(new_size) + " bytes needs " +
                                  std::to_string(pages_bytes >> 20) + " MiB of metadata pages");
  }
  // The last page the growth writes, reserved (not written: the size stays) where it will go.
  // This is the backing filesystem's own answer to "can a file be this long" (EFBIG past ext4's
  // 16 TiB), before a page is written, instead of after gigabytes of them. Last of the checks,
  // so a refusal leaves nothing reserved; a growth that fails later takes it back with the
  // pages it wrote (its truncate back to the old end).
  return io_.reserve(fd_, last_page, kMetaPageSize);
}

Status CipherFile::resize_tail_block(uint64_t old_size, uint64_t new_size, WriteBatch& batch) {
  const uint32_t bs = layout_.block_size();
  const uint64_t t = (std::min(old_size, new_size) - 1) / bs;
  std::vector<uint8_t> buf(bs, 0);
  int current = -1;
  const uint32_t old_len = layout_.block_length(t, old_size), new_len = layout_.block_length(t, new_size);
  ENVELOPEFS_RETURN_IF_ERROR(read_block(t, old_len, buf.data(), &current));
  ENVELOPEFS_RETURN_IF_ERROR(write_blocks(t, 1, buf.data(), new_len, &current, batch));
  if (new_len < old_len && !batch.data.empty() && batch.data.back().offset == layout_.data_offset(t)) {
    // Shrinking: the shorter ciphertext goes out with zeros over the rest of the block's old
    // length, in one write. Until the backing truncate lands, the block then reads at its old
    // length as the shorter content followed by zeros (open_interrupted_growth), never as neither.
    IoRequest& q = batch.data.back();
    batch.buffers.push_back(BufferPool::take(old_len));
    uint8_t* padded = batch.buffers.back().data();
    std::memcpy(padded, q.buf, q.len);
    std::memset(padded + q.len, 0, old_len - q.len);
    q.buf = padded;
    q.len = old_len;
  }
  return Status::Ok();
}

Status CipherFile::write_locked(uint64_t offset, ByteView data) {
  const uint32_t bs = layout_.block_size();
  const uint64_t old_size = size_, end = offset + data.size();
  const uint64_t new_size = std::max(old_size, end);
  const uint64_t first = offset / bs, last = (end - 1) / bs;
  const uint64_t old_count = layout_.block_count(old_size);
  WriteBatch batch;
  Status st;
  // 0. Growth: claim the space first, so running out of it changes nothing.
  if (new_size > old_size) {
    ENVELOPEFS_RETURN_IF_ERROR(check_growth(new_size));
    const uint64_t to = layout_.backing_size(new_size);
    // The first write of an empty file, below one step, reserves nothing: there is no old content
    // for a failure to spoil, and the failure path below truncates back to empty. A
    // fallocate per file was 8% of the daemon's syscall time in a copy of small files.
    const bool first_small_write = old_size == 0 && to <= kReserveStep;
    if (to > reserved_end_ && !first_small_write) {
      // A write that leaves a gap reserves from its own group on: the gap stays a hole on the
      // backing filesystem too (its data areas are never written; its pages are 4 KiB each).
      const uint64_t gap_end = first > old_count ? layout_.page_offset(Layout::page_of(first)) : 0;
      const uint64_t from = std::max({reserved_end_, backing_end(old_size), gap_end});
      // Small files reserve exactly what they need (most files never reach a step, and then
      // nothing is left to trim at close); a file past one step reserves a step ahead.
      const uint64_t upto = to < kReserveStep ? to : (to + kReserveStep - 1) / kReserveStep * kReserveStep;
      st = io_.reserve(fd_, from, upto - from);
      uint64_t reached = upto;
      if (!st.ok() && st.code() == Code::kNoSpace && upto > to) {
        st = io_.reserve(fd_, from, to - from);  // the whole step did not fit; this write may
        reached = to;
      }
      if (!st.ok()) return st;
      reserved_end_ = reached;
    }
  }
  // 1. A partial tail block that this write does not reach grows to full length.
  if (old_size % bs != 0 && first > (old_size - 1) / bs) {
    st = resize_tail_block(old_size, std::min<uint64_t>(new_size, ((old_size - 1) / bs + 1) * bs), batch);
  }
  // 2. Blocks between the old end and this write become authenticated holes.
  if (st.ok() && first > old_count) st = clear_entries_after_tail(old_count, first, batch);
  // 3. The blocks themselves; edge blocks that hold other data are read, merged, re-sealed.
  const uint64_t count = last - first + 1;
  const uint32_t last_len = layout_.block_length(last, new_size);
  AlignedBuffer plain;
  std::vector<int> current(count, -1);
  // Blocks about to be overwritten whole whose current slot is not known: find it by reading,
  // so the new slot never replaces the only one that matches the data on disk.
  for (uint64_t k = 0; st.ok() && k < count; ++k) {
    const uint64_t b = first + k;
    if (b >= old_count || (b < verified_.size() && verified_[b])) continue;
    const uint64_t bstart = b * bs;
    if (offset > bstart || end < bstart + layout_.block_length(b, new_size)) continue;  // merged below
    bool both;
    {
      std::lock_guard lock(cache_mu_);
      auto pg = page(Layout::page_of(b), false);
      if (!pg.ok()) {
        st = pg.status();
        break;
      }
      both = !(*pg)->slot(Layout::entry_of(b), 0).empty() && !(*pg)->slot(Layout::entry_of(b), 1).empty();
    }
    if (both) {
      thread_local std::vector<uint8_t> probe;
      probe.resize(bs);
      st = read_block(b, layout_.block_length(b, old_size), probe.data(), &current[k]);
    }
  }
  const uint8_t* src = nullptr;
  if (st.ok() && offset % bs == 0 && data.size() == (count - 1) * bs + last_len) {
    src = data.data();  // block-aligned: seal straight from the caller's buffer
  } else if (st.ok()) {
    // Only the two edge blocks can hold bytes this write does not bring: zero them, then read
    // what they hold now; the data covers everything else.
    plain = BufferPool::take((count - 1) * bs + last_len);
    std::memset(plain.data(), 0, count == 1 ? last_len : bs);
    if (count > 1) std::memset(plain.data() + (count - 1) * bs, 0, last_len);
    for (uint64_t k : {uint64_t{0}, count - 1}) {
      const uint64_t b = first + k;
      const uint64_t bstart = b * bs;
      const uint32_t len_new = layout_.block_length(b, new_size);
      bool covered = offset <= bstart && end >= bstart + len_new;
      if (!covered && b < old_count) {
        st = read_block(b, layout_.block_length(b, old_size), plain.data() + k * bs, &current[k]);
        if (!st.ok()) break;
      }
      if (count == 1) break;
    }
    if (st.ok()) std::memcpy(plain.data() + (offset - first * bs), data.data(), data.size());
    src = plain.data();
  }
  if (st.ok()) st = write_blocks(first, count, src, last_len, current.data(), batch);
  if (st.ok()) st = flush(batch);
  if (plain.capacity() != 0) BufferPool::give(std::move(plain));
  if (!st.ok()) {
    abandon(batch);
    if (new_size > old_size) take_back_growth(old_size, new_size);
    return st;
  }
  size_ = new_size;
  if (verified_.size() < last + 1) verified_.resize(last + 1, false);
  for (uint64_t b = first; b <= last; ++b) verified_[b] = true;
  return Status::Ok();
}

void CipherFile::take_back_growth(uint64_t old_size, uint64_t new_size) {
  const uint32_t bs = layout_.block_size();
  struct stat st;
  const bool grew = fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) > backing_end(old_size);
  const uint64_t keep = old_size % bs == 0 || !grew ? old_size : std::min(new_size, (old_size / bs + 1) * bs);
  // The truncate also gives back what was reserved past the end: the next growth reserves again.
  (void)io_.truncate(fd_, backing_end(keep));
  reserved_end_ = backing_end(keep);
  size_ = keep;
}

Status CipherFile::write(uint64_t offset, ByteView data) {
  if (data.empty()) return Status::Ok();
  std::unique_lock lock(rw_);
  return write_locked(offset, data);
}

Status CipherFile::truncate(uint64_t new_size) {
  std::unique_lock lock(rw_);
  return truncate_locked(new_size);
}

Status CipherFile::allocate(uint64_t offset, uint64_t len, bool keep_size) {
  std::unique_lock lock(rw_);
  if (len == 0) return Status::Ok();
  const uint64_t end = offset + len;
  // Whole groups from the first block's metadata page on: the pages a growth writes fall in the
  // reserved range too. Reserving first means running out of space changes nothing.
  const uint64_t from = layout_.page_offset(Layout::page_of(offset / layout_.block_size()));
  const uint64_t to = layout_.backing_size(end);
  ENVELOPEFS_RETURN_IF_ERROR(io_.reserve(fd_, from, to - from));
  if (keep_size) {
    // Asked for past the end: the space stays reserved after the last close too, as on the
    // backing filesystem (only the step reserved ahead of growing writes is given back).
    if (to > backing_end(size_)) keep_past_end_ = true;
    if (from <= reserved_end_) reserved_end_ = std::max(reserved_end_, to);  // contiguous only
    return Status::Ok();
  }
  if (end <= size_) return Status::Ok();
  const uint64_t old_size = size_;
  ENVELOPEFS_RETURN_IF_ERROR(truncate_locked(end));
  reserved_end_ = std::max(reserved_end_, to);
  // Only a speed-up: the file is complete without it, so a failure here is not the caller's.
  if (end - old_size <= kZeroFillMax) (void)zero_fill(layout_.block_count(old_size), layout_.block_count(end));
  return Status::Ok();
}

Status CipherFile::zero_fill(uint64_t first, uint64_t end) {
  // The entries of these blocks say "hole" already (written by the growth before this), so
  // what their data areas hold is never read: zeros here only turn the backing filesystem's
  // unwritten extents into written ones. A crash part way leaves holes that read as zeros.
  const uint32_t bs = layout_.block_size();
  AlignedBuffer zeros(kBlocksPerGroup * bs);
  std::memset(zeros.data(), 0, kBlocksPerGroup * bs);
  std::vector<IoRequest> batch;
  for (uint64_t b = first; b < end;) {
    const uint64_t stop = std::min(end, (Layout::page_of(b) + 1) * kBlocksPerGroup);
    IoRequest q;
    q.buf = zeros.data();
    q.offset = layout_.data_offset(b);
    q.len = layout_.data_offset(stop - 1) + layout_.block_length(stop - 1, size_) - q.offset;
    q.write = true;
    batch.push_back(q);
    b = stop;
    if (batch.size() == 32 || b == end) {  // 32 groups: 4 MiB of zeros per submission at 4 KiB blocks
      route(batch);
      ENVELOPEFS_RETURN_IF_ERROR(io_.run(batch));
      batch.clear();
    }
  }
  return Status::Ok();
}

Status CipherFile::truncate_locked(uint64_t new_size) {
  const uint32_t bs = layout_.block_size();
  const uint64_t old_size = size_;
  if (new_size == old_size) {
    // Nothing to re-seal, but the backing truncate still runs: it updates the times as a
    // truncate on ext4 does (even to the same size), and gives back space reserved past the end.
    ENVELOPEFS_RETURN_IF_ERROR(io_.truncate(fd_, backing_end(size_)));
    reserved_end_ = backing_end(size_);
    return Status::Ok();
  }
  if (new_size > old_size) ENVELOPEFS_RETURN_IF_ERROR(check_growth(new_size));
  WriteBatch batch;
  Status st;
  if (new_size > old_size) {
    if (old_size % bs != 0) st = resize_tail_block(old_size, new_size, batch);
    const uint64_t from = layout_.block_count(old_size), to = layout_.block_count(new_size);
    if (st.ok()) st = clear_entries_after_tail(from, to, batch);
  } else {
    const uint64_t new_count = layout_.block_count(new_size);
    if (new_size % bs != 0) st = resize_tail_block(old_size, new_size, batch);
    // Entries past the new end in the last remaining page must not come back to life.
    const uint64_t page_end = (Layout::page_of(new_count == 0 ? 0 : new_count - 1) + 1) * kBlocksPerGroup;
    if (st.ok()) st = clear_entries(new_count, std::min(page_end, layout_.block_count(old_size)), batch);
  }
  if (st.ok()) st = flush(batch);
  if (st.ok()) st = io_.truncate(fd_, backing_end(new_size));
  if (!st.ok()) {
    abandon(batch);
    // A long growth writes its pages as it goes, each past the old end: take them back.
    if (new_size > old_size) take_back_growth(old_size, new_size);
    return st;
  }
  size_ = new_size;
  reserved_end_ = backing_end(new_size);  // truncate releases what lay beyond
  if (verified_.size() > layout_.block_count(new_size)) verified_.resize(layout_.block_count(new_size));
  std::lock_guard lock2(cache_mu_);
  const uint64_t pages = layout_.page_count(new_size);
  g_cached_pages.fetch_sub(std::erase_if(pages_, [&](const auto& kv) { return kv.first >= pages; }));
  return Status::Ok();
}

Status CipherFile::punch_hole(uint64_t offset, uint64_t len) {
  std::unique_lock lock(rw_);
  const uint32_t bs = layout_.block_size();
  if (offset >= size_ || len == 0) return Status::Ok();
  const uint64_t end = std::min(size_, offset + len);
  const uint64_t full_first = (offset + bs - 1) / bs;
  const uint64_t full_end = end == size_ ? layout_.block_count(size_) : end / bs;
  // Partial blocks at either edge are rewritten with zeros in the range.
  std::vector<uint8_t> zeros(bs, 0);
  if (offset % bs != 0) {
    uint64_t stop = std::min(end, (offset / bs + 1) * bs);
    ENVELOPEFS_RETURN_IF_ERROR(write_locked(offset, {zeros.data(), stop - offset}));
  }
  if (end % bs != 0 && end != size_ && end / bs >= full_first) {
    ENVELOPEFS_RETURN_IF_ERROR(write_locked(end / bs * bs, {zeros.data(), end % bs}));
  }
  if (full_first >= full_end) return Status::Ok();
  WriteBatch batch;
  Status st = clear_entries(full_first, full_end, batch);
  if (st.ok()) st = flush(batch);
  if (!st.ok()) {
    abandon(batch);
    return st;
  }
  // The entries say "hole" now; releasing the ciphertext is only space accounting.
  for (uint64_t b = full_first; b < full_end;) {
    uint64_t stop = std::min(full_end, (Layout::page_of(b) + 1) * kBlocksPerGroup);
    uint64_t from = layout_.data_offset(b);
    uint64_t to = layout_.data_offset(stop - 1) + layout_.block_length(stop - 1, size_);
    (void)io_.punch_hole(fd_, from, to - from);
    b = stop;
  }
  return Status::Ok();
}

Status CipherFile::sync(bool data_only) {
  // No lock: every write this fsync must cover returned before the FSYNC request was sent,
  // and its bytes are in the backing file's page cache (or on disk, for O_DIRECT) by then.
  // Holding rw_ here made writes to the file wait for the disk flush: PostgreSQL's WAL
  // writers queued behind each other's commits.
  return io_.sync(fd_, data_only);
}

}  // namespace envelopefs
