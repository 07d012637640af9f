// fs/ block format without a mount: round trips, tampering, holes, the two-slot rule.
#include <dirent.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "fs/block_codec.h"
#include "fs/cipher_file.h"
#include "fs/io_backend.h"
#include "fs/names.h"
#include "fs/page_pool.h"
#include "tests/fault_backend.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

using test::TempDir;

struct Fixture {
  explicit Fixture(uint32_t bs = 4096, bool uring = false)
      : vol(test::make_volume(dir, bs)),
        io(uring ? make_uring_backend(nullptr) : make_posix_backend()) {
    if (!io) io = make_posix_backend();
  }
  int open_fd(const std::string& name, int extra_flags = 0) {
    int fd = ::open(dir.sub(name).c_str(), O_RDWR | O_CREAT | O_CLOEXEC | extra_flags, 0600);
    EXPECT_GE(fd, 0);
    fds.push_back(fd);
    return fd;
  }
  std::unique_ptr<CipherFile> create(const std::string& name, IoBackend* b = nullptr) {
    auto f = CipherFile::create(open_fd(name, O_TRUNC), *vol.keys, b ? *b : *io);
    EXPECT_TRUE(f.ok()) << f.status().to_string();
    return std::move(f).value();
  }
  Result<std::unique_ptr<CipherFile>> reopen(const std::string& name, IoBackend* b = nullptr) {
    return CipherFile::open(open_fd(name), *vol.keys, b ? *b : *io);
  }
  // A fresh copy of backing file `from` as `to`, for a test that spoils one copy per step.
  void copy(const std::string& from, const std::string& to) {
    std::error_code ec;
    std::filesystem::remove(dir.sub(to), ec);
    std::filesystem::copy_file(dir.sub(from), dir.sub(to));
  }
  ~Fixture() {
    for (int fd : fds) close(fd);
  }
  TempDir dir;
  OpenedVolume vol;
  std::unique_ptr<IoBackend> io;
  std::vector<int> fds;
};

Bytes random_bytes(std::mt19937_64& rng, size_t n) {
  Bytes b(n);
  for (auto& c : b) c = static_cast<uint8_t>(rng());
  return b;
}

Bytes read_all(CipherFile& f) {
  Bytes out(f.size());
  auto n = f.read(0, out);
  EXPECT_TRUE(n.ok()) << n.status().to_string();
  if (n.ok()) out.resize(*n);
  return out;
}

void poke(const std::string& path, uint64_t off, uint8_t xor_mask) {
  int fd = ::open(path.c_str(), O_RDWR);
  uint8_t c;
  ASSERT_EQ(pread(fd, &c, 1, static_cast<off_t>(off)), 1);
  c ^= xor_mask;
  ASSERT_EQ(pwrite(fd, &c, 1, static_cast<off_t>(off)), 1);
  close(fd);
}

Bytes slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

ProviderOptions no_prompt() {
  ProviderOptions o;
  o.allow_prompt = false;
  return o;
}

void zero_range(const std::string& path, uint64_t off, size_t len) {
  int fd = ::open(path.c_str(), O_RDWR);
  Bytes z(len, 0);
  ASSERT_EQ(pwrite(fd, z.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
  close(fd);
}

TEST(Layout, SizeIsAPureFunctionOfBackingSize) {
  for (uint32_t bs : {4096u, 8192u, 65536u}) {
    Layout l(bs);
    for (uint64_t s : {0ull, 1ull, 4095ull, 4096ull, 4097ull, 31ull * bs - 1, 31ull * bs,
                       31ull * bs + 1, 1000000ull, 123456789ull}) {
      EXPECT_EQ(l.plaintext_size(l.backing_size(s)), s) << bs << " " << s;
    }
    for (uint64_t b = 0; b < 100; ++b) {
      EXPECT_EQ(l.data_offset(b) % 4096, 0u);
      EXPECT_EQ(l.page_offset(Layout::page_of(b)) + kMetaPageSize + Layout::entry_of(b) * bs,
                l.data_offset(b));
    }
  }
}

TEST(CipherFile, RoundTripEverySizeFromZeroToBlockSize) {
  Fixture fx;
  std::mt19937_64 rng(1);
  auto f = fx.create("f");
  for (size_t n = 0; n <= 4096; ++n) {
    Bytes data = random_bytes(rng, n);
    ASSERT_TRUE(f->truncate(0).ok());
    ASSERT_TRUE(f->write(0, data).ok());
    ASSERT_EQ(f->size(), n);
    ASSERT_EQ(read_all(*f), data) << n;
  }
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)->size(), 4096u);
}

TEST(CipherFile, NoPlaintextInBackingFile) {
  Fixture fx;
  auto f = fx.create("f");
  std::string secret;
  for (int i = 0; i < 2000; ++i) secret += "TOP-SECRET-PAYLOAD ";
  ASSERT_TRUE(f->write(0, as_bytes(secret)).ok());
  int fd = ::open(fx.dir.sub("f").c_str(), O_RDONLY);
  std::string raw(1 << 20, '\0');
  raw.resize(static_cast<size_t>(pread(fd, raw.data(), raw.size(), 0)));
  close(fd);
  EXPECT_EQ(raw.find("TOP-SECRET"), std::string::npos);
}

class RandomOps : public ::testing::TestWithParam<std::tuple<uint32_t, bool>> {};

TEST_P(RandomOps, MatchInMemoryModelAcrossReopen) {
  auto [bs, uring] = GetParam();
  Fixture fx(bs, uring);
  std::mt19937_64 rng(bs + uring);
  auto f = fx.create("f");
  Bytes model;
  const uint64_t span = 40ull * bs;  // crosses metadata pages
  for (int op = 0; op < 300; ++op) {
    int kind = static_cast<int>(rng() % 10);
    if (kind < 7) {
      uint64_t off = rng() % span, len = 1 + rng() % (3 * bs);
      Bytes data = random_bytes(rng, len);
      ASSERT_TRUE(f->write(off, data).ok());
      if (model.size() < off + len) model.resize(off + len, 0);
      std::copy(data.begin(), data.end(), model.begin() + static_cast<long>(off));
    } else if (kind < 9) {
      uint64_t s = rng() % span;
      ASSERT_TRUE(f->truncate(s).ok());
      model.resize(s, 0);
    } else {
      uint64_t off = rng() % span, len = rng() % (4 * bs);
      ASSERT_TRUE(f->punch_hole(off, len).ok());
      for (uint64_t i = off; i < std::min<uint64_t>(off + len, model.size()); ++i) model[i] = 0;
    }
    ASSERT_EQ(f->size(), model.size());
    if (op % 25 == 0) {
      uint64_t off = model.empty() ? 0 : rng() % model.size();
      Bytes part(rng() % (2 * bs));
      auto n = f->read(off, part);
      ASSERT_TRUE(n.ok()) << n.status().to_string();
      ASSERT_EQ(*n, std::min<uint64_t>(part.size(), model.size() - off));
      ASSERT_TRUE(std::equal(part.begin(), part.begin() + static_cast<long>(*n), model.begin() + static_cast<long>(off)));
    }
  }
  ASSERT_EQ(read_all(*f), model);
  f.reset();
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(read_all(**g), model);
}

INSTANTIATE_TEST_SUITE_P(BlockSizesAndBackends, RandomOps,
                         ::testing::Combine(::testing::Values(4096u, 16384u),
                                            ::testing::Values(false, true)));

