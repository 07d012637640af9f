// Helpers shared by the unit tests: temporary directories, hex, a volume with a throwaway key.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "crypto/bytes.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs::test {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "envelopefs-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A whole file as text, and a whole file written from text.
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
inline void spit(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

inline Bytes hex(std::string_view h) {
  Bytes b;
  std::string clean;
  for (char c : h) {
    if (c != ' ') clean += c;
  }
  EXPECT_TRUE(from_hex(clean, &b)) << h;
  return b;
}

// A fresh volume under `dir`/cipher with a throwaway file: root key in `dir`.
inline OpenedVolume make_volume(const TempDir& dir, uint32_t block_size = 4096) {
  std::filesystem::create_directory(dir.sub("cipher"));
  CreateOptions opt;
  opt.root_uri = "file:" + dir.sub("root.key");
  opt.block_size = block_size;
  auto v = create_volume(dir.sub("cipher"), opt);
  EXPECT_TRUE(v.ok()) << v.status().to_string();
  return std::move(v).value();
}

}  // namespace envelopefs::test
