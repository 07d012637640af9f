#!/usr/bin/env python3
"""What ships beside the binary: the man page, the systemd unit and the Debian package.

The man page must render without a warning and name every subcommand, option, `-o` option and
environment variable the program has (so it cannot drift from `--help` and the code). The
unit is checked by systemd-analyze and then run the way systemd runs it (its EnvironmentFile
read, its ExecStart and ExecStop with the variables put in): a real mount comes up and goes.
The package is built by cpack from the build directory under test, and its contents,
dependencies, scripts and binary are checked.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, Volume, is_mounted, main, read_file, run, write_file  # noqa: E402

SOURCE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MAN_PAGE = os.path.join(SOURCE, "packaging", "envelopefs.1")
UNIT = os.path.join(SOURCE, "packaging", "envelopefs@.service")


def man_source():
    """The page's roff source with its escaped hyphens plain, as a reader sees the words."""
    with open(MAN_PAGE) as f:
        return f.read().replace("\\-", "-")


def subcommands():
    text = run([BIN, "--help"]).stdout
    section = text.split("Subcommands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  ([a-z][a-z-]+)", section, re.M)]


def options_of(sub):
    """Every option `envelopefs SUB --help` lists, long and short (not --help itself)."""
    text = run([BIN, sub, "--help"]).stdout
    opts = set()
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ]+)", line)
        if m:
            for o in m.group(1).split(","):
                if o not in ("-h", "--help"):
                    opts.add(o)
    return opts, text


class ManPageTest(unittest.TestCase):
    def test_it_renders_without_a_warning(self):
        r = subprocess.run(["man", "--warnings=w", "-l", MAN_PAGE], capture_output=True, text=True,
                           env=dict(os.environ, MANWIDTH="80"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "")
        self.assertIn("ENVELOPEFS(1)", r.stdout)

    def test_every_subcommand_option_and_mount_option_is_documented(self):
        page = man_source()
        subs = subcommands()
        self.assertGreaterEqual(len(subs), 8, subs)
        for sub in subs:
            self.assertRegex(page, r"\.B " + re.escape(sub) + r"\b", f"subcommand {sub}")
            opts, text = options_of(sub)
            for opt in opts:
                self.assertTrue(opt in page, f"{sub} {opt} is not in the man page")
            if sub == "mount":
                said = " ".join(text.split("-o TEXT", 1)[1].split("--passfile", 1)[0].split())
                names = re.findall(r"\b([a-z_]+)(?:=[A-Z]|,|$)", said.split("envelopefs ones:", 1)[1])
                self.assertGreaterEqual(len(names), 9, said)
                for name in names:
                    self.assertTrue(name in page, f"-o {name} is not in the man page")

    def test_the_exit_statuses_it_states_for_usage(self):
        # EXIT STATUS: 2 for a usage error (CLI11's own codes were 100 and up), 0 for --help.
        self.assertIn("2 for a usage error", man_source())
        for args in (["mount"], ["no-such-command"], ["init", "--block-size", "x", "/tmp/d"],
                     ["mount", "-o", "rewrap_rate=-1", "/tmp/c", "/tmp/m"]):
            r = run([BIN, *args], check=False)
            self.assertEqual(r.returncode, 2, f"{args}: {r.stderr}")
            self.assertNotEqual(r.stderr, "", args)
        for args in (["--help"], ["mount", "--help"], ["--version"]):
            self.assertEqual(run([BIN, *args], check=False).returncode, 0, args)

    def test_every_environment_variable_the_code_reads_is_documented(self):
        found = set()
        for folder in ("crypto", "keyhierarchy", "fs"):
            for path in glob.glob(os.path.join(SOURCE, folder, "*.cc")):
                with open(path) as f:
                    found.update(re.findall(r'getenv\("(ENVELOPEFS_[A-Z0-9_]+)"\)', f.read()))
        self.assertGreaterEqual(len(found), 5, found)
        environment = man_source().split(".SH ENVIRONMENT", 1)[1].split(".SH ", 1)[0]
        for name in sorted(found):
            self.assertIn(name, environment)


def unit_service_lines():
    values = {}
    section = None
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif line and not line.startswith("#") and section == "[Service]":
                key, value = line.split("=", 1)
                values[key] = value
    return values


def systemd_argv(command, env):
    """An Exec line as systemd runs it: words split on blanks, a word ${NAME} replaced by one
    argument, the program found on the path (here: the binary under test)."""
    argv = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word)
        argv.append(env.get(m.group(1), "") if m else word)
    if argv[0] == "envelopefs":
        argv[0] = BIN
    return argv


class SystemdUnitTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="efs-unit-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_systemd_analyze_finds_nothing_to_say(self):
        if shutil.which("systemd-analyze") is None:
            self.fail("systemd-analyze is missing (package systemd)")
        unit = os.path.join(self.tmp, "envelopefs@.service")
        with open(UNIT) as f:
            text = f.read()
        # Only the program's path differs from the installed unit: the build's binary here.
        text = re.sub(r"^(Exec\w+=)envelopefs ", r"\g<1>" + BIN + " ", text, flags=re.M)
        with open(unit, "w") as f:
            f.write(text)
        r = run(["systemd-analyze", "verify", "--man=no", os.path.join(self.tmp, "envelopefs@data.service")],
                check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr.strip(), "")

    def test_the_unit_mounts_and_unmounts_a_volume_as_systemd_would_run_it(self):
        service = unit_service_lines()
        self.assertEqual(service["Type"], "forking")  # mount returns once ready, daemon stays
        self.assertEqual(service["EnvironmentFile"], "/etc/envelopefs/%i.env")
        vol = Volume()
        try:
            env_file = os.path.join(self.tmp, "data.env")
            with open(env_file, "w") as f:
                f.write(f"CIPHERDIR={vol.cipher}\nMOUNTPOINT={vol.mnt}\n"
                        f"OPTIONS=allow_other,log_file={vol.log}\n")
            env = {}
            with open(env_file) as f:
                for line in f:
                    key, value = line.strip().split("=", 1)
                    env[key] = value
            start = systemd_argv(service["ExecStart"], env)
            r = run(start, check=False)
            self.assertEqual(r.returncode, 0, f"{start}: {r.stderr}")
            self.assertTrue(is_mounted(vol.mnt))
            write_file(vol.path("f"), b"through the unit", fsync=True)
            self.assertEqual(read_file(vol.path("f")), b"through the unit")
            with open("/proc/self/mounts") as f:
                self.assertIn("allow_other", f.read().split(vol.mnt, 1)[1].split("\n")[0])
            stop = systemd_argv(service["ExecStop"], env)
            r = run(stop, check=False)
            self.assertEqual(r.returncode, 0, f"{stop}: {r.stderr}")
            self.assertFalse(is_mounted(vol.mnt))
            # An env file without OPTIONS: ${OPTIONS} is an empty argument, which mount accepts.
            del env["OPTIONS"]
            run(systemd_argv(service["ExecStart"], env))
            self.assertEqual(read_file(vol.path("f")), b"through the unit")
            run(systemd_argv(service["ExecStop"], env))
        finally:
            vol.cleanup()


class DebianPackageTest(unittest.TestCase):
    def test_the_package_holds_everything_and_depends_on_what_it_links(self):
        build_dir = os.path.dirname(os.path.realpath(BIN))
        if not os.path.exists(os.path.join(build_dir, "CPackConfig.cmake")):
            self.fail(f"no CPackConfig.cmake in {build_dir}: is ENVELOPEFS_BIN a build's binary?")
        out = tempfile.mkdtemp(prefix="efs-deb-")
        try:
            r = run(["cpack", "-G", "DEB", "-B", out], cwd=build_dir, check=False)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            debs = glob.glob(os.path.join(out, "envelopefs_*.deb"))
            self.assertEqual(len(debs), 1, os.listdir(out))
            deb = debs[0]
            files = run(["dpkg-deb", "-c", deb]).stdout
            for path in ("./usr/bin/envelopefs", "./usr/sbin/mount.fuse.envelopefs",
                         "./usr/share/man/man1/envelopefs.1.gz", "./usr/lib/systemd/system/envelopefs@.service"):
                self.assertIn(path, files)
            depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
            for lib in ("fuse3", "libfuse3-3", "libssl3", "liburing2", "libsodium23", "libp11-kit0", "libxxhash0"):
                self.assertRegex(depends, r"(^|, )" + re.escape(lib) + r"\b", depends)
            self.assertEqual(run(["dpkg-deb", "-f", deb, "Package"]).stdout.strip(), "envelopefs")

            root = os.path.join(out, "root")
            run(["dpkg-deb", "-x", deb, root])
            version = run([os.path.join(root, "usr/bin/envelopefs"), "--version"]).stdout
            self.assertEqual(version, run([BIN, "--version"]).stdout)
            with open(os.path.join(root, "usr/lib/systemd/system/envelopefs@.service")) as f, open(UNIT) as g:
                self.assertEqual(f.read(), g.read())
            page = run(["man", "-l", os.path.join(root, "usr/share/man/man1/envelopefs.1.gz")],
                       env=dict(os.environ, MANWIDTH="80")).stdout
            self.assertIn("KEY PROVIDERS", page)
            control = os.path.join(out, "control")
            run(["dpkg-deb", "-e", deb, control])
            for script in ("postinst", "postrm"):
                path = os.path.join(control, script)
                self.assertTrue(os.access(path, os.X_OK), script)
                # No systemd running in a test: the script has nothing to do and must say so by
                # exiting 0 (a failing maintainer script leaves the package half-installed).
                r = run(["sh", path, "configure" if script == "postinst" else "remove"], check=False,
                        env=dict(os.environ, PATH="/usr/bin:/bin"))
                self.assertEqual(r.returncode, 0, r.stderr)
            # apt resolves its dependencies (a simulation: nothing is installed).
            r = run(["apt-get", "install", "-s", deb], check=False)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("Inst envelopefs", r.stdout)
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