TEST(CipherFile, SparseWriteFarPastEndReadsZerosBetween) {
  Fixture fx;
  auto f = fx.create("f");
  ASSERT_TRUE(f->write(0, as_bytes("head")).ok());
  ASSERT_TRUE(f->write(10'000'000, as_bytes("tail")).ok());
  EXPECT_EQ(f->size(), 10'000'004u);
  Bytes mid(100'000);
  ASSERT_TRUE(f->read(5'000'000, mid).ok());
  EXPECT_EQ(mid, Bytes(100'000, 0));
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  Bytes tail(4);
  ASSERT_TRUE((*g)->read(10'000'000, tail).ok());
  EXPECT_EQ(as_chars(tail), "tail");
}

TEST(CipherFile, TruncateShrinkThenGrowDoesNotResurrectOldData) {
  Fixture fx;
  std::mt19937_64 rng(5);
  auto f = fx.create("f");
  Bytes data = random_bytes(rng, 10 * 4096 + 100);
  ASSERT_TRUE(f->write(0, data).ok());
  ASSERT_TRUE(f->truncate(2 * 4096 + 7).ok());
  ASSERT_TRUE(f->truncate(10 * 4096).ok());
  Bytes want(data.begin(), data.begin() + 2 * 4096 + 7);
  want.resize(10 * 4096, 0);
  EXPECT_EQ(read_all(*f), want);
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(read_all(**g), want);
}

// Tampering: every case must fail authentication, never return other data.
class Tamper : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(9);
    data_ = random_bytes(rng, 40 * 4096);  // two metadata pages
    auto f = fx_.create("f");
    ASSERT_TRUE(f->write(0, data_).ok());
    auto g = fx_.create("g");
    ASSERT_TRUE(g->write(0, random_bytes(rng, 40 * 4096)).ok());
  }
  // Reads block `b` of a freshly opened "f"; returns the status code.
  Code read_block(uint64_t b) {
    auto f = fx_.reopen("f");
    if (!f.ok()) return f.status().code();
    Bytes out(4096);
    auto n = (*f)->read(b * 4096, out);
    if (n.ok()) {
      EXPECT_EQ(Bytes(data_.begin() + static_cast<long>(b * 4096), data_.begin() + static_cast<long>((b + 1) * 4096)), out);
    }
    return n.ok() ? Code::kOk : n.status().code();
  }
  std::string path(const char* n) { return fx_.dir.sub(n); }
  Layout layout_{4096};
  Fixture fx_;
  Bytes data_;
};

TEST_F(Tamper, BitFlipsInCiphertextAreRejected) {
  for (uint64_t bit : {0ull, 7ull, 1000ull, 4096ull * 8 - 1}) {
    poke(path("f"), layout_.data_offset(3) + bit / 8, uint8_t(1u << (bit % 8)));
    EXPECT_EQ(read_block(3), Code::kAuthFailed) << bit;
    poke(path("f"), layout_.data_offset(3) + bit / 8, uint8_t(1u << (bit % 8)));
    EXPECT_EQ(read_block(3), Code::kOk);
  }
}

TEST_F(Tamper, EveryBitOfTheMetadataEntryIsCovered) {
  const uint64_t entry = layout_.page_offset(0) + kPageHeaderSize + 5 * kEntrySize;
  for (uint64_t bit = 0; bit < kEntrySize * 8; ++bit) {
    poke(path("f"), entry + bit / 8, uint8_t(1u << (bit % 8)));
    EXPECT_EQ(read_block(5), Code::kAuthFailed) << bit;
    poke(path("f"), entry + bit / 8, uint8_t(1u << (bit % 8)));
  }
  EXPECT_EQ(read_block(5), Code::kOk);
}

TEST_F(Tamper, BlocksSwappedBetweenOffsetsAreRejected) {
  Bytes a(4096), b(4096);
  int fd = ::open(path("f").c_str(), O_RDWR);
  ASSERT_EQ(pread(fd, a.data(), 4096, static_cast<off_t>(layout_.data_offset(1))), 4096);
  ASSERT_EQ(pread(fd, b.data(), 4096, static_cast<off_t>(layout_.data_offset(2))), 4096);
  ASSERT_EQ(pwrite(fd, a.data(), 4096, static_cast<off_t>(layout_.data_offset(2))), 4096);
  ASSERT_EQ(pwrite(fd, b.data(), 4096, static_cast<off_t>(layout_.data_offset(1))), 4096);
  close(fd);
  EXPECT_EQ(read_block(1), Code::kAuthFailed);
  EXPECT_EQ(read_block(2), Code::kAuthFailed);
  EXPECT_EQ(read_block(3), Code::kOk);
}

TEST_F(Tamper, BlockAndEntryCopiedFromAnotherFileAreRejected) {
  // Copy block 4 and its whole metadata page from g into f.
  Bytes page(4096), blk(4096);
  int g = ::open(path("g").c_str(), O_RDONLY), f = ::open(path("f").c_str(), O_RDWR);
  ASSERT_EQ(pread(g, blk.data(), 4096, static_cast<off_t>(layout_.data_offset(4))), 4096);
  ASSERT_EQ(pwrite(f, blk.data(), 4096, static_cast<off_t>(layout_.data_offset(4))), 4096);
  EXPECT_EQ(read_block(4), Code::kAuthFailed);
  ASSERT_EQ(pread(g, page.data(), 4096, static_cast<off_t>(layout_.page_offset(1))), 4096);
  ASSERT_EQ(pwrite(f, page.data(), 4096, static_cast<off_t>(layout_.page_offset(1))), 4096);
  close(g);
  close(f);
  EXPECT_EQ(read_block(35), Code::kAuthFailed);
}

TEST_F(Tamper, ZeroedEntryOrPageDoesNotReadAsAHole) {
  zero_range(path("f"), layout_.page_offset(1) + kPageHeaderSize + 2 * kEntrySize, kEntrySize);
  EXPECT_EQ(read_block(33), Code::kAuthFailed);
  zero_range(path("f"), layout_.page_offset(1), kMetaPageSize);
  EXPECT_EQ(read_block(33), Code::kAuthFailed);
  EXPECT_EQ(read_block(0), Code::kOk);
}

TEST_F(Tamper, ZeroedDataBlockIsRejected) {
  zero_range(path("f"), layout_.data_offset(7), 4096);
  EXPECT_EQ(read_block(7), Code::kAuthFailed);
}

TEST_F(Tamper, TruncatedBackingFileIsRejected) {
  ASSERT_EQ(::truncate(path("f").c_str(), static_cast<off_t>(layout_.data_offset(39) + 1000)), 0);
  EXPECT_EQ(read_block(39), Code::kAuthFailed);
  ASSERT_EQ(::truncate(path("f").c_str(), 100), 0);
  EXPECT_EQ(fx_.reopen("f").status().code(), Code::kAuthFailed);
}

TEST_F(Tamper, ZeroedHeaderPageIsRejectedAtOpen) {
  zero_range(path("f"), 0, kMetaPageSize);
  EXPECT_EQ(fx_.reopen("f").status().code(), Code::kAuthFailed);
}

// The AAD binds the block index, the file and the volume. The DEK version is bound by the page
// MAC and by the key wrap itself; in volumes with rewrappable blocks (every new one) the AAD's
// version field is 0, and the frozen pre-feature volume (tests/testdata, test_frozen.py) still
// reads with the version in it.
TEST(BlockCodec, AadBindsIndexFileAndVolume) {
  TempDir d;
  OpenedVolume v = test::make_volume(d);
  EXPECT_EQ(v.keys->block_aad_version(1), 0u);
  FileId a{}, b{};
  b[0] = 1;
  Bytes pt(4096, 0x42), ct(4096), out(4096);
  Slot s;
  ASSERT_TRUE(seal_block(*v.keys, a, 7, pt, ct.data(), &s).ok());
  EXPECT_TRUE(open_block(*v.keys, a, 7, s, ct, out.data()).ok());
  EXPECT_EQ(out, pt);
  EXPECT_EQ(open_block(*v.keys, a, 8, s, ct, out.data()).code(), Code::kAuthFailed);
  EXPECT_EQ(open_block(*v.keys, b, 7, s, ct, out.data()).code(), Code::kAuthFailed);
  Slot relabelled = s;
  relabelled.dek_version = 2;
  EXPECT_EQ(open_block(*v.keys, a, 7, relabelled, ct, out.data()).code(), Code::kAuthFailed);
  // Under another volume's keys the same bytes mean nothing.
  TempDir d2;
  OpenedVolume w = test::make_volume(d2);
  EXPECT_EQ(open_block(*w.keys, a, 7, s, ct, out.data()).code(), Code::kAuthFailed);
}

// DEK rotation, the block half (fs/block_rewrap.h): every block key moves to the new DEK
// version by rewriting metadata pages alone. The data blocks stay byte for byte (nothing is
// re-encrypted), the file reads back the same, and the old DEK alone no longer opens it.
TEST(BlockRewrap, KeysMoveToTheNewDekAndNoDataBlockChanges) {
  TempDir d;
  OpenedVolume v1 = test::make_volume(d);
  ASSERT_TRUE(v1.keys->rewrappable_blocks());
  auto io = make_posix_backend();
  const std::string path = d.sub("cipher/f");
  std::mt19937_64 rng(7);
  // 70 blocks and a short one: three metadata pages; a hole in the second group; and one
  // block overwritten, so its entry has two slots (both are re-wrapped).
  Bytes content = random_bytes(rng, 70 * 4096 + 100);
  std::fill(content.begin() + 40 * 4096, content.begin() + 42 * 4096, 0);
  {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    auto f = CipherFile::create(fd, *v1.keys, *io);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->write(0, ByteView(content.data(), 40 * 4096)).ok());
    ASSERT_TRUE((*f)->write(42 * 4096, ByteView(content.data() + 42 * 4096, content.size() - 42 * 4096)).ok());
    ASSERT_TRUE((*f)->write(5 * 4096, ByteView(content.data() + 5 * 4096, 4096)).ok());
    f->reset();
    close(fd);
  }
  auto rotated = rotate_dek(d.sub("cipher"), no_prompt());
  ASSERT_TRUE(rotated.ok()) << rotated.status().to_string();
  auto v2 = open_volume(d.sub("cipher"), no_prompt());
  ASSERT_TRUE(v2.ok());
  ASSERT_EQ(v2->keys->active_version(), 2u);
  const Bytes before = slurp(path);
  const Layout layout(4096);
  ASSERT_EQ(layout.page_count(content.size()), 3u);

  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  {
    auto f = CipherFile::open(fd, *v2->keys, *io);
    ASSERT_TRUE(f.ok());
    uint64_t read = 0, written = 0;
    auto next = (*f)->rewrap_keys(0, 2, &read, &written);  // two pages, then the rest
    ASSERT_TRUE(next.ok()) << next.status().to_string();
    EXPECT_EQ(*next, 2u);
    next = (*f)->rewrap_keys(*next, 64, &read, &written);
    ASSERT_TRUE(next.ok());
    EXPECT_EQ(*next, CipherFile::kRewrapDone);
    EXPECT_EQ(written, 3u);
    EXPECT_EQ(read, 3u);
    written = 0;  // a second pass finds nothing to do and writes nothing
    ASSERT_TRUE((*f)->rewrap_keys(0, 64, &read, &written).ok());
    EXPECT_EQ(written, 0u);
    EXPECT_EQ(read, 6u);
    EXPECT_EQ(read_all(**f), content);  // from the cached pages
  }
  const Bytes after = slurp(path);
  ASSERT_EQ(after.size(), before.size());
  size_t slots = 0, two_slot_entries = 0;
  for (uint64_t p = 0; p < 3; ++p) {
    const uint64_t off = layout.page_offset(p);
    const uint64_t data_end = std::min<uint64_t>(after.size(), off + layout.group_size());
    EXPECT_TRUE(std::equal(before.begin() + off + kMetaPageSize, before.begin() + data_end,
                           after.begin() + off + kMetaPageSize))
        << "data of group " << p << " changed";
    MetaPage page;
    std::memcpy(page.data(), after.data() + off, kMetaPageSize);
    EXPECT_TRUE(page.verify(*v2->keys, page.file_id(), p).ok());
    EXPECT_EQ(page.mac_version(), 2u);
    for (uint64_t e = 0; e < kBlocksPerGroup; ++e) {
      two_slot_entries += !page.slot(e, 0).empty() && !page.slot(e, 1).empty();
      for (int which : {0, 1}) {
        if (page.slot(e, which).empty()) continue;
        EXPECT_EQ(page.slot(e, which).dek_version, 2u);
        ++slots;
      }
    }
  }
  EXPECT_EQ(slots, 70u - 2 + 1 + 1);  // every written block, and block 5's second slot
  EXPECT_EQ(two_slot_entries, 1u);
  {
    auto f = CipherFile::open(fd, *v2->keys, *io);  // from disk this time
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(read_all(**f), content);
    std::map<uint32_t, uint64_t> by_version, pages;
    ASSERT_TRUE((*f)->count_key_versions(&by_version, &pages).ok());
    EXPECT_EQ(by_version, (std::map<uint32_t, uint64_t>{{2u, slots}}));
    EXPECT_EQ(pages, (std::map<uint32_t, uint64_t>{{2u, 3u}}));
  }
  // The keys from before the rotation hold only v1: the pages now need v2.
  EXPECT_EQ(CipherFile::open(fd, *v1.keys, *io).status().code(), Code::kAuthFailed);
  close(fd);
}

