// One encrypted backing file seen as plaintext: read, write, truncate, punch, sync. The data
// path of a FUSE read or write runs through here: block mapping (layout.h) → metadata page
// (cached, authenticated) → IoBackend batch → block_codec seal/open.
//
// Locking: `rw_` (shared for reads, exclusive for anything that changes the file) is taken
// before `cache_mu_`, which only guards the page cache.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "fs/block_codec.h"
#include "fs/io_backend.h"
#include "fs/layout.h"
#include "fs/page_pool.h"

namespace envelopefs {

struct WriteBatch;

class CipherFile {
 public:
  // A new file in an empty backing file. Nothing is written until the first change: page 0
  // (the header) goes out with it, and a file never written stays an empty backing file.
  static Result<std::unique_ptr<CipherFile>> create(int fd, VolumeKeys& keys, IoBackend& io);
  // Reads and authenticates the header page. The fd stays owned by the caller. With
  // `prefetch`, the first `prefetch` bytes of the backing file are read ahead in the same disk
  // request as the header (for an opener that is going to read).
  static Result<std::unique_ptr<CipherFile>> open(int fd, VolumeKeys& keys, IoBackend& io,
                                                  uint64_t prefetch = 0);

  const FileId& id() const { return id_; }
  // A second descriptor of the same backing file opened O_DIRECT: requests whose buffer,
  // offset and length are all 4 KiB-aligned (whole blocks, metadata pages) go through it and
  // bypass the backing page cache, so plaintext is not cached twice. -1: none. The caller keeps
  // ownership. Mixing is coherent: the kernel flushes and invalidates cached pages around
  // direct I/O.
  void set_direct_fd(int direct_fd) { dfd_ = direct_fd; }
  uint64_t size() const;
  int fd() const { return fd_; }

  // Returns the bytes read (short only at end of file). kAuthFailed names the block.
  Result<size_t> read(uint64_t offset, MutByteView out);
  Status write(uint64_t offset, ByteView data);
  Status truncate(uint64_t new_size);
  // fallocate: reserves backing space for [offset, offset+len), data blocks and their
  // metadata pages, so later writes there cannot fail for want of space (posix_fallocate's
  // promise), then grows the file to offset+len unless `keep_size`. Out of space: nothing
  // changed. A growth of at most kZeroFillMax also has zeros written to its data areas; see
  // there.
  Status allocate(uint64_t offset, uint64_t len, bool keep_size);
  // Reserved space is an unwritten extent on the backing filesystem, and our metadata pages,
  // written into it every 128 KiB, cut it into two extents per group: too many for the
  // inode, so every later write there changes an extent-tree block as well, one more disk
  // write at each fdatasync of a preallocated log. Writing zeros over the data areas up front
  // makes those writes plain overwrites (db log job: 5.0 → 4.0 disk writes per append,
  // bench/README). Past this size the zeros would cost more than they save, and a large
  // preallocation is rarely a log that is fsynced block by block.
  static constexpr uint64_t kZeroFillMax = uint64_t{128} << 20;
  // Makes [offset, offset+len) read as zeros without changing the size.
  Status punch_hole(uint64_t offset, uint64_t len);
  Status sync(bool data_only);

  // DEK rotation (fs/block_rewrap.h): re-wraps under the active DEK the block keys of metadata
  // pages [from, from+max_pages) that an older DEK version wraps, and seals those pages again
  // (their MAC moves to the active DEK). Writes metadata pages only: data blocks are neither
  // read nor written. Holds the file exclusively while it works. Returns the page to continue
  // from, or kRewrapDone when the file has no page left; adds the pages looked at to `read` and
  // those rewritten to `written`. Pages read only for this are not kept in the cache.
  Result<uint64_t> rewrap_keys(uint64_t from, uint64_t max_pages, uint64_t* read, uint64_t* written);
  // Brings metadata pages [from, from+count) into the backing page cache without holding the
  // file, so that rewrap_keys() holds it for memory work only (a page that changes meanwhile
  // is simply read again). Advice: errors are ignored.
  void prefetch_pages(uint64_t from, uint64_t count);
  static constexpr uint64_t kRewrapDone = ~uint64_t{0};
  // Adds, per DEK version, how many block keys (non-empty slots) of this file it wraps, and
  // how many of its metadata pages are sealed under it.
  Status count_key_versions(std::map<uint32_t, uint64_t>* keys, std::map<uint32_t, uint64_t>* pages);

  // Cached metadata pages are bounded for the whole process: 16384 pages (64 MiB), enough to
  // describe 2 GiB of file data at 4 KiB blocks. A file over its share evicts its own clean pages.
  static constexpr size_t kPageBudget = 16384;
  // Sets that process-wide budget (tests lower it to exercise eviction).
  static void set_page_budget(size_t pages);
  // Growing writes of a file past this size reserve backing space in steps of it (one
  // fallocate per MiB appended instead of one per write); what is left past the end at the
  // last close is given back.
  static constexpr uint64_t kReserveStep = 1 << 20;
  ~CipherFile();

  struct Page {
    PagePool::Ptr page = PagePool::make();  // in a pool slot (fs/page_pool.h)
    bool dirty = false;  // changed in memory, not yet written; never evicted
  };

 private:
  CipherFile(int fd, VolumeKeys& keys, IoBackend& io, const FileId& id, uint64_t backing_size);

