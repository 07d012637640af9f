// Known-answer tests from the standards and property tests of crypto/.
#include <gtest/gtest.h>

#include <set>

#include "crypto/aead_gcm.h"
#include "crypto/kdf.h"
#include "crypto/key_wrap.h"
#include "crypto/name_cipher.h"
#include "crypto/random.h"
#include "crypto/secret_bytes.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

using test::hex;

SecretBytes secret(const Bytes& b) { return SecretBytes(b.data(), b.size()); }

TEST(Bytes, HexAndBase64RoundTrip) {
  Bytes data;
  for (int i = 0; i < 100; ++i) {
    Bytes back;
    ASSERT_TRUE(from_hex(to_hex(data), &back));
    EXPECT_EQ(back, data);
    ASSERT_TRUE(base64url_decode(base64url_encode(data), &back));
    EXPECT_EQ(back, data);
    ASSERT_TRUE(base64_decode(base64_encode(data), &back));
    EXPECT_EQ(back, data);
    data.push_back(static_cast<uint8_t>(i * 37));
  }
}

TEST(Bytes, Base64RejectsNonCanonicalAndForeignCharacters) {
  Bytes out;
  EXPECT_TRUE(base64url_decode("AA", &out));
  EXPECT_FALSE(base64url_decode("AB", &out));   // leftover bits set: not canonical
  EXPECT_FALSE(base64url_decode("A", &out));
  EXPECT_FALSE(base64url_decode("a+b/", &out));  // standard alphabet in a file name
  EXPECT_FALSE(from_hex("abc", &out));
  EXPECT_FALSE(from_hex("zz", &out));
}

TEST(Bytes, ConstantTimeEqual) {
  Bytes a = {1, 2, 3}, b = {1, 2, 3}, c = {1, 2, 4}, d = {1, 2};
  EXPECT_TRUE(ct_equal(a, b));
  EXPECT_FALSE(ct_equal(a, c));
  EXPECT_FALSE(ct_equal(a, d));
}

// McGrew & Viega GCM spec, test cases 13, 14 and 16 (AES-256).
TEST(Gcm, NistTestCase13EmptyMessage) {
  Bytes key(32, 0), iv(12, 0);
  uint8_t tag[16];
  ASSERT_TRUE(gcm_seal(key, iv, {}, {}, nullptr, tag).ok());
  EXPECT_EQ(to_hex(tag), "530f8afbc74536b9a963b4f1c4cb738b");
}

TEST(Gcm, NistTestCase14) {
  Bytes key(32, 0), iv(12, 0), pt(16, 0), ct(16);
  uint8_t tag[16];
  ASSERT_TRUE(gcm_seal(key, iv, {}, pt, ct.data(), tag).ok());
  EXPECT_EQ(to_hex(ct), "cea7403d4d606b6e074ec5d3baf39d18");
  EXPECT_EQ(to_hex(tag), "d0d1c8a799996bf0265b98b5d48ab919");
}

