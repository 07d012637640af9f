// The key audit log: every use of a volume's root key, one JSON object per line, appended to
// $ENVELOPEFS_AUDIT_LOG, else /var/log/envelopefs/audit.log for root (and
// $XDG_STATE_HOME/envelopefs/audit.log, or ~/.local/state/..., for other users).
//
//   {"time":"2026-11-29T16:40:00Z","event":"mount","outcome":"ok","volume":"<32 hex>",
//    "cipher_dir":"/srv/c","root":"pkcs11:token=...","uid":0,"pid":1234,"detail":"..."}
//
// Events: init, mount, rewrap, rotate-dek, dek-switch, rewrap-blocks, drop-dek, revoked, restored,
// unmount, fsck.
// Outcome "ok", or the error class (access denied, key service unreachable, authentication
// failed, ...) with the message in detail; a "revoked" record says "keys zeroized" and why.
// A record never holds key material or a PIN: only what the config itself holds.
// Each record is one write(2) with O_APPEND (whole lines even with several writers) followed
// by fdatasync. Writing the log never fails the operation it records; a log that cannot be
// written is reported on stderr (and by the daemon in its own log: audit() returns false).
#pragma once

#include <string>

#include "crypto/status.h"

namespace envelopefs {

struct AuditRecord {
  std::string event;
  std::string outcome = "ok";
  std::string volume;  // hex volume id, if known
  std::string cipher_dir;
  std::string root;  // the root key provider URI, if known
  std::string detail;
};

// A failed operation's record on `cipher_dir`: outcome is the error class, detail the message.
AuditRecord audit_failure(std::string event, std::string cipher_dir, const Status& st);

bool audit(const AuditRecord& record);

std::string audit_log_path();

}  // namespace envelopefs
