// file:PATH — the root key is 32 random bytes in a local file (mode 0600, owned by the user).
// The embedded default provider; `init` creates the file if it does not exist.
#pragma once

#include "keyhierarchy/root_provider.h"

namespace envelopefs {

Result<std::unique_ptr<RootKeyProvider>> make_file_provider(const std::string& path,
                                                            bool create_if_missing);

}  // namespace envelopefs
