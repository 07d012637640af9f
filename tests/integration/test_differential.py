"""The mount against the filesystem under it: the same system calls, step by step, in a plain
directory of the backing filesystem and on the mount, and every answer (result or errno, and
what stat says afterwards) must be the same, save the differences listed in KNOWN. The steps
are the corners a POSIX conformance suite (pjdfstest) and tools like rsync and cp -a reach:
times to the nanosecond and past 2038, who may set them, a symlink's own times, xattr
namespaces and flags, odd bytes in names, rename flags and directory link counts, a file used
after its last name is gone, offsets past 4 GiB, a directory stream across rewinddir, owners
and modes as other users change them.
Runs as root; some steps drop to uid 65534 or 65530."""
import ctypes
import errno
import os
import time

from common import VolumeTest, main, renameat2

libc = ctypes.CDLL(None, use_errno=True)
UTIME_OMIT = (1 << 30) - 2
NOBODY = 65534

# label -> why the mount may answer differently from the backing filesystem.
KNOWN = {
    # ext4 keeps a value in one block (ENOSPC past it); the stored value is 17 bytes longer
    # (SIV tag and version byte, fs/FORMAT.md), past the kernel's 64 KiB: E2BIG.
    "xattr 64 KiB value": "ext4 ENOSPC, envelopefs E2BIG",
    # Names are stored encrypted under a longer backing name (fs/FORMAT.md): 163 bytes at most.
    "xattr 255-byte name": "ERANGE past 163 bytes",
    # libfuse 3.14 has no tmpfile operation; callers fall back to a named file.
    "O_TMPFILE": "EOPNOTSUPP",
    # No FUSE_LSEEK: the kernel reports the whole file as data, which POSIX allows.
    "SEEK_DATA": "whole file is data",
    "SEEK_HOLE": "whole file is data",
}


class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def outcome(fn):
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def as_user(uid, groups, fn):
    """fn() in a child with uid and supplementary groups (the first is the gid)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups(groups)
            os.setegid(groups[0])
            os.seteuid(uid)
            fn()
        except OSError as e:
            code = 100 + e.errno
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, code)


def as_nobody(fn):
    """fn() in a child with uid/gid 65534: "ok" or the errno's name."""
    return as_user(NOBODY, [NOBODY], fn)


