"""Helpers for the integration tests: a real envelopefs volume, mounted with the real binary.

Every test gets its own temporary directory holding the cipher dir, the mountpoint, a
throwaway root key and the daemon's log. The binary comes from ENVELOPEFS_BIN (set by ctest).
ENVELOPEFS_FUSE_TRANSPORT (set by ctest: "dev", or "io_uring" for the *_uring variants) picks
how the kernel hands requests to the daemon; with "io_uring", every unmount also checks that
the requests really came through the ring, and the test is skipped (exit 77) on a kernel
without FUSE over io_uring.
"""
import ctypes
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

BIN = os.environ.get("ENVELOPEFS_BIN", os.path.join(os.path.dirname(__file__), "../../build/envelopefs"))
libc = ctypes.CDLL(None, use_errno=True)
TRANSPORT = os.environ.get("ENVELOPEFS_FUSE_TRANSPORT")
URING_SWITCH = "/sys/module/fuse/parameters/enable_uring"


def run(args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def mount_count(path):
    """How many mounts are stacked on `path`."""
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[1] == path)


def is_mounted(path):
    return mount_count(path) > 0


class Volume:
    def __init__(self, block_size=4096, init=True):
        self.root = tempfile.mkdtemp(prefix="efs-it-")
        os.chmod(self.root, 0o755)
        self.cipher = os.path.join(self.root, "cipher")
        self.mnt = os.path.join(self.root, "mnt")
        self.key = os.path.join(self.root, "root.key")
        self.log = os.path.join(self.root, "daemon.log")
        os.mkdir(self.mnt)
        if init:
            run([BIN, "init", "--kms", "file:" + self.key, "--block-size", str(block_size), self.cipher])

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def mount(self, *args, transport=TRANSPORT, prefix=()):
        """Mounts with `args`, through `transport` (the ctest variant's unless the args name one;
        None: no --fuse-transport at all, the daemon's default). `prefix` runs the command
        under a wrapper (`prlimit ...`)."""
        args = list(args)
        if "--fuse-transport" in args:
            self.transport = args[args.index("--fuse-transport") + 1]
        else:
            self.transport = transport
            if transport:
                args[:0] = ["--fuse-transport", transport]
        run([*prefix, BIN, "mount", "--log-file", self.log, *args, self.cipher, self.mnt])
        assert is_mounted(self.mnt)

    def remount_with_descriptor_limit(self, test, limit):
        """Mounts again with the daemon under a hard open-file limit of `limit`, so that it keeps
        half of it for the inodes the kernel remembers (fs/inode_table.h); skips `test` where
        it cannot give descriptors back (a backing filesystem without file handles)."""
        self.unmount()
        self.mount(prefix=["prlimit", f"--nofile={limit}:{limit}"])
        if "cannot be given back" in self.log_text():
            test.skipTest("the backing filesystem here has no file handles")

    def descriptor_reports(self):
        """(budget, descriptors opened again) of each daemon that had a budget, in order, as
        each logged on exit."""
        out = []
        for line in self.log_text().splitlines():
            m = re.search(r"backing descriptors: at most (\d+) held, (\d+) opened again", line)
            if m:
                out.append((int(m.group(1)), int(m.group(2))))
        return out

    def ring_served(self):
        """Requests the last daemon served through FUSE over io_uring, as it logged on exit;
        None when its ring never started."""
        found = None
        for line in self.log_text().splitlines():
            if "envelopefs: mounted " in line:
                found = None
            if "FUSE over io_uring served" in line:
                found = int(line.split("served ")[1].split()[0])
        return found

    def daemon_pid(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"envelopefs") and self.mnt.encode() in argv and b"mount" in argv:
                return int(pid)
        return None

    def unmount(self):
        pid = self.daemon_pid()
        run([BIN, "unmount", self.mnt])
        self._wait_gone(pid)
        if getattr(self, "transport", None) == "io_uring":
            assert self.ring_served() is not None, "asked for FUSE over io_uring, but the daemon did not use it"

    def mount_refused(self, *expected):
        """Mounting must fail, say each of `expected` on stderr, and leave nothing mounted."""
        r = run([BIN, "mount", "--log-file", self.log, self.cipher, self.mnt], check=False)
        assert r.returncode != 0, "mount succeeded where it must fail closed"
        assert not is_mounted(self.mnt)
        for text in expected:
            assert text in r.stderr, f"{text!r} not in {r.stderr!r}"
        return r.stderr

    def kill9(self):
        """SIGKILL to the daemon. Its mount stays, dead (ENOTCONN), as after a crash: the next
        mount() replaces it, as `envelopefs mount` does (fs/mount_table.h)."""
        pid = self.daemon_pid()
        assert pid, "daemon not found"
        os.kill(pid, signal.SIGKILL)
        self._wait_gone(pid)

    def remount(self, *args):
        self.unmount()
        self.mount(*args)

    @staticmethod
    def _wait_gone(pid, timeout=20):
        if pid is None:
            return
        end = time.time() + timeout
        while time.time() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon {pid} still running")

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def backing_files(self):
        """All regular files in the cipher dir that hold file data (not our own records)."""
        out = []
        for d, _, files in os.walk(self.cipher):
            for f in files:
                if "." not in f or f.startswith("envelopefs.long.") and not f.endswith(".name"):
                    out.append(os.path.join(d, f))
        return out

    def cleanup(self):
        if is_mounted(self.mnt):
            try:
                self.unmount()
            except AssertionError:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def loop_disk(test, mkfs, size_mib, where):
    """Makes a filesystem with `mkfs` (an argv; the image's path is appended) in a sparse image
    of `size_mib` MiB beside `where`, and mounts it at `where` through a loop device, which it
    returns. Skips `test` where `mkfs` is not installed or there is no loop device; cleanups
    on `test` unmount and detach it."""
    if shutil.which(mkfs[0]) is None:
        test.skipTest(f"{mkfs[0]} is not installed")
    image = where.rstrip("/") + ".img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    run([*mkfs, image])
    r = run(["losetup", "-f", "--show", image], check=False)
    if r.returncode != 0:
        test.skipTest("no loop device: " + r.stderr.strip())
    loop = r.stdout.strip()
    test.addCleanup(run, ["losetup", "-d", loop], check=False)
    run(["mount", loop, where])
    test.addCleanup(run, ["umount", "-l", where], check=False)
    return loop


