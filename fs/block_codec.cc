#include "fs/block_codec.h"

#include <openssl/crypto.h>

#include <algorithm>
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

// Unwraps `slot`'s block key into `key` (kGcmKeySize bytes) under the DEK version it names.
Status unwrap_block_key(VolumeKeys& keys, const Slot& slot, uint8_t* key) {
  Dek* dek = keys.dek(slot.dek_version);
  if (dek == nullptr) {
    return Status(Code::kAuthFailed, "block names unknown DEK version " + std::to_string(slot.dek_version));
  }
  return dek->wrapper.unwrap(slot.wrapped_key, {key, kGcmKeySize});
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
  const auto len = static_cast<uint32_t>(plaintext.size());
  return seal_blocks(keys, file, index, 1, len, len, plaintext.data(), ciphertext, slot);
}

Status open_block(VolumeKeys& keys, const FileId& file, uint64_t index, const Slot& slot,
                  ByteView ciphertext, uint8_t* plaintext) {
  uint8_t* key = scratch_key();
  Status st = unwrap_block_key(keys, slot, key);
  if (st.ok()) {
    BlockAad aad = block_aad(keys.volume_id(), file, index, keys.block_aad_version(slot.dek_version));
    st = gcm_open({key, kGcmKeySize}, kZeroIv, aad, ciphertext, slot.tag, plaintext);
  }
  OPENSSL_cleanse(key, kGcmKeySize);
  return st;
}

Status open_cut_growth(VolumeKeys& keys, const FileId& file, uint64_t index, const Slot& grown,
                       const Slot& before, ByteView ciphertext, uint8_t* plaintext,
                       uint8_t* before_cipher) {
  const size_t n = ciphertext.size();
  uint8_t* key = scratch_key();
  uint8_t tag[kGcmTagSize];
  // Sealing under grown's key applies its keystream: the ciphertext comes back as plaintext.
  // Neither that tag nor the result leaves this function unless before's tag vouches for it.
  Status st = unwrap_block_key(keys, grown, key);
  if (st.ok()) st = gcm_seal({key, kGcmKeySize}, kZeroIv, {}, ciphertext, plaintext, tag);
  OPENSSL_cleanse(key, kGcmKeySize);
  if (st.ok()) st = unwrap_block_key(keys, before, key);
  if (st.ok()) {
    BlockAad aad = block_aad(keys.volume_id(), file, index, keys.block_aad_version(before.dek_version));
    st = gcm_seal({key, kGcmKeySize}, kZeroIv, aad, {plaintext, n}, before_cipher, tag);
  }
  OPENSSL_cleanse(key, kGcmKeySize);
  if (st.ok() && CRYPTO_memcmp(tag, before.tag.data(), kGcmTagSize) != 0) {
    st = Status(Code::kAuthFailed, "block does not authenticate");
  }
  if (!st.ok()) {
    OPENSSL_cleanse(plaintext, n);
    OPENSSL_cleanse(before_cipher, n);
  }
  return st;
}

namespace {

// Locked scratch for a batch of block keys.
uint8_t* scratch_keys() {
  thread_local SecretBytes scratch(KeyWrapper::kMaxBatch * kGcmKeySize);
  return scratch.data();
}

}  // namespace

Status seal_blocks(VolumeKeys& keys, const FileId& file, uint64_t first, size_t count,
                   uint32_t block_size, uint32_t last_len, const uint8_t* plain, uint8_t* cipher,
                   Slot* slots) {
  Dek& dek = keys.active();
  uint8_t* batch = scratch_keys();
  uint8_t wrapped[KeyWrapper::kMaxBatch * kWrappedKeySize];
  Status st;
  for (size_t done = 0; done < count && st.ok();) {
    const size_t n = std::min(count - done, KeyWrapper::kMaxBatch);
    for (size_t k = 0; k < n && st.ok(); ++k) st = random_block_key({batch + k * kGcmKeySize, kGcmKeySize});
    if (st.ok()) st = dek.wrapper.wrap32_many(batch, wrapped, n);
    for (size_t k = 0; k < n && st.ok(); ++k) {
      const size_t b = done + k;
      const uint32_t len = b + 1 == count ? last_len : block_size;
      Slot& slot = slots[b];
      slot.dek_version = dek.version;
      std::memcpy(slot.wrapped_key.data(), wrapped + k * kWrappedKeySize, kWrappedKeySize);
      BlockAad aad = block_aad(keys.volume_id(), file, first + b, keys.block_aad_version(dek.version));
      st = gcm_seal({batch + k * kGcmKeySize, kGcmKeySize}, kZeroIv, aad,
                    {plain + b * block_size, len}, cipher + b * block_size, slot.tag);
    }
    OPENSSL_cleanse(batch, n * kGcmKeySize);
    done += n;
  }
  return st;
}