def utimensat_omit_atime(path, mtime):
    ts = (Timespec * 2)(Timespec(0, UTIME_OMIT), Timespec(*mtime))
    if libc.utimensat(-100, path.encode(), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def times(path, follow=True):
    st = os.stat(path, follow_symlinks=follow)
    return st.st_atime_ns, st.st_mtime_ns


def time_steps(d):
    j = lambda *p: os.path.join(d, *p)
    s = []
    f, link, sub = j("f"), j("l"), j("sub")
    open(f, "w").close()
    os.chmod(f, 0o644)
    os.utime(f, ns=(100000000_100000000, 200000000_200000000))
    s.append(("nanoseconds", times(f)))
    os.utime(f, ns=(2147483648 * 10**9, 4294967296 * 10**9))
    s.append(("past 2038", times(f)))
    s.append(("others: now", as_nobody(lambda: os.utime(f))))
    s.append(("others: explicit", as_nobody(lambda: os.utime(f, ns=(1, 2)))))
    os.chown(f, NOBODY, NOBODY)
    os.chmod(f, 0o444)
    s.append(("owner: now, read-only file", as_nobody(lambda: os.utime(f))))
    s.append(("owner: explicit", as_nobody(lambda: os.utime(f, ns=(5, 6)))))
    s.append(("after the owner", times(f)))
    os.chown(f, 0, 0)
    os.chmod(f, 0o666)
    s.append(("writer: now", as_nobody(lambda: os.utime(f))))
    s.append(("writer: explicit", as_nobody(lambda: os.utime(f, ns=(7, 8)))))
    os.utime(f, ns=(11, 22))
    utimensat_omit_atime(f, (33, 44))
    s.append(("UTIME_OMIT atime", times(f)))
    c = os.stat(f).st_ctime_ns
    # A clock tick (4 ms) first: while the daemon still holds the file open (its RELEASE is
    # sent asynchronously, and came late in a loaded CI run), the new ctime is the kernel's
    # coarse clock, as on a filesystem without multigrain times; ext4 since Linux 6.13 hands
    # out a finer one at once, because the old one was looked at.
    time.sleep(0.01)
    os.utime(f, ns=(1, 1))
    s.append(("utimens moves ctime", os.stat(f).st_ctime_ns > c))
    os.symlink("f", link)
    os.utime(link, ns=(3 * 10**9, 4 * 10**9), follow_symlinks=False)
    s.append(("symlink's own times", times(link, follow=False), times(f)))
    fd = os.open(f, os.O_RDWR)
    os.write(fd, b"abc")
    os.utime(fd, ns=(9 * 10**9, 10 * 10**9))
    s.append(("open, written, then utimens", times(f)))
    os.close(fd)
    s.append(("after close", times(f)))
    fd = os.open(f, os.O_RDWR)
    os.utime(fd, ns=(12 * 10**9, 13 * 10**9))
    os.write(fd, b"d")
    s.append(("utimens then write moves mtime", os.fstat(fd).st_mtime_ns > 13 * 10**9))
    os.close(fd)
    os.mkdir(sub)
    os.utime(sub, ns=(5 * 10**9, 6 * 10**9))
    s.append(("directory", times(sub)))
    open(j("sub", "x"), "w").close()
    s.append(("create moves the directory's mtime", os.stat(sub).st_mtime_ns > 6 * 10**9))
    return s


def xattr_and_name_steps(d):
    j = lambda *p: os.path.join(d, *p)
    s = []
    f, sub, link = j("f"), j("sub"), j("l")
    open(f, "w").close()
    os.mkdir(sub)
    os.symlink("f", link)
    s.append(("set", outcome(lambda: os.setxattr(f, "user.a", b"1"))))
    s.append(("XATTR_CREATE over one", outcome(lambda: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE))))
    s.append(("XATTR_REPLACE of none", outcome(lambda: os.setxattr(f, "user.b", b"2", os.XATTR_REPLACE))))
    s.append(("get", outcome(lambda: os.getxattr(f, "user.a"))))
    s.append(("get of none", outcome(lambda: os.getxattr(f, "user.nope"))))
    s.append(("xattr 64 KiB value", outcome(lambda: os.setxattr(f, "user.big", b"x" * 65536))))
    s.append(("empty value", outcome(lambda: os.setxattr(f, "user.empty", b"")),
              outcome(lambda: os.getxattr(f, "user.empty"))))
    s.append(("remove twice", outcome(lambda: os.removexattr(f, "user.a")),
              outcome(lambda: os.removexattr(f, "user.a"))))
    s.append(("list", outcome(lambda: sorted(os.listxattr(f)))))
    s.append(("on a directory", outcome(lambda: os.setxattr(sub, "user.d", b"dir")),
              outcome(lambda: os.getxattr(sub, "user.d"))))
    s.append(("user.* on a symlink", outcome(lambda: os.setxattr(link, "user.l", b"x", follow_symlinks=False))))
    s.append(("unknown namespace", outcome(lambda: os.setxattr(f, "bogus.x", b"x")),
              outcome(lambda: os.getxattr(f, "bogus.x"))))
    s.append(("trusted.*", outcome(lambda: os.setxattr(f, "trusted.t", b"x")),
              outcome(lambda: os.getxattr(f, "trusted.t"))))
    s.append(("xattr 163-byte name", outcome(lambda: os.setxattr(f, "user." + "n" * 158, b"x"))))
    s.append(("xattr 255-byte name", outcome(lambda: os.setxattr(f, "user." + "n" * 250, b"x"))))
    s.append(("xattr 256-byte name", outcome(lambda: os.setxattr(f, "user." + "n" * 251, b"x"))))
    c = os.stat(f).st_ctime_ns
    os.setxattr(f, "user.c", b"c")
    s.append(("setxattr moves ctime", os.stat(f).st_ctime_ns > c))
    for name in (b"new\nline", b"back\\slash", b"\xff\xfe not utf-8", b" space ", b"-dash",
                 b"\xe2\x9c\x93", b"a" * 255, b"...", b"a" * 256):
        p = os.path.join(d.encode(), name)
        s.append(("name " + repr(name[:16]), outcome(lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))),
                  name in os.listdir(d.encode()), outcome(lambda: os.unlink(p))))
    for i in range(300):
        open(j("sub", "e%03d" % i), "w").close()
    for i in range(0, 300, 3):
        os.rename(j("sub", "e%03d" % i), j("sub", "r%03d" % i))
    for i in range(1, 300, 3):
        os.unlink(j("sub", "e%03d" % i))
    s.append(("listing after renames and unlinks", sorted(os.listdir(sub))))
    with os.scandir(sub) as it:
        for e in it:
            os.unlink(e.path)
    s.append(("emptied while listed", os.listdir(sub), outcome(lambda: os.rmdir(sub))))
    m = j("m")
    s.append(("mknod of a regular file", outcome(lambda: os.mknod(m, 0o600 | 0o100000)),
              outcome(lambda: (os.stat(m).st_size, oct(os.stat(m).st_mode)))))
    s.append(("O_TMPFILE", outcome(lambda: os.close(os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)))[0]))
    fd = os.open(f, os.O_RDWR)
    os.pwrite(fd, b"data", 1 << 20)
    s.append(("SEEK_DATA", outcome(lambda: os.lseek(fd, 0, os.SEEK_DATA))))
    s.append(("SEEK_HOLE", outcome(lambda: os.lseek(fd, 0, os.SEEK_HOLE))))
    s.append(("SEEK_HOLE at the end", outcome(lambda: os.lseek(fd, (1 << 20) + 4, os.SEEK_HOLE))))
    s.append(("SEEK_DATA past the end", outcome(lambda: os.lseek(fd, (1 << 20) + 10, os.SEEK_DATA))))
    os.close(fd)
    return s


class Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir64.restype = ctypes.POINTER(Dirent64)
libc.readdir64.argtypes = [ctypes.c_void_p]
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]


def listing_across_rewinddir(path, change):
    """The names one directory stream reads, then reads again after `change` and rewinddir."""
    stream = libc.opendir(path.encode())
    if not stream:
        raise OSError(ctypes.get_errno(), "opendir")

    def names():
        out = []
        while e := libc.readdir64(stream):
            out.append(e.contents.d_name.decode())
        return sorted(out)
    try:
        first = names()
        change()
        libc.rewinddir(stream)
        return first, names()
    finally:
        libc.closedir(stream)


def namespace_steps(d):
    j = lambda *p: os.path.join(d, *p)
    s = []
    with open(j("f"), "w") as fh:
        fh.write("x")
    os.symlink("f", j("l"))
    os.mkdir(j("d"))
    s.append(("hard link of a symlink", outcome(lambda: os.link(j("l"), j("l2"), follow_symlinks=False)),
              outcome(lambda: (os.lstat(j("l2")).st_nlink, os.readlink(j("l2"))))))
    s.append(("linkat AT_SYMLINK_FOLLOW", outcome(lambda: os.link(j("l"), j("l3"), follow_symlinks=True)),
              outcome(lambda: (os.lstat(j("l3")).st_nlink, oct(os.lstat(j("l3")).st_mode)))))
    s.append(("readlink of a file", outcome(lambda: os.readlink(j("f")))))
    s.append(("RENAME_EXCHANGE file and directory", outcome(lambda: renameat2(j("f"), j("d"), 2)),
              outcome(lambda: (oct(os.lstat(j("f")).st_mode)[:4], oct(os.lstat(j("d")).st_mode)[:4]))))
    s.append(("exchanged back", outcome(lambda: renameat2(j("f"), j("d"), 2))))
    s.append(("RENAME_NOREPLACE", outcome(lambda: renameat2(j("f"), j("l3"), 1))))
    s.append(("NOREPLACE|EXCHANGE", outcome(lambda: renameat2(j("f"), j("zz"), 3))))
    s.append(("directory into itself", outcome(lambda: os.rename(j("d"), j("d", "sub")))))
    s.append(("directory over a file", outcome(lambda: os.rename(j("d"), j("f")))))
    s.append(("file over a directory", outcome(lambda: os.rename(j("f"), j("d")))))
    s.append(("through a file", outcome(lambda: os.rename(j("f"), j("f", "x")))))
    s.append(("mkdir .", outcome(lambda: os.mkdir(j("d", ".")))))
    s.append(("rmdir .", outcome(lambda: os.rmdir(j("d", ".")))))
    s.append(("unlink ..", outcome(lambda: os.unlink(j("d", "..")))))
    s.append(("trailing slash on a file", outcome(lambda: os.close(os.open(j("f") + "/", os.O_RDONLY)))))
    s.append(("trailing slash on a symlink to a file", outcome(lambda: os.stat(j("l") + "/").st_mode)))
    os.mkdir(j("gone"))
    cwd = os.getcwd()
    os.chdir(j("gone"))
    try:
        os.rmdir(j("gone"))
        s.append(("in a removed directory", outcome(lambda: os.mkdir("x")),
                  outcome(lambda: os.close(os.open("y", os.O_CREAT | os.O_WRONLY, 0o644)))))
    finally:
        os.chdir(cwd)
    s.append(("directory links", os.stat(j("d")).st_nlink))
    os.mkdir(j("d", "a"))
    os.mkdir(j("d", "b"))
    s.append(("with two subdirectories", os.stat(j("d")).st_nlink))
    os.rename(j("d", "a"), j("d", "b", "a"))
    s.append(("after moving one into the other", os.stat(j("d")).st_nlink, os.stat(j("d", "b")).st_nlink))
    fd = os.open(j("g"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"xyz12")
    os.unlink(j("g"))
    s.append(("unlinked, still open", outcome(lambda: os.fstat(fd).st_nlink),
              outcome(lambda: os.fchmod(fd, 0o600)), outcome(lambda: os.fchown(fd, 5, 6)),
              outcome(lambda: (os.fstat(fd).st_uid, oct(os.fstat(fd).st_mode))),
              outcome(lambda: os.ftruncate(fd, 3)), outcome(lambda: os.pread(fd, 10, 0))))
    os.close(fd)
    fd = os.open(j("big"), os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"A" * 5000, (4 << 30) - 2000)
    s.append(("across 4 GiB", os.pread(fd, 6000, (4 << 30) - 2500) == bytes(500) + b"A" * 5000,
              os.fstat(fd).st_size))
    os.close(fd)
    s.append(("NAME_MAX", os.statvfs(d).f_namemax))
    os.mkdir(j("r"))
    for n in ("a", "b"):
        open(j("r", n), "w").close()

    def unlink_a_and_make_c():
        os.unlink(j("r", "a"))
        open(j("r", "c"), "w").close()
    s.append(("rewinddir shows the directory as it is now", listing_across_rewinddir(j("r"), unlink_a_and_make_c)))
    return s


def ownership_steps(d):
    """pjdfstest's chown/00, chmod/00 and the sticky-directory rename and unlink cases."""
    j = lambda *p: os.path.join(d, *p)
    os.chmod(d, 0o777)
    s = []
    mode_owner = lambda p: (oct(os.lstat(p).st_mode & 0o7777), os.lstat(p).st_uid, os.lstat(p).st_gid)
    for kind in ("file", "dir", "fifo"):
        p = j(kind)
        {"file": lambda: open(p, "w").close(), "dir": lambda: os.mkdir(p), "fifo": lambda: os.mkfifo(p)}[kind]()
        os.chown(p, NOBODY, 65533)
        s.append((kind + ": owner changes group to one of theirs",
                  as_user(NOBODY, [65532, 65531], lambda: os.chown(p, -1, 65532)), mode_owner(p)))
        s.append((kind + ": owner gives it away", as_user(NOBODY, [65532], lambda: os.chown(p, 0, -1))))
        s.append((kind + ": group not theirs", as_user(NOBODY, [65532], lambda: os.chown(p, -1, 65530))))
        s.append((kind + ": -1 -1 by anyone", as_user(65530, [65530], lambda: os.chown(p, -1, -1))))
        os.chmod(p, 0o6555)
        s.append((kind + ": root chown keeps or drops set-ID", os.chown(p, 65532, 65531), mode_owner(p)))
        os.chown(p, NOBODY, 65533)
        os.chmod(p, 0o6555)
        s.append((kind + ": owner's chown drops set-ID",
                  as_user(NOBODY, [65533, 65532], lambda: os.chown(p, NOBODY, 65532)), mode_owner(p)))
        s.append((kind + ": chmod by others", as_user(65530, [65530], lambda: os.chmod(p, 0o777)), mode_owner(p)))
        os.chown(p, NOBODY, 0)
        s.append((kind + ": owner's set-group-ID for a group not theirs",
                  as_user(NOBODY, [NOBODY], lambda: os.chmod(p, 0o2755)), mode_owner(p)))
        c = os.lstat(p).st_ctime_ns
        s.append((kind + ": failed chown leaves ctime", as_user(65530, [65530], lambda: os.chown(p, 65530, -1)),
                  os.lstat(p).st_ctime_ns == c))
    os.mkdir(j("sticky"))
    os.chmod(j("sticky"), 0o1777)
    for name, owner in (("mine", NOBODY), ("theirs", 65533)):
        open(j("sticky", name), "w").close()
        os.chown(j("sticky", name), owner, owner)
    s.append(("sticky: rename own", as_user(NOBODY, [NOBODY], lambda: os.rename(j("sticky", "mine"), j("sticky", "mine2")))))
    s.append(("sticky: rename another's", as_user(NOBODY, [NOBODY], lambda: os.rename(j("sticky", "theirs"), j("sticky", "x")))))
    s.append(("sticky: replace another's", as_user(NOBODY, [NOBODY], lambda: os.rename(j("sticky", "mine2"), j("sticky", "theirs")))))
    s.append(("sticky: unlink another's", as_user(NOBODY, [NOBODY], lambda: os.unlink(j("sticky", "theirs")))))
    s.append(("sticky: unlink own", as_user(NOBODY, [NOBODY], lambda: os.unlink(j("sticky", "mine2")))))
    os.mkdir(j("sgid"))
    os.chown(j("sgid"), 0, 65531)
    os.chmod(j("sgid"), 0o2777)
    as_user(NOBODY, [NOBODY], lambda: os.mkdir(j("sgid", "sub")))
    as_user(NOBODY, [NOBODY], lambda: open(j("sgid", "f"), "w").close())
    s.append(("set-group-ID directory passes its group down", mode_owner(j("sgid", "sub")), mode_owner(j("sgid", "f"))))
    return s


class Differential(VolumeTest):
    mount_args = ("--allow-other",)

    def compare(self, steps):
        plain = os.path.join(self.vol.root, "plain")
        os.mkdir(plain)
        want = steps(plain)
        got = steps(self.vol.mnt)
        self.assertEqual([w[0] for w in want], [g[0] for g in got])
        for w, g in zip(want, got):
            if w[0] in KNOWN:
                # A listed difference must still be one, or be dropped from KNOWN.
                self.assertNotEqual(g, w, f"{w[0]} now behaves as on the backing filesystem: drop it from KNOWN")
            else:
                self.assertEqual(g, w, f"{w[0]}: the backing filesystem answers {w[1:]}, the mount {g[1:]}")

    def test_times(self):
        self.compare(time_steps)

    def test_xattrs_and_names(self):
        self.compare(xattr_and_name_steps)

    def test_namespace_operations(self):
        self.compare(namespace_steps)

    def test_ownership_and_permissions(self):
        self.compare(ownership_steps)


if __name__ == "__main__":
    main()