// A page whose MAC fails is not re-wrapped (nor "repaired"): the call fails, naming where,
// and the file on disk is left as it was.
TEST(BlockRewrap, ADamagedPageFailsAndNothingIsWritten) {
  TempDir d;
  OpenedVolume v1 = test::make_volume(d);
  auto io = make_posix_backend();
  const std::string path = d.sub("cipher/f");
  std::mt19937_64 rng(8);
  const Bytes content = random_bytes(rng, 40 * 4096);
  {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    auto f = CipherFile::create(fd, *v1.keys, *io);
    ASSERT_TRUE((*f)->write(0, content).ok());
    f->reset();
    close(fd);
  }
  ASSERT_TRUE(rotate_dek(d.sub("cipher"), no_prompt()).ok());
  auto v2 = open_volume(d.sub("cipher"), no_prompt());
  ASSERT_TRUE(v2.ok());
  poke(path, Layout(4096).page_offset(1) + 200, 0x01);  // an entry of the second page
  const Bytes before = slurp(path);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  auto f = CipherFile::open(fd, *v2->keys, *io);
  ASSERT_TRUE(f.ok());
  uint64_t read = 0, written = 0;
  auto next = (*f)->rewrap_keys(0, 64, &read, &written);
  EXPECT_EQ(next.status().code(), Code::kAuthFailed);
  EXPECT_NE(next.status().message().find("block 31"), std::string::npos) << next.status().to_string();
  EXPECT_EQ(written, 0u);
  EXPECT_EQ(slurp(path), before);
  f->reset();
  close(fd);
}

