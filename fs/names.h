// Names, symlink targets and xattrs in the cipher dir (fs/FORMAT.md, "Names").
//
// Each backing directory holds a nonce of 16 random bytes (`envelopefs.dirnonce.<base64url>`,
// an empty file, or in older volumes `envelopefs.dirnonce` holding them). A plaintext name is
// stored as base64url(AES-256-SIV(name key, AD = that nonce, name)). An encoded name longer than
// 255 bytes is stored as `envelopefs.long.<base64url(SHA-256(encoded))>` with the full encoded
// name in a side file `<that>.name`. Every reserved name contains a '.', which base64url never
// produces, so reserved and encrypted names cannot collide.
#pragma once

#include <optional>
#include <string>

#include "crypto/bytes.h"
#include "crypto/status.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {

inline constexpr char kDirNonceName[] = "envelopefs.dirnonce";      // the file form
inline constexpr char kDirNoncePrefix[] = "envelopefs.dirnonce.";   // the name form
inline constexpr char kLongNamePrefix[] = "envelopefs.long.";
inline constexpr char kLongNameSuffix[] = ".name";
inline constexpr size_t kDirNonceSize = 16;
inline constexpr size_t kMaxPlainName = 255;
inline constexpr size_t kMaxBackingName = 255;

using DirNonce = std::array<uint8_t, kDirNonceSize>;

// Where a directory keeps its nonce, by volume (fs/FORMAT.md, "Names").
enum class NonceStore {
  // `envelopefs.dirnonce`, a regular file holding the 16 bytes; made durable at creation by a
  // file fsync and a directory fsync (two disk flushes per mkdir). Volumes without the
  // "nonce-names" feature.
  kFile,
  // `envelopefs.dirnonce.<base64url(nonce)>`, an empty file: the nonce is in the entry's name,
  // so creating it is one metadata operation in the very directory it serves, and whatever
  // makes that directory's entries durable (its fsync, a journal commit) makes the nonce
  // durable with them. A plain empty file is copied by every backup and sync tool (unlike an
  // xattr, dropped by rsync -a and tar, or a symlink, skipped by rsync -r).
  kName,
};

// How the directories of a volume with config `c` keep their nonce.
NonceStore nonce_store_of(const VolumeConfig& c);

// Creates the nonce in the (new, empty) backing directory `dir_fd`, and returns it.
Result<DirNonce> create_dir_nonce(int dir_fd, NonceStore store);
// Reads the nonce of backing directory `dir_fd`, whichever way it is stored: kNotFound if it
// has none, kCorrupt if it is damaged or there is more than one.
Result<DirNonce> read_dir_nonce(int dir_fd);
// Puts a nonce read earlier back after an operation that removed it failed.
void restore_dir_nonce(int dir_fd, const DirNonce& nonce, NonceStore store);
// Removes the nonce `nonce` of `dir_fd` in either form.
Status remove_dir_nonce(int dir_fd, const DirNonce& nonce);
// The name-form entry for `nonce`.
std::string dir_nonce_entry(const DirNonce& nonce);
// True when backing directory `dir_fd` holds nothing but (at most) its nonce: empty on the mount.
Result<bool> holds_only_nonce(int dir_fd);

struct BackingName {
  std::string entry;     // the name in the backing directory
  std::string longname;  // for a long name: the full encoded name kept in the side file
  bool is_long() const { return !longname.empty(); }
  std::string side_file() const { return entry + kLongNameSuffix; }
};

// True for names envelopefs keeps for itself (never shown on the mount).
bool is_reserved_name(std::string_view backing);

Result<BackingName> encrypt_name(const VolumeKeys& keys, const DirNonce& nonce, std::string_view plain);
// Decrypts a backing directory entry (reads the side file for long names). kNotFound for
// reserved names, kAuthFailed for names that do not authenticate.
Result<std::string> decrypt_name(const VolumeKeys& keys, const DirNonce& nonce, int dir_fd,
                                 std::string_view backing);
// Writes the side file of a long name (durably) if it is not there yet.
Status write_long_name(int dir_fd, const BackingName& name);
void remove_long_name(int dir_fd, const BackingName& name);

Result<std::string> encrypt_symlink(const VolumeKeys& keys, std::string_view target);
Result<std::string> decrypt_symlink(const VolumeKeys& keys, std::string_view stored);

// A target whose encrypted form would not fit in a backing symlink (PATH_MAX) is kept in a
// record file `envelopefs.symlinks/<id>` under the cipher root, and the backing symlink holds
// `envelopefs.symlink.<id>` (fs/FORMAT.md, "Names").
inline constexpr char kSymlinkRecordDir[] = "envelopefs.symlinks";
inline constexpr char kSymlinkRefPrefix[] = "envelopefs.symlink.";
// What the backing symlink should hold for `target`; writes (durably) the record if one is
// needed, or always with `in_record` (a backing filesystem whose symlinks hold less than
// PATH_MAX: XFS keeps 1,024 bytes).
Result<std::string> store_symlink(const VolumeKeys& keys, int root_fd, std::string_view target,
                                  bool in_record = false);
// Whether a backing symlink's content is a reference to a record.
inline bool is_symlink_record_ref(std::string_view stored) {
  return stored.rfind(kSymlinkRefPrefix, 0) == 0;
}
// The plaintext target for what a backing symlink holds (follows a record reference).
Result<std::string> load_symlink(const VolumeKeys& keys, int root_fd, std::string_view stored);
// Removes the record `stored` refers to, if it refers to one (its last link is gone).
void drop_symlink_record(int root_fd, std::string_view stored);

// Extended attributes: every name maps to "user.envelopefs.<base64url(SIV(name))>" on the
// backing file; values are SIV-sealed with the encrypted name as associated data.
inline constexpr char kXattrPrefix[] = "user.envelopefs.";
Result<std::string> encrypt_xattr_name(const VolumeKeys& keys, std::string_view name);
Result<std::string> decrypt_xattr_name(const VolumeKeys& keys, std::string_view stored);
Result<Bytes> encrypt_xattr_value(const VolumeKeys& keys, std::string_view stored_name, ByteView value);
Result<Bytes> decrypt_xattr_value(const VolumeKeys& keys, std::string_view stored_name, ByteView value);

}  // namespace envelopefs