void open_blocks(VolumeKeys& keys, const FileId& file, std::span<BlockToOpen> blocks) {
  uint8_t* batch = scratch_keys();
  uint8_t wrapped[KeyWrapper::kMaxBatch * kWrappedKeySize];
  bool ok[KeyWrapper::kMaxBatch];
  for (size_t done = 0; done < blocks.size();) {
    // A run of blocks under one DEK version is unwrapped together.
    const uint32_t version = blocks[done].slot->dek_version;
    size_t n = 1;
    while (done + n < blocks.size() && n < KeyWrapper::kMaxBatch &&
           blocks[done + n].slot->dek_version == version) {
      ++n;
    }
    Dek* dek = keys.dek(version);
    for (size_t k = 0; k < n; ++k) {
      std::memcpy(wrapped + k * kWrappedKeySize, blocks[done + k].slot->wrapped_key.data(), kWrappedKeySize);
    }
    Status st = dek == nullptr ? Status(Code::kAuthFailed, "block names unknown DEK version " + std::to_string(version))
                               : dek->wrapper.unwrap32_many(wrapped, batch, ok, n);
    for (size_t k = 0; k < n; ++k) {
      BlockToOpen& b = blocks[done + k];
      if (!st.ok()) {
        b.result = st;
      } else if (!ok[k]) {
        b.result = Status(Code::kAuthFailed, "key unwrap: integrity check failed");
      } else {
        BlockAad aad = block_aad(keys.volume_id(), file, b.index, keys.block_aad_version(version));
        b.result = gcm_open({batch + k * kGcmKeySize, kGcmKeySize}, kZeroIv, aad, {b.data, b.len},
                            b.slot->tag, b.data);
      }
    }
    OPENSSL_cleanse(batch, n * kGcmKeySize);
    done += n;
  }
}

Result<size_t> rewrap_slots(VolumeKeys& keys, MetaPage& page) {
  if (!keys.rewrappable_blocks()) {
    return Status(Code::kUnsupported, "the blocks of this volume name their DEK version (made before "
                                      "the rewrappable-blocks feature)");
  }
  static_assert(2 * kBlocksPerGroup <= KeyWrapper::kMaxBatch);
  Dek& active = keys.active();
  uint8_t* batch = scratch_keys();
  uint8_t wrapped[KeyWrapper::kMaxBatch * kWrappedKeySize];
  bool ok[KeyWrapper::kMaxBatch];
  size_t changed = 0;
  Status st;
  // One batched unwrap per old version (almost always one), one batched wrap under the active.
  for (;;) {
    uint32_t version = 0;
    std::pair<uint64_t, int> where[KeyWrapper::kMaxBatch];
    size_t n = 0;
    for (uint64_t e = 0; e < kBlocksPerGroup; ++e) {
      for (int which = 0; which < 2; ++which) {
        Slot slot = page.slot(e, which);
        if (slot.empty() || slot.dek_version == active.version) continue;
        if (n == 0) version = slot.dek_version;
        if (slot.dek_version != version) continue;
        std::memcpy(wrapped + n * kWrappedKeySize, slot.wrapped_key.data(), kWrappedKeySize);
        where[n++] = {e, which};
      }
    }
    if (n == 0) break;
    Dek* old = keys.dek(version);
    if (old == nullptr) {
      st = Status(Code::kAuthFailed, "block key under unknown DEK version " + std::to_string(version));
      break;
    }
    st = old->wrapper.unwrap32_many(wrapped, batch, ok, n);
    for (size_t k = 0; k < n && st.ok(); ++k) {
      if (!ok[k]) st = Status(Code::kAuthFailed, "key unwrap: integrity check failed");
    }
    if (st.ok()) st = active.wrapper.wrap32_many(batch, wrapped, n);
    OPENSSL_cleanse(batch, n * kGcmKeySize);
    if (!st.ok()) break;
    for (size_t k = 0; k < n; ++k) {
      Slot slot = page.slot(where[k].first, where[k].second);
      slot.dek_version = active.version;
      std::memcpy(slot.wrapped_key.data(), wrapped + k * kWrappedKeySize, kWrappedKeySize);
      page.set_slot(where[k].first, where[k].second, slot);
    }
    changed += n;
  }
  if (!st.ok()) return st;
  return changed;
}

bool needs_rewrap(const VolumeKeys& keys, const MetaPage& page) {
  const uint32_t active = keys.active_version();
  if (page.mac_version() != active) return true;
  for (uint64_t e = 0; e < kBlocksPerGroup; ++e) {
    for (int which = 0; which < 2; ++which) {
      Slot slot = page.slot(e, which);
      if (!slot.empty() && slot.dek_version != active) return true;
    }
  }
  return false;
}

}  // namespace envelopefs
