#!/usr/bin/env python3
"""The root key on a KMIP server: a real PyKMIP server on 127.0.0.1, mutual TLS.

Each test gets its own certificate authority, server and client certificates, and a server
process with its own database. Revocation and destruction are done the way an operator would:
through the server, with PyKMIP's own client.
"""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, Volume, main, read_file, run, write_file  # noqa: E402

SERVER = "/usr/bin/pykmip-server"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one python3-pykmip is installed for


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KmipServer:
    def __init__(self, root):
        self.dir = os.path.join(root, "kmip")
        os.mkdir(self.dir)
        self.port = free_port()
        self.proc = None
        d = self.path
        ssl = ["openssl"]
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]  # quicker to make than RSA
        run(ssl + ["req", "-x509", *ec, "-nodes", "-keyout", d("ca.key"), "-out", d("ca.pem"),
                   "-days", "2", "-subj", "/CN=envelopefs test CA"])
        for name, subject, ext in [("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                                   ("client", "/CN=envelopefs", "extendedKeyUsage=clientAuth\n")]:
            run(ssl + ["req", *ec, "-nodes", "-keyout", d(name + ".key"), "-out", d(name + ".csr"),
                       "-subj", subject])
            with open(d(name + ".ext"), "w") as f:
                f.write(ext)
            run(ssl + ["x509", "-req", "-in", d(name + ".csr"), "-CA", d("ca.pem"), "-CAkey", d("ca.key"),
                       "-CAcreateserial", "-out", d(name + ".pem"), "-days", "2", "-extfile", d(name + ".ext")])
            os.chmod(d(name + ".key"), 0o600)
        os.mkdir(d("policies"))
        with open(d("server.conf"), "w") as f:
            f.write(f"[server]\nhostname=127.0.0.1\nport={self.port}\ncertificate_path={d('server.pem')}\n"
                    f"key_path={d('server.key')}\nca_path={d('ca.pem')}\nauth_suite=TLS1.2\n"
                    f"policy_path={d('policies')}\nenable_tls_client_auth=True\nlogging_level=INFO\n"
                    f"database_path={d('db.sqlite')}\n")
        self.start()

    def path(self, name):
        return os.path.join(self.dir, name)

    def start(self):
        # In a session of its own: its policy monitor is a child process, which a kill of the
        # server alone would leave running (one per test, until the machine restarts).
        self.proc = subprocess.Popen([SERVER, "-f", self.path("server.conf"), "-l", self.path("server.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.time() + 60
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError("pykmip-server exited: " + read_file(self.path("server.log")).decode()[-2000:])
                time.sleep(0.2)
        raise AssertionError("pykmip-server did not start listening")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            # Killed, not terminated: after serving a client, pykmip-server takes 10 s to stop
            # on SIGTERM. Its database is SQLite, committed per operation.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def uri(self, name="root", ca=None, **extra):
        q = {"name": name, "ca": ca or self.path("ca.pem"), "cert": self.path("client.pem"),
             "key": self.path("client.key"), **extra}
        return f"kmip://127.0.0.1:{self.port}/?" + "&".join(f"{k}={v}" for k, v in q.items() if v is not None)

    def operator(self, operation, uid):
        """What an operator does on the server: revoke or destroy a key, with PyKMIP's client."""
        script = f"""
from kmip.pie.client import ProxyKmipClient
from kmip.core import enums
c = ProxyKmipClient(hostname="127.0.0.1", port={self.port}, cert="{self.path('client.pem')}",
                    key="{self.path('client.key')}", ca="{self.path('ca.pem')}", config_file="/dev/null",
                    kmip_version=enums.KMIPVersion.KMIP_1_4)
with c:
    if "{operation}" == "revoke":
        c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, "{uid}", revocation_message="test",
                 compromise_occurrence_date=1)
    elif "{operation}" == "destroy":
        c.destroy("{uid}")
"""
        run([SYSTEM_PYTHON, "-W", "ignore", "-c", script])


class KmipTest(unittest.TestCase):
    def setUp(self):
        for tool in (SERVER, SYSTEM_PYTHON):
            if not os.path.exists(tool):
                self.fail(f"{tool} is missing (packaging/install-deps.sh installs python3-pykmip)")
        self.vol = Volume(init=False)
        self.saved_audit = os.environ.get("ENVELOPEFS_AUDIT_LOG")
        self.audit_log = os.path.join(self.vol.root, "audit.log")
        os.environ["ENVELOPEFS_AUDIT_LOG"] = self.audit_log
        self.server = KmipServer(self.vol.root)

    def tearDown(self):
        self.vol.cleanup()
        self.server.stop()
        if self.saved_audit is None:
            os.environ.pop("ENVELOPEFS_AUDIT_LOG", None)
        else:
            os.environ["ENVELOPEFS_AUDIT_LOG"] = self.saved_audit

    def init(self, uri, check=True):
        return run([BIN, "init", "--kms", uri, self.vol.cipher], check=check)

    def config(self):
        with open(os.path.join(self.vol.cipher, "envelopefs.conf")) as f:
            return json.load(f)

    def uid(self):
        return self.config()["root"]["uri"].split("uid=")[1].split("&")[0]

    def test_init_creates_the_key_on_the_server_and_mounts_through_it(self):
        r = self.init(self.server.uri())
        self.assertIn("KMIP key 'root'", r.stdout)
        uri = self.config()["root"]["uri"]
        self.assertIn("uid=", uri)
        self.vol.mount()
        write_file(self.vol.path("f"), b"held by the KMIP server", fsync=True)
        self.vol.remount()
        self.assertEqual(read_file(self.vol.path("f")), b"held by the KMIP server")
        self.vol.unmount()
        # A second volume by the same name finds the same key (Locate), not a new one.
        other = os.path.join(self.vol.root, "cipher2")
        run([BIN, "init", "--kms", self.server.uri(), other])
        with open(os.path.join(other, "envelopefs.conf")) as f:
            self.assertEqual(json.load(f)["root"]["uri"], uri)
        # And the key never came out: the server's log has no Get of it.
        self.assertNotIn("Processing operation: Get", read_file(self.server.path("server.log")).decode())

    def test_a_key_file_volume_moves_onto_the_server(self):
        key = os.path.join(self.vol.root, "root.key")
        run([BIN, "init", "--kms", "file:" + key, self.vol.cipher])
        self.vol.mount()
        write_file(self.vol.path("f"), b"moved", fsync=True)
        run([BIN, "rewrap", "--to", self.server.uri(), self.vol.cipher])
        self.vol.unmount()
        os.unlink(key)
        self.vol.mount()
        self.assertEqual(read_file(self.vol.path("f")), b"moved")

    def test_a_key_revoked_on_the_server_stops_mounts_and_the_running_mount(self):
        self.init(self.server.uri())
        self.vol.mount("--key-check-interval", "1", "--key-unreachable-grace", "3600")
        write_file(self.vol.path("f"), b"data", fsync=True)
        self.server.operator("revoke", self.uid())
        end = time.time() + 20
        while time.time() < end:
            try:
                read_file(self.vol.path("f"))
            except OSError as e:
                self.assertEqual(e.errno, 128)  # EKEYREVOKED
                break
            time.sleep(0.2)
        else:
            self.fail("the running mount kept serving after the key was revoked")
        end = time.time() + 10  # the log line follows the wipe that closed the gate
        while "Active state" not in self.vol.log_text() and time.time() < end:
            time.sleep(0.1)
        self.assertIn("root key revoked", self.vol.log_text())
        self.assertIn("Active state", self.vol.log_text())
        self.vol.unmount()
        self.vol.mount_refused("access denied", "Active state")
        with open(self.audit_log) as f:
            events = [json.loads(line)["event"] for line in f]
        self.assertIn("revoked", events)

    def test_a_destroyed_key_is_crypto_shredding(self):
        self.init(self.server.uri())
        self.server.operator("revoke", self.uid())
        self.server.operator("destroy", self.uid())
        self.vol.mount_refused("access denied", "key destroyed?")

    def test_a_server_that_is_down_fails_closed_and_mounting_resumes_when_it_is_back(self):
        self.init(self.server.uri())
        self.server.stop()
        self.vol.mount_refused("key service unreachable", "Connection refused")
        self.server.start()
        self.vol.mount()

    def test_an_altered_wrapped_key_fails_authentication(self):
        self.init(self.server.uri())
        conf = self.config()
        wrapped = bytearray(base64.b64decode(conf["deks"][0]["wrapped"]))  # unwrapped first
        wrapped[15] ^= 0x80
        conf["deks"][0]["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
        with open(os.path.join(self.vol.cipher, "envelopefs.conf"), "w") as f:
            json.dump(conf, f)
        self.vol.mount_refused("authentication failed", "altered")

    def test_the_server_must_prove_itself_and_the_client_key_must_be_private(self):
        # A CA that did not sign the server's certificate: the handshake is refused.
        other_ca = os.path.join(self.vol.root, "other-ca.pem")
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
             os.path.join(self.vol.root, "other-ca.key"), "-out", other_ca, "-days", "2", "-subj", "/CN=other"])
        r = self.init(self.server.uri(ca=other_ca), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("certificate", r.stderr)
        os.chmod(self.server.path("client.key"), 0o644)
        r = self.init(self.server.uri(), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("readable by anyone", r.stderr)
        os.chmod(self.server.path("client.key"), 0o600)
        for uri, expected in [(self.server.uri().replace("&ca=", "&cafile="), "unknown parameter 'cafile'"),
                              (self.server.uri(name=None), "must name the key"),
                              (f"kmip://127.0.0.1:99999/?name=x&ca=/a&cert=/b&key=/c", "bad port"),
                              (f"kmip://127.0.0.1:5696abc/?name=x&ca=/a&cert=/b&key=/c", "bad port")]:
            r = self.init(uri, check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(expected, r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.vol.cipher, "envelopefs.conf")))


if __name__ == "__main__":
    main()
