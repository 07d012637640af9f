"""Power loss: the cipher dir lives on cutfs (tests/tools/cutfs.cc), which on command drops
every write and directory change that was not fsynced, as a power cut would. Everything fsynced
on the mount must be readable and intact afterwards, including files in directories created
just before the cut; per-directory records, file headers and the config are never what is
missing; fsck is clean."""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from common import (BIN, Volume, init_on_disk, is_mounted, loop_disk, main, rand_bytes, read_file, run,
                    wait_for)
from test_databases import pg_bin
from test_db_crash import (NO_ROCKSDB, ROCKS_ACKER, acked_through_crash, check_postgres_crash,
                           check_rocksdb_crash, check_sqlite_crash)
from test_dek_rotation import dek_versions_in_use

CUTFS = os.environ.get("CUTFS_BIN", os.path.join(os.path.dirname(__file__), "../../build/tests/cutfs"))


class PowerLoss(unittest.TestCase):
    def setUp(self):
        self.vol = Volume(init=False)
        self.backing = os.path.join(self.vol.root, "disk")
        self.disk = os.path.join(self.vol.root, "cutfs")
        self.done = os.path.join(self.vol.root, "cut-done")
        os.mkdir(self.backing)
        os.mkdir(self.disk)
        self.cutfs_log = open(os.path.join(self.vol.root, "cutfs.log"), "w")
        env = dict(os.environ, CUTFS_DONE=self.done)
        self.cutfs = subprocess.Popen([CUTFS, self.backing, self.disk], stderr=self.cutfs_log, env=env)
        for _ in range(200):
            if is_mounted(self.disk):
                break
            time.sleep(0.05)
        self.assertTrue(is_mounted(self.disk), "cutfs did not mount")
        self.vol.cipher = os.path.join(self.disk, "cipher")
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])

    def tearDown(self):
        self.vol.cleanup()
        subprocess.run(["fusermount3", "-u", self.disk], capture_output=True)
        self.cutfs.terminate()
        self.cutfs.wait(timeout=10)
        self.cutfs_log.close()
        # The volume's cleanup could not remove cutfs's mountpoint while it was mounted.
        shutil.rmtree(self.vol.root, ignore_errors=True)

    def power_cut(self):
        """Everything above the disk dies at once; the disk loses what was not made durable."""
        self.vol.kill9()
        self.power_cut_without_mount()

    def fsync_write(self, path, data):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)

    def fsck_clean(self):
        r = run([BIN, "fsck", "-q", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_cut_right_after_init_leaves_a_mountable_volume(self):
        self.power_cut_without_mount()
        self.vol.mount()
        os.listdir(self.vol.mnt)
        self.fsck_clean()

    def power_cut_ext4(self):
        """A power cut as ext4 may leave a file that was growing: its length kept up to the end
        of the 4 KiB block its fsynced length ended in, without that block's new data."""
        self.vol.kill9()
        self.power_cut_without_mount(signal.SIGUSR2)

    def power_cut_data_first(self):
        """A power cut as a filesystem that writes data back before the inode may leave it (ext4
        without a journal): every file keeps the changes made within its fsynced length, and
        goes back to that length. A short last block that was growing holds its longer data,
        cut at the old length."""
        self.vol.kill9()
        self.power_cut_without_mount(signal.SIGRTMIN)

    def power_cut_without_mount(self, sig=signal.SIGUSR1):
        self.cutfs.send_signal(sig)
        # Undoing a database's writes (and fsyncing each file) can take seconds under ASan on a
        # busy machine: 10 s once was not enough.
        self.assertTrue(wait_for(lambda: os.path.exists(self.done), timeout=60, step=0.05), "cutfs did not cut")
        os.unlink(self.done)

    def test_fsynced_data_survives_and_unsynced_reads_old_or_not_at_all(self):
        self.vol.mount()
        p = self.vol.path
        os.makedirs(p("a", "b"))
        files = {
            ("top",): rand_bytes(10000, 1),
            ("a", "f1"): rand_bytes(200000, 2),
            ("a", "b", "f2"): rand_bytes(5000, 3),
        }
        for parts, data in files.items():
            self.fsync_write(p(*parts), data)
        long_name = "n" * 240
        files[("a", long_name)] = rand_bytes(7000, 4)
        self.fsync_write(p("a", long_name), files[("a", long_name)])
        # Not fsynced from here on.
        with open(p("a", "f1"), "r+b") as f:
            f.seek(4096 * 3)
            f.write(rand_bytes(50000, 5))
        with open(p("a", "unsynced.txt"), "wb") as f:
            f.write(b"maybe")
        os.mkdir(p("c"))
        with open(p("top"), "ab") as f:
            f.write(b"appended, never synced")
        # A directory created just before the cut, with a fsynced file in it.
        os.makedirs(p("late", "deeper"))
        files[("late", "deeper", "f3")] = rand_bytes(12345, 6)
        self.fsync_write(p("late", "deeper", "f3"), files[("late", "deeper", "f3")])

        self.power_cut()
        self.vol.mount()
        for parts, data in files.items():
            self.assertEqual(read_file(p(*parts)), data, parts)
        if os.path.exists(p("a", "unsynced.txt")):
            self.assertIn(read_file(p("a", "unsynced.txt")), (b"", b"maybe"))
        self.fsck_clean()
        if os.path.exists(p("c")):
            # Its entry outlived the cut (the root was fsynced for "late"), its nonce did not:
            # an empty directory, usable as one (a fresh nonce at first use).
            self.assertEqual(os.listdir(p("c")), [])
            self.fsync_write(p("c", "after"), b"after the cut")
            self.vol.unmount()
            self.vol.mount()
            self.assertEqual(read_file(p("c", "after")), b"after the cut")
            self.fsck_clean()

    def test_sqlite_keeps_every_acknowledged_commit_through_a_power_cut(self):
        # WAL with synchronous=FULL, and the rollback journal with EXTRA: the levels at which
        # SQLite promises that a commit survives power loss (with FULL, a rollback journal's
        # deletion is not synced, so a cut may roll the last commit back by design).
        # And WAL once more through the cut that keeps a growing block's data without the
        # file's length (its 4120-byte frames leave the end inside a block at most commits;
        # the writeback cache makes a hit rare here, test_files_growing_by_odd_records... is
        # the test that reaches that state every round).
        for mode, sync, cut in (("WAL", "FULL", self.power_cut), ("DELETE", "EXTRA", self.power_cut),
                                ("WAL", "FULL", self.power_cut_data_first)):
            self.vol.mount("--allow-other")
            check_sqlite_crash(self, self.vol, mode, sync, cut, name=f"{mode}-{cut.__name__}.db")
            self.vol.unmount()
            self.fsck_clean()

    @unittest.skipUnless(pg_bin(), "PostgreSQL is not installed (apt-get install postgresql postgresql-contrib)")
    def test_postgres_keeps_every_acknowledged_commit_through_a_power_cut(self):
        # PostgreSQL's defaults (fsync on, synchronous_commit on, full_page_writes on): a
        # commit is acknowledged once its WAL is fdatasynced, and a new WAL segment's directory
        # entry is fsynced before it is used. All of it must reach the disk through the mount.
        self.vol.mount("--allow-other")
        check_postgres_crash(self, self.vol, self.power_cut)
        self.vol.unmount()
        self.fsck_clean()

    @unittest.skipUnless(os.path.exists(ROCKS_ACKER), NO_ROCKSDB)
    def test_rocksdb_keeps_every_acknowledged_commit_through_power_cuts(self):
        # RocksDB fdatasyncs its WAL at each synchronous commit, syncs a table file and the
        # MANIFEST before CURRENT names them, and fsyncs the directory after creating files;
        # then drops WAL and table files that compaction made obsolete. Two cuts with buffered
        # table files, two more with O_DIRECT ones, on the same database.
        for direct in (False, True):
            self.vol.mount("--allow-other")
            check_rocksdb_crash(self, self.vol, direct, self.power_cut, rounds=2)
            self.vol.unmount()
            self.fsck_clean()

    def test_repeated_cuts_with_overwrites(self):
        self.vol.mount()
        path = self.vol.path("db")
        synced = rand_bytes(64 * 4096, 10)
        self.fsync_write(path, synced)
        for round_ in range(3):
            fd = os.open(path, os.O_RDWR)
            new = bytearray(synced)
            chunk = rand_bytes(8 * 4096, 20 + round_)
            off = (round_ * 13 % 50) * 4096 + 100
            os.pwrite(fd, chunk, off)
            new[off:off + len(chunk)] = chunk
            os.fsync(fd)
            synced = bytes(new)
            os.pwrite(fd, rand_bytes(20 * 4096, 40 + round_), 7 * 4096)  # lost in the cut
            os.close(fd)
            self.power_cut()
            self.vol.mount()
            self.assertEqual(read_file(path), synced, f"round {round_}")
        self.fsck_clean()

    def test_files_growing_by_odd_records_through_kills_and_cuts_read_whole(self):
        """Appends of records that leave each file's end inside a block (a log, SQLite's WAL
        with its 4120-byte frames), an fdatasync now and then, through daemon kills and power
        cuts (as cutfs makes them, and as ext4 may: the length kept past a short last block
        whose new data was lost, or that block's new data kept without the length): every file
        reads without EIO, holds what was fdatasynced, and past that only what was written or
        zeros. Found killing the daemon under SQLite: a page of the next group, written first,
        made a short last block full length before its data had landed."""
        rng = random.Random(5)
        names = ["log0", "log1"]
        written = {n: b"" for n in names}  # what each file holds if every write landed
        synced = {n: 0 for n in names}
        self.vol.mount()
        crashes = (self.vol.kill9, self.power_cut, self.power_cut_ext4, self.power_cut_data_first)
        for round_no in range(12):
            stop = threading.Event()

            def append(name, seed):
                r = random.Random(seed)
                try:
                    fd = os.open(self.vol.path(name), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
                    while not stop.is_set():
                        record = r.randbytes(r.choice([4120, 517, 9000, 70000, 300000]))
                        written[name] += record  # before the write: part of it may land
                        os.write(fd, record)
                        if r.random() < 0.2:
                            os.fdatasync(fd)
                            synced[name] = len(written[name])
                except OSError:
                    pass  # the daemon is gone

            threads = [threading.Thread(target=append, args=(n, rng.random())) for n in names]
            for t in threads:
                t.start()
            time.sleep(0.3 + rng.random())
            crash = crashes[round_no % len(crashes)]
            crash()
            stop.set()
            for t in threads:
                t.join()
            self.vol.mount()
            for n in names:
                data = read_file(self.vol.path(n))  # raises on EIO
                label = f"round {round_no} ({crash.__name__}), {n}"
                self.assertGreaterEqual(len(data), synced[n], label)
                self.assertLessEqual(len(data), len(written[n]), label)
                self.assertEqual(data[:synced[n]], written[n][:synced[n]], label)
                for at in range(synced[n], len(data), 4096):
                    got, want = data[at:at + 4096], written[n][at:at + 4096]
                    if got != want and any(g not in (0, w) for g, w in zip(got, want)):
                        self.fail(f"{label}: bytes from {at} are neither what was written nor zeros")
                written[n] = data
        self.vol.unmount()
        self.fsck_clean()

    def test_direct_backing_on_a_disk_without_o_direct_uses_its_page_cache(self):
        """cutfs, like many FUSE filesystems, opens files O_DIRECT and then refuses every
        O_DIRECT transfer with EINVAL. --direct-backing must notice at mount (a probe) and go
        through the page cache, saying so, instead of failing every write it sends there."""
        self.vol.mount("--direct-backing")
        self.assertIn("does not do O_DIRECT I/O", self.vol.log_text())
        self.assertEqual([n for n in os.listdir(self.vol.cipher) if "probe" in n], [], "the probe left a file")
        data = rand_bytes(300000, 7)
        self.fsync_write(self.vol.path("f"), data)
        self.power_cut()
        self.vol.mount("--direct-backing")
        self.assertEqual(read_file(self.vol.path("f")), data)
        self.vol.unmount()
        self.fsck_clean()

    def test_atomic_replace_keeps_the_last_acknowledged_version(self):
        """Editors, package managers and databases replace a file by writing a new one under
        a temporary name, fsyncing it, renaming it over the old one and fsyncing the
        directory (both directories when the temporary one is elsewhere). After a cut each
        name must hold, whole, the last version whose directory fsync returned, or the one
        after it that was in flight: never nothing, never a mix. Short and long names (the
        long one has a record beside its entry), same directory and across directories."""
        self.vol.mount()
        os.makedirs(self.vol.path("etc", "staging"))
        os.makedirs(self.vol.path("etc", "deep", "er"))
        targets = [self.vol.path("etc", "settings"), self.vol.path("etc", "deep", "er", "L" * 220)]
        for round_, cut_after in enumerate((15, 40)):
            writer = subprocess.Popen([sys.executable, "-c", ATOMIC_REPLACER, self.vol.path("etc"), *targets],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            acked = acked_through_crash(self, writer, cut_after, self.power_cut)
            self.vol.mount()
            for t in targets:
                data = read_file(t)  # raises if the name is gone
                version = int(data[:8])
                self.assertEqual(data, atomic_version(version, t), f"round {round_}: {t} is torn")
                self.assertIn(version, (acked, acked + 1), f"round {round_}: {t} lost acknowledged versions")
            self.vol.unmount()
            self.fsck_clean()
            self.vol.mount()

    def test_a_cut_during_the_block_re_wrap_and_right_after_it(self):
        # Mid-walk: whatever pages reached the disk are under the new DEK, the rest under the
        # old one, both in the config; all of it reads. Right after the walk says it is done:
        # it synced before saying so, so nothing is under the old DEK any more.
        self.vol.mount()
        files = {f"f{i}": rand_bytes(40 * 31 * 4096, seed=i) for i in range(3)}  # 120 pages
        for name, content in files.items():
            self.fsync_write(self.vol.path(name), content)
        self.vol.unmount()
        run([BIN, "rotate-dek", self.vol.cipher])
        self.vol.mount("--rewrap-rate", "40")  # three seconds
        self.assertTrue(wait_for(lambda: "re-wrapping every block key" in self.vol.log_text()))
        time.sleep(1.5)
        self.power_cut()
        self.assertEqual(dek_versions_in_use(self.vol) - {1, 2}, set())
        self.fsck_clean()
        self.vol.mount()
        for name, content in files.items():
            self.assertEqual(read_file(self.vol.path(name)), content, name)
        self.assertTrue(wait_for(lambda: self.vol.log_text().count("re-wrap done") == 1))
        self.power_cut()
        self.assertEqual(dek_versions_in_use(self.vol), {2})
        self.assertEqual(read_file(os.path.join(self.vol.cipher, "envelopefs.rewrapped")), b"2\n")
        self.fsck_clean()


def atomic_version(version, target):
    """Version `version` of `target`: its number, then 1 to 60,000 bytes that follow from it."""
    body = rand_bytes(version * 7919 % 60000 + 1, seed=f"{target}:{version}")
    return f"{version:08d}".encode() + body


# The replacing writer: version after version of each target, each written under a temporary
# name (beside the target, or in etc/staging for every other version), fsynced, renamed over
# the target and the directories fsynced; a version's number is printed once every target has
# it. It carries on from what the targets hold, so a second round continues the first.
ATOMIC_REPLACER = """
import os, sys
sys.path.insert(0, HERE)
from test_power_loss import atomic_version
etc, targets = sys.argv[1], sys.argv[2:]
def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
version = 0
for t in targets:
    if os.path.exists(t):
        with open(t, "rb") as f:
            version = max(version, int(f.read(8)))
while True:
    version += 1
    for t in targets:
        d = os.path.dirname(t)
        tmp_dir = os.path.join(etc, "staging") if version % 2 else d
        tmp = os.path.join(tmp_dir, "tmp-" + os.path.basename(t)[:20])
        with open(tmp, "wb") as f:
            f.write(atomic_version(version, t))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, t)
        fsync_dir(d)
        if tmp_dir != d:
            fsync_dir(tmp_dir)
    print(version, flush=True)
""".replace("HERE", repr(os.path.dirname(os.path.abspath(__file__))))



class UnmountWritesBack(unittest.TestCase):
    """`envelopefs unmount` returns with the volume on disk, as a disk filesystem's unmount
    does: the daemon syncs the backing filesystem after closing every file, and unmount
    waits for it. Here the cipher dir is on an ext4 image on a loop device, whose write
    counter (/sys/block/loopN/stat) tells whether a `sync` right after the unmount still
    had the volume's data to write: it must not. (cutfs cannot show this: the kernel sends
    no syncfs to a FUSE filesystem.)"""

    def setUp(self):
        self.vol = Volume(init=False)
        self.addCleanup(self.vol.cleanup)
        self.disk = os.path.join(self.vol.root, "disk")
        os.mkdir(self.disk)
        self.loop = loop_disk(self, ["mkfs.ext4", "-q", "-F"], 512, self.disk)
        init_on_disk(self, self.vol, self.disk)

    def sectors_written(self):
        with open(f"/sys/block/{os.path.basename(self.loop)}/stat") as f:
            return int(f.read().split()[6])

    def test_nothing_is_left_to_write_when_unmount_returns(self):
        self.vol.mount()
        data = rand_bytes(64 << 20, 5)
        with open(self.vol.path("big"), "wb") as f:  # no fsync: the page caches hold it
            f.write(data)
        for i in range(200):
            with open(self.vol.path(f"small{i}"), "wb") as f:
                f.write(b"%d" % i)
        run([BIN, "unmount", self.vol.mnt])
        before = self.sectors_written()
        run(["sync", "-f", self.disk])
        left = (self.sectors_written() - before) * 512
        self.assertLess(left, 1 << 20, f"{left} bytes were still to write after the unmount returned")
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("big")), data)
        self.assertEqual(read_file(self.vol.path("small199")), b"199")


if __name__ == "__main__":
    main()
