// Byte views and buffers used across the code base.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace envelopefs {

using ByteView = std::span<const uint8_t>;
using MutByteView = std::span<uint8_t>;
using Bytes = std::vector<uint8_t>;

inline ByteView as_bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}
inline std::string_view as_chars(ByteView b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

std::string to_hex(ByteView b);
bool from_hex(std::string_view hex, Bytes* out);
// RFC 4648 section 5 (URL and filename safe), no padding: used for file names.
std::string base64url_encode(ByteView b);
bool base64url_decode(std::string_view s, Bytes* out);
// Standard base64 with padding: used in the JSON config.
std::string base64_encode(ByteView b);
bool base64_decode(std::string_view s, Bytes* out);

// Constant-time equality (CRYPTO_memcmp): for tags, MACs and key check values.
bool ct_equal(ByteView a, ByteView b);

}  // namespace envelopefs
