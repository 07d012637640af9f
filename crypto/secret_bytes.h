// Key material as a type: page-aligned, mlock()ed, excluded from core dumps, zeroized
// (OPENSSL_cleanse) when destroyed, movable but never copyable, and never printable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "crypto/bytes.h"
#include "crypto/status.h"

namespace envelopefs {

class SecretBytes {
 public:
  SecretBytes() = default;
  // Allocates `size` zeroed bytes of locked memory. Aborts the program if the memory cannot be
  // locked: running with keys in swappable memory is not an option we offer.
  explicit SecretBytes(size_t size);
  SecretBytes(const uint8_t* data, size_t size);
  ~SecretBytes();

  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  // A deliberate, visible copy.
  SecretBytes clone() const { return SecretBytes(data_, size_); }
  static Result<SecretBytes> random(size_t size);

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  ByteView view() const { return {data_, size_}; }
  MutByteView mut_view() { return {data_, size_}; }

  void wipe();  // zeroize and release now

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;
};

// Process-wide hygiene: no core dumps, not ptrace-attachable by other users.
void harden_process();

}  // namespace envelopefs
