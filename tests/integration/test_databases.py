"""Databases on the mount: SQLite in WAL mode, PostgreSQL (initdb, pgbench, amcheck) and
RocksDB (db_bench with buffered, O_DIRECT and mmap file access), all checked clean after a
remount. PostgreSQL runs as user postgres through --allow-other."""
import glob
import os
import pwd
import random
import shutil
import sqlite3
import subprocess
import unittest

from common import VolumeTest, main, run


class Sqlite(VolumeTest):
    def test_wal_mode_integrity_across_remount(self):
        db = self.vol.path("test.db")
        con = sqlite3.connect(db)
        self.assertEqual(con.execute("PRAGMA journal_mode=WAL").fetchone()[0], "wal")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
        con.execute("CREATE INDEX tk ON t(k)")
        r = random.Random(1)
        for batch in range(20):
            with con:
                con.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                                [(r.randrange(1 << 30), r.randbytes(r.randrange(10, 3000))) for _ in range(500)])
        with con:
            for _ in range(2000):
                con.execute("UPDATE t SET v = ? WHERE id = ?", (r.randbytes(200), r.randrange(1, 10000)))
            con.execute("DELETE FROM t WHERE id % 7 = 0")
        self.assertEqual(con.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        count = con.execute("SELECT count(*) FROM t").fetchone()[0]
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        self.vol.remount()
        con = sqlite3.connect(db)
        self.assertEqual(con.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(con.execute("SELECT count(*) FROM t").fetchone()[0], count)
        con.close()


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


# Checks every btree index of the database (amcheck); prints how many it checked.
AMCHECK_ALL_BTREES = ("SELECT count(*) FROM (SELECT bt_index_check(c.oid, true) FROM pg_index i "
                      "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
                      "WHERE a.amname = 'btree' AND c.relpersistence != 't') s")


def pg_cluster(vol, port):
    """An empty data dir on the mounted `vol` and a socket dir beside the volume, both owned
    by postgres. Returns the data dir, the pg_ctl command that starts a server on `port`, and
    the connection arguments for psql and pgbench."""
    pg = pg_bin()
    pw = pwd.getpwnam("postgres")
    data = vol.path("pgdata")
    sock = os.path.join(vol.root, "sock")
    for d in (data, sock):
        os.mkdir(d)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    start = [f"{pg}/pg_ctl", "-D", data, "-l", os.path.join(sock, "pg.log"), "-w", "-o",
             f"-k {sock} -p {port} -c listen_addresses=''", "start"]
    return data, start, ["-h", sock, "-p", str(port)]


@unittest.skipUnless(pg_bin() and shutil.which("pgbench"), "PostgreSQL is not installed (apt-get install postgresql postgresql-contrib)")
class Postgres(VolumeTest):
    mount_args = ("--allow-other",)

    def as_pg(self, *args, check=True):
        return run(["runuser", "-u", "postgres", "--", *args], check=check)

    def test_initdb_pgbench_amcheck(self):
        pg = pg_bin()
        os.chmod(self.vol.root, 0o755)
        data, start, env = pg_cluster(self.vol, 20000 + os.getpid() % 20000)
        self.as_pg(f"{pg}/initdb", "-D", data, "--no-instructions", "-A", "trust")
        stop = [f"{pg}/pg_ctl", "-D", data, "-w", "-m", "fast", "stop"]
        self.as_pg(*start)
        try:
            self.as_pg("pgbench", *env, "-i", "-s", "2", "postgres")
            r = self.as_pg("pgbench", *env, "-c", "4", "-T", "8", "postgres")
            self.assertIn("tps", r.stdout)
        finally:
            self.as_pg(*stop, check=False)
        self.vol.remount("--allow-other")
        self.as_pg(*start)
        try:
            self.as_pg("psql", *env, "-v", "ON_ERROR_STOP=1", "-c", "CREATE EXTENSION IF NOT EXISTS amcheck", "postgres")
            r = self.as_pg("psql", *env, "-v", "ON_ERROR_STOP=1", "-tAc", AMCHECK_ALL_BTREES, "postgres")
            self.assertGreater(int(r.stdout.strip()), 10)
            r = self.as_pg("psql", *env, "-tAc", "SELECT count(*) FROM pgbench_accounts", "postgres")
            self.assertEqual(int(r.stdout.strip()), 200000)
        finally:
            self.as_pg(*stop, check=False)


@unittest.skipUnless(shutil.which("db_bench") and shutil.which("ldb"),
                     "RocksDB's tools are not installed (apt-get install rocksdb-tools)")
class RocksDB(VolumeTest):
    # The three ways RocksDB reaches its files; each database gets its own.
    MODES = {
        "buffered": [],
        "direct": ["--use_direct_reads=1", "--use_direct_io_for_flush_and_compaction=1"],
        "mmap": ["--mmap_read=1", "--mmap_write=1"],
    }
    N = 50000

    def db_bench(self, db, benchmarks, *args):
        return run(["db_bench", f"--db={db}", f"--benchmarks={benchmarks}", f"--num={self.N}",
                    "--value_size=400", "--compression_type=none", "--seed=1", *args]).stdout

    def test_db_bench_buffered_direct_and_mmap_then_checked_after_remount(self):
        for mode, args in self.MODES.items():
            # Every key once in order, then overwrites in random order; a small memtable and
            # small table files, so flushes and compactions run during the load.
            out = self.db_bench(self.vol.path(mode), "fillseq,overwrite,compact,readrandom,readseq",
                                "--write_buffer_size=1048576", "--target_file_size_base=2097152", *args)
            self.assertIn(f"({self.N} of {self.N} found)", out, mode)
        self.vol.remount()
        for mode, args in self.MODES.items():
            db = self.vol.path(mode)
            self.assertIn("OK", run(["ldb", f"--db={db}", "checkconsistency"]).stdout)
            out = self.db_bench(db, "verifychecksum,readrandom", "--use_existing_db=1", *args)
            self.assertIn(f"({self.N} of {self.N} found)", out, mode)
            keys = run(["ldb", f"--db={db}", "scan", "--no_value", "--key_hex"]).stdout.splitlines()
            self.assertEqual(len(keys), self.N, mode)
            self.assertEqual(len(set(keys)), self.N, mode)


@unittest.skipUnless(shutil.which("fio"), "fio is not installed (apt-get install fio)")
class Fio(VolumeTest):
    def test_io_uring_direct_with_verify(self):
        r = run(["fio", "--name=verify", f"--directory={self.vol.mnt}", "--ioengine=io_uring", "--direct=1",
                 "--rw=randrw", "--bs=4k", "--size=32m", "--iodepth=16", "--numjobs=2",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting",
                 # fio would otherwise leave its verify state files in the current directory
                 "--verify_state_save=0"])
        self.assertIn("verify", r.stdout)
        r = run(["fio", "--name=seq", f"--directory={self.vol.mnt}", "--ioengine=io_uring", "--direct=1",
                 "--rw=write", "--bs=1m", "--size=64m", "--iodepth=4", "--verify=md5", "--do_verify=1",
                 "--verify_fatal=1", "--verify_state_save=0"])
        self.assertNotIn("verify failed", r.stdout + r.stderr)


if __name__ == "__main__":
    main()
