// The root-key provider interface. A provider holds (or reaches) the root key and wraps and
// unwraps volume keys under it; the root key itself never leaves the provider. Every wrap is
// bound to a context (purpose, volume id, DEK version) so a wrapped key cannot be replayed
// into another volume or another slot.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

#include "crypto/bytes.h"
#include "crypto/secret_bytes.h"
#include "crypto/status.h"

namespace envelopefs {

struct ProviderOptions {
  std::string passfile;      // pass: read the passphrase from this file (first line)
  bool allow_prompt = true;  // pass: ask on the terminal when no other source is given
};

class RootKeyProvider {
 public:
  virtual ~RootKeyProvider() = default;
  // The URI stored in the volume config (never contains a secret).
  virtual std::string uri() const = 0;
  // Human-readable description for `status`.
  virtual std::string describe() const = 0;
  // Non-secret parameters stored beside the URI (salts, KDF costs).
  virtual nlohmann::json params() const { return nlohmann::json::object(); }
  // kAccessDenied: the provider refused (wrong passphrase, key revoked or disabled).
  // kUnreachable: the provider could not be asked. kAuthFailed: the wrapped value was altered.
  virtual Result<Bytes> wrap(const SecretBytes& key, ByteView context) = 0;
  virtual Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) = 0;
};

// `creating`: a new volume is being set up (a file: key may be generated, a passphrase is asked
// twice). `params` are the ones stored in the config (empty when creating).
Result<std::unique_ptr<RootKeyProvider>> make_root_provider(const std::string& uri,
                                                            const nlohmann::json& params,
                                                            const ProviderOptions& options,
                                                            bool creating);

// The embedded default: file:<this path>. Root: /etc/envelopefs/root.key; other users:
// $XDG_CONFIG_HOME/envelopefs/root.key (or ~/.config/...). ENVELOPEFS_ROOT_KEY overrides.
std::string default_root_key_path();

}  // namespace envelopefs
