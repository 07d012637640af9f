// The envelopefs command line: init, mount, unmount, status, fsck, rewrap, rotate-dek, drop-dek.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

#include "fs/block_rewrap.h"
#include "fs/fsck.h"
#include "fs/mount_table.h"
#include "fs/volume_lock.h"
#include "fs/mount.h"
#include "fs/names.h"
#include "keyhierarchy/audit_log.h"
#include "keyhierarchy/volume_keys.h"

#ifndef ENVELOPEFS_VERSION
#define ENVELOPEFS_VERSION "0.0.0"
#endif

namespace envelopefs {
namespace {

// One change of envelopefs.conf at a time (rewrap, rotate-dek, drop-dek): two would each write
// a config of their own, and the later one would drop what the earlier one did. A flock of the
// cipher dir, held until the returned descriptor is closed; -1 (said on stderr) if it is taken.
int lock_config_changes(const std::string& dir, const char* command) {
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    std::fprintf(stderr, "envelopefs %s: cannot open %s: %s\n", command, dir.c_str(), std::strerror(errno));
    return -1;
  }
  if (flock(dfd, LOCK_EX | LOCK_NB) != 0) {
    std::fprintf(stderr, "envelopefs %s: another rewrap, rotation or drop-dek of %s is running\n", command, dir.c_str());
    close(dfd);
    return -1;
  }
  return dfd;
}

int cmd_rewrap(const std::string& dir, const std::string& to, const ProviderOptions& current,
               const ProviderOptions& next) {
  int dfd = lock_config_changes(dir, "rewrap");
  if (dfd < 0) return 1;
  auto before = load_config(dir);
  auto after = before.ok() ? rewrap_root(dir, current, to, next) : Result<VolumeConfig>(before.status());
  close(dfd);
  if (!after.ok()) {
    AuditRecord r = audit_failure("rewrap", dir, after.status());
    if (before.ok()) {
      r.volume = to_hex(before->volume_id);
      r.root = before->root_uri;
    }
    r.detail += " (the new root would have been " + to + ")";
    audit(r);
    std::fprintf(stderr, "envelopefs rewrap: %s\nnothing was changed\n", after.status().to_string().c_str());
    return 1;
  }
  audit({"rewrap", "ok", to_hex(after->volume_id), dir, after->root_uri, "from " + before->root_uri});
  std::printf("re-wrapped %zu DEK version(s) and the name key of volume %s\n  old root: %s\n  new root: %s\n"
              "No data was re-encrypted. The old root is no longer needed by this volume, but copies\n"
              "of envelopefs.conf taken before now still need it to open.\n",
              after->deks.size(), to_hex(after->volume_id).c_str(), before->root_uri.c_str(),
              after->root_uri.c_str());
  return 0;
}

int cmd_rotate_dek(const std::string& dir, const ProviderOptions& po) {
  int dfd = lock_config_changes(dir, "rotate-dek");
  if (dfd < 0) return 1;
  auto after = rotate_dek(dir, po);
  close(dfd);
  if (!after.ok()) {
    AuditRecord r = audit_failure("rotate-dek", dir, after.status());
    audit(r);
    std::fprintf(stderr, "envelopefs rotate-dek: %s\nnothing was changed\n", after.status().to_string().c_str());
    return 1;
  }
  const uint32_t v = after->active_dek()->version;
  audit({"rotate-dek", "ok", to_hex(after->volume_id), dir, after->root_uri, "DEK v" + std::to_string(v) + " active"});
  std::printf("DEK v%u of volume %s is active; the older versions are retired and kept. New writes\n"
              "are sealed under v%u: at once for a new mount, within --key-check-interval for a running one.\n",
              v, to_hex(after->volume_id).c_str(), v);
  if (after->has_feature(kFeatureRewrappableBlocks)) {
    std::printf("The mount then re-wraps every block key under v%u in the background (metadata pages only;\n"
                "no data is re-encrypted); an unmounted volume does it at its next mount. The daemon log\n"
                "and the audit log say when it is done; `envelopefs fsck` counts block keys per version.\n",
                v);
  } else {
    std::printf("This volume predates re-wrappable block keys: each block keeps the DEK version it was\n"
                "sealed under until it is written again. No data was re-encrypted.\n");
  }
  return 0;
}

// A retired DEK version that no file of the volume uses any more leaves the config: the end
// of a rotation, once the mount's re-wrap (fs/block_rewrap.h) is done and no backup taken
// before it is still wanted. Proven unused by a scan of every metadata page, under the same
// lock as the change, so no rotation can come between.
int cmd_drop_dek(const std::string& dir, uint32_t version, bool yes, const ProviderOptions& po) {
  int dfd = lock_config_changes(dir, "drop-dek");
  if (dfd < 0) return 1;
  auto refuse = [&](const Status& st) {
    close(dfd);
    AuditRecord r = audit_failure("drop-dek", dir, st);
    r.detail = "DEK v" + std::to_string(version) + ": " + r.detail;
    audit(r);
    std::fprintf(stderr, "envelopefs drop-dek: %s\nnothing was changed\n", st.to_string().c_str());
    return 1;
  };
  auto volume = open_volume(dir, po);
  if (!volume.ok()) return refuse(volume.status());
  const VolumeConfig& c = volume->config;
  // Refused before the scan, which may take a while; drop_dek() checks again.
  if (Status st = check_droppable(c, version); !st.ok()) return refuse(st);
  int root = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) return refuse(Status::Io(errno, "open " + dir));
  FsckReport scan = scan_dek_use(*volume->keys, root, !isatty(STDERR_FILENO));
  close(root);
  if (scan.problems != 0) {
    return refuse(Status(Code::kCorrupt, std::to_string(scan.problems) +
                                             " files could not be scanned (listed above), so DEK v" +
                                             std::to_string(version) + " cannot be shown to be unused"));
  }
  const uint64_t keys = scan.keys_by_dek[version], pages = scan.pages_by_dek[version];
  if (keys != 0 || pages != 0) {
    // A record that says the re-wrap is done is wrong (an older build, a copy put back): gone,
    // so that the next mount walks again.
    if (rewrapped_version(dir) == c.active_dek()->version) unlink((dir + "/" + kRewrappedRecord).c_str());
    return refuse(Status(Code::kInvalidArgument,
                         "DEK v" + std::to_string(version) + " still wraps " + std::to_string(keys) +
                             " block keys and seals " + std::to_string(pages) +
                             " metadata pages of this volume; mount it and let its re-wrap finish "
                             "(`envelopefs status` says when), then try again"));
  }
  if (!yes) {
    close(dfd);
    audit({"drop-dek", "checked", to_hex(c.volume_id), dir, c.root_uri,
           "DEK v" + std::to_string(version) + " is unused; not dropped without --yes"});
    std::printf("No file of this volume uses DEK v%u (%lu files scanned). Dropping it is crypto-shredding:\n"
                "copies of this cipher dir taken before the re-wrap, opened with the config as it will be,\n"
                "lose every block still under v%u. Run again with --yes to drop it.\nnothing was changed\n",
                version, static_cast<unsigned long>(scan.files), version);
    return 1;
  }
  auto after = drop_dek(dir, po, version);
  if (!after.ok()) return refuse(after.status());
  close(dfd);
  const std::string what = "DEK v" + std::to_string(version) + " dropped; no file of the volume used it (" +
                           std::to_string(scan.files) + " files scanned)";
  audit({"drop-dek", "ok", to_hex(after->volume_id), dir, after->root_uri, what});
  std::printf("%s. A running mount keeps it in memory until it is unmounted.\n", what.c_str());
  return 0;
}

