"""The cipher dir on other filesystems than ext4: XFS and btrfs on loop devices, and tmpfs.
Each holds less than ext4 somewhere (XFS keeps symlinks of at most 1,024 bytes; btrfs an
xattr value of one node; tmpfs has no O_DIRECT), and a volume on it must still keep every
name, target, attribute and byte it is given, across a remount, with fsck clean.
Skipped where the filesystem's mkfs or a loop device is missing (packaging/install-deps.sh
installs xfsprogs and btrfs-progs)."""
import errno
import os
import unittest

from common import BIN, Volume, init_on_disk, loop_disk, main, rand_bytes, read_file, run, write_file

# Lengths around XFS's 1,024-byte symlink limit (an encrypted target is ~4/3 of the
# plaintext plus 22 bytes) and up to the longest target Linux takes.
TARGET_LENGTHS = (1, 200, 700, 749, 760, 1000, 1023, 1024, 2000, 3000, 4095)
SIZES = (0, 1, 4095, 4096, 4097, 128 * 1024 + 1, (1 << 20) + 3)


class BackingFilesystem:
    """Mixed into a TestCase per filesystem: `make_disk(dir)` mounts one at `dir` (and
    registers its unmount)."""
    mount_args = ()

    def setUp(self):
        self.vol = Volume(init=False)
        self.addCleanup(self.vol.cleanup)
        self.disk = os.path.join(self.vol.root, "disk")
        os.mkdir(self.disk)
        self.make_disk(self.disk)
        init_on_disk(self, self.vol, self.disk)
        self.vol.mount(*self.mount_args)

    def fsck_clean(self):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_symlinks_of_every_length(self):
        links = {f"l{n}": "/" + "t" * (n - 1) for n in TARGET_LENGTHS}
        for name, target in links.items():
            os.symlink(target, self.vol.path(name))
            self.assertEqual(os.readlink(self.vol.path(name)), target, name)
        os.link(self.vol.path("l2000"), self.vol.path("l2000-again"), follow_symlinks=False)
        links["l2000-again"] = links["l2000"]
        os.rename(self.vol.path("l1024"), self.vol.path("l1024-moved"))
        links["l1024-moved"] = links.pop("l1024")
        self.vol.remount(*self.mount_args)
        for name, target in links.items():
            self.assertEqual(os.readlink(self.vol.path(name)), target, name)
        self.fsck_clean()
        for name in os.listdir(self.vol.mnt):
            os.unlink(self.vol.path(name))
        records = os.path.join(self.vol.cipher, "envelopefs.symlinks")
        self.assertEqual(os.listdir(records) if os.path.isdir(records) else [], [],
                         "a record outlived its last symlink")

    def test_files_names_and_attributes_survive_a_remount(self):
        os.makedirs(self.vol.path("d" * 255, "sub"))
        want = {}
        for i, size in enumerate(SIZES):
            path = self.vol.path("d" * 255, f"f{size}-" + "n" * 200)
            want[path] = rand_bytes(size, i)
            write_file(path, want[path])
        # An overwrite in the middle of a written block, and a hole.
        big = self.vol.path("d" * 255, f"f{SIZES[-1]}-" + "n" * 200)
        with open(big, "r+b") as f:
            f.seek(5000)
            f.write(b"middle")
        want[big] = want[big][:5000] + b"middle" + want[big][5006:]
        with open(self.vol.path("sparse"), "wb") as f:
            f.seek(10 << 20)
            f.write(b"end")
        want[self.vol.path("sparse")] = bytes(10 << 20) + b"end"
        os.link(big, self.vol.path("d" * 255, "sub", "hard"))
        want[self.vol.path("d" * 255, "sub", "hard")] = want[big]
        os.setxattr(self.vol.path("sparse"), "user.small", b"v")
        os.setxattr(self.vol.path("sparse"), "user.kilobytes", rand_bytes(3000, 9))
        self.vol.remount(*self.mount_args)
        for path, data in want.items():
            self.assertEqual(read_file(path), data, path)
        self.assertEqual(os.stat(big).st_nlink, 2)
        self.assertEqual(os.getxattr(self.vol.path("sparse"), "user.small"), b"v")
        self.assertEqual(os.getxattr(self.vol.path("sparse"), "user.kilobytes"), rand_bytes(3000, 9))
        self.fsck_clean()

    def test_an_xattr_value_too_large_for_the_disk_changes_nothing(self):
        # Each filesystem has its own limit (ext4 a block, btrfs a node, XFS 64 KiB); past
        # the disk's or the kernel's, the mount refuses the value and keeps the old one.
        path = self.vol.path("f")
        write_file(path, b"x")
        os.setxattr(path, "user.a", b"old")
        with self.assertRaises(OSError) as cm:
            os.setxattr(path, "user.a", bytes(65536))
        self.assertIn(cm.exception.errno, (errno.E2BIG, errno.ENOSPC, errno.ERANGE))
        self.assertEqual(os.getxattr(path, "user.a"), b"old")


class OnXfs(BackingFilesystem, unittest.TestCase):
    def make_disk(self, where):
        loop_disk(self, ["mkfs.xfs", "-q", "-f"], 320, where)


class OnXfsWithDirectBacking(OnXfs):
    mount_args = ("--direct-backing",)


class OnBtrfs(BackingFilesystem, unittest.TestCase):
    def make_disk(self, where):
        loop_disk(self, ["mkfs.btrfs", "-q", "-f"], 256, where)


class OnTmpfs(BackingFilesystem, unittest.TestCase):
    def make_disk(self, where):
        run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", where])
        self.addCleanup(run, ["umount", "-l", where], check=False)


if __name__ == "__main__":
    main()
