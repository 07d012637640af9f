#include "fs/block_codec.h"

#include <openssl/crypto.h>

#include <cstring>

#include "crypto/aead_gcm.h"
#include "crypto/labels.h"
#include "crypto/random.h"
#include "fs/endian.h"

namespace envelopefs {
namespace {

constexpr uint8_t kZeroIv[kGcmIvSize] = {};

// The per-block key lives only in this thread's locked scratch page.
uint8_t* scratch_key() {
  thread_local SecretBytes scratch(kGcmKeySize);
  return scratch.data();
}

}  // namespace

BlockAad block_aad(const VolumeId& volume, const FileId& file, uint64_t index, uint32_t dek_version) {
  static_assert(sizeof(labels::kBlockAad) - 1 == 4);
  BlockAad aad{};
  std::memcpy(aad.data(), labels::kBlockAad, 4);
  std::memcpy(aad.data() + 4, volume.data(), 16);
  std::memcpy(aad.data() + 20, file.data(), 16);
  le::put64(aad.data() + 36, index);
  le::put32(aad.data() + 44, dek_version);
  return aad;
}

Status seal_block(VolumeKeys& keys, const FileId& file, uint64_t index, ByteView plaintext,
                  uint8_t* ciphertext, Slot* slot) {
  Dek& dek = keys.active();
  uint8_t* key = scratch_key();
  Status st = random_block_key({key, kGcmKeySize});
  if (st.ok()) st = dek.wrapper.wrap({key, kGcmKeySize}, slot->wrapped_key);
  if (st.ok()) {
    BlockAad aad = block_aad(keys.volume_id(), file, index, dek.version);
    st = gcm_seal({key, kGcmKeySize}, kZeroIv, aad, plaintext, ciphertext, slot->tag);
  }
  OPENSSL_cleanse(key, kGcmKeySize);
  slot->dek_version = dek.version;
  return st;
}

Status open_block(VolumeKeys& keys, const FileId& file, uint64_t index, const Slot& slot,
                  ByteView ciphertext, uint8_t* plaintext) {
  Dek* dek = keys.dek(slot.dek_version);
  if (dek == nullptr) {
    return Status(Code::kAuthFailed, "block names unknown DEK version " + std::to_string(slot.dek_version));
  }
  uint8_t* key = scratch_key();
  Status st = dek->wrapper.unwrap(slot.wrapped_key, {key, kGcmKeySize});
  if (st.ok()) {
    BlockAad aad = block_aad(keys.volume_id(), file, index, slot.dek_version);
    st = gcm_open({key, kGcmKeySize}, kZeroIv, aad, ciphertext, slot.tag, plaintext);
  }
  OPENSSL_cleanse(key, kGcmKeySize);
  return st;
}

}  // namespace envelopefs
