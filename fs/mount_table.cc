#include "fs/mount_table.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace envelopefs {
namespace {

// A field of /proc/self/mounts as it names a path: the kernel writes a space, tab, newline or
// backslash in one as \040, \011, \012 or \134.
std::string unescape_mount_field(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    auto octal = [&](size_t k) { return k < s.size() && s[k] >= '0' && s[k] <= '7'; };
    if (s[i] == '\\' && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::vector<MountEntry> envelopefs_mounts() {
  std::vector<MountEntry> out;
  std::ifstream f("/proc/self/mounts");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    std::string src, dst, type;
    ls >> src >> dst >> type;
    if (type == "fuse.envelopefs") out.push_back({unescape_mount_field(src), unescape_mount_field(dst)});
  }
  return out;
}

std::string absolute_path(const std::string& path) {
  std::error_code ec;
  auto a = std::filesystem::absolute(path, ec);
  return ec ? path : a.lexically_normal().string();
}

std::string resolve_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(path, ec).lexically_normal();
  if (ec) return path;
  if (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();  // "m/"
  fs::path resolved = fs::weakly_canonical(p, ec);
  if (!ec) return resolved.string();
  resolved = fs::weakly_canonical(p.parent_path(), ec);
  return ec ? p.string() : (resolved / p.filename()).string();
}

bool is_dead_mount(const std::string& path) {
  // Forced: the kernel answers a plain stat from the attributes it cached while the daemon was
  // alive, as if nothing had happened.
  struct statx stx {};
  return statx(AT_FDCWD, path.c_str(), AT_STATX_FORCE_SYNC, STATX_TYPE, &stx) != 0 && errno == ENOTCONN;
}

std::string volume_mounted_at(const std::string& target) {
  std::string source;
  for (const MountEntry& m : envelopefs_mounts()) {
    if (m.target == target) source = m.source;  // the last one is on top
  }
  return source;
}

Status unmount_path(const std::string& path, bool detach) {
  if (geteuid() == 0) {
    if (umount2(path.c_str(), detach ? MNT_DETACH : 0) != 0) {
      // umount2 says EINVAL for a directory that nothing is mounted on: say that instead.
      if (errno == EINVAL) {
        return Status(Code::kInvalidArgument, "cannot unmount " + path + ": nothing is mounted there", EINVAL);
      }
      return Status::Io(errno, "cannot unmount " + path);
    }
    return Status::Ok();
  }
  pid_t pid = fork();
  if (pid < 0) return Status::Io(errno, "cannot unmount " + path + ": fork");
  if (pid == 0) {
    execlp("fusermount3", "fusermount3", detach ? "-uz" : "-u", path.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Status(
        Code::kIoError,
        "cannot unmount " + path + ": fusermount3 " + (detach ? "-uz" : "-u") + " failed (as it says above)",
        EPERM);
  }
  return Status::Ok();
}

}  // namespace envelopefs
