"""Tampering with the cipher dir of an unmounted volume: every read of an affected block fails
with EIO and a log line naming the file and block; nothing wrong is ever returned; fsck lists
the damage."""
import errno
import os

from common import (BIN, GROUP_BYTES, Volume, VolumeTest, data_offset, flip_bits, main, rand_bytes, read_file,
                    run, write_file)

BS = 4096


class Tamper(VolumeTest):
    def setUp(self):
        super().setUp()
        self.a = rand_bytes(40 * BS, 1)
        self.b = rand_bytes(40 * BS, 2)
        # Create the files one mount at a time, so which backing file is which is certain.
        write_file(self.vol.path("a"), self.a)
        self.vol.unmount()
        (self.back_a,) = self.vol.backing_files()
        self.vol.mount()
        write_file(self.vol.path("b"), self.b)
        self.vol.unmount()
        (self.back_b,) = set(self.vol.backing_files()) - {self.back_a}

    def patch(self, path, off, data):
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def read_block(self, block):
        fd = os.open(self.vol.path("a"), os.O_RDONLY)
        try:
            return os.pread(fd, BS, block * BS)
        finally:
            os.close(fd)

    def assert_eio(self, block):
        with self.assertRaises(OSError) as cm:
            self.read_block(block)
        self.assertEqual(cm.exception.errno, errno.EIO)

    def assert_fsck_names(self, block):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(f"/a: block {block}", r.stdout)

    def test_bit_flip_in_data_block(self):
        flip_bits(self.back_a, data_offset(5) + 100, 0x10)
        self.vol.mount()
        self.assert_eio(5)
        self.assertEqual(self.read_block(4), self.a[4 * BS:5 * BS])  # neighbours are fine
        self.assertRegex(self.vol.log_text(), r"block 5: .*authentication failed|authentication failed.*block 5")
        self.vol.unmount()
        self.assert_fsck_names(5)

    def test_blocks_swapped_between_offsets(self):
        with open(self.back_a, "rb") as f:
            f.seek(data_offset(1))
            b1 = f.read(BS)
            f.seek(data_offset(2))
            b2 = f.read(BS)
        self.patch(self.back_a, data_offset(1), b2)
        self.patch(self.back_a, data_offset(2), b1)
        self.vol.mount()
        self.assert_eio(1)
        self.assert_eio(2)

    def test_block_copied_from_another_file(self):
        with open(self.back_b, "rb") as f:
            f.seek(data_offset(3))
            other = f.read(BS)
        self.patch(self.back_a, data_offset(3), other)
        self.vol.mount()
        self.assert_eio(3)

    def test_truncated_backing_file(self):
        os.truncate(self.back_a, data_offset(39) + 1000)
        self.vol.mount()
        self.assert_eio(39)
        self.assertEqual(self.read_block(0), self.a[:BS])

    def test_zeroed_metadata_page_is_not_a_hole(self):
        self.patch(self.back_a, GROUP_BYTES, bytes(4096))  # the second metadata page
        self.vol.mount()
        self.assert_eio(33)
        self.assertEqual(self.read_block(0), self.a[:BS])

    def test_renamed_entry_from_another_directory_is_not_listed(self):
        self.vol.mount()
        os.mkdir(self.vol.path("d"))
        self.vol.unmount()
        d = [p for p in os.listdir(self.vol.cipher) if os.path.isdir(os.path.join(self.vol.cipher, p))][0]
        os.rename(self.back_a, os.path.join(self.vol.cipher, d, os.path.basename(self.back_a)))
        self.vol.mount()
        self.assertEqual(os.listdir(self.vol.path("d")), [])  # the name does not decrypt there
        self.assertIn("skipping entry", self.vol.log_text())


if __name__ == "__main__":
    main()
