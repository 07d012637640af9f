// fs/io_backend.h implementations on their own, both backends: ordered batches land where they
// were asked to, a write cut short part-way is continued and its failure reported, and the
// reads of a batch (gathered into spans by the posix backend) each fill their own buffer.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "fs/io_backend.h"
#include "tests/test_util.h"

namespace envelopefs {
namespace {

using test::TempDir;

constexpr size_t kPage = 4096;
constexpr uint64_t kGroup = 131072;  // a group of 4 KiB blocks: one page and 31 blocks

std::unique_ptr<IoBackend> backend(bool uring) {
  std::unique_ptr<IoBackend> b = uring ? make_uring_backend(nullptr) : make_posix_backend();
  return b ? std::move(b) : make_posix_backend();
}

std::string backend_name(const ::testing::TestParamInfo<bool>& p) { return p.param ? "io_uring" : "posix"; }

Bytes filled(size_t n, uint8_t v) { return Bytes(n, v); }

IoRequest write_of(int fd, Bytes& b, uint64_t offset) { return {fd, b.data(), b.size(), offset, true, 0}; }

Bytes read_back(int fd, uint64_t offset, size_t n) {
  Bytes out(n);
  EXPECT_EQ(pread(fd, out.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
  return out;
}

class OrderedWrites : public ::testing::TestWithParam<bool> {};

// Pages with and without a data run right behind them, and a data run behind no page: a
// backend that pairs page and data (posix_backend.cc) must neither lose nor misplace either.
TEST_P(OrderedWrites, EveryPageAndDataRunLandsWhereAsked) {
  TempDir dir;
  int fd = ::open(dir.sub("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  auto io = backend(GetParam());
  Bytes p0 = filled(kPage, 0xA0), p1 = filled(kPage, 0xA1), p2 = filled(kPage, 0xA2);
  Bytes d0 = filled(5000, 0xD0);           // right behind page 0, a short last block
  Bytes d1 = filled(2 * kPage, 0xD1);      // right behind page 1
  Bytes d2 = filled(kPage, 0xD2);          // in group 2, one block past its page
  Bytes d3 = filled(kPage, 0xD3);          // in group 3, whose page is not in this batch
  IoRequest pages[] = {write_of(fd, p0, 0), write_of(fd, p1, kGroup), write_of(fd, p2, 2 * kGroup)};
  IoRequest data[] = {write_of(fd, d1, kGroup + kPage), write_of(fd, d0, kPage),
                      write_of(fd, d2, 2 * kGroup + 2 * kPage), write_of(fd, d3, 3 * kGroup + kPage)};
  Status st = io->run_ordered(pages, data);
  ASSERT_TRUE(st.ok()) << st.to_string();
  for (const IoRequest& r : pages) EXPECT_EQ(r.done, r.len);
  for (const IoRequest& r : data) EXPECT_EQ(r.done, r.len);
  EXPECT_EQ(read_back(fd, 0, kPage), p0);
  EXPECT_EQ(read_back(fd, kPage, d0.size()), d0);
  EXPECT_EQ(read_back(fd, kGroup, kPage), p1);
  EXPECT_EQ(read_back(fd, kGroup + kPage, d1.size()), d1);
  EXPECT_EQ(read_back(fd, 2 * kGroup, kPage), p2);
  EXPECT_EQ(read_back(fd, 2 * kGroup + kPage, kPage), filled(kPage, 0));  // the gap stays a hole
  EXPECT_EQ(read_back(fd, 2 * kGroup + 2 * kPage, kPage), d2);
  EXPECT_EQ(read_back(fd, 3 * kGroup + kPage, kPage), d3);
  close(fd);
}

// RLIMIT_FSIZE cuts the paired write of page and data 100 bytes into the data: the backend
// must continue it (the rest then fails with EFBIG), report the failure, and say how far each
// request got, with the page complete before any data.
TEST_P(OrderedWrites, AWriteCutShortIsContinuedAndItsFailureReported) {
  TempDir dir;
  int fd = ::open(dir.sub("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  auto io = backend(GetParam());
  Bytes page = filled(kPage, 0xA0), data = filled(2 * kPage, 0xD0);
  IoRequest pages[] = {write_of(fd, page, 0)};
  IoRequest datas[] = {write_of(fd, data, kPage)};
  struct sigaction ignore {}, old {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &old), 0);
  rlimit saved{}, limit{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  limit = {kPage + 100, saved.rlim_max};
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  Status st = io->run_ordered(pages, datas);
  setrlimit(RLIMIT_FSIZE, &saved);
  sigaction(SIGXFSZ, &old, nullptr);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.sys_errno(), EFBIG) << st.to_string();
  EXPECT_EQ(pages[0].done, kPage);
  EXPECT_EQ(datas[0].done, 100u);
  struct stat s;
  ASSERT_EQ(fstat(fd, &s), 0);
  EXPECT_EQ(s.st_size, static_cast<off_t>(kPage + 100));
  EXPECT_EQ(read_back(fd, 0, kPage), page);
  close(fd);
}

class BatchedReads : public ::testing::TestWithParam<bool> {};

// Byte i of file `seed`: differs between neighbouring offsets, pages and files, so a read
// filled from the wrong place (or the wrong file) shows.
uint8_t pattern(uint64_t i, uint8_t seed) { return static_cast<uint8_t>(i * 7 + i / kPage * 13 + seed); }

int make_patterned(const TempDir& dir, const char* name, uint64_t size, uint8_t seed) {
  int fd = ::open(dir.sub(name).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  EXPECT_GE(fd, 0);
  Bytes all(size);
  for (uint64_t i = 0; i < size; ++i) all[i] = pattern(i, seed);
  EXPECT_EQ(pwrite(fd, all.data(), size, 0), static_cast<ssize_t>(size));
  return fd;
}

// A read's buffer with 64 guard bytes behind it: nothing may land past what was asked for.
struct Target {
  Bytes buf;
  explicit Target(size_t len) : buf(len + 64, 0xEE) {}
  IoRequest at(int fd, uint64_t offset) { return {fd, buf.data(), buf.size() - 64, offset, false, 0}; }
};

void expect_filled(const Target& t, const IoRequest& r, size_t want_done, uint8_t seed) {
  ASSERT_EQ(r.done, want_done) << "read at " << r.offset;
  for (size_t i = 0; i < r.done; ++i) {
    ASSERT_EQ(t.buf[i], pattern(r.offset + i, seed)) << "read at " << r.offset << ", byte " << i;
  }
  for (size_t i = r.len; i < t.buf.size(); ++i) ASSERT_EQ(t.buf[i], 0xEE) << "past the read at " << r.offset;
}

// What a READ asks of the backend: data runs with metadata pages between them (some pages
// read too, some not), out of offset order, one run far away, one across the end of the file
// and one past it. The posix backend reads runs a page apart as one preadv through the gap.
TEST_P(BatchedReads, EachReadIsFilledFromItsOwnOffset) {
  TempDir dir;
  const uint64_t size = 4 * kGroup + 1000;
  int fd = make_patterned(dir, "f", size, 1);
  auto io = backend(GetParam());
  Target run0(31 * kPage), run1(10 * kPage), page2(kPage), run2(31 * kPage), far(3 * kPage),
      tail(kPage), beyond(100);
  IoRequest reqs[] = {run1.at(fd, kGroup + kPage),  page2.at(fd, 2 * kGroup), tail.at(fd, size - 500),
                      run0.at(fd, kPage),           run2.at(fd, 2 * kGroup + kPage),
                      far.at(fd, 3 * kGroup + 5 * kPage), beyond.at(fd, size + 2 * kPage)};
  Status st = io->run(reqs);
  ASSERT_TRUE(st.ok()) << st.to_string();
  expect_filled(run1, reqs[0], 10 * kPage, 1);
  expect_filled(page2, reqs[1], kPage, 1);
  expect_filled(tail, reqs[2], 500, 1);
  expect_filled(run0, reqs[3], 31 * kPage, 1);
  expect_filled(run2, reqs[4], 31 * kPage, 1);
  expect_filled(far, reqs[5], 3 * kPage, 1);
  expect_filled(beyond, reqs[6], 0, 1);
  close(fd);
}

// Reads of two files, interleaved in the batch, b's following a's in offset: never one span.
TEST_P(BatchedReads, ReadsOfDifferentFilesStayApart) {
  TempDir dir;
  int a = make_patterned(dir, "a", 2 * kGroup, 1), b = make_patterned(dir, "b", 2 * kGroup, 2);
  auto io = backend(GetParam());
  Target a0(kPage), b0(kPage), a1(kPage), b1(kPage);
  IoRequest reqs[] = {a0.at(a, 0), b0.at(b, 3 * kPage), a1.at(a, 2 * kPage), b1.at(b, 5 * kPage)};
  Status st = io->run(reqs);
  ASSERT_TRUE(st.ok()) << st.to_string();
  expect_filled(a0, reqs[0], kPage, 1);
  expect_filled(b0, reqs[1], kPage, 2);
  expect_filled(a1, reqs[2], kPage, 1);
  expect_filled(b1, reqs[3], kPage, 2);
  close(a);
  close(b);
}

INSTANTIATE_TEST_SUITE_P(BothBackends, BatchedReads, ::testing::Bool(), backend_name);

INSTANTIATE_TEST_SUITE_P(BothBackends, OrderedWrites, ::testing::Bool(), backend_name);

}  // namespace
}  // namespace envelopefs
