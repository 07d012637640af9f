"""What a POSIX conformance suite (pjdfstest and the like) checks of a mounted volume: the
timestamps each call must change, the error each misuse must give, special files, and the
permission checks other users meet. Mounted with --allow-other; the test runs as root and
drops to uid 65534 in forked children."""
import errno
import os
import socket
import stat
import time

from common import VolumeTest, main, write_file


class Semantics(VolumeTest):
    mount_args = ("--allow-other",)

    def p(self, *parts):
        return self.vol.path(*parts)

    def assert_errno(self, err, fn, *args):
        with self.assertRaises(OSError) as cm:
            fn(*args)
        self.assertEqual(cm.exception.errno, err, f"{fn.__name__}{args}")

    def changes(self, path, field, action):
        """True if `action` moves `field` (st_ctime_ns, st_mtime_ns) of `path` forward."""
        before = getattr(os.lstat(path), field)
        time.sleep(0.02)
        action()
        return getattr(os.lstat(path), field) > before

    def test_calls_update_the_times_they_must(self):
        f, d = self.p("f"), self.vol.mnt
        write_file(f, b"abc")
        self.assertTrue(self.changes(f, "st_ctime_ns", lambda: os.chmod(f, 0o600)))
        self.assertTrue(self.changes(f, "st_ctime_ns", lambda: os.chown(f, 123, 456)))
        self.assertTrue(self.changes(f, "st_ctime_ns", lambda: os.link(f, self.p("g"))))
        self.assertEqual(os.stat(f).st_nlink, 2)
        self.assertTrue(self.changes(f, "st_ctime_ns", lambda: os.unlink(self.p("g"))))
        self.assertTrue(self.changes(f, "st_mtime_ns", lambda: os.truncate(f, 100)))
        before = os.lstat(f).st_ctime_ns
        time.sleep(0.02)
        os.rename(f, self.p("f2"))
        f = self.p("f2")
        self.assertGreater(os.lstat(f).st_ctime_ns, before)

        def write_more():
            with open(f, "r+b") as fh:
                fh.write(b"x")
        self.assertTrue(self.changes(f, "st_mtime_ns", write_more))
        self.assertTrue(self.changes(f, "st_mtime_ns", lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))))
        self.assertEqual(os.stat(f).st_size, 0)
        self.assertTrue(self.changes(d, "st_mtime_ns", lambda: write_file(self.p("new"), b"")))
        self.assertTrue(self.changes(d, "st_ctime_ns", lambda: os.unlink(self.p("new"))))
        self.assertTrue(self.changes(d, "st_mtime_ns", lambda: os.mkdir(self.p("sub"))))
        self.assertTrue(self.changes(self.p("sub"), "st_mtime_ns", lambda: os.rename(f, self.p("sub", "f"))))
        os.utime(self.p("sub", "f"), ns=(1_000_000_001, 2_000_000_002))
        st = os.stat(self.p("sub", "f"))
        self.assertEqual((st.st_atime_ns, st.st_mtime_ns), (1_000_000_001, 2_000_000_002))

    def test_misuse_gives_the_right_error(self):
        write_file(self.p("file"), b"x")
        os.makedirs(self.p("dir", "child"))
        os.mkdir(self.p("empty"))
        e = self.assert_errno
        e(errno.EEXIST, os.mkdir, self.p("file"))
        e(errno.EEXIST, os.symlink, "t", self.p("file"))
        e(errno.EEXIST, os.open, self.p("file"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        e(errno.ENOTEMPTY, os.rmdir, self.p("dir"))
        e(errno.ENOTEMPTY, os.rename, self.p("empty"), self.p("dir"))
        e(errno.EISDIR, os.rename, self.p("file"), self.p("empty"))
        e(errno.ENOTDIR, os.rename, self.p("empty"), self.p("file"))
        e(errno.EINVAL, os.rename, self.p("dir"), self.p("dir", "child", "x"))
        e(errno.EISDIR, os.unlink, self.p("dir"))
        e(errno.ENOTDIR, os.rmdir, self.p("file"))
        e(errno.ENOTDIR, os.stat, self.p("file", "x"))
        e(errno.EISDIR, os.open, self.p("dir"), os.O_WRONLY)
        e(errno.EPERM, os.link, self.p("dir"), self.p("dirlink"))
        e(errno.EINVAL, os.truncate, self.p("file"), -1)
        e(errno.ENAMETOOLONG, os.mkdir, self.p("n" * 256))
        e(errno.ENOENT, os.stat, self.p("missing"))
        os.symlink("loop-b", self.p("loop-a"))
        os.symlink("loop-a", self.p("loop-b"))
        e(errno.ELOOP, os.stat, self.p("loop-a"))
        e(errno.ELOOP, os.open, self.p("loop-a"), os.O_RDONLY | os.O_NOFOLLOW)
        fd = os.open(self.p("file"), os.O_RDONLY)
        try:
            e(errno.EINVAL, os.ftruncate, fd, 0)
        finally:
            os.close(fd)
        os.link(self.p("file"), self.p("same"))
        os.rename(self.p("file"), self.p("same"))  # two links of one inode: nothing happens
        self.assertTrue(os.path.exists(self.p("file")) and os.path.exists(self.p("same")))

    def test_special_files(self):
        os.mkfifo(self.p("fifo"), 0o644)
        os.mknod(self.p("chr"), 0o644 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(self.p("blk"), 0o644 | stat.S_IFBLK, os.makedev(7, 0))
        s = socket.socket(socket.AF_UNIX)
        s.bind(self.p("sock"))
        s.close()
        self.vol.remount("--allow-other")
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.p("fifo")).st_mode))
        st = os.lstat(self.p("chr"))
        self.assertTrue(stat.S_ISCHR(st.st_mode))
        self.assertEqual(st.st_rdev, os.makedev(1, 3))
        self.assertTrue(stat.S_ISBLK(os.lstat(self.p("blk")).st_mode))
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.p("sock")).st_mode))
        os.link(self.p("fifo"), self.p("fifo2"))
        self.assertEqual(os.lstat(self.p("fifo")).st_nlink, 2)
        pid = os.fork()
        if pid == 0:
            fd = os.open(self.p("fifo"), os.O_WRONLY)
            os.write(fd, b"ping")
            os._exit(0)
        fd = os.open(self.p("fifo2"), os.O_RDONLY)
        got = os.read(fd, 4)
        os.close(fd)
        os.waitpid(pid, 0)
        self.assertEqual(got, b"ping")

    def test_other_users_meet_the_permission_checks(self):
        os.chmod(self.vol.mnt, 0o777)
        write_file(self.p("roots"), b"r")
        os.chmod(self.p("roots"), 0o644)
        os.mkdir(self.p("sticky"))
        os.chmod(self.p("sticky"), 0o1777)
        write_file(self.p("sticky", "roots"), b"r")
        os.mkdir(self.p("private"), 0o700)
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(self._refused_as_other_user())
            finally:
                os._exit(99)  # an exception: never let the child run the rest of the suite
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, "operations that should have been refused")
        self.assertEqual(os.listdir(self.p("private")), [])  # root still gets in

    def _refused_as_other_user(self):
        os.setgid(65534)
        os.setuid(65534)
        failures = []
        for name, fn in (("write", lambda: os.open(self.p("roots"), os.O_WRONLY)),
                         ("chmod", lambda: os.chmod(self.p("roots"), 0o777)),
                         ("chown", lambda: os.chown(self.p("roots"), 65534, -1)),
                         ("utime", lambda: os.utime(self.p("roots"), (1, 1))),
                         ("truncate", lambda: os.truncate(self.p("roots"), 0)),
                         ("sticky unlink", lambda: os.unlink(self.p("sticky", "roots"))),
                         ("private", lambda: os.listdir(self.p("private")))):
            try:
                fn()
                failures.append(name)
            except PermissionError:
                pass
        write_file(self.p("sticky", "mine"), b"m")  # own files in a sticky dir: fine
        os.unlink(self.p("sticky", "mine"))
        if failures:
            print("allowed:", failures, flush=True)
        return len(failures)


class SemanticsWithoutWritebackCache(Semantics):
    # Without the writeback cache the daemon, not the kernel, keeps sizes and times: the same
    # answers must come from it (an open with O_TRUNC left the size as it was here).
    mount_args = ("--allow-other", "--no-writeback")


if __name__ == "__main__":
    main()
