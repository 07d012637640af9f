// keyhierarchy/: providers, the volume config, and failing closed on bad input.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "crypto/labels.h"
#include "keyhierarchy/kmip_ttlv.h"
#include "keyhierarchy/volume_keys.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

using test::slurp;
using test::spit;
using test::TempDir;

ProviderOptions no_prompt() {
  ProviderOptions o;
  o.allow_prompt = false;
  return o;
}

TEST(FileProvider, CreateThenOpenGivesTheSameKeys) {
  TempDir d;
  OpenedVolume v = test::make_volume(d);
  struct stat st;
  ASSERT_EQ(stat(d.sub("root.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_size, 32);
  auto again = open_volume(d.sub("cipher"), no_prompt());
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(again->keys->volume_id(), v.keys->volume_id());
  EXPECT_EQ(again->keys->active_version(), 1u);
  // Same name key: a name sealed by one opens with the other.
  Bytes ad(16, 3);
  auto sealed = v.keys->names().seal(ad, as_bytes("x"));
  ASSERT_TRUE(sealed.ok());
  EXPECT_TRUE(again->keys->names().open(ad, *sealed).ok());
}

TEST(FileProvider, RefusesGroupOrWorldReadableKeyFile) {
  TempDir d;
  test::make_volume(d);
  chmod(d.sub("root.key").c_str(), 0644);
  auto v = open_volume(d.sub("cipher"), no_prompt());
  EXPECT_EQ(v.status().code(), Code::kAccessDenied);
  EXPECT_NE(v.status().message().find("chmod 600"), std::string::npos);
}

TEST(FileProvider, MissingKeyFileIsAClearError) {
  TempDir d;
  test::make_volume(d);
  std::filesystem::remove(d.sub("root.key"));
  auto v = open_volume(d.sub("cipher"), no_prompt());
  EXPECT_EQ(v.status().code(), Code::kNotFound);
  EXPECT_NE(v.status().message().find("root.key"), std::string::npos);
}

TEST(FileProvider, WrongKeyFileIsAccessDenied) {
  TempDir d;
  test::make_volume(d);
  std::string before = slurp(d.sub("cipher/envelopefs.conf"));
  std::string other(32, 'k');
  spit(d.sub("root.key"), other);
  auto v = open_volume(d.sub("cipher"), no_prompt());
  EXPECT_EQ(v.status().code(), Code::kAccessDenied);
  EXPECT_EQ(slurp(d.sub("cipher/envelopefs.conf")), before);  // nothing written
}

TEST(FileProvider, RelativePathAndShortKeyFileRefused) {
  TempDir d;
  std::filesystem::create_directory(d.sub("cipher"));
  CreateOptions opt;
  opt.root_uri = "file:relative.key";
  EXPECT_EQ(create_volume(d.sub("cipher"), opt).status().code(), Code::kInvalidArgument);
  spit(d.sub("short.key"), "abc");
  chmod(d.sub("short.key").c_str(), 0600);
  opt.root_uri = "file:" + d.sub("short.key");
  EXPECT_EQ(create_volume(d.sub("cipher"), opt).status().code(), Code::kCorrupt);
  EXPECT_FALSE(std::filesystem::exists(d.sub("cipher/envelopefs.conf")));
}

TEST(PassProvider, RightAndWrongPassphrase) {
  TempDir d;
  std::filesystem::create_directory(d.sub("cipher"));
  spit(d.sub("pass"), "correct horse battery staple\n");
  spit(d.sub("bad"), "incorrect horse\n");
  CreateOptions opt;
  opt.root_uri = "pass:?ops=1&mem-kib=8192";
  opt.provider.passfile = d.sub("pass");
  opt.provider.allow_prompt = false;
  auto v = create_volume(d.sub("cipher"), opt);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->config.root_uri, "pass:");
  EXPECT_EQ(v->config.root_params["ops"], 1);
  ProviderOptions good = no_prompt(), bad = no_prompt();
  good.passfile = d.sub("pass");
  bad.passfile = d.sub("bad");
  EXPECT_TRUE(open_volume(d.sub("cipher"), good).ok());
  auto w = open_volume(d.sub("cipher"), bad);
  EXPECT_EQ(w.status().code(), Code::kAccessDenied);
  EXPECT_NE(w.status().message().find("wrong passphrase"), std::string::npos);
}

TEST(PassProvider, NoPassphraseSourceIsAClearError) {
  TempDir d;
  std::filesystem::create_directory(d.sub("cipher"));
  CreateOptions opt;
  opt.root_uri = "pass:?ops=1&mem-kib=8192";
  opt.provider.allow_prompt = false;
  unsetenv("ENVELOPEFS_PASSPHRASE");
  auto v = create_volume(d.sub("cipher"), opt);
  EXPECT_EQ(v.status().code(), Code::kInvalidArgument);
  EXPECT_NE(v.status().message().find("--passfile"), std::string::npos);
  opt.root_uri = "pass:?ops=1&bogus=2";
  setenv("ENVELOPEFS_PASSPHRASE", "x", 1);
  EXPECT_EQ(create_volume(d.sub("cipher"), opt).status().code(), Code::kInvalidArgument);
  unsetenv("ENVELOPEFS_PASSPHRASE");
}

TEST(VolumeConfig, TruncatedConfigIsCorrupt) {
  TempDir d;
  test::make_volume(d);
  std::string text = slurp(d.sub("cipher/envelopefs.conf"));
  for (size_t cut : {size_t{0}, size_t{1}, text.size() / 2, text.size() - 3}) {
    spit(d.sub("cipher/envelopefs.conf"), text.substr(0, cut));
    EXPECT_EQ(open_volume(d.sub("cipher"), no_prompt()).status().code(), Code::kCorrupt) << cut;
  }
}

TEST(VolumeConfig, EditedConfigFailsTheMac) {
  TempDir d;
  test::make_volume(d);
  std::string text = slurp(d.sub("cipher/envelopefs.conf"));
  auto j = nlohmann::json::parse(text);
  j["deks"][0]["created"] = "1999-01-01T00:00:00Z";  // a harmless-looking edit
  spit(d.sub("cipher/envelopefs.conf"), j.dump(2));
  auto v = open_volume(d.sub("cipher"), no_prompt());
  EXPECT_EQ(v.status().code(), Code::kAuthFailed);
  EXPECT_NE(v.status().message().find("modified"), std::string::npos);
}

TEST(VolumeConfig, UnknownVersionAndFeaturesAreUnsupported) {
  TempDir d;
  test::make_volume(d);
  auto j = nlohmann::json::parse(slurp(d.sub("cipher/envelopefs.conf")));
  EXPECT_EQ(j["features"], nlohmann::json::array({"nonce-names", "rewrappable-blocks"}));  // what init writes now
  auto no_feature = j;  // dropping a feature is an edit like any other: the MAC refuses it
  no_feature["features"] = nlohmann::json::array();
  spit(d.sub("cipher/envelopefs.conf"), no_feature.dump());
  EXPECT_EQ(open_volume(d.sub("cipher"), no_prompt()).status().code(), Code::kAuthFailed);
  auto v2 = j;
  v2["version"] = 2;
  spit(d.sub("cipher/envelopefs.conf"), v2.dump());
  EXPECT_EQ(open_volume(d.sub("cipher"), no_prompt()).status().code(), Code::kUnsupported);
  auto f = j;
  f["features"] = {"nonce-names", "time-travel"};  // one unknown feature is enough to refuse
  spit(d.sub("cipher/envelopefs.conf"), f.dump());
  EXPECT_EQ(open_volume(d.sub("cipher"), no_prompt()).status().code(), Code::kUnsupported);
  auto bs = j;
  bs["block_size"] = 5000;
  spit(d.sub("cipher/envelopefs.conf"), bs.dump());
  EXPECT_EQ(open_volume(d.sub("cipher"), no_prompt()).status().code(), Code::kCorrupt);
}

TEST(VolumeConfig, WrongBlockSizeRefusedAtCreate) {
  for (uint32_t bs : {0u, 512u, 4095u, 6000u, 131072u}) {
    TempDir d;
    std::filesystem::create_directory(d.sub("cipher"));
    CreateOptions opt;
    opt.root_uri = "file:" + d.sub("root.key");
    opt.block_size = bs;
    EXPECT_EQ(create_volume(d.sub("cipher"), opt).status().code(), Code::kInvalidArgument) << bs;
  }
}

TEST(VolumeConfig, InitRefusesNonEmptyDirAndExistingVolume) {
  TempDir d;
  test::make_volume(d);
  CreateOptions opt;
  opt.root_uri = "file:" + d.sub("root.key");
  EXPECT_EQ(create_volume(d.sub("cipher"), opt).status().code(), Code::kAlreadyExists);
  std::filesystem::create_directory(d.sub("other"));
  spit(d.sub("other/precious.txt"), "data");
  EXPECT_EQ(create_volume(d.sub("other"), opt).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(slurp(d.sub("other/precious.txt")), "data");
}

TEST(VolumeConfig, WrappedDekIsBoundToItsVolume) {
  // A wrapped DEK copied from one volume's config into another's does not unwrap there, even
  // under the same root key: the volume id is part of the wrap context.
  TempDir d;
  std::filesystem::create_directory(d.sub("a"));
  std::filesystem::create_directory(d.sub("b"));
  CreateOptions opt;
  opt.root_uri = "file:" + d.sub("root.key");
  ASSERT_TRUE(create_volume(d.sub("a"), opt).ok());
  ASSERT_TRUE(create_volume(d.sub("b"), opt).ok());
  auto a = nlohmann::json::parse(slurp(d.sub("a/envelopefs.conf")));
  auto b = nlohmann::json::parse(slurp(d.sub("b/envelopefs.conf")));
  b["deks"][0]["wrapped"] = a["deks"][0]["wrapped"];
  spit(d.sub("b/envelopefs.conf"), b.dump());
  EXPECT_EQ(open_volume(d.sub("b"), no_prompt()).status().code(), Code::kAccessDenied);
}

TEST(VolumeConfig, ConfigNeverContainsKeyMaterial) {
  TempDir d;
  test::make_volume(d);
  std::string conf = slurp(d.sub("cipher/envelopefs.conf"));
  std::string key = slurp(d.sub("root.key"));
  EXPECT_EQ(conf.find(to_hex(as_bytes(key))), std::string::npos);
  EXPECT_EQ(conf.find(base64_encode(as_bytes(key))), std::string::npos);
  EXPECT_EQ(conf.find(key), std::string::npos);
}

}  // namespace
}  // namespace envelopefs

// TTLV against the encodings given in the KMIP 1.4 specification (section 9.1.2).
TEST(KmipTtlv, EncodesTheSpecificationExamples) {
  using envelopefs::kmip::Item;
  EXPECT_EQ(envelopefs::to_hex(envelopefs::kmip::encode(Item::integer(0x420020, 8))),
            "42002002000000040000000800000000");
  EXPECT_EQ(envelopefs::to_hex(envelopefs::kmip::encode(Item::text(0x420020, "Hello World"))),
            "420020070000000b48656c6c6f20576f726c640000000000");
  EXPECT_EQ(envelopefs::to_hex(envelopefs::kmip::encode(Item::structure(
                0x420020, {Item::enumeration(0x420004, 254), Item::integer(0x420005, 255)}))),
            "42002001000000204200040500000004000000fe000000004200050200000004000000ff00000000");
}

TEST(KmipTtlv, DecodesWhatItEncodesAndRefusesMalformedInput) {
  using envelopefs::kmip::Item;
  const uint8_t raw[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  Item msg = Item::structure(0x42007B, {Item::integer(0x42007F, 0), Item::bytestring(0x4200C2, raw),
                                         Item::structure(0x42000F, {Item::text(0x420094, "17")})});
  envelopefs::Bytes wire = envelopefs::kmip::encode(msg);
  auto back = envelopefs::kmip::decode(wire);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  ASSERT_NE(back->find(0x4200C2), nullptr);
  EXPECT_EQ(back->find(0x4200C2)->bytes, envelopefs::Bytes(raw, raw + sizeof raw));
  EXPECT_EQ(back->find(0x42000F)->find(0x420094)->as_text(), "17");
  EXPECT_EQ(envelopefs::kmip::encode(*back), wire);

  envelopefs::Bytes truncated(wire.begin(), wire.end() - 8);
  EXPECT_EQ(envelopefs::kmip::decode(truncated).status().code(), envelopefs::Code::kCorrupt);
  envelopefs::Bytes trailing = wire;
  trailing.resize(trailing.size() + 8, 0);
  EXPECT_EQ(envelopefs::kmip::decode(trailing).status().code(), envelopefs::Code::kCorrupt);
  envelopefs::Bytes too_long = wire;
  too_long[7] = 0xF0;  // the outer length now claims more than there is
  EXPECT_EQ(envelopefs::kmip::decode(too_long).status().code(), envelopefs::Code::kCorrupt);
  envelopefs::Bytes bad_int = envelopefs::kmip::encode(Item::integer(0x420020, 8));
  bad_int[7] = 8;  // an Integer must be 4 bytes long
  EXPECT_EQ(envelopefs::kmip::decode(bad_int).status().code(), envelopefs::Code::kCorrupt);
}
