#include "fs/log.h"

#include <syslog.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

#include "keyhierarchy/volume_config.h"

namespace envelopefs {
namespace {

std::mutex g_mu;
LogTarget g_target = LogTarget::kStderr;
FILE* g_file = nullptr;

void emit(int prio, const std::string& msg) {
  std::lock_guard lock(g_mu);
  if (g_target == LogTarget::kSyslog) {
    syslog(prio, "%s", msg.c_str());
    return;
  }
  FILE* out = g_target == LogTarget::kFile && g_file ? g_file : stderr;
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::fprintf(out, "%s envelopefs: %s\n", ts, msg.c_str());
  std::fflush(out);
}

}  // namespace

void log_to(LogTarget target, const std::string& file) {
  std::lock_guard lock(g_mu);
  g_target = target;
  if (target == LogTarget::kSyslog) openlog("envelopefs", LOG_PID, LOG_DAEMON);
  if (target == LogTarget::kFile) {
    g_file = std::fopen(file.c_str(), "ae");
    if (g_file == nullptr) g_target = LogTarget::kStderr;
  }
}

void log_info(const std::string& msg) { emit(LOG_INFO, msg); }
void log_error(const std::string& msg) { emit(LOG_ERR, msg); }

void log_error_rate_limited(const std::string& msg) {
  using Clock = std::chrono::steady_clock;
  static std::mutex mu;
  static Clock::time_point window;
  static int in_window = 0, suppressed = 0;
  constexpr int kPerSecond = 20;
  std::string line;
  {
    std::lock_guard lock(mu);
    auto now = Clock::now();
    if (now - window > std::chrono::seconds(1)) {
      window = now;
      in_window = 0;
    }
    if (++in_window > kPerSecond) {
      ++suppressed;
      return;
    }
    line = msg;
    if (suppressed > 0) {
      line += " (" + std::to_string(suppressed) + " similar lines suppressed)";
      suppressed = 0;
    }
  }
  emit(LOG_ERR, line);
}

void audit_from_daemon(AuditRecord record) {
  if (record.volume.empty() || record.root.empty()) {
    if (auto c = load_config(record.cipher_dir); c.ok()) {
      if (record.volume.empty()) record.volume = to_hex(c->volume_id);
      if (record.root.empty()) record.root = c->root_uri;
    }
  }
  if (!audit(record)) log_error("cannot write the audit log " + audit_log_path());
}

}  // namespace envelopefs
