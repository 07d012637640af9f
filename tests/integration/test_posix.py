"""POSIX behaviour of a mounted volume: round trips across remount, confidentiality of the
cipher dir, and the operations a local filesystem must support."""
import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import multiprocessing
import os
import resource
import stat
import subprocess
import sys

from common import (BIN, TRANSPORT, Volume, VolumeTest, fallocate, is_mounted, libc, main, rand_bytes,
                    read_file, renameat2, run, write_file)

SIZES = [0, 1, 100, 4095, 4096, 4097, 31 * 4096 - 1, 31 * 4096, 31 * 4096 + 1, (1 << 20) + 3, 5 << 20]


class RoundTrip(VolumeTest):
    def test_random_files_of_many_sizes_survive_remount(self):
        files = {f"f{n}": rand_bytes(n, seed=n) for n in SIZES}
        for name, data in files.items():
            write_file(self.vol.path(name), data)
        for name, data in files.items():
            self.assertEqual(read_file(self.vol.path(name)), data, name)
        self.vol.remount()
        for name, data in files.items():
            self.assertEqual(os.stat(self.vol.path(name)).st_size, len(data), name)
            self.assertEqual(read_file(self.vol.path(name)), data, name)

    def test_o_trunc_empties_the_file_for_good(self):
        """open(O_TRUNC), a shell's `>`: the kernel leaves the truncation to the open and
        believes the file empty from then on, so one not done there shows only later, when
        the old size and bytes come back: after a remount, once the kernel drops the inode
        (with the writeback cache it keeps its own size until then), or at once without it."""
        p, q, r = self.vol.path("t"), self.vol.path("u"), self.vol.path("v")
        for name in (p, q, r):
            write_file(name, rand_bytes(50000, 9))
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"short")
        os.close(fd)
        os.close(os.open(q, os.O_WRONLY | os.O_TRUNC))
        subprocess.run(["sh", "-c", f"echo hi > {r}"], check=True)
        expected = {p: b"short", q: b"", r: b"hi\n"}
        for name, data in expected.items():
            self.assertEqual(read_file(name), data)
        self.vol.remount()
        for name, data in expected.items():
            self.assertEqual(os.stat(name).st_size, len(data), name)
            self.assertEqual(read_file(name), data, name)

    def test_names_made_right_after_mkdir_survive_remount(self):
        # The daemon keeps a new directory's nonce from its mkdir; the names it encrypts with it
        # must be the ones the nonce on disk decrypts after a remount.
        paths = []
        for a in range(3):
            os.mkdir(self.vol.path(f"d{a}"))
            for b in range(3):
                os.mkdir(self.vol.path(f"d{a}", f"e{b}"))
                p = self.vol.path(f"d{a}", f"e{b}", f"file-{a}-{b}")
                write_file(p, p.encode())
                paths.append(p)
        self.vol.remount()
        for p in paths:
            self.assertEqual(read_file(p), p.encode())
        self.assertEqual(sorted(os.listdir(self.vol.path("d1", "e2"))), ["file-1-2"])

    def test_nothing_plaintext_in_cipher_dir(self):
        os.mkdir(self.vol.path("dir-MARKER"))
        write_file(self.vol.path("dir-MARKER", "name-MARKER.txt"), b"CONTENT-MARKER " * 5000)
        os.symlink("target-MARKER", self.vol.path("link-MARKER"))
        os.setxattr(self.vol.path("dir-MARKER", "name-MARKER.txt"), "user.xname-MARKER", b"XVALUE-MARKER")
        self.vol.unmount()
        for d, dirs, files in os.walk(self.vol.cipher):
            for n in dirs + files:
                self.assertNotIn("MARKER", n)
                p = os.path.join(d, n)
                if os.path.islink(p):
                    self.assertNotIn("MARKER", os.readlink(p))
                elif os.path.isfile(p):
                    self.assertNotIn(b"MARKER", read_file(p))
                    for x in os.listxattr(p):
                        self.assertNotIn("MARKER", x)
                        self.assertNotIn(b"MARKER", os.getxattr(p, x))
        self.vol.mount()
        self.assertEqual(os.readlink(self.vol.path("link-MARKER")), "target-MARKER")


class RoundTrip16K(RoundTrip):
    block_size = 16384


class RoundTripNoUring(RoundTrip):
    mount_args = ("--no-uring", "--no-writeback")


class RoundTripDirectBacking(RoundTrip):
    mount_args = ("--direct-backing",)


def resident_bytes(path):
    from common import run
    return int(run(["fincore", "--bytes", "--noheadings", "--output", "RES", path]).stdout.strip() or 0)


class DirectBacking(VolumeTest):
    mount_args = ("--direct-backing",)

    def test_ciphertext_is_not_cached_twice(self):
        data = rand_bytes(16 << 20, 3)
        write_file(self.vol.path("big"), data, fsync=True)
        self.assertEqual(read_file(self.vol.path("big")), data)
        (back,) = self.vol.backing_files()
        self.assertLess(resident_bytes(back), 1 << 20)
        # The same reads without the option leave the ciphertext in the page cache.
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("big")), data)
        self.assertGreater(resident_bytes(back), 8 << 20)


