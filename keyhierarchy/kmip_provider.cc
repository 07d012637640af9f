#include "keyhierarchy/kmip_provider.h"

#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <charconv>
#include <map>

#include "crypto/random.h"
#include "keyhierarchy/kmip_ttlv.h"

namespace envelopefs {
namespace {

using kmip::Item;
namespace tag = kmip::tag;

constexpr size_t kIvSize = 12, kTagSize = 16;
constexpr size_t kMaxResponse = 1 << 16;
constexpr int kTimeoutSeconds = 10;

// KMIP enumerations (KMIP 1.4, section 9.1.3.2).
constexpr uint32_t kOpCreate = 0x01, kOpLocate = 0x08, kOpActivate = 0x12, kOpEncrypt = 0x1F,
                   kOpDecrypt = 0x20;
constexpr uint32_t kObjectSymmetricKey = 0x02, kAlgorithmAes = 0x03, kModeGcm = 0x09;
constexpr uint32_t kNameUninterpretedText = 0x01;
constexpr int32_t kUsageEncrypt = 0x04, kUsageDecrypt = 0x08;
constexpr uint32_t kReasonItemNotFound = 0x01, kReasonAuthentication = 0x03,
                   kReasonCryptographicFailure = 0x0A;
constexpr uint32_t kReasonPermissionDenied = 0x0C, kReasonObjectArchived = 0x0D;
constexpr uint32_t kReasonGeneralFailure = 0x100;

struct KmipUri {
  std::string host;
  int port = 5696;
  std::string name, uid, ca, cert, key;

  std::string canonical() const {
    std::string q = "kmip://" + host + ":" + std::to_string(port) + "/?";
    if (!uid.empty()) q += "uid=" + uid + "&";
    if (!name.empty()) q += "name=" + name + "&";
    return q + "ca=" + ca + "&cert=" + cert + "&key=" + key;
  }
};

Result<KmipUri> parse_uri(const std::string& uri) {
  const std::string scheme = "kmip://";
  if (uri.rfind(scheme, 0) != 0) return Status(Code::kInvalidArgument, "not a kmip:// URI: '" + uri + "'");
  std::string rest = uri.substr(scheme.size());
  const size_t q = rest.find('?');
  std::string authority = rest.substr(0, std::min(q, rest.find('/')));
  KmipUri u;
  if (const size_t colon = authority.rfind(':'); colon != std::string::npos) {
    u.host = authority.substr(0, colon);
    const std::string port = authority.substr(colon + 1);
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), u.port);
    if (ec != std::errc() || end != port.data() + port.size()) u.port = -1;  // "5696abc" too
    if (u.port <= 0 || u.port > 65535)
      return Status(Code::kInvalidArgument, "kmip:// URI: bad port in '" + authority + "'");
  } else {
    u.host = authority;
  }
  if (u.host.empty())
    return Status(Code::kInvalidArgument, "kmip:// URI needs a host: kmip://HOST:PORT/?...");
  std::map<std::string, std::string> params;
  if (q != std::string::npos) {
    std::string query = rest.substr(q + 1);
    size_t pos = 0;
    while (pos <= query.size()) {
      size_t amp = query.find('&', pos);
      std::string kv = query.substr(pos, amp == std::string::npos ? std::string::npos : amp - pos);
      if (!kv.empty()) {
        size_t eq = kv.find('=');
        if (eq == std::string::npos)
          return Status(Code::kInvalidArgument, "kmip:// URI: '" + kv + "' is not KEY=VALUE");
        params[kv.substr(0, eq)] = kv.substr(eq + 1);
      }
      if (amp == std::string::npos) break;
      pos = amp + 1;
    }
  }
  for (const auto& [k, v] : params) {
    if (k == "name")
      u.name = v;
    else if (k == "uid")
      u.uid = v;
    else if (k == "ca")
      u.ca = v;
    else if (k == "cert")
      u.cert = v;
    else if (k == "key")
      u.key = v;
    else
      return Status(Code::kInvalidArgument,
                    "kmip:// URI: unknown parameter '" + k + "' (name, uid, ca, cert, key)");
  }
  if (u.name.empty() && u.uid.empty())
    return Status(Code::kInvalidArgument, "kmip:// URI must name the key: name=NAME (or uid=ID)");
  for (const std::string* p : {&u.ca, &u.cert, &u.key}) {
    if (p->empty() || (*p)[0] != '/') {
      return Status(Code::kInvalidArgument,
                    "kmip:// URI needs ca=, cert= and key= as absolute paths (PEM files)");
    }
  }
  return u;
}

void cleanse(Bytes& b) {
  if (!b.empty()) OPENSSL_cleanse(b.data(), b.size());
}

void cleanse(Item& it) {
  cleanse(it.bytes);
  for (Item& c : it.items) cleanse(c);
}