// The two-slot rule: a write interrupted between its metadata and its data leaves the block
// readable as its old content; completed writes read as new. Checked for every step of a
// sequence of interleavings, including a second crash on the same block after a reopen.
TEST(TwoSlots, EveryInterleavingReadsOldOrNew) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(3);
  Bytes current = random_bytes(rng, 3 * 4096);
  {
    auto f = fx.create("f", &faulty);
    ASSERT_TRUE(f->write(0, current).ok());
  }
  // Each step: crash after metadata (full or partial write), or complete the write.
  const char* plan = "CCWCWWCCPCPW";
  for (const char* p = plan; *p; ++p) {
    auto f = fx.reopen("f", &faulty);
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    Bytes next = current;
    uint64_t off = *p == 'P' ? 1000 : 0;
    Bytes patch = random_bytes(rng, *p == 'P' ? 5000 : 3 * 4096);
    std::copy(patch.begin(), patch.end(), next.begin() + static_cast<long>(off));
    bool crash = *p != 'W';
    faulty.set(crash ? test::FaultBackend::Mode::kCrashAfterMetadata : test::FaultBackend::Mode::kPass);
    Status st = (*f)->write(off, patch);
    faulty.set(test::FaultBackend::Mode::kPass);
    EXPECT_EQ(st.ok(), !crash);
    auto g = fx.reopen("f", &faulty);
    ASSERT_TRUE(g.ok());
    Bytes got = read_all(**g);
    if (!crash) current = next;
    ASSERT_EQ(got, current) << "step " << (p - plan) << " (" << *p << ")";
  }
}

// A hole inside a file has no old slot to fall back on. A write over holes and written blocks
// that fails after any number of its groups of writes (ENOSPC: a hole takes new space; or the
// daemon killed there) must leave every block old (zeros for a hole) or new, never EIO. With
// the page first, as for an overwrite, the holes read EIO once the page had landed without
// their data (found on a disk filled by a copy under the writeback cache).
TEST(TwoSlots, AWriteIntoHolesThatFailsAtAnyStepLeavesOldOrNew) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(8);
  const uint64_t bs = 4096, blocks = 2 * kBlocksPerGroup + 10;
  Bytes old_data(blocks * bs, 0);
  Bytes written = random_bytes(rng, 2 * bs);  // blocks 0 and 1; the rest are holes
  std::copy(written.begin(), written.end(), old_data.begin());
  {
    auto f = fx.create("f");
    ASSERT_TRUE(f->write(0, written).ok());
    ASSERT_TRUE(f->truncate(old_data.size()).ok());
  }
  // Block 1 (written) through two groups of holes, across a metadata page.
  const uint64_t first = 1, count = kBlocksPerGroup + 5;
  Bytes patch = random_bytes(rng, count * bs);
  Bytes new_data = old_data;
  std::copy(patch.begin(), patch.end(), new_data.begin() + static_cast<long>(first * bs));
  for (int groups = 0; groups <= 4; ++groups) {
    SCOPED_TRACE("writes let through: " + std::to_string(groups));
    fx.copy("f", "g");
    auto f = fx.reopen("g", &faulty);
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    faulty.fail_after(groups);
    Status st = (*f)->write(first * bs, patch);
    faulty.set(test::FaultBackend::Mode::kPass);
    f->reset();
    auto g = fx.reopen("g");
    ASSERT_TRUE(g.ok()) << g.status().to_string();
    for (uint64_t b = 0; b < blocks; ++b) {
      Bytes got(bs);
      auto n = (*g)->read(b * bs, got);
      ASSERT_TRUE(n.ok()) << "block " << b << ": " << n.status().to_string();
      auto at = [&](const Bytes& v) {
        return Bytes(v.begin() + static_cast<long>(b * bs), v.begin() + static_cast<long>((b + 1) * bs));
      };
      EXPECT_TRUE(got == at(old_data) || got == at(new_data)) << "block " << b;
      if (st.ok()) {
        EXPECT_EQ(got, at(new_data)) << "block " << b;
      }
    }
  }
}

// A write that makes a file longer, from inside or past its short last block on through two
// more groups, stopped after any number of its writes (a daemon killed there, or an error the
// write then takes itself back from): every block within the length the file then has reads
// as it was (zeros past the old end) or as written, never EIO. With all pages first, a page
// further on made the file longer over the short block and the new blocks of its group
// before their data had landed; and a failed growth cut the short block back after its
// longer data had landed (found by killing the daemon under SQLite's WAL, whose 4120-byte
// frames leave the end of the file inside a block).
TEST(TwoSlots, AGrowthStoppedAtAnyWriteLeavesEveryBlockOldOrNew) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(9);
  const uint64_t bs = 4096;
  const uint64_t old_size = (kBlocksPerGroup - 6) * bs + 1000;  // ends 1000 bytes into block 25
  const Bytes old_data = random_bytes(rng, old_size);
  {
    auto f = fx.create("f");
    ASSERT_TRUE(f->write(0, old_data).ok());
  }
  struct Case {
    uint64_t offset, len;
  };
  // From inside the short block; and from past it, which first re-seals it at full length.
  const Case cases[] = {{old_size - 500, 2 * kBlocksPerGroup * bs},
                        {(kBlocksPerGroup - 2) * bs + 100, 40000}};
  for (Case c : cases) {
    const Bytes patch = random_bytes(rng, c.len);
    Bytes new_data = old_data;
    new_data.resize(std::max(old_size, c.offset + c.len), 0);
    std::copy(patch.begin(), patch.end(), new_data.begin() + static_cast<long>(c.offset));
    Bytes old_padded = old_data;
    old_padded.resize(new_data.size(), 0);
    for (int step = 0; step <= 21; ++step) {
      const int groups = step / 2;
      const bool killed = step % 2 == 0;
      SCOPED_TRACE("write at " + std::to_string(c.offset) + ", writes let through: " +
                   std::to_string(groups) + (killed ? ", then killed" : ", then failed"));
      fx.copy("f", "g");
      auto f = fx.reopen("g", &faulty);
      ASSERT_TRUE(f.ok()) << f.status().to_string();
      if (killed) {
        faulty.kill_after(groups);
      } else {
        faulty.fail_after(groups, EIO);
      }
      Status st = (*f)->write(c.offset, patch);
      f->reset();  // a killed daemon's close does not reach the file either
      faulty.set(test::FaultBackend::Mode::kPass);
      auto g = fx.reopen("g");
      ASSERT_TRUE(g.ok()) << g.status().to_string();
      const uint64_t size = (*g)->size();
      ASSERT_GE(size, old_size);
      ASSERT_LE(size, new_data.size());
      Bytes got(size);
      auto n = (*g)->read(0, got);
      ASSERT_TRUE(n.ok()) << n.status().to_string();
      ASSERT_EQ(*n, size);
      for (uint64_t b = 0; b * bs < size; ++b) {
        auto at = [&](const Bytes& v) {
          const uint64_t end = std::min(size, (b + 1) * bs);
          return Bytes(v.begin() + static_cast<long>(b * bs), v.begin() + static_cast<long>(end));
        };
        EXPECT_TRUE(at(got) == at(old_padded) || at(got) == at(new_data)) << "block " << b;
      }
      if (st.ok()) {
        EXPECT_EQ(got, new_data);
      }
    }
  }
}

// A new file of three 4 KiB blocks and `tail` bytes of random data: its last block is short.
Bytes write_short_tailed(Fixture& fx, const std::string& name, std::mt19937_64& rng, uint64_t tail) {
  Bytes data = random_bytes(rng, 3 * 4096 + tail);
  auto f = fx.create(name);
  EXPECT_TRUE(f->write(0, data).ok());
  return data;
}

