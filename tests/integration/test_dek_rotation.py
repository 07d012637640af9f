#!/usr/bin/env python3
"""DEK rotation, the block half: every per-block key moves to the new DEK version, online,
resumably, by rewriting metadata pages only (fs/block_rewrap.h).

The backing files are read with FORMAT.md's layout: a group is one 4096-byte metadata page
and 31 data blocks; the page's MAC names its DEK version at offset 36; entry e's two 64-byte
slots start at 128 + 128*e, each with its sequence number and DEK version (little-endian).
"""
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
import unittest

from common import BIN, GROUP_BYTES, Volume, flip_bits, main, read_file, run, wait_for, write_file

BS = 4096
AUDIT = os.environ.get("ENVELOPEFS_AUDIT_LOG")


def pages_of(backing_file):
    """[(page MAC version, [DEK version of every non-empty slot])] for each metadata page."""
    data = read_file(backing_file)
    out = []
    for off in range(0, len(data), GROUP_BYTES):
        page = data[off:off + 4096]
        (mac_version,) = struct.unpack_from("<I", page, 36)
        versions = []
        for e in range(31):
            for k in (0, 1):
                seq, version = struct.unpack_from("<II", page, 128 + 128 * e + 64 * k)
                if seq:
                    versions.append(version)
        out.append((mac_version, versions))
    return out


def data_digest(backing_file):
    """A digest of everything but the metadata pages: the ciphertext a re-wrap must not touch."""
    data = read_file(backing_file)
    h = hashlib.sha256()
    for off in range(0, len(data), GROUP_BYTES):
        h.update(data[off + 4096:off + GROUP_BYTES])
    return h.hexdigest()


def dek_versions_in_use(vol):
    """Every DEK version a backing file's pages or slots name."""
    used = set()
    for f in vol.backing_files():
        for mac_version, slots in pages_of(f):
            used.add(mac_version)
            used.update(slots)
    return used


