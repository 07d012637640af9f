#include "fs/page_pool.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "fs/layout.h"

namespace envelopefs {
namespace {

static_assert(sizeof(MetaPage) == kMetaPageSize && alignof(MetaPage) == kMetaPageSize);

struct State {
  std::mutex mu;
  std::vector<void*> free;   // slots ready to hand out
  std::vector<void*> slabs;  // every slab, kept for the life of the process
  size_t in_use = 0;
};

// Never destroyed: pages may be returned by threads still running at exit, and the slabs stay
// reachable from `slabs` (not leaks to LeakSanitizer).
State& state() {
  static State* s = new State;
  return *s;
}

}  // namespace

PagePool::Ptr PagePool::make() {
  State& s = state();
  void* slot = nullptr;
  {
    std::lock_guard lock(s.mu);
    if (s.free.empty()) {
      void* slab = std::aligned_alloc(kMetaPageSize, kSlotsPerSlab * kMetaPageSize);
      if (slab == nullptr) throw std::bad_alloc();
      s.slabs.push_back(slab);
      auto* base = static_cast<uint8_t*>(slab);
      for (size_t i = kSlotsPerSlab; i-- > 0;) s.free.push_back(base + i * kMetaPageSize);
    }
    slot = s.free.back();
    s.free.pop_back();
    s.in_use++;
  }
  return Ptr(new (slot) MetaPage());
}

void PagePool::Return::operator()(MetaPage* p) const {
  if (p == nullptr) return;
  p->~MetaPage();
  State& s = state();
  std::lock_guard lock(s.mu);
  s.free.push_back(p);
  s.in_use--;
}

size_t PagePool::in_use() {
  std::lock_guard lock(state().mu);
  return state().in_use;
}

size_t PagePool::capacity() {
  std::lock_guard lock(state().mu);
  return state().slabs.size() * kSlotsPerSlab;
}

}  // namespace envelopefs
