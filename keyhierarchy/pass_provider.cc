#include "keyhierarchy/pass_provider.h"

#include <fcntl.h>
#include <sodium.h>
#include <termios.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "crypto/aead_gcm.h"
#include "crypto/labels.h"
#include "crypto/random.h"
#include "keyhierarchy/local_wrap.h"
#include "keyhierarchy/secret_file.h"

namespace envelopefs {
namespace {

constexpr size_t kRootKeySize = 32;
constexpr size_t kMaxPassphrase = 4096;

class PassProvider final : public RootKeyProvider {
 public:
  PassProvider(nlohmann::json params, SecretBytes key) : params_(std::move(params)), key_(std::move(key)) {}
  std::string uri() const override { return "pass:"; }
  std::string describe() const override {
    return "passphrase (Argon2id, ops " + std::to_string(params_["ops"].get<uint64_t>()) +
           ", memory " + std::to_string(params_["mem_kib"].get<uint64_t>()) + " KiB)";
  }
  nlohmann::json params() const override { return params_; }
  Result<Bytes> wrap(const SecretBytes& key, ByteView context) override {
    return local_wrap(key_, key, context);
  }
  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) override {
    return local_unwrap(key_, wrapped, context, wrapped.size() - kGcmIvSize - kGcmTagSize);
  }