class Namespace(VolumeTest):
    def test_rename_over_existing_and_flags(self):
        write_file(self.vol.path("a"), b"A")
        write_file(self.vol.path("b"), b"B")
        os.rename(self.vol.path("a"), self.vol.path("b"))
        self.assertFalse(os.path.exists(self.vol.path("a")))
        self.assertEqual(read_file(self.vol.path("b")), b"A")
        write_file(self.vol.path("c"), b"C")
        with self.assertRaises(OSError) as cm:
            renameat2(self.vol.path("c"), self.vol.path("b"), 1)  # RENAME_NOREPLACE
        self.assertEqual(cm.exception.errno, errno.EEXIST)
        renameat2(self.vol.path("c"), self.vol.path("b"), 2)  # RENAME_EXCHANGE
        self.assertEqual(read_file(self.vol.path("b")), b"C")
        self.assertEqual(read_file(self.vol.path("c")), b"A")
        os.mkdir(self.vol.path("d"))
        os.rename(self.vol.path("c"), self.vol.path("d", "moved"))
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("d", "moved")), b"A")

    def test_hard_links(self):
        write_file(self.vol.path("x"), b"one")
        os.mkdir(self.vol.path("sub"))
        os.link(self.vol.path("x"), self.vol.path("sub", "y"))
        self.assertEqual(os.stat(self.vol.path("x")).st_nlink, 2)
        self.assertEqual(os.stat(self.vol.path("x")).st_ino, os.stat(self.vol.path("sub", "y")).st_ino)
        with open(self.vol.path("sub", "y"), "r+b") as f:
            f.write(b"two")
        self.assertEqual(read_file(self.vol.path("x")), b"two")
        os.unlink(self.vol.path("x"))
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("sub", "y")), b"two")
        self.assertEqual(os.stat(self.vol.path("sub", "y")).st_nlink, 1)

    def test_unlink_while_open(self):
        fd = os.open(self.vol.path("tmp"), os.O_CREAT | os.O_RDWR, 0o600)
        os.unlink(self.vol.path("tmp"))
        os.pwrite(fd, b"still here" * 1000, 0)
        self.assertEqual(os.pread(fd, 10, 9990), b"still here")
        os.close(fd)
        self.assertEqual(os.listdir(self.vol.mnt), [])

    def test_mkdir_rmdir_and_long_names(self):
        os.makedirs(self.vol.path("a", "b", "c"))
        with self.assertRaises(OSError) as cm:
            os.rmdir(self.vol.path("a"))
        self.assertEqual(cm.exception.errno, errno.ENOTEMPTY)
        write_file(self.vol.path("a", "b", "c", "f"), b"x")  # the directory still works
        long_name = "L" * 255
        write_file(self.vol.path("a", long_name), b"long")
        os.mkdir(self.vol.path("a", "D" * 250))
        os.rename(self.vol.path("a", long_name), self.vol.path("a", "M" * 254))
        self.assertEqual(sorted(os.listdir(self.vol.path("a"))), sorted(["b", "D" * 250, "M" * 254]))
        with self.assertRaises(OSError) as cm:
            write_file(self.vol.path("a", "N" * 256), b"")
        self.assertEqual(cm.exception.errno, errno.ENAMETOOLONG)
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("a", "M" * 254)), b"long")
        os.unlink(self.vol.path("a", "M" * 254))
        os.rmdir(self.vol.path("a", "D" * 250))
        os.unlink(self.vol.path("a", "b", "c", "f"))
        os.rmdir(self.vol.path("a", "b", "c"))
        for d, dirs, files in os.walk(self.vol.cipher):
            for n in dirs + files:
                self.assertLessEqual(len(n), 255)
        self.assertEqual(os.listdir(self.vol.path("a")), ["b"])

    def test_many_files_and_symlinks(self):
        names = {f"file-{i:04d}" for i in range(600)}
        for n in names:
            write_file(self.vol.path(n), n.encode())
        os.symlink("file-0001", self.vol.path("lnk"))
        os.symlink("/" + "t" * 2000, self.vol.path("longlink"))
        self.vol.remount()
        self.assertEqual(set(os.listdir(self.vol.mnt)), names | {"lnk", "longlink"})
        self.assertEqual(read_file(self.vol.path("lnk")), b"file-0001")
        self.assertEqual(os.readlink(self.vol.path("longlink")), "/" + "t" * 2000)
        self.assertEqual(os.lstat(self.vol.path("lnk")).st_size, len("file-0001"))

    def test_more_files_than_the_usual_open_file_limit(self):
        """Every inode the kernel remembers holds a descriptor in the daemon. Started under
        the usual soft limit of 1024 (a login shell's, a systemd service's), the daemon must
        raise it, or the thousandth new file fails with EMFILE."""
        self.vol.unmount()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 4000:
            self.skipTest(f"the hard open file limit here is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            self.vol.mount()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.mkdir(self.vol.path("many"))
        for i in range(3000):
            write_file(self.vol.path("many", f"f{i}"), b"%d" % i)
        self.assertEqual(len(os.listdir(self.vol.path("many"))), 3000)
        for i in range(0, 3000, 7):
            self.assertEqual(read_file(self.vol.path("many", f"f{i}")), b"%d" % i)

    def test_a_tree_larger_than_the_descriptor_limit(self):
        """The kernel remembers inodes until memory runs short, so a walk over a large tree
        can leave more of them than the daemon may hold descriptors (fs.nr_open, 1,048,576,
        for root; the hard limit for anyone else). Under a hard limit of 512 the daemon keeps
        256 of them and opens the others again from their file handles: a tree of 3,000
        nodes must then read, change and survive a remount as any other, and a file unlinked
        while a process still holds it must still answer."""
        self.vol.remount_with_descriptor_limit(self, 512)
        root = self.vol.path("tree")
        os.mkdir(root)
        expect, links = {}, {}

        def at(d, name):
            return os.path.join(root, f"d{d}", name)

        for d in range(30):
            os.mkdir(os.path.join(root, f"d{d}"))
            for f in range(100):
                expect[at(d, f"f{f}")] = b"%d/%d" % (d, f)
                write_file(at(d, f"f{f}"), expect[at(d, f"f{f}")])
        for d in range(30):
            os.symlink("f0", at(d, "link"))
            links[at(d, "link")] = "f0"
            os.link(at(d, "f1"), at((d + 1) % 30, "hard"))
            expect[at((d + 1) % 30, "hard")] = expect[at(d, "f1")]
            os.setxattr(at(d, "f2"), "user.k", b"v%d" % d)
        # Held by path only (no FUSE open), then unlinked: its last link is gone.
        held = os.open(at(0, "f3"), os.O_PATH)
        os.unlink(at(0, "f3"))
        del expect[at(0, "f3")]

        def check():
            for p, data in expect.items():
                self.assertEqual(read_file(p), data, p)
            for p, target in links.items():
                self.assertEqual(os.readlink(p), target, p)
                self.assertEqual(read_file(p), expect[os.path.join(os.path.dirname(p), target)], p)
            for d in range(30):
                self.assertEqual(os.getxattr(at(d, "f2"), "user.k"), b"v%d" % d)
                self.assertEqual(os.stat(at(d, "f1")).st_nlink, 2)

        check()
        try:
            # statx with AT_STATX_FORCE_SYNC: the kernel asks the daemon, not its cache.
            buf = ctypes.create_string_buffer(256)
            rc = libc.statx(held, b"", 0x1000 | 0x2000, 0xFFF, buf)  # AT_EMPTY_PATH
            self.assertEqual(rc, 0, os.strerror(ctypes.get_errno()))
            self.assertEqual(int.from_bytes(buf.raw[16:20], "little"), 0, "st_nlink of an unlinked file")
        finally:
            os.close(held)
        for d in range(0, 30, 2):  # moves, mode and time changes, removals of known nodes
            for f in range(10, 20):
                os.rename(at(d, f"f{f}"), at(d + 1, f"m{f}"))
                expect[at(d + 1, f"m{f}")] = expect.pop(at(d, f"f{f}"))
            os.chmod(at(d, "f20"), 0o600)
            os.utime(at(d, "link"), ns=(5 * 10**18, 5 * 10**18), follow_symlinks=False)
            for f in range(30, 40):
                os.unlink(at(d, f"f{f}"))
                del expect[at(d, f"f{f}")]
        for f in list(os.listdir(os.path.join(root, "d29"))):
            os.unlink(at(29, f))
            expect.pop(at(29, f), None)
            links.pop(at(29, f), None)
        os.rmdir(os.path.join(root, "d29"))
        os.setxattr(at(1, "f2"), "user.k", b"changed")
        check_changes = [(at(0, "f20"), 0o600), (at(2, "f20"), 0o600)]

        def check_all():
            self.assertEqual(sorted(os.listdir(root)), sorted(f"d{d}" for d in range(29)))
            names = {os.path.join(root, d, n) for d in os.listdir(root) for n in os.listdir(os.path.join(root, d))}
            self.assertEqual(names, set(expect) | set(links))
            for p, data in expect.items():
                self.assertEqual(read_file(p), data, p)
            for p, mode in check_changes:
                self.assertEqual(stat.S_IMODE(os.stat(p).st_mode), mode, p)
            self.assertEqual(os.lstat(at(4, "link")).st_mtime_ns, 5 * 10**18)
            self.assertEqual(os.getxattr(at(1, "f2"), "user.k"), b"changed")

        check_all()
        self.vol.unmount()
        budget, reopened = self.vol.descriptor_reports()[-1]
        self.assertEqual(budget, 256)
        self.assertGreater(reopened, 0, "the daemon never gave a descriptor back")
        self.vol.mount()
        check_all()
        self.vol.unmount()
        self.assertEqual(run([BIN, "fsck", "-q", self.vol.cipher], check=False).returncode, 0)
        self.vol.mount()


class EmptyDirectories(VolumeTest):
    def _backing_dir(self, name):
        """The one backing directory directly under the cipher root (the test makes only one)."""
        dirs = [d for d in os.listdir(self.vol.cipher) if os.path.isdir(os.path.join(self.vol.cipher, d))]
        self.assertEqual(len(dirs), 1, name)
        return os.path.join(self.vol.cipher, dirs[0])

    def test_rename_directory_over_empty_directory(self):
        os.makedirs(self.vol.path("src", "inner"))
        write_file(self.vol.path("src", "inner", "f"), b"payload")
        os.mkdir(self.vol.path("dst"))
        os.rename(self.vol.path("src"), self.vol.path("dst"))
        self.assertFalse(os.path.exists(self.vol.path("src")))
        self.assertEqual(read_file(self.vol.path("dst", "inner", "f")), b"payload")
        os.mkdir(self.vol.path("other"))
        with self.assertRaises(OSError) as cm:  # a non-empty target is still refused, intact
            os.rename(self.vol.path("other"), self.vol.path("dst"))
        self.assertEqual(cm.exception.errno, errno.ENOTEMPTY)
        os.mkdir(self.vol.path("empty"))
        with self.assertRaises(OSError) as cm:  # a file never replaces a directory
            write_file(self.vol.path("file"), b"x")
            os.rename(self.vol.path("file"), self.vol.path("empty"))
        self.assertEqual(cm.exception.errno, errno.EISDIR)
        write_file(self.vol.path("empty", "still-usable"), b"y")
        self.vol.remount()
        self.assertEqual(sorted(os.listdir(self.vol.mnt)), ["dst", "empty", "file", "other"])
        self.assertEqual(read_file(self.vol.path("dst", "inner", "f")), b"payload")
        self.assertEqual(read_file(self.vol.path("empty", "still-usable")), b"y")

    def _nonce_entries(self, where):
        return [n for n in os.listdir(where) if n.startswith("envelopefs.dirnonce")]

    def test_directory_nonce_is_the_name_of_an_empty_file(self):
        # fs/FORMAT.md, "Names": envelopefs.dirnonce.<base64url(16 bytes)>, no content to fsync.
        os.mkdir(self.vol.path("d"))
        self.vol.unmount()
        seen = []
        for where in (self.vol.cipher, self._backing_dir("d")):
            names = self._nonce_entries(where)
            self.assertEqual(len(names), 1, where)
            self.assertRegex(names[0], r"^envelopefs\.dirnonce\.[A-Za-z0-9_-]{22}$")
            st = os.lstat(os.path.join(where, names[0]))
            self.assertTrue(stat.S_ISREG(st.st_mode))
            self.assertEqual(st.st_size, 0)
            seen.append(names[0])
        self.assertNotEqual(seen[0], seen[1])
        self.vol.mount()
        self.assertEqual(os.listdir(self.vol.path("d")), [])
        os.rmdir(self.vol.path("d"))
        self.assertEqual(os.listdir(self.vol.mnt), [])

    def test_copy_of_the_cipher_dir_without_attributes_still_reads(self):
        # What a backup with cp -r or rsync -r (no -a, no xattrs, no links) keeps is enough.
        os.makedirs(self.vol.path("a", "b"))
        write_file(self.vol.path("a", "b", "f"), b"backed up")
        self.vol.unmount()
        copy = self.vol.cipher + ".copy"
        subprocess.run(["cp", "-r", self.vol.cipher, copy], check=True)
        os.rename(self.vol.cipher, self.vol.cipher + ".orig")
        os.rename(copy, self.vol.cipher)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("a", "b", "f")), b"backed up")

    def test_empty_directory_that_lost_its_nonce_is_healed(self):
        # What a crash between "nonce out" and the rmdir/rename leaves behind.
        os.mkdir(self.vol.path("d"))
        self.vol.unmount()
        for n in self._nonce_entries(self._backing_dir("d")):
            os.unlink(os.path.join(self._backing_dir("d"), n))
        self.vol.mount()
        write_file(self.vol.path("d", "f"), b"z")
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("d", "f")), b"z")

    def test_empty_directory_with_two_nonces_fails_closed(self):
        os.mkdir(self.vol.path("d"))
        self.vol.unmount()
        d = self._backing_dir("d")
        open(os.path.join(d, "envelopefs.dirnonce." + "A" * 22), "w").close()  # a second one
        self.vol.mount()
        for op in (lambda: os.listdir(self.vol.path("d")), lambda: os.rmdir(self.vol.path("d"))):
            with self.assertRaises(OSError) as cm:
                op()
            self.assertEqual(cm.exception.errno, errno.EIO)
        self.assertEqual(len(self._nonce_entries(d)), 2)  # nothing removed

    def test_non_empty_directory_without_nonce_fails_closed(self):
        os.mkdir(self.vol.path("d"))
        write_file(self.vol.path("d", "f"), b"z")
        self.vol.unmount()
        for n in self._nonce_entries(self._backing_dir("d")):
            os.unlink(os.path.join(self._backing_dir("d"), n))
        self.vol.mount()
        with self.assertRaises(OSError) as cm:
            os.listdir(self.vol.path("d"))
        self.assertEqual(cm.exception.errno, errno.EIO)


