// rocks_acker: RocksDB's side of the database crash tests (tests/integration/test_db_crash.py,
// test_power_loss.py). Test tool only; not part of envelopefs.
//
//   rocks_acker write DB [direct]   commits numbered records and prints each number once its
//                                   synchronous write has returned; continues from the last
//                                   number the database holds; runs until killed or an error
//   rocks_acker check DB [direct]   opens DB (RocksDB replays its WAL), verifies every table
//                                   file's checksums, and prints the highest number after
//                                   checking that records 1..N are all there, each with its
//                                   exact value, and that the counter written with them is N
//
// Each commit is one WriteBatch of the record and the counter, written with sync=true: the
// counter must always equal the number of records (a batch is all or nothing), and a number
// printed must survive any crash. A small memtable makes flushes, compactions, MANIFEST
// updates and file deletions happen every few hundred commits, so a crash lands among them.
// `direct`: table files are read and written with O_DIRECT.
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

namespace {

std::string key_of(uint64_t n) {
  char k[24];
  std::snprintf(k, sizeof k, "r%012llu", static_cast<unsigned long long>(n));
  return k;
}

// 100 to 3,099 bytes that depend on n and on their position: a block from another record, or
// one out of place, reads as wrong.
std::string value_of(uint64_t n) {
  std::string v(100 + n % 3000, '\0');
  uint64_t x = n * 0x9E3779B97F4A7C15ull + 1;
  for (char& c : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    c = static_cast<char>(x);
  }
  return v;
}

int fail(const char* what, const rocksdb::Status& s) {
  std::fprintf(stderr, "rocks_acker: %s: %s\n", what, s.ToString().c_str());
  return 1;
}

std::unique_ptr<rocksdb::DB> open_db(const std::string& path, bool direct, rocksdb::Status* st) {
  rocksdb::Options o;
  o.create_if_missing = true;
  o.write_buffer_size = 256 << 10;
  o.target_file_size_base = 512 << 10;
  o.max_bytes_for_level_base = 2 << 20;
  o.level0_file_num_compaction_trigger = 2;
  o.use_direct_reads = direct;
  o.use_direct_io_for_flush_and_compaction = direct;
  o.paranoid_checks = true;
  rocksdb::DB* db = nullptr;
  *st = rocksdb::DB::Open(o, path, &db);
  return std::unique_ptr<rocksdb::DB>(db);
}

uint64_t counter(rocksdb::DB& db, rocksdb::Status* st) {
  std::string v;
  *st = db.Get(rocksdb::ReadOptions(), "counter", &v);
  if (st->IsNotFound()) {
    *st = rocksdb::Status::OK();
    return 0;
  }
  if (!st->ok()) return 0;
  char* end = nullptr;
  const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0') *st = rocksdb::Status::Corruption("the counter is not a number: " + v);
  return n;
}

int commit_until_stopped(rocksdb::DB& db) {
  rocksdb::Status st;
  uint64_t n = counter(db, &st);
  if (!st.ok()) return fail("reading the counter", st);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  for (;;) {
    ++n;
    rocksdb::WriteBatch batch;
    batch.Put(key_of(n), value_of(n));
    batch.Put("counter", std::to_string(n));
    st = db.Write(wo, &batch);
    if (!st.ok()) return fail(("commit " + std::to_string(n)).c_str(), st);
    std::printf("%llu\n", static_cast<unsigned long long>(n));
    std::fflush(stdout);
  }
}

int check_records(rocksdb::DB& db) {
  rocksdb::Status st = db.VerifyChecksum();
  if (!st.ok()) return fail("verifying checksums", st);
  const uint64_t count = counter(db, &st);
  if (!st.ok()) return fail("reading the counter", st);
  std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(rocksdb::ReadOptions()));
  uint64_t n = 0;
  for (it->Seek("r"); it->Valid() && it->key().starts_with("r"); it->Next()) {
    ++n;
    if (it->key().ToString() != key_of(n)) {
      std::fprintf(stderr, "rocks_acker: record %llu missing (next is %s)\n",
                   static_cast<unsigned long long>(n), it->key().ToString().c_str());
      return 1;
    }
    if (it->value().ToString() != value_of(n)) {
      std::fprintf(stderr, "rocks_acker: record %llu has the wrong value\n",
                   static_cast<unsigned long long>(n));
      return 1;
    }
  }
  if (!it->status().ok()) return fail("iterating", it->status());
  if (n != count) {
    std::fprintf(stderr, "rocks_acker: %llu records but the counter says %llu (a batch half applied)\n",
                 static_cast<unsigned long long>(n), static_cast<unsigned long long>(count));
    return 1;
  }
  std::printf("%llu\n", static_cast<unsigned long long>(n));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4 || (std::strcmp(argv[1], "write") != 0 && std::strcmp(argv[1], "check") != 0) ||
      (argc == 4 && std::strcmp(argv[3], "direct") != 0)) {
    std::fprintf(stderr, "usage: rocks_acker write|check DB [direct]\n");
    return 2;
  }
  rocksdb::Status st;
  auto db = open_db(argv[2], argc == 4, &st);
  if (!st.ok()) return fail("opening the database", st);
  return std::strcmp(argv[1], "write") == 0 ? commit_until_stopped(*db) : check_records(*db);
}