int cmd_init(const std::string& dir, const std::string& kms, uint32_t block_size, const ProviderOptions& po) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "envelopefs init: cannot create %s: %s\n", dir.c_str(), ec.message().c_str());
    return 1;
  }
  // The cipher dir's own entry must survive a power cut along with the config inside it.
  std::string parent = std::filesystem::absolute(dir).lexically_normal().parent_path().string();
  if (int pfd = open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); pfd >= 0) {
    fsync(pfd);
    close(pfd);
  }
  CreateOptions opt;
  opt.root_uri = kms;
  opt.block_size = block_size;
  opt.provider = po;
  auto v = create_volume(dir, opt);
  if (!v.ok()) {
    AuditRecord r = audit_failure("init", dir, v.status());
    r.root = kms;
    audit(r);
    std::fprintf(stderr, "envelopefs init: %s\n", v.status().to_string().c_str());
    return 1;
  }
  audit({"init", "ok", to_hex(v->config.volume_id), dir, v->config.root_uri, v->provider->describe()});
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  Status st = fd < 0 ? Status::Io(errno, "open " + dir) : create_dir_nonce(fd, nonce_store_of(v->config)).status();
  if (st.ok()) {
    // Made here so that a read-only mount, which makes nothing, finds it (fs/volume_lock.h).
    int lock = openat(fd, kVolumeLockName, O_CREAT | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (lock >= 0) close(lock);
  }
  // The root's nonce must outlive a power cut right after init, whatever happens next.
  if (st.ok() && fsync(fd) != 0) st = Status::Io(errno, "fsync " + dir);
  if (fd >= 0) close(fd);
  if (!st.ok()) {
    std::fprintf(stderr, "envelopefs init: %s\n", st.to_string().c_str());
    return 1;
  }
  std::printf("created envelopefs volume %s in %s\n  key provider: %s\n  block size: %u\n",
              to_hex(v->config.volume_id).c_str(), dir.c_str(), v->provider->describe().c_str(),
              v->config.block_size);
  return 0;
}

