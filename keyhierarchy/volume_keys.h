// The unwrapped keys of an open volume, all in locked memory: each DEK version with its
// per-block key wrapper and metadata-page MAC, and the name cipher. Created only by
// open_volume()/create_volume(), after the config MAC has been checked.
#pragma once

#include <map>
#include <memory>

#include "crypto/key_wrap.h"
#include "crypto/kdf.h"
#include "crypto/name_cipher.h"
#include "keyhierarchy/root_provider.h"
#include "keyhierarchy/volume_config.h"

namespace envelopefs {

struct Dek {
  Dek(uint32_t v, const SecretBytes& dek, const SecretBytes& page_mac_key)
      : version(v), wrapper(dek), page_mac(page_mac_key) {}
  const uint32_t version;
  KeyWrapper wrapper;   // wraps the per-block keys (RFC 3394)
  HmacSha256 page_mac;  // HMAC key derived from this DEK, authenticates metadata pages
};

class VolumeKeys {
 public:
  const VolumeId& volume_id() const { return volume_id_; }
  uint32_t block_size() const { return block_size_; }
  uint32_t active_version() const { return active_; }
  Dek& active() { return *deks_.at(active_); }
  size_t dek_versions() const { return deks_.size(); }
  Dek* dek(uint32_t version) {
    auto it = deks_.find(version);
    return it == deks_.end() ? nullptr : it->second.get();
  }
  const NameCipher& names() const { return *names_; }
  // The volume has the "rewrappable-blocks" feature: block keys can move to another DEK
  // version without re-encrypting (fs/block_rewrap.h).
  bool rewrappable_blocks() const { return rewrappable_blocks_; }
  // The DEK version a block's associated data names for a block whose key `version` wraps: 0
  // in volumes with rewrappable blocks, `version` in older ones (fs/FORMAT.md, "Data blocks").
  uint32_t block_aad_version(uint32_t version) const { return rewrappable_blocks_ ? 0 : version; }

  // False once wiped: the root was revoked and every key is gone (recheck_root builds new ones).
  bool present() const { return names_ != nullptr; }
  // Destroys every key now (their destructors cleanse them). Callers make sure nothing is
  // using them (fs/key_gate.h).
  void wipe() {
    deks_.clear();
    names_.reset();
  }

 private:
  friend class VolumeKeysBuilder;
  VolumeId volume_id_{};
  uint32_t block_size_ = 0;
  uint32_t active_ = 0;
  bool rewrappable_blocks_ = false;
  std::map<uint32_t, std::unique_ptr<Dek>> deks_;
  std::unique_ptr<NameCipher> names_;
};

struct OpenedVolume {
  VolumeConfig config;
  std::unique_ptr<RootKeyProvider> provider;
  std::unique_ptr<VolumeKeys> keys;
};

struct CreateOptions {
  std::string root_uri;  // empty: file:<default_root_key_path()>
  uint32_t block_size = 4096;
  ProviderOptions provider;
};

// Writes a new envelopefs.conf into `cipher_dir` (which must exist and be empty).
Result<OpenedVolume> create_volume(const std::string& cipher_dir, const CreateOptions& options);
// Loads and verifies the config, unwraps every DEK version and the name key. Fails closed.
Result<OpenedVolume> open_volume(const std::string& cipher_dir, const ProviderOptions& options);

// Root rotation, or a move to another provider: unwraps every DEK version and the name key
// through the current root (checking the config MAC), wraps each under `new_uri` (creating
// its key where the provider does: a key file, a token key) and replaces the config
// atomically, once each new wrap has been unwrapped again. O(number of DEK versions): no
// data, metadata page or name is touched, and a mounted volume keeps running. The old root
// is not destroyed; until it is, it still opens copies of the config taken before.
Result<VolumeConfig> rewrap_root(const std::string& cipher_dir, const ProviderOptions& current,
                                 const std::string& new_uri, const ProviderOptions& next);

// Asks the root again, as a mount would (the config re-read, a fresh provider, every wrapped key
// unwrapped, the MAC checked): Ok while the root still opens this volume. When `keys` was wiped,
// or the config now has another active DEK version (rotate_dek), `fresh` receives keys built
// from the config as it is now; otherwise it is left empty. kAccessDenied / kNotFound /
// kAuthFailed: the root refuses (revoked, destroyed, or not this volume's); kUnreachable: it
// could not be asked.
Status recheck_root(const std::string& cipher_dir, const ProviderOptions& options, const VolumeKeys& keys,
                    std::unique_ptr<VolumeKeys>* fresh);

// DEK rotation: a new random DEK version, wrapped by the root (and checked to unwrap), becomes
// the active one; the one before is retired but stays, wrapped by the root, because blocks
// written under it still need it. The config MAC moves to the new DEK. Blocks are not touched
// here: a mounted volume switches at its next key check (fs/key_watch.h) and then re-wraps the
// existing block keys under the new version (fs/block_rewrap.h).
Result<VolumeConfig> rotate_dek(const std::string& cipher_dir, const ProviderOptions& options);

// Removes retired DEK version `version` from the config (the config MAC checked through the
// root first, and recomputed under the active DEK): crypto-shredding of whatever that version
// still wraps, in this volume and in every copy of the cipher dir that takes this config. The
// caller makes sure nothing of the volume needs it (fs/fsck.h, scan_dek_use). Refused as
// check_droppable() refuses.
Result<VolumeConfig> drop_dek(const std::string& cipher_dir, const ProviderOptions& options, uint32_t version);
// Whether `c` has a DEK version `version` that drop_dek may remove: kNotFound if it has none,
// kInvalidArgument for the active one.
Status check_droppable(const VolumeConfig& c, uint32_t version);

// The associated data of a root wrap (labels.h + volume id + version); public for tests.
Bytes wrap_context(const char* label, const VolumeId& volume_id, uint32_t version);

}  // namespace envelopefs
