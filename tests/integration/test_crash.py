"""kill -9 of the daemon in the middle of writes: after remounting, everything fsynced is
intact and every block reads as a version that was written to it (never EIO). And in the
middle of processes racing on names (test_concurrency's race): every name still reads, every
file published under one is whole, link counts match, and fsck finds nothing. And the dead
mount a killed daemon leaves: status names it, a mount of its volume replaces it, unmount
clears it, and nothing else does."""
import errno
import json
import os
import random
import threading
import time

from common import BIN, Volume, is_mounted, main, mount_count, read_file, run, write_file
from test_concurrency import check_tree, start_race
import unittest

BS = 4096
BLOCKS = 200  # per file: crosses metadata pages


class Crash(unittest.TestCase):
    def run_round(self, seed, mount_args=()):
        vol = Volume()
        try:
            vol.mount(*mount_args)
            r = random.Random(seed)
            names = ["f0", "f1", "f2"]
            # possible[name][b]: contents the block may hold after a crash.
            possible = {}
            fds = {}
            for n in names:
                data = r.randbytes(BLOCKS * BS)
                fd = os.open(vol.path(n), os.O_CREAT | os.O_RDWR, 0o644)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
                fds[n] = fd
                possible[n] = [{data[b * BS:(b + 1) * BS]} for b in range(BLOCKS)]
            stop = threading.Event()
            errors = []

            def writer():
                try:
                    while not stop.is_set():
                        n = r.choice(names)
                        fd = fds[n]
                        if r.random() < 0.05:
                            os.fsync(fd)
                            # Durable: only the latest version of each block may remain.
                            for b in range(BLOCKS):
                                possible[n][b] = {latest[n][b]}
                            continue
                        b = r.randrange(BLOCKS - 8)
                        count = r.choice([1, 1, 2, 8])
                        data = r.randbytes(count * BS)
                        for k in range(count):
                            chunk = data[k * BS:(k + 1) * BS]
                            possible[n][b + k].add(chunk)
                            latest[n][b + k] = chunk
                        os.pwrite(fd, data, b * BS)
                except OSError as e:
                    errors.append(e)

            latest = {n: [next(iter(possible[n][b])) for b in range(BLOCKS)] for n in names}
            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.3 + r.random())
            vol.kill9()
            stop.set()
            t.join()
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            vol.mount(*mount_args)
            for n in names:
                data = read_file(vol.path(n))  # raises on EIO
                self.assertEqual(len(data), BLOCKS * BS)
                for b in range(BLOCKS):
                    self.assertIn(data[b * BS:(b + 1) * BS], possible[n][b], f"{n} block {b}")
        finally:
            vol.cleanup()

    def test_kill9_during_random_writes(self):
        for seed in range(3):
            self.run_round(seed)

    def test_kill9_without_writeback_cache(self):
        for seed in range(3, 5):
            self.run_round(seed, ("--no-writeback",))

    def test_kill9_while_processes_race_on_names(self):
        """A name's backing entry, its long-name record and its directory's nonce are changed
        by separate system calls; a kill between any two must leave a tree that reads whole
        (fs/FORMAT.md, "Names": what a crash may leave, and how the mount heals it)."""
        for delay in (0.4, 0.9, 1.6):
            vol = Volume()
            try:
                vol.mount()
                root = vol.path("race")
                procs, _ = start_race(root)
                time.sleep(delay)
                vol.kill9()
                for p in procs:
                    p.join(timeout=60)
                    if p.is_alive():
                        p.kill()
                alive = [p for p in procs if p.exitcode is None]
                self.assertEqual(alive, [], "a worker hung on the dead mount")
                vol.mount()
                tree = check_tree(self, root, unpublished_ok=True)
                self.assertGreater(len(tree), 3, f"kill after {delay} s: the race left almost nothing")
                vol.unmount()
                fsck = run([BIN, "fsck", "-q", vol.cipher], check=False)
                self.assertEqual(fsck.returncode, 0, f"kill after {delay} s: " + fsck.stdout + fsck.stderr)
            finally:
                vol.cleanup()


