#include "keyhierarchy/local_wrap.h"

#include "crypto/aead_gcm.h"
#include "crypto/kdf.h"
#include "crypto/labels.h"

namespace envelopefs {
namespace {

Result<SecretBytes> wrapping_key(const SecretBytes& root) {
  return hkdf_sha256(root.view(), {}, as_bytes(labels::kRootWrapKey), kGcmKeySize);
}

}  // namespace

Result<Bytes> local_wrap(const SecretBytes& root, const SecretBytes& key, ByteView context) {
  auto kek = wrapping_key(root);
  if (!kek.ok()) return kek.status();
  return gcm_seal_random_iv(kek->view(), context, key.view());
}

Result<SecretBytes> local_unwrap(const SecretBytes& root, ByteView wrapped, ByteView context,
                                 size_t key_size) {
  auto kek = wrapping_key(root);
  if (!kek.ok()) return kek.status();
  SecretBytes out(key_size);
  Status st = gcm_open_random_iv(kek->view(), context, wrapped, out.mut_view());
  if (!st.ok()) return st;
  return out;
}

}  // namespace envelopefs