class DekRotationTest(unittest.TestCase):
    def setUp(self):
        self.vol = Volume()

    def tearDown(self):
        self.vol.cleanup()

    def rotate(self):
        return run([BIN, "rotate-dek", self.vol.cipher])

    def record(self):
        try:
            return read_file(os.path.join(self.vol.cipher, "envelopefs.rewrapped")).decode().strip()
        except FileNotFoundError:
            return None

    def versions_in_use(self):
        return dek_versions_in_use(self.vol)

    def log_lines_since(self, marker_count, text):
        """Log lines containing `text` after the `marker_count`-th mount line."""
        out, mounts = [], 0
        for line in self.vol.log_text().splitlines():
            if "envelopefs: mounted " in line:
                mounts += 1
            elif mounts > marker_count and text in line:
                out.append(line)
        return out

    def populate(self):
        """A tree with every kind of file a walk must handle; returns {path: content}."""
        p = self.vol.path
        files = {}
        os.makedirs(p("dir", "sub"))
        files["small"] = b"small file"
        files["dir/sub/three-groups"] = os.urandom(3 * 31 * BS + 1234)
        files["L" * 250] = os.urandom(20000)  # a long name: its entry is envelopefs.long.<hash>
        files["empty"] = b""
        for name, content in files.items():
            write_file(p(name), content)
        with open(p("sparse"), "wb") as f:  # holes, and a page in between written as all holes
            f.write(b"head")
            f.seek(5 * GROUP_BYTES)
            f.write(b"tail")
        files["sparse"] = b"head" + bytes(5 * GROUP_BYTES - 4) + b"tail"
        with open(p("dir", "sub", "three-groups"), "r+b") as f:  # one block with both slots used
            f.seek(7 * BS)
            f.write(b"x" * BS)
        c = files["dir/sub/three-groups"]
        files["dir/sub/three-groups"] = c[:7 * BS] + b"x" * BS + c[8 * BS:]
        os.link(p("small"), p("dir", "hardlink"))
        files["dir/hardlink"] = files["small"]
        write_file(p("readonly"), b"mode 0444")
        os.chmod(p("readonly"), 0o444)
        files["readonly"] = b"mode 0444"
        os.utime(p("dir", "sub", "three-groups"), ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        os.sync()
        return files

    def test_a_rotation_re_wraps_every_block_key_of_the_mounted_volume_and_no_data_block_changes(self):
        self.vol.mount("--key-check-interval", "1")
        files = self.populate()
        self.assertEqual(self.versions_in_use(), {1})
        digests = {f: data_digest(f) for f in self.vol.backing_files()}
        mtimes = {n: os.stat(self.vol.path(n)).st_mtime_ns for n in files}
        # The backing files' own, which the mount reports once its cached attributes expire.
        backing_mtimes = {f: os.stat(f).st_mtime_ns for f in self.vol.backing_files()}

        # A writer keeps changing a file of its own while the walk runs: the walk and the
        # mount's requests share one open file, and neither may lose the other's changes.
        stop, errors, live = threading.Event(), [], bytearray(os.urandom(40 * BS))
        write_file(self.vol.path("live"), bytes(live), fsync=True)

        def writer():
            n = 0
            while not stop.is_set():
                off = (n * 7919 % 40) * BS
                chunk = os.urandom(BS)
                try:
                    with open(self.vol.path("live"), "r+b") as f:
                        f.seek(off)
                        f.write(chunk)
                    live[off:off + BS] = chunk
                except OSError as e:
                    errors.append(e)
                n += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            self.assertIn("DEK v2 of volume", self.rotate().stdout)
            self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60), self.vol.log_text())
            time.sleep(0.3)  # writes go on after the walk too
        finally:
            stop.set()
            t.join()
        self.assertEqual(errors, [])
        done = [line for line in self.vol.log_text().splitlines() if "re-wrap done" in line]
        self.assertIn("every block key is under DEK v2", done[0])

        os.sync()
        self.assertEqual(self.versions_in_use(), {2})
        for f, digest in digests.items():  # the files not written since: ciphertext unchanged
            self.assertEqual(data_digest(f), digest, f)
        for f, mtime in backing_mtimes.items():
            self.assertEqual(os.stat(f).st_mtime_ns, mtime, f)
        self.assertEqual(self.record(), "2")
        self.vol.unmount()

        self.vol.mount()  # from disk
        for name, content in files.items():
            self.assertEqual(read_file(self.vol.path(name)), content, name)
        # A time set explicitly reads back exactly (a written file's may be the kernel's own
        # clock before its backing file is written, and differ from it by a moment).
        name = "dir/sub/three-groups"
        self.assertEqual(os.stat(self.vol.path(name)).st_mtime_ns, mtimes[name])
        self.assertEqual(read_file(self.vol.path("live")), bytes(live))
        self.assertEqual(self.log_lines_since(1, "re-wrapping"), [])  # nothing owed: no second walk
        self.vol.unmount()
        r = run([BIN, "fsck", "-q", self.vol.cipher])
        self.assertIn("0 problems", r.stdout)
        self.assertRegex(r.stdout, r"block keys: \d+ under DEK v2 \(active: v2\)")
        if AUDIT:
            with open(AUDIT) as f:
                records = [json.loads(line) for line in f if self.vol.cipher in line]
            ours = [r for r in records if r["event"] == "rewrap-blocks"]
            self.assertEqual([r["outcome"] for r in ours], ["ok"])

    def test_files_and_directories_moved_during_the_walk_are_not_passed_by(self):
        # Moves from a directory the walk has not reached into one it has left are noted and
        # followed (Filesystem::track_moves). Which moves race the walk is up to timing; the
        # outcome must not be: every block key under the new DEK.
        self.vol.mount("--key-check-interval", "1")
        p = self.vol.path
        for d in ("a", "b"):
            os.mkdir(p(d))
            for i in range(600):
                write_file(p(d, f"still{i}"), b"s" * 100)
        os.makedirs(p("a", "tree", "deeper"))
        movers = [f"m{i}" for i in range(40)]
        for name in movers:
            write_file(p("a", name), name.encode() * 500)
            write_file(p("a", "tree", "deeper", name), name.encode() * 50)
        stop, errors, rounds = threading.Event(), [], [0]

        def mover():
            here, there = "a", "b"
            while not stop.is_set():
                try:
                    for name in movers:
                        os.rename(p(here, name), p(there, name))
                    os.rename(p(here, "tree"), p(there, "tree"))
                except OSError as e:
                    errors.append(e)
                    return
                here, there = there, here
                rounds[0] += 1

        t = threading.Thread(target=mover)
        t.start()
        try:
            self.rotate()
            self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60), self.vol.log_text())
        finally:
            stop.set()
            t.join()
        self.assertEqual(errors, [])
        self.assertGreater(rounds[0], 0)
        self.vol.unmount()
        left = [f for f in self.vol.backing_files() if any(1 in [m, *sl] for m, sl in pages_of(f))]
        self.assertEqual(self.versions_in_use(), {2}, "\n".join(left[:5]) + f" ({len(left)})" + self.vol.log_text())
        self.assertEqual(self.record(), "2")

    def test_a_daemon_killed_mid_walk_loses_nothing_and_the_next_mount_finishes_the_walk(self):
        self.vol.mount()
        files = {f"f{i}": os.urandom(40 * 31 * BS) for i in range(5)}  # 5 files of 40 pages
        for name, content in files.items():
            write_file(self.vol.path(name), content)
        self.vol.unmount()
        self.rotate()
        self.vol.mount("--rewrap-rate", "50")  # 200 pages: four seconds
        self.assertTrue(wait_for(lambda: "re-wrapping every block key" in self.vol.log_text()))
        time.sleep(1.5)
        self.vol.kill9()
        self.assertEqual(self.versions_in_use(), {1, 2})  # cut short, part way
        self.vol.mount()
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        done = self.log_lines_since(2, "re-wrap done")[0]
        left = int(re.search(r"(\d+) metadata pages rewritten", done)[1])
        self.assertLess(left, 200)  # only what the first walk had not done
        self.assertGreater(left, 0)
        for name, content in files.items():
            self.assertEqual(read_file(self.vol.path(name)), content, name)
        self.vol.unmount()
        self.assertEqual(self.versions_in_use(), {2})
        self.assertIn("0 problems", run([BIN, "fsck", "-q", self.vol.cipher]).stdout)

    def test_revocation_stops_the_walk_and_the_keys_return_resumes_it(self):
        self.vol.mount()
        for i in range(4):
            write_file(self.vol.path(f"f{i}"), os.urandom(40 * 31 * BS))
        self.vol.unmount()
        self.rotate()
        self.vol.mount("--rewrap-rate", "40", "--key-check-interval", "1")
        self.assertTrue(wait_for(lambda: "re-wrapping every block key" in self.vol.log_text()))
        os.rename(self.vol.key, self.vol.key + ".away")  # the root key file is gone: revoked
        try:
            self.assertTrue(wait_for(lambda: "re-wrap stopped: keys revoked" in self.vol.log_text()),
                            self.vol.log_text())
            self.assertEqual(self.versions_in_use(), {1, 2})
        finally:
            os.rename(self.vol.key + ".away", self.vol.key)
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60), self.vol.log_text())
        self.vol.unmount()
        self.assertEqual(self.versions_in_use(), {2})
        self.assertEqual(self.record(), "2")

    def test_a_walk_cut_short_goes_on_at_the_next_mount_rewriting_only_what_is_left(self):
        self.vol.mount()
        write_file(self.vol.path("a"), os.urandom(2 * 31 * BS))  # two pages
        write_file(self.vol.path("b"), os.urandom(3 * 31 * BS + 1))  # four pages
        content = {n: read_file(self.vol.path(n)) for n in ("a", "b")}
        self.vol.unmount()
        (b_backing,) = [f for f in self.vol.backing_files() if len(pages_of(f)) == 4]
        b_under_v1 = read_file(b_backing)

        self.rotate()  # offline: the next mount owes the walk
        self.vol.mount()
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        self.assertIn("2 files, 6 metadata pages rewritten", self.vol.log_text())
        self.vol.unmount()
        self.assertEqual(self.versions_in_use(), {2})

        # What a walk stopped after `a` leaves: `b` still under v1, and no record.
        write_file(b_backing, b_under_v1)
        os.unlink(os.path.join(self.vol.cipher, "envelopefs.rewrapped"))
        self.assertEqual(self.versions_in_use(), {1, 2})
        self.vol.mount()
        self.assertTrue(wait_for(lambda: len(self.log_lines_since(2, "re-wrap done")) == 1))
        self.assertIn("2 files, 4 metadata pages rewritten", self.log_lines_since(2, "re-wrap done")[0])
        for n, c in content.items():
            self.assertEqual(read_file(self.vol.path(n)), c)
        self.vol.unmount()
        self.assertEqual(self.versions_in_use(), {2})

    def test_a_dek_version_is_dropped_only_once_nothing_uses_it_and_then_backups_lose_it(self):
        self.vol.mount()
        content = os.urandom(100_000)
        write_file(self.vol.path("f"), content)
        self.vol.unmount()
        backup = os.path.join(self.vol.root, "backup")
        shutil.copytree(self.vol.cipher, backup, symlinks=True)  # taken before the rotation
        conf = os.path.join(self.vol.cipher, "envelopefs.conf")

        def drop(version, *args):
            return run([BIN, "drop-dek", "--version", str(version), *args, self.vol.cipher], check=False)

        self.rotate()
        original = read_file(conf)
        r = drop(1, "--yes")  # the blocks are still under v1: no re-wrap has run yet
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, r"DEK v1 still wraps \d+ block keys and seals 1 metadata pages")
        self.assertEqual(read_file(conf), original)

        self.vol.mount()
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        self.vol.unmount()
        for version, expected in ((2, "is the active version"), (9, "has no DEK version 9")):
            r = drop(version, "--yes")
            self.assertEqual(r.returncode, 1)
            self.assertIn(expected, r.stderr)
        r = drop(1)  # unused now, but not without --yes
        self.assertEqual(r.returncode, 1)
        self.assertIn("No file of this volume uses DEK v1", r.stdout)
        self.assertEqual(read_file(conf), original)

        # The backup taken before the rotation still opens with the current config: its blocks
        # are under v1, which the config still holds.
        shutil.copyfile(conf, os.path.join(backup, "envelopefs.conf"))
        self.assertIn("0 problems", run([BIN, "fsck", "-q", backup]).stdout)

        r = drop(1, "--yes")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("DEK v1 dropped", r.stdout)
        with open(conf) as f:
            self.assertEqual([(d["version"], d["state"]) for d in json.load(f)["deks"]], [(2, "active")])
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), content)
        self.vol.unmount()
        self.assertIn("0 problems", run([BIN, "fsck", "-q", self.vol.cipher]).stdout)

        # Crypto-shredding: the backup, with the config as it is now, has lost what v1 wrapped.
        shutil.copyfile(conf, os.path.join(backup, "envelopefs.conf"))
        r = run([BIN, "fsck", "-q", backup], check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown DEK version 1", r.stdout)
        if AUDIT:
            with open(AUDIT) as f:
                records = [json.loads(line) for line in f if self.vol.cipher + '"' in line]
            self.assertEqual([r["outcome"] for r in records if r["event"] == "drop-dek"],
                             ["invalid argument", "invalid argument", "not found", "checked", "ok"])

    def test_drop_dek_removes_a_record_the_pages_prove_wrong(self):
        self.vol.mount()
        write_file(self.vol.path("f"), os.urandom(50_000))
        self.vol.unmount()
        (backing,) = self.vol.backing_files()
        under_v1 = read_file(backing)
        self.rotate()
        self.vol.mount()
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        self.vol.unmount()
        write_file(backing, under_v1)  # a copy from before put back: the record now lies
        self.assertEqual(self.record(), "2")
        r = run([BIN, "drop-dek", "--version", "1", "--yes", self.vol.cipher], check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("still wraps 13 block keys", r.stderr)
        self.assertIsNone(self.record())
        self.vol.mount()  # walks again
        self.assertTrue(wait_for(lambda: len(self.log_lines_since(2, "re-wrap done")) == 1))
        self.vol.unmount()
        run([BIN, "drop-dek", "--version", "1", "--yes", self.vol.cipher])

    def test_a_read_only_mount_leaves_the_re_wrap_to_the_next_read_write_one(self):
        self.vol.mount()
        write_file(self.vol.path("f"), os.urandom(10_000))
        self.vol.unmount()
        before = {f: read_file(f) for f in self.vol.backing_files()}
        self.rotate()
        self.vol.mount("-o", "ro")
        self.assertEqual(len(read_file(self.vol.path("f"))), 10_000)
        self.assertTrue(wait_for(lambda: "is read-only: a read-write mount does it" in self.vol.log_text()))
        self.vol.unmount()
        self.assertEqual({f: read_file(f) for f in self.vol.backing_files()}, before)
        self.assertIsNone(self.record())
        self.vol.mount()
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        self.vol.unmount()
        self.assertEqual(self.versions_in_use(), {2})

    def test_the_walk_keeps_to_its_rate(self):
        self.vol.mount()
        write_file(self.vol.path("f"), os.urandom(100 * 31 * BS))  # 100 metadata pages
        self.vol.unmount()
        self.rotate()
        self.vol.mount("-o", "rewrap_rate=40")
        self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text(), timeout=60))
        self.vol.unmount()
        log = self.vol.log_text()
        self.assertIn("at most 40 pages a second", log)
        seconds = float(re.search(r"100 metadata pages rewritten in ([\d.]+) s", log)[1])
        self.assertGreaterEqual(seconds, (100 - 16) / 40)  # a pace, not a speed: it cannot go faster
        r = run([BIN, "mount", "-o", "rewrap_rate=fast", self.vol.cipher, self.vol.mnt], check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("rewrap_rate= takes 0..", r.stderr)

    def test_a_damaged_file_is_reported_and_the_walk_goes_on_and_stays_owed(self):
        self.vol.mount()
        for name in ("one", "two"):
            write_file(self.vol.path(name), os.urandom(50_000))
        self.vol.unmount()
        damaged, intact = sorted(self.vol.backing_files())
        self.rotate()
        flip_bits(damaged, 200, 1)  # one byte of a slot in its header page: the MAC fails
        before = read_file(damaged)
        self.vol.mount()
        self.assertTrue(wait_for(lambda: "incomplete" in self.vol.log_text()), self.vol.log_text())
        log = self.vol.log_text()
        self.assertIn("re-wrap: " + damaged + ": ", log)
        self.assertIn("1 files could not be re-wrapped", log)
        self.assertIsNone(self.record())  # still owed: the next mount walks again
        self.vol.unmount()
        self.assertEqual(read_file(damaged), before)  # left exactly as it was
        self.assertEqual({v for mac, slots in pages_of(intact) for v in [mac, *slots]}, {2})
        if AUDIT:
            with open(AUDIT) as f:
                records = [json.loads(line) for line in f if self.vol.cipher in line]
            self.assertEqual([r["outcome"] for r in records if r["event"] == "rewrap-blocks"], ["failed"])


if __name__ == "__main__":
    main()
