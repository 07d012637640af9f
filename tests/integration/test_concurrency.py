"""Several threads and processes writing and reading overlapping ranges of shared files,
checked against an in-memory model. Writers to one region are serialized by the test (so the
model is exact), while different regions and files proceed in parallel. And processes racing
on names: creating, renaming (files and directories, across directories, over each other),
linking, unlinking and reading the same few names at once, where no model can say which
order won, so every file says what it must hold and the tree is checked for that."""
import errno
import multiprocessing
import os
import random
import threading
import unittest

from common import BIN, VolumeTest, main, read_file, run

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

    def test_processes_racing_on_names(self):
        """Four processes at once on a few shared names in a few shared directories. What each
        call returns depends on who won, so the only errors allowed are the ones a lost race
        gives (the name went away, came back, or is of the other kind); anything else, EIO
        above all, fails. Every file is published whole under a private name first, and its
        bytes name its id, so a reader can check any file it meets; afterwards each inode's
        link count must equal the names found for it, and the same tree must come back after a
        remount, with fsck clean."""
        self.race_and_check()

    def test_processes_racing_on_names_with_few_descriptors(self):
        """The same race with the daemon under a hard limit of 256 descriptors: it keeps 128
        for the inodes the kernel remembers (fs/inode_table.h), so nodes are renamed, linked,
        replaced and removed while their descriptors are closed, or being opened again from
        their file handles by another request."""
        self.vol.remount_with_descriptor_limit(self, 256)
        self.race_and_check()
        reopened = [n for budget, n in self.vol.descriptor_reports() if budget == 128]
        self.assertTrue(reopened and reopened[0] > 0, "the daemon never gave a descriptor back")

    def race_and_check(self):
        root = self.vol.path("race")
        procs, q = start_race(root)
        results = [q.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        self.assertEqual([r for r in results if r != "ok"], [])
        before = check_tree(self, root)
        self.assertGreater(len(before), 20, "the race left almost nothing to check")
        # A listing that met a name in the middle of its unlink or rename is no damage.
        self.assertNotIn("skipping entry", self.vol.log_text())
        self.vol.remount()
        self.assertEqual(check_tree(self, root), before)
        self.vol.unmount()
        fsck = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)


# Errors a lost race gives: the name (or its directory) went away or appeared, a directory
# met a file or a non-empty directory, a directory would move into itself.
RACE_ERRORS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL}
NAMES = [f"n{i}" for i in range(12)] + ["L" * 200 + str(i) for i in range(3)]  # long: stored apart


def start_race(root):
    """Makes `root` with three directories and starts four race_on_names workers in it;
    returns them and the queue each puts its verdict on."""
    os.mkdir(root)
    for d in ("a", "b", "c"):
        os.mkdir(os.path.join(root, d))
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=race_on_names, args=(root, w, q)) for w in range(4)]
    for p in procs:
        p.start()
    return procs, q


def content(ident):
    """A file's bytes: its id first, then bytes that follow from it (1 byte to 40 KiB)."""
    head = f"{ident:010d}|".encode()
    return head + random.Random(ident).randbytes(ident * 7919 % 40000 + 1)


def valid(data):
    try:
        return data == content(int(data[:10]))
    except ValueError:
        return False


def race_on_names(root, worker, q):
    r = random.Random(worker)
    made = 0

    def some_dir():
        dirs = [root] + [os.path.join(dp, d) for dp, dns, _ in os.walk(root) for d in dns]
        return r.choice(dirs)

    def some_entry():
        d = some_dir()
        try:
            names = [n for n in os.listdir(d) if not n.startswith("tmp")]
        except OSError as e:
            if e.errno not in RACE_ERRORS:
                raise
            return None
        return os.path.join(d, r.choice(names)) if names else None

    try:
        for step in range(500):
            op = r.choices(["create", "rename", "link", "unlink", "read", "mkdir", "rmdir", "stat"],
                           weights=[25, 25, 8, 10, 20, 4, 4, 4])[0]
            try:
                if op == "create":
                    made += 1
                    d = some_dir()
                    tmp = os.path.join(d, f"tmp{worker}-{made}")
                    with open(tmp, "xb") as f:
                        f.write(content(worker * 1_000_000 + made))
                    try:
                        os.rename(tmp, os.path.join(d, r.choice(NAMES)))
                    except OSError:
                        os.unlink(tmp)
                        raise
                elif op in ("rename", "link"):
                    src = some_entry()
                    if src is not None:
                        dst = os.path.join(some_dir(), r.choice(NAMES))
                        (os.rename if op == "rename" else os.link)(src, dst)
                elif op == "unlink":
                    e = some_entry()
                    if e is not None and not os.path.isdir(e):
                        os.unlink(e)
                elif op == "read":
                    e = some_entry()
                    if e is not None and not os.path.isdir(e):
                        with open(e, "rb") as f:
                            data = f.read()
                        if not valid(data):
                            q.put(f"{e}: {len(data)} bytes that are no file's ({data[:11]!r})")
                            return
                elif op == "mkdir":
                    os.mkdir(os.path.join(some_dir(), r.choice(NAMES)))
                elif op == "rmdir":
                    e = some_entry()
                    if e is not None and os.path.isdir(e) and e.rsplit("/", 1)[-1] in NAMES:
                        os.rmdir(e)
                elif op == "stat":
                    e = some_entry()
                    if e is not None:
                        os.lstat(e)
            except OSError as e:
                # A link made to a name that is (or has just become) a directory: EPERM.
                if e.errno not in RACE_ERRORS and not (op == "link" and e.errno == errno.EPERM):
                    q.put(f"step {step} {op}: {e}")
                    return
        q.put("ok")
    except Exception as e:  # a crash of the worker is a failure, not a hang
        q.put(f"worker {worker}: {e!r}")


def check_tree(test, root, unpublished_ok=False):
    """Every file under root holds a whole file's bytes, and each inode's link count is the
    number of names found for it. Returns {relative path: file id or 'dir'}. With
    `unpublished_ok` (after a crash), a file still under its private name may hold part of
    its bytes, but must read without error like the rest."""
    def unreadable(e):
        raise e  # os.walk would skip a directory that fails to list (EIO): not here

    found, names_of = {}, {}
    for dp, dns, fns in os.walk(root, onerror=unreadable):
        for d in dns:
            found[os.path.relpath(os.path.join(dp, d), root)] = "dir"
        for n in fns:
            p = os.path.join(dp, n)
            data = read_file(p)
            if unpublished_ok and n.startswith("tmp"):
                found[os.path.relpath(p, root)] = "unpublished"
            else:
                test.assertTrue(valid(data), f"{p}: {len(data)} bytes that are no file's")
                found[os.path.relpath(p, root)] = int(data[:10])
            st = os.lstat(p)
            names_of.setdefault(st.st_ino, [st.st_nlink, 0])[1] += 1
    test.assertEqual({i: v for i, v in names_of.items() if v[0] != v[1]}, {},
                     "inodes whose link count is not the number of their names")
    return found


if __name__ == "__main__":
    main()
