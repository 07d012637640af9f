// Micro-benchmarks of the per-block hot path, with raw OpenSSL AES-256-GCM measured in the same
// binary as the baseline. Prints the ratio full-path / raw GCM at the end (target: >= 0.5).
//   build/bench/hot_path_bench [--benchmark_min_time=1]
#include <benchmark/benchmark.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>

#include "crypto/aead_gcm.h"
#include "crypto/random.h"
#include "fs/block_codec.h"
#include "fs/cipher_file.h"
#include "fs/io_backend.h"
#include "keyhierarchy/volume_keys.h"

namespace envelopefs {
namespace {

constexpr size_t kBlock = 4096;

VolumeKeys& keys() {
  static OpenedVolume v = [] {
    auto dir = std::filesystem::temp_directory_path() / "envelopefs-bench";
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir / "cipher");
    CreateOptions o;
    o.root_uri = "file:" + (dir / "root.key").string();
    auto r = create_volume((dir / "cipher").string(), o);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().to_string().c_str());
      std::abort();
    }
    return std::move(r).value();
  }();
  return *v.keys;
}

void BM_RawGcmSeal4K(benchmark::State& state) {
  Bytes key(32, 1), iv(12, 0), pt(kBlock, 7), ct(kBlock);
  uint8_t tag[16];
  for (auto _ : state) {
    (void)gcm_seal(key, iv, {}, pt, ct.data(), tag);
    benchmark::DoNotOptimize(ct.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_RawGcmSeal4K);

void BM_RawGcmOpen4K(benchmark::State& state) {
  Bytes key(32, 1), iv(12, 0), pt(kBlock, 7), ct(kBlock), out(kBlock);
  uint8_t tag[16];
  (void)gcm_seal(key, iv, {}, pt, ct.data(), tag);
  for (auto _ : state) {
    (void)gcm_open(key, iv, {}, ct, tag, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_RawGcmOpen4K);

// Fresh random key, RFC 3394 wrap under the DEK, AAD, GCM seal: one block write's crypto.
void BM_FullPathSeal4K(benchmark::State& state) {
  VolumeKeys& k = keys();
  FileId file{};
  Bytes pt(kBlock, 7), ct(kBlock);
  Slot slot;
  uint64_t index = 0;
  for (auto _ : state) {
    (void)seal_block(k, file, index++, pt, ct.data(), &slot);
    benchmark::DoNotOptimize(ct.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_FullPathSeal4K);

// The same per block, for a 128 KiB request (32 blocks): keys drawn, wrapped and unwrapped
// 32 at a time, as the write and read paths do for multi-block requests.
void BM_FullPathSeal4K_Batch32(benchmark::State& state) {
  VolumeKeys& k = keys();
  FileId file{};
  constexpr size_t kCount = 32;
  Bytes pt(kCount * kBlock, 7), ct(kCount * kBlock);
  std::vector<Slot> slots(kCount);
  for (auto _ : state) {
    (void)seal_blocks(k, file, 0, kCount, kBlock, kBlock, pt.data(), ct.data(), slots.data());
    benchmark::DoNotOptimize(ct.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kCount * kBlock));
}
BENCHMARK(BM_FullPathSeal4K_Batch32);

void BM_FullPathOpen4K_Batch32(benchmark::State& state) {
  VolumeKeys& k = keys();
  FileId file{};
  constexpr size_t kCount = 32;
  Bytes pt(kCount * kBlock, 7), ct(kCount * kBlock), work(kCount * kBlock);
  std::vector<Slot> slots(kCount);
  (void)seal_blocks(k, file, 0, kCount, kBlock, kBlock, pt.data(), ct.data(), slots.data());
  std::vector<BlockToOpen> blocks(kCount);
  for (auto _ : state) {
    state.PauseTiming();
    work = ct;  // decryption is in place
    for (size_t i = 0; i < kCount; ++i) blocks[i] = {i, &slots[i], work.data() + i * kBlock, kBlock, Status()};
    state.ResumeTiming();
    open_blocks(k, file, blocks);
    if (!blocks[kCount - 1].result.ok()) state.SkipWithError("open failed");
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kCount * kBlock));
}
BENCHMARK(BM_FullPathOpen4K_Batch32);

// Unwrap the block key, GCM open: one block read's crypto.
void BM_FullPathOpen4K(benchmark::State& state) {
  VolumeKeys& k = keys();
  FileId file{};
  Bytes pt(kBlock, 7), ct(kBlock), out(kBlock);
  Slot slot;
  (void)seal_block(k, file, 5, pt, ct.data(), &slot);
  for (auto _ : state) {
    Status st = open_block(k, file, 5, slot, ct, out.data());
    if (!st.ok()) state.SkipWithError("open failed");
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_FullPathOpen4K);

void BM_KeyWrap32(benchmark::State& state) {
  VolumeKeys& k = keys();
  Bytes key(32, 3), out(40);
  for (auto _ : state) {
    (void)k.active().wrapper.wrap(key, out);
    benchmark::DoNotOptimize(out.data());
  }
}
BENCHMARK(BM_KeyWrap32);

void BM_RandomBlockKey(benchmark::State& state) {
  Bytes key(32);
  for (auto _ : state) {
    (void)random_block_key(key);
    benchmark::DoNotOptimize(key.data());
  }
}
BENCHMARK(BM_RandomBlockKey);

void BM_PageSeal(benchmark::State& state) {
  VolumeKeys& k = keys();
  MetaPage p = MetaPage::fresh(FileId{}, 0, 4096);
  for (auto _ : state) {
    (void)p.seal(k);
    benchmark::DoNotOptimize(p.data());
  }
}
BENCHMARK(BM_PageSeal);

// A FUSE WRITE of 4 KiB as the daemon does it, minus FUSE: CipherFile::write of one block into
// the page cache of the backing file (seal, page update and MAC, two pwrites), against one raw
// pwrite of the same size to the same kind of file. The difference is what envelopefs adds per
// 4 KiB write before the reply; a database log (4 KiB + fdatasync) pays it on every commit.
struct BackingFile {
  BackingFile() {
    path = (std::filesystem::temp_directory_path() / "envelopefs-bench" / "file").string();
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) std::abort();
  }
  ~BackingFile() {
    ::close(fd);
    ::unlink(path.c_str());
  }
  std::string path;
  int fd;
};

void BM_RawPwrite4K(benchmark::State& state) {
  BackingFile f;
  Bytes block(kBlock, 7);
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t off = (i++ % 4096) * kBlock;  // 16 MiB, written round and round
    if (pwrite(f.fd, block.data(), block.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(kBlock)) {
      state.SkipWithError("pwrite");
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_RawPwrite4K);

void BM_CipherFileWrite4K(benchmark::State& state) {
  BackingFile f;
  auto io = make_posix_backend();
  auto cf = CipherFile::create(f.fd, keys(), *io);
  if (!cf.ok()) std::abort();
  Bytes block(kBlock, 7);
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t off = (i++ % 4096) * kBlock;
    if (!(*cf)->write(off, block).ok()) state.SkipWithError("write");
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBlock));
}
BENCHMARK(BM_CipherFileWrite4K);

// Name encryption happens on every lookup, create, unlink and rename.
void BM_NameSeal(benchmark::State& state) {
  VolumeKeys& k = keys();
  std::array<uint8_t, 16> nonce{};
  for (auto _ : state) {
    auto r = k.names().seal(nonce, as_bytes("some-file-name.txt"));
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_NameSeal);

// Collects bytes/s per benchmark and prints the ratios the issue asks for.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      auto it = r.counters.find("bytes_per_second");
      if (it != r.counters.end()) rate_[r.benchmark_name()] = it->second.value;
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    auto ratio = [&](const char* full, const char* raw) {
      if (!rate_.count(full) || !rate_.count(raw)) return;
      std::printf("%-26s %8.1f MiB/s  = %.2f x raw GCM (%.1f MiB/s)\n", full, rate_[full] / 1048576,
                  rate_[full] / rate_[raw], rate_[raw] / 1048576);
    };
    std::printf("\nper-block crypto path vs raw AES-256-GCM on 4 KiB, one core:\n");
    ratio("BM_FullPathSeal4K", "BM_RawGcmSeal4K");
    ratio("BM_FullPathOpen4K", "BM_RawGcmOpen4K");
    ratio("BM_FullPathSeal4K_Batch32", "BM_RawGcmSeal4K");
    ratio("BM_FullPathOpen4K_Batch32", "BM_RawGcmOpen4K");
  }

 private:
  std::map<std::string, double> rate_;
};

}  // namespace
}  // namespace envelopefs

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  envelopefs::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
