"""kill -9 of the daemon in the middle of writes: after remounting, everything fsynced is
intact and every block reads as a version that was written to it (never EIO). And in the
middle of processes racing on names (test_concurrency's race): every name still reads, every
file published under one is whole, link counts match, and fsck finds nothing."""
import os
import random
import threading
import time

from common import BIN, Volume, main, read_file, run
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


if __name__ == "__main__":
    main()
