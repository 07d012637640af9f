"""`envelopefs fsck --repair`: a damaged volume is made readable again, giving up exactly what
does not authenticate (it reads as zeros), and checked clean afterwards. It refuses a mounted
volume. The damage is a flipped bit in a file's last block, and in a SQLite WAL, after which
the database opens again with what came before the damaged frame."""
import errno
import os
import signal
import sqlite3
import subprocess
import sys

from common import (BIN, GROUP_BYTES, VolumeTest, data_offset, flip_bits, main, rand_bytes, read_file, run,
                    write_file)

BS = 4096


def ino_of(path):
    return os.stat(path).st_ino


class Repair(VolumeTest):
    def backing_of(self, ino):
        """The backing file of the mount's inode `ino` (the mount shows backing inode numbers)."""
        (found,) = [p for p in self.vol.backing_files() if os.stat(p).st_ino == ino]
        return found

    def fsck(self, *args):
        return run([BIN, "fsck", "-q", *args, self.vol.cipher], check=False)

    def test_a_block_that_does_not_authenticate_is_repaired(self):
        # A file ending 904 bytes into block 1, and a bit of block 1 flipped on the disk.
        first = rand_bytes(BS + 904, 1)
        f = self.vol.path("log")
        write_file(f, first, fsync=True)
        ino = ino_of(f)
        self.vol.unmount()
        backing = self.backing_of(ino)
        flip_bits(backing, data_offset(1) + 100, 0x08)
        self.vol.mount()
        with self.assertRaises(OSError) as cm:
            read_file(f)
        self.assertEqual(cm.exception.errno, errno.EIO)

        # Mounted: refused, and nothing changes.
        before = read_file(backing)
        r = self.fsck("--repair")
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn(f"is mounted already read-write on {self.vol.mnt}", r.stderr)
        self.assertIn("nothing was changed", r.stderr)
        self.assertEqual(read_file(backing), before)

        self.vol.unmount()
        self.assertEqual(self.fsck().returncode, 1)
        r = self.fsck("--repair")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("REPAIRED /log: block 1 (bytes 4096-8191) is a hole now", r.stdout)
        self.assertIn("after repair: 1 directories, 1 files, 0 symlinks, 2 blocks checked; 0 problems", r.stdout)
        self.assertEqual(self.fsck().returncode, 0)
        self.vol.mount()
        self.assertEqual(read_file(f), first[:BS] + bytes(904))

    def test_sqlite_opens_after_a_damaged_wal_frame_is_repaired(self):
        db = self.vol.path("t.db")
        # A writer killed with its WAL not checkpointed: every commit is in the WAL.
        writer = subprocess.Popen([sys.executable, "-c", f"""
import sqlite3, sys
c = sqlite3.connect({db!r}, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
for k in range(400):
    c.execute("INSERT INTO t VALUES(?, randomblob(3000))", (k,))
print("done", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.assertEqual(writer.stdout.readline().strip(), "done")
        wal_ino = ino_of(db + "-wal")
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdin.close()
        writer.stdout.close()
        self.vol.unmount()
        wal = self.backing_of(wal_ino)
        # A bit flipped in a data block about half way through the WAL.
        block = (os.path.getsize(wal) // GROUP_BYTES) * 31 // 2
        flip_bits(wal, data_offset(block) + 100, 1)

        self.vol.mount()
        c = sqlite3.connect(db)
        with self.assertRaises(sqlite3.DatabaseError):  # disk I/O error: the block is EIO
            c.execute("SELECT count(*) FROM t").fetchone()
        c.close()
        self.vol.unmount()
        r = self.fsck("--repair")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"REPAIRED /t.db-wal: block {block} ", r.stdout)
        self.vol.mount()
        c = sqlite3.connect(db)
        self.assertEqual(c.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        # SQLite stops at the first frame that fails its checksum: the commits before it.
        rows = c.execute("SELECT count(*) FROM t").fetchone()[0]
        self.assertTrue(0 < rows < 400, rows)
        print(f"rows after repair: {rows} of 400", file=sys.stderr)
        self.assertEqual([k for (k,) in c.execute("SELECT k FROM t ORDER BY k")], list(range(rows)))
        c.close()


if __name__ == "__main__":
    main()
