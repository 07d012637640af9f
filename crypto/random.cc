#include "crypto/random.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <cstring>

#include "crypto/secret_bytes.h"

namespace envelopefs {

Status random_fill(MutByteView out) {
  if (out.empty()) return Status::Ok();
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    return Status(Code::kInternal, "the random generator failed (RAND_bytes)");
  }
  return Status::Ok();
}

Status random_block_key(MutByteView key) {
  constexpr size_t kBatch = 2048;
  thread_local SecretBytes batch;
  thread_local size_t used = kBatch;
  if (key.size() > kBatch) return Status(Code::kInvalidArgument, "key too large");
  if (used + key.size() > kBatch) {
    if (batch.empty()) batch = SecretBytes(kBatch);
    ENVELOPEFS_RETURN_IF_ERROR(random_fill(batch.mut_view()));
    used = 0;
  }
  std::memcpy(key.data(), batch.data() + used, key.size());
  OPENSSL_cleanse(batch.data() + used, key.size());
  used += key.size();
  return Status::Ok();
}

}  // namespace envelopefs
