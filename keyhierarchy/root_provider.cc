#include "keyhierarchy/root_provider.h"

#include <unistd.h>

#include <cstdlib>

#include "keyhierarchy/exec_provider.h"
#include "keyhierarchy/file_provider.h"
#include "keyhierarchy/kmip_provider.h"
#include "keyhierarchy/pass_provider.h"
#include "keyhierarchy/pkcs11_provider.h"

namespace envelopefs {

std::string default_root_key_path() {
  if (const char* p = std::getenv("ENVELOPEFS_ROOT_KEY"); p && *p) return p;
  if (geteuid() == 0) return "/etc/envelopefs/root.key";
  if (const char* x = std::getenv("XDG_CONFIG_HOME"); x && *x) {
    return std::string(x) + "/envelopefs/root.key";
  }
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/tmp") + "/.config/envelopefs/root.key";
}

Result<std::unique_ptr<RootKeyProvider>> make_root_provider(const std::string& uri,
                                                            const nlohmann::json& params,
                                                            const ProviderOptions& options,
                                                            bool creating) {
  if (uri.rfind("file:", 0) == 0) return make_file_provider(uri.substr(5), creating);
  if (uri.rfind("pass:", 0) == 0) {
    std::string rest = uri.substr(5);
    if (!rest.empty() && rest[0] == '?') rest.erase(0, 1);
    if (!creating && !rest.empty()) {
      return Status(Code::kCorrupt, "pass: URI in the config carries parameters");
    }
    return make_pass_provider(rest, params, options, creating);
  }
  if (uri.rfind("pkcs11:", 0) == 0) return make_pkcs11_provider(uri, options, creating);
  if (uri.rfind("kmip://", 0) == 0) return make_kmip_provider(uri, creating);
  if (uri.rfind("exec:", 0) == 0) return make_exec_provider(uri);
  return Status(Code::kUnsupported, "unknown key provider '" + uri +
                                        "' (supported: file:/ABSOLUTE/PATH, pass:, pkcs11:URI, "
                                        "kmip://HOST:PORT/?..., exec:/ABSOLUTE/PATH)");
}

}  // namespace envelopefs
