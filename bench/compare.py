#!/usr/bin/env python3
"""Side-by-side benchmark: ext4 directly, libfuse's passthrough_ll (the plain-FUSE baseline,
compiled here from libfuse3-dev's example), envelopefs (and envelopefs-uring: through FUSE over
io_uring, where the kernel has it), and gocryptfs/securefs when installed (apt-get install
gocryptfs securefs). Everything runs back to back in one invocation and is
reported as a markdown table plus ratios. Run as root (mounts, drop_caches, PostgreSQL).

  python3 bench/compare.py [--size 512M] [--runtime 15] [--only envelopefs,ext4]
                                [--no-pgbench] [--no-rocksdb] [--no-tree] [--no-fio]
                                [--no-spread] [--repeat N]
                                [--out results.md]
"""
import argparse
import array
import fcntl
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"


HAS_FUSE_URING = os.path.exists("/sys/module/fuse/parameters/enable_uring")


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def spread_children(path):
    """Ask ext4 to spread the subdirectories of path over its block groups (the Orlov
    allocator's top-directory rule, chattr +T), so that each filesystem under test creates its
    files away from the inodes the others deleted.

    Why: on ext4 without a journal (this VM's disk), an inode freed in the last 5 minutes whose
    inode-table block is dirty is skipped when allocating, and ext4 scans for a free inode from
    the start of the group at every create. A cp -r right after another filesystem's rm -rf in
    the same groups spent most of its CREATE time in that scan: passthrough's CREATE took 43 us
    on its own and 91 us right after envelopefs' tree was deleted beside it, and the other way
    round. Which filesystem followed whose delete then moved the cp -r column.
    """
    FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])  # the kernel reads an int
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] |= FS_TOPDIR_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    except OSError as e:
        print(f"# {path}: no top-directory placement ({e.strerror}); cp -r may follow deletes",
              file=sys.stderr)
    finally:
        os.close(fd)


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def pid_of(pattern):
    r = sh(["pgrep", "-f", pattern], check=False)
    pids = [int(p) for p in r.stdout.split()]
    return pids[0] if pids else None


def peak_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, TypeError):
        pass
    return None


