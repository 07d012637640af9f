#include "keyhierarchy/volume_keys.h"

#include <dirent.h>

#include <algorithm>
#include <ctime>

#include "crypto/labels.h"
#include "crypto/random.h"

namespace envelopefs {

class VolumeKeysBuilder {
 public:
  static Result<std::unique_ptr<VolumeKeys>> build(const VolumeConfig& c,
                                                   std::map<uint32_t, SecretBytes>& deks,
                                                   const SecretBytes& name_key) {
    auto keys = std::unique_ptr<VolumeKeys>(new VolumeKeys());
    keys->volume_id_ = c.volume_id;
    keys->block_size_ = c.block_size;
    keys->active_ = c.active_dek()->version;
    keys->rewrappable_blocks_ = c.has_feature(kFeatureRewrappableBlocks);
    for (auto& [version, dek] : deks) {
      auto mac_key = hkdf_sha256(dek.view(), c.volume_id, as_bytes(labels::kPageMacKey), 32);
      if (!mac_key.ok()) return mac_key.status();
      keys->deks_[version] = std::make_unique<Dek>(version, dek, *mac_key);
    }
    keys->names_ = std::make_unique<NameCipher>(name_key);
    return keys;
  }
};

namespace {

std::string now_utc() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Result<Mac256> config_mac(const VolumeConfig& c, const SecretBytes& active_dek) {
  auto key = hkdf_sha256(active_dek.view(), c.volume_id, as_bytes(labels::kConfigMacKey), 32);
  if (!key.ok()) return key.status();
  HmacSha256 mac(*key);
  return mac.mac({as_bytes(c.mac_input())});
}

Status check_dir_empty(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return Status::Io(errno, "cannot open cipher dir " + dir);
  bool empty = true;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") empty = false;
  }
  closedir(d);
  if (!empty) {
    return Status(Code::kAlreadyExists,
                  dir + " is not empty; envelopefs init needs an empty directory");
  }
  return Status::Ok();
}

// Wraps `key` under `provider` and unwraps it again: a wrap is only stored once it is known to
// come back (a token that wraps but cannot unwrap would otherwise shred the volume).
Result<Bytes> wrap_checked(RootKeyProvider& provider, const SecretBytes& key, const Bytes& context) {
  auto wrapped = provider.wrap(key, context);
  if (!wrapped.ok()) return wrapped.status();
  auto back = provider.unwrap(*wrapped, context);
  if (!back.ok()) {
    Status st = back.status();
    return st.prefix("the root key provider wraps but does not unwrap");
  }
  if (!ct_equal(back->view(), key.view())) {
    return Status(Code::kInternal, "the root key provider unwrapped a different key than it wrapped");
  }
  return wrapped;
}

}  // namespace

Bytes wrap_context(const char* label, const VolumeId& volume_id, uint32_t version) {
  const size_t n = std::char_traits<char>::length(label);
  Bytes ctx(n + volume_id.size() + 4);  // sized once: GCC 12 misreads the grow-by-insert form
  std::copy(label, label + n, ctx.begin());
  std::copy(volume_id.begin(), volume_id.end(), ctx.begin() + static_cast<ptrdiff_t>(n));
  for (size_t i = 0; i < 4; ++i) ctx[n + volume_id.size() + i] = static_cast<uint8_t>(version >> (24 - 8 * i));
  return ctx;
}

