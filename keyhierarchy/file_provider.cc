#include "keyhierarchy/file_provider.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "crypto/aead_gcm.h"
#include "keyhierarchy/local_wrap.h"

namespace envelopefs {
namespace {

constexpr size_t kRootKeySize = 32;

class FileProvider final : public RootKeyProvider {
 public:
  FileProvider(std::string path, SecretBytes key) : path_(std::move(path)), key_(std::move(key)) {}
  std::string uri() const override { return "file:" + path_; }
  std::string describe() const override { return "local key file " + path_; }
  Result<Bytes> wrap(const SecretBytes& key, ByteView context) override {
    return local_wrap(key_, key, context);
  }
  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) override {
    auto r = local_unwrap(key_, wrapped, context, wrapped.size() - kGcmIvSize - kGcmTagSize);
    if (!r.ok() && r.status().code() == Code::kAuthFailed) {
      return Status(Code::kAccessDenied,
                    "the key in " + path_ + " does not unwrap this volume's keys (wrong key file?)");
    }
    return r;
  }

 private:
  std::string path_;
  SecretBytes key_;
};

Status create_key_file(const std::string& path) {
  std::error_code ec;
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::filesystem::create_directories(parent, ec);
    if (ec) return Status(Code::kIoError, "cannot create " + parent.string() + ": " + ec.message());
  }
  auto key = SecretBytes::random(kRootKeySize);
  if (!key.ok()) return key.status();
  std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Status::Io(errno, "cannot create key file " + tmp);
  bool ok = write(fd, key->data(), kRootKeySize) == static_cast<ssize_t>(kRootKeySize) &&
            fsync(fd) == 0;
  int err = errno;
  close(fd);
  // link() instead of rename(): never replace a key file that appeared meanwhile.
  if (!ok || link(tmp.c_str(), path.c_str()) != 0) {
    err = ok ? errno : err;
    unlink(tmp.c_str());
    return Status::Io(err, "cannot write key file " + path);
  }
  unlink(tmp.c_str());
  int dfd = open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return Status::Ok();
}

Result<SecretBytes> read_key_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return Status(Code::kNotFound, "root key file " + path + " does not exist");
    if (errno == EACCES) return Status(Code::kAccessDenied, "cannot read root key file " + path);
    return Status::Io(errno, "cannot open root key file " + path);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return Status::Io(errno, "cannot stat " + path);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return Status(Code::kInvalidArgument, path + " is not a regular file");
  }
  if ((st.st_mode & 077) != 0) {
    close(fd);
    return Status(Code::kAccessDenied, "root key file " + path +
                                           " is readable by group or others; run chmod 600 " +
                                           path);
  }
  if (st.st_uid != geteuid()) {
    close(fd);
    return Status(Code::kAccessDenied, "root key file " + path + " is owned by another user");
  }
  if (st.st_size != static_cast<off_t>(kRootKeySize)) {
    close(fd);
    return Status(Code::kCorrupt, "root key file " + path + " must hold exactly 32 bytes");
  }
  SecretBytes key(kRootKeySize);
  ssize_t n = pread(fd, key.data(), kRootKeySize, 0);
  close(fd);
  if (n != static_cast<ssize_t>(kRootKeySize)) return Status(Code::kIoError, "short read of " + path);
  return key;
}

}  // namespace

Result<std::unique_ptr<RootKeyProvider>> make_file_provider(const std::string& path,
                                                            bool create_if_missing) {
  if (path.empty() || path[0] != '/') {
    return Status(Code::kInvalidArgument, "file: key path must be absolute, got '" + path + "'");
  }
  if (create_if_missing && access(path.c_str(), F_OK) != 0) {
    ENVELOPEFS_RETURN_IF_ERROR(create_key_file(path));
  }
  auto key = read_key_file(path);
  if (!key.ok()) return key.status();
  return std::unique_ptr<RootKeyProvider>(new FileProvider(path, std::move(key).value()));
}

}  // namespace envelopefs
