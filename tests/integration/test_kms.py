#!/usr/bin/env python3
"""The root key on a PKCS#11 token: a real SoftHSM2 token in a private token directory.

init generates the key on the token; mount unwraps through the token; every way the token
can refuse (wrong PIN, key gone, token gone, an altered wrapped key, a key that could leave
the token) fails closed with a message that says which, and nothing is mounted.
The exec: provider (an external program holds the root) gets the same treatment at the end,
through the RSA-OAEP reference program in tests/tools.
"""
import base64
import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, Volume, is_mounted, main, read_file, run, wait_for, write_file  # noqa: E402

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
EXEC_ROOT_RSA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "exec_root_rsa.sh")
UTIL = shutil.which("softhsm2-util")
USER_PIN, SO_PIN = "4711-user", "0815-so"


class Token:
    """A SoftHSM2 token directory of our own (SOFTHSM2_CONF), with one initialised token."""

    def __init__(self, root, label="envelopefs"):
        self.dir = os.path.join(root, "tokens")
        os.mkdir(self.dir)
        self.conf = os.path.join(root, "softhsm2.conf")
        with open(self.conf, "w") as f:
            f.write(f"directories.tokendir = {self.dir}\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = self.conf  # inherited by init, mount and the daemon
        self.label = label
        self.pin_file = os.path.join(root, "token.pin")
        self.set_pin_file(USER_PIN)
        self.create()

    def util(self, *args):
        return run([UTIL, *args])

    def create(self):
        self.util("--init-token", "--free", "--label", self.label, "--pin", USER_PIN, "--so-pin", SO_PIN)

    def delete(self):
        self.util("--delete-token", "--token", self.label)

    def set_pin_file(self, pin, mode=0o600):
        with open(self.pin_file, "w") as f:
            f.write(pin + "\n")
        os.chmod(self.pin_file, mode)

    def uri(self, obj="root", **extra):
        query = {"module-path": MODULE, "pin-source": "file:" + self.pin_file, **extra}
        return f"pkcs11:token={self.label};object={obj}?" + "&".join(f"{k}={v}" for k, v in query.items())


class TokenTest(unittest.TestCase):
    """A volume directory and a fresh token of its own for each test."""

    def setUp(self):
        if UTIL is None or not os.path.exists(MODULE):
            self.fail("SoftHSM2 is not installed (packaging/install-deps.sh installs softhsm2)")
        self.vol = Volume(init=False)
        self.audit_log = os.path.join(self.vol.root, "audit.log")
        self.saved_env = {k: os.environ.get(k) for k in ("ENVELOPEFS_AUDIT_LOG", "SOFTHSM2_CONF")}
        os.environ["ENVELOPEFS_AUDIT_LOG"] = self.audit_log  # inherited by the daemon too
        self.token = Token(self.vol.root)

    def tearDown(self):
        self.vol.cleanup()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def audit_records(self):
        with open(self.audit_log) as f:
            return [json.loads(line) for line in f]

    def init(self, uri, check=True):
        return run([BIN, "init", "--kms", uri, self.vol.cipher], check=check)

    def config(self):
        with open(os.path.join(self.vol.cipher, "envelopefs.conf")) as f:
            return json.load(f)


class Pkcs11Test(TokenTest):
    """The pkcs11: provider: init, mount, and every refusal."""

    def test_init_makes_the_key_on_the_token_and_mounts_through_it(self):
        r = self.init(self.token.uri())
        self.assertIn("PKCS#11 key 'root' on token 'envelopefs'", r.stdout)
        conf = self.config()
        self.assertEqual(conf["root"]["uri"], self.token.uri())
        self.assertNotIn(USER_PIN, json.dumps(conf), "the PIN must never be in the config")
        self.vol.mount()
        write_file(self.vol.path("secret.txt"), b"held under an HSM key\n", fsync=True)
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("secret.txt")), b"held under an HSM key\n")
        status = run([BIN, "status", self.vol.cipher]).stdout
        self.assertIn("pkcs11:token=envelopefs;object=root", status)
        self.assertNotIn(USER_PIN, status)

    def test_a_second_volume_shares_the_key_but_not_the_wrapped_keys(self):
        self.init(self.token.uri())
        other = tempfile.mkdtemp(prefix="efs-it-", dir=os.path.dirname(self.vol.root))
        try:
            cipher2 = os.path.join(other, "cipher")
            run([BIN, "init", "--kms", self.token.uri(), cipher2])  # the existing key, reused
            # Volume 1's wrapped DEK in volume 2's config: the wrap context (volume id) differs.
            conf1 = self.config()
            path2 = os.path.join(cipher2, "envelopefs.conf")
            with open(path2) as f:
                conf2 = json.load(f)
            conf2["deks"][0]["wrapped"] = conf1["deks"][0]["wrapped"]
            with open(path2, "w") as f:
                json.dump(conf2, f)
            mnt2 = os.path.join(other, "mnt")
            os.mkdir(mnt2)
            r = run([BIN, "mount", cipher2, mnt2], check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertFalse(is_mounted(mnt2))
            self.assertIn("altered", r.stderr)
        finally:
            shutil.rmtree(other, ignore_errors=True)
        self.vol.mount()  # volume 1 itself is untouched

    def test_a_wrong_pin_fails_closed_and_the_right_one_mounts_again(self):
        self.init(self.token.uri())
        self.token.set_pin_file("0000")
        self.vol.mount_refused("refused the user PIN", "PIN is incorrect")
        self.token.set_pin_file(USER_PIN)
        self.vol.mount()
        write_file(self.vol.path("f"), b"x")
        self.vol.unmount()

    def test_a_key_destroyed_on_the_token_is_crypto_shredding(self):
        self.init(self.token.uri())
        self.vol.mount()
        write_file(self.vol.path("f"), b"gone with the key", fsync=True)
        self.vol.unmount()
        self.token.delete()
        self.vol.mount_refused("key service unreachable", "no token matching")
        self.token.create()  # same label, same PIN, but a new token without the key
        self.vol.mount_refused("access denied", "key 'root' is not on token 'envelopefs'")

    def test_an_altered_wrapped_key_fails_authentication(self):
        self.init(self.token.uri())
        conf = self.config()
        wrapped = bytearray(base64.b64decode(conf["deks"][0]["wrapped"]))
        wrapped[20] ^= 0x01
        conf["deks"][0]["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
        with open(os.path.join(self.vol.cipher, "envelopefs.conf"), "w") as f:
            json.dump(conf, f)
        self.vol.mount_refused("altered")

    def test_a_key_that_is_not_aes_256_is_refused(self):
        key = os.path.join(self.vol.root, "aes128.key")
        with open(key, "wb") as f:
            f.write(bytes.fromhex("000102030405060708090a0b0c0d0e0f"))
        self.token.util("--import", key, "--aes", "--token", self.token.label, "--label", "short",
                        "--id", "0102", "--pin", USER_PIN)
        r = self.init(self.token.uri(obj="short"), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("is not an AES-256 key", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.vol.cipher, "envelopefs.conf")))

    def test_uris_that_would_put_a_secret_in_the_config_or_name_nothing_are_refused(self):
        cases = [
            (self.token.uri().replace("pin-source=file:" + self.token.pin_file, "pin-value=" + USER_PIN),
             "pin-value"),
            (f"pkcs11:token=envelopefs;object=root?pin-source=file:{self.token.pin_file}", "module-path"),
            (f"pkcs11:token=envelopefs?module-path={MODULE}&pin-source=file:{self.token.pin_file}",
             "must name the key"),
            ("pkcs11:token=envelopefs;object=root;bogus", "not a PKCS#11 URI"),
        ]
        for uri, expected in cases:
            with self.subTest(uri=uri):
                r = self.init(uri, check=False)
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(expected, r.stderr)
                self.assertNotIn(USER_PIN, r.stderr + r.stdout)
        self.token.set_pin_file(USER_PIN, mode=0o644)
        r = self.init(self.token.uri(), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("readable by anyone", r.stderr)


def tree_digest(cipher):
    """Every backing file's content but the config's: what a rewrap must not touch."""
    out = {}
    for d, _, files in os.walk(cipher):
        for f in files:
            if f != "envelopefs.conf":
                p = os.path.join(d, f)
                out[os.path.relpath(p, cipher)] = hashlib.sha256(read_file(p)).hexdigest()
    return out


class RewrapTest(TokenTest):
    """`envelopefs rewrap`: the root changes, the data does not."""

    def rewrap(self, to, *args, check=True):
        return run([BIN, "rewrap", "--to", to, *args, self.vol.cipher], check=check)

    def conf_bytes(self):
        return read_file(os.path.join(self.vol.cipher, "envelopefs.conf"))

    def test_a_key_file_volume_moves_onto_the_token_while_mounted(self):
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])
        backup = os.path.join(self.vol.root, "backup")
        self.vol.mount()
        os.mkdir(self.vol.path("d"))
        for i in range(20):
            write_file(self.vol.path("d", f"f{i}"), os.urandom(5000 + i), fsync=True)
        expected = {f"f{i}": read_file(self.vol.path("d", f"f{i}")) for i in range(20)}
        self.vol.unmount()
        shutil.copytree(self.vol.cipher, backup)  # a backup taken before the rotation
        self.vol.mount()
        before = tree_digest(self.vol.cipher)

        r = self.rewrap(self.token.uri())
        self.assertIn("re-wrapped 1 DEK version(s) and the name key", r.stdout)
        self.assertEqual(tree_digest(self.vol.cipher), before, "a rewrap must not touch any data file")
        self.assertEqual(self.config()["root"]["uri"], self.token.uri())
        # The running mount is unaffected.
        self.assertEqual(read_file(self.vol.path("d", "f3")), expected["f3"])
        write_file(self.vol.path("d", "after"), b"written after the rewrap", fsync=True)
        self.vol.unmount()

        os.unlink(self.vol.key)  # the old root is gone: only the token opens the volume now
        self.vol.mount()
        for name, data in expected.items():
            self.assertEqual(read_file(self.vol.path("d", name)), data)
        self.assertEqual(read_file(self.vol.path("d", "after")), b"written after the rewrap")
        self.vol.unmount()

        # The backup's data is under the same DEK: the current config opens it.
        shutil.copy(os.path.join(self.vol.cipher, "envelopefs.conf"), os.path.join(backup, "envelopefs.conf"))
        mnt2 = os.path.join(self.vol.root, "mnt2")
        os.mkdir(mnt2)
        run([BIN, "mount", backup, mnt2])
        try:
            self.assertEqual(read_file(os.path.join(mnt2, "d", "f7")), expected["f7"])
        finally:
            run([BIN, "unmount", mnt2])

    def test_a_rotation_on_the_token_makes_a_new_key_and_the_volume_follows(self):
        self.init(self.token.uri(obj="root-2026"))
        self.vol.mount()
        write_file(self.vol.path("f"), b"rotated", fsync=True)
        self.vol.unmount()
        r = self.rewrap(self.token.uri(obj="root-2027"))
        self.assertIn("root-2027", r.stdout)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), b"rotated")
        self.vol.unmount()

    def test_a_rewrap_that_fails_changes_nothing(self):
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])
        original = self.conf_bytes()
        self.token.set_pin_file("0000")
        r = self.rewrap(self.token.uri(), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("the new root", r.stderr)
        self.assertIn("nothing was changed", r.stderr)
        self.assertEqual(self.conf_bytes(), original)
        self.token.set_pin_file(USER_PIN)
        os.rename(self.vol.key, self.vol.key + ".saved")
        with open(self.vol.key, "wb") as f:  # another key where the current one was
            f.write(os.urandom(32))
        os.chmod(self.vol.key, 0o600)
        r = self.rewrap(self.token.uri(), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("cannot unwrap DEK version 1", r.stderr)
        self.assertEqual(self.conf_bytes(), original)
        os.replace(self.vol.key + ".saved", self.vol.key)
        self.vol.mount()  # still opens with the key it always had


def slot_versions(backing_file):
    """The DEK version of the newer slot of each entry in a backing file's first metadata page
    (fs/FORMAT.md: 128-byte page header, 128-byte entries of two 64-byte slots, each slot
    starting with its sequence number and DEK version, little-endian)."""
    page = read_file(backing_file)[:4096]
    out = []
    for entry in range(31):
        slots = [struct.unpack_from("<II", page, 128 + 128 * entry + 64 * k) for k in (0, 1)]
        seq, version = max(slots)
        if seq:
            out.append(version)
    return out


class DekRotationTest(TokenTest):
    def test_a_rotation_seals_new_writes_under_the_new_dek_while_the_mount_keeps_serving(self):
        self.init(self.token.uri())
        self.vol.mount("--key-check-interval", "1")
        old = os.urandom(50_000)
        write_file(self.vol.path("old"), old, fsync=True)
        before = set(self.vol.backing_files())
        errors, stop = [], threading.Event()

        rounds = [0]

        def reader():  # requests that reach the daemon must never fail while the keys are swapped
            while not stop.is_set():
                try:
                    with open(self.vol.path("old"), "rb") as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not from the cache
                        if f.read() != old:
                            errors.append("wrong data")
                    write_file(self.vol.path("scratch"), b"x")
                    os.unlink(self.vol.path("scratch"))
                    rounds[0] += 1
                except OSError as e:
                    errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        try:
            r = run([BIN, "rotate-dek", self.vol.cipher])
            self.assertIn("DEK v2 of volume", r.stdout)
            self.assertTrue(wait_for(lambda: "DEK v2 is active (was v1)" in self.vol.log_text()))
            self.assertTrue(wait_for(lambda: "re-wrap done" in self.vol.log_text()))
        finally:
            stop.set()
            t.join()
        self.assertEqual(errors, [])
        self.assertGreater(rounds[0], 10)
        write_file(self.vol.path("new"), os.urandom(9000), fsync=True)
        self.vol.unmount()

        conf = self.config()
        self.assertEqual([(d["version"], d["state"]) for d in conf["deks"]], [(1, "retired"), (2, "active")])
        (old_file,) = before
        (new_file,) = set(self.vol.backing_files()) - before
        self.assertEqual(slot_versions(old_file), [2] * 13)  # 50,000 bytes: 13 blocks, re-wrapped
        self.assertEqual(slot_versions(new_file), [2, 2, 2])
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("old")), old)
        self.vol.unmount()
        self.assertIn("0 problems", run([BIN, "fsck", "-q", self.vol.cipher]).stdout)
        r = run([BIN, "rewrap", "--to", "file:" + self.vol.key, self.vol.cipher])
        self.assertIn("re-wrapped 2 DEK version(s)", r.stdout)
        events = [(r["event"], r["outcome"]) for r in self.audit_records()]
        self.assertIn(("rotate-dek", "ok"), events)
        self.assertIn(("dek-switch", "ok"), events)
        self.assertIn(("rewrap-blocks", "ok"), events)

    def test_a_rotation_the_root_refuses_changes_nothing(self):
        self.init(self.token.uri())
        original = read_file(os.path.join(self.vol.cipher, "envelopefs.conf"))
        self.token.set_pin_file("0000")
        r = run([BIN, "rotate-dek", self.vol.cipher], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nothing was changed", r.stderr)
        self.assertEqual(read_file(os.path.join(self.vol.cipher, "envelopefs.conf")), original)


class AuditTest(TokenTest):
    def test_every_use_of_the_root_is_in_the_audit_log_and_no_secret_is(self):
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])
        self.vol.mount()
        self.vol.unmount()
        self.token.set_pin_file("0000")
        self.assertNotEqual(run([BIN, "rewrap", "--to", self.token.uri(), self.vol.cipher], check=False).returncode, 0)
        self.token.set_pin_file(USER_PIN)
        run([BIN, "rewrap", "--to", self.token.uri(), self.vol.cipher])
        self.token.set_pin_file("0000")
        r = run([BIN, "mount", self.vol.cipher, self.vol.mnt], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.token.set_pin_file(USER_PIN)
        self.vol.mount("--key-check-interval", "1", "--key-unreachable-grace", "0")
        write_file(self.vol.path("f"), b"data", fsync=True)
        saved = os.path.join(self.vol.root, "tokens.saved")
        shutil.copytree(self.token.dir, saved)
        self.token.delete()
        self.assertTrue(wait_for(lambda: revoked(self.vol.path("f"))))
        shutil.rmtree(self.token.dir)
        shutil.copytree(saved, self.token.dir)
        self.assertTrue(wait_for(lambda: any(r["event"] == "restored" for r in self.audit_records())))
        self.vol.unmount()
        run([BIN, "fsck", "-q", self.vol.cipher])

        records = self.audit_records()
        got = [(r["event"], r["outcome"]) for r in records]
        self.assertEqual(got, [
            ("init", "ok"), ("mount", "ok"), ("unmount", "ok"),
            ("rewrap", "access denied"), ("rewrap", "ok"),
            ("mount", "access denied"),
            ("mount", "ok"), ("revoked", "keys zeroized"), ("restored", "ok"), ("unmount", "ok"),
            ("fsck", "ok"),
        ])
        volume = self.config()["volume_id"]
        self.assertTrue(all(r["volume"] == volume for r in records), records)
        self.assertEqual(records[0]["root"], "file:" + self.vol.key)
        self.assertEqual(records[4]["root"], self.token.uri())
        self.assertIn("refused the user PIN", records[5]["detail"])
        self.assertIn("no token matching", records[7]["detail"])
        text = read_file(self.audit_log)
        key = read_file(self.vol.key)
        for secret in (USER_PIN.encode(), key, key.hex().encode(), base64.b64encode(key)):
            self.assertNotIn(secret, text)
        self.assertEqual(os.stat(self.audit_log).st_mode & 0o777, 0o600)


def revoked(path):
    """True if reading `path` fails with EKEYREVOKED."""
    try:
        read_file(path)
        return False
    except OSError as e:
        if e.errno != errno.EKEYREVOKED:
            raise
        return True


class RevocationTest(TokenTest):
    """A mounted volume whose root goes away fails closed, and resumes when it comes back."""

    def mount_watched(self, grace):
        self.vol.mount("--key-check-interval", "1", "--key-unreachable-grace", str(grace))

    def test_a_token_that_goes_away_stops_the_mount_and_its_return_resumes_it(self):
        self.init(self.token.uri())
        self.mount_watched(grace=1)
        data = os.urandom(100_000)
        write_file(self.vol.path("f"), data, fsync=True)
        self.assertEqual(read_file(self.vol.path("f")), data)  # now in the page cache too
        held = open(self.vol.path("f"), "rb")
        try:
            saved = os.path.join(self.vol.root, "tokens.saved")
            shutil.copytree(self.token.dir, saved)
            self.token.delete()
            self.assertTrue(wait_for(lambda: revoked(self.vol.path("f"))), "the mount kept serving")
            # Nothing is served from the kernel's caches either.
            with self.assertRaises(OSError) as e:
                os.pread(held.fileno(), 4096, 0)
            self.assertEqual(e.exception.errno, errno.EKEYREVOKED)
            with self.assertRaises(OSError) as e:
                os.listdir(self.vol.mnt)
            self.assertEqual(e.exception.errno, errno.EKEYREVOKED)
            with self.assertRaises(OSError) as e:
                write_file(self.vol.path("new"), b"x")
            self.assertEqual(e.exception.errno, errno.EKEYREVOKED)
            log = self.vol.log_text()
            self.assertIn("root key revoked (unreachable for more than 1 s", log)
            self.assertIn("keys zeroized", log)

            shutil.rmtree(self.token.dir)
            shutil.copytree(saved, self.token.dir)  # the token is back, key and all
            self.assertTrue(wait_for(lambda: not revoked(self.vol.path("f"))), "the mount did not resume")
            self.assertIn("keys restored", self.vol.log_text())
            self.assertEqual(os.pread(held.fileno(), len(data), 0), data)
        finally:
            held.close()
        write_file(self.vol.path("after"), b"written after the return", fsync=True)
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("f")), data)
        self.assertEqual(read_file(self.vol.path("after")), b"written after the return")

    def test_a_key_destroyed_on_the_token_is_revoked_at_once(self):
        self.init(self.token.uri())
        self.mount_watched(grace=3600)
        write_file(self.vol.path("f"), b"data", fsync=True)
        self.token.delete()
        self.token.create()  # the token answers, and says the key is not there
        self.assertTrue(wait_for(lambda: revoked(self.vol.path("f")), timeout=10),
                        "a refusal must not wait for the unreachable grace")
        self.assertIn("key 'root' is not on token 'envelopefs'", self.vol.log_text())

    def test_an_unreachable_token_is_trusted_for_the_grace_period(self):
        self.init(self.token.uri())
        self.mount_watched(grace=3600)
        write_file(self.vol.path("f"), b"data", fsync=True)
        self.token.delete()
        self.assertTrue(wait_for(lambda: "keys kept for up to 3600 s" in self.vol.log_text(), timeout=10))
        self.assertEqual(read_file(self.vol.path("f")), b"data")
        self.assertNotIn("revoked", self.vol.log_text())

    def test_a_key_file_taken_away_revokes_a_file_volume(self):
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])
        self.mount_watched(grace=1)
        write_file(self.vol.path("f"), b"data", fsync=True)
        os.rename(self.vol.key, self.vol.key + ".away")
        self.assertTrue(wait_for(lambda: revoked(self.vol.path("f"))))
        os.rename(self.vol.key + ".away", self.vol.key)
        self.assertTrue(wait_for(lambda: not revoked(self.vol.path("f"))))
        self.assertEqual(read_file(self.vol.path("f")), b"data")