class Ownership(VolumeTest):
    mount_args = ("--allow-other",)

    def as_user(self, uid, gid, fn):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(gid)
                os.setuid(uid)
                fn()
                os._exit(0)
            except BaseException as e:  # report to the parent through the exit code
                print("child:", repr(e))
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def test_modes_are_masked_once_and_setuid_survives_create(self):
        os.chmod(self.vol.mnt, 0o777)
        old = os.umask(0)
        try:
            os.close(os.open(self.vol.path("open"), os.O_CREAT | os.O_WRONLY, 0o777))
            os.mkdir(self.vol.path("dir"), 0o777)
            os.close(os.open(self.vol.path("suid"), os.O_CREAT | os.O_WRONLY, 0o4755))
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.vol.path("open")).st_mode), 0o777)
        self.assertEqual(stat.S_IMODE(os.stat(self.vol.path("dir")).st_mode), 0o777)
        self.assertEqual(stat.S_IMODE(os.stat(self.vol.path("suid")).st_mode), 0o4755)

        def create_as_user():
            os.umask(0o022)
            os.close(os.open(self.vol.path("user-file"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(self.vol.path("user-dir"))
            os.symlink("user-file", self.vol.path("user-link"))
        self.as_user(65534, 65534, create_as_user)
        for n, mode in (("user-file", 0o644), ("user-dir", 0o755)):
            st = os.stat(self.vol.path(n))
            self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (65534, 65534, mode), n)
        self.assertEqual(os.lstat(self.vol.path("user-link")).st_uid, 65534)

    def test_unprivileged_write_truncate_and_o_trunc_clear_setuid(self):
        # The kernel leaves this to envelopefs (FUSE_HANDLE_KILLPRIV_V2, fs/fuse_channel.h).
        f = self.vol.path("suid")
        write_file(f, b"x" * 10000)
        mode = lambda: stat.S_IMODE(os.stat(f).st_mode)

        def append():
            with open(f, "ab") as fh:
                fh.write(b"more")
        for action in (append, lambda: os.truncate(f, 100),
                       lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))):
            os.chmod(f, 0o6777)
            self.as_user(65534, 65534, action)
            self.assertEqual(mode(), 0o777, action)
        os.chmod(f, 0o2666)  # set-group-ID without group execute is a locking mark: it stays
        self.as_user(65534, 65534, append)
        self.assertEqual(mode(), 0o2666)
        os.chmod(f, 0o6777)  # root (CAP_FSETID) keeps the bits
        append()
        self.assertEqual(mode(), 0o6777)
        os.setxattr(f, "user.still", b"works")  # xattrs are unaffected
        self.assertEqual(os.getxattr(f, "user.still"), b"works")

    def test_setgid_directory_passes_its_group_down(self):
        os.mkdir(self.vol.path("shared"))
        os.chown(self.vol.path("shared"), 0, 4321)
        os.chmod(self.vol.path("shared"), 0o2777)

        def create_as_user():
            write_file(self.vol.path("shared", "f"), b"x")
            os.mkdir(self.vol.path("shared", "sub"))
        self.as_user(65534, 65534, create_as_user)
        self.assertEqual(os.stat(self.vol.path("shared", "f")).st_gid, 4321)
        sub = os.stat(self.vol.path("shared", "sub"))
        self.assertEqual(sub.st_gid, 4321)
        self.assertTrue(sub.st_mode & stat.S_ISGID)