TEST(Gcm, NistTestCase16WithAad) {
  Bytes key = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
  Bytes pt = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                 "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
  Bytes aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
  Bytes iv = hex("cafebabefacedbaddecaf888");
  Bytes ct(pt.size()), back(pt.size());
  uint8_t tag[16];
  ASSERT_TRUE(gcm_seal(key, iv, aad, pt, ct.data(), tag).ok());
  EXPECT_EQ(to_hex(ct), "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
                        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662");
  EXPECT_EQ(to_hex(tag), "76fc6ece0f4e1768cddf8853bb2d551b");
  ASSERT_TRUE(gcm_open(key, iv, aad, ct, tag, back.data()).ok());
  EXPECT_EQ(back, pt);
}

TEST(Gcm, EverySingleBitFlipIsRejected) {
  Bytes key(32, 7), iv(12, 0), aad = {1, 2, 3}, pt(64, 0x5a), ct(64), out(64);
  uint8_t tag[16];
  ASSERT_TRUE(gcm_seal(key, iv, aad, pt, ct.data(), tag).ok());
  for (size_t bit = 0; bit < ct.size() * 8; ++bit) {
    Bytes bad = ct;
    bad[bit / 8] ^= uint8_t(1u << (bit % 8));
    EXPECT_EQ(gcm_open(key, iv, aad, bad, tag, out.data()).code(), Code::kAuthFailed) << bit;
  }
  for (size_t bit = 0; bit < 128; ++bit) {
    uint8_t bad[16];
    std::copy(tag, tag + 16, bad);
    bad[bit / 8] ^= uint8_t(1u << (bit % 8));
    EXPECT_EQ(gcm_open(key, iv, aad, ct, bad, out.data()).code(), Code::kAuthFailed) << bit;
  }
  Bytes other_aad = {1, 2, 4};
  EXPECT_EQ(gcm_open(key, iv, other_aad, ct, tag, out.data()).code(), Code::kAuthFailed);
}

TEST(Gcm, RejectsWrongSizes) {
  Bytes key(16, 0), iv(12, 0);
  uint8_t tag[16];
  EXPECT_EQ(gcm_seal(key, iv, {}, {}, nullptr, tag).code(), Code::kInvalidArgument);
}

// RFC 3394 section 4.3 and 4.6 (256-bit KEK).
TEST(KeyWrap, Rfc3394Wrap128BitKeyWith256BitKek) {
  KeyWrapper w(secret(hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")));
  Bytes key = hex("00112233445566778899AABBCCDDEEFF"), out(24), back(16);
  ASSERT_TRUE(w.wrap(key, out).ok());
  EXPECT_EQ(to_hex(out), "64e8c3f9ce0f5ba263e9777905818a2a93c8191e7d6e8ae7");
  ASSERT_TRUE(w.unwrap(out, back).ok());
  EXPECT_EQ(back, key);
}

TEST(KeyWrap, Rfc3394Wrap256BitKeyWith256BitKek) {
  KeyWrapper w(secret(hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")));
  Bytes key = hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F");
  Bytes out(40), back(32);
  ASSERT_TRUE(w.wrap(key, out).ok());
  EXPECT_EQ(to_hex(out), "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21");
  ASSERT_TRUE(w.unwrap(out, back).ok());
  EXPECT_EQ(back, key);
}

TEST(KeyWrap, EveryBitFlipAndWrongKekRejected) {
  KeyWrapper w(secret(Bytes(32, 1)));
  KeyWrapper other(secret(Bytes(32, 2)));
  Bytes key(32, 9), out(40), back(32);
  ASSERT_TRUE(w.wrap(key, out).ok());
  for (size_t bit = 0; bit < out.size() * 8; ++bit) {
    Bytes bad = out;
    bad[bit / 8] ^= uint8_t(1u << (bit % 8));
    EXPECT_EQ(w.unwrap(bad, back).code(), Code::kAuthFailed) << bit;
  }
  EXPECT_EQ(other.unwrap(out, back).code(), Code::kAuthFailed);
}

// RFC 5869 test cases 1 and 3.
TEST(Hkdf, Rfc5869Case1) {
  Bytes ikm(22, 0x0b), salt = hex("000102030405060708090a0b0c"), info = hex("f0f1f2f3f4f5f6f7f8f9");
  auto okm = hkdf_sha256(ikm, salt, info, 42);
  ASSERT_TRUE(okm.ok());
  EXPECT_EQ(to_hex(okm->view()), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                                 "34007208d5b887185865");
}

TEST(Hkdf, Rfc5869Case3EmptySaltAndInfo) {
  Bytes ikm(22, 0x0b);
  auto okm = hkdf_sha256(ikm, {}, {}, 42);
  ASSERT_TRUE(okm.ok());
  EXPECT_EQ(to_hex(okm->view()), "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                                 "9d201395faa4b61a96c8");
}

// RFC 4231 test case 1, twice on the same object (the re-keyed context path).
TEST(Hmac, Rfc4231Case1AndContextReuse) {
  HmacSha256 h(secret(Bytes(20, 0x0b)));
  for (int i = 0; i < 3; ++i) {
    auto m = h.mac({as_bytes("Hi "), as_bytes("There")});
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(to_hex(*m), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  }
}

// RFC 5297 appendix A.1 (AES-SIV with a 256-bit key, i.e. AES-128-SIV).
TEST(NameCipher, Rfc5297DeterministicVector) {
  NameCipher siv(secret(hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")));
  Bytes ad = hex("101112131415161718191a1b1c1d1e1f2021222324252627");
  Bytes pt = hex("112233445566778899aabbccddee");
  auto sealed = siv.seal(ad, pt);
  ASSERT_TRUE(sealed.ok()) << sealed.status().to_string();
  EXPECT_EQ(to_hex(*sealed), "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c");
  auto opened = siv.open(ad, *sealed);
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ(*opened, pt);
}

TEST(NameCipher, DeterministicPerDirectoryAndAuthenticated) {
  auto key = SecretBytes::random(64);
  ASSERT_TRUE(key.ok());
  NameCipher siv(*key);
  Bytes dir1(16, 1), dir2(16, 2);
  auto a = siv.seal(dir1, as_bytes("report.txt"));
  auto b = siv.seal(dir1, as_bytes("report.txt"));
  auto c = siv.seal(dir2, as_bytes("report.txt"));
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
  EXPECT_EQ(siv.open(dir2, *a).status().code(), Code::kAuthFailed);
  Bytes bad = *a;
  bad.back() ^= 1;
  EXPECT_EQ(siv.open(dir1, bad).status().code(), Code::kAuthFailed);
}

TEST(SecretBytes, MoveLeavesSourceEmptyAndWipeClears) {
  auto s = SecretBytes::random(32);
  ASSERT_TRUE(s.ok());
  SecretBytes moved = std::move(s).value();
  EXPECT_EQ(moved.size(), 32u);
  SecretBytes copy = moved.clone();
  EXPECT_TRUE(ct_equal(copy.view(), moved.view()));
  moved.wipe();
  EXPECT_TRUE(moved.empty());
  EXPECT_EQ(moved.data(), nullptr);
  static_assert(!std::is_copy_constructible_v<SecretBytes>);
}

TEST(Random, BlockKeysAreDistinctAcrossBatches) {
  std::set<Bytes> seen;
  for (int i = 0; i < 500; ++i) {  // crosses several 2 KiB batches
    Bytes k(32);
    ASSERT_TRUE(random_block_key(k).ok());
    EXPECT_TRUE(seen.insert(k).second);
  }
}

}  // namespace
}  // namespace envelopefs

namespace envelopefs {
namespace {

TEST(KeyWrap, BatchedWrapMatchesOneAtATimeAndDetectsTampering) {
  auto kek = SecretBytes::random(32);
  ASSERT_TRUE(kek.ok());
  KeyWrapper w(*kek);
  for (size_t count : {size_t{1}, size_t{7}, KeyWrapper::kMaxBatch}) {
    Bytes keys(32 * count), batch(40 * count), back(32 * count);
    ASSERT_TRUE(random_fill(keys).ok());
    ASSERT_TRUE(w.wrap32_many(keys.data(), batch.data(), count).ok());
    for (size_t k = 0; k < count; ++k) {
      Bytes one(40);
      ASSERT_TRUE(w.wrap({keys.data() + 32 * k, 32}, one).ok());
      EXPECT_TRUE(std::equal(one.begin(), one.end(), batch.begin() + static_cast<long>(40 * k))) << k;
    }
    batch[40 * (count - 1) + 17] ^= 4;  // damage the last one
    bool ok[KeyWrapper::kMaxBatch];
    ASSERT_TRUE(w.unwrap32_many(batch.data(), back.data(), ok, count).ok());
    for (size_t k = 0; k + 1 < count; ++k) {
      EXPECT_TRUE(ok[k]);
      EXPECT_TRUE(std::equal(back.begin() + static_cast<long>(32 * k), back.begin() + static_cast<long>(32 * k + 32),
                             keys.begin() + static_cast<long>(32 * k)));
    }
    EXPECT_FALSE(ok[count - 1]);
    EXPECT_EQ(Bytes(back.end() - 32, back.end()), Bytes(32, 0));  // zeroized
  }
}

}  // namespace
}  // namespace envelopefs
