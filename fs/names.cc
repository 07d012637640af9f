#include "fs/names.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>

#include "crypto/random.h"

namespace envelopefs {
namespace {

// Associated data for values that are not names in a directory.
constexpr char kSymlinkAd[] = "envelopefs v1 symlink";
constexpr char kXattrNameAd[] = "envelopefs v1 xattr name";

Status write_all_and_sync(int fd, ByteView data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Io(errno, "write");
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) return Status::Io(errno, "fsync");
  return Status::Ok();
}

// Creates `name` in directory `dir_fd` (exclusively, mode 0400) holding `data`, durably: the
// file is written and fsynced, then the directory. EEXIST comes back as Status::Io(EEXIST).
Status create_durable_file(int dir_fd, const char* name, ByteView data) {
  int fd = openat(dir_fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0400);
  if (fd < 0) return Status::Io(errno, "create");
  Status st = write_all_and_sync(fd, data);
  close(fd);
  if (st.ok() && fsync(dir_fd) != 0) st = Status::Io(errno, "fsync directory");
  return st;
}

Status write_dir_nonce(int dir_fd, const DirNonce& nonce, NonceStore store) {
  if (store == NonceStore::kFile) return create_durable_file(dir_fd, kDirNonceName, nonce);
  const std::string name = dir_nonce_entry(nonce);
  int fd = openat(dir_fd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0400);
  if (fd < 0) return Status::Io(errno, "create");
  close(fd);
  return Status::Ok();
}

bool is_nonce_entry(std::string_view n) {
  return n == kDirNonceName || n.rfind(kDirNoncePrefix, 0) == 0;
}

// Calls `fn(name)` for every entry of directory `dir_fd` (which may be an O_PATH descriptor).
template <typename Fn>
Status for_each_entry(int dir_fd, Fn fn) {
  int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::Io(errno, "open directory");
  DIR* d = fdopendir(fd);
  if (d == nullptr) {
    close(fd);
    return Status::Io(errno, "read directory");
  }
  while (dirent* e = ::readdir(d)) fn(std::string_view(e->d_name));
  closedir(d);
  return Status::Ok();
}

// The nonce named by an entry "envelopefs.dirnonce.<base64url>", the only one in directory
// `dir_fd`. kNotFound if there is none.
Result<DirNonce> find_named_nonce(int dir_fd) {
  std::string found;
  int count = 0;
  ENVELOPEFS_RETURN_IF_ERROR(for_each_entry(dir_fd, [&](std::string_view n) {
    if (n.rfind(kDirNoncePrefix, 0) == 0) {
      found = n.substr(sizeof(kDirNoncePrefix) - 1);
      ++count;
    }
  }));
  if (count == 0) return Status(Code::kNotFound, "directory nonce is missing");
  if (count > 1) return Status(Code::kCorrupt, "directory has more than one nonce");
  Bytes raw;
  DirNonce nonce;
  if (!base64url_decode(found, &raw) || raw.size() != nonce.size()) {
    return Status(Code::kCorrupt, "directory nonce is damaged");
  }
  std::copy(raw.begin(), raw.end(), nonce.begin());
  return nonce;
}

}  // namespace

NonceStore nonce_store_of(const VolumeConfig& c) {
  return c.has_feature(kFeatureNonceNames) ? NonceStore::kName : NonceStore::kFile;
}

Result<DirNonce> create_dir_nonce(int dir_fd, NonceStore store) {
  DirNonce nonce;
  ENVELOPEFS_RETURN_IF_ERROR(random_fill(nonce));
  Status st = write_dir_nonce(dir_fd, nonce, store);
  if (!st.ok()) return st.prefix("directory nonce");
  return nonce;
}

std::string dir_nonce_entry(const DirNonce& nonce) { return kDirNoncePrefix + base64url_encode(nonce); }

Result<DirNonce> read_dir_nonce(int dir_fd) {
  // The file form is one open away; the name form needs a pass over the directory.
  int fd = openat(dir_fd, kDirNonceName, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return find_named_nonce(dir_fd);
    return Status::Io(errno, "open directory nonce");
  }
  DirNonce nonce;
  ssize_t n = read(fd, nonce.data(), nonce.size());
  close(fd);
  if (n != static_cast<ssize_t>(nonce.size())) return Status(Code::kCorrupt, "directory nonce is damaged");
  return nonce;
}

void restore_dir_nonce(int dir_fd, const DirNonce& nonce, NonceStore store) {
  (void)write_dir_nonce(dir_fd, nonce, store);
}

Status remove_dir_nonce(int dir_fd, const DirNonce& nonce) {
  for (const std::string& name : {std::string(kDirNonceName), dir_nonce_entry(nonce)}) {
    if (unlinkat(dir_fd, name.c_str(), 0) != 0 && errno != ENOENT) return Status::Io(errno, "remove directory nonce");
  }
  return Status::Ok();
}

