// fs/inode_table.h: the descriptor budget, on real backing files in a temporary directory.
#include "fs/inode_table.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/test_util.h"

namespace envelopefs {
namespace {

// Descriptors this process has open.
size_t open_descriptors() {
  size_t n = 0;
  DIR* d = opendir("/proc/self/fd");
  while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n - 1;  // the DIR's own
}

// "f<n>". (Not "f" + std::to_string(n): GCC 12 warns about that concatenation, -Wrestrict,
// a false positive.)
std::string file_name(int n) {
  std::string s = std::to_string(n);
  s.insert(s.begin(), 'f');
  return s;
}

class InodeTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_fd_ = open(dir_.path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(root_fd_, 0);
    table_ = std::make_unique<InodeTable>(root_fd_);  // owns root_fd_
    std::string why;
    if (!table_->limit_descriptors(kBudget, &why)) GTEST_SKIP() << "no budget here: " << why;
  }

  // Creates backing file `name` and adopts it, as a LOOKUP would.
  std::shared_ptr<Inode> make(const std::string& name) {
    test::spit(dir_.sub(name), name);
    int fd = openat(root_fd_, name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    struct stat st;
    EXPECT_EQ(fstat(fd, &st), 0);
    return table_->adopt(fd, st, 1);  // the root directory is its parent
  }

  // The content of the node behind an inode's descriptor.
  std::string read_through(Inode& i) {
    auto p = table_->path(i);
    if (!p.ok()) return "error: " + p.status().to_string();
    return test::slurp("/proc/self/fd/" + std::to_string((*p)->fd));
  }

  static constexpr size_t kBudget = 64;
  test::TempDir dir_;
  int root_fd_ = -1;
  std::unique_ptr<InodeTable> table_;
};

TEST_F(InodeTableTest, KeepsToTheBudgetAndReopensWhatItClosed) {
  const size_t before = open_descriptors();
  std::vector<std::shared_ptr<Inode>> inodes;
  for (int n = 0; n < 1000; ++n) {
    inodes.push_back(make(file_name(n)));
    (void)table_->get(inodes.back()->id);  // a request: trims when over the budget
  }
  EXPECT_LE(table_->descriptors(), kBudget + 1);
  EXPECT_LE(open_descriptors(), before + kBudget + 1);
  // Every inode still reaches its own file, most of them through a reopened descriptor.
  for (int n = 0; n < 1000; n += 7) EXPECT_EQ(read_through(*inodes[n]), file_name(n));
  EXPECT_GT(table_->reopened(), 100u);
  for (auto& i : inodes) (void)table_->get(i->id);
  EXPECT_LE(table_->descriptors(), kBudget + 2);
}

TEST_F(InodeTableTest, OpenFilesAndRecentlyUsedInodesKeepTheirDescriptors) {
  auto open = make("open");
  {
    std::lock_guard lock(open->mu);
    open->open = std::make_shared<OpenFile>();
  }
  auto hot = make("hot");
  std::vector<std::shared_ptr<Inode>> cold;
  for (int n = 0; n < 300; ++n) cold.push_back(make(file_name(n)));
  // Every cold inode in turn is used once (and opened again), so the clock goes round the
  // table many times; `hot` is used between every two of its passes.
  // Used twice: once to open it again if the cold ones' creation pushed it out (a node
  // opened again is marked used only by its next use).
  (void)table_->path(*hot);
  (void)table_->path(*hot);
  int hot_closed = 0;
  for (int round = 0; round < 3; ++round) {
    for (auto& c : cold) {
      ASSERT_TRUE(table_->path(*c).ok());
      (void)table_->get(c->id);
      {
        std::lock_guard lock(hot->path_mu);
        hot_closed += hot->path == nullptr;
      }
      (void)table_->path(*hot);
    }
  }
  EXPECT_GT(table_->reopened(), 500u) << "the clock never went round";
  EXPECT_EQ(hot_closed, 0) << "the descriptor of an inode in use was closed";
  std::lock_guard lock(open->path_mu);
  EXPECT_NE(open->path, nullptr) << "the descriptor of an open file was closed";
}

TEST_F(InodeTableTest, ARemovedNodeKeepsItsDescriptor) {
  auto gone = make("gone");
  for (int n = 0; n < 500; ++n) (void)table_->get(make(file_name(n))->id);
  // Its last link goes: the handle would open nothing afterwards.
  table_->keep_before_removal(root_fd_, "gone");
  ASSERT_EQ(unlinkat(root_fd_, "gone", 0), 0);
  for (int n = 500; n < 1000; ++n) (void)table_->get(make(file_name(n))->id);
  EXPECT_EQ(read_through(*gone), "gone");
}

TEST_F(InodeTableTest, ANodeGoneBehindTheTablesBackIsStale) {
  auto gone = make("gone");
  for (int n = 0; n < 500; ++n) (void)table_->get(make(file_name(n))->id);
  {
    std::lock_guard lock(gone->path_mu);
    ASSERT_EQ(gone->path, nullptr) << "expected the clock to have closed it by now";
  }
  ASSERT_EQ(unlinkat(root_fd_, "gone", 0), 0);  // not through the mount: no keep_before_removal
  auto p = table_->path(*gone);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().sys_errno(), ESTALE);
}

TEST_F(InodeTableTest, ForgottenInodesAreNotCounted) {
  std::vector<uint64_t> ids;
  for (int n = 0; n < 40; ++n) ids.push_back(make(file_name(n))->id);
  EXPECT_EQ(table_->descriptors(), 41u);  // and the root's
  for (uint64_t id : ids) table_->forget(id, 1);
  EXPECT_EQ(table_->descriptors(), 1u);
  EXPECT_EQ(table_->size(), 1u);
}

}  // namespace
}  // namespace envelopefs