class LongSymlinkTargets(VolumeTest):
    def records(self):
        d = os.path.join(self.vol.cipher, "envelopefs.symlinks")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def test_targets_up_to_path_max_round_trip_and_records_follow_links(self):
        targets = {n: "/".join(["d" * 200] * 30)[:n] for n in (3000, 3500, 4095)}
        for n, t in targets.items():
            os.symlink(t, self.vol.path(f"l{n}"))
        with self.assertRaises(OSError) as cm:  # the kernel's own limit still holds
            os.symlink("x" * 4096, self.vol.path("too-long"))
        self.assertEqual(cm.exception.errno, errno.ENAMETOOLONG)
        self.assertEqual(len(self.records()), 2)  # 3000 fits inline; 3500 and 4095 do not
        os.link(self.vol.path("l4095"), self.vol.path("hard"), follow_symlinks=False)
        self.vol.remount()
        for n, t in targets.items():
            self.assertEqual(os.readlink(self.vol.path(f"l{n}")), t)
            self.assertEqual(os.lstat(self.vol.path(f"l{n}")).st_size, n)
        self.assertEqual(os.readlink(self.vol.path("hard")), targets[4095])
        self.assertEqual(run([BIN, "fsck", "-q", self.vol.cipher], check=False).returncode, 0)
        os.unlink(self.vol.path("l4095"))  # one link left: the record stays
        self.assertEqual(os.readlink(self.vol.path("hard")), targets[4095])
        self.assertEqual(len(self.records()), 2)
        os.unlink(self.vol.path("hard"))
        self.assertEqual(len(self.records()), 1)
        write_file(self.vol.path("plain"), b"x")
        os.rename(self.vol.path("plain"), self.vol.path("l3500"))  # replacing the symlink drops it
        self.assertEqual(self.records(), [])
        self.assertNotIn("envelopefs.symlinks", os.listdir(self.vol.mnt))

    def test_missing_record_is_eio_not_a_wrong_target(self):
        os.symlink("t" * 4000, self.vol.path("l"))
        self.vol.unmount()
        for r in self.records():
            os.unlink(os.path.join(self.vol.cipher, "envelopefs.symlinks", r))
        self.vol.mount()
        with self.assertRaises(OSError) as cm:
            os.readlink(self.vol.path("l"))
        self.assertEqual(cm.exception.errno, errno.EIO)