std::string tls_error(const std::string& what) {
  std::string msg = what;
  if (unsigned long e = ERR_get_error(); e != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    msg += ": ";
    msg += buf;
  }
  ERR_clear_error();
  return msg;
}

// One request, one response, on a connection of its own: wraps and unwraps are rare (init,
// mount, rewrap, the revocation check), and a fresh connection is a fresh authentication.
class Exchange {
 public:
  explicit Exchange(const KmipUri& u) : u_(u) {}
  ~Exchange() {
    if (ssl_) {
      SSL_shutdown(ssl_);
      SSL_free(ssl_);
    }
    if (ctx_) SSL_CTX_free(ctx_);
    if (fd_ >= 0) close(fd_);
  }

  Result<Bytes> run(ByteView request) {
    ENVELOPEFS_RETURN_IF_ERROR(connect_tls());
    size_t sent = 0;
    while (sent < request.size()) {
      int n = SSL_write(ssl_, request.data() + sent, static_cast<int>(request.size() - sent));
      if (n <= 0) return Status(Code::kUnreachable, tls_error("KMIP server " + where() + ": send failed"));
      sent += static_cast<size_t>(n);
    }
    Bytes response(8);
    ENVELOPEFS_RETURN_IF_ERROR(read_exact(response.data(), 8));
    const size_t len =
        (size_t{response[4]} << 24) | (size_t{response[5]} << 16) | (size_t{response[6]} << 8) | response[7];
    if (len > kMaxResponse)
      return Status(Code::kCorrupt, "KMIP server " + where() + " sent an oversized response");
    response.resize(8 + len);
    ENVELOPEFS_RETURN_IF_ERROR(read_exact(response.data() + 8, len));
    return response;
  }

 private:
  std::string where() const { return u_.host + ":" + std::to_string(u_.port); }

  Status read_exact(uint8_t* p, size_t n) {
    size_t got = 0;
    while (got < n) {
      int r = SSL_read(ssl_, p + got, static_cast<int>(n - got));
      if (r <= 0)
        return Status(Code::kUnreachable,
                      tls_error("KMIP server " + where() + ": connection closed mid-response"));
      got += static_cast<size_t>(r);
    }
    return Status::Ok();
  }

  Status connect_tls() {
    struct stat st;
    if (stat(u_.key.c_str(), &st) == 0 && (st.st_mode & S_IROTH) != 0) {
      return Status(Code::kAccessDenied,
                    "KMIP client key " + u_.key + " is readable by anyone; run chmod o-r " + u_.key);
    }
    ctx_ = SSL_CTX_new(TLS_client_method());
    if (ctx_ == nullptr) return Status(Code::kInternal, tls_error("TLS context"));
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx_, u_.ca.c_str(), nullptr) != 1) {
      return Status(Code::kInvalidArgument, tls_error("cannot load the KMIP CA certificate " + u_.ca));
    }
    if (SSL_CTX_use_certificate_chain_file(ctx_, u_.cert.c_str()) != 1) {
      return Status(Code::kInvalidArgument, tls_error("cannot load the KMIP client certificate " + u_.cert));
    }
    if (SSL_CTX_use_PrivateKey_file(ctx_, u_.key.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx_) != 1) {
      return Status(Code::kInvalidArgument, tls_error("cannot load the KMIP client key " + u_.key));
    }
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);

    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (int rc = getaddrinfo(u_.host.c_str(), std::to_string(u_.port).c_str(), &hints, &res); rc != 0) {
      return Status(Code::kUnreachable, "KMIP server " + where() + ": " + gai_strerror(rc));
    }
    int err = 0;
    for (addrinfo* a = res; a != nullptr && fd_ < 0; a = a->ai_next) {
      fd_ = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd_ < 0) continue;
      timeval tv{kTimeoutSeconds, 0};
      setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);  // bounds connect() too
      setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      if (::connect(fd_, a->ai_addr, a->ai_addrlen) != 0) {
        err = errno;
        close(fd_);
        fd_ = -1;
      }
    }
    freeaddrinfo(res);
    if (fd_ < 0) return Status(Code::kUnreachable, "KMIP server " + where() + ": " + std::strerror(err));

    ssl_ = SSL_new(ctx_);
    if (ssl_ == nullptr) return Status(Code::kInternal, tls_error("TLS session"));
    SSL_set_fd(ssl_, fd_);
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl_);
    if (X509_VERIFY_PARAM_set1_ip_asc(param, u_.host.c_str()) != 1) {  // not an address: a name
      X509_VERIFY_PARAM_set1_host(param, u_.host.c_str(), 0);
      SSL_set_tlsext_host_name(ssl_, u_.host.c_str());
    }
    if (SSL_connect(ssl_) != 1) {
      long v = SSL_get_verify_result(ssl_);
      std::string why =
          v != X509_V_OK ? std::string(": certificate: ") + X509_verify_cert_error_string(v) : "";
      return Status(Code::kUnreachable, tls_error("KMIP server " + where() + ": TLS handshake failed" + why));
    }
    return Status::Ok();
  }

  const KmipUri& u_;
  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
};