Result<OpenedVolume> create_volume(const std::string& cipher_dir, const CreateOptions& options) {
  ENVELOPEFS_RETURN_IF_ERROR(validate_block_size(options.block_size));
  if (auto existing = load_config(cipher_dir); existing.ok() ||
                                               existing.status().code() != Code::kNotFound) {
    return Status(Code::kAlreadyExists, cipher_dir + " already holds an envelopefs volume");
  }
  ENVELOPEFS_RETURN_IF_ERROR(check_dir_empty(cipher_dir));
  std::string uri = options.root_uri.empty() ? "file:" + default_root_key_path() : options.root_uri;
  auto provider = make_root_provider(uri, nlohmann::json::object(), options.provider, true);
  if (!provider.ok()) return provider.status();

  VolumeConfig c;
  ENVELOPEFS_RETURN_IF_ERROR(random_fill(c.volume_id));
  c.block_size = options.block_size;
  c.root_uri = (*provider)->uri();
  c.root_params = (*provider)->params();
  c.features = {kFeatureNonceNames, kFeatureRewrappableBlocks};
  auto dek = SecretBytes::random(32);
  auto name_key = SecretBytes::random(kSivKeySize);
  if (!dek.ok()) return dek.status();
  if (!name_key.ok()) return name_key.status();
  // Each wrap is unwrapped again before the config is written, as rewrap and rotate-dek do.
  auto wrapped_dek = wrap_checked(**provider, *dek, wrap_context(labels::kWrapDek, c.volume_id, 1));
  if (!wrapped_dek.ok()) return wrapped_dek.status();
  auto wrapped_name = wrap_checked(**provider, *name_key, wrap_context(labels::kWrapNameKey, c.volume_id, 0));
  if (!wrapped_name.ok()) return wrapped_name.status();
  c.deks.push_back({1, DekState::kActive, std::move(wrapped_dek).value(), now_utc()});
  c.wrapped_name_key = std::move(wrapped_name).value();
  auto mac = config_mac(c, *dek);
  if (!mac.ok()) return mac.status();
  c.mac = *mac;
  ENVELOPEFS_RETURN_IF_ERROR(save_config(cipher_dir, c));

  std::map<uint32_t, SecretBytes> deks;
  deks.emplace(1, std::move(dek).value());
  auto keys = VolumeKeysBuilder::build(c, deks, *name_key);
  if (!keys.ok()) return keys.status();
  return OpenedVolume{std::move(c), std::move(provider).value(), std::move(keys).value()};
}

namespace {

// Every DEK version and the name key of `c`, unwrapped through `provider`; the config MAC is
// checked with the active DEK before the name key is touched.
Status unwrap_all(const VolumeConfig& c, RootKeyProvider& provider, std::map<uint32_t, SecretBytes>* deks,
                  SecretBytes* name_key) {
  for (const DekRecord& r : c.deks) {
    auto dek = provider.unwrap(r.wrapped, wrap_context(labels::kWrapDek, c.volume_id, r.version));
    if (!dek.ok()) {
      Status st = dek.status();
      return st.prefix("cannot unwrap DEK version " + std::to_string(r.version));
    }
    if (dek->size() != 32) return Status(Code::kCorrupt, "DEK has the wrong size");
    deks->emplace(r.version, std::move(dek).value());
  }
  auto mac = config_mac(c, deks->at(c.active_dek()->version));
  if (!mac.ok()) return mac.status();
  if (!ct_equal(*mac, c.mac)) {
    return Status(Code::kAuthFailed, std::string(kConfigFileName) +
                                         " does not authenticate: it was modified outside envelopefs");
  }
  auto name = provider.unwrap(c.wrapped_name_key, wrap_context(labels::kWrapNameKey, c.volume_id, 0));
  if (!name.ok()) {
    Status st = name.status();
    return st.prefix("cannot unwrap the name key");
  }
  if (name->size() != kSivKeySize) return Status(Code::kCorrupt, "name key has the wrong size");
  *name_key = std::move(name).value();
  return Status::Ok();
}

// A volume's config with every key it wraps, unwrapped through its root.
struct Unwrapped {
  VolumeConfig config;
  std::unique_ptr<RootKeyProvider> root;
  std::map<uint32_t, SecretBytes> deks;
  SecretBytes name_key;
};

// Loads the config, asks its root (a fresh provider) and unwraps everything, MAC checked.
Result<Unwrapped> unwrap_volume(const std::string& cipher_dir, const ProviderOptions& options) {
  auto config = load_config(cipher_dir);
  if (!config.ok()) return config.status();
  Unwrapped u{std::move(config).value(), nullptr, {}, {}};
  auto root = make_root_provider(u.config.root_uri, u.config.root_params, options, false);
  if (!root.ok()) return root.status();
  u.root = std::move(root).value();
  ENVELOPEFS_RETURN_IF_ERROR(unwrap_all(u.config, *u.root, &u.deks, &u.name_key));
  return u;
}

}  // namespace

Result<OpenedVolume> open_volume(const std::string& cipher_dir, const ProviderOptions& options) {
  auto u = unwrap_volume(cipher_dir, options);
  if (!u.ok()) return u.status();
  auto keys = VolumeKeysBuilder::build(u->config, u->deks, u->name_key);
  if (!keys.ok()) return keys.status();
  return OpenedVolume{std::move(u->config), std::move(u->root), std::move(keys).value()};
}

