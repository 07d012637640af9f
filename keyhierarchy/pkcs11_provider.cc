#include "keyhierarchy/pkcs11_provider.h"

#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "crypto/random.h"
#include "keyhierarchy/secret_file.h"

namespace envelopefs {
namespace {

constexpr size_t kIvSize = 12, kTagSize = 16, kRootKeyBytes = 32;

// What a PKCS#11 return value means for the volume: a refusal (wrong PIN, key unusable), an
// altered wrapped value, or a token that could not be asked.
Status token_error(CK_RV rv, const std::string& what) {
  std::string msg = what + ": " + p11_kit_strerror(rv);
  switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_OBJECT_HANDLE_INVALID:
      return Status(Code::kAccessDenied, msg);
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
      return Status(Code::kAuthFailed, msg + " (the wrapped key was altered, or belongs elsewhere)");
    default:
      return Status(Code::kUnreachable, msg);
  }
}

// The PIN, in locked memory: pin-source=file:PATH (or a bare path), else --passfile, else
// $ENVELOPEFS_PKCS11_PIN. Only the first line of a file counts.
Result<SecretBytes> read_pin(const char* pin_source, const ProviderOptions& options) {
  std::string path;
  if (pin_source != nullptr) {
    path = pin_source;
    if (path.rfind("file:", 0) == 0) path.erase(0, 5);
    if (path.empty() || path[0] != '/') {
      return Status(Code::kInvalidArgument,
                    "pin-source must be file:/ABSOLUTE/PATH, got '" + std::string(pin_source) + "'");
    }
  } else if (!options.passfile.empty()) {
    path = options.passfile;
  } else if (const char* env = std::getenv("ENVELOPEFS_PKCS11_PIN"); env != nullptr) {
    return SecretBytes(reinterpret_cast<const uint8_t*>(env), std::strlen(env));
  } else {
    return Status(Code::kInvalidArgument,
                  "the token's user PIN is needed: add pin-source=file:/PATH to the pkcs11: URI, "
                  "or give --passfile FILE, or set ENVELOPEFS_PKCS11_PIN");
  }
  return read_secret_file(path, "PIN", true);
}

std::string text_attribute(P11KitUri* uri, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE* a = p11_kit_uri_get_attribute(uri, type);
  if (a == nullptr || a->pValue == nullptr) return {};
  return std::string(static_cast<const char*>(a->pValue), a->ulValueLen);
}

// A token label is padded with blanks to 32 characters.
std::string trimmed(const unsigned char* s, size_t n) {
  while (n > 0 && s[n - 1] == ' ') --n;
  return std::string(reinterpret_cast<const char*>(s), n);
}

class Pkcs11Provider final : public RootKeyProvider {
 public:
  // The token's label is learnt when open() finds it.
  Pkcs11Provider(std::string uri, std::string module, std::string label)
      : uri_(std::move(uri)), module_path_(std::move(module)), label_(std::move(label)) {}

  ~Pkcs11Provider() override {
    if (module_ == nullptr) return;
    if (session_ != CK_INVALID_HANDLE) {
      (void)module_->C_Logout(session_);
      (void)module_->C_CloseSession(session_);
    }
    (void)p11_kit_module_finalize(module_);
    p11_kit_module_release(module_);
  }

  std::string uri() const override { return uri_; }
  std::string describe() const override {
    return "PKCS#11 key '" + label_ + "' on token '" + token_ + "' (" + module_path_ + ")";
  }

  Status open(P11KitUri* uri, const ProviderOptions& options, bool creating) {
    module_ = p11_kit_module_load(module_path_.c_str(), 0);
    if (module_ == nullptr) {
      const char* why = p11_kit_message();
      return Status(Code::kUnreachable, "cannot load PKCS#11 module " + module_path_ +
                                            (why ? std::string(": ") + why : std::string()));
    }
    if (CK_RV rv = p11_kit_module_initialize(module_); rv != CKR_OK) {
      p11_kit_module_release(module_);
      module_ = nullptr;
      return token_error(rv, "cannot initialise PKCS#11 module " + module_path_);
    }
    CK_SLOT_ID slot = 0;
    ENVELOPEFS_RETURN_IF_ERROR(find_token(uri, &slot));
    CK_FLAGS flags = CKF_SERIAL_SESSION | (creating ? CKF_RW_SESSION : 0);
    if (CK_RV rv = module_->C_OpenSession(slot, flags, nullptr, nullptr, &session_); rv != CKR_OK) {
      session_ = CK_INVALID_HANDLE;
      return token_error(rv, "cannot open a session on token '" + token_ + "'");
    }
    auto pin = read_pin(p11_kit_uri_get_pin_source(uri), options);
    if (!pin.ok()) return pin.status();
    CK_RV rv = module_->C_Login(session_, CKU_USER, pin->data(), pin->size());
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
      return token_error(rv, "token '" + token_ + "' refused the user PIN");
    }
    return find_key(uri, creating);
  }