Result<bool> holds_only_nonce(int dir_fd) {
  bool only = true;
  ENVELOPEFS_RETURN_IF_ERROR(for_each_entry(dir_fd, [&](std::string_view n) {
    if (n != "." && n != ".." && !is_nonce_entry(n)) only = false;
  }));
  return only;
}

bool is_reserved_name(std::string_view backing) {
  return backing == "." || backing == ".." || backing.find('.') != std::string_view::npos;
}

Result<BackingName> encrypt_name(const VolumeKeys& keys, const DirNonce& nonce, std::string_view plain) {
  if (plain.empty() || plain == "." || plain == ".." || plain.find('/') != std::string_view::npos) {
    return Status(Code::kInvalidArgument, "invalid file name");
  }
  if (plain.size() > kMaxPlainName) return Status(Code::kInvalidArgument, "file name too long");
  auto sealed = keys.names().seal(nonce, as_bytes(plain));
  if (!sealed.ok()) return sealed.status();
  BackingName out;
  std::string encoded = base64url_encode(*sealed);
  if (encoded.size() <= kMaxBackingName) {
    out.entry = std::move(encoded);
    return out;
  }
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const uint8_t*>(encoded.data()), encoded.size(), digest);
  out.entry = std::string(kLongNamePrefix) + base64url_encode(digest);
  out.longname = std::move(encoded);
  return out;
}

Result<std::string> decrypt_name(const VolumeKeys& keys, const DirNonce& nonce, int dir_fd,
                                 std::string_view backing) {
  std::string encoded;
  if (backing.rfind(kLongNamePrefix, 0) == 0 && backing.find(kLongNameSuffix) == std::string_view::npos) {
    std::string side = std::string(backing) + kLongNameSuffix;
    int fd = openat(dir_fd, side.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
      // The entry goes first and its record after it (unlink, rename), so a listing can meet
      // an entry whose record is gone the moment after: then the entry is gone too.
      struct stat st;
      if (errno == ENOENT && fstatat(dir_fd, std::string(backing).c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 &&
          errno == ENOENT) {
        return Status(Code::kNotFound, "entry removed while it was listed");
      }
      return Status(Code::kCorrupt, "long name record " + side + " is missing");
    }
    encoded.resize(4096);
    ssize_t n = read(fd, encoded.data(), encoded.size());
    close(fd);
    if (n <= 0) return Status(Code::kCorrupt, "long name record " + side + " is empty");
    encoded.resize(static_cast<size_t>(n));
    uint8_t digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const uint8_t*>(encoded.data()), encoded.size(), digest);
    if (std::string(kLongNamePrefix) + base64url_encode(digest) != backing) {
      return Status(Code::kAuthFailed, "long name record does not match its entry");
    }
  } else if (is_reserved_name(backing)) {
    return Status(Code::kNotFound, "reserved name");
  } else {
    encoded = backing;
  }
  Bytes sealed;
  if (!base64url_decode(encoded, &sealed)) return Status(Code::kAuthFailed, "name is not valid base64url");
  auto plain = keys.names().open(nonce, sealed);
  if (!plain.ok()) return plain.status();
  return std::string(as_chars(*plain));
}

Status write_long_name(int dir_fd, const BackingName& name) {
  if (!name.is_long()) return Status::Ok();
  Status st = create_durable_file(dir_fd, name.side_file().c_str(), as_bytes(name.longname));
  if (st.sys_errno() == EEXIST) return Status::Ok();  // same name, same content
  return st.ok() ? st : st.prefix("long name record");
}

void remove_long_name(int dir_fd, const BackingName& name) {
  if (name.is_long()) unlinkat(dir_fd, name.side_file().c_str(), 0);
}

Result<std::string> encrypt_symlink(const VolumeKeys& keys, std::string_view target) {
  auto sealed = keys.names().seal(as_bytes(kSymlinkAd), as_bytes(target));
  if (!sealed.ok()) return sealed.status();
  return base64url_encode(*sealed);
}

Result<std::string> decrypt_symlink(const VolumeKeys& keys, std::string_view stored) {
  Bytes sealed;
  if (!base64url_decode(stored, &sealed)) return Status(Code::kAuthFailed, "symlink target is not valid base64url");
  auto plain = keys.names().open(as_bytes(kSymlinkAd), sealed);
  if (!plain.ok()) return plain.status();
  return std::string(as_chars(*plain));
}

