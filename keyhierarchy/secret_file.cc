#include "keyhierarchy/secret_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace envelopefs {

Result<SecretBytes> read_secret_file(const std::string& path, const std::string& what, bool private_only) {
  constexpr size_t kMax = 4096;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Io(errno, "cannot open " + what + " file " + path);
  struct stat st;
  if (private_only && fstat(fd, &st) == 0 && (st.st_mode & S_IROTH) != 0) {
    close(fd);
    return Status(Code::kAccessDenied,
                  what + " file " + path + " is readable by anyone; run chmod o-r " + path);
  }
  SecretBytes buf(kMax);
  ssize_t n = read(fd, buf.data(), kMax);
  close(fd);
  if (n < 0) return Status::Io(errno, "cannot read " + what + " file " + path);
  size_t len = 0;
  while (len < static_cast<size_t>(n) && buf.data()[len] != '\n') ++len;
  return SecretBytes(buf.data(), len);
}

}  // namespace envelopefs