 private:
  nlohmann::json params_;
  SecretBytes key_;
};

// Reads one line without echo from the terminal into locked memory.
Result<SecretBytes> prompt(const char* question) {
  int fd = open("/dev/tty", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    return Status(Code::kInvalidArgument,
                  "a passphrase is needed: no terminal to ask on; use --passfile FILE or "
                  "ENVELOPEFS_PASSPHRASE");
  }
  (void)!write(fd, question, std::strlen(question));
  termios old{}, quiet{};
  bool tty = tcgetattr(fd, &old) == 0;
  if (tty) {
    quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    tcsetattr(fd, TCSAFLUSH, &quiet);
  }
  SecretBytes buf(kMaxPassphrase);
  size_t n = 0;
  char c;
  while (n < kMaxPassphrase && read(fd, &c, 1) == 1 && c != '\n') buf.data()[n++] = static_cast<uint8_t>(c);
  if (tty) tcsetattr(fd, TCSAFLUSH, &old);
  (void)!write(fd, "\n", 1);
  close(fd);
  return SecretBytes(buf.data(), n);
}


Result<SecretBytes> get_passphrase(const ProviderOptions& options, bool creating) {
  Result<SecretBytes> pass = Status(Code::kInternal, "unset");
  if (!options.passfile.empty()) {
    pass = read_secret_file(options.passfile, "passphrase", false);
  } else if (const char* env = std::getenv("ENVELOPEFS_PASSPHRASE")) {
    pass = SecretBytes(reinterpret_cast<const uint8_t*>(env), std::strlen(env));
  } else if (options.allow_prompt) {
    pass = prompt("Passphrase: ");
    if (pass.ok() && creating) {
      auto again = prompt("Repeat passphrase: ");
      if (!again.ok()) return again.status();
      if (!ct_equal(pass->view(), again->view())) {
        return Status(Code::kInvalidArgument, "the passphrases do not match");
      }
    }
  } else {
    return Status(Code::kInvalidArgument, "a passphrase is needed: use --passfile FILE");
  }
  if (pass.ok() && pass->empty()) return Status(Code::kInvalidArgument, "the passphrase is empty");
  return pass;
}

Status parse_costs(const std::string& query, uint64_t* ops, uint64_t* mem_kib) {
  size_t pos = 0;
  while (pos < query.size()) {
    size_t amp = query.find('&', pos);
    std::string kv = query.substr(pos, amp == std::string::npos ? std::string::npos : amp - pos);
    pos = amp == std::string::npos ? query.size() : amp + 1;
    size_t eq = kv.find('=');
    std::string k = kv.substr(0, eq);
    std::string v = eq == std::string::npos ? "" : kv.substr(eq + 1);
    char* end = nullptr;
    uint64_t n = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0') return Status(Code::kInvalidArgument, "pass: bad value in '" + kv + "'");
    if (k == "ops") *ops = n;
    else if (k == "mem-kib") *mem_kib = n;
    else return Status(Code::kInvalidArgument, "pass: unknown parameter '" + k + "' (ops, mem-kib)");
  }
  if (*ops < crypto_pwhash_OPSLIMIT_MIN || *ops > crypto_pwhash_OPSLIMIT_MAX ||
      *mem_kib * 1024 < crypto_pwhash_MEMLIMIT_MIN || *mem_kib > (uint64_t{1} << 32)) {
    return Status(Code::kInvalidArgument, "pass: Argon2id costs out of range");
  }
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<RootKeyProvider>> make_pass_provider(const std::string& query,
                                                            const nlohmann::json& stored,
                                                            const ProviderOptions& options,
                                                            bool creating) {
  if (sodium_init() < 0) return Status(Code::kInternal, "libsodium failed to initialize");
  nlohmann::json params;
  Bytes salt(crypto_pwhash_SALTBYTES);
  uint64_t ops = crypto_pwhash_OPSLIMIT_MODERATE;
  uint64_t mem_kib = crypto_pwhash_MEMLIMIT_MODERATE / 1024;
  if (creating) {
    ENVELOPEFS_RETURN_IF_ERROR(parse_costs(query, &ops, &mem_kib));
    ENVELOPEFS_RETURN_IF_ERROR(random_fill(salt));
  } else {
    try {
      ops = stored.at("ops").get<uint64_t>();
      mem_kib = stored.at("mem_kib").get<uint64_t>();
      if (stored.at("kdf").get<std::string>() != "argon2id" ||
          !base64_decode(stored.at("salt").get<std::string>(), &salt) ||
          salt.size() != crypto_pwhash_SALTBYTES) {
        return Status(Code::kCorrupt, "pass: bad KDF parameters in the config");
      }
    } catch (const nlohmann::json::exception&) {
      return Status(Code::kCorrupt, "pass: missing KDF parameters in the config");
    }
    if (ops > crypto_pwhash_OPSLIMIT_MAX || mem_kib > (uint64_t{1} << 32)) {
      return Status(Code::kCorrupt, "pass: KDF costs in the config are out of range");
    }
  }
  auto pass = get_passphrase(options, creating);
  if (!pass.ok()) return pass.status();
  SecretBytes key(kRootKeySize);
  if (crypto_pwhash(key.data(), key.size(), reinterpret_cast<const char*>(pass->data()),
                    pass->size(), salt.data(), ops, mem_kib * 1024,
                    crypto_pwhash_ALG_ARGON2ID13) != 0) {
    return Status(Code::kInternal, "Argon2id failed (out of memory?)");
  }
  // A sealed known value tells a wrong passphrase apart from a corrupt config.
  SecretBytes check_value(reinterpret_cast<const uint8_t*>(labels::kPassCheck),
                          sizeof(labels::kPassCheck) - 1);
  if (creating) {
    auto check = local_wrap(key, check_value, as_bytes(labels::kPassCheck));
    if (!check.ok()) return check.status();
    params = {{"kdf", "argon2id"}, {"ops", ops}, {"mem_kib", mem_kib},
              {"salt", base64_encode(salt)}, {"check", base64_encode(*check)}};
  } else {
    Bytes check;
    if (!stored.contains("check") || !stored["check"].is_string() ||
        !base64_decode(stored["check"].get<std::string>(), &check)) {
      return Status(Code::kCorrupt, "pass: missing passphrase check value in the config");
    }
    auto opened = local_unwrap(key, check, as_bytes(labels::kPassCheck), check_value.size());
    if (!opened.ok()) return Status(Code::kAccessDenied, "wrong passphrase");
    params = stored;
  }
  return std::unique_ptr<RootKeyProvider>(new PassProvider(std::move(params), std::move(key)));
}

}  // namespace envelopefs
