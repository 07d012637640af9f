// The exec: root-key provider against real programs: the RSA-OAEP reference program of the
// tests (tests/tools/exec_root_rsa.sh, openssl underneath) and small scripts that misbehave
// on purpose (wrong exit codes, garbage, silence, unsafe modes).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "keyhierarchy/root_provider.h"
#include "keyhierarchy/volume_keys.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

using test::slurp;
using test::TempDir;

// A fresh 32-byte key to wrap.
SecretBytes a_key() {
  auto key = SecretBytes::random(32);
  EXPECT_TRUE(key.ok());
  return key.ok() ? std::move(key).value() : SecretBytes(32);
}

// A program of the test's own in `d`, mode 0700 unless told.
std::string script(const TempDir& d, const std::string& name, const std::string& body, mode_t mode = 0700) {
  std::string path = d.sub(name);
  std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
  chmod(path.c_str(), mode);
  return path;
}

// The reference program with a fresh RSA key pair beside it: "exec:PROGRAM?DIR".
std::string rsa_root(const TempDir& d) {
  std::filesystem::create_directory(d.sub("keys"));
  const std::string keys = d.sub("keys");
  std::string cmd = "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " + keys +
                    "/root.pem 2>/dev/null && openssl pkey -in " + keys + "/root.pem -pubout -out " + keys +
                    "/root.pub.pem";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << "openssl could not make an RSA key";
  std::filesystem::copy_file(ENVELOPEFS_TEST_TOOLS "/exec_root_rsa.sh", d.sub("exec_root_rsa.sh"));
  chmod(d.sub("exec_root_rsa.sh").c_str(), 0700);
  return "exec:" + d.sub("exec_root_rsa.sh") + "?" + keys;
}

Result<std::unique_ptr<RootKeyProvider>> provider(const std::string& uri) {
  return make_root_provider(uri, nlohmann::json::object(), ProviderOptions{}, false);
}

Bytes context(uint8_t tag) {
  return Bytes(24, tag);
}

TEST(ExecProvider, AVolumeMadeThroughTheProgramOpensThroughIt) {
  TempDir d;
  std::filesystem::create_directory(d.sub("cipher"));
  CreateOptions opt;
  opt.root_uri = rsa_root(d);
  auto made = create_volume(d.sub("cipher"), opt);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  EXPECT_EQ(made->config.root_uri, opt.root_uri);
  EXPECT_NE(made->provider->describe().find("external key command"), std::string::npos);
  ProviderOptions po;
  po.allow_prompt = false;
  auto again = open_volume(d.sub("cipher"), po);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(again->keys->volume_id(), made->keys->volume_id());
  Bytes ad(16, 7);
  auto sealed = made->keys->names().seal(ad, as_bytes("a name"));
  ASSERT_TRUE(sealed.ok());
  EXPECT_TRUE(again->keys->names().open(ad, *sealed).ok());

  // The private key gone: the program says access denied, and so do we.
  std::filesystem::rename(d.sub("keys/root.pem"), d.sub("keys/root.pem.away"));
  auto refused = open_volume(d.sub("cipher"), po);
  EXPECT_EQ(refused.status().code(), Code::kAccessDenied) << refused.status().to_string();
  EXPECT_NE(refused.status().message().find("the private key is gone"), std::string::npos)
      << "the program's own explanation belongs in the message: " << refused.status().to_string();
  // Its whole directory gone: the program cannot reach the key at all.
  std::filesystem::rename(d.sub("keys"), d.sub("keys.away"));
  EXPECT_EQ(open_volume(d.sub("cipher"), po).status().code(), Code::kUnreachable);
}

TEST(ExecProvider, AWrapOnlyUnwrapsUnderItsOwnContext) {
  TempDir d;
  auto p = provider(rsa_root(d));
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  SecretBytes key = a_key();
  auto wrapped = (*p)->wrap(key, context(1));
  ASSERT_TRUE(wrapped.ok()) << wrapped.status().to_string();
  EXPECT_EQ(wrapped->size(), 256u);  // an RSA-2048 block: the program's answer, decoded
  auto back = (*p)->unwrap(*wrapped, context(1));
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_TRUE(ct_equal(back->view(), key.view()));
  EXPECT_EQ((*p)->unwrap(*wrapped, context(2)).status().code(), Code::kAuthFailed);
  Bytes altered = *wrapped;
  altered[100] ^= 1;
  EXPECT_EQ((*p)->unwrap(altered, context(1)).status().code(), Code::kAuthFailed);
}

TEST(ExecProvider, KeyMaterialReachesTheProgramOnlyThroughItsStandardInput) {
  TempDir d;
  // Records its argv, environment and input, then answers with its input (a "wrap" that is
  // the identity: enough to see where the key travels).
  std::string rec = d.sub("rec");
  auto p = provider("exec:" +
                    script(d, "recorder",
                           "echo \"$@\" > " + rec + ".argv; env > " + rec + ".env; cat > " + rec +
                               ".stdin; cat " + rec + ".stdin") +
                    "?an-argument");
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  SecretBytes key = a_key();
  auto wrapped = (*p)->wrap(key, context(3));
  ASSERT_TRUE(wrapped.ok()) << wrapped.status().to_string();
  EXPECT_TRUE(ct_equal(*wrapped, key.view()));
  const std::string b64 = base64_encode(key.view());
  EXPECT_EQ(slurp(rec + ".stdin"), b64 + "\n");
  EXPECT_EQ(slurp(rec + ".argv"), "wrap an-argument\n");
  const std::string env = slurp(rec + ".env");
  EXPECT_EQ(env.find(b64), std::string::npos);
  EXPECT_NE(env.find("ENVELOPEFS_CONTEXT=" + base64_encode(context(3)) + "\n"), std::string::npos);
  EXPECT_NE(env.find("ENVELOPEFS_EXEC_PROTOCOL=1\n"), std::string::npos);
}