Status recheck_root(const std::string& cipher_dir, const ProviderOptions& options, const VolumeKeys& keys,
                    std::unique_ptr<VolumeKeys>* fresh) {
  auto u = unwrap_volume(cipher_dir, options);
  if (!u.ok()) return u.status();
  if (u->config.volume_id != keys.volume_id()) {
    return Status(Code::kAuthFailed, std::string(kConfigFileName) + " now belongs to another volume");
  }
  if (!keys.present() || u->config.active_dek()->version != keys.active_version()) {
    auto built = VolumeKeysBuilder::build(u->config, u->deks, u->name_key);
    if (!built.ok()) return built.status();
    *fresh = std::move(built).value();
  }
  return Status::Ok();
}

Result<VolumeConfig> rotate_dek(const std::string& cipher_dir, const ProviderOptions& options) {
  auto u = unwrap_volume(cipher_dir, options);
  if (!u.ok()) return u.status();
  VolumeConfig& c = u->config;
  uint32_t next = 0;
  for (const DekRecord& r : c.deks) next = std::max(next, r.version);
  next += 1;
  auto dek = SecretBytes::random(32);
  if (!dek.ok()) return dek.status();
  auto wrapped = wrap_checked(*u->root, *dek, wrap_context(labels::kWrapDek, c.volume_id, next));
  if (!wrapped.ok()) return wrapped.status();
  for (DekRecord& r : c.deks) r.state = DekState::kRetired;
  c.deks.push_back({next, DekState::kActive, std::move(wrapped).value(), now_utc()});
  auto mac = config_mac(c, *dek);
  if (!mac.ok()) return mac.status();
  c.mac = *mac;
  ENVELOPEFS_RETURN_IF_ERROR(save_config(cipher_dir, c));
  return c;
}

Status check_droppable(const VolumeConfig& c, uint32_t version) {
  auto it = std::find_if(c.deks.begin(), c.deks.end(), [&](const DekRecord& r) { return r.version == version; });
  if (it == c.deks.end()) return Status(Code::kNotFound, "the volume has no DEK version " + std::to_string(version));
  if (it->state == DekState::kActive) {
    return Status(Code::kInvalidArgument,
                  "DEK v" + std::to_string(version) + " is the active version (rotate-dek first)");
  }
  return Status::Ok();
}

Result<VolumeConfig> drop_dek(const std::string& cipher_dir, const ProviderOptions& options, uint32_t version) {
  auto u = unwrap_volume(cipher_dir, options);
  if (!u.ok()) return u.status();
  VolumeConfig& c = u->config;
  ENVELOPEFS_RETURN_IF_ERROR(check_droppable(c, version));
  std::erase_if(c.deks, [&](const DekRecord& r) { return r.version == version; });
  auto mac = config_mac(c, u->deks.at(c.active_dek()->version));
  if (!mac.ok()) return mac.status();
  c.mac = *mac;
  ENVELOPEFS_RETURN_IF_ERROR(save_config(cipher_dir, c));
  return c;
}

Result<VolumeConfig> rewrap_root(const std::string& cipher_dir, const ProviderOptions& current,
                                 const std::string& new_uri, const ProviderOptions& next) {
  auto u = unwrap_volume(cipher_dir, current);
  if (!u.ok()) {
    Status st = u.status();
    return st.prefix("the current root");
  }
  const std::map<uint32_t, SecretBytes>& deks = u->deks;
  auto new_root = make_root_provider(new_uri, nlohmann::json::object(), next, true);
  if (!new_root.ok()) {
    Status st = new_root.status();
    return st.prefix("the new root");
  }

  VolumeConfig n = u->config;
  n.root_uri = (*new_root)->uri();
  n.root_params = (*new_root)->params();
  for (DekRecord& r : n.deks) {
    auto w = wrap_checked(**new_root, deks.at(r.version), wrap_context(labels::kWrapDek, n.volume_id, r.version));
    if (!w.ok()) return w.status();
    r.wrapped = std::move(w).value();
  }
  auto w = wrap_checked(**new_root, u->name_key, wrap_context(labels::kWrapNameKey, n.volume_id, 0));
  if (!w.ok()) return w.status();
  n.wrapped_name_key = std::move(w).value();
  auto mac = config_mac(n, deks.at(n.active_dek()->version));
  if (!mac.ok()) return mac.status();
  n.mac = *mac;
  ENVELOPEFS_RETURN_IF_ERROR(save_config(cipher_dir, n));
  return n;
}

}  // namespace envelopefs