  Result<Bytes> wrap(const SecretBytes& key, ByteView context) override {
    std::lock_guard lock(mu_);
    Bytes out(kIvSize + key.size() + kTagSize);
    ENVELOPEFS_RETURN_IF_ERROR(random_fill({out.data(), kIvSize}));
    CK_GCM_PARAMS gcm = gcm_params(out.data(), context);
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    if (CK_RV rv = module_->C_EncryptInit(session_, &mech, key_); rv != CKR_OK) {
      return token_error(rv, "token '" + token_ + "' cannot encrypt with key '" + label_ + "'");
    }
    CK_ULONG n = out.size() - kIvSize;
    CK_RV rv =
        module_->C_Encrypt(session_, const_cast<uint8_t*>(key.data()), key.size(), out.data() + kIvSize, &n);
    if (rv != CKR_OK) return token_error(rv, "wrap on token '" + token_ + "'");
    if (n != key.size() + kTagSize)
      return Status(Code::kInternal, "token returned an unexpected wrap length");
    return out;
  }

  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) override {
    if (wrapped.size() <= kIvSize + kTagSize) return Status(Code::kCorrupt, "wrapped key too short");
    std::lock_guard lock(mu_);
    // Fresh IV and AAD buffers: C_DecryptInit takes non-const pointers.
    Bytes iv_and_body(wrapped.begin(), wrapped.end());
    CK_GCM_PARAMS gcm = gcm_params(iv_and_body.data(), context);
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    if (CK_RV rv = module_->C_DecryptInit(session_, &mech, key_); rv != CKR_OK) {
      return token_error(rv, "token '" + token_ + "' cannot decrypt with key '" + label_ + "'");
    }
    // Room for the whole input: some tokens want it before they have checked the tag.
    SecretBytes plain(wrapped.size() - kIvSize);
    CK_ULONG n = plain.size();
    CK_RV rv = module_->C_Decrypt(session_, iv_and_body.data() + kIvSize, wrapped.size() - kIvSize,
                                  plain.data(), &n);
    // The token took the key and the parameters (C_DecryptInit); a decryption that fails now
    // failed its tag. SoftHSM2 says so with CKR_GENERAL_ERROR, the standard with
    // CKR_ENCRYPTED_DATA_INVALID; a device error still counts as the token unreachable.
    if (rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED) rv = CKR_ENCRYPTED_DATA_INVALID;
    if (rv != CKR_OK) return token_error(rv, "unwrap on token '" + token_ + "'");
    if (n != wrapped.size() - kIvSize - kTagSize)
      return Status(Code::kCorrupt, "unwrapped key has the wrong length");
    return SecretBytes(plain.data(), n);
  }

 private:
  CK_GCM_PARAMS gcm_params(uint8_t* iv, ByteView context) {
    aad_.assign(context.begin(), context.end());
    CK_GCM_PARAMS p{};
    p.pIv = iv;
    p.ulIvLen = kIvSize;
    p.ulIvBits = kIvSize * 8;
    p.pAAD = aad_.data();
    p.ulAADLen = aad_.size();
    p.ulTagBits = kTagSize * 8;
    return p;
  }

  Status find_token(P11KitUri* uri, CK_SLOT_ID* slot) {
    CK_ULONG count = 0;
    if (CK_RV rv = module_->C_GetSlotList(CK_TRUE, nullptr, &count); rv != CKR_OK) {
      return token_error(rv, "cannot list the slots of " + module_path_);
    }
    std::vector<CK_SLOT_ID> slots(count);
    if (CK_RV rv = module_->C_GetSlotList(CK_TRUE, slots.data(), &count); rv != CKR_OK) {
      return token_error(rv, "cannot list the slots of " + module_path_);
    }
    for (CK_ULONG i = 0; i < count; ++i) {
      CK_TOKEN_INFO info;
      if (module_->C_GetTokenInfo(slots[i], &info) != CKR_OK) continue;
      if (p11_kit_uri_match_token_info(uri, &info) == 1) {
        *slot = slots[i];
        token_ = trimmed(info.label, sizeof info.label);
        return Status::Ok();
      }
    }
    return Status(Code::kUnreachable, "no token matching " + uri_ + " in " + module_path_ +
                                          " (is the token present and initialised?)");
  }

  Status find_key(P11KitUri* uri, bool creating) {
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    std::vector<CK_ATTRIBUTE> tmpl;
    CK_ULONG n = 0;
    CK_ATTRIBUTE* attrs = p11_kit_uri_get_attributes(uri, &n);
    for (CK_ULONG i = 0; i < n; ++i) {
      if (attrs[i].type != CKA_CLASS) tmpl.push_back(attrs[i]);
    }
    tmpl.push_back({CKA_CLASS, &cls, sizeof cls});
    if (CK_RV rv = module_->C_FindObjectsInit(session_, tmpl.data(), tmpl.size()); rv != CKR_OK) {
      return token_error(rv, "cannot search token '" + token_ + "'");
    }
    CK_OBJECT_HANDLE found[2];
    CK_ULONG nfound = 0;
    CK_RV rv = module_->C_FindObjects(session_, found, 2, &nfound);
    (void)module_->C_FindObjectsFinal(session_);
    if (rv != CKR_OK) return token_error(rv, "cannot search token '" + token_ + "'");
    if (nfound > 1) {
      return Status(Code::kInvalidArgument, "more than one secret key on token '" + token_ + "' matches " +
                                                uri_ + "; add id=... to the URI");
    }
    if (nfound == 1) {
      key_ = found[0];
      return check_key();
    }
    if (!creating) {
      return Status(Code::kAccessDenied,
                    "key '" + label_ + "' is not on token '" + token_ + "' (destroyed or revoked?)");
    }
    return generate_key(uri);
  }

  // An existing key is used only if it is an AES-256 key the token keeps to itself.
  Status check_key() {
    CK_KEY_TYPE type = 0;
    CK_ULONG len = 0;
    CK_BBOOL sensitive = CK_FALSE, extractable = CK_TRUE;
    CK_ATTRIBUTE q[] = {{CKA_KEY_TYPE, &type, sizeof type},
                        {CKA_VALUE_LEN, &len, sizeof len},
                        {CKA_SENSITIVE, &sensitive, sizeof sensitive},
                        {CKA_EXTRACTABLE, &extractable, sizeof extractable}};
    if (CK_RV rv = module_->C_GetAttributeValue(session_, key_, q, 4); rv != CKR_OK) {
      return token_error(rv, "cannot read the attributes of key '" + label_ + "'");
    }
    if (type != CKK_AES || len != kRootKeyBytes) {
      return Status(Code::kInvalidArgument,
                    "key '" + label_ + "' on token '" + token_ + "' is not an AES-256 key");
    }
    if (sensitive != CK_TRUE || extractable != CK_FALSE) {
      return Status(Code::kInvalidArgument,
                    "key '" + label_ + "' on token '" + token_ +
                        "' can leave the token (it must be sensitive and not extractable)");
    }
    return Status::Ok();
  }

  Status generate_key(P11KitUri* uri) {
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG len = kRootKeyBytes;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    std::vector<CK_ATTRIBUTE> tmpl = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &type, sizeof type},
        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no}, {CKA_ENCRYPT, &yes, sizeof yes},
        {CKA_DECRYPT, &yes, sizeof yes},   {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},
    };
    for (CK_ATTRIBUTE_TYPE t : {CKA_LABEL, CKA_ID}) {
      if (CK_ATTRIBUTE* a = p11_kit_uri_get_attribute(uri, t)) tmpl.push_back(*a);
    }
    CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
    if (CK_RV rv = module_->C_GenerateKey(session_, &mech, tmpl.data(), tmpl.size(), &key_); rv != CKR_OK) {
      return token_error(rv, "cannot generate key '" + label_ + "' on token '" + token_ + "'");
    }
    return Status::Ok();
  }

  std::string uri_, module_path_, token_, label_;
  CK_FUNCTION_LIST* module_ = nullptr;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE key_ = CK_INVALID_HANDLE;
  std::mutex mu_;  // one session: one operation at a time
  Bytes aad_;      // the context of the operation in progress
};

}  // namespace

