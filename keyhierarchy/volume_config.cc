#include "keyhierarchy/volume_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace envelopefs {
namespace {

using nlohmann::json;

constexpr size_t kMaxConfigSize = 1 << 20;

const char* state_name(DekState s) { return s == DekState::kActive ? "active" : "retired"; }

json to_json_without_mac(const VolumeConfig& c) {
  json deks = json::array();
  for (const DekRecord& d : c.deks) {
    deks.push_back({{"version", d.version},
                    {"state", state_name(d.state)},
                    {"wrapped", base64_encode(d.wrapped)},
                    {"created", d.created}});
  }
  return {{"format", "envelopefs"},
          {"version", c.format_version},
          {"volume_id", to_hex(c.volume_id)},
          {"block_size", c.block_size},
          {"root", {{"uri", c.root_uri}, {"params", c.root_params}}},
          {"deks", deks},
          {"name_key", base64_encode(c.wrapped_name_key)},
          {"features", c.features}};
}

Status corrupt(const std::string& what) {
  return Status(Code::kCorrupt, std::string(kConfigFileName) + ": " + what);
}

}  // namespace

Status validate_block_size(uint64_t bs) {
  if (bs < 4096 || bs > 65536 || (bs & (bs - 1)) != 0) {
    return Status(Code::kInvalidArgument,
                  "block size must be a power of two from 4096 to 65536, got " + std::to_string(bs));
  }
  return Status::Ok();
}

const DekRecord* VolumeConfig::active_dek() const {
  for (const DekRecord& d : deks) {
    if (d.state == DekState::kActive) return &d;
  }
  return nullptr;
}

bool VolumeConfig::has_feature(std::string_view feature) const {
  return std::find(features.begin(), features.end(), feature) != features.end();
}

std::string VolumeConfig::mac_input() const { return to_json_without_mac(*this).dump(); }

std::string VolumeConfig::serialize() const {
  json j = to_json_without_mac(*this);
  j["mac"] = to_hex(mac);
  return j.dump(2) + "\n";
}

Result<VolumeConfig> VolumeConfig::parse(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return corrupt("not valid JSON (truncated or edited?)");
  VolumeConfig c;
  try {
    if (j.at("format").get<std::string>() != "envelopefs") return corrupt("not an envelopefs config");
    c.format_version = j.at("version").get<uint32_t>();
    if (c.format_version != kFormatVersion) {
      return Status(Code::kUnsupported, "volume format version " + std::to_string(c.format_version) +
                                            " is not supported by this build (supports " +
                                            std::to_string(kFormatVersion) + ")");
    }
    Bytes id;
    if (!from_hex(j.at("volume_id").get<std::string>(), &id) || id.size() != 16) {
      return corrupt("bad volume_id");
    }
    std::copy(id.begin(), id.end(), c.volume_id.begin());
    uint64_t bs = j.at("block_size").get<uint64_t>();
    if (!validate_block_size(bs).ok()) return corrupt("unsupported block_size " + std::to_string(bs));
    c.block_size = static_cast<uint32_t>(bs);
    c.root_uri = j.at("root").at("uri").get<std::string>();
    c.root_params = j.at("root").at("params");
    for (const json& d : j.at("deks")) {
      DekRecord r;
      r.version = d.at("version").get<uint32_t>();
      std::string state = d.at("state").get<std::string>();
      if (state == "active") r.state = DekState::kActive;
      else if (state == "retired") r.state = DekState::kRetired;
      else return corrupt("unknown DEK state '" + state + "'");
      if (r.version == 0 || !base64_decode(d.at("wrapped").get<std::string>(), &r.wrapped)) {
        return corrupt("bad DEK record");
      }
      r.created = d.at("created").get<std::string>();
      for (const DekRecord& other : c.deks) {
        if (other.version == r.version) return corrupt("duplicate DEK version");
      }
      c.deks.push_back(std::move(r));
    }
    int active = 0;
    for (const DekRecord& d : c.deks) active += d.state == DekState::kActive;
    if (active != 1) return corrupt("there must be exactly one active DEK");
    if (!base64_decode(j.at("name_key").get<std::string>(), &c.wrapped_name_key)) {
      return corrupt("bad name_key");
    }
    c.features = j.at("features").get<std::vector<std::string>>();
    for (const std::string& f : c.features) {
      if (std::find(std::begin(kKnownFeatures), std::end(kKnownFeatures), f) == std::end(kKnownFeatures)) {
        return Status(Code::kUnsupported, "volume uses feature '" + f + "' that this build does not know");
      }
    }
    Bytes mac;
    if (!from_hex(j.at("mac").get<std::string>(), &mac) || mac.size() != c.mac.size()) {
      return corrupt("bad mac");
    }
    std::copy(mac.begin(), mac.end(), c.mac.begin());
  } catch (const json::exception& e) {
    return corrupt(std::string("missing or mistyped field (") + e.what() + ")");
  }
  return c;
}

namespace {
Status no_volume(const std::string& cipher_dir) {
  return Status(Code::kNotFound,
                "no envelopefs volume in " + cipher_dir + " (missing " + kConfigFileName + ")");
}
}  // namespace

Status require_config(const std::string& cipher_dir) {
  struct stat st {};
  const std::string path = cipher_dir + "/" + kConfigFileName;
  if (stat(path.c_str(), &st) == 0) return Status::Ok();
  if (errno == ENOENT || errno == ENOTDIR) return no_volume(cipher_dir);
  return Status::Io(errno, "cannot stat " + path);
}

Result<VolumeConfig> load_config(const std::string& cipher_dir) {
  std::string path = cipher_dir + "/" + kConfigFileName;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return no_volume(cipher_dir);
    return Status::Io(errno, "cannot open " + path);
  }
  std::string text(kMaxConfigSize + 1, '\0');
  size_t got = 0;
  ssize_t n;
  while ((n = read(fd, text.data() + got, text.size() - got)) > 0) got += static_cast<size_t>(n);
  int err = errno;
  close(fd);
  if (n < 0) return Status::Io(err, "cannot read " + path);
  if (got > kMaxConfigSize) return corrupt("file is too large");
  text.resize(got);
  return VolumeConfig::parse(text);
}

Status save_config(const std::string& cipher_dir, const VolumeConfig& config) {
  return replace_file(cipher_dir, kConfigFileName, config.serialize());
}

Status replace_file(const std::string& dir, const std::string& name, std::string_view text) {
  std::string path = dir + "/" + name;
  std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::Io(errno, "cannot create " + tmp);
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      int err = errno;
      close(fd);
      unlink(tmp.c_str());
      return Status::Io(err, "cannot write " + tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    int err = errno;
    close(fd);
    unlink(tmp.c_str());
    return Status::Io(err, "cannot fsync " + tmp);
  }
  close(fd);
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    return Status::Io(err, "cannot rename " + tmp);
  }
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Status::Io(errno, "cannot open " + dir);
  int rc = fsync(dfd);
  int err = errno;
  close(dfd);
  if (rc != 0) return Status::Io(err, "cannot fsync " + dir);
  return Status::Ok();
}

}  // namespace envelopefs
