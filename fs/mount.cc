#include "fs/mount.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include "fs/fuse_channel.h"
#include "fs/fuse_ops.h"
#include "fs/fuse_ring.h"
#include "fs/block_rewrap.h"
#include "fs/key_watch.h"
#include "fs/log.h"
#include "fs/mount_table.h"
#include "fs/volume_lock.h"

namespace envelopefs {
namespace {

// Tells the waiting parent how the start-up went: "OK" or an error message.
class ReadyPipe {
 public:
  explicit ReadyPipe(int fd) : fd_(fd) {}
  void send(const std::string& msg) {
    if (fd_ < 0) return;
    (void)!write(fd_, msg.data(), msg.size());
    close(fd_);
    fd_ = -1;
  }
  ~ReadyPipe() { send("envelopefs: the daemon stopped before the mount was ready"); }

 private:
  int fd_;
};

int fail(ReadyPipe& ready, bool foreground, const std::string& msg) {
  if (foreground) std::fprintf(stderr, "envelopefs: %s\n", msg.c_str());
  ready.send("envelopefs: " + msg);
  return 1;
}

// A warning before the mount is ready: logged, and on the terminal of whoever ran `mount`
// unless it goes to their log file (in the foreground the log is that terminal already).
void warn_before_ready(const MountOptions& o, const std::string& why) {
  log_error(why);
  if (o.log_file.empty() && !o.foreground) std::fprintf(stderr, "envelopefs: %s\n", why.c_str());
}

// The kernel starts a FUSE mount's readahead at 128 KiB and only ever lowers it at INIT, so
// the 1 MiB we ask for in op_init needs the bdi's knob raised first (root only; best effort).
// The device comes from mountinfo: a stat() of the mountpoint would wait for INIT, which only
// the session loop we have not started yet can answer.
void raise_readahead(const std::string& mountpoint, unsigned kib) {
  std::ifstream info("/proc/self/mountinfo");
  std::string line, dev;
  while (std::getline(info, line)) {
    std::istringstream ls(line);
    std::string id, parent, majmin, root, target;
    ls >> id >> parent >> majmin >> root >> target;
    if (target == mountpoint && line.find(" - fuse.envelopefs ") != std::string::npos) dev = majmin;
  }
  if (dev.empty()) return;
  int fd = open(("/sys/class/bdi/" + dev + "/read_ahead_kb").c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  std::string v = std::to_string(kib);
  (void)!write(fd, v.data(), v.size());
  close(fd);
}

// For --fuse-transport io_uring: whether the kernel can do it, switching it on (as root) if
// it is off. Done before the mount, which is when the kernel reads the switch for its INIT.
bool want_ring(const MountOptions& o, std::string* why) {
  why->clear();
  if (o.fuse_transport != "io_uring") return false;
  bool exists = false;
  if (kernel_allows_fuse_uring(&exists)) return true;
  if (!exists) {
    *why = "this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)";
    return false;
  }
  if (!allow_fuse_uring(why)) return false;
  log_info("switched on /sys/module/fuse/parameters/enable_uring (asked for by --fuse-transport io_uring)");
  return true;
}

// Whether `mountpoint` can take the mount, asked before the keys are: a directory, or a dead
// mount of this volume (its daemon gone), which the mount replaces at the last moment
// (`*replace` set). A dead mount of anything else is left for its owner to clear.
Status check_mountpoint(const std::string& mountpoint, const std::string& cipher, bool* replace) {
  *replace = false;
  // The daemon keeps reading the cipher dir by path (the config, at each key check), and walks
  // it (the re-wrap after a DEK rotation): a mount over it would answer those itself (the key
  // check then finds no config and revokes the keys), and a mount inside it would be walked.
  const std::string m = resolve_path(mountpoint), c = resolve_path(cipher);
  auto within = [](const std::string& inner, const std::string& outer) {
    return inner == outer || (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 &&
                              (outer == "/" || inner[outer.size()] == '/'));
  };
  if (within(c, m)) {
    return Status(Code::kInvalidArgument,
                  "mountpoint " + mountpoint + " would hide the cipher dir " + cipher +
                      " (the daemon reads the volume there while it runs); mount it somewhere else",
                  EINVAL);
  }
  if (within(m, c)) {
    return Status(Code::kInvalidArgument,
                  "mountpoint " + mountpoint + " is inside the cipher dir " + cipher +
                      " (the daemon walks that tree); mount it somewhere else",
                  EINVAL);
  }
  if (!is_dead_mount(mountpoint)) {
    struct stat st {};
    if (stat(mountpoint.c_str(), &st) != 0) return Status::Io(errno, "mountpoint " + mountpoint);
    if (S_ISDIR(st.st_mode)) return Status::Ok();
    return Status(Code::kInvalidArgument, "mountpoint " + mountpoint + " is not a directory", ENOTDIR);
  }
  const std::string dead = volume_mounted_at(m);
  if (!dead.empty() && resolve_path(dead) == c) {
    *replace = true;
    return Status::Ok();
  }
  return Status(Code::kIoError,
                mountpoint + " is a FUSE mount whose daemon has gone (Transport endpoint is not connected)" +
                    (dead.empty() ? std::string() : ", of envelopefs volume " + dead) +
                    "; unmount it first (envelopefs unmount " + mountpoint + ", or fusermount3 -u " + mountpoint +
                    ")",
                ENOTCONN);
}

// Entries in the directory a mount would cover were not written through the volume: they are
// plaintext, and the mount would hide them (a service that wrote there while the volume was
// not mounted, and a mount that then hid its files, is how data seems lost). So a mountpoint
// with entries is refused unless the caller asks for it (--nonempty).
Status check_mountpoint_empty(const std::string& mountpoint) {
  DIR* d = opendir(mountpoint.c_str());
  if (d == nullptr) return Status::Io(errno, "mountpoint " + mountpoint);
  size_t entries = 0;
  constexpr size_t kEnough = 1000;  // counted up to this many: the message says "or more"
  while (entries < kEnough) {
    const dirent* e = readdir(d);
    if (e == nullptr) break;
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) ++entries;
  }
  closedir(d);
  if (entries == 0) return Status::Ok();
  const std::string count = std::to_string(entries) + (entries == kEnough ? " or more entries" :
                                                       entries == 1 ? " entry" : " entries");
  return Status(Code::kInvalidArgument,
                "mountpoint " + mountpoint + " is not empty (" + count +
                    "): what is there was not written through envelopefs, so it is not encrypted, and "
                    "the mount would hide it; move it away (into the volume once it is mounted, to "
                    "encrypt it), or mount with --nonempty (-o nonempty) to cover it anyway",
                ENOTEMPTY);
}

// The mountpoint was looked at before (check_mountpoint), so a failed FUSE mount is /dev/fuse
// or the kernel's refusal; libfuse has printed its own line already, in the foreground.
std::string why_fuse_mount_failed() {
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return std::string("cannot open /dev/fuse: ") + std::strerror(err) +
           (err == EACCES ? " (a mount by a user other than root needs it mode 0666, as the fuse3 package's udev "
                            "rule sets it)"
                          : err == ENOENT || err == ENODEV ? " (is the fuse module loaded? modprobe fuse)" : "");
  }
  close(fd);
  return "the kernel or fusermount3 refused it (an allow_other without user_allow_other in /etc/fuse.conf? an "
         "unknown -o option?)";
}

// The FUSE session and what has been done to it so far, undone in reverse order on every way
// out of serve(), the failed starts included.
class SessionGuard {
 public:
  explicit SessionGuard(fuse_session* se) : se_(se) {}
  SessionGuard(const SessionGuard&) = delete;
  SessionGuard& operator=(const SessionGuard&) = delete;
  ~SessionGuard() {
    unmount();
    if (handlers_) fuse_remove_signal_handlers(se_);
    set_notification_session(nullptr);
    fuse_session_destroy(se_);
  }
  bool install_signal_handlers() { return handlers_ = fuse_set_signal_handlers(se_) == 0; }
  bool mount(const std::string& at) { return mounted_ = fuse_session_mount(se_, at.c_str()) == 0; }
  void unmount() {
    if (mounted_) fuse_session_unmount(se_);
    mounted_ = false;
  }