int cmd_status(std::string path, bool json) {
  path = resolve_path(path);
  std::string cipher = volume_mounted_at(path);
  if (cipher.empty()) cipher = path;
  // A mount whose daemon has gone is listed apart: it answers nothing until it is unmounted.
  std::vector<std::string> mounted_at, dead_mounts;
  for (const auto& m : envelopefs_mounts()) {
    if (m.source == cipher) (is_dead_mount(m.target) ? dead_mounts : mounted_at).push_back(m.target);
  }
  auto config = load_config(cipher);
  if (!config.ok()) {
    std::fprintf(stderr, "envelopefs status: %s\n", config.status().to_string().c_str());
    return 1;
  }
  const VolumeConfig& c = *config;
  nlohmann::json j = {{"cipher_dir", cipher},
                      {"volume_id", to_hex(c.volume_id)},
                      {"format_version", c.format_version},
                      {"features", c.features},
                      {"block_size", c.block_size},
                      {"key_provider", c.root_uri},
                      {"mounted_at", mounted_at},
                      {"dead_mounts", dead_mounts},
                      {"deks", nlohmann::json::array()}};
  // Where the block keys are (fs/block_rewrap.h): all under the active DEK once a walk is done.
  const uint32_t active = c.active_dek()->version;
  std::string block_keys;
  if (c.deks.size() < 2) {
    block_keys = "all under DEK v" + std::to_string(active) + " (never rotated)";
  } else if (!c.has_feature(kFeatureRewrappableBlocks)) {
    block_keys = "each under the DEK version it was written with (volume predates re-wrapping)";
  } else if (rewrapped_version(cipher) == active) {
    block_keys = "all under DEK v" + std::to_string(active) + " (re-wrapped after the last rotation)";
  } else {
    block_keys = "re-wrap under DEK v" + std::to_string(active) + " pending: a mount does it in the background";
  }
  j["block_keys"] = block_keys;
  for (const auto& d : c.deks) {
    j["deks"].push_back({{"version", d.version},
                         {"state", d.state == DekState::kActive ? "active" : "retired"},
                         {"created", d.created}});
  }
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::string features;
  for (const std::string& f : c.features) features += (features.empty() ? " (" : ", ") + f;
  if (!features.empty()) features += ")";
  std::printf("volume %s\n  cipher dir:   %s\n  format:       %u%s\n  block size:   %u\n  key provider: %s\n",
              to_hex(c.volume_id).c_str(), cipher.c_str(), c.format_version, features.c_str(), c.block_size,
              c.root_uri.c_str());
  for (const auto& d : c.deks) {
    std::printf("  DEK v%u:       %s (created %s)\n", d.version,
                d.state == DekState::kActive ? "active" : "retired", d.created.c_str());
  }
  std::printf("  block keys:   %s\n", block_keys.c_str());
  if (mounted_at.empty() && dead_mounts.empty()) std::printf("  mounted:      no\n");
  for (const auto& m : mounted_at) std::printf("  mounted at:   %s\n", m.c_str());
  for (const auto& m : dead_mounts) {
    std::printf("  dead mount:   %s (its daemon has gone; `envelopefs mount` of this volume there replaces it, "
                "`envelopefs unmount` clears it)\n",
                m.c_str());
  }
  return 0;
}

// A number in 0..max from an -o option (the range its flag has); -1 if it is not one (refused
// after parsing).
int number_or_invalid(const std::string& v, int max) {
  int n = -1;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  return ec == std::errc() && end == v.data() + v.size() && n >= 0 && n <= max ? n : -1;
}
constexpr int kMaxCheckInterval = 86400, kMaxUnreachableGrace = 864000, kMaxRewrapRate = 10000000;

