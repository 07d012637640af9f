#include "crypto/bytes.h"

#include <openssl/crypto.h>

#include <array>

namespace envelopefs {
namespace {

constexpr char kHex[] = "0123456789abcdef";
constexpr char kB64Std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
constexpr char kB64Url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string b64_encode(ByteView b, const char* alphabet, bool pad) {
  std::string out;
  out.reserve((b.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= b.size(); i += 3) {
    uint32_t v = (uint32_t{b[i]} << 16) | (uint32_t{b[i + 1]} << 8) | b[i + 2];
    out += alphabet[v >> 18];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
    out += alphabet[v & 63];
  }
  size_t rest = b.size() - i;
  if (rest == 1) {
    uint32_t v = uint32_t{b[i]} << 16;
    out += alphabet[v >> 18];
    out += alphabet[(v >> 12) & 63];
    if (pad) out += "==";
  } else if (rest == 2) {
    uint32_t v = (uint32_t{b[i]} << 16) | (uint32_t{b[i + 1]} << 8);
    out += alphabet[v >> 18];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
    if (pad) out += '=';
  }
  return out;
}

bool b64_decode(std::string_view s, const char* alphabet, bool padded, Bytes* out) {
  std::array<int, 256> rev;
  rev.fill(-1);
  for (int i = 0; i < 64; ++i) rev[static_cast<uint8_t>(alphabet[i])] = i;
  if (padded) {
    if (s.size() % 4 != 0) return false;
    while (!s.empty() && s.back() == '=') s.remove_suffix(1);
  }
  if (s.size() % 4 == 1) return false;
  out->clear();
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    int v = rev[static_cast<uint8_t>(c)];
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<uint8_t>(acc >> bits));
    }
  }
  // Canonical encodings only: leftover bits must be zero, so each byte string has one name.
  return (acc & ((1u << bits) - 1)) == 0;
}

}  // namespace

std::string to_hex(ByteView b) {
  std::string s;
  s.reserve(b.size() * 2);
  for (uint8_t c : b) {
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

bool from_hex(std::string_view hex, Bytes* out) {
  if (hex.size() % 2 != 0) return false;
  out->clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = hex_value(hex[i]), lo = hex_value(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<uint8_t>(hi << 4 | lo));
  }
  return true;
}

std::string base64url_encode(ByteView b) { return b64_encode(b, kB64Url, false); }
bool base64url_decode(std::string_view s, Bytes* out) { return b64_decode(s, kB64Url, false, out); }
std::string base64_encode(ByteView b) { return b64_encode(b, kB64Std, true); }
bool base64_decode(std::string_view s, Bytes* out) { return b64_decode(s, kB64Std, true, out); }

bool ct_equal(ByteView a, ByteView b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace envelopefs
