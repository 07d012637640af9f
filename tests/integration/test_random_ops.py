"""Random system calls, the same ones in a plain directory of the backing filesystem and on
the mount, step by step: every answer (result or errno) must be the same, and so must the
whole tree (types, modes, link counts, sizes, contents, symlink targets) whenever it is
compared. The calls mix names and data: creates, writes at offsets around block and metadata
page boundaries, truncates, fallocate modes, renames (with RENAME_NOREPLACE and
RENAME_EXCHANGE), hard links, symlinks, long names (over the 255 bytes an encrypted name can
take, so long-name records), xattrs, and files written through descriptors that outlive their
names. test_differential covers chosen corners one by one; this finds the orders nobody chose.

The crash variant fsyncs every data write and kills the daemon with SIGKILL now and then:
after the remount (which replaces the dead mount) the tree must still equal the reference,
since every completed call had reached the backing filesystem.

A failure prints its seed and the steps before it; ENVELOPEFS_RANDOM_SEED=N reruns one seed."""
import collections
import errno
import hashlib
import os
import random
import stat
import subprocess

from common import BIN, Volume, fallocate, main, renameat2
import unittest

NAMES = ["a", "b", "c", "sub", "dir2", "x" * 200, "y" * 255, "é ü\t"]
SIZES = [0, 1, 100, 4095, 4096, 4097, 8192, 65536, 130000, 300000]
# Around a 4 KiB block, and around the first metadata page boundary (31 blocks of data).
OFFSETS = [0, 1, 4095, 4096, 126976, 126977, 131072, 200000]
STEPS = 1500


