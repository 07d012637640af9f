"""Volumes frozen at each format version (tests/testdata) still mount and read back exactly."""
import os
import random
import shutil
import unittest

from common import BIN, Volume, main, read_file, run, write_file

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata")
KEY_PATH = "/tmp/envelopefs-testdata-v1.key"  # recorded in the frozen config


class FrozenV1(unittest.TestCase):
    def setUp(self):
        self.vol = Volume(init=False)
        shutil.copytree(os.path.join(DATA, "v1"), self.vol.cipher, symlinks=True)
        shutil.copyfile(os.path.join(DATA, "v1.key"), KEY_PATH)
        os.chmod(KEY_PATH, 0o600)

    def tearDown(self):
        self.vol.cleanup()

    def test_reads_back_exactly(self):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.vol.mount()
        p = self.vol.path
        rnd = random.Random(20261122)
        self.assertEqual(sorted(os.listdir(self.vol.mnt)), sorted(["dir", "empty", "small.txt", "L" * 240, "link"]))
        self.assertEqual(read_file(p("empty")), b"")
        self.assertEqual(read_file(p("small.txt")), b"hello, frozen volume v1\n")
        self.assertEqual(read_file(p("dir", "blocks.bin")), rnd.randbytes(31 * 4096 + 1000))
        self.assertEqual(read_file(p("dir", "sub", "sparse")), b"start" + bytes(300000 - 5) + b"end")
        self.assertEqual(read_file(p("L" * 240)), b"long name")
        self.assertEqual(os.readlink(p("link")), "dir/blocks.bin")
        # git keeps no hard links: the two names are two identical backing files here.
        self.assertEqual(read_file(p("dir", "hardlink")), read_file(p("small.txt")))

    def test_new_directories_keep_nonce_files(self):
        # A volume without the "nonce-names" feature goes on making nonce files, so the build
        # that made it can still read everything written since (fs/FORMAT.md, "Names").
        self.vol.mount()
        os.makedirs(self.vol.path("new", "sub"))
        write_file(self.vol.path("new", "sub", "f"), b"after the freeze")
        os.mkdir(self.vol.path("gone"))
        os.rmdir(self.vol.path("gone"))
        self.vol.unmount()
        nonces = [os.path.join(d, "envelopefs.dirnonce") for d, _, files in os.walk(self.vol.cipher)
                  if "envelopefs.dirnonce" in files]
        self.assertEqual(len(nonces), 5)  # root, dir, dir/sub, new, new/sub
        named = [f for _, _, files in os.walk(self.vol.cipher) for f in files if f.startswith("envelopefs.dirnonce.")]
        self.assertEqual(named, [])
        for n in nonces:
            self.assertFalse(os.path.islink(n), n)
            self.assertEqual(os.path.getsize(n), 16, n)
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("new", "sub", "f")), b"after the freeze")
        self.assertNotIn("gone", os.listdir(self.vol.mnt))


if __name__ == "__main__":
    main()
