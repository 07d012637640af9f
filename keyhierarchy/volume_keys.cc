#include "keyhierarchy/volume_keys.h"

#include <dirent.h>

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

}  // namespace

Bytes wrap_context(const char* label, const VolumeId& volume_id, uint32_t version) {
  Bytes ctx(label, label + std::char_traits<char>::length(label));
  ctx.insert(ctx.end(), volume_id.begin(), volume_id.end());
  for (int s = 24; s >= 0; s -= 8) ctx.push_back(static_cast<uint8_t>(version >> s));
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
  c.features = {kFeatureNonceNames};
  auto dek = SecretBytes::random(32);
  auto name_key = SecretBytes::random(kSivKeySize);
  if (!dek.ok()) return dek.status();
  if (!name_key.ok()) return name_key.status();
  auto wrapped_dek = (*provider)->wrap(*dek, wrap_context(labels::kWrapDek, c.volume_id, 1));
  if (!wrapped_dek.ok()) return wrapped_dek.status();
  auto wrapped_name = (*provider)->wrap(*name_key, wrap_context(labels::kWrapNameKey, c.volume_id, 0));
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

Result<OpenedVolume> open_volume(const std::string& cipher_dir, const ProviderOptions& options) {
  auto config = load_config(cipher_dir);
  if (!config.ok()) return config.status();
  VolumeConfig& c = *config;
  auto provider = make_root_provider(c.root_uri, c.root_params, options, false);
  if (!provider.ok()) return provider.status();
  std::map<uint32_t, SecretBytes> deks;
  for (const DekRecord& r : c.deks) {
    auto dek = (*provider)->unwrap(r.wrapped, wrap_context(labels::kWrapDek, c.volume_id, r.version));
    if (!dek.ok()) {
      Status st = dek.status();
      return st.prefix("cannot unwrap DEK version " + std::to_string(r.version));
    }
    if (dek->size() != 32) return Status(Code::kCorrupt, "DEK has the wrong size");
    deks.emplace(r.version, std::move(dek).value());
  }
  auto mac = config_mac(c, deks.at(c.active_dek()->version));
  if (!mac.ok()) return mac.status();
  if (!ct_equal(*mac, c.mac)) {
    return Status(Code::kAuthFailed, std::string(kConfigFileName) +
                                         " does not authenticate: it was modified outside envelopefs");
  }
  auto name_key = (*provider)->unwrap(c.wrapped_name_key,
                                      wrap_context(labels::kWrapNameKey, c.volume_id, 0));
  if (!name_key.ok()) {
    Status st = name_key.status();
    return st.prefix("cannot unwrap the name key");
  }
  if (name_key->size() != kSivKeySize) return Status(Code::kCorrupt, "name key has the wrong size");
  auto keys = VolumeKeysBuilder::build(c, deks, *name_key);
  if (!keys.ok()) return keys.status();
  return OpenedVolume{std::move(c), std::move(provider).value(), std::move(keys).value()};
}

}  // namespace envelopefs