namespace {

// A record id is 22 base64url characters; anything else in a reference is damage, and must
// never be used as a path (no '/', no "..").
std::optional<std::string> record_path(std::string_view stored) {
  if (!is_symlink_record_ref(stored)) return std::nullopt;
  std::string_view id = stored.substr(sizeof(kSymlinkRefPrefix) - 1);
  if (id.size() != 22) return std::nullopt;
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return std::nullopt;
  }
  return std::string(kSymlinkRecordDir) + "/" + std::string(id);
}

}  // namespace

Result<std::string> store_symlink(const VolumeKeys& keys, int root_fd, std::string_view target,
                                  bool in_record) {
  auto enc = encrypt_symlink(keys, target);
  if (!enc.ok() || (enc->size() < PATH_MAX && !in_record)) return enc;
  uint8_t random_id[16];
  ENVELOPEFS_RETURN_IF_ERROR(random_fill(random_id));
  const std::string id = base64url_encode(random_id);
  const std::string ref = std::string(kSymlinkRefPrefix) + id;
  if (mkdirat(root_fd, kSymlinkRecordDir, 0700) == 0) {
    int root = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) return Status::Io(errno, "open cipher root");
    int rc = fsync(root);
    close(root);
    if (rc != 0) return Status::Io(errno, "fsync cipher root");
  } else if (errno != EEXIST) {
    return Status::Io(errno, "create symlink record directory");
  }
  int dir = openat(root_fd, kSymlinkRecordDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dir < 0) return Status::Io(errno, "open symlink records");
  Status st = create_durable_file(dir, id.c_str(), as_bytes(*enc));
  if (!st.ok() && st.sys_errno() != EEXIST) unlinkat(dir, id.c_str(), 0);  // never a record not ours
  close(dir);
  if (!st.ok()) return st.prefix("symlink record");
  return ref;
}

Result<std::string> load_symlink(const VolumeKeys& keys, int root_fd, std::string_view stored) {
  if (!is_symlink_record_ref(stored)) return decrypt_symlink(keys, stored);
  auto path = record_path(stored);
  if (!path) return Status(Code::kAuthFailed, "symlink record reference is damaged");
  int fd = openat(root_fd, path->c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status(Code::kAuthFailed, "symlink record is missing");
    return Status::Io(errno, "open symlink record");
  }
  std::string content(2 * PATH_MAX, '\0');  // a record holds at most ~4/3 (PATH_MAX + 16)
  ssize_t n = read(fd, content.data(), content.size());
  close(fd);
  if (n < 0) return Status::Io(errno, "read symlink record");
  content.resize(static_cast<size_t>(n));
  return decrypt_symlink(keys, content);
}

void drop_symlink_record(int root_fd, std::string_view stored) {
  if (auto path = record_path(stored)) unlinkat(root_fd, path->c_str(), 0);
}

Result<std::string> encrypt_xattr_name(const VolumeKeys& keys, std::string_view name) {
  auto sealed = keys.names().seal(as_bytes(kXattrNameAd), as_bytes(name));
  if (!sealed.ok()) return sealed.status();
  std::string out = std::string(kXattrPrefix) + base64url_encode(*sealed);
  if (out.size() > 255) return Status(Code::kInvalidArgument, "xattr name too long");
  return out;
}

Result<std::string> decrypt_xattr_name(const VolumeKeys& keys, std::string_view stored) {
  if (stored.rfind(kXattrPrefix, 0) != 0) return Status(Code::kNotFound, "not an envelopefs xattr");
  Bytes sealed;
  if (!base64url_decode(stored.substr(sizeof(kXattrPrefix) - 1), &sealed)) {
    return Status(Code::kAuthFailed, "xattr name is not valid base64url");
  }
  auto plain = keys.names().open(as_bytes(kXattrNameAd), sealed);
  if (!plain.ok()) return plain.status();
  return std::string(as_chars(*plain));
}

// Values carry a leading version byte: it also keeps the SIV plaintext non-empty, which
// OpenSSL's AES-SIV does not accept.
constexpr uint8_t kXattrValueVersion = 1;

Result<Bytes> encrypt_xattr_value(const VolumeKeys& keys, std::string_view stored_name, ByteView value) {
  Bytes framed;
  framed.reserve(value.size() + 1);
  framed.push_back(kXattrValueVersion);
  framed.insert(framed.end(), value.begin(), value.end());
  return keys.names().seal(as_bytes(stored_name), framed);
}

Result<Bytes> decrypt_xattr_value(const VolumeKeys& keys, std::string_view stored_name, ByteView value) {
  auto framed = keys.names().open(as_bytes(stored_name), value);
  if (!framed.ok()) return framed.status();
  if (framed->empty() || framed->front() != kXattrValueVersion) {
    return Status(Code::kUnsupported, "unknown xattr value version");
  }
  return Bytes(framed->begin() + 1, framed->end());
}

}  // namespace envelopefs
