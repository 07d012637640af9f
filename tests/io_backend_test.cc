// fs/io_backend.h implementations on their own: ordered batches land where they were asked to,
// on both backends, and a write cut short part-way is continued and its failure reported.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

INSTANTIATE_TEST_SUITE_P(BothBackends, OrderedWrites, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) { return p.param ? "io_uring" : "posix"; });

}  // namespace
}  // namespace envelopefs
