// KMIP's wire encoding, TTLV (KMIP 1.4 spec, section 9.1): every item is a 3-byte tag, a
// 1-byte type, a 4-byte big-endian length and the value padded with zeros to a multiple of 8
// bytes. Structures hold items. Only what the KMIP provider sends and reads is here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "crypto/bytes.h"
#include "crypto/status.h"

namespace envelopefs::kmip {

enum class Type : uint8_t {
  kStructure = 0x01,
  kInteger = 0x02,
  kLongInteger = 0x03,
  kEnumeration = 0x05,
  kBoolean = 0x06,
  kTextString = 0x07,
  kByteString = 0x08,
  kDateTime = 0x09,
};

// The tags used (KMIP 1.4, section 9.1.3.1).
namespace tag {
constexpr uint32_t kAttribute = 0x420008, kAttributeName = 0x42000A, kAttributeValue = 0x42000B;
constexpr uint32_t kBatchCount = 0x42000D, kBatchItem = 0x42000F, kBlockCipherMode = 0x420011;
constexpr uint32_t kCryptographicAlgorithm = 0x420028, kCryptographicLength = 0x42002A;
constexpr uint32_t kCryptographicParameters = 0x42002B, kCryptographicUsageMask = 0x42002C;
constexpr uint32_t kIvCounterNonce = 0x42003D, kName = 0x420053, kNameType = 0x420054;
constexpr uint32_t kNameValue = 0x420055, kObjectType = 0x420057, kOperation = 0x42005C;
constexpr uint32_t kProtocolVersion = 0x420069, kProtocolVersionMajor = 0x42006A;
constexpr uint32_t kProtocolVersionMinor = 0x42006B, kRequestHeader = 0x420077;
constexpr uint32_t kRequestMessage = 0x420078, kRequestPayload = 0x420079;
constexpr uint32_t kResponseMessage = 0x42007B, kResponsePayload = 0x42007C;
constexpr uint32_t kResultMessage = 0x42007D, kResultReason = 0x42007E, kResultStatus = 0x42007F;
constexpr uint32_t kTemplateAttribute = 0x420091, kUniqueIdentifier = 0x420094;
constexpr uint32_t kData = 0x4200C2, kTagLength = 0x4200CE;
constexpr uint32_t kAuthenticatedEncryptionAdditionalData = 0x4200FE;
constexpr uint32_t kAuthenticatedEncryptionTag = 0x4200FF;
}  // namespace tag

struct Item {
  uint32_t tag = 0;
  Type type = Type::kStructure;
  int64_t number = 0;       // Integer, LongInteger, Enumeration, Boolean, DateTime
  Bytes bytes;              // TextString, ByteString
  std::vector<Item> items;  // Structure

  static Item structure(uint32_t t, std::vector<Item> children) {
    Item i{t, Type::kStructure, 0, {}, std::move(children)};
    return i;
  }
  static Item integer(uint32_t t, int32_t v) { return {t, Type::kInteger, v, {}, {}}; }
  static Item enumeration(uint32_t t, uint32_t v) { return {t, Type::kEnumeration, v, {}, {}}; }
  static Item text(uint32_t t, const std::string& s) {
    return {t, Type::kTextString, 0, Bytes(s.begin(), s.end()), {}};
  }
  static Item bytestring(uint32_t t, ByteView b) {
    return {t, Type::kByteString, 0, Bytes(b.begin(), b.end()), {}};
  }

  // The first child with `t`, or nullptr.
  const Item* find(uint32_t t) const;
  std::string as_text() const { return std::string(bytes.begin(), bytes.end()); }
};

Bytes encode(const Item& item);
// Decodes exactly one item filling `in`; kCorrupt on anything malformed or nested too deep.
Result<Item> decode(ByteView in);

}  // namespace envelopefs::kmip
