"""POSIX ACLs on the mount behave as on ext4, the backing filesystem that keeps them.

The same steps run in a directory on ext4 and on the mount, and what `getfacl` and `stat`
show must be the same: the mask in the mode's group bits, chmod changing the mask, a default
ACL passed down to new files and directories in place of the umask, the umask where there is
none, and what another user may then read. Then they must survive a remount (fsck clean) and
`cp -a`. Without `mount --acl`, or on a backing filesystem without ACLs, they are refused, and
the umask still applies.
"""
import errno
import os
import shutil
import stat
import unittest

from common import BIN, Volume, VolumeTest, init_on_disk, main, read_file, run, write_file

NOBODY = 65534


def getfacl(base):
    """Every ACL under `base`, as getfacl prints them, paths relative to it, sorted by path."""
    out = run(["getfacl", "-R", "-p", "-n", "."], cwd=base).stdout
    return sorted(block for block in out.split("\n\n") if block.strip())


def modes(base):
    out = {}
    for d, dirs, files in os.walk(base):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, base)] = oct(os.lstat(p).st_mode)
    return out


def as_user(uid, fn):
    """Runs fn() in a child with uid and gid `uid`; returns its errno (0: no error)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def with_umask(mask, fn):
    old = os.umask(mask)
    try:
        fn()
    finally:
        os.umask(old)


def acl_steps(base):
    """The steps both trees go through; returns what another user could read along the way."""
    p = lambda *parts: os.path.join(base, *parts)
    seen = {}
    setfacl = lambda *args: run(["setfacl", *args])
    read = lambda path: lambda: read_file(path)

    write_file(p("f"), b"secret")
    os.chmod(p("f"), 0o600)
    seen["before"] = as_user(NOBODY, read(p("f")))
    setfacl("-m", f"u:{NOBODY}:r,g:4321:rw", p("f"))
    seen["granted"] = as_user(NOBODY, read(p("f")))
    os.chmod(p("f"), 0o600)  # the mask goes to ---: the named entry is no longer effective
    seen["masked"] = as_user(NOBODY, read(p("f")))
    os.chmod(p("f"), 0o640)

    os.mkdir(p("d"), 0o755)
    setfacl("-d", "-m", f"u:{NOBODY}:rwx,g::r-x,o::-", p("d"))

    def make_in(d):
        write_file(p(d, "file"), b"x")
        os.mkdir(p(d, "sub"), 0o777)
        os.mkfifo(p(d, "fifo"), 0o666)
        os.close(os.open(p(d, "setgid"), os.O_CREAT | os.O_WRONLY, 0o2775))
    with_umask(0o077, lambda: make_in("d"))  # the default ACL stands in for the umask
    seen["inherited"] = as_user(NOBODY, lambda: write_file(p("d", "file"), b"y"))
    seen["nested"] = as_user(NOBODY, lambda: write_file(p("d", "sub", "mine"), b"z"))
    seen["setgid"] = as_user(NOBODY, lambda: os.close(os.open(p("d", "sub", "setgid"), os.O_CREAT, 0o2777)))

    os.mkdir(p("e"), 0o755)
    with_umask(0o027, lambda: make_in("e"))  # no default ACL: the umask applies

    # An owner outside the file's group sets an access ACL: the set-group-ID bit goes, as with
    # chmod; a member's stays.
    for name, group in (("outside", 4321), ("member", NOBODY)):
        write_file(p(name), b"x")
        os.chown(p(name), NOBODY, group)
        os.chmod(p(name), 0o2770)
        seen[name] = as_user(NOBODY, lambda: setfacl("-m", "u:0:r", p(name)))

    setfacl("-k", p("d"))  # the default ACL goes; new nodes get the umask again
    with_umask(0o077, lambda: write_file(p("d", "after"), b"x"))
    setfacl("-b", p("f"))  # every extended entry goes; the mode keeps the mask's bits
    seen["removed"] = as_user(NOBODY, read(p("f")))
    return seen


class PosixAcls(VolumeTest):
    mount_args = ("--allow-other", "--acl")

    def setUp(self):
        super().setUp()
        self.assertIsNotNone(shutil.which("setfacl"), "setfacl missing (packaging/install-deps.sh: acl)")
        self.plain = os.path.join(self.vol.root, "plain")  # ext4, beside the cipher dir
        os.mkdir(self.plain)
        for d in (self.plain, self.vol.mnt):
            os.chmod(d, 0o755)

    def test_acls_behave_as_on_ext4(self):
        on_ext4 = acl_steps(self.plain)
        on_mount = acl_steps(self.vol.mnt)
        self.assertEqual(on_mount, on_ext4)
        # What the steps are about, not only that both agree.
        self.assertEqual(on_ext4, {"before": errno.EACCES, "granted": 0, "masked": errno.EACCES,
                                   "inherited": 0, "nested": 0, "setgid": 0, "outside": 0, "member": 0,
                                   "removed": errno.EACCES})
        self.assertEqual(getfacl(self.vol.mnt), getfacl(self.plain))
        self.assertEqual(modes(self.vol.mnt), modes(self.plain))
        mode_on_ext4 = lambda n: stat.S_IMODE(os.stat(os.path.join(self.plain, n)).st_mode)
        self.assertEqual([mode_on_ext4("outside"), mode_on_ext4("member")], [0o770, 0o2770])
        self.assertIn(f"user:{NOBODY}:rwx", run(["getfacl", "-p", "-n", self.vol.path("d", "sub")]).stdout)

    def test_acls_survive_a_remount_and_cp_a(self):
        acl_steps(self.vol.mnt)
        os.mkdir(os.path.join(self.plain, "tree"))
        write_file(os.path.join(self.plain, "tree", "g"), b"data")
        run(["setfacl", "-R", "-m", f"u:{NOBODY}:rx,g:4321:r", os.path.join(self.plain, "tree")])
        run(["cp", "-a", os.path.join(self.plain, "tree"), self.vol.path("tree")])
        before = getfacl(self.vol.mnt)
        self.assertTrue(any("group:4321:r--" in b for b in before))
        self.vol.remount("--allow-other", "--acl")
        self.assertEqual(getfacl(self.vol.mnt), before)
        self.assertEqual(getfacl(self.vol.path("tree")), getfacl(os.path.join(self.plain, "tree")))
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # Stored as the backing node's own ACL (fs/FORMAT.md): the same entries there.
        acl_of = lambda p: run(["getfacl", "-p", "-n", "--omit-header", p]).stdout
        stored = [n for n in os.listdir(self.vol.cipher) if acl_of(os.path.join(self.vol.cipher, n))
                  == acl_of(self.vol.path("tree"))]
        self.assertEqual(len(stored), 1, "the backing directory of tree")

    def test_user_xattrs_stay_encrypted_beside_acls(self):
        f = self.vol.path("f")
        write_file(f, b"x")
        run(["setfacl", "-m", f"u:{NOBODY}:r", f])
        os.setxattr(f, "user.note", b"plain words")
        self.assertEqual(sorted(os.listxattr(f)), ["system.posix_acl_access", "user.note"])
        self.assertEqual(os.getxattr(f, "user.note"), b"plain words")
        os.removexattr(f, "system.posix_acl_access")
        self.assertEqual(os.listxattr(f), ["user.note"])
        with self.assertRaises(OSError) as cm:
            os.getxattr(f, "system.posix_acl_access")
        self.assertEqual(cm.exception.errno, errno.ENODATA)


class AclsOff:
    """Mixed into a TestCase whose mount has no ACLs: they are refused, and the kernel applies
    the umask as before."""

    def test_acls_are_refused_and_the_umask_applies(self):
        f = self.vol.path("f")
        write_file(f, b"x")
        r = run(["setfacl", "-m", f"u:{NOBODY}:r", f], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("Operation not supported", r.stderr)
        with_umask(0o027, lambda: (write_file(self.vol.path("g"), b"x"), os.mkdir(self.vol.path("d"))))
        self.assertEqual(stat.S_IMODE(os.stat(self.vol.path("g")).st_mode), 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(self.vol.path("d")).st_mode), 0o750)


class OnRamfs(AclsOff, unittest.TestCase):
    """ramfs keeps no ACLs (nor any xattr)."""

    def setUp(self):
        self.vol = Volume(init=False)
        self.addCleanup(self.vol.cleanup)
        disk = os.path.join(self.vol.root, "disk")
        os.mkdir(disk)
        run(["mount", "-t", "ramfs", "ramfs", disk])
        self.addCleanup(run, ["umount", "-l", disk], check=False)
        init_on_disk(self, self.vol, disk)
        self.vol.mount("--acl")

    def test_the_mount_says_it_has_no_acls(self):
        # Logged before `mount` returns (not at INIT, which comes after): no wait needed.
        self.assertIn("--acl: POSIX ACLs are off: the backing filesystem of", self.vol.log_text())


class WithoutAcl(AclsOff, VolumeTest):
    """Without --acl: the default, for what ACLs cost (fs/filesystem.h, FsOptions)."""


if __name__ == "__main__":
    main()
