// Logging for the daemon: stderr in the foreground, syslog in the background, or a file
// (--log-file). Never pass key material to these functions.
#pragma once

#include <string>

#include "keyhierarchy/audit_log.h"

namespace envelopefs {

enum class LogTarget { kStderr, kSyslog, kFile };
void log_to(LogTarget target, const std::string& file = "");
void log_info(const std::string& msg);
void log_error(const std::string& msg);
// At most a few lines per second; the number suppressed is reported with the next line.
void log_error_rate_limited(const std::string& msg);
// An audit record from the daemon, whose stderr is gone: a record that cannot be written is
// reported in this log instead. A volume id or root the record leaves empty is taken from the
// config in its cipher dir, when that can be read.
void audit_from_daemon(AuditRecord record);

}  // namespace envelopefs