// The same growth through a power cut: the backing filesystem may keep the file's new length
// and not the short block's new data (ext4 journals the length of a write into a block it has
// allocated at once, and writes the data back later). The block then holds its short
// ciphertext and zeros behind it, and reads as it was, then zeros, as the file stood before
// the growth: not EIO. It is written again like any other block.
TEST(TwoSlots, AShortLastBlockWhoseGrowthDidNotLandReadsAsItWasThenZeros) {
  Fixture fx;
  std::mt19937_64 rng(10);
  const uint64_t bs = 4096;
  for (uint64_t tail : {1, 1000, 4095}) {
    const Bytes old_data = write_short_tailed(fx, "t", rng, tail);
    for (uint64_t grown : {3 * bs + tail + 1, 4 * bs, 6 * bs + 10}) {
      if (grown <= old_data.size()) continue;
      SCOPED_TRACE("tail " + std::to_string(tail) + " grown to " + std::to_string(grown));
      fx.copy("t", "u");
      // Group 0 only: the backing file is its page and then the data.
      ASSERT_EQ(::truncate(fx.dir.sub("u").c_str(), static_cast<off_t>(kMetaPageSize + grown)), 0);
      auto f = fx.reopen("u");
      ASSERT_TRUE(f.ok()) << f.status().to_string();
      ASSERT_EQ((*f)->size(), grown);
      Bytes expected = old_data;
      expected.resize(grown, 0);
      EXPECT_EQ(read_all(**f), expected);
      const Bytes patch = random_bytes(rng, 10);
      ASSERT_TRUE((*f)->write(3 * bs + 5, patch).ok());
      expected.resize(std::max<uint64_t>(grown, 3 * bs + 5 + patch.size()), 0);
      std::copy(patch.begin(), patch.end(), expected.begin() + static_cast<long>(3 * bs + 5));
      EXPECT_EQ(read_all(**f), expected);
      f->reset();
      auto g = fx.reopen("u");
      ASSERT_TRUE(g.ok()) << g.status().to_string();
      EXPECT_EQ(read_all(**g), expected);
    }
  }
}

// The opposite state, which a power cut can leave too: the short last block's longer data
// (re-sealed in place at its new length) and its page landed, the file's new length did not
// (ext4 without a journal writes an inode after its data; with one, a writeback can come
// between a write and the commit of its length). The data area then holds the longer
// ciphertext cut at the old length, which neither slot opens as it is. It reads as the file
// stood before the growth; and a write into it first puts back the old slot's ciphertext, so
// that a crash part way through that write leaves the block old or new as everywhere else.
TEST(TwoSlots, AShortLastBlockWhoseGrowthLandedButNotItsLengthReadsAsItWas) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(11);
  const uint64_t bs = 4096;
  for (uint64_t tail : {1, 1000, 4095}) {
    const Bytes old_data = write_short_tailed(fx, "t", rng, tail);
    const uint64_t backing_size = kMetaPageSize + old_data.size();  // group 0: its page, then data
    enum class Growth { kAppend, kAppendToBlockEnd, kAppendPastBlock, kTruncateUp };
    for (Growth how :
         {Growth::kAppend, Growth::kAppendToBlockEnd, Growth::kAppendPastBlock, Growth::kTruncateUp}) {
      if (tail == 4095 && how == Growth::kAppend) continue;  // 1 byte: kAppendToBlockEnd
      SCOPED_TRACE("tail " + std::to_string(tail) + ", growth " + std::to_string(static_cast<int>(how)));
      fx.copy("t", "u");
      {
        auto f = fx.reopen("u");
        ASSERT_TRUE(f.ok()) << f.status().to_string();
        const uint64_t to_block_end = 4 * bs - old_data.size();
        Status st;
        switch (how) {
          case Growth::kAppend:
            st = (*f)->write(old_data.size(), random_bytes(rng, to_block_end > 1 ? to_block_end / 2 : 1));
            break;
          case Growth::kAppendToBlockEnd:
            st = (*f)->write(old_data.size(), random_bytes(rng, to_block_end));
            break;
          case Growth::kAppendPastBlock:
            st = (*f)->write(old_data.size(), random_bytes(rng, 3 * bs));
            break;
          case Growth::kTruncateUp:
            st = (*f)->truncate(6 * bs + 10);
            break;
        }
        ASSERT_TRUE(st.ok()) << st.to_string();
      }
      ASSERT_EQ(::truncate(fx.dir.sub("u").c_str(), static_cast<off_t>(backing_size)), 0);
      {
        auto f = fx.reopen("u");
        ASSERT_TRUE(f.ok()) << f.status().to_string();
        ASSERT_EQ((*f)->size(), old_data.size());
        EXPECT_EQ(read_all(**f), old_data);
      }
      // Only the plaintext before sealed is accepted: a flipped bit fails as anywhere else.
      fx.copy("u", "w");
      poke(fx.dir.sub("w"), kMetaPageSize + 3 * bs + tail / 2, 0x10);
      {
        auto f = fx.reopen("w");
        ASSERT_TRUE(f.ok()) << f.status().to_string();
        Bytes out(old_data.size());
        auto n = (*f)->read(0, out);
        ASSERT_FALSE(n.ok());
        EXPECT_EQ(n.status().code(), Code::kAuthFailed);
      }
      // A write into the block, stopped after each of its steps by a killed daemon, and once
      // with its pages landed and its data not.
      const Bytes patch = random_bytes(rng, 10);
      Bytes new_data = old_data;
      new_data.resize(std::max<uint64_t>(old_data.size(), 3 * bs + 5 + patch.size()), 0);
      std::copy(patch.begin(), patch.end(), new_data.begin() + static_cast<long>(3 * bs + 5));
      Bytes old_padded = old_data;
      old_padded.resize(new_data.size(), 0);
      bool completed = false;
      for (int step = -1; step <= 6; ++step) {
        SCOPED_TRACE(step < 0 ? std::string("pages landed, data lost")
                              : "killed after " + std::to_string(step));
        fx.copy("u", "v");
        auto f = fx.reopen("v", &faulty);
        ASSERT_TRUE(f.ok()) << f.status().to_string();
        if (step < 0) {
          faulty.set(test::FaultBackend::Mode::kCrashAfterMetadata);
        } else {
          faulty.kill_after(step);
        }
        const Status st = (*f)->write(3 * bs + 5, patch);
        f->reset();
        faulty.set(test::FaultBackend::Mode::kPass);
        auto g = fx.reopen("v");
        ASSERT_TRUE(g.ok()) << g.status().to_string();
        const uint64_t size = (*g)->size();
        ASSERT_GE(size, old_data.size());
        ASSERT_LE(size, new_data.size());
        Bytes got(size);
        auto n = (*g)->read(0, got);
        ASSERT_TRUE(n.ok()) << n.status().to_string();
        got.resize(*n);
        const Bytes old_cut(old_padded.begin(), old_padded.begin() + static_cast<long>(size));
        const Bytes new_cut(new_data.begin(), new_data.begin() + static_cast<long>(size));
        EXPECT_TRUE(got == old_cut || got == new_cut);
        if (st.ok()) {
          EXPECT_EQ(got, new_data);
          completed = true;
        }
      }
      EXPECT_TRUE(completed) << "the write never got through: let more steps through";
    }
  }
}

// A truncate to inside a block, stopped after any number of its writes by a killed daemon:
// the file keeps its old length until the backing truncate lands, and every block reads as
// it was, as truncated (zeros past the new end), or zeros (entries past the new end are
// cleared first), never EIO. The shorter ciphertext written over the longer one without the
// zeros behind it matched neither slot at the old length.
TEST(TwoSlots, ATruncateStoppedAtAnyWriteLeavesEveryBlockReadable) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(11);
  const uint64_t bs = 4096;
  const Bytes old_data = random_bytes(rng, 2 * kBlocksPerGroup * bs + 3000);
  {
    auto f = fx.create("f");
    ASSERT_TRUE(f->write(0, old_data).ok());
  }
  for (uint64_t new_size : {uint64_t{10 * bs + 1234}, uint64_t{2 * kBlocksPerGroup * bs + 100}}) {
    Bytes truncated(old_data.begin(), old_data.begin() + static_cast<long>(new_size));
    truncated.resize(old_data.size(), 0);
    for (int groups = 0; groups <= 4; ++groups) {
      SCOPED_TRACE("truncate to " + std::to_string(new_size) + ", steps let through: " +
                   std::to_string(groups));
      fx.copy("f", "g");
      auto f = fx.reopen("g", &faulty);
      ASSERT_TRUE(f.ok()) << f.status().to_string();
      faulty.kill_after(groups);
      (void)(*f)->truncate(new_size);
      f->reset();
      faulty.set(test::FaultBackend::Mode::kPass);
      auto g = fx.reopen("g");
      ASSERT_TRUE(g.ok()) << g.status().to_string();
      const uint64_t size = (*g)->size();
      ASSERT_TRUE(size == old_data.size() || size == new_size) << size;
      Bytes got(size);
      auto n = (*g)->read(0, got);
      ASSERT_TRUE(n.ok()) << n.status().to_string();
      for (uint64_t b = 0; b * bs < size; ++b) {
        const uint64_t end = std::min(size, (b + 1) * bs);
        auto at = [&](const Bytes& v) {
          return Bytes(v.begin() + static_cast<long>(b * bs), v.begin() + static_cast<long>(end));
        };
        EXPECT_TRUE(at(got) == at(old_data) || at(got) == at(truncated) || at(got) == Bytes(end - b * bs, 0))
            << "block " << b;
      }
    }
  }
}

