// The block half of DEK rotation: moving every per-block key of a mounted volume to the active
// DEK version, by rewriting metadata pages only (DESIGN.md: "rotating the DEK re-wraps every
// per-block key, O(number of blocks) of metadata I/O, online, resumable, and never re-encrypts
// data"). Only for volumes with the "rewrappable-blocks" feature, whose block AAD does not name
// the DEK version (fs/FORMAT.md, "Data blocks").
//
// A thread of the daemon walks the backing tree. Each regular file goes through the same
// OpenFile a FUSE open would get (so the walk and the mount's own requests share one page
// cache and one lock), 16 metadata pages at a time: the pages are read into the backing page
// cache first, then the file is held exclusively for that one batch (well under a millisecond),
// not for the whole file, and each batch passes the key gate like a request. An optional pace
// (--rewrap-rate) bounds the pages read per second. A page whose
// slots and MAC are all under the active DEK is read and left alone, so a walk that was cut
// short (unmount, crash, revocation) loses nothing and the next one only re-reads what the
// first did. The files' modification and access times are kept; their change time is the
// backing filesystem's to set. A walk goes through directories while the mount renames and
// links in them, so a node moved from a directory not reached yet into one already left
// would be passed by: the mount notes every node renamed or linked during a walk, and the
// walk visits those afterwards by their own descriptors (a moved directory, whole).
// Only what cannot be followed that way (the kernel forgot the node; more moves than can
// be noted) costs another pass.
//
// Each file's rewritten pages are fdatasynced before the walk moves on. When a walk finds
// nothing left under an older version, `envelopefs.rewrapped` in the cipher root records the
// version (one decimal line; temporary file, fsync, rename, directory fsync): later
// mounts skip the walk until another rotation. The record is a hint, not authenticated; losing
// or forging it costs a walk or skips one, never data (`envelopefs fsck` counts the block keys
// under each DEK version from the pages themselves).
//
// A walk starts at mount when the volume has more than one DEK version and the record does not
// name the active one, and again whenever the key watcher switches to a new DEK version
// (fs/key_watch.h) or restores revoked keys. Progress goes to the daemon log every 10 s; the
// end of a walk goes to the audit log ("rewrap-blocks").
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "fs/filesystem.h"

namespace envelopefs {

inline constexpr char kRewrappedRecord[] = "envelopefs.rewrapped";
// The DEK version the last complete walk moved every block key to, per the record; 0 if none.
uint32_t rewrapped_version(const std::string& cipher_dir);

class BlockRewrap {
 public:
  // `read_only`: the mount is (-o ro); nothing is written then, and a walk owed waits for a
  // read-write mount. A read-only backing filesystem is treated the same. `pages_per_second`:
  // the walk reads at most that many metadata pages a second (0: as fast as it can), to leave
  // the disk to the volume's users.
  BlockRewrap(Filesystem& fs, std::string cipher_dir, bool read_only, unsigned pages_per_second);
  ~BlockRewrap();  // stops a walk in progress (it resumes at the next mount) and the thread
  BlockRewrap(const BlockRewrap&) = delete;
  BlockRewrap& operator=(const BlockRewrap&) = delete;

  // Starts a walk if one is needed and none is running; a walk already running notices a new
  // active version itself and goes round again.
  void kick();

 private:
  struct Tally {
    uint64_t files = 0;
    uint64_t failed = 0;  // files that could not be re-wrapped
    Filesystem::RewrapProgress pages;
  };
  enum class Outcome { kDone, kStopped, kRevoked };

  void run();
  bool needed();
  void walk();
  Outcome walk_dir(int dir_fd, const std::string& path, uint32_t target, Tally& t);
  // Visits the nodes renamed or linked during the walk (Filesystem::track_moves); `missed`:
  // some could not be followed, and only another pass is sure to find them.
  Outcome walk_moved(uint32_t target, Tally& t, bool* missed);
  // One regular file (Filesystem::rewrap_block_keys's `dir_fd` and `entry`), counted in `t`; a
  // failure is logged as `where`'s and the walk goes on. kRevoked when the keys are revoked.
  Outcome rewrap_file(int dir_fd, const std::string& entry, const std::string& where, uint32_t target,
                      Tally& t);
  void report_progress(uint32_t target, const Tally& t);
  bool stopping();
  // Before each batch: waits as long as the pace asks (or until unmount); false: stop.
  bool go_on(const Tally& t);

  Filesystem& fs_;
  const std::string cipher_dir_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  bool kicked_ = false;
  bool said_not_rewrappable_ = false;  // only the walker's thread touches these two
  bool said_read_only_ = false;
  const bool read_only_;
  const unsigned pages_per_second_;
  std::chrono::steady_clock::time_point walk_started_;
  std::chrono::steady_clock::time_point last_report_;
  std::thread thread_;
};

}  // namespace envelopefs