class FileOps(VolumeTest):
    def test_sparse_holes_and_truncate_both_ways(self):
        p = self.vol.path("sparse")
        with open(p, "wb") as f:
            f.write(b"head")
            f.seek(50 << 20)
            f.write(b"tail")
        self.assertEqual(os.stat(p).st_size, (50 << 20) + 4)
        with open(p, "rb") as f:
            f.seek(20 << 20)
            self.assertEqual(f.read(1 << 20), bytes(1 << 20))
        os.truncate(p, 3)
        self.assertEqual(read_file(p), b"hea")
        os.truncate(p, 10000)
        self.assertEqual(read_file(p), b"hea" + bytes(9997))
        self.vol.remount()
        self.assertEqual(read_file(p), b"hea" + bytes(9997))

    def test_fallocate_and_punch_hole(self):
        p = self.vol.path("fa")
        write_file(p, rand_bytes(100000, 1))
        fd = os.open(p, os.O_RDWR)
        os.posix_fallocate(fd, 0, 300000)
        self.assertEqual(os.fstat(fd).st_size, 300000)
        fallocate(fd, 0x01 | 0x02, 8192, 16384)  # KEEP_SIZE | PUNCH_HOLE
        os.close(fd)
        data = read_file(p)
        want = bytearray(rand_bytes(100000, 1) + bytes(200000))
        want[8192:8192 + 16384] = bytes(16384)
        self.assertEqual(data, bytes(want))

    def backing_of(self, path):
        ino = os.stat(path).st_ino
        found = [b for b in self.vol.backing_files() if os.stat(b).st_ino == ino]
        self.assertEqual(len(found), 1)
        return found[0]

    def test_an_empty_new_file_writes_nothing_until_its_first_write(self):
        # A created file's header goes out with its first change (fs/FORMAT.md): until then
        # its backing file is empty, which is an empty file, across a remount too.
        p = self.vol.path("touched")
        write_file(p, b"")
        self.assertEqual(os.path.getsize(self.backing_of(p)), 0)
        self.vol.remount()
        self.assertEqual(os.stat(p).st_size, 0)
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"")
        with open(p, "ab") as f:
            f.write(b"first words")
        self.vol.remount()
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"first words")
        self.assertEqual(os.path.getsize(self.backing_of(p)), 4096 + len(b"first words"))

    def test_fallocate_reserves_backing_space(self):
        # posix_fallocate promises that writes into the range will not run out of space: the
        # backing file must really hold the blocks, not be grown sparse.
        p = self.vol.path("prealloc")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"head")
        os.posix_fallocate(fd, 0, 8 << 20)
        self.assertEqual(os.fstat(fd).st_size, 8 << 20)
        back = os.stat(self.backing_of(p))
        self.assertGreaterEqual(back.st_blocks * 512, back.st_size)
        # KEEP_SIZE past the end: reserved, size unchanged, and still reserved after close.
        q = self.vol.path("keep")
        fd2 = os.open(q, os.O_RDWR | os.O_CREAT, 0o644)
        fallocate(fd2, 0x01, 0, 4 << 20)  # FALLOC_FL_KEEP_SIZE
        self.assertEqual(os.fstat(fd2).st_size, 0)
        os.close(fd2)
        self.assertGreaterEqual(os.stat(self.backing_of(q)).st_blocks * 512, 4 << 20)
        self.assertEqual(read_file(q), b"")
        os.pwrite(fd, b"tail", (8 << 20) - 4)
        os.close(fd)
        self.vol.remount()
        data = read_file(p)
        self.assertEqual(data, b"head" + bytes((8 << 20) - 8) + b"tail")

    @contextlib.contextmanager
    def volume_on_16_mib(self):
        """A mounted volume whose cipher dir is a 16 MiB tmpfs, holding "f" = b"before"."""
        vol = Volume(init=False)
        try:
            os.mkdir(vol.cipher)
            run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", vol.cipher])
            run([BIN, "init", "--kms", "file:" + vol.key, vol.cipher])
            vol.mount()
            write_file(vol.path("f"), b"before")
            yield vol
        finally:
            if is_mounted(vol.mnt):
                vol.unmount()
            subprocess.run(["umount", vol.cipher], capture_output=True)
            vol.cleanup()

    def test_fallocate_without_space_fails_and_changes_nothing(self):
        with self.volume_on_16_mib() as vol:
            p = vol.path("f")
            fd = os.open(p, os.O_RDWR)
            try:
                with self.assertRaises(OSError) as cm:
                    os.posix_fallocate(fd, 0, 64 << 20)
                self.assertEqual(cm.exception.errno, errno.ENOSPC)
                self.assertEqual(os.fstat(fd).st_size, 6)
            finally:
                os.close(fd)
            vol.remount()
            self.assertEqual(read_file(p), b"before")

    def test_a_full_disk_leaves_every_block_old_or_new(self):
        # Writes into holes need new backing space. A hole's data used to go after the page
        # describing it, so a write that ran out of space there left blocks that read EIO: a
        # copy that filled the disk under the writeback cache (whose writes reach the daemon
        # out of order, filling gaps) left the file and fsck with damaged blocks.
        for args in ((), ("--no-writeback",)):
            with self.subTest(mount=args), self.volume_on_16_mib() as vol:
                vol.remount(*args)
                sparse, filler = vol.path("sparse"), vol.path("filler")
                write_file(sparse, b"")
                os.truncate(sparse, 12 << 20)  # holes: only the metadata pages take space
                with self.assertRaises(OSError) as cm:
                    with open(filler, "wb") as f:
                        for _ in range(64):
                            f.write(b"\xff" * (1 << 20))
                            f.flush()
                            os.fsync(f.fileno())
                self.assertEqual(cm.exception.errno, errno.ENOSPC)
                new = rand_bytes(8 << 20, 12)
                with self.assertRaises(OSError) as cm:
                    fd = os.open(sparse, os.O_RDWR)
                    try:
                        os.pwrite(fd, new, 1 << 20)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                self.assertEqual(cm.exception.errno, errno.ENOSPC)
                vol.remount(*args)
                self.assertEqual(read_file(vol.path("f")), b"before")
                got = read_file(sparse)  # EIO here was the bug
                self.assertEqual(len(got), 12 << 20)
                want = bytes(1 << 20) + new + bytes(3 << 20)
                for b in range(0, len(got), 4096):
                    self.assertIn(got[b:b + 4096], (bytes(4096), want[b:b + 4096]), f"block {b // 4096}")
                data = read_file(filler)
                for b in range(0, len(data), 4096):
                    block = data[b:b + 4096]
                    self.assertIn(block, (bytes(len(block)), b"\xff" * len(block)), f"filler block {b // 4096}")
                vol.unmount()
                r = run([BIN, "fsck", "-q", vol.cipher], check=False)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_a_writer_that_never_syncs_is_told_the_disk_is_full(self):
        # Under the writeback cache write() only fills the kernel's cache; the WRITEs that
        # fail later were reported at fsync or close alone, so `cat /dev/zero > f` (or a
        # logger) on a full volume wrote on for ever, its file's size growing past a terabyte
        # while every byte past the disk's end was dropped. write() itself must say ENOSPC.
        with self.volume_on_16_mib() as vol:
            for writer in ("loop", "dd"):  # our own write() loop, and dd without a count
                with self.subTest(writer=writer):
                    p = vol.path(writer)
                    if writer == "dd":
                        r = subprocess.run(["timeout", "60", "dd", "if=/dev/zero", f"of={p}", "bs=1M"],
                                           capture_output=True, text=True)
                        self.assertEqual(r.returncode, 1, r.stderr)  # timeout's would be 124
                        self.assertIn(f"error writing '{p}': No space left on device", r.stderr)
                    else:
                        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
                        written = 0
                        with self.assertRaises(OSError) as cm:
                            while written < 256 << 20:  # 16 times the disk
                                written += os.write(fd, b"\xff" * (1 << 20))
                        self.assertEqual(cm.exception.errno, errno.ENOSPC)
                        with contextlib.suppress(OSError):  # close may say it again
                            os.close(fd)
                    os.unlink(p)
            # What was there before is untouched, and so is the volume.
            vol.remount()
            self.assertEqual(read_file(vol.path("f")), b"before")
            write_file(vol.path("after"), b"room again", fsync=True)
            vol.unmount()
            r = run([BIN, "fsck", "-q", vol.cipher], check=False)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_growth_past_what_the_backing_filesystem_holds_fails_at_once(self):
        # pjdfstest's truncate/12.t and ftruncate/12.t: a size past the maximum file size is
        # EFBIG or EINVAL (nothing else) and changes nothing. Growing writes one metadata page
        # per 128 KiB of new size (fs/FORMAT.md), so without asking the backing filesystem first
        # a truncate to ~888 TiB wrote pages towards ext4's 16 TiB limit until the disk was
        # full; and asked only after the free space, it said ENOSPC. A size the backing
        # filesystem could hold but the disk cannot (8 TiB: 256 GiB of pages) is ENOSPC.
        p = self.vol.path("huge")
        write_file(p, b"hello")
        back = self.backing_of(p)
        before = os.stat(back)
        ext4 = run(["stat", "-f", "-c", "%T", self.vol.cipher]).stdout.strip() == "ext2/ext3"
        too_long = (errno.EFBIG, errno.EINVAL) if ext4 else (errno.EFBIG, errno.EINVAL, errno.ENOSPC)
        for size, expected in ((999999999999999, too_long), ((1 << 63) - 1, too_long), (8 << 40, (errno.ENOSPC,))):
            for grow in (lambda: os.truncate(p, size), lambda: self._ftruncate(p, size)):
                with self.assertRaises(OSError) as cm:
                    grow()
                self.assertIn(cm.exception.errno, expected, f"{size}: {cm.exception}")
                self.assertEqual(os.stat(p).st_size, 5)
                after = os.stat(back)
                self.assertEqual(after.st_size, before.st_size)
                self.assertEqual(after.st_blocks, before.st_blocks, f"{size}: a refusal left space reserved")
        self.vol.remount()
        self.assertEqual(read_file(p), b"hello")

    @staticmethod
    def _ftruncate(path, size):
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def test_a_write_past_a_gap_leaves_the_gap_sparse(self):
        # The gap's blocks are holes: only its metadata pages (4 KiB per 128 KiB) and the
        # written group take space. It used to be reserved whole, so a write at 256 MiB into an
        # empty file took 256 MiB of disk.
        p = self.vol.path("gap")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"far", 256 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.assertEqual(os.stat(p).st_size, (256 << 20) + 3)
        back = os.stat(self.backing_of(p))
        self.assertLess(back.st_blocks * 512, 16 << 20)
        self.vol.remount()
        with open(p, "rb") as f:
            f.seek((256 << 20) - 5)
            self.assertEqual(f.read(), bytes(5) + b"far")

    def test_truncate_beyond_free_space_fails_and_changes_nothing(self):
        # 1 GiB of growth needs 32 MiB of metadata pages; a 16 MiB backing filesystem cannot
        # hold them: ENOSPC before any is written, and the file keeps its size and bytes.
        with self.volume_on_16_mib() as vol:
            p = vol.path("f")
            with self.assertRaises(OSError) as cm:
                os.truncate(p, 1 << 30)
            self.assertEqual(cm.exception.errno, errno.ENOSPC)
            self.assertEqual(os.stat(p).st_size, 6)
            used = sum(os.stat(b).st_size for b in vol.backing_files())
            self.assertLess(used, 1 << 20)
            os.truncate(p, 4 << 20)  # a growth that fits still works
            self.assertEqual(os.stat(p).st_size, 4 << 20)
            os.truncate(p, 6)
            vol.remount()
            self.assertEqual(read_file(p), b"before")

    def test_o_append(self):
        p = self.vol.path("log")
        for i in range(50):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, f"line {i}\n".encode())
            os.close(fd)
        self.assertEqual(read_file(p), "".join(f"line {i}\n" for i in range(50)).encode())

    def test_o_direct(self):
        p = self.vol.path("direct")
        buf = mmap.mmap(-1, 1 << 20)
        buf.write(rand_bytes(1 << 20, 7))
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        self.assertEqual(os.writev(fd, [buf]), 1 << 20)
        out = mmap.mmap(-1, 1 << 20)
        self.assertEqual(os.preadv(fd, [out], 0), 1 << 20)
        os.close(fd)
        self.assertEqual(bytes(out), rand_bytes(1 << 20, 7))

    def test_mmap_shared_writable(self):
        p = self.vol.path("mm")
        write_file(p, bytes(3 * 4096 + 5))
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            m[100:105] = b"hello"
            m[3 * 4096:3 * 4096 + 5] = b"world"
            m.flush()
            m.close()
        self.vol.remount()
        data = read_file(p)
        self.assertEqual(data[100:105], b"hello")
        self.assertEqual(data[3 * 4096:], b"world")

    def test_xattrs(self):
        p = self.vol.path("x")
        write_file(p, b"")
        os.setxattr(p, "user.a", b"1" * 3000)
        os.setxattr(p, "user.b", b"")
        self.assertEqual(os.getxattr(p, "user.a"), b"1" * 3000)
        self.assertEqual(sorted(os.listxattr(p)), ["user.a", "user.b"])
        os.removexattr(p, "user.a")
        with self.assertRaises(OSError) as cm:
            os.getxattr(p, "user.a")
        self.assertEqual(cm.exception.errno, errno.ENODATA)
        with self.assertRaises(OSError):
            os.setxattr(p, "user.b", b"v", os.XATTR_CREATE)
        # A namespace Linux does not define is refused, as ext4 refuses it, not stored.
        for call in (lambda: os.setxattr(p, "bogus.x", b"v"), lambda: os.getxattr(p, "bogus.x"),
                     lambda: os.removexattr(p, "bogus.x")):
            with self.assertRaises(OSError) as cm:
                call()
            self.assertEqual(cm.exception.errno, errno.EOPNOTSUPP)
        self.assertEqual(sorted(os.listxattr(p)), ["user.b"])

    def test_file_capabilities_are_refused(self):
        # Not stored (README "POSIX behaviour"): the kernel's question before a file's first
        # write is answered without the disk, and there is never a capability to strip.
        p = self.vol.path("cap")
        write_file(p, b"#!/bin/sh\n")
        cap = bytes.fromhex("0100000200200000000000000000000000000000")  # v2, cap_net_raw
        with self.assertRaises(OSError) as cm:
            os.setxattr(p, "security.capability", cap)
        self.assertEqual(cm.exception.errno, errno.EOPNOTSUPP)
        with self.assertRaises(OSError) as cm:
            os.getxattr(p, "security.capability")
        self.assertEqual(cm.exception.errno, errno.ENODATA)
        self.assertEqual(os.listxattr(p), [])
        with open(p, "ab") as f:  # and writing still works after the kernel asked
            f.write(b"exit 0\n")
        self.assertEqual(read_file(p), b"#!/bin/sh\nexit 0\n")

    def test_flock_and_posix_locks(self):
        p = self.vol.path("lock")
        write_file(p, b"x")
        f = open(p, "r+b")
        fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.lockf(f, fcntl.LOCK_EX, 1, 0)

        def other(q):
            g = open(p, "r+b")
            results = []
            for fn in (lambda: fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB),
                       lambda: fcntl.lockf(g, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)):
                try:
                    fn()
                    results.append("got")
                except OSError:
                    results.append("blocked")
            q.put(results)

        q = multiprocessing.Queue()
        proc = multiprocessing.Process(target=other, args=(q,))
        proc.start()
        proc.join()
        self.assertEqual(q.get(), ["blocked", "blocked"])
        f.close()

    def test_utimens_chmod_chown_statfs(self):
        p = self.vol.path("meta")
        write_file(p, b"m")
        os.utime(p, ns=(1_000_000_123, 2_000_000_456))
        os.chmod(p, 0o640)
        os.chown(p, 1234, 5678)
        self.vol.remount()
        st = os.stat(p)
        self.assertEqual(st.st_mtime_ns, 2_000_000_456)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o640)
        self.assertEqual((st.st_uid, st.st_gid), (1234, 5678))
        vfs = os.statvfs(self.vol.mnt)
        self.assertEqual(vfs.f_namemax, 255)
        self.assertGreater(vfs.f_blocks, 0)

    def test_utimens_of_a_symlink_itself(self):
        # utimensat(AT_SYMLINK_NOFOLLOW), `touch -h`, `cp -a` of a link: the link's own times
        # change, the target's do not (they were silently left alone before).
        target, link = self.vol.path("target"), self.vol.path("link")
        write_file(target, b"t")
        os.utime(target, ns=(7_000_000_000, 8_000_000_000))
        os.symlink("target", link)
        os.utime(link, ns=(3_000_000_001, 4_000_000_002), follow_symlinks=False)
        self.assertEqual((os.lstat(link).st_atime_ns, os.lstat(link).st_mtime_ns), (3_000_000_001, 4_000_000_002))
        self.assertEqual(os.stat(target).st_mtime_ns, 8_000_000_000)
        self.vol.remount()
        self.assertEqual(os.lstat(link).st_mtime_ns, 4_000_000_002)
        self.assertEqual(os.stat(link).st_mtime_ns, 8_000_000_000)

    def test_utimens_on_an_open_file(self):
        # An open file's times are set through its backing descriptor (futimens), a closed
        # one's through the O_PATH handle: both must land, and an omitted time stay.
        p = self.vol.path("open-times")
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"data")
        os.utime(fd, ns=(3_000_000_007, 4_000_000_008))
        self.assertEqual(os.stat(p).st_mtime_ns, 4_000_000_008)
        subprocess.run(["touch", "-m", "-d", "@5.25", p], check=True)  # atime UTIME_OMIT
        os.close(fd)
        self.vol.remount()
        st = os.stat(p)
        self.assertEqual((st.st_atime_ns, st.st_mtime_ns), (3_000_000_007, 5_250_000_000))

    def test_times_of_an_open_file_reach_the_backing_file(self):
        # With the writeback cache, time-only SETATTRs of an open file are kept in the daemon
        # (fs/inode_table.h, DeferredTimes): stat must report them at once, and the backing
        # file must carry them after a full fsync and after the last close.
        p = self.vol.path("deferred-times")
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"x" * 5000)
        os.fdatasync(fd)
        os.utime(fd, ns=(1_000_000_001, 2_000_000_002))
        st = os.stat(p)
        self.assertEqual((st.st_atime_ns, st.st_mtime_ns), (1_000_000_001, 2_000_000_002))
        self.assertEqual(st.st_size, 5000)
        back = self.backing_of(p)
        os.fsync(fd)
        self.assertEqual(os.stat(back).st_mtime_ns, 2_000_000_002)
        os.utime(fd, ns=(3_000_000_003, 4_000_000_004))
        before = os.stat(p).st_ctime_ns
        os.chmod(p, 0o600)  # a SETATTR with more than times: applied with them
        st = os.stat(p)
        self.assertEqual((st.st_mode & 0o777, st.st_mtime_ns), (0o600, 4_000_000_004))
        self.assertGreaterEqual(st.st_ctime_ns, before)
        os.utime(fd, ns=(5_000_000_005, 6_000_000_006))
        os.write(fd, b"more")
        os.close(fd)
        # The release that applies them is asynchronous to close(); a remount waits for it.
        self.vol.remount()
        self.assertEqual(os.stat(back).st_mtime_ns, os.stat(p).st_mtime_ns)
        self.assertEqual(os.stat(p).st_size, 5004)

    def test_partial_overwrites_match_model(self):
        import random
        r = random.Random(11)
        p = self.vol.path("model")
        model = bytearray()
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
        for _ in range(400):
            off = r.randrange(0, 600000)
            data = r.randbytes(r.randrange(1, 20000))
            os.pwrite(fd, data, off)
            if len(model) < off + len(data):
                model.extend(bytes(off + len(data) - len(model)))
            model[off:off + len(data)] = data
        os.close(fd)
        self.assertEqual(read_file(p), bytes(model))
        self.vol.remount()
        self.assertEqual(read_file(p), bytes(model))