// A long sparse growth from a short last block writes its pages as it makes them, as one from
// a whole last block does, so the page cache stays within its budget. The batch used to hold
// every page at once: a truncate of a 1,000-byte file to 16 GiB took 97 s and 590 MB.
TEST(CipherFile, ALongGrowthFromAShortLastBlockStaysWithinThePageBudget) {
  Fixture fx;
  CipherFile::set_page_budget(64);
  const uint64_t pages = 8192, to = pages * kBlocksPerGroup * 4096;
  for (bool by_write : {false, true}) {
    SCOPED_TRACE(by_write ? "write far past the end" : "truncate up");
    auto f = fx.create(by_write ? "w" : "t");
    ASSERT_TRUE(f->write(0, Bytes(1000, 'x')).ok());
    const size_t in_use = PagePool::in_use(), capacity = PagePool::capacity();
    ASSERT_LT(capacity, in_use + pages) << "the pool has room for every page already: this proves nothing";
    Status st = by_write ? f->write(to, Bytes(1, 'y')) : f->truncate(to);
    ASSERT_TRUE(st.ok()) << st.to_string();
    EXPECT_LE(PagePool::capacity(), std::max(capacity, in_use + 512));
    Bytes head(6000);
    auto n = f->read(0, head);
    ASSERT_TRUE(n.ok()) << n.status().to_string();
    Bytes want(6000, 0);
    std::fill(want.begin(), want.begin() + 1000, 'x');
    EXPECT_EQ(head, want);
  }
  CipherFile::set_page_budget(CipherFile::kPageBudget);
}

TEST(CipherFile, NoSpaceOnGrowthOrFallocateLeavesOldContentAndSize) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(4);
  Bytes data = random_bytes(rng, 5 * 4096 + 10);
  auto f = fx.create("f", &faulty);
  ASSERT_TRUE(f->write(0, data).ok());
  faulty.set(test::FaultBackend::Mode::kFailReserve, ENOSPC);
  // Past the space already reserved (reservations go in steps of kReserveStep).
  Status st = f->write(2 * CipherFile::kReserveStep, random_bytes(rng, 10 * 4096));
  EXPECT_EQ(st.code(), Code::kNoSpace);
  EXPECT_EQ(st.sys_errno(), ENOSPC);
  // fallocate, growing or not, fails the same way before it changes anything.
  for (bool keep : {false, true}) {
    EXPECT_EQ(f->allocate(0, 8 << 20, keep).code(), Code::kNoSpace);
  }
  faulty.set(test::FaultBackend::Mode::kPass);
  EXPECT_EQ(f->size(), data.size());
  EXPECT_EQ(read_all(*f), data);
  struct stat bst;
  ASSERT_EQ(stat(fx.dir.sub("f").c_str(), &bst), 0);
  EXPECT_EQ(static_cast<uint64_t>(bst.st_size), Layout(4096).backing_size(data.size()));
  f.reset();
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(read_all(**g), data);
}

// Extents of a backing file that are reserved but unwritten (FIEMAP), -1 where the backing
// filesystem cannot tell.
int unwritten_extents(int fd) {
  alignas(struct fiemap) uint8_t buf[sizeof(struct fiemap) + 512 * sizeof(struct fiemap_extent)];
  int count = 0;
  uint64_t start = 0;
  for (;;) {
    std::memset(buf, 0, sizeof buf);
    auto* fm = reinterpret_cast<struct fiemap*>(buf);
    fm->fm_start = start;
    fm->fm_length = FIEMAP_MAX_OFFSET;
    fm->fm_flags = FIEMAP_FLAG_SYNC;
    fm->fm_extent_count = 512;
    if (ioctl(fd, FS_IOC_FIEMAP, fm) != 0) return -1;
    if (fm->fm_mapped_extents == 0) return count;
    for (uint32_t k = 0; k < fm->fm_mapped_extents; ++k) {
      const auto& e = fm->fm_extents[k];
      if (e.fe_flags & FIEMAP_EXTENT_UNWRITTEN) ++count;
      if (e.fe_flags & FIEMAP_EXTENT_LAST) return count;
      start = e.fe_logical + e.fe_length;
    }
  }
}

TEST(CipherFile, AllocateGrowsWithSpaceReservedAndSmallGrowthsWritten) {
  Fixture fx;
  std::mt19937_64 rng(7);
  Bytes data = random_bytes(rng, 10000);
  auto f = fx.create("f");
  ASSERT_TRUE(f->write(0, data).ok());
  ASSERT_TRUE(f->allocate(4096, 8 << 20, false).ok());
  ASSERT_EQ(f->size(), 4096u + (8 << 20));
  Bytes want = data;
  want.resize(f->size(), 0);
  EXPECT_EQ(read_all(*f), want);
  struct stat bst;
  ASSERT_EQ(fstat(f->fd(), &bst), 0);
  EXPECT_GE(static_cast<uint64_t>(bst.st_blocks) * 512, static_cast<uint64_t>(bst.st_size));
  // A growth up to kZeroFillMax has its data areas written: no unwritten extents left for the
  // writes that follow to convert. Past it, the space is only reserved.
  const int small = unwritten_extents(f->fd());
  if (small < 0) GTEST_SKIP() << "the backing filesystem does not report extents";
  EXPECT_EQ(small, 0);
  ASSERT_TRUE(f->allocate(f->size(), CipherFile::kZeroFillMax + 4096, false).ok());
  EXPECT_GT(unwritten_extents(f->fd()), 0);
  f.reset();
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)->size(), want.size() + CipherFile::kZeroFillMax + 4096);
  Bytes head(want.size());
  ASSERT_TRUE((*g)->read(0, head).ok());
  EXPECT_EQ(head, want);
}

TEST(CipherFile, AllocateKeepSizeReservesPastTheEndAndKeepsItAfterClose) {
  Fixture fx;
  auto f = fx.create("f");
  ASSERT_TRUE(f->write(0, Bytes(100, 0x5a)).ok());
  ASSERT_TRUE(f->allocate(0, 4 << 20, true).ok());
  EXPECT_EQ(f->size(), 100u);
  f.reset();
  struct stat bst;
  ASSERT_EQ(stat(fx.dir.sub("f").c_str(), &bst), 0);
  EXPECT_EQ(bst.st_size, 4096 + 100);
  EXPECT_GE(static_cast<uint64_t>(bst.st_blocks) * 512, uint64_t{4} << 20);
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(read_all(**g), Bytes(100, 0x5a));
}

