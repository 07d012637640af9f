// Memory for the metadata pages CipherFile caches: 4 KiB slots, 4 KiB-aligned (a page is read
// and written with O_DIRECT under --direct-backing), carved from 256 KiB slabs and recycled
// through a free list.
//
// Why not `new`: an over-aligned allocation goes through glibc's memalign, which cost 3% of the
// daemon's CPU on a sequential write, and a cached page next to its dirty flag was an 8 KiB
// object (4 KiB of padding), which doubled what the page budget (CipherFile::kPageBudget)
// really held. Slabs are kept for the life of the process, so the pool never holds more than
// the most pages cached at once (the budget, plus pages dirty in writes under way).
#pragma once

#include <cstddef>
#include <memory>

#include "fs/metadata_page.h"

namespace envelopefs {

class PagePool {
 public:
  static constexpr size_t kSlotsPerSlab = 64;

  struct Return {
    void operator()(MetaPage* p) const;
  };
  using Ptr = std::unique_ptr<MetaPage, Return>;

  // A zeroed page in a pool slot.
  static Ptr make();
  // Slots handed out and not yet returned, and slots the pool holds in all (for tests).
  static size_t in_use();
  static size_t capacity();
};

}  // namespace envelopefs
