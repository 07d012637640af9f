"""Several threads and processes writing and reading overlapping ranges of shared files,
checked against an in-memory model. Writers to one region are serialized by the test (so the
model is exact), while different regions and files proceed in parallel."""
import multiprocessing
import os
import random
import threading
import unittest

from common import VolumeTest, main, read_file

SIZE = 2 << 20
REGION = 256 << 10


class Concurrency(VolumeTest):
    def test_threads_on_one_file(self):
        p = self.vol.path("shared")
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
        os.ftruncate(fd, SIZE)
        model = bytearray(SIZE)
        locks = [threading.Lock() for _ in range(SIZE // REGION)]
        failures = []

        def worker(seed):
            r = random.Random(seed)
            for _ in range(300):
                region = r.randrange(len(locks))
                base = region * REGION
                off = base + r.randrange(REGION - 1)
                n = r.randrange(1, min(20000, base + REGION - off))
                with locks[region]:
                    if r.random() < 0.6:
                        data = r.randbytes(n)
                        os.pwrite(fd, data, off)
                        model[off:off + n] = data
                    else:
                        got = os.pread(fd, n, off)
                        if got != bytes(model[off:off + n]):
                            failures.append((off, n))

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.close(fd)
        self.assertEqual(failures, [])
        self.assertEqual(read_file(p), bytes(model))
        self.vol.remount()
        self.assertEqual(read_file(p), bytes(model))

    def test_processes_on_shared_files(self):
        def proc(path, seed, q):
            r = random.Random(seed)
            model = bytearray()
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            for _ in range(300):
                off = r.randrange(0, 1 << 20)
                data = r.randbytes(r.randrange(1, 30000))
                os.pwrite(fd, data, off)
                if len(model) < off + len(data):
                    model.extend(bytes(off + len(data) - len(model)))
                model[off:off + len(data)] = data
                if os.pread(fd, len(data), off) != data:
                    q.put("mismatch")
                    return
            os.close(fd)
            q.put(bytes(model))

        q = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=proc, args=(self.vol.path(f"p{i}"), i, q)) for i in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        self.assertNotIn("mismatch", results)
        self.vol.remount()
        on_disk = {read_file(self.vol.path(f"p{i}")) for i in range(4)}
        self.assertEqual(on_disk, set(results))


if __name__ == "__main__":
    main()
