"""Volumes frozen at each format version (tests/testdata) still mount and read back exactly."""
import os
import random
import shutil
import unittest

from common import BIN, Volume, main, read_file, run, write_file

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata")


class Frozen(unittest.TestCase):
    name = "v1"

    def setUp(self):
        self.vol = Volume(init=False)
        shutil.copytree(os.path.join(DATA, self.name), self.vol.cipher, symlinks=True)
        key_path = f"/tmp/envelopefs-testdata-{self.name}.key"  # recorded in the frozen config
        shutil.copyfile(os.path.join(DATA, self.name + ".key"), key_path)
        os.chmod(key_path, 0o600)

    def tearDown(self):
        self.vol.cleanup()

    def check_tree(self, seed, small, sparse_size, more={}):
        """The contents every frozen volume holds (tests/testdata/README.md), and `more`."""
        p = self.vol.path
        rnd = random.Random(seed)
        self.assertEqual(sorted(os.listdir(self.vol.mnt)),
                         sorted(["dir", "empty", "small.txt", "L" * 240, "link", *more]))
        self.assertEqual(read_file(p("empty")), b"")
        self.assertEqual(read_file(p("small.txt")), small)
        self.assertEqual(read_file(p("dir", "blocks.bin")), rnd.randbytes(31 * 4096 + 1000))
        self.assertEqual(read_file(p("dir", "sub", "sparse")), b"start" + bytes(sparse_size - 8) + b"end")
        self.assertEqual(read_file(p("L" * 240)), b"long name")
        self.assertEqual(os.readlink(p("link")), "dir/blocks.bin")
        # git keeps no hard links: the two names are two identical backing files here.
        self.assertEqual(read_file(p("dir", "hardlink")), small)
        for name, content in more.items():
            self.assertEqual(read_file(p(name)), content)


class FrozenV1(Frozen):
    name = "v1"

    def test_reads_back_exactly(self):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.vol.mount()
        self.check_tree(20261122, b"hello, frozen volume v1\n", sparse_size=300003)

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

    def test_a_rotation_keeps_the_old_blocks_under_the_dek_they_name(self):
        # Made before the "rewrappable-blocks" feature: each block's associated data names the
        # DEK version that wraps its key, so re-wrapping it would need re-encrypting it. The
        # rotation still works for new writes; the old blocks keep v1 (fs/block_rewrap.h).
        r = run([BIN, "rotate-dek", self.vol.cipher])
        self.assertIn("predates re-wrappable block keys", r.stdout)
        self.vol.mount()
        write_file(self.vol.path("after-rotation"), b"sealed under v2")
        self.assertEqual(read_file(self.vol.path("small.txt")), b"hello, frozen volume v1\n")
        self.vol.unmount()
        log = self.vol.log_text()
        self.assertIn("made before block keys could be re-wrapped", log)
        self.assertNotIn("re-wrapping", log)
        r = run([BIN, "fsck", "-q", self.vol.cipher])
        self.assertIn("0 problems", r.stdout)
        self.assertRegex(r.stdout, r"block keys: \d+ under DEK v1, 1 under DEK v2 \(active: v2\)")
        self.assertIn("volume predates re-wrapping", run([BIN, "status", self.vol.cipher]).stdout)



class FrozenV1Rewrappable(Frozen):
    """Format 1 with "rewrappable-blocks" (block AAD without the DEK version), frozen after a
    rotation whose re-wrap moved every block key from v1 to v2, plus a file written under v2."""
    name = "v1-rewrappable"

    def test_reads_back_exactly(self):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("block keys: 38 under DEK v2 (active: v2)", r.stdout)
        self.vol.mount()
        self.check_tree(20261129, b"hello, frozen volume v1 with rewrappable blocks\n", sparse_size=300000,
                        more={"after.txt": b"written under DEK v2\n"})
        self.vol.unmount()
        self.assertNotIn("re-wrapping", self.vol.log_text())  # the record says it is done


if __name__ == "__main__":
    main()