class ExecProgramTest(unittest.TestCase):
    """exec:PROGRAM?DIR: the root is an RSA key pair that only the program uses."""

    def setUp(self):
        self.vol = Volume(init=False)
        self.audit_log = os.path.join(self.vol.root, "audit.log")
        self.saved_audit = os.environ.get("ENVELOPEFS_AUDIT_LOG")
        os.environ["ENVELOPEFS_AUDIT_LOG"] = self.audit_log
        self.keys = os.path.join(self.vol.root, "keys")
        os.mkdir(self.keys, 0o700)
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", os.path.join(self.keys, "root.pem")])
        run(["openssl", "pkey", "-in", os.path.join(self.keys, "root.pem"), "-pubout",
             "-out", os.path.join(self.keys, "root.pub.pem")])
        self.program = os.path.join(self.vol.root, "exec_root_rsa.sh")
        shutil.copy(EXEC_ROOT_RSA, self.program)
        os.chmod(self.program, 0o700)
        self.uri = f"exec:{self.program}?{self.keys}"

    def tearDown(self):
        self.vol.cleanup()
        if self.saved_audit is None:
            os.environ.pop("ENVELOPEFS_AUDIT_LOG", None)
        else:
            os.environ["ENVELOPEFS_AUDIT_LOG"] = self.saved_audit

    def test_a_volume_mounts_through_the_program_and_stops_when_the_key_goes(self):
        r = run([BIN, "init", "--kms", self.uri, self.vol.cipher])
        self.assertIn("external key command " + self.program, r.stdout)
        self.vol.mount("--key-check-interval", "1", "--key-unreachable-grace", "3600")
        data = os.urandom(50_000)
        write_file(self.vol.path("f"), data, fsync=True)
        status = run([BIN, "status", self.vol.mnt]).stdout
        self.assertIn("key provider: " + self.uri, status)

        # The private key moved away: the program refuses (77), which is no reason to wait
        # out the unreachable grace.
        os.rename(os.path.join(self.keys, "root.pem"), os.path.join(self.keys, "root.pem.away"))
        self.assertTrue(wait_for(lambda: revoked(self.vol.path("f")), timeout=15), "the mount kept serving")
        self.assertIn("the private key is gone", self.vol.log_text())
        os.rename(os.path.join(self.keys, "root.pem.away"), os.path.join(self.keys, "root.pem"))
        self.assertTrue(wait_for(lambda: not revoked(self.vol.path("f"))), "the mount did not resume")
        self.assertEqual(read_file(self.vol.path("f")), data)

        # The key directory unreachable (75): trusted for the grace period.
        os.rename(self.keys, self.keys + ".away")
        self.assertTrue(wait_for(lambda: "keys kept for up to 3600 s" in self.vol.log_text(), timeout=15))
        self.assertEqual(read_file(self.vol.path("f")), data)
        os.rename(self.keys + ".away", self.keys)

        self.vol.unmount()
        os.rename(os.path.join(self.keys, "root.pem"), os.path.join(self.keys, "root.pem.away"))
        self.vol.mount_refused("access denied", "the private key is gone")
        os.rename(os.path.join(self.keys, "root.pem.away"), os.path.join(self.keys, "root.pem"))
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), data)

        # The key watcher's findings are audited.
        with open(self.audit_log) as f:
            events = [json.loads(line)["event"] for line in f]
        self.assertIn("revoked", events)
        self.assertIn("restored", events)
        self.vol.unmount()

    def test_a_file_volume_moves_onto_the_program_and_back(self):
        run([BIN, "init", "--kms", "file:" + self.vol.key, self.vol.cipher])
        self.vol.mount()
        write_file(self.vol.path("f"), b"before the move", fsync=True)
        run([BIN, "rewrap", "--to", self.uri, self.vol.cipher])
        with open(os.path.join(self.vol.cipher, "envelopefs.conf")) as f:
            self.assertEqual(json.load(f)["root"]["uri"], self.uri)
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("f")), b"before the move")
        # The old key file is no longer needed ...
        os.rename(self.vol.key, self.vol.key + ".away")
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("f")), b"before the move")
        # ... and a program that cannot unwrap what it wrapped is refused before anything changes.
        broken = os.path.join(self.vol.root, "broken.sh")
        with open(broken, "w") as f:
            f.write("#!/bin/sh\nif [ \"$1\" = wrap ]; then cat; else exit 65; fi\n")
        os.chmod(broken, 0o700)
        with open(os.path.join(self.vol.cipher, "envelopefs.conf"), "rb") as f:
            before = f.read()
        r = run([BIN, "rewrap", "--to", "exec:" + broken, self.vol.cipher], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("wraps but does not unwrap", r.stderr)
        with open(os.path.join(self.vol.cipher, "envelopefs.conf"), "rb") as f:
            self.assertEqual(f.read(), before)


if __name__ == "__main__":
    main()
