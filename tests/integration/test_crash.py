"""kill -9 of the daemon in the middle of writes: after remounting, everything fsynced is
intact and every block reads as a version that was written to it (never EIO)."""
import os
import random
import threading
import time

from common import Volume, main, read_file
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


if __name__ == "__main__":
    main()