class Fs:
    """A filesystem under test: set up a mount (or a plain directory), tear it down."""
    fuse = True

    def __init__(self, name, work):
        self.name = name
        self.work = os.path.join(work, name)
        self.cipher = os.path.join(self.work, "cipher")
        self.mnt = os.path.join(self.work, "mnt")
        os.makedirs(self.cipher, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def daemon_pid(self):
        return None

    def unmount(self):
        if self.fuse:
            sh(["umount", self.mnt], check=False)
            time.sleep(0.5)


class Ext4(Fs):
    fuse = False

    def mount(self):
        self.mnt = self.cipher


class Passthrough(Fs):
    def __init__(self, name, work, writeback):
        super().__init__(name, work)
        self.writeback = writeback
        self.bin = os.path.join(work, "passthrough_ll")
        if not os.path.exists(self.bin):
            sh(f"gcc -O2 -o {self.bin} {EXAMPLES}/passthrough_ll.c -I{EXAMPLES} $(pkg-config fuse3 --cflags --libs)")

    def mount(self):
        opts = f"source={self.cipher},allow_other" + (",writeback" if self.writeback else "")
        sh([self.bin, "-o", opts, self.mnt])

    def daemon_pid(self):
        return pid_of(f"passthrough_ll -o source={self.cipher}")


class Envelopefs(Fs):
    def __init__(self, name, work, binary, extra=(), seq_only=False):
        super().__init__(name, work)
        self.bin = binary
        self.extra = list(extra)
        self.seq_only = seq_only
        key = os.path.join(self.work, "root.key")
        if not os.path.exists(os.path.join(self.cipher, "envelopefs.conf")):
            sh([self.bin, "init", "--kms", "file:" + key, self.cipher])

    def mount(self):
        sh([self.bin, "mount", "--allow-other", *self.extra, self.cipher, self.mnt])

    def daemon_pid(self):
        return pid_of(f"envelopefs mount .*{self.cipher}")


class Gocryptfs(Fs):
    def mount(self):
        if not os.path.exists(os.path.join(self.cipher, "gocryptfs.conf")):
            sh(["gocryptfs", "-init", "-q", "-extpass", "echo benchpass", "-scryptn", "10", self.cipher])
        sh(["gocryptfs", "-q", "-allow_other", "-extpass", "echo benchpass", self.cipher, self.mnt])

    def daemon_pid(self):
        return pid_of(f"gocryptfs .*{self.cipher}")


class Securefs(Fs):
    def mount(self):
        if not os.path.exists(os.path.join(self.cipher, ".securefs.json")):
            sh(["securefs", "create", "--pass", "benchpass", self.cipher])
        sh(["securefs", "mount", "-b", "--pass", "benchpass", "-o", "allow_other", self.cipher, self.mnt])
        time.sleep(1)

    def daemon_pid(self):
        return pid_of(f"securefs mount .*{self.cipher}")


def fio(mnt, name, size, runtime, **opts):
    args = ["fio", f"--name={name}", f"--directory={mnt}", f"--size={size}", "--output-format=json",
            "--group_reporting", "--time_based=0"]
    for k, v in opts.items():
        args.append(f"--{k}={v}")
    if runtime:
        args += [f"--runtime={runtime}"]
    r = sh(args)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return job


def run_fio_suite(fs, size, runtime, seq_only=False):
    res = {}
    mnt = fs.mnt
    drop_caches()
    j = fio(mnt, "seqwrite", size, 0, rw="write", bs="1M", ioengine="psync", end_fsync=1)
    res["seq write MiB/s"] = j["write"]["bw"] / 1024
    drop_caches()
    cached0 = meminfo("Cached")
    j = fio(mnt, "seqwrite", size, 0, rw="read", bs="1M", ioengine="psync")
    res["seq read MiB/s"] = j["read"]["bw"] / 1024
    res["page cache growth on read MiB"] = (meminfo("Cached") - cached0) / 1048576
    if seq_only:
        for f in glob.glob(os.path.join(mnt, "seqwrite*")):
            os.unlink(f)
        return res
    drop_caches()
    j = fio(mnt, "seqwrite", size, runtime, rw="randread", bs="4k", ioengine="psync", time_based=1)
    res["4k rand read IOPS"] = j["read"]["iops"]
    drop_caches()
    j = fio(mnt, "seqwrite", size, runtime, rw="randwrite", bs="4k", ioengine="psync", time_based=1)
    res["4k rand write IOPS"] = j["write"]["iops"]
    drop_caches()
    j = fio(mnt, "seqwrite", size, runtime, rw="randrw", rwmixread=70, bs="4k", ioengine="io_uring",
            iodepth=16, time_based=1)
    res["4k randrw qd16 IOPS"] = j["read"]["iops"] + j["write"]["iops"]
    drop_caches()
    j = fio(mnt, "dblog", "64M", runtime, rw="write", bs="4k", ioengine="psync", fdatasync=1, time_based=1)
    res["db log 4k+fdatasync IOPS"] = j["write"]["iops"]
    for f in glob.glob(os.path.join(mnt, "seqwrite*")) + glob.glob(os.path.join(mnt, "dblog*")):
        os.unlink(f)
    return res


def run_tree(fs, src):
    res = {}
    dst = os.path.join(fs.mnt, "tree")
    drop_caches()
    t = time.time()
    sh(["cp", "-r", src, dst])
    os.sync()
    res["cp -r tree s"] = time.time() - t
    drop_caches()
    t = time.time()
    sh(f"find {dst} -type f -print0 | xargs -0 cat > /dev/null")
    res["read tree s"] = time.time() - t
    t = time.time()
    sh(["rm", "-rf", dst])
    res["rm -rf tree s"] = time.time() - t
    return res


def run_pgbench(fs, seconds):
    pg = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not pg or not shutil.which("pgbench"):
        return {}
    pg = pg[-1]
    pw = pwd.getpwnam("postgres")
    data = os.path.join(fs.mnt, "pgdata")
    sock = tempfile.mkdtemp(prefix="pgsock-")
    os.chown(sock, pw.pw_uid, pw.pw_gid)
    os.makedirs(data, exist_ok=True)
    os.chown(data, pw.pw_uid, pw.pw_gid)
    as_pg = ["runuser", "-u", "postgres", "--"]
    port = "25432"
    try:
        sh(as_pg + [f"{pg}/initdb", "-D", data, "--no-instructions", "-A", "trust"])
        sh(as_pg + [f"{pg}/pg_ctl", "-D", data, "-l", os.path.join(sock, "log"), "-w", "-o",
                    f"-k {sock} -p {port} -c listen_addresses=''", "start"])
        sh(as_pg + ["pgbench", "-h", sock, "-p", port, "-i", "-s", "10", "-q", "postgres"])
        r = sh(as_pg + ["pgbench", "-h", sock, "-p", port, "-c", "4", "-j", "2", "-T", str(seconds), "postgres"])
        tps = [l for l in r.stdout.splitlines() if l.startswith("tps")]
        return {"pgbench TPS": float(tps[0].split("=")[1].split()[0])}
    finally:
        sh(as_pg + [f"{pg}/pg_ctl", "-D", data, "-w", "-m", "fast", "stop"], check=False)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(sock, ignore_errors=True)


def run_rocksdb(fs, seconds):
    """RocksDB's db_bench (rocksdb-tools): a bulk load in key order; point reads of that
    database after drop_caches (an 8 MiB block cache, so its misses are reads through the
    filesystem: from the disk at first, then from the page cache); random writes, each
    fsynced through the WAL (sync=1)."""
    if not shutil.which("db_bench"):
        return {}
    db = os.path.join(fs.mnt, "rocksdb")
    common = [f"--db={db}", "--value_size=400", "--compression_type=none", "--num=300000", "--seed=1"]

    def ops(benchmarks, *args):
        r = sh(["db_bench", f"--benchmarks={benchmarks}", *common, *args])
        line = [l for l in r.stdout.splitlines() if l.startswith(benchmarks)][0]
        return float(line.split("micros/op")[1].split()[0])

    try:
        res = {"rocksdb fillseq ops/s": ops("fillseq")}
        drop_caches()
        res["rocksdb readrandom ops/s"] = ops("readrandom", "--use_existing_db=1", "--threads=2",
                                              "--cache_size=8388608", f"--duration={seconds}")
        res["rocksdb sync write ops/s"] = ops("fillrandom", "--sync=1", f"--duration={seconds}")
        return res
    finally:
        shutil.rmtree(db, ignore_errors=True)


def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def lower_is_better(metric):
    return metric.endswith(" s")


def best(values, metric):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return min(v) if lower_is_better(metric) else max(v)


def ratio_cell(runs, metric, other_in_round):
    """envelopefs against another figure, round by round: 'median (low-high)', or '-'.

    A ratio above 1 always means envelopefs is better (for times, other / envelopefs)."""
    ratios = []
    for rnd, r in enumerate(runs["envelopefs"]):
        mine, other = r.get(metric), other_in_round(rnd)
        if not mine or not other:
            continue
        ratios.append(other / mine if lower_is_better(metric) else mine / other)
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def render(runs, repeat):
    """The markdown tables: each metric's median per filesystem, then envelopefs' ratios."""
    results = {name: {k: median([r.get(k) for r in rs]) for k in rs[0]} for name, rs in runs.items()}
    keys = []
    for r in results.values():
        keys += [k for k in r if k not in keys]
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(results[n].get(k)) for n in names) + " |")
    peers = [n for n in names if n in ("gocryptfs", "securefs")]

    def in_round(name, rnd):
        rs = runs.get(name, [])
        return rs[rnd] if rnd < len(rs) else {}

    if "envelopefs" in results:
        lines.append("")
        lines.append("| metric | envelopefs / best peer | envelopefs / passthrough | "
                     "envelopefs / passthrough-wb | envelopefs / ext4 |")
        lines.append("|---|---|---|---|---|")
        for k in keys:
            e = results["envelopefs"].get(k)
            if k.startswith("daemon") or k.startswith("page cache") or e is None:
                continue
            cells = [ratio_cell(runs, k, lambda rnd: best([in_round(p, rnd).get(k) for p in peers], k))]
            for other in ("passthrough", "passthrough-wb", "ext4"):
                cells.append(ratio_cell(runs, k, lambda rnd, o=other: in_round(o, rnd).get(k)))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if repeat > 1:
        lines.append("")
        lines.append(f"Medians of {repeat} rounds, each running every filesystem once in turn. A ratio "
                     "is the median of the rounds' own ratios (a round's two figures are minutes apart, "
                     "not a whole run), with their range in brackets: a wide range is a noisy column.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--pgbench-seconds", type=int, default=30)
    ap.add_argument("--work", default="/var/tmp/envelopefs-bench")
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/envelopefs"))
    ap.add_argument("--only", default="", help="comma-separated subset of: ext4,passthrough,passthrough-wb,envelopefs,envelopefs-uring,envelopefs-direct,gocryptfs,securefs")
    ap.add_argument("--tree", default="/usr/include", help="directory tree for the cp -r phase")
    ap.add_argument("--no-pgbench", action="store_true")
    ap.add_argument("--rocksdb-seconds", type=int, default=8,
                    help="length of db_bench's random read and synchronous write phases")
    ap.add_argument("--no-rocksdb", action="store_true", help="skip the db_bench phase")
    ap.add_argument("--no-tree", action="store_true")
    ap.add_argument("--no-fio", action="store_true", help="skip the fio phases (tree, pgbench and rocksdb only)")
    ap.add_argument("--no-spread", action="store_true",
                    help="leave each filesystem's work directory where ext4 puts it (beside the "
                         "others); by default ext4 is asked to spread them over block groups, "
                         "so one's deletes do not slow the next one's cp -r")
    ap.add_argument("--out", default="")
    ap.add_argument("--allow-unoptimised", action="store_true",
                    help="measure a Debug/asan binary anyway (its figures are not comparable)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the whole comparison; the table shows each metric's median")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    # A Debug (-O0) build is 30% slower or worse on the metadata and 4 KiB paths: refuse it
    # rather than publish its figures as envelopefs'.
    version = sh([a.binary, "--version"]).stdout.strip()
    if "(Release" not in version and "(RelWithDebInfo" not in version and not a.allow_unoptimised:
        sys.exit(f"{a.binary} is '{version}': build with -DCMAKE_BUILD_TYPE=Release "
                 "(or pass --allow-unoptimised)")
    print(f"# {version}", file=sys.stderr)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    if not a.no_spread:
        spread_children(a.work)
    candidates = [("ext4", lambda: Ext4("ext4", a.work)),
                  ("passthrough", lambda: Passthrough("passthrough", a.work, False)),
                  ("passthrough-wb", lambda: Passthrough("passthrough-wb", a.work, True)),
                  ("envelopefs", lambda: Envelopefs("envelopefs", a.work, a.binary)),
                  # The opt-in FUSE over io_uring transport, where the kernel has it.
                  ("envelopefs-uring", lambda: Envelopefs("envelopefs-uring", a.work, a.binary,
                                                          ["--fuse-transport", "io_uring"])),
                  # The O_DIRECT backing option, for what it changes: the sequential phases and
                  # the page cache a read leaves (plaintext only, not ciphertext as well).
                  ("envelopefs-direct", lambda: Envelopefs("envelopefs-direct", a.work, a.binary,
                                                           ["--direct-backing"], seq_only=True))]
    if not HAS_FUSE_URING:
        candidates = [c for c in candidates if c[0] != "envelopefs-uring"]
        print("# envelopefs-uring: this kernel has no FUSE over io_uring", file=sys.stderr)
    for peer, cls in (("gocryptfs", Gocryptfs), ("securefs", Securefs)):
        if shutil.which(peer):
            candidates.append((peer, lambda p=peer, c=cls: c(p, a.work)))
        else:
            print(f"# {peer} not installed: apt-get install {peer}", file=sys.stderr)
    only = set(filter(None, a.only.split(",")))
    # Each round runs every filesystem once, back to back; with --repeat N the table shows the
    # median of the N rounds, so a disk that drifts during the run moves every column alike.
    runs = {}
    chosen = [(name, make) for name, make in candidates if not only or name in only]
    made = {}
    for round_no in range(a.repeat):
        for name, make in chosen:
            fs = made.setdefault(name, make())
            seq_only = getattr(fs, "seq_only", False)
            if a.no_fio and seq_only:
                continue  # it has only the sequential fio phases
            print(f"== {name} (round {round_no + 1}/{a.repeat})", file=sys.stderr)
            fs.mount()
            try:
                r = {} if a.no_fio else run_fio_suite(fs, a.size, a.runtime, seq_only)
                if not a.no_tree and not seq_only:
                    r.update(run_tree(fs, a.tree))
                if not a.no_pgbench and not seq_only:
                    r.update(run_pgbench(fs, a.pgbench_seconds))
                if not a.no_rocksdb and not seq_only:
                    r.update(run_rocksdb(fs, a.rocksdb_seconds))
                rss = peak_rss(fs.daemon_pid())
                r["daemon peak RSS MiB"] = rss / 1048576 if rss else None
                runs.setdefault(name, []).append(r)
                print(json.dumps(r), file=sys.stderr)
            finally:
                fs.unmount()
    table = render(runs, a.repeat)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
