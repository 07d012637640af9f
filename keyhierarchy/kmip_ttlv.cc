#include "keyhierarchy/kmip_ttlv.h"

namespace envelopefs::kmip {
namespace {

constexpr int kMaxDepth = 16;

void put_be(Bytes& out, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; --i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t get_be(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

void encode_into(const Item& it, Bytes& out) {
  put_be(out, it.tag, 3);
  out.push_back(static_cast<uint8_t>(it.type));
  const size_t len_at = out.size();
  put_be(out, 0, 4);
  const size_t start = out.size();
  switch (it.type) {
    case Type::kStructure:
      for (const Item& c : it.items) encode_into(c, out);
      break;
    case Type::kInteger:
    case Type::kEnumeration:
      put_be(out, static_cast<uint32_t>(it.number), 4);
      break;
    case Type::kLongInteger:
    case Type::kBoolean:
    case Type::kDateTime:
      put_be(out, static_cast<uint64_t>(it.number), 8);
      break;
    case Type::kTextString:
    case Type::kByteString:
      out.insert(out.end(), it.bytes.begin(), it.bytes.end());
      break;
  }
  const size_t len = out.size() - start;
  for (int i = 0; i < 4; ++i) out[len_at + i] = static_cast<uint8_t>(len >> (8 * (3 - i)));
  out.resize(out.size() + (8 - len % 8) % 8, 0);  // the length does not count the padding
}

Result<Item> decode_one(ByteView in, size_t* used, int depth) {
  if (depth > kMaxDepth) return Status(Code::kCorrupt, "KMIP response nested too deep");
  if (in.size() < 8) return Status(Code::kCorrupt, "KMIP response truncated");
  Item it;
  it.tag = static_cast<uint32_t>(get_be(in.data(), 3));
  it.type = static_cast<Type>(in[3]);
  const uint64_t len = get_be(in.data() + 4, 4);
  const uint64_t padded = len + (8 - len % 8) % 8;
  if (padded > in.size() - 8) return Status(Code::kCorrupt, "KMIP item longer than the response");
  const uint8_t* v = in.data() + 8;
  switch (it.type) {
    case Type::kStructure: {
      size_t off = 0;
      while (off < len) {
        size_t n = 0;
        auto child = decode_one({v + off, static_cast<size_t>(len) - off}, &n, depth + 1);
        if (!child.ok()) return child.status();
        it.items.push_back(std::move(child).value());
        off += n;
      }
      break;
    }
    case Type::kInteger:
    case Type::kEnumeration:
      if (len != 4) return Status(Code::kCorrupt, "KMIP integer of the wrong length");
      it.number = static_cast<int32_t>(get_be(v, 4));
      break;
    case Type::kLongInteger:
    case Type::kBoolean:
    case Type::kDateTime:
      if (len != 8) return Status(Code::kCorrupt, "KMIP long integer of the wrong length");
      it.number = static_cast<int64_t>(get_be(v, 8));
      break;
    case Type::kTextString:
    case Type::kByteString:
      it.bytes.assign(v, v + len);
      break;
    default:
      // Types this client never needs (big integers, intervals) are kept as raw bytes.
      it.bytes.assign(v, v + len);
      break;
  }
  *used = 8 + static_cast<size_t>(padded);
  return it;
}

}  // namespace

const Item* Item::find(uint32_t t) const {
  for (const Item& c : items) {
    if (c.tag == t) return &c;
  }
  return nullptr;
}

Bytes encode(const Item& item) {
  Bytes out;
  encode_into(item, out);
  return out;
}

Result<Item> decode(ByteView in) {
  size_t used = 0;
  auto it = decode_one(in, &used, 0);
  if (!it.ok()) return it.status();
  if (used != in.size()) return Status(Code::kCorrupt, "KMIP response has trailing bytes");
  return it;
}

}  // namespace envelopefs::kmip
