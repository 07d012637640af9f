"""FUSE over io_uring (fs/fuse_ring.h): the transport is really used, carries the largest
requests and replies both ways, serves callers on every CPU, is used only when asked for, and
lets the daemon go at unmount, SIGTERM and SIGKILL.

Run by ctest with ENVELOPEFS_FUSE_TRANSPORT=io_uring (skipped on a kernel without it)."""
import errno
import os
import signal
import subprocess
import threading
import unittest

from common import BIN, URING_SWITCH, VolumeTest, is_mounted, main, rand_bytes, read_file, run

MIB = 1 << 20


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


class FuseRing(VolumeTest):
    def round_trip(self, name, size):
        data = rand_bytes(size, seed=size)
        p = self.vol.path(name)
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for off in range(0, size, MIB):  # 1 MiB writes: a full payload per request
            os.pwrite(fd, data[off:off + MIB], off)
        os.fsync(fd)
        os.close(fd)
        drop_caches()
        fd = os.open(p, os.O_RDONLY)
        got = b"".join(os.pread(fd, MIB, off) for off in range(0, size, MIB))
        os.close(fd)
        self.assertEqual(got, data)

    def test_largest_requests_and_replies(self):
        self.round_trip("big", 8 * MIB + 12345)
        self.vol.remount("--direct-backing")  # READ decrypted in place into the ring's buffer
        self.round_trip("big-direct", 3 * MIB + 1)
        self.assertEqual(read_file(self.vol.path("big")), rand_bytes(8 * MIB + 12345, seed=8 * MIB + 12345))
        self.vol.unmount()
        self.assertGreater(self.vol.ring_served(), 16)  # at least the READs of "big" (1 MiB each)

    def test_callers_on_every_cpu(self):
        errors = []

        def work(cpu):
            try:
                os.sched_setaffinity(0, {cpu})  # this thread only: requests land on cpu's queue
                d = self.vol.path(f"cpu{cpu}")
                os.mkdir(d)
                for i in range(150):
                    p = os.path.join(d, f"f{i}")
                    body = rand_bytes(5000 + i, seed=cpu * 1000 + i)
                    with open(p, "wb") as f:
                        f.write(body)
                    os.setxattr(p, "user.n", str(i).encode())
                    os.rename(p, p + ".done")
                    if read_file(p + ".done") != body or os.getxattr(p + ".done", "user.n") != str(i).encode():
                        errors.append((cpu, i))
                self.assertEqual(len(os.listdir(d)), 150)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((cpu, repr(e)))

        threads = [threading.Thread(target=work, args=(c,)) for c in sorted(os.sched_getaffinity(0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.vol.unmount()
        self.assertGreater(self.vol.ring_served(), 150 * 4 * len(threads))

    def test_dev_is_the_default_and_never_uses_the_ring(self):
        # The io_uring mount in setUp has switched the kernel's switch on; still, without the
        # option a mount talks through /dev/fuse.
        self.assertEqual(open(URING_SWITCH).read().strip(), "Y")
        for args in ((), ("--fuse-transport", "dev")):
            self.vol.unmount()
            self.vol.mount(*args, transport=None)
            with open(self.vol.path("x"), "wb") as f:
                f.write(b"through /dev/fuse")
            self.vol.unmount()
            self.assertIsNone(self.vol.ring_served())
            self.vol.mount()
            self.assertEqual(read_file(self.vol.path("x")), b"through /dev/fuse")

    def test_sigterm_unmounts_and_exits(self):
        with open(self.vol.path("kept"), "wb") as f:
            f.write(b"before the signal")
        pid = self.vol.daemon_pid()
        os.kill(pid, signal.SIGTERM)
        self.vol._wait_gone(pid)
        self.assertFalse(is_mounted(self.vol.mnt))
        self.assertGreater(self.vol.ring_served(), 0)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("kept")), b"before the signal")

    def test_sigkill_leaves_a_dead_mount_that_can_be_replaced(self):
        with open(self.vol.path("kept"), "wb") as f:
            f.write(b"x" * 10000)
            f.flush()
            os.fsync(f.fileno())
        self.vol.kill9()
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("kept")), b"x" * 10000)

    def test_unknown_transport_is_refused(self):
        r = run([BIN, "mount", "-o", "fuse_transport=bogus", self.vol.cipher, self.vol.root], check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("fuse_transport=bogus: expected dev or io_uring", r.stderr)
        r = run([BIN, "mount", "--fuse-transport", "ring", self.vol.cipher, self.vol.root], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--fuse-transport", r.stderr)


if __name__ == "__main__":
    main()
