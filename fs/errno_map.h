// The one place where a Status becomes an errno (at the FUSE edge). Authentication failures
// become EIO and one rate-limited log line naming the file and block; dropped keys become
// EKEYREVOKED, so callers can tell "tampered" from "locked".
#pragma once

#include "crypto/status.h"

namespace envelopefs {

// `what` names the operation and file for the log line.
int to_errno(const Status& st, const char* what, uint64_t ino);

}  // namespace envelopefs
