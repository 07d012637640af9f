// envelopefs.conf: the volume config at the cipher dir root. JSON; byte layout and meaning in
// keyhierarchy/KEYS.md. Parsing here is structural only; the MAC is checked by VolumeKeys once
// the DEK is unwrapped (the MAC key is derived from the active DEK).
#pragma once

#include <array>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "crypto/bytes.h"
#include "crypto/kdf.h"
#include "crypto/status.h"

namespace envelopefs {

inline constexpr char kConfigFileName[] = "envelopefs.conf";
inline constexpr uint32_t kFormatVersion = 1;

// Optional format features a volume may use (keyhierarchy/KEYS.md, fs/FORMAT.md). A build
// refuses a volume that names a feature it does not know, so an older build fails with a clear
// message instead of misreading a newer volume.
//   nonce-names: a directory's nonce is the name of an empty file in it (fs/FORMAT.md, "Names");
//                every volume init makes has it since 2026-11-23.
//   rewrappable-blocks: a data block's GCM associated data does not name the DEK version that
//                wraps its key (that field is 0), so a block key can be re-wrapped under a new
//                DEK by rewriting metadata pages alone (fs/FORMAT.md, "Data blocks"; fs/block_rewrap.h);
//                every volume init makes has it since 2026-11-29.
inline constexpr char kFeatureNonceNames[] = "nonce-names";
inline constexpr char kFeatureRewrappableBlocks[] = "rewrappable-blocks";
inline constexpr const char* kKnownFeatures[] = {kFeatureNonceNames, kFeatureRewrappableBlocks};

using VolumeId = std::array<uint8_t, 16>;

enum class DekState { kActive, kRetired };

struct DekRecord {
  uint32_t version = 0;
  DekState state = DekState::kActive;
  Bytes wrapped;
  std::string created;  // ISO 8601 UTC
};

struct VolumeConfig {
  uint32_t format_version = kFormatVersion;
  VolumeId volume_id{};
  uint32_t block_size = 4096;
  std::string root_uri;
  nlohmann::json root_params = nlohmann::json::object();
  std::vector<DekRecord> deks;
  Bytes wrapped_name_key;
  std::vector<std::string> features;  // see kKnownFeatures; unknown ones are refused
  Mac256 mac{};

  const DekRecord* active_dek() const;
  bool has_feature(std::string_view feature) const;

  static Result<VolumeConfig> parse(std::string_view text);
  // The canonical bytes the MAC covers: the JSON without the "mac" member, keys sorted.
  std::string mac_input() const;
  std::string serialize() const;
};

Status validate_block_size(uint64_t block_size);

// Reads CIPHERDIR/envelopefs.conf. kNotFound if there is no volume there.
Result<VolumeConfig> load_config(const std::string& cipher_dir);
// Ok if CIPHERDIR holds a config (not read), else load_config's kNotFound: for a step that
// would otherwise write into a directory that is not a volume.
Status require_config(const std::string& cipher_dir);
// Atomic replace: temp file, fsync, rename, fsync of the directory (replace_file).
Status save_config(const std::string& cipher_dir, const VolumeConfig& config);
// Replaces `dir`/`name` with `text`, atomically and durably: `name`.tmp written and fsynced,
// renamed over `name`, the directory fsynced. Mode 0600.
Status replace_file(const std::string& dir, const std::string& name, std::string_view text);

}  // namespace envelopefs
