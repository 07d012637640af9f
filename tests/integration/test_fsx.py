"""fsx-style random operations on one file against an in-memory model of its bytes.

Writes at any offset and length, O_APPEND writes, truncates both ways (and opens with
O_TRUNC), every fallocate mode the daemon supports, writes through a shared mapping,
copy_file_range from another file, reads and sizes checked after every step, and remounts in
between: the places where a block format goes wrong (partial edge blocks, a tail that grows or
shrinks across a block or a metadata-page group, holes next to data, a reopened file's cached
state) are all reached many times over.
A failure names the seed and the operations that led to it."""
import mmap
import os
import random

from common import BIN, Volume, fallocate, main, run
import unittest

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
GROUP = 31  # data blocks per metadata page (fs/layout.h)


class Fsx(unittest.TestCase):
    def run_fsx(self, seed, block_size, ops, remounts, mount_args=()):
        vol = Volume(block_size)
        try:
            vol.mount(*mount_args)
            r = random.Random(seed)
            # Offsets cluster around block and metadata-group edges as well as anywhere.
            span = 3 * GROUP * block_size + 5 * block_size
            edges = [k * block_size for k in range(span // block_size + 1)]
            edges += [k * GROUP * block_size for k in range(4)]

            def offset():
                if r.random() < 0.5:
                    return max(0, r.choice(edges) + r.randrange(-3, 4))
                return r.randrange(0, span)

            def length():
                return r.choice([1, 2, r.randrange(1, 100), block_size - 1, block_size, block_size + 1,
                                 r.randrange(1, 3 * block_size), r.randrange(1, GROUP * block_size + 2)])

            path = vol.path("fsx")
            src_path = vol.path("src")
            src = r.randbytes(span)
            with open(src_path, "wb") as f:
                f.write(src)
            model = bytearray()
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            log = []

            # The model's three kinds of change; every operation below is made of them.
            def grow_to(end):
                model.extend(bytes(max(0, end - len(model))))

            def put(off, data):
                grow_to(off + len(data))
                model[off:off + len(data)] = data

            def zero(off, n):
                end = min(off + n, len(model))
                if off < end:
                    model[off:end] = bytes(end - off)

            def check(what):
                size = os.fstat(fd).st_size
                self.assertEqual(size, len(model), f"size after {what}; seed {seed}, last ops {log[-12:]}")

            def same(got, start, what):
                want = bytes(model[start:start + len(got)]) if start < len(model) else b""
                if got != want:
                    first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                                 min(len(got), len(want)))
                    self.fail(f"{what}: byte {start + first} differs (read {len(got)} bytes, model has "
                              f"{len(want)}); seed {seed}, last ops {log[-12:]}")

            def check_all(what):
                check(what)
                same(os.pread(fd, len(model) + block_size, 0), 0, f"content after {what}")

            remount_at = set(r.sample(range(ops // 4, ops), remounts))
            for step in range(ops):
                op = r.choices(["write", "append", "read", "truncate", "falloc", "punch", "zero",
                                "mmap", "copy", "fsync", "reopen", "o_trunc"],
                               weights=[30, 6, 20, 8, 5, 6, 5, 5, 5, 3, 3, 1])[0]
                off, n = offset(), length()
                if op == "write":
                    data = r.randbytes(n)
                    self.assertEqual(os.pwrite(fd, data, off), n)
                    put(off, data)
                    log.append(("write", off, n))
                elif op == "append":
                    data = r.randbytes(n)
                    afd = os.open(path, os.O_WRONLY | os.O_APPEND)
                    try:
                        self.assertEqual(os.write(afd, data), n)
                    finally:
                        os.close(afd)
                    model.extend(data)
                    log.append(("append", n))
                elif op == "read":
                    log.append(("read", off, n))
                    got = os.pread(fd, n, off)
                    self.assertEqual(len(got), max(0, min(n, len(model) - off)), f"read {off}+{n} length")
                    same(got, off, f"read {off}+{n}")
                elif op == "truncate":
                    size = r.choice([0, off, off, len(model) + r.randrange(-block_size, block_size)])
                    size = max(0, size)
                    os.ftruncate(fd, size)
                    del model[size:]
                    grow_to(size)
                    log.append(("truncate", size))
                elif op == "falloc":
                    keep = r.random() < 0.5
                    fallocate(fd, FALLOC_FL_KEEP_SIZE if keep else 0, off, n)
                    if not keep:
                        grow_to(off + n)
                    log.append(("falloc", "keep" if keep else "grow", off, n))
                elif op == "punch":
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
                    zero(off, n)
                    log.append(("punch", off, n))
                elif op == "zero":
                    keep = r.random() < 0.5
                    fallocate(fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), off, n)
                    if not keep:
                        grow_to(off + n)
                    zero(off, n)
                    log.append(("zero", "keep" if keep else "grow", off, n))
                elif op == "mmap":
                    if not model:
                        continue
                    off = r.randrange(0, len(model))
                    n = min(n, len(model) - off)
                    data = r.randbytes(n)
                    with mmap.mmap(fd, len(model)) as m:
                        m[off:off + n] = data
                        m.flush()
                    put(off, data)
                    log.append(("mmap", off, n))
                elif op == "copy":
                    src_off = r.randrange(0, len(src))
                    n = min(n, len(src) - src_off)
                    sfd = os.open(src_path, os.O_RDONLY)
                    try:
                        done = 0
                        while done < n:
                            k = os.copy_file_range(sfd, fd, n - done, src_off + done, off + done)
                            self.assertGreater(k, 0)
                            done += k
                    finally:
                        os.close(sfd)
                    put(off, src[src_off:src_off + n])
                    log.append(("copy", src_off, off, n))
                elif op == "fsync":
                    os.fsync(fd)
                    log.append(("fsync",))
                elif op == "reopen":
                    os.close(fd)
                    fd = os.open(path, os.O_RDWR)
                    log.append(("reopen",))
                elif op == "o_trunc":  # a shell's `>`: the open itself empties the file
                    os.close(fd)
                    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
                    del model[:]
                    log.append(("o_trunc",))
                check(op)
                if step in remount_at:
                    check_all("the operations before a remount")
                    os.close(fd)
                    vol.remount(*mount_args)
                    fd = os.open(path, os.O_RDWR)
                    log.append(("remount",))
                    check_all("a remount")
            check_all("the last operation")
            os.close(fd)
            vol.remount(*mount_args)
            fd = os.open(path, os.O_RDONLY)
            check_all("the final remount")
            os.close(fd)
            vol.unmount()
            fsck = run([BIN, "fsck", "-q", vol.cipher], check=False)
            self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)
        finally:
            vol.cleanup()

    def test_4k_blocks(self):
        self.run_fsx(seed=1, block_size=4096, ops=1500, remounts=3)

    def test_16k_blocks(self):
        self.run_fsx(seed=2, block_size=16384, ops=1000, remounts=3)

    def test_without_writeback_cache(self):
        self.run_fsx(seed=3, block_size=4096, ops=800, remounts=2, mount_args=("--no-writeback",))

    def test_direct_backing(self):
        # Whole aligned blocks and pages go to the backing file with O_DIRECT on the io_uring
        # backend; a partial tail block still goes through the page cache. Both must agree.
        self.run_fsx(seed=4, block_size=4096, ops=800, remounts=2, mount_args=("--direct-backing",))


if __name__ == "__main__":
    main()