 private:
  fuse_session* se_;
  bool handlers_ = false;
  bool mounted_ = false;
};

// Every inode the kernel remembers holds an O_PATH descriptor of its backing node
// (fs/inode_table.h), and the kernel remembers as many as memory allows: far past the usual
// soft limit of 1024 descriptors (under it, cp -r of /usr/include failed with EMFILE at its
// thousandth file). So the soft limit goes up to the hard one and, for root, both up to
// fs.nr_open; the inode table then keeps to half of it (the rest is for open files). Returns
// the limit in force.
rlim_t raise_open_file_limit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  std::ifstream f("/proc/sys/fs/nr_open");
  rlim_t nr_open = 0;
  if ((f >> nr_open) && nr_open > rl.rlim_max) {
    const rlimit all{nr_open, nr_open};
    if (setrlimit(RLIMIT_NOFILE, &all) == 0) return nr_open;  // needs CAP_SYS_RESOURCE
  }
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) (void)getrlimit(RLIMIT_NOFILE, &rl);
  return rl.rlim_cur;
}

// Below this many descriptors, and with none given back (no file handles), a mount warns.
constexpr rlim_t kFewDescriptors = 65536;

int serve(const MountOptions& o, ReadyPipe& ready) {
  harden_process();
  const rlim_t fd_limit = raise_open_file_limit();
  // Resolved now: the daemon changes to / once it is in the background.
  const std::string mountpoint = absolute_path(o.mountpoint);
  // The kernel has already applied the caller's umask to every mode it sends; ours must not
  // mask it a second time.
  umask(0);
  if (!o.log_file.empty()) log_to(LogTarget::kFile, o.log_file);
  else if (!o.foreground) log_to(LogTarget::kSyslog);

  std::string cipher = absolute_path(o.cipher_dir);
  bool replace_dead_mount = false;
  if (Status st = check_mountpoint(o.mountpoint, cipher, &replace_dead_mount); !st.ok()) {
    return fail(ready, o.foreground, "cannot mount: " + st.message());
  }
  // Before the keys are asked for; declared before `fs`, so it is let go (and the volume
  // written back) only once every backing file is closed.
  auto locked = lock_volume(cipher, o.read_only);
  if (!locked.ok()) return fail(ready, o.foreground, "cannot mount: " + locked.status().message());
  VolumeLock volume_lock = std::move(locked).value();
  // After the lock: a second mount of a mounted volume is refused for that, which says more.
  if (!replace_dead_mount && !o.nonempty) {
    if (Status st = check_mountpoint_empty(mountpoint); !st.ok()) {
      return fail(ready, o.foreground, "cannot mount: " + st.message());
    }
  }
  auto volume = open_volume(cipher, o.provider);
  if (!volume.ok()) {
    audit_from_daemon(audit_failure("mount", cipher, volume.status()));
    return fail(ready, o.foreground, "cannot open volume " + cipher + ": " + volume.status().to_string());
  }
  const AuditRecord mounted{"mount", "ok", to_hex(volume->config.volume_id), cipher, volume->config.root_uri,
                            "on " + mountpoint};
  int root_fd = open(cipher.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) return fail(ready, o.foreground, "cannot open " + cipher + ": " + std::strerror(errno));
  if (auto n = read_dir_nonce(root_fd); !n.ok()) {
    return fail(ready, o.foreground, "volume root is damaged: " + n.status().to_string());
  }
  // A passphrase cannot be revoked, and asking for it again may need a terminal.
  const bool watch_root = o.key_check_interval > 0 && volume->config.root_uri.rfind("pass:", 0) != 0;
  auto io = make_io_backend(o.use_uring);
  FsOptions fs_options = o.fs;
  // The probe writes a file; a read-only mount or backing filesystem keeps the option untried.
  struct statvfs backing {};
  const bool writable =
      !o.read_only && statvfs(cipher.c_str(), &backing) == 0 && !(backing.f_flag & ST_RDONLY);
  if (fs_options.direct_backing && writable) {
    if (Status st = probe_direct_io(root_fd); !st.ok()) {
      fs_options.direct_backing = false;
      const std::string why = "--direct-backing: the backing filesystem of " + cipher +
                              " does not do O_DIRECT I/O (" + st.to_string() + "); using its page cache";
      warn_before_ready(o, why);
    }
  }
  Filesystem fs(cipher, root_fd, std::move(volume).value(), std::move(io), fs_options);
  // Said before the mount is ready, so that whoever asked for --acl reads it from `mount`
  // itself (op_init, which runs after, says so only if the kernel is what refuses them).
  if (std::string why = fs.acl_refusal(); !why.empty()) {
    warn_before_ready(o, "--acl: POSIX ACLs are off: " + why);
  }
  std::string no_budget;
  const bool budgeted = fs.inodes().limit_descriptors(fd_limit / 2, &no_budget);

  std::string opts = "default_permissions,fsname=" + cipher + ",subtype=envelopefs";
  if (o.allow_other) opts += ",allow_other";
  if (!o.fuse_options.empty()) opts += "," + o.fuse_options;
  std::vector<std::string> argv_s = {"envelopefs", "-o", opts};
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  std::string why;
  const bool use_ring = want_ring(o, &why);
  if (!why.empty()) return fail(ready, o.foreground, "--fuse-transport io_uring: " + why);
  fuse_session* se = fuse_session_new(&args, &fuse_operations(), sizeof(fuse_lowlevel_ops), &fs);
  if (se == nullptr) return fail(ready, o.foreground, "cannot start a FUSE session (bad -o option?)");
  SessionGuard session(se);
  set_notification_session(se);
  if (!session.install_signal_handlers()) return fail(ready, o.foreground, "cannot install signal handlers");
  // Only now that the volume is open: had a wrong key refused it after the dead mount was
  // gone, the mountpoint would be left a plain directory for whatever writes there next.
  if (replace_dead_mount) {
    if (Status st = unmount_path(o.mountpoint, /*detach=*/true); !st.ok()) {
      return fail(ready, o.foreground, st.message() + " (the dead mount there)");
    }
    const std::string note = "replaced the mount of " + cipher + " on " + mountpoint +
                             " left by a daemon that ended without unmounting";
    log_info(note);
    std::fprintf(stderr, "envelopefs: %s\n", note.c_str());
  }
  if (!session.mount(o.mountpoint)) {
    return fail(ready, o.foreground, "cannot mount on " + o.mountpoint + ": " + why_fuse_mount_failed());
  }
  // Declared after the guard: its workers are gone before the session is destroyed.
  std::unique_ptr<FuseRing> ring;
  if (use_ring) {
    ring = FuseRing::create(se, static_cast<unsigned>(o.threads), &why);
    if (!ring) return fail(ready, o.foreground, "--fuse-transport io_uring: " + why);
  }
  if (!install_fuse_channel(se, ring.get())) {
    log_error("cannot wrap the FUSE channel; every write will cost a GETXATTR round trip");
    ring.reset();
  }
  raise_readahead(mountpoint, 1024);
  log_info("mounted " + cipher + " on " + mountpoint + " (backing I/O: " + fs.io().name() + ")");
  if (!budgeted && fd_limit < kFewDescriptors) {
    log_error("only " + std::to_string(fd_limit) + " open files allowed (RLIMIT_NOFILE) and " + no_budget +
              ", so the descriptors of the files the kernel remembers cannot be given back: a large tree "
              "will fail with EMFILE; raise the hard limit (LimitNOFILE= in a systemd unit, ulimit -Hn)");
  }
  audit_from_daemon(mounted);
  if (o.foreground) std::fprintf(stderr, "envelopefs: mounted %s on %s\n", cipher.c_str(), o.mountpoint.c_str());
  ready.send("OK");
  if (!o.foreground) {
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
      dup2(null, 0);
      dup2(null, 1);
      dup2(null, 2);
      if (null > 2) close(null);
    }
    (void)!chdir("/");
  }
  // Block keys left under an older DEK version by a rotation are moved to the active one in
  // the background, now if a walk is owed, and after each switch the watcher makes.
  std::optional<BlockRewrap> rewrap(std::in_place, fs, cipher, o.read_only,
                                    static_cast<unsigned>(o.rewrap_rate));
  std::optional<KeyWatch> watch;
  if (watch_root) {
    watch.emplace(se, fs, cipher, o.provider,
                  KeyWatchOptions{std::chrono::seconds(o.key_check_interval),
                                  std::chrono::seconds(o.key_unreachable_grace)},
                  [&rewrap] { rewrap->kick(); });
  }
  // libfuse starts one worker and adds one only when all are busy, so with the ring (where
  // /dev/fuse carries INIT, FORGET and INTERRUPT only) these stay one or two threads; and if
  // the kernel declines the ring at INIT, /dev/fuse gets the full count.
  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(cfg, static_cast<unsigned>(o.threads));
  fuse_loop_cfg_set_idle_threads(cfg, static_cast<unsigned>(o.threads));
  int rc = fuse_session_loop_mt(se, cfg);
  fuse_loop_cfg_destroy(cfg);
  watch.reset();
  rewrap.reset();  // a walk in progress stops here; the next mount goes on
  session.unmount();
  if (!o.read_only) volume_lock.write_back();
  if (ring && ring->used()) {
    ring->stop();
    log_info("FUSE over io_uring served " + std::to_string(ring->served()) + " requests");
  }
  if (budgeted) {
    log_info("backing descriptors: at most " + std::to_string(fs.inodes().budget()) + " held, " +
             std::to_string(fs.inodes().reopened()) + " opened again from file handles");
  }
  log_info("unmounted " + mountpoint + "; keys zeroized");
  AuditRecord gone = mounted;
  gone.event = "unmount";
  gone.detail = "from " + mountpoint + "; keys zeroized";
  audit_from_daemon(gone);
  return rc == 0 ? 0 : 1;
}

}  // namespace