// Splits "-o a,b=c" into the options we own and the ones passed to libfuse; options that
// mount(8) adds for its own use are dropped, so fstab entries work as written.
void split_options(const std::string& opts, MountOptions* mo) {
  static const std::set<std::string> kMountOnly = {"rw", "defaults", "auto", "noauto", "user",
                                                   "nouser", "users", "nofail", "_netdev", "dev",
                                                   "suid", "exec", "async", "relatime", "atime"};
  std::stringstream ss(opts);
  std::string o;
  std::vector<std::string> keep;
  while (std::getline(ss, o, ',')) {
    if (o.empty() || kMountOnly.count(o) || o.rfind("x-", 0) == 0 || o.rfind("comment=", 0) == 0) continue;
    if (o.rfind("passfile=", 0) == 0) mo->provider.passfile = o.substr(9);
    else if (o.rfind("log_file=", 0) == 0) mo->log_file = o.substr(9);
    else if (o == "no_uring") mo->use_uring = false;
    else if (o.rfind("fuse_transport=", 0) == 0) mo->fuse_transport = o.substr(15);
    else if (o == "no_writeback") mo->fs.writeback_cache = false;
    else if (o == "direct_backing") mo->fs.direct_backing = true;
    else if (o == "acl") mo->fs.posix_acls = true;
    else if (o == "allow_other") mo->allow_other = true;
    else if (o == "nonempty") mo->nonempty = true;
    else if (o.rfind("key_check_interval=", 0) == 0) mo->key_check_interval = number_or_invalid(o.substr(19), kMaxCheckInterval);
    else if (o.rfind("key_unreachable_grace=", 0) == 0) mo->key_unreachable_grace = number_or_invalid(o.substr(22), kMaxUnreachableGrace);
    else if (o.rfind("rewrap_rate=", 0) == 0) mo->rewrap_rate = number_or_invalid(o.substr(12), kMaxRewrapRate);
    else keep.push_back(o);
  }
  for (size_t i = 0; i < keep.size(); ++i) mo->fuse_options += (i ? "," : "") + keep[i];
  mo->read_only = std::find(keep.begin(), keep.end(), "ro") != keep.end();  // passed on to the kernel too
}

}  // namespace
}  // namespace envelopefs