def init_on_disk(test, vol, disk):
    """Makes `vol` a new volume whose cipher dir is in `disk` (a mounted filesystem); at
    cleanup on `test` the volume is unmounted before the disk is."""
    test.addCleanup(lambda: is_mounted(vol.mnt) and run(["umount", "-l", vol.mnt], check=False))
    vol.cipher = os.path.join(disk, "cipher")
    run([BIN, "init", "--kms", "file:" + vol.key, vol.cipher])


class VolumeTest(unittest.TestCase):
    block_size = 4096
    mount_args = ()

    def setUp(self):
        self.vol = Volume(self.block_size)
        self.vol.mount(*self.mount_args)

    def tearDown(self):
        self.vol.cleanup()


def wait_for(predicate, timeout=20, step=0.2):
    """Polls `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def rand_bytes(n, seed=None):
    r = random.Random(seed)
    return r.randbytes(n)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data, fsync=False):
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


# A backing file of a 4 KiB-block volume: groups of one metadata page and 31 data blocks
# (fs/FORMAT.md).
GROUP_BYTES = 4096 + 31 * 4096


def data_offset(block):
    """Where data block `block` of a 4 KiB-block volume's file starts in its backing file."""
    return (block // 31) * GROUP_BYTES + 4096 + (block % 31) * 4096


def flip_bits(path, offset, mask):
    """XORs the byte at `offset` of `path` with `mask`, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def renameat2(old, new, flags):
    AT_FDCWD = -100
    rc = libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), ctypes.c_uint(flags))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd, mode, off, length):
    rc = libc.fallocate(ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_long(off), ctypes.c_long(length))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main():
    if TRANSPORT == "io_uring" and not os.path.exists(URING_SWITCH):
        print("skipped: this kernel has no FUSE over io_uring")
        raise SystemExit(77)
    unittest.main(verbosity=2)