def tree(root):
    """Everything about the tree below `root` that the mount must keep equal."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            sig = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_nlink)
            if stat.S_ISLNK(st.st_mode):
                sig += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    sig += (st.st_size, hashlib.sha256(f.read()).hexdigest())
            out[os.path.relpath(p, root)] = sig
    return out


class Run:
    """One seeded run: a reference directory beside the volume's mount."""

    def __init__(self, test, seed, crash):
        self.test, self.seed, self.crash = test, seed, crash
        self.r = random.Random(seed)
        self.vol = Volume()
        self.vol.mount()
        self.ref = os.path.join(self.vol.root, "ref")
        os.mkdir(self.ref)
        self.fds = []  # (reference fd, mount fd, path it was opened by)
        self.steps = collections.deque(maxlen=20)
        self.outcomes = collections.Counter()

    def paths(self, n):
        """`n` paths: mostly names that exist (so that calls get past ENOENT), sometimes new ones."""
        existing = []
        for d, dirs, files in os.walk(self.ref):
            existing += [os.path.relpath(os.path.join(d, name), self.ref) for name in dirs + files]
        out = []
        for _ in range(n):
            if existing and self.r.random() < 0.6:
                out.append(self.r.choice(existing))
            else:
                out.append("/".join(self.r.choice(NAMES) for _ in range(self.r.choice([1, 1, 2]))))
        return out

    def both(self, label, fn):
        """fn(root, which) on the reference (which 0) and the mount (1); the same answer."""
        answers = []
        for which, root in enumerate((self.ref, self.vol.mnt)):
            try:
                answers.append(("ok", fn(root, which)))
            except OSError as e:
                answers.append(("error", errno.errorcode.get(e.errno, e.errno)))
        self.outcomes[answers[0][0]] += 1
        if answers[0] != answers[1]:
            self.test.fail(f"seed {self.seed}: {label}: backing filesystem {answers[0]!r}, mount {answers[1]!r}\n"
                           "last steps:\n  " + "\n  ".join(self.steps))
        return answers[0]

    def synced(self, fd):
        if self.crash:
            os.fsync(fd)

    def step(self):
        r = self.r
        op = r.choices(["write", "pwrite", "truncate", "read", "rename", "renameat2", "link", "unlink", "mkdir",
                        "rmdir", "symlink", "chmod", "xattr", "stat", "listdir", "open", "fd", "compare",
                        "remount", "kill"],
                       [8, 10, 5, 6, 6, 2, 3, 5, 4, 3, 2, 2, 2, 5, 3, 3, 16, 0.5, 0.3, 0.5 if self.crash else 0])[0]
        p, q = self.paths(2)
        data = r.randbytes(r.choice(SIZES))
        off = r.choice(OFFSETS + [r.randrange(600000)])
        self.steps.append(f"{op} {p!r} {q!r} {len(data)} bytes at {off}")
        at = os.path.join
        if op == "write":
            def write(root, _):
                with open(at(root, p), "wb") as f:
                    f.write(data)
                    f.flush()
                    self.synced(f.fileno())
            self.both(op, write)
        elif op == "pwrite":
            def pwrite(root, _):
                fd = os.open(at(root, p), os.O_WRONLY)
                try:
                    n = os.pwrite(fd, data, off)
                    self.synced(fd)
                    return n
                finally:
                    os.close(fd)
            self.both(op, pwrite)
        elif op == "truncate":
            self.both(op, lambda root, _: os.truncate(at(root, p), off))
        elif op == "read":
            def read(root, _):
                with open(at(root, p), "rb") as f:
                    return hashlib.sha256(f.read()).hexdigest()
            self.both(op, read)
        elif op == "rename":
            self.both(op, lambda root, _: os.rename(at(root, p), at(root, q)))
        elif op == "renameat2":
            flags = r.choice([1, 2])  # RENAME_NOREPLACE, RENAME_EXCHANGE
            self.both(f"{op} {flags}", lambda root, _: renameat2(at(root, p), at(root, q), flags))
        elif op == "link":
            self.both(op, lambda root, _: os.link(at(root, p), at(root, q)))
        elif op == "unlink":
            self.both(op, lambda root, _: os.unlink(at(root, p)))
        elif op == "mkdir":
            self.both(op, lambda root, _: os.mkdir(at(root, p)))
        elif op == "rmdir":
            self.both(op, lambda root, _: os.rmdir(at(root, p)))
        elif op == "symlink":
            self.both(op, lambda root, _: os.symlink(q, at(root, p)))
        elif op == "chmod":
            mode = r.choice([0o644, 0o600, 0o755, 0o4755, 0o1777])
            self.both(op, lambda root, _: os.chmod(at(root, p), mode))
        elif op == "xattr":
            value = data[:r.choice([0, 5, 100])]
            self.both("setxattr", lambda root, _: os.setxattr(at(root, p), "user.t", value))
            self.both("getxattr", lambda root, _: os.getxattr(at(root, p), "user.t"))
        elif op == "stat":
            def lstat(root, _):
                st = os.lstat(at(root, p))
                size = -1 if stat.S_ISDIR(st.st_mode) else st.st_size  # a directory's size is the backing one's
                return (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_nlink, size)
            self.both(op, lstat)
        elif op == "listdir":
            d = r.choice(["", p])
            self.both(op, lambda root, _: sorted(os.listdir(at(root, d))))
        elif op == "open":
            flags = r.choice([os.O_RDWR, os.O_RDWR | os.O_APPEND, os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_TRUNC])
            fds = []

            def open_(root, _):
                fds.append(os.open(at(root, p), flags, 0o644))
            if self.both(f"open {flags:o}", open_)[0] == "ok":
                self.fds.append((fds[0], fds[1], p))
        elif op == "fd" and self.fds:
            self.descriptor_step(data, off)
        elif op == "compare":
            self.both("tree", lambda root, _: tree(root))
        elif op == "remount":
            self.close_all()
            self.vol.unmount()
            self.vol.mount()
        elif op == "kill":
            for a, _, _ in self.fds:
                os.close(a)
            self.vol.kill9()
            for _, b, _ in self.fds:
                try:
                    os.close(b)
                except OSError:
                    pass  # its daemon is gone
            self.fds.clear()
            self.vol.mount()
            self.both("tree after kill -9 and remount", lambda root, _: tree(root))

    def descriptor_step(self, data, off):
        """A call through an open descriptor, whose name may have been renamed or removed since."""
        r = self.r
        k = r.randrange(len(self.fds))
        pair = self.fds[k]
        op = r.choice(["pwrite", "pwrite", "pwrite", "pread", "ftruncate", "fallocate", "fsync", "close"])
        self.steps[-1] = f"{op} through the descriptor of {pair[2]!r}: {len(data)} bytes at {off}"
        if op == "pwrite":
            def pwrite(_, which):
                n = os.pwrite(pair[which], data, off)
                self.synced(pair[which])
                return n
            self.both(op, pwrite)
        elif op == "pread":
            self.both(op, lambda _, which: hashlib.sha256(os.pread(pair[which], 700000, 0)).hexdigest())
        elif op == "ftruncate":
            self.both(op, lambda _, which: os.ftruncate(pair[which], off))
        elif op == "fallocate":
            mode = r.choice([0, 1, 3, 0x10])  # 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
            self.steps[-1] += f" mode {mode:#x}"
            self.both(f"fallocate {mode:#x}", lambda _, which: fallocate(pair[which], mode, off, len(data) or 1))
        elif op == "fsync":
            self.both(op, lambda _, which: os.fsync(pair[which]))
        else:
            os.close(pair[0])
            os.close(pair[1])
            self.fds.pop(k)

    def close_all(self):
        for a, b, _ in self.fds:
            os.close(a)
            os.close(b)
        self.fds.clear()

    def finish(self):
        self.close_all()
        self.both("final tree", lambda root, _: tree(root))
        # Enough calls must have got through for the run to mean something.
        self.test.assertGreater(self.outcomes["ok"], STEPS // 3, f"seed {self.seed}: {self.outcomes}")
        self.vol.unmount()
        fsck = subprocess.run([BIN, "fsck", "-q", self.vol.cipher], capture_output=True, text=True)
        self.test.assertEqual(fsck.returncode, 0, f"seed {self.seed}: fsck\n{fsck.stdout}{fsck.stderr}")
        self.test.assertNotIn("skipping entry", self.vol.log_text())


class RandomOps(unittest.TestCase):
    def run_seeds(self, seeds, crash):
        if os.environ.get("ENVELOPEFS_RANDOM_SEED"):
            seeds = [int(os.environ["ENVELOPEFS_RANDOM_SEED"])]
        for seed in seeds:
            run = Run(self, seed, crash)
            try:
                for _ in range(STEPS):
                    run.step()
                run.finish()
            finally:
                run.close_all()
                run.vol.cleanup()

    def test_random_calls_answer_as_the_backing_filesystem_does(self):
        self.run_seeds([1, 2, 3], crash=False)

    def test_random_calls_through_kill_9_and_remounts(self):
        self.run_seeds([101, 102], crash=True)


if __name__ == "__main__":
    main()