int main(int argc, char** argv) {
  using namespace envelopefs;
  // `envelopefs CIPHERDIR MOUNTPOINT -o OPTS`, the form mount.fuse3 uses for fuse.envelopefs.
  static const std::set<std::string> kCommands = {"init",   "mount", "unmount", "umount",
                                                  "status", "fsck",  "rewrap",  "rotate-dek", "drop-dek"};
  std::vector<std::string> args(argv, argv + argc);
  if (args.size() >= 3 && args[1][0] != '-' && !kCommands.count(args[1])) {
    args.insert(args.begin() + 1, "mount");
  }

  CLI::App app{"envelopefs: a transparent encrypting filesystem with envelope encryption.\n"
               "Every block has its own key, wrapped by a versioned volume key, wrapped by a root key\n"
               "held by a key provider (default: a local key file)."};
  app.set_version_flag("--version", std::string("envelopefs ") + ENVELOPEFS_VERSION + " (" + ENVELOPEFS_BUILD_TYPE + " build)");
  app.require_subcommand(1);

  ProviderOptions po;
  std::string dir, mountpoint, kms, opts;
  uint32_t block_size = 4096;
  bool json = false, quiet = false;
  MountOptions mo;

  auto* init = app.add_subcommand("init", "create a new volume in an empty (or new) directory");
  init->add_option("--kms", kms,
                   "root key provider URI: file:/ABSOLUTE/PATH, pass:[?ops=N&mem-kib=N],\n"
                   "pkcs11:token=T;object=K?module-path=M&pin-source=file:P (RFC 7512; the key is\n"
                   "generated on the token if absent), or\n"
                   "kmip://HOST:PORT/?name=K&ca=CA.pem&cert=CLIENT.pem&key=CLIENT.key (created if absent),\n"
                   "or exec:/ABSOLUTE/PATH[?ARG] (a program that wraps and unwraps; see envelopefs(1))\n"
                   "(default: file:" + default_root_key_path() + ", created if absent)");
  init->add_option("--block-size", block_size, "plaintext block size: 4096 (default) to 65536, a power of two");
  init->add_option("--passfile", po.passfile, "pass: passphrase / pkcs11: PIN file (first line)");
  init->add_option("CIPHERDIR", dir, "where the encrypted files will live")->required();

  auto* mount = app.add_subcommand("mount", "mount a volume; returns once the mount is ready");
  mount->add_flag("-f,--foreground", mo.foreground, "stay in the foreground (log to stderr)");
  mount->add_flag("--allow-other", mo.allow_other, "let other users (e.g. postgres) use the mount");
  mount->add_flag("--nonempty", mo.nonempty,
                  "mount over a directory that has entries (they are plaintext, and hidden while\n"
                  "mounted); without it such a mountpoint is refused");
  mount->add_option("-o", opts, "mount options, comma-separated: FUSE/kernel options (ro, noatime,\n"
                                "allow_other, ...) and envelopefs ones: passfile=F, log_file=F,\n"
                                "nonempty, no_uring, no_writeback, direct_backing, acl,\n"
                                "fuse_transport=T, key_check_interval=N, key_unreachable_grace=N,\n"
                                "rewrap_rate=N");
  mount->add_option("--passfile", mo.provider.passfile, "pass: passphrase / pkcs11: PIN file (first line)");
  mount->add_option("--log-file", mo.log_file, "append the daemon's log here (default: syslog)");
  mount->add_flag("--no-uring", [&](int64_t) { mo.use_uring = false; }, "--direct-backing I/O with pread/pwrite instead of io_uring");
  mount->add_flag("--no-writeback", [&](int64_t) { mo.fs.writeback_cache = false; },
                  "disable the kernel writeback cache");
  mount->add_flag("--acl", mo.fs.posix_acls,
                  "POSIX ACLs, kept as the backing filesystem's own (the daemon must be root and\n"
                  "the backing filesystem have them); then every path lookup through the mount's\n"
                  "root by a user other than its owner costs one more round trip");
  mount->add_flag("--direct-backing", mo.fs.direct_backing,
                  "backing I/O with O_DIRECT: plaintext is not cached twice (page cache holds\n"
                  "only the plaintext); where the backing filesystem refuses O_DIRECT I/O (tried\n"
                  "at mount), says so and uses its page cache");
  mount->add_option("--fuse-transport", mo.fuse_transport,
                    "how the kernel hands requests to the daemon: dev (default, /dev/fuse) or\n"
                    "io_uring (Linux 6.14+: per-CPU queues, faster on many small files, slower on\n"
                    "bulk data; as root, switches /sys/module/fuse/parameters/enable_uring on)")
      ->check(CLI::IsMember({"io_uring", "dev"}));
  mount->add_option("--threads", mo.threads,
                    "FUSE worker threads (default 8; with io_uring, spread over one queue per CPU,\n"
                    "at least 2 per CPU)")
      ->check(CLI::Range(1, 256));
  mount->add_option("--key-check-interval", mo.key_check_interval,
                    "ask the root key provider again every N seconds (default 60, 0: never); when it\n"
                    "refuses, the keys are zeroized and every request fails with EKEYREVOKED until\n"
                    "it answers again (not for pass: volumes)")
      ->check(CLI::Range(0, kMaxCheckInterval));
  mount->add_option("--key-unreachable-grace", mo.key_unreachable_grace,
                    "how long a root key provider that cannot be reached is trusted (default 300 s)")
      ->check(CLI::Range(0, kMaxUnreachableGrace));
  mount->add_option("--rewrap-rate", mo.rewrap_rate,
                    "after a DEK rotation, re-wrap block keys reading at most N metadata pages a second\n"
                    "(one page describes 31 blocks; default 0: as fast as the disk allows)")
      ->check(CLI::Range(0, kMaxRewrapRate));
  mount->add_option("CIPHERDIR", mo.cipher_dir, "the volume")->required();
  mount->add_option("MOUNTPOINT", mo.mountpoint, "an existing, empty directory (see --nonempty)")->required();

  auto* unmount = app.add_subcommand("unmount", "unmount a mounted volume (keys are zeroized)");
  unmount->alias("umount");
  unmount->add_option("MOUNTPOINT", mountpoint, "where the volume is mounted")->required();
  bool lazy = false;
  unmount->add_flag("-l,--lazy", lazy,
                    "detach the mount now, even with files open on it: they keep working, and the\n"
                    "daemon writes back, zeroizes the keys and exits once the last one is closed");

  auto* status = app.add_subcommand("status", "describe a volume (never prints key material)");
  status->add_flag("--json", json, "machine-readable output");
  status->add_option("PATH", dir, "a cipher dir or a mountpoint")->required();

  std::string rewrap_to;
  ProviderOptions next_po;
  auto* rewrap = app.add_subcommand(
      "rewrap", "re-wrap the volume's keys under another root key (rotation, or a move to another\n"
                "provider); no data is re-encrypted, and a mounted volume keeps running");
  rewrap->add_option("--to", rewrap_to, "the new root key provider URI (as for init --kms)")->required();
  rewrap->add_option("--passfile", po.passfile, "the current root's passphrase / PIN file");
  rewrap->add_option("--new-passfile", next_po.passfile, "the new root's passphrase / PIN file");
  rewrap->add_option("CIPHERDIR", dir, "the volume's cipher dir")->required();

  auto* rotate = app.add_subcommand(
      "rotate-dek", "make a new DEK version the active one: new writes are sealed under it, and the\n"
                    "mount re-wraps every existing block key under it in the background (metadata\n"
                    "pages only); no data is re-encrypted; older versions are kept (see drop-dek)");
  rotate->add_option("--passfile", po.passfile, "the root's passphrase / PIN file");
  rotate->add_option("CIPHERDIR", dir, "the volume's cipher dir")->required();

  uint32_t drop_version = 0;
  bool yes = false;
  bool repair = false;
  auto* drop = app.add_subcommand(
      "drop-dek", "remove a retired DEK version that no file uses any more (after rotate-dek and the\n"
                  "mount's re-wrap); copies of the cipher dir taken before then lose what it still wraps");
  drop->add_option("--version", drop_version, "the DEK version to drop (see status)")->required();
  drop->add_flag("--yes", yes, "really drop it (without: only check that it is unused)");
  drop->add_option("--passfile", po.passfile, "the root's passphrase / PIN file");
  drop->add_option("CIPHERDIR", dir, "the volume's cipher dir")->required();

  auto* fsck = app.add_subcommand("fsck", "check every name and block; exit 0 clean, 1 problems, 2 error");
  fsck->add_option("--passfile", po.passfile, "pass: passphrase / pkcs11: PIN file (first line)");
  fsck->add_flag("-q,--quiet", quiet, "no progress output");
  fsck->add_flag("--repair", repair,
                 "make damaged files readable again (volume unmounted): a block that does not\n"
                 "authenticate becomes a hole (reads as zeros), a torn metadata page is sealed\n"
                 "again keeping the blocks that authenticate; then checks again (exit 0: clean)");
  fsck->add_option("CIPHERDIR", dir, "the volume's cipher dir")->required();

  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  try {
    app.parse(static_cast<int>(cargv.size()), cargv.data());
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every usage error 2, as the -o checks below (CLI11's own
    // codes are 100 and up).
    return app.exit(e) == 0 ? 0 : 2;
  }

  if (*init) return cmd_init(dir, kms, block_size, po);
  if (*mount) {
    split_options(opts, &mo);
    if (mo.fuse_transport != "io_uring" && mo.fuse_transport != "dev") {
      std::fprintf(stderr, "envelopefs: fuse_transport=%s: expected dev or io_uring\n", mo.fuse_transport.c_str());
      return 2;
    }
    if (mo.key_check_interval < 0 || mo.key_unreachable_grace < 0) {
      std::fprintf(stderr, "envelopefs: key_check_interval= takes 0..%d seconds, key_unreachable_grace= 0..%d\n",
                   kMaxCheckInterval, kMaxUnreachableGrace);
      return 2;
    }
    if (mo.rewrap_rate < 0) {
      std::fprintf(stderr, "envelopefs: rewrap_rate= takes 0..%d pages a second\n", kMaxRewrapRate);
      return 2;
    }
    return run_mount(mo);
  }
  if (*unmount) return run_unmount(mountpoint, lazy);
  if (*status) return cmd_status(dir, json);
  if (*fsck) return run_fsck(dir, po, quiet, repair);
  if (*rewrap) return cmd_rewrap(dir, rewrap_to, po, next_po);
  if (*rotate) return cmd_rotate_dek(dir, po);
  if (*drop) return cmd_drop_dek(dir, drop_version, yes, po);
  return 1;
}
