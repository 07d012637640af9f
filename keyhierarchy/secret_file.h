// A secret kept in a file (a passphrase, a token PIN): its first line, read straight into
// locked memory.
#pragma once

#include <string>

#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

// `what` names the secret in messages ("passphrase", "PIN"). With `private_only`, a file that
// anyone may read is refused (kAccessDenied) before a byte of it is read.
Result<SecretBytes> read_secret_file(const std::string& path, const std::string& what, bool private_only);

}  // namespace envelopefs