Status refusal(uint32_t reason, const std::string& message, const std::string& what, bool decrypting) {
  std::string msg = what + ": KMIP server answered reason " + std::to_string(reason) +
                    (message.empty() ? "" : " (" + message + ")");
  switch (reason) {
    case kReasonItemNotFound:
      return Status(Code::kAccessDenied, msg + " (key destroyed?)");
    case kReasonAuthentication:
    case kReasonPermissionDenied:
    case kReasonObjectArchived:
      return Status(Code::kAccessDenied, msg);
    case kReasonGeneralFailure:
      // A Decrypt that fails for no stated reason failed its tag: PyKMIP's GCM raises InvalidTag,
      // which it reports as a general failure.
      if (!decrypting) return Status(Code::kInternal, msg);
      [[fallthrough]];
    case kReasonCryptographicFailure:
      return Status(Code::kAuthFailed, msg + " (the wrapped key was altered, or belongs elsewhere)");
    default:
      return Status(Code::kInternal, msg);
  }
}

// Sends one operation and returns its response payload (an empty structure if it has none).
Result<Item> call(const KmipUri& u, uint32_t operation, Item payload, const std::string& what) {
  Item request = Item::structure(
      tag::kRequestMessage,
      {Item::structure(tag::kRequestHeader, {Item::structure(tag::kProtocolVersion,
                                                             {Item::integer(tag::kProtocolVersionMajor, 1),
                                                              Item::integer(tag::kProtocolVersionMinor, 4)}),
                                             Item::integer(tag::kBatchCount, 1)}),
       Item::structure(tag::kBatchItem,
                       {Item::enumeration(tag::kOperation, operation), std::move(payload)})});
  Bytes wire = kmip::encode(request);
  cleanse(request);
  Exchange ex(u);
  auto response = ex.run(wire);
  cleanse(wire);
  if (!response.ok()) {
    Status st = response.status();
    return st.prefix(what);
  }
  auto msg = kmip::decode(*response);
  cleanse(*response);
  if (!msg.ok()) return msg.status();
  const Item* batch = msg->tag == tag::kResponseMessage ? msg->find(tag::kBatchItem) : nullptr;
  const Item* status = batch ? batch->find(tag::kResultStatus) : nullptr;
  if (status == nullptr) {
    cleanse(*msg);
    return Status(Code::kCorrupt, what + ": the KMIP server's response has no result");
  }
  if (status->number != 0) {
    const Item* reason = batch->find(tag::kResultReason);
    const Item* text = batch->find(tag::kResultMessage);
    Status st = refusal(reason ? static_cast<uint32_t>(reason->number) : 0, text ? text->as_text() : "", what,
                        operation == kOpDecrypt);
    cleanse(*msg);
    return st;
  }
  const Item* payload_out = batch->find(tag::kResponsePayload);
  Item out = payload_out ? *payload_out : Item::structure(tag::kResponsePayload, {});
  cleanse(*msg);
  return out;
}

Item crypto_params() {
  return Item::structure(tag::kCryptographicParameters,
                         {Item::enumeration(tag::kBlockCipherMode, kModeGcm),
                          Item::enumeration(tag::kCryptographicAlgorithm, kAlgorithmAes),
                          Item::integer(tag::kTagLength, kTagSize)});
}

Item name_attribute(const std::string& name) {
  return Item::structure(
      tag::kAttribute,
      {Item::text(tag::kAttributeName, "Name"),
       Item::structure(tag::kAttributeValue, {Item::text(tag::kNameValue, name),
                                              Item::enumeration(tag::kNameType, kNameUninterpretedText)})});
}

Item attribute(const std::string& name, Item value) {
  value.tag = tag::kAttributeValue;
  return Item::structure(tag::kAttribute, {Item::text(tag::kAttributeName, name), std::move(value)});
}

class KmipProvider final : public RootKeyProvider {
 public:
  explicit KmipProvider(KmipUri u) : u_(std::move(u)) {}
  std::string uri() const override { return u_.canonical(); }
  std::string describe() const override {
    return "KMIP key " + (u_.name.empty() ? "" : "'" + u_.name + "' ") + "(id " + u_.uid + ") on " + u_.host +
           ":" + std::to_string(u_.port);
  }