off_t backing_length(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

// A new file writes nothing until its first change (the header goes out with it), so a file
// created and never written is an empty backing file, which reads as an empty file; a failed
// first change leaves it so too, and the next one still writes a header that authenticates.
TEST(CipherFile, NewFileWritesItsHeaderWithItsFirstChange) {
  Fixture fx;
  std::mt19937_64 rng(11);
  auto touched = fx.create("touched");
  ASSERT_TRUE(touched->truncate(0).ok());  // open(O_TRUNC) of the new file
  ASSERT_TRUE(touched->sync(false).ok());
  touched.reset();
  EXPECT_EQ(backing_length(fx.dir.sub("touched")), 0);
  auto t = fx.reopen("touched");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  EXPECT_EQ((*t)->size(), 0u);
  t->reset();
  EXPECT_EQ(backing_length(fx.dir.sub("touched")), 0);  // opening it wrote nothing either

  test::FaultBackend faulty(*fx.io);
  auto f = fx.create("f", &faulty);
  faulty.set(test::FaultBackend::Mode::kFailAll, EIO);
  EXPECT_FALSE(f->write(0, random_bytes(rng, 5000)).ok());
  EXPECT_EQ(backing_length(fx.dir.sub("f")), 0);
  faulty.set(test::FaultBackend::Mode::kPass);
  Bytes data = random_bytes(rng, 3 * 4096 + 9);
  ASSERT_TRUE(f->write(0, data).ok());
  EXPECT_EQ(backing_length(fx.dir.sub("f")), 4096 + static_cast<off_t>(data.size()));
  f.reset();
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok()) << g.status().to_string();
  EXPECT_EQ(read_all(**g), data);

  // Growth by truncate or fallocate alone writes the header (with hole entries) too.
  auto grown = fx.create("grown");
  ASSERT_TRUE(grown->truncate(10000).ok());
  auto reserved = fx.create("reserved");
  ASSERT_TRUE(reserved->allocate(0, 300000, false).ok());
  grown.reset();
  reserved.reset();
  for (auto [name, size] : {std::pair{"grown", 10000u}, std::pair{"reserved", 300000u}}) {
    auto h = fx.reopen(name);
    ASSERT_TRUE(h.ok()) << name << ": " << h.status().to_string();
    EXPECT_EQ(read_all(**h), Bytes(size, 0)) << name;
  }
}

// Space reserved ahead of a growing file is returned at close: a file must not keep a MiB of
// disk past its end (each small file of a copied tree did, before).
TEST(CipherFile, NoSpaceOnTheFirstWriteLeavesAnEmptyFile) {
  // The first write of an empty file reserves nothing ahead (cipher_file.cc): a device that
  // fills up half way through it must still leave an empty, valid file.
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(5);
  auto f = fx.create("f", &faulty);
  faulty.set(test::FaultBackend::Mode::kFailData, ENOSPC);
  Status st = f->write(0, random_bytes(rng, 7 * 4096 + 123));
  EXPECT_EQ(st.code(), Code::kNoSpace);
  faulty.set(test::FaultBackend::Mode::kPass);
  EXPECT_EQ(f->size(), 0u);
  EXPECT_TRUE(read_all(*f).empty());
  f.reset();
  struct stat bst;
  ASSERT_EQ(stat(fx.dir.sub("f").c_str(), &bst), 0);
  EXPECT_EQ(bst.st_size, 0);  // back to an empty backing file: an empty file
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok()) << g.status().to_string();
  EXPECT_EQ((*g)->size(), 0u);
  Bytes data = random_bytes(rng, 3 * 4096 + 9);
  ASSERT_TRUE((*g)->write(0, data).ok());
  EXPECT_EQ(read_all(**g), data);
}

