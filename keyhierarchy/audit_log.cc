#include "keyhierarchy/audit_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>

namespace envelopefs {

std::string audit_log_path() {
  if (const char* p = std::getenv("ENVELOPEFS_AUDIT_LOG"); p && *p) return p;
  if (geteuid() == 0) return "/var/log/envelopefs/audit.log";
  if (const char* x = std::getenv("XDG_STATE_HOME"); x && *x) return std::string(x) + "/envelopefs/audit.log";
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/tmp") + "/.local/state/envelopefs/audit.log";
}

AuditRecord audit_failure(std::string event, std::string cipher_dir, const Status& st) {
  AuditRecord r;
  r.event = std::move(event);
  r.cipher_dir = std::move(cipher_dir);
  r.outcome = code_name(st.code());
  r.detail = st.to_string();
  return r;
}

bool audit(const AuditRecord& r) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  nlohmann::ordered_json j = {{"time", when},
                              {"event", r.event},
                              {"outcome", r.outcome},
                              {"volume", r.volume},
                              {"cipher_dir", r.cipher_dir},
                              {"root", r.root},
                              {"uid", getuid()},
                              {"pid", getpid()}};
  if (!r.detail.empty()) j["detail"] = r.detail;
  // Invalid UTF-8 in a path is replaced, not refused: the record must still be written.
  std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";

  const std::string path = audit_log_path();
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  int fd = open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  bool ok = fd >= 0 && write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
            fdatasync(fd) == 0;
  int err = errno;
  if (fd >= 0) close(fd);
  if (!ok) {
    std::fprintf(stderr, "envelopefs: cannot write the audit log %s: %s\n", path.c_str(), std::strerror(err));
  }
  return ok;
}

}  // namespace envelopefs