class ErrorsAndCli(VolumeTest):
    def test_mount_fails_closed_with_wrong_key(self):
        self.vol.unmount()
        with open(self.vol.key, "wb") as f:
            f.write(os.urandom(32))
        from common import run, BIN, is_mounted
        r = run([BIN, "mount", self.vol.cipher, self.vol.mnt], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("does not unwrap", r.stderr)
        self.assertFalse(is_mounted(self.vol.mnt))

    def test_a_volume_mounted_read_write_is_not_mounted_again(self):
        """Two daemons on one cipher dir would each write the metadata pages they cached, over
        each other's block keys. A second mount is refused, read-write or read-only, naming
        where the volume is mounted, and mounts nothing; read-only mounts may share it; the
        lock goes with the daemon, even one killed."""
        write_file(self.vol.path("f"), b"mounted once")
        other = os.path.join(self.vol.root, "other")
        os.mkdir(other)
        self.addCleanup(lambda: is_mounted(other) and subprocess.run(["umount", "-l", other]))
        for extra in ([], ["-o", "ro"]):
            r = run([BIN, "mount", *extra, self.vol.cipher, other], check=False)
            self.assertNotEqual(r.returncode, 0, extra)
            self.assertIn(f"{self.vol.cipher} is mounted already read-write", r.stderr)
            self.assertIn(f"on {self.vol.mnt}", r.stderr)
            self.assertFalse(is_mounted(other), extra)
        # fsck still runs on a mounted volume, and says what that means.
        r = run([BIN, "fsck", "-q", self.vol.cipher])
        self.assertIn("is mounted read-write", r.stderr)
        self.assertNotIn("envelopefs.lock", os.listdir(self.vol.mnt))
        self.vol.unmount()
        self.assertNotIn("mounted", run([BIN, "fsck", "-q", self.vol.cipher]).stderr)
        run([BIN, "mount", "-o", "ro", self.vol.cipher, other])
        try:
            self.vol.mount("-o", "ro")  # read-only beside read-only
            self.assertEqual(read_file(os.path.join(other, "f")), b"mounted once")
            self.vol.unmount()
            r = run([BIN, "mount", self.vol.cipher, self.vol.mnt], check=False)
            self.assertIn("is mounted already read-only", r.stderr)  # read-write beside it: no
            self.assertFalse(is_mounted(self.vol.mnt))
        finally:
            run([BIN, "unmount", other])
        self.vol.mount()
        self.vol.kill9()
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), b"mounted once")
        # A read-only mount makes nothing, not even the lock file of a volume without one.
        self.vol.unmount()
        lock = os.path.join(self.vol.cipher, "envelopefs.lock")
        self.assertTrue(os.path.exists(lock), "init made no lock file")
        os.unlink(lock)
        self.vol.mount("-o", "ro")
        self.assertFalse(os.path.exists(lock), "a read-only mount made the lock file")

    def test_unmount_of_a_busy_mount_says_why_and_lazy_detaches_it(self):
        """A plain unmount of a mount with a file open on it fails, says what holds it and how
        to detach it; `--lazy` detaches it at once, the open file keeps working, and the
        daemon writes back and exits when it is closed."""
        p = self.vol.path("held")
        f = open(p, "wb")
        try:
            f.write(b"before ")
            f.flush()
            r = run([BIN, "unmount", self.vol.mnt], check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("Device or resource busy", r.stderr)
            self.assertIn("fuser -vm", r.stderr)
            self.assertIn("--lazy", r.stderr)
            self.assertTrue(is_mounted(self.vol.mnt))
            pid = self.vol.daemon_pid()
            r = run([BIN, "unmount", "--lazy", self.vol.mnt])
            self.assertIn("once the last file open on it is closed", r.stdout)
            self.assertFalse(is_mounted(self.vol.mnt))
            f.write(b"after the detach")
            f.flush()
            os.kill(pid, 0)  # still serving the open file
        finally:
            f.close()
        Volume._wait_gone(pid)
        self.assertIn("keys zeroized", self.vol.log_text())
        self.vol.mount()
        self.assertEqual(read_file(p), b"before after the detach")

    def test_a_lock_let_go_within_moments_is_waited_for(self):
        """A daemon killed a moment ago may still be closing its files: a mount right after
        waits for its lock a little instead of calling the volume mounted. One held on stays
        a refusal. (The holder here is a process with a POSIX lock on the file, which
        conflicts with the daemon's open-file-description lock as another daemon's would.)"""
        self.vol.unmount()
        lock = os.path.join(self.vol.cipher, "envelopefs.lock")
        holder = ("import fcntl, sys, time; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
                  "print('held', flush=True); time.sleep(float(sys.argv[2]))")
        for hold, refused in ((0.7, False), (4, True)):
            p = subprocess.Popen([sys.executable, "-c", holder, lock, str(hold)], stdout=subprocess.PIPE, text=True)
            self.assertEqual(p.stdout.readline(), "held\n")
            transport = ["--fuse-transport", TRANSPORT] if TRANSPORT else []
            r = run([BIN, "mount", "--log-file", self.vol.log, *transport, self.vol.cipher, self.vol.mnt], check=False)
            p.wait()
            p.stdout.close()
            self.assertEqual(is_mounted(self.vol.mnt), not refused, r.stderr)
            if refused:
                self.assertIn("is mounted already read-write (by a daemon this mount namespace does not show)",
                              r.stderr)
            else:
                self.vol.unmount()

    def test_paths_with_spaces_in_the_mount_table(self):
        """/proc/self/mounts writes a space in a path as \\040: status, the refusal of a second
        mount and unmount's wait for the write-back all read the table, and must name the
        volume as it is."""
        self.vol.unmount()
        base = os.path.join(self.vol.root, "my volume")
        os.mkdir(base)
        cipher, mnt = os.path.join(base, "cipher dir"), os.path.join(base, "mount point")
        os.mkdir(mnt)
        os.rename(self.vol.cipher, cipher)
        run([BIN, "mount", cipher, mnt])
        self.addCleanup(lambda: is_mounted(mnt) and subprocess.run(["umount", "-l", mnt]))
        write_file(os.path.join(mnt, "f"), b"spaced")
        status = json.loads(run([BIN, "status", "--json", mnt]).stdout)
        self.assertEqual((status["cipher_dir"], status["mounted_at"]), (cipher, [mnt]))
        r = run([BIN, "mount", cipher, self.vol.mnt], check=False)
        self.assertIn(f"{cipher} is mounted already read-write on {mnt}:", r.stderr)
        run([BIN, "unmount", mnt])
        self.assertFalse(is_mounted(mnt))
        os.rename(cipher, self.vol.cipher)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), b"spaced")

    def test_mount_t_fuse_envelopefs_as_fstab_would(self):
        import shutil
        from common import BIN, is_mounted
        helper = shutil.which("mount.fuse3") or ("/sbin/mount.fuse3" if os.path.exists("/sbin/mount.fuse3") else None)
        if helper is None:
            self.skipTest("mount.fuse3 (package fuse3) is not installed")
        write_file(self.vol.path("f"), b"via fstab")
        self.vol.unmount()
        env = dict(os.environ, PATH=os.path.dirname(os.path.abspath(BIN)) + ":" + os.environ.get("PATH", ""))
        import subprocess
        # The helper gets exactly the arguments mount(8) gives it for `mount -t fuse.envelopefs
        # ... -o nofail,...` (mount(8) adds rw first). mount(8) itself would clear PATH for the
        # helper (util-linux sanitize_env), which then runs whichever envelopefs the default
        # PATH finds (the installed one, or none), not the build under test.
        r = subprocess.run([helper, self.vol.cipher, self.vol.mnt,
                            "-o", f"rw,noatime,nofail,log_file={self.vol.log}", "-t", "fuse.envelopefs"],
                           env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(is_mounted(self.vol.mnt))
        self.assertEqual(read_file(self.vol.path("f")), b"via fstab")

    def test_a_mountpoint_over_or_inside_the_cipher_dir_is_refused(self):
        """Mounted over its own cipher dir, the daemon's key check read the config through the
        mount, found none and revoked the keys a minute later (EKEYREVOKED on every file)."""
        self.vol.unmount()
        inner = os.path.join(self.vol.cipher, "inner")
        os.mkdir(inner)
        for mountpoint, says in [(self.vol.cipher, "would hide the cipher dir"),
                                 (self.vol.root, "would hide the cipher dir"),
                                 (self.vol.cipher + "/", "would hide the cipher dir"),
                                 (inner, "is inside the cipher dir")]:
            r = run([BIN, "mount", "--log-file", self.vol.log, self.vol.cipher, mountpoint], check=False)
            self.assertNotEqual(r.returncode, 0, mountpoint)
            self.assertIn(says, r.stderr)
            self.assertFalse(is_mounted(mountpoint.rstrip("/")))
        os.rmdir(inner)
        self.vol.mount()  # beside it, as always
        write_file(self.vol.path("f"), b"still mounts")

    def test_a_mountpoint_with_files_in_it_is_refused_unless_asked_for(self):
        """Files in the directory beneath were written while the volume was not mounted: they are
        plaintext, and a mount would hide them. Refused, unless --nonempty (-o nonempty)."""
        write_file(self.vol.path("inside"), b"in the volume")
        # A second mount of the mounted volume still says that, not that the mountpoint has files.
        r = run([BIN, "mount", self.vol.cipher, self.vol.mnt], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("is mounted already", r.stderr)
        self.vol.unmount()
        write_file(os.path.join(self.vol.mnt, "beneath"), b"plaintext")
        r = run([BIN, "mount", "--log-file", self.vol.log, self.vol.cipher, self.vol.mnt], check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"mountpoint {self.vol.mnt} is not empty (1 entry)", r.stderr)
        self.assertIn("--nonempty", r.stderr)
        self.assertFalse(is_mounted(self.vol.mnt))
        self.assertEqual(os.listdir(self.vol.mnt), ["beneath"])
        for asked in (["--nonempty"], ["-o", "nonempty"]):
            self.vol.mount(*asked)
            self.assertEqual(os.listdir(self.vol.mnt), ["inside"])
            self.assertEqual(read_file(self.vol.path("inside")), b"in the volume")
            self.vol.unmount()
            self.assertEqual(read_file(os.path.join(self.vol.mnt, "beneath")), b"plaintext")

    def test_a_mount_or_repair_of_a_directory_that_is_not_a_volume_writes_nothing_into_it(self):
        # A mistyped cipher dir: the mount's volume lock file was created there before the
        # missing config was noticed.
        notvol = os.path.join(self.vol.root, "notvol")
        os.mkdir(notvol)
        elsewhere = os.path.join(self.vol.root, "elsewhere")
        os.mkdir(elsewhere)
        for cmd in (["mount", notvol, elsewhere], ["mount", "-o", "ro", notvol, elsewhere],
                    ["fsck", "--repair", notvol]):
            r = run([BIN, *cmd], check=False)
            self.assertNotEqual(r.returncode, 0, cmd)
            self.assertIn(f"no envelopefs volume in {notvol} (missing envelopefs.conf)", r.stderr)
            self.assertEqual(os.listdir(notvol), [], cmd)
            self.assertFalse(is_mounted(elsewhere))

    def test_unmount_of_a_directory_nothing_is_mounted_on_says_so(self):
        self.vol.unmount()
        r = run([BIN, "unmount", self.vol.mnt], check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"cannot unmount {self.vol.mnt}: nothing is mounted there", r.stderr)

    def test_a_relative_mountpoint_is_logged_and_audited_as_the_absolute_path(self):
        # The daemon changes to / once in the background: names resolved after that would be
        # wrong ("from /mnt" for a mount of ./mnt).
        from common import BIN, wait_for
        import json
        self.vol.unmount()
        audit = os.path.join(self.vol.root, "audit.log")
        env = dict(os.environ, ENVELOPEFS_AUDIT_LOG=audit)
        r = subprocess.run([BIN, "mount", "--log-file", self.vol.log, "cipher", "mnt"], cwd=self.vol.root, env=env,
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        subprocess.run([BIN, "unmount", "mnt"], cwd=self.vol.root, check=True)

        def audit_details():  # the daemon writes the unmount record as it exits, after the log line
            with open(audit) as f:
                return {json.loads(line)["event"]: json.loads(line)["detail"] for line in f}

        self.assertTrue(wait_for(lambda: "unmount" in audit_details()))
        details = audit_details()
        self.assertIn(f"mounted {self.vol.cipher} on {self.vol.mnt} (", self.vol.log_text())
        self.assertIn(f"unmounted {self.vol.mnt}; keys zeroized", self.vol.log_text())
        self.assertEqual(details["mount"], "on " + self.vol.mnt)
        self.assertEqual(details["unmount"], f"from {self.vol.mnt}; keys zeroized")

    def test_status_json_and_init_refusals(self):
        import json
        from common import run, BIN
        j = json.loads(run([BIN, "status", "--json", self.vol.mnt]).stdout)
        self.assertEqual(j["cipher_dir"], self.vol.cipher)
        self.assertEqual(j["mounted_at"], [self.vol.mnt])
        self.assertEqual(j["deks"][0]["state"], "active")
        self.assertEqual(j["features"], ["nonce-names", "rewrappable-blocks"])
        self.assertEqual(j["block_keys"], "all under DEK v1 (never rotated)")
        self.assertIn("format:       1 (nonce-names, rewrappable-blocks)", run([BIN, "status", self.vol.cipher]).stdout)
        r = run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("already", r.stderr)
        version = run([BIN, "--version"]).stdout
        self.assertEqual(version.split()[0], "envelopefs")
        self.assertRegex(version, r"\((Release|Debug|RelWithDebInfo|MinSizeRel|asan) build\)")


if __name__ == "__main__":
    main()