  // Loads (cached) and authenticates page `index`; cache_mu_ must be held. A page past the end
  // of the file is stale by definition and comes back fresh (only when `beyond_eof_ok`).
  Result<MetaPage*> page(uint64_t index, bool beyond_eof_ok);
  // Adds a page to the cache (and to the process-wide count); cache_mu_ held or no sharing yet.
  Page* cache_page(uint64_t index, std::unique_ptr<Page> page);
  // Drops half of this file's clean pages when the process is over kPageBudget; cache_mu_ held.
  void evict_if_over_budget();
  // Decrypts block `index` (whose stored length is `len`) into `out`, for a writer: `current`
  // receives the slot that matches the data on disk (-1 for a hole), which the write must not
  // replace. A block found in the second state below is first put back as that slot sealed it.
  Status read_block(uint64_t index, uint32_t len, uint8_t* out, int* current);
  // Both slots of block `index` failed at its length `len`. The block may be a short last
  // block that a crash caught part way through its growth in place (fs/FORMAT.md, "Growing"):
  // the file's new length landed and the data did not (the data area holds the short
  // ciphertext and zeros behind it), or the data landed and the length did not (it holds the
  // longer ciphertext, cut at the old length). Tries the slots in both states; returns the
  // slot whose plaintext, as it stood before the growth, is now in `out` (then zeros to `len`),
  // or -1. In the second state `put_back` (if given) receives that slot's own ciphertext.
  int open_interrupted_growth(uint64_t index, uint32_t len, const Slot slots[2], uint8_t* out,
                              std::vector<uint8_t>* put_back);
  // Seals blocks [first, first+count) from `plain` (back to back; the last one `last_len`
  // long) into `batch`: slots in dirty pages, ciphertext as data requests. `current[k]` is the
  // slot known to match block k's data (-1: unknown), which the new slot must not replace.
  Status write_blocks(uint64_t first, uint64_t count, const uint8_t* plain, uint32_t last_len,
                      const int* current, WriteBatch& batch);
  // Writes the batch: every dirty page (sealed) strictly before the data it describes, and
  // what lengthens the file in offset order.
  Status flush(WriteBatch& batch);
  void abandon(WriteBatch& batch);
  // Makes entries [from, to) holes, materialising any pages in between (file growth).
  Status clear_entries(uint64_t from, uint64_t to, WriteBatch& batch);
  // The same for a growth, after writing out what the batch holds so far (the re-sealed last
  // block), so that the pages can be written as they are made.
  Status clear_entries_after_tail(uint64_t from, uint64_t to, WriteBatch& batch);
  // Before a growth to `new_size` writes the all-hole pages of the groups it adds (4 KiB per
  // 128 KiB of growth, so a truncate to 1 TiB writes 32 GiB of them): refuses at once, having
  // changed nothing, a size the backing filesystem cannot hold (EFBIG) or pages that would not
  // fit in its free space (ENOSPC). A growth that adds at most kQuickGrowthPages pages (32 MiB
  // of file at 4 KiB blocks) skips the checks.
  Status check_growth(uint64_t new_size);
  static constexpr uint64_t kQuickGrowthPages = 256;
  // Re-seals the block holding the smaller of the two sizes at its length under the new size
  // (shrinking: with zeros over the rest of its old length, in the same write).
  Status resize_tail_block(uint64_t old_size, uint64_t new_size, WriteBatch& batch);
  Status write_locked(uint64_t offset, ByteView data);
  // After a growth from `old_size` towards `new_size` failed part way: back to the old end,
  // but not into the old last block when that was short and the file got longer. Its data
  // may have been re-sealed at the longer length in place already, and cut back it would
  // match neither slot; kept to the end of that block, it reads as written, or as it was and
  // then zeros. Sets size_.
  void take_back_growth(uint64_t old_size, uint64_t new_size);
  Status truncate_locked(uint64_t new_size);
  // Writes zeros over the data areas of blocks [first, end), holes all (see kZeroFillMax).
  Status zero_fill(uint64_t first, uint64_t end);
  Status fail(uint64_t block, Status st) const;
  // The backing length of a file of `size` bytes: 0 for an empty file whose header is not
  // written, which is what such a file is on disk (rw_ held).
  uint64_t backing_end(uint64_t size) const {
    return size == 0 && !header_written_ ? 0 : layout_.backing_size(size);
  }

  // Sends each aligned request through dfd_ (when set), everything else through fd_.
  void route(std::span<IoRequest> requests) const;

  const int fd_;
  int dfd_ = -1;
  VolumeKeys& keys_;
  IoBackend& io_;
  const Layout layout_;
  const FileId id_;
  uint64_t size_;  // plaintext size, guarded by rw_
  // Blocks written by this object: their newest slot is known to match their data. Any other
  // block with two slots is checked before a full overwrite, because after a crash between a
  // metadata write and its data write the newest slot is the stale one. Guarded by rw_.
  std::vector<bool> verified_;
  uint64_t reserved_end_;  // backing bytes known to be allocated or reserved; guarded by rw_
  bool keep_past_end_ = false;  // fallocate(KEEP_SIZE) reserved past the end: no trim at close
  bool header_written_ = true;  // page 0 is on disk (false for a new file until its first change)

  mutable std::shared_mutex rw_;
  std::mutex cache_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Page>> pages_;
};

}  // namespace envelopefs