  Status resolve(bool creating) {
    if (!u_.uid.empty()) return Status::Ok();
    auto found = call(u_, kOpLocate, Item::structure(tag::kRequestPayload, {name_attribute(u_.name)}),
                      "KMIP Locate of key '" + u_.name + "'");
    if (!found.ok()) return found.status();
    std::vector<std::string> ids;
    for (const Item& c : found->items) {
      if (c.tag == tag::kUniqueIdentifier) ids.push_back(c.as_text());
    }
    if (ids.size() > 1) {
      return Status(Code::kInvalidArgument,
                    "more than one key named '" + u_.name + "' on the KMIP server; give uid=");
    }
    if (ids.size() == 1) {
      u_.uid = ids[0];
      return Status::Ok();
    }
    if (!creating) return Status(Code::kAccessDenied, "no key named '" + u_.name + "' on the KMIP server");
    Item create = Item::structure(
        tag::kRequestPayload,
        {Item::enumeration(tag::kObjectType, kObjectSymmetricKey),
         Item::structure(
             tag::kTemplateAttribute,
             {attribute("Cryptographic Algorithm", Item::enumeration(0, kAlgorithmAes)),
              attribute("Cryptographic Length", Item::integer(0, 256)),
              attribute("Cryptographic Usage Mask", Item::integer(0, kUsageEncrypt | kUsageDecrypt)),
              name_attribute(u_.name)})});
    auto created = call(u_, kOpCreate, std::move(create), "KMIP Create of key '" + u_.name + "'");
    if (!created.ok()) return created.status();
    const Item* id = created->find(tag::kUniqueIdentifier);
    if (id == nullptr) return Status(Code::kCorrupt, "KMIP Create returned no identifier");
    u_.uid = id->as_text();
    auto active = call(u_, kOpActivate,
                       Item::structure(tag::kRequestPayload, {Item::text(tag::kUniqueIdentifier, u_.uid)}),
                       "KMIP Activate of key " + u_.uid);
    return active.status();
  }

  Result<Bytes> wrap(const SecretBytes& key, ByteView context) override {
    Bytes iv(kIvSize);
    ENVELOPEFS_RETURN_IF_ERROR(random_fill(iv));
    auto r = call(
        u_, kOpEncrypt,
        Item::structure(tag::kRequestPayload,
                        {Item::text(tag::kUniqueIdentifier, u_.uid), crypto_params(),
                         Item::bytestring(tag::kData, key.view()), Item::bytestring(tag::kIvCounterNonce, iv),
                         Item::bytestring(tag::kAuthenticatedEncryptionAdditionalData, context)}),
        "KMIP Encrypt with key " + u_.uid);
    if (!r.ok()) return r.status();
    const Item* data = r->find(tag::kData);
    const Item* tag_out = r->find(tag::kAuthenticatedEncryptionTag);
    if (data == nullptr || tag_out == nullptr || data->bytes.size() != key.size() ||
        tag_out->bytes.size() != kTagSize) {
      return Status(Code::kCorrupt, "KMIP Encrypt returned no ciphertext or tag of the expected size");
    }
    Bytes out = iv;
    out.insert(out.end(), data->bytes.begin(), data->bytes.end());
    out.insert(out.end(), tag_out->bytes.begin(), tag_out->bytes.end());
    return out;
  }

  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) override {
    if (wrapped.size() <= kIvSize + kTagSize) return Status(Code::kCorrupt, "wrapped key too short");
    const size_t n = wrapped.size() - kIvSize - kTagSize;
    auto r =
        call(u_, kOpDecrypt,
             Item::structure(tag::kRequestPayload,
                             {Item::text(tag::kUniqueIdentifier, u_.uid), crypto_params(),
                              Item::bytestring(tag::kData, wrapped.subspan(kIvSize, n)),
                              Item::bytestring(tag::kIvCounterNonce, wrapped.first(kIvSize)),
                              Item::bytestring(tag::kAuthenticatedEncryptionAdditionalData, context),
                              Item::bytestring(tag::kAuthenticatedEncryptionTag, wrapped.last(kTagSize))}),
             "KMIP Decrypt with key " + u_.uid);
    if (!r.ok()) return r.status();
    Item& payload = *r;
    const Item* data = payload.find(tag::kData);
    if (data == nullptr || data->bytes.size() != n) {
      cleanse(payload);
      return Status(Code::kCorrupt, "KMIP Decrypt returned no key of the expected size");
    }
    SecretBytes key(data->bytes.data(), n);
    cleanse(payload);
    return key;
  }

 private:
  KmipUri u_;
};

}  // namespace

Result<std::unique_ptr<RootKeyProvider>> make_kmip_provider(const std::string& uri, bool creating) {
  auto u = parse_uri(uri);
  if (!u.ok()) return u.status();
  auto p = std::make_unique<KmipProvider>(std::move(u).value());
  ENVELOPEFS_RETURN_IF_ERROR(p->resolve(creating));
  return std::unique_ptr<RootKeyProvider>(std::move(p));
}

}  // namespace envelopefs
