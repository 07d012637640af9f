// pass: — the root key is derived from a passphrase with Argon2id (libsodium). The salt and cost
// parameters live in the volume config; the passphrase comes from --passfile, the
// ENVELOPEFS_PASSPHRASE environment variable, or a terminal prompt, in that order.
// Costs for a new volume may be set in the URI: pass:?ops=3&mem-kib=262144 (the defaults).
#pragma once

#include "keyhierarchy/root_provider.h"

namespace envelopefs {

Result<std::unique_ptr<RootKeyProvider>> make_pass_provider(const std::string& query,
                                                            const nlohmann::json& params,
                                                            const ProviderOptions& options,
                                                            bool creating);

}  // namespace envelopefs
