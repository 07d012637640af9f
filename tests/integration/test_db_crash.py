"""Databases through a daemon crash: the daemon is killed with SIGKILL while SQLite,
PostgreSQL and RocksDB commit transactions, the volume is mounted again, and each database
must recover to a consistent state that holds every transaction it acknowledged
(test_power_loss.py runs the same checks through a power cut). Killing the daemon loses
what only it and the kernel's FUSE page cache held; everything an fsync returned for is in the
backing files by then, which is what the databases' own recovery relies on."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import unittest

from common import Volume, main, run
from test_databases import AMCHECK_ALL_BTREES, pg_bin, pg_cluster

# The SQLite writer, in a child process so that the crash cannot touch the test's own state:
# it commits numbered transactions and prints each number once COMMIT has returned.
# Arguments: database, journal mode, synchronous level.
SQLITE_WRITER = textwrap.dedent("""
    import sqlite3, sys
    db, mode, sync = sys.argv[1], sys.argv[2], sys.argv[3]
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"PRAGMA journal_mode={mode}")
    con.execute(f"PRAGMA synchronous={sync}")
    con.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v BLOB)")
    con.execute("CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY, rows INTEGER)")
    con.execute("INSERT OR IGNORE INTO total VALUES (1, 0)")
    n = 0
    try:
        while True:
            n += 1
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?, randomblob(?))", (n, 100 + n % 3000))
            con.execute("UPDATE total SET rows = rows + 1 WHERE id = 1")
            con.execute("COMMIT")
            print(n, flush=True)
    except Exception as e:
        print("stopped:", e, file=sys.stderr, flush=True)
""")


def acked_through_crash(test, writer, at_least, crash):
    """Reads the numbers `writer` prints as commits are acknowledged until `at_least` of them,
    calls `crash`, and returns the last number it printed before it stopped."""
    acked = 0
    deadline = time.time() + 60
    while acked < at_least and time.time() < deadline:
        line = writer.stdout.readline()
        if not line:
            break
        acked = int(line)
    test.assertGreaterEqual(acked, at_least, writer.stderr.read() if writer.poll() is not None else "too slow")
    crash()
    out, _ = writer.communicate(timeout=60)
    for line in out.split():
        acked = int(line)
    return acked


def check_sqlite_crash(test, vol, mode, sync, crash, name=None):
    """Runs SQLITE_WRITER on `vol` (a new database, `name` or MODE.db) until 300 transactions
    are acknowledged, calls `crash`, mounts again, and checks the database: intact, no
    acknowledged transaction lost, none half applied."""
    db = vol.path(name or f"{mode}.db")
    child = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, db, mode, sync],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Journal files are created and removed by each transaction in DELETE mode.
    acked = acked_through_crash(test, child, 300, crash)
    vol.mount("--allow-other")
    con = sqlite3.connect(db)
    try:
        test.assertEqual(con.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        rows, highest = con.execute("SELECT count(*), max(n) FROM t").fetchone()
        total = con.execute("SELECT rows FROM total").fetchone()[0]
    finally:
        con.close()
    test.assertGreaterEqual(highest, acked, "an acknowledged transaction was lost")
    test.assertEqual(rows, highest, "a gap in the committed transactions")
    test.assertEqual(total, rows, "a transaction was half applied")


# The acknowledged-commit writer for PostgreSQL: one psql per transaction, so that a number is
# printed only once its COMMIT has returned (synchronous_commit is on by default).
# Arguments: the psql command line before the query (as JSON).
PG_WRITER = textwrap.dedent("""
    import json, subprocess, sys
    psql = json.loads(sys.argv[1])
    n = 0
    while True:
        n += 1
        r = subprocess.run(psql + [f"INSERT INTO acks VALUES ({n})"], capture_output=True, text=True)
        if r.returncode != 0:
            print("stopped:", r.stderr.strip(), file=sys.stderr, flush=True)
            break
        print(n, flush=True)