TEST(ExecProvider, ACallerWithoutStandardDescriptorsStillGivesTheProgramItsOwn) {
  // A daemon or a service may start with 0-2 closed; the pipes then land on them.
  TempDir d;
  auto p = provider("exec:" + script(d, "echo", "cat"));
  ASSERT_TRUE(p.ok());
  SecretBytes key = a_key();
  int saved[3];
  for (int fd = 0; fd < 3; ++fd) saved[fd] = dup(fd);
  for (int fd = 0; fd < 3; ++fd) close(fd);
  auto wrapped = (*p)->wrap(key, context(7));
  for (int fd = 0; fd < 3; ++fd) {
    dup2(saved[fd], fd);
    close(saved[fd]);
  }
  ASSERT_TRUE(wrapped.ok()) << wrapped.status().to_string();
  EXPECT_TRUE(ct_equal(*wrapped, key.view()));
}

TEST(ExecProvider, EveryWayAProgramCanFailIsAnErrorOfTheRightKind) {
  TempDir d;
  SecretBytes key = a_key();
  struct Case {
    std::string body;
    Code code;
    std::string said;
  } cases[] = {
      {"echo 'AccessDeniedException: key disabled' >&2; exit 77", Code::kAccessDenied, "key disabled"},
      {"exit 65", Code::kAuthFailed, "did not authenticate"},
      {"echo 'connect timeout' >&2; exit 75", Code::kUnreachable, "connect timeout"},
      {"echo 'first line' >&2; echo 'Traceback: boom' >&2; exit 1", Code::kUnreachable,
       "exit status 1: Traceback: boom"},
      {"kill -9 $$", Code::kUnreachable, "signal 9"},
      {"echo 'not base64 at all!'", Code::kCorrupt, "base64"},
      {"true", Code::kCorrupt, "base64"},       // says nothing
      {"exec 0<&-; echo QUJD", Code::kOk, ""},  // never reads its input: no SIGPIPE for us
      {"head -c 100000 /dev/zero", Code::kCorrupt, "16 KiB"},
  };
  int i = 0;
  for (const Case& c : cases) {
    std::string name = std::to_string(i++);  // not "p" + to_string: GCC 12 misreads it (-Wrestrict)
    auto p = provider("exec:" + script(d, name, c.body));
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    auto r = (*p)->wrap(key, context(4));
    EXPECT_EQ(r.status().code(), c.code) << c.body << ": " << r.status().to_string();
    EXPECT_NE(r.status().message().find(c.said), std::string::npos)
        << c.body << ": " << r.status().to_string();
  }
}

TEST(ExecProvider, AProgramThatDoesNotAnswerIsKilledAtTheTimeout) {
  TempDir d;
  auto p = provider("exec:" + script(d, "slow", "sleep 60 & sleep 60"));
  ASSERT_TRUE(p.ok());
  SecretBytes key = a_key();
  setenv("ENVELOPEFS_EXEC_TIMEOUT", "1", 1);
  const auto start = std::chrono::steady_clock::now();
  auto r = (*p)->wrap(key, context(5));
  const auto took = std::chrono::steady_clock::now() - start;
  unsetenv("ENVELOPEFS_EXEC_TIMEOUT");
  EXPECT_EQ(r.status().code(), Code::kUnreachable);
  EXPECT_NE(r.status().message().find("did not answer within 1 s"), std::string::npos)
      << r.status().to_string();
  // The background sleep held the output pipe open too: the whole group was killed.
  EXPECT_LT(took, std::chrono::seconds(10));
}

TEST(ExecProvider, AWrappedKeyLongerThanAnyAnswerIsRefusedUnsent) {
  // 50,000 bytes are 66,668 characters of base64: more than an empty pipe holds, so a write of
  // them to a program that never reads would wait for as long as the program lives.
  TempDir d;
  auto p = provider("exec:" + script(d, "deaf", "sleep 30"));
  ASSERT_TRUE(p.ok());
  const auto start = std::chrono::steady_clock::now();
  auto r = (*p)->unwrap(Bytes(50000, 1), context(8));
  EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().to_string();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ExecProvider, OnlyASafeAbsoluteProgramIsRun) {
  TempDir d;
  EXPECT_EQ(provider("exec:relative/prog").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(provider("exec:").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(provider("exec:" + d.sub("missing")).status().code(), Code::kUnreachable);
  auto writable = provider("exec:" + script(d, "w", "true", 0722));
  EXPECT_EQ(writable.status().code(), Code::kInvalidArgument);
  EXPECT_NE(writable.status().message().find("chmod go-w"), std::string::npos)
      << writable.status().to_string();
  EXPECT_EQ(provider("exec:" + script(d, "nx", "true", 0600)).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(provider("exec:" + d.path()).status().code(), Code::kInvalidArgument);  // a directory

  // Checked at every run, not only when the provider was made.
  std::string prog = script(d, "later", "cat");
  auto p = provider("exec:" + prog);
  ASSERT_TRUE(p.ok());
  SecretBytes key = a_key();
  ASSERT_TRUE((*p)->wrap(key, context(6)).ok());
  chmod(prog.c_str(), 0777);
  EXPECT_EQ((*p)->wrap(key, context(6)).status().code(), Code::kInvalidArgument);
  std::filesystem::remove(prog);
  EXPECT_EQ((*p)->wrap(key, context(6)).status().code(), Code::kUnreachable);
}

}  // namespace
}  // namespace envelopefs
