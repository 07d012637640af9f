#!/usr/bin/env python3
"""What a DEK rotation costs: the block re-wrap walk (fs/block_rewrap.h) against re-encrypting
the same data, and what the walk takes from a workload running beside it. Run as root.

  python3 bench/rotation.py [--size 2G] [--tree /usr/include] [--runtime 20] [--rewrap-rate N]

1. A volume holding one --size file and a copy of --tree.
2. Re-wrap: unmount, drop caches, `envelopefs rotate-dek`, mount; the walk's own figures
   (files, metadata pages rewritten, seconds) from the daemon log.
3. Re-encrypt, the baseline: the same data copied through the mount with cold caches (what a
   rotation that re-encrypts must at least do: read and write every byte).
4. Online: fio 4 KiB random reads of the big file for --runtime seconds, with a rotation made a
   third of the way in (the mount checks keys every second): fio's IOPS while the walk runs
   against its IOPS before and after.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from compare import ROOT, drop_caches, sh  # the side-by-side script beside this one


class Vol:
    def __init__(self, binary, work, rate):
        self.bin, self.work, self.rate = binary, work, rate
        self.cipher, self.mnt = os.path.join(work, "cipher"), os.path.join(work, "mnt")
        self.log = os.path.join(work, "daemon.log")
        os.makedirs(self.mnt)
        sh([binary, "init", "--kms", "file:" + os.path.join(work, "root.key"), self.cipher])

    def mount(self):
        sh([self.bin, "mount", "--key-check-interval", "1", "--rewrap-rate", str(self.rate), "--log-file", self.log,
            self.cipher, self.mnt])

    def unmount(self):
        sh([self.bin, "unmount", self.mnt])
        for _ in range(200):  # the daemon exits after the kernel lets go
            if sh(["pgrep", "-f", "envelopefs mount .*" + re.escape(self.cipher)], check=False).returncode != 0:
                return
            time.sleep(0.05)

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def wait_walk(self, since, timeout=3600):
        """The `re-wrap done` line written after log offset `since`: (files, pages, seconds)."""
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(r"re-wrap done: .*?; (\d+) files, (\d+) metadata pages rewritten in ([\d.]+) s",
                          self.log_text()[since:])
            if m:
                return int(m[1]), int(m[2]), float(m[3])
            time.sleep(0.1)
        raise RuntimeError("the re-wrap did not finish:\n" + self.log_text()[since:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--tree", default="/usr/include")
    ap.add_argument("--runtime", type=int, default=20)
    ap.add_argument("--rewrap-rate", type=int, default=0, help="the mount's --rewrap-rate (0: no limit)")
    ap.add_argument("--work", default="/var/tmp/envelopefs-bench-rotation")
    ap.add_argument("--binary", default=os.path.join(ROOT, "build/envelopefs"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, drop_caches)")
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    v = Vol(a.binary, tempfile.mkdtemp(dir=a.work), a.rewrap_rate)
    rows = []
    try:
        v.mount()
        big = os.path.join(v.mnt, "big")
        sh(["fio", "--name=fill", f"--filename={big}", "--rw=write", "--bs=1M", f"--size={a.size}",
            "--ioengine=psync", "--end_fsync=1"])
        shutil.copytree(a.tree, os.path.join(v.mnt, "tree"), symlinks=True)
        data = sh(["du", "-sb", v.mnt]).stdout.split()[0]
        files = sum(len(f) for _, _, f in os.walk(v.mnt))
        v.unmount()

        # 2. The walk, cold.
        drop_caches()
        sh([a.binary, "rotate-dek", v.cipher])
        since = len(v.log_text())
        v.mount()
        n_files, pages, secs = v.wait_walk(since)
        rows.append(("re-wrap walk (cold caches)", f"{secs:.1f} s", f"{n_files} files, {pages} pages "
                     f"({pages * 4 // 1024} MiB of metadata) for {int(data) >> 20} MiB of data"))

        # 3. Re-encrypting instead: every byte read and written once through the mount.
        v.unmount()
        drop_caches()
        v.mount()
        os.mkdir(os.path.join(v.mnt, "copy"))
        t = time.time()
        sh(["cp", "-a", os.path.join(v.mnt, "big"), os.path.join(v.mnt, "tree"), os.path.join(v.mnt, "copy")])
        os.sync()
        copy_secs = time.time() - t
        rows.append(("re-encrypt (cp -a through the mount, cold)", f"{copy_secs:.1f} s",
                     f"walk / re-encrypt = {secs / copy_secs:.3f}"))
        sh(["rm", "-rf", os.path.join(v.mnt, "copy")])

        # 4. A workload beside the walk: fio's IOPS in 200 ms steps, inside the walk's window
        # (from the log line that starts it to the one that ends it) against outside it.
        v.unmount()
        drop_caches()
        v.mount()
        since = len(v.log_text())
        prefix = os.path.join(a.work, "rr")
        started = time.time()
        proc = subprocess.Popen(["fio", "--name=rr", f"--filename={big}", "--rw=randread", "--bs=4k",
                                 f"--size={a.size}", "--ioengine=psync", f"--runtime={a.runtime}",
                                 "--time_based", f"--write_iops_log={prefix}", "--log_avg_msec=200",
                                 "--output-format=json"], stdout=subprocess.PIPE, text=True)
        time.sleep(a.runtime / 3)
        sh([a.binary, "rotate-dek", v.cipher])
        window = [None, None]
        while window[1] is None:
            text = v.log_text()[since:]
            now = time.time() - started
            if window[0] is None and "re-wrapping every block key" in text:
                window[0] = now
            if "re-wrap done" in text:
                window[1] = now
            time.sleep(0.02)
        _, pages2, secs2 = v.wait_walk(since)
        proc.communicate()
        inside, outside = [], []
        with open(glob.glob(prefix + "_iops*.log")[0]) as f:
            for line in f:
                ms, iops = (int(x) for x in line.split(",")[:2])
                t = ms / 1000
                if t < 1:
                    continue  # fio's own start
                (inside if window[0] - 0.2 <= t <= window[1] + 0.2 else outside).append(iops)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        rows.append(("fio randread 4k, outside the walk", f"{mean(outside):.0f} IOPS",
                     f"{len(outside)} samples of 200 ms"))
        rows.append(("fio randread 4k, while the walk runs", f"{mean(inside):.0f} IOPS",
                     f"{mean(inside) / mean(outside):.2f}x; the walk took {secs2:.1f} s for {pages2} pages "
                     f"({len(inside)} samples)"))
        v.unmount()
    finally:
        sh(["umount", "-l", v.mnt], check=False)
    print(f"\n{files} files; `{' '.join(sys.argv)}`\n")
    print("| phase | result | notes |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