int run_mount(const MountOptions& o) {
  if (o.foreground) {
    ReadyPipe none(-1);
    return serve(o, none);
  }
  // Fork first and unwrap keys in the child: locked key memory is not inherited by a fork.
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    std::perror("envelopefs: pipe");
    return 1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    std::perror("envelopefs: fork");
    return 1;
  }
  if (pid == 0) {
    close(fds[0]);
    setsid();
    ReadyPipe ready(fds[1]);
    _exit(serve(o, ready));
  }
  close(fds[1]);
  std::string msg;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  if (msg == "OK") return 0;
  int status = 0;
  waitpid(pid, &status, 0);
  std::fprintf(stderr, "%s\n", msg.empty() ? "envelopefs: the daemon failed to start" : msg.c_str());
  return 1;
}

int run_unmount(const std::string& mountpoint, bool lazy) {
  // The volume mounted there, if the daemon writes it: once unmounted, we wait for its daemon
  // to write it back and let its lock go (VolumeLock), so that what was written through the
  // mount is on disk when this returns.
  std::string cipher = volume_mounted_at(resolve_path(mountpoint));
  if (!cipher.empty() && !volume_in_use(cipher)) cipher.clear();
  // A dead mount (its daemon gone) has nothing to write back, and processes may still hold its
  // files open, which would make a plain unmount EBUSY: it is detached. (The volume may be in
  // use all the same, mounted again elsewhere: that daemon is not waited for.)
  const bool dead = is_dead_mount(mountpoint);
  if (Status st = unmount_path(mountpoint, /*detach=*/dead || lazy); !st.ok()) {
    std::fprintf(stderr, "envelopefs: %s\n", st.message().c_str());
    if (st.sys_errno() == EBUSY) {
      std::fprintf(stderr,
                   "envelopefs: files or directories on it are in use (`fuser -vm %s` lists the processes);\n"
                   "close them and unmount again, or `envelopefs unmount --lazy` to detach it now\n",
                   mountpoint.c_str());
    }
    return 1;
  }
  if (dead) return 0;
  if (lazy) {
    // Still serving what is open on it: waiting here could take for ever.
    if (!cipher.empty()) {
      std::printf("detached %s; its daemon writes %s back and exits once the last file open on it is closed\n",
                  mountpoint.c_str(), cipher.c_str());
    }
    return 0;
  }
  constexpr int kSayAfter = 2, kGiveUpAfter = 600;
  if (!cipher.empty() && !wait_for_release(cipher, kSayAfter, kGiveUpAfter)) {
    std::fprintf(stderr,
                 "envelopefs: unmounted %s, but its daemon has not finished writing %s back after %d s; "
                 "what it still holds reaches the disk when it does\n",
                 mountpoint.c_str(), cipher.c_str(), kGiveUpAfter);
  }
  return 0;
}

}  // namespace envelopefs