TEST(CipherFile, ReservedSpaceIsGivenBackAtClose) {
  Fixture fx;
  std::mt19937_64 rng(8);
  auto allocated = [&](const char* name) {
    struct stat st;
    EXPECT_EQ(::stat(fx.dir.sub(name).c_str(), &st), 0);
    return std::pair<uint64_t, uint64_t>(static_cast<uint64_t>(st.st_blocks) * 512, static_cast<uint64_t>(st.st_size));
  };
  auto small = fx.create("small");
  ASSERT_TRUE(small->write(0, random_bytes(rng, 10'000)).ok());
  small.reset();
  auto [small_alloc, small_size] = allocated("small");
  EXPECT_LE(small_alloc, small_size + 16384);  // a block of slack, plus an extent block
  auto big = fx.create("big");
  Bytes chunk = random_bytes(rng, 100'000);
  for (int k = 0; k < 30; ++k) ASSERT_TRUE(big->write(big->size(), chunk).ok());  // appends past steps
  auto [open_alloc, open_size] = allocated("big");
  EXPECT_GT(open_alloc, open_size);  // reserved ahead while open
  big.reset();
  auto [big_alloc, big_size] = allocated("big");
  EXPECT_LE(big_alloc, big_size + 16384);
  auto g = fx.reopen("big");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ((*g)->size(), 30u * chunk.size());
}

TEST(CipherFile, FailedOverwriteLeavesEveryBlockOldOrNew) {
  Fixture fx;
  test::FaultBackend faulty(*fx.io);
  std::mt19937_64 rng(6);
  Bytes old_data = random_bytes(rng, 20 * 4096), new_data = random_bytes(rng, 20 * 4096);
  auto f = fx.create("f", &faulty);
  ASSERT_TRUE(f->write(0, old_data).ok());
  faulty.set(test::FaultBackend::Mode::kFailData, EIO);
  EXPECT_EQ(f->write(0, new_data).code(), Code::kIoError);
  faulty.set(test::FaultBackend::Mode::kPass);
  f.reset();
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  Bytes got = read_all(**g);
  ASSERT_EQ(got.size(), old_data.size());
  int news = 0;
  for (size_t b = 0; b < 20; ++b) {
    auto at = [&](const Bytes& v) { return Bytes(v.begin() + static_cast<long>(b * 4096), v.begin() + static_cast<long>((b + 1) * 4096)); };
    bool is_old = at(got) == at(old_data), is_new = at(got) == at(new_data);
    EXPECT_TRUE(is_old || is_new) << b;
    news += is_new;
  }
  EXPECT_EQ(news, 10);  // the injected fault let half of the data through
}

// Readers sharing a file while its metadata pages are evicted under them (a budget of 8 pages
// for ~120): every read must return the data, never zeros from a page that vanished between
// looking it up and using its slots.
TEST(CipherFile, ConcurrentReadersWhilePagesAreEvicted) {
  Fixture fx;
  std::mt19937_64 rng(21);
  const Bytes data = random_bytes(rng, 120 * kBlocksPerGroup * 4096 + 777);
  {
    auto f = fx.create("f");
    ASSERT_TRUE(f->write(0, data).ok());
  }
  auto g = fx.reopen("f");
  ASSERT_TRUE(g.ok());
  CipherFile& f = **g;
  CipherFile::set_page_budget(8);
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 r(static_cast<uint64_t>(t) + 100);
      for (int i = 0; i < 300; ++i) {
        const uint64_t off = r() % data.size();
        Bytes back(std::min<uint64_t>(1 + r() % 300'000, data.size() - off));
        auto n = f.read(off, back);
        if (!n.ok() || *n != back.size() ||
            !std::equal(back.begin(), back.end(), data.begin() + static_cast<std::ptrdiff_t>(off))) {
          ++errors;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CipherFile::set_page_budget(CipherFile::kPageBudget);
  EXPECT_EQ(errors.load(), 0);
}

TEST(PagePool, SlotsAreAlignedZeroedDistinctAndReused) {
  const size_t in_use = PagePool::in_use();
  std::vector<PagePool::Ptr> pages;
  for (size_t i = 0; i < PagePool::kSlotsPerSlab + 3; ++i) {  // more than one slab
    pages.push_back(PagePool::make());
    const uint8_t* d = pages.back()->data();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(d) % kMetaPageSize, 0u);  // O_DIRECT needs it
    EXPECT_TRUE(pages.back()->all_zero());
    std::memset(pages.back()->data(), 0xEE, kMetaPageSize);  // ASan: the whole slot is ours
  }
  std::vector<const uint8_t*> addrs;
  for (auto& p : pages) addrs.push_back(p->data());
  std::sort(addrs.begin(), addrs.end());
  EXPECT_EQ(std::adjacent_find(addrs.begin(), addrs.end()), addrs.end());
  for (size_t i = 1; i < addrs.size(); ++i) EXPECT_GE(addrs[i] - addrs[i - 1], static_cast<ptrdiff_t>(kMetaPageSize));
  EXPECT_EQ(PagePool::in_use(), in_use + pages.size());
  const size_t capacity = PagePool::capacity();
  pages.clear();
  EXPECT_EQ(PagePool::in_use(), in_use);
  // Returned slots are handed out again (zeroed) before any new slab is made.
  for (int i = 0; i < 10; ++i) {
    pages.push_back(PagePool::make());
    EXPECT_TRUE(pages.back()->all_zero());
  }
  EXPECT_EQ(PagePool::capacity(), capacity);
}

// The page budget counts pages; each must cost one 4 KiB slot, and every one must go back
// when the file is closed.
TEST(CipherFile, CachedPagesTakeOneSlotEachAndGoBackAtClose) {
  Fixture fx;
  const size_t before = PagePool::in_use();
  std::mt19937_64 rng(5);
  const uint64_t groups = 40;
  const Bytes data = random_bytes(rng, groups * kBlocksPerGroup * 4096);
  {
    auto f = fx.create("f");
    ASSERT_TRUE(f->write(0, data).ok());
    EXPECT_EQ(PagePool::in_use(), before + groups);
    auto g = fx.reopen("f");
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(read_all(**g), data);
    EXPECT_EQ(PagePool::in_use(), before + 2 * groups);
  }
  EXPECT_EQ(PagePool::in_use(), before);
}

TEST(CipherFile, ConcurrentWritersAndReadersOnDisjointRanges) {
  Fixture fx(4096, true);
  auto f = fx.create("f");
  ASSERT_TRUE(f->truncate(4 * 64 * 4096).ok());
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t));
      for (int i = 0; i < 200; ++i) {
        uint64_t off = (static_cast<uint64_t>(t) * 64 + rng() % 60) * 4096 + rng() % 4096;
        Bytes data(1 + rng() % 8000, static_cast<uint8_t>(t + 1));
        if (!f->write(off, data).ok()) ++errors;
        Bytes back(data.size());
        auto n = f->read(off, back);
        if (!n.ok() || back != data) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
}

class DirNonces : public ::testing::TestWithParam<NonceStore> {
 protected:
  int open_dir(const std::string& name) {
    std::filesystem::create_directory(dir_.sub(name));
    int fd = ::open(dir_.sub(name).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    fds_.push_back(fd);
    return fd;
  }
  ~DirNonces() override {
    for (int fd : fds_) ::close(fd);
  }
  TempDir dir_;
  std::vector<int> fds_;
};

// The names in backing directory `fd` other than "." and "..".
std::vector<std::string> entries_of(int fd) {
  std::vector<std::string> out;
  DIR* d = fdopendir(openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  while (dirent* e = d ? ::readdir(d) : nullptr) {
    if (std::string_view(e->d_name) != "." && std::string_view(e->d_name) != "..") out.push_back(e->d_name);
  }
  if (d) closedir(d);
  return out;
}

TEST_P(DirNonces, CreatedNonceReadsBackAndIsStoredAsTheVolumeSays) {
  int a = open_dir("a"), b = open_dir("b");
  ASSERT_TRUE(create_dir_nonce(a, GetParam()).ok());
  ASSERT_TRUE(create_dir_nonce(b, GetParam()).ok());
  auto na = read_dir_nonce(a), nb = read_dir_nonce(b);
  ASSERT_TRUE(na.ok() && nb.ok());
  EXPECT_NE(*na, *nb);  // random per directory
  auto names = entries_of(a);
  ASSERT_EQ(names.size(), 1u);
  struct stat st;
  ASSERT_EQ(fstatat(a, names[0].c_str(), &st, AT_SYMLINK_NOFOLLOW), 0);
  ASSERT_TRUE(S_ISREG(st.st_mode));
  if (GetParam() == NonceStore::kName) {
    // "envelopefs.dirnonce." + base64url of 16 bytes (22 characters), an empty file.
    EXPECT_EQ(names[0], dir_nonce_entry(*na));
    EXPECT_EQ(names[0].size(), sizeof(kDirNoncePrefix) - 1 + 22);
    EXPECT_EQ(st.st_size, 0);
  } else {
    EXPECT_EQ(names[0], kDirNonceName);
    EXPECT_EQ(st.st_size, 16);
  }
  // A second nonce never replaces the first.
  auto again = read_dir_nonce(a);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *na);
  auto only = holds_only_nonce(a);
  ASSERT_TRUE(only.ok());
  EXPECT_TRUE(*only);
  ASSERT_GE(::close(openat(a, "x", O_WRONLY | O_CREAT | O_CLOEXEC, 0600)), 0);
  only = holds_only_nonce(a);
  ASSERT_TRUE(only.ok());
  EXPECT_FALSE(*only);
}

TEST_P(DirNonces, RemovedAndRestoredNonceIsTheOneTakenOut) {
  int a = open_dir("a");
  ASSERT_TRUE(create_dir_nonce(a, GetParam()).ok());
  auto n = read_dir_nonce(a);
  ASSERT_TRUE(n.ok());
  ASSERT_TRUE(remove_dir_nonce(a, *n).ok());
  EXPECT_TRUE(entries_of(a).empty());
  EXPECT_EQ(read_dir_nonce(a).status().code(), Code::kNotFound);
  restore_dir_nonce(a, *n, GetParam());
  auto back = read_dir_nonce(a);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, *n);
}

INSTANTIATE_TEST_SUITE_P(BothStores, DirNonces, ::testing::Values(NonceStore::kName, NonceStore::kFile),
                         [](const auto& p) { return p.param == NonceStore::kName ? "Name" : "File"; });

TEST(DirNonces, DamagedOrAmbiguousNonceFailsClosed) {
  TempDir dir;
  std::filesystem::create_directory(dir.sub("d"));
  int fd = ::open(dir.sub("d").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  auto touch = [&](const std::string& name, const char* content) {
    int f = openat(fd, name.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    ASSERT_GE(f, 0);
    ASSERT_EQ(write(f, content, strlen(content)), static_cast<ssize_t>(strlen(content)));
    ::close(f);
  };
  EXPECT_EQ(read_dir_nonce(fd).status().code(), Code::kNotFound);  // none at all
  touch(std::string(kDirNoncePrefix) + "AAAA", "");                   // 3 bytes
  EXPECT_EQ(read_dir_nonce(fd).status().code(), Code::kCorrupt);
  ASSERT_EQ(unlinkat(fd, (std::string(kDirNoncePrefix) + "AAAA").c_str(), 0), 0);
  DirNonce n1{}, n2{};
  n2[0] = 1;
  touch(dir_nonce_entry(n1), "");
  ASSERT_TRUE(read_dir_nonce(fd).ok());
  touch(dir_nonce_entry(n2), "");                                     // which one?
  EXPECT_EQ(read_dir_nonce(fd).status().code(), Code::kCorrupt);
  ASSERT_EQ(unlinkat(fd, dir_nonce_entry(n1).c_str(), 0), 0);
  ASSERT_EQ(unlinkat(fd, dir_nonce_entry(n2).c_str(), 0), 0);
  touch(kDirNonceName, "short");                                      // file form, 5 bytes
  EXPECT_EQ(read_dir_nonce(fd).status().code(), Code::kCorrupt);
  ::close(fd);
}

}  // namespace
}  // namespace envelopefs