def is_dead(path):
    """Whether `path` is a mount whose daemon has gone: a listing fails with ENOTCONN (a stat
    may still be answered from the attributes the kernel cached)."""
    try:
        os.listdir(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


class DeadMount(unittest.TestCase):
    """A daemon killed without unmounting leaves its mount in place, every access ENOTCONN: it
    fails closed, rather than let writes fall through to the directory beneath in plaintext.
    `envelopefs mount` of the same volume replaces it (once the volume is open), `unmount`
    clears it, `status` says which it is; nothing else touches it."""

    KEPT = b"fsynced before the kill"

    def setUp(self):
        self.vol = Volume()
        self.vol.mount()
        write_file(self.vol.path("kept"), self.KEPT, fsync=True)

    def tearDown(self):
        self.vol.cleanup()

    def kill(self):
        self.vol.kill9()
        self.assertTrue(is_dead(self.vol.mnt))

    def status(self):
        return json.loads(run([BIN, "status", "--json", self.vol.mnt]).stdout)

    def test_status_names_it_and_a_mount_of_the_volume_replaces_it(self):
        self.kill()
        text = run([BIN, "status", self.vol.mnt]).stdout
        self.assertIn("dead mount:   " + self.vol.mnt + " (its daemon has gone", text)
        self.assertNotIn("mounted at:", text)
        self.assertEqual((self.status()["mounted_at"], self.status()["dead_mounts"]), ([], [self.vol.mnt]))
        self.vol.mount()
        self.assertIn("left by a daemon that ended without unmounting", self.vol.log_text())
        self.assertEqual(mount_count(self.vol.mnt), 1, "mounted on top of the dead mount")
        self.assertEqual(read_file(self.vol.path("kept")), self.KEPT)
        self.assertEqual((self.status()["mounted_at"], self.status()["dead_mounts"]), ([self.vol.mnt], []))
        self.vol.unmount()
        self.assertFalse(is_mounted(self.vol.mnt))

    def test_a_mount_that_fails_leaves_it_in_place(self):
        self.kill()
        os.rename(self.vol.key, self.vol.key + ".away")  # the root key is unavailable
        r = run([BIN, "mount", "--log-file", self.vol.log, self.vol.cipher, self.vol.mnt], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("cannot open volume", r.stderr)
        # Still dead: not an empty directory that a process could now write plaintext into.
        self.assertTrue(is_dead(self.vol.mnt))
        with self.assertRaises(OSError) as e:
            write_file(self.vol.path("new"), b"plaintext")
        self.assertEqual(e.exception.errno, errno.ENOTCONN)
        os.rename(self.vol.key + ".away", self.vol.key)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("kept")), self.KEPT)
        self.assertEqual(os.listdir(self.vol.mnt), ["kept"])

    def test_unmount_clears_it_while_files_are_still_open(self):
        fd = os.open(self.vol.path("kept"), os.O_RDONLY)
        try:
            self.kill()
            run([BIN, "unmount", self.vol.mnt])
            self.assertFalse(is_mounted(self.vol.mnt))
            self.assertEqual(os.listdir(self.vol.mnt), [])  # the directory beneath
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("kept")), self.KEPT)

    def test_unmount_does_not_wait_for_the_volume_mounted_again_elsewhere(self):
        elsewhere = os.path.join(self.vol.root, "elsewhere")
        os.mkdir(elsewhere)
        self.kill()
        run([BIN, "mount", "--log-file", self.vol.log, self.vol.cipher, elsewhere])
        try:
            # The volume is in use, by the new daemon: only a live mount's own daemon is waited for.
            run([BIN, "unmount", self.vol.mnt], timeout=30)
            self.assertFalse(is_mounted(self.vol.mnt))
            self.assertEqual(read_file(os.path.join(elsewhere, "kept")), self.KEPT)
        finally:
            run([BIN, "unmount", elsewhere])

    def test_a_dead_mount_of_another_volume_is_not_replaced(self):
        other = Volume()
        try:
            self.kill()
            r = run([BIN, "mount", "--log-file", other.log, other.cipher, self.vol.mnt], check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("is a FUSE mount whose daemon has gone", r.stderr)
            self.assertIn("of envelopefs volume " + self.vol.cipher, r.stderr)
            self.assertIn("unmount it first", r.stderr)
            self.assertTrue(is_dead(self.vol.mnt))
            self.assertEqual(mount_count(self.vol.mnt), 1)
        finally:
            other.cleanup()


if __name__ == "__main__":
    main()
