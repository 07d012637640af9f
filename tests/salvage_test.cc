// fs/salvage.h: what `fsck --repair` gives up of a damaged backing file, and what it keeps.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "fs/cipher_file.h"
#include "fs/layout.h"
#include "fs/salvage.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

constexpr uint32_t kBs = 4096;
const uint64_t kGroup = kMetaPageSize + kBlocksPerGroup * kBs;

class Salvage : public ::testing::Test {
 protected:
  Salvage() : vol_(test::make_volume(dir_)), io_(make_posix_backend()) {}

  std::string path(const std::string& name) const { return dir_.sub(name); }
  int open_rw(const std::string& name) {
    int fd = ::open(path(name).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0);
    return fd;
  }
  // Writes `data` at `offset` of file `name` through the block format (created if new).
  void write(const std::string& name, uint64_t offset, const Bytes& data) {
    int fd = open_rw(name);
    struct stat st;
    ASSERT_EQ(fstat(fd, &st), 0);
    auto f = st.st_size == 0 ? CipherFile::create(fd, *vol_.keys, *io_) : CipherFile::open(fd, *vol_.keys, *io_);
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    ASSERT_TRUE((*f)->write(offset, data).ok());
    ASSERT_TRUE((*f)->sync(false).ok());
    f->reset();
    close(fd);
  }
  // The file's plaintext, or the first error.
  Result<Bytes> read(const std::string& name) {
    int fd = open_rw(name);
    auto f = CipherFile::open(fd, *vol_.keys, *io_);
    if (!f.ok()) {
      close(fd);
      return f.status();
    }
    Bytes out((*f)->size());
    auto n = (*f)->read(0, out);
    f->reset();
    close(fd);
    if (!n.ok()) return n.status();
    return out;
  }
  SalvageReport salvage(const std::string& name) {
    int fd = open_rw(name);
    auto r = salvage_file(fd, *vol_.keys, *io_);
    close(fd);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? *r : SalvageReport{};
  }
  void put(const std::string& name, uint64_t offset, const Bytes& bytes) {
    int fd = open_rw(name);
    ASSERT_EQ(pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)), static_cast<ssize_t>(bytes.size()));
    close(fd);
  }
  Bytes get(const std::string& name, uint64_t offset, size_t n) {
    Bytes b(n);
    int fd = open_rw(name);
    EXPECT_EQ(pread(fd, b.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    close(fd);
    return b;
  }
  static Bytes random(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Bytes b(n);
    for (auto& c : b) c = static_cast<uint8_t>(rng());
    return b;
  }
  // `plain` with blocks `zeroed` replaced by zeros.
  static Bytes with_zeros(Bytes plain, std::initializer_list<uint64_t> zeroed) {
    for (uint64_t b : zeroed) {
      std::fill(plain.begin() + static_cast<long>(b * kBs),
                plain.begin() + static_cast<long>(std::min<uint64_t>(plain.size(), (b + 1) * kBs)), 0);
    }
    return plain;
  }

  test::TempDir dir_;
  OpenedVolume vol_;
  std::unique_ptr<IoBackend> io_;
  const Layout layout_{kBs};
};

TEST_F(Salvage, AnIntactFileIsLeftAsItIs) {
  const Bytes plain = random(100 * kBs + 17, 1);
  write("f", 0, plain);
  const std::string before = test::slurp(path("f"));
  SalvageReport r = salvage("f");
  EXPECT_FALSE(r.changed());
  EXPECT_EQ(r.still_failing, 0u);
  EXPECT_EQ(test::slurp(path("f")), before);
}

TEST_F(Salvage, ABlockThatDoesNotAuthenticateBecomesAHoleAndNothingElseChanges) {
  const Bytes plain = random(100 * kBs + 17, 2);
  write("f", 0, plain);
  for (uint64_t b : {5u, 40u, 100u}) {  // 100: the short last block
    Bytes byte = get("f", layout_.data_offset(b) + 3, 1);
    byte[0] ^= 1;
    put("f", layout_.data_offset(b) + 3, byte);
  }
  ASSERT_FALSE(read("f").ok());
  SalvageReport r = salvage("f");
  EXPECT_EQ(r.blocks_given_up, (std::vector<uint64_t>{5, 40, 100}));
  EXPECT_TRUE(r.pages_resealed.empty() && r.pages_replaced.empty());
  EXPECT_EQ(r.still_failing, 0u);
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  EXPECT_EQ(*now, with_zeros(plain, {5, 40, 100}));
}

TEST_F(Salvage, ATornPageKeepsTheBlocksWhoseEntriesStillOpenThem) {
  // The file, then blocks 3 and 9 written again; then a power cut tears page 0: its second
  // 512-byte sector (the entries of blocks 3 to 6) is the one from before that write.
  const Bytes first = random(40 * kBs, 3);
  write("f", 0, first);
  const Bytes old_sector = get("f", 512, 512);
  Bytes second = first;
  const Bytes again = random(kBs, 4);
  for (uint64_t b : {3u, 9u}) {
    std::copy(again.begin(), again.end(), second.begin() + static_cast<long>(b * kBs));
    write("f", b * kBs, again);
  }
  put("f", 512, old_sector);
  ASSERT_FALSE(read("f").ok());
  SalvageReport r = salvage("f");
  EXPECT_EQ(r.pages_resealed, (std::vector<uint64_t>{0}));
  // Block 3's entry is the old one and its data the new: neither opens it. Block 9's entry
  // (another sector) and every other block are whole.
  EXPECT_EQ(r.blocks_given_up, (std::vector<uint64_t>{3}));
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  EXPECT_EQ(*now, with_zeros(second, {3}));
}

TEST_F(Salvage, APageThatIsNotOneIsReplacedByHoles) {
  const Bytes plain = random(3 * kBlocksPerGroup * kBs, 5);
  write("f", 0, plain);
  put("f", layout_.page_offset(1), Bytes(kMetaPageSize, 0));
  SalvageReport r = salvage("f");
  EXPECT_EQ(r.pages_replaced, (std::vector<uint64_t>{1}));
  EXPECT_TRUE(r.blocks_given_up.empty());
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  Bytes expected = plain;
  std::fill(expected.begin() + kBlocksPerGroup * kBs, expected.begin() + 2 * kBlocksPerGroup * kBs, 0);
  EXPECT_EQ(*now, expected);
}

TEST_F(Salvage, APageFromAnotherFileKeepsNoneOfItsBlocks) {
  // A whole page of file g put in f's place: it names the right position, but its entries
  // open g's blocks only (the tag binds the file), so none of them stands in f.
  const Bytes plain = random(2 * kBlocksPerGroup * kBs, 6);
  write("f", 0, plain);
  write("g", 0, random(2 * kBlocksPerGroup * kBs, 7));
  put("f", layout_.page_offset(1), get("g", layout_.page_offset(1), kMetaPageSize));
  SalvageReport r = salvage("f");
  EXPECT_EQ(r.pages_resealed, (std::vector<uint64_t>{1}));
  EXPECT_EQ(r.blocks_given_up.size(), kBlocksPerGroup);
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  Bytes expected = plain;
  std::fill(expected.begin() + kBlocksPerGroup * kBs, expected.end(), 0);
  EXPECT_EQ(*now, expected);
}

TEST_F(Salvage, AHeaderThatIsNotOneTakesTheFileIdOfTheOtherPages) {
  const Bytes plain = random(2 * kBlocksPerGroup * kBs, 8);
  write("f", 0, plain);
  put("f", 0, Bytes(kMetaPageSize, 0xee));
  ASSERT_FALSE(read("f").ok());
  SalvageReport r = salvage("f");
  EXPECT_EQ(r.pages_replaced, (std::vector<uint64_t>{0}));
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  Bytes expected = plain;
  std::fill(expected.begin(), expected.begin() + kBlocksPerGroup * kBs, 0);
  EXPECT_EQ(*now, expected);  // page 1 still opens its blocks: the id came from it
}

TEST_F(Salvage, AFileShorterThanItsHeaderBecomesEmpty) {
  write("f", 0, random(100, 9));
  ASSERT_EQ(truncate(path("f").c_str(), 1000), 0);
  ASSERT_FALSE(read("f").ok());
  SalvageReport r = salvage("f");
  EXPECT_TRUE(r.emptied);
  auto now = read("f");
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  EXPECT_TRUE(now->empty());
}

}  // namespace
}  // namespace envelopefs