Result<std::unique_ptr<RootKeyProvider>> make_pkcs11_provider(const std::string& uri,
                                                              const ProviderOptions& options, bool creating) {
  std::unique_ptr<P11KitUri, void (*)(P11KitUri*)> parsed(p11_kit_uri_new(), p11_kit_uri_free);
  if (int rc = p11_kit_uri_parse(uri.c_str(), P11_KIT_URI_FOR_ANY, parsed.get()); rc != P11_KIT_URI_OK) {
    return Status(Code::kInvalidArgument,
                  "not a PKCS#11 URI (RFC 7512): '" + uri + "': " + p11_kit_uri_message(rc));
  }
  if (p11_kit_uri_get_pin_value(parsed.get()) != nullptr) {
    return Status(Code::kInvalidArgument,
                  "the pkcs11: URI carries pin-value, and the URI is stored in the volume config; "
                  "use pin-source=file:/PATH instead");
  }
  const char* module = p11_kit_uri_get_module_path(parsed.get());
  if (module == nullptr) {
    return Status(
        Code::kInvalidArgument,
        "the pkcs11: URI needs module-path=/PATH/TO/MODULE.so (e.g. /usr/lib/softhsm/libsofthsm2.so)");
  }
  std::string label = text_attribute(parsed.get(), CKA_LABEL);
  if (label.empty() && p11_kit_uri_get_attribute(parsed.get(), CKA_ID) == nullptr) {
    return Status(Code::kInvalidArgument, "the pkcs11: URI must name the key: object=LABEL (or id=...)");
  }
  auto p = std::make_unique<Pkcs11Provider>(uri, module, label.empty() ? "(by id)" : label);
  ENVELOPEFS_RETURN_IF_ERROR(p->open(parsed.get(), options, creating));
  return std::unique_ptr<RootKeyProvider>(std::move(p));
}

}  // namespace envelopefs