""")


def check_postgres_crash(test, vol, crash):
    """PostgreSQL on `vol` (mounted with --allow-other): pgbench load, and a writer whose
    every acknowledged commit is counted; `crash` is called once 40 commits are acknowledged.
    After a mount and the server's own crash recovery: no acknowledged commit lost, none out of
    order, pgbench's balances agree, every btree index checks out (amcheck)."""
    pg = pg_bin()
    as_pg = ["runuser", "-u", "postgres", "--"]
    data, start, env = pg_cluster(vol, 20000 + (os.getpid() + 7) % 20000)
    psql = as_pg + ["psql", *env, "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-tAc"]
    run(as_pg + [f"{pg}/initdb", "-D", data, "--no-instructions", "-A", "trust"])
    run(as_pg + start)
    with open(os.path.join(data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    acked = 0
    try:
        run(as_pg + ["pgbench", *env, "-i", "-s", "2", "-q", "postgres"])
        run(psql + ["CREATE TABLE acks (n integer PRIMARY KEY)"])
        bench = subprocess.Popen(as_pg + ["pgbench", *env, "-c", "3", "-T", "60", "postgres"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writer = subprocess.Popen([sys.executable, "-c", PG_WRITER, json.dumps(psql)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acked = acked_through_crash(test, writer, 40, crash)
        bench.wait(timeout=60)
    finally:
        # The server cannot reach its data any more: stop it and whatever it forked.
        subprocess.run(["pkill", "-KILL", "-P", str(postmaster)], capture_output=True)
        try:
            os.kill(postmaster, signal.SIGKILL)
        except ProcessLookupError:
            pass
        Volume._wait_gone(postmaster)
    vol.mount("--allow-other")
    run(as_pg + start)  # crash recovery replays the WAL
    try:
        def sql(query):
            return run(psql + [query]).stdout.strip()
        highest, count = map(int, sql("SELECT max(n) || ' ' || count(*) FROM acks").split())
        test.assertGreaterEqual(highest, acked, "an acknowledged commit was lost")
        test.assertEqual(count, highest, "a gap in the acknowledged commits")
        # pgbench's invariant: every transaction adds the same delta to one account, its
        # teller and branch, and records it in the history, all or nothing.
        sums = sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || "
                   "(SELECT sum(bbalance) FROM pgbench_branches) || ' ' || "
                   "(SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || "
                   "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)").split()
        test.assertEqual(len(set(sums)), 1, f"balances disagree: {sums}")
        test.assertGreater(int(sql("SELECT count(*) FROM pgbench_history")), 0, "no transaction committed")
        test.assertEqual(int(sql("SELECT count(*) FROM pgbench_accounts")), 200000)
        sql("CREATE EXTENSION IF NOT EXISTS amcheck")
        test.assertGreater(int(sql(AMCHECK_ALL_BTREES)), 10)
    finally:
        run(as_pg + [f"{pg}/pg_ctl", "-D", data, "-w", "-m", "fast", "stop"], check=False)


ROCKS_ACKER = os.environ.get("ROCKS_ACKER_BIN") or os.path.join(
    os.path.dirname(__file__), "../../build/tests/rocks_acker")
NO_ROCKSDB = "rocks_acker is not built (apt-get install librocksdb-dev, then build again)"


def check_rocksdb_crash(test, vol, direct, crash, rounds=1):
    """rocks_acker (tests/tools/rocks_acker.cc) on `vol`, mounted with --allow-other: commits
    records with synchronous writes while its small memtable is flushed and compacted, `crash`
    once 1,000 more commits are acknowledged, mount again. RocksDB must open (replaying its
    WAL) with every table file's checksums right, every acknowledged record there with its
    exact value, and no batch half applied. Each further round continues the same database.
    `direct`: table files through O_DIRECT."""
    db = vol.path("rocks")
    mode = ["direct"] if direct else []
    for _ in range(rounds):
        writer = subprocess.Popen([ROCKS_ACKER, "write", db, *mode], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        first = writer.stdout.readline()
        if not first:
            test.fail("rocks_acker: " + writer.stderr.read())
        acked = acked_through_crash(test, writer, int(first) + 1000, crash)
        vol.mount("--allow-other")
        r = run([ROCKS_ACKER, "check", db, *mode], check=False)
        test.assertEqual(r.returncode, 0, r.stderr)
        test.assertGreaterEqual(int(r.stdout), acked, "an acknowledged commit was lost")


class DatabaseCrash(unittest.TestCase):
    def setUp(self):
        self.vol = Volume()
        self.vol.mount("--allow-other")

    def tearDown(self):
        self.vol.cleanup()

    def sqlite_round(self, mode):
        check_sqlite_crash(self, self.vol, mode, "FULL", self.vol.kill9)

    def test_sqlite_wal_survives_a_daemon_crash(self):
        self.sqlite_round("WAL")

    def test_sqlite_rollback_journal_survives_a_daemon_crash(self):
        self.sqlite_round("DELETE")

    @unittest.skipUnless(pg_bin(), "PostgreSQL is not installed (apt-get install postgresql postgresql-contrib)")
    def test_postgres_recovers_consistent_after_a_daemon_crash(self):
        check_postgres_crash(self, self.vol, self.vol.kill9)

    @unittest.skipUnless(os.path.exists(ROCKS_ACKER), NO_ROCKSDB)
    def test_rocksdb_survives_daemon_crashes(self):
        check_rocksdb_crash(self, self.vol, False, self.vol.kill9, rounds=2)

    @unittest.skipUnless(os.path.exists(ROCKS_ACKER), NO_ROCKSDB)
    def test_rocksdb_with_direct_io_survives_a_daemon_crash(self):
        check_rocksdb_crash(self, self.vol, True, self.vol.kill9)

if __name__ == "__main__":
    main()
