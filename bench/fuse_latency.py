#!/usr/bin/env python3
"""Per-opcode FUSE request counts and latencies (send -> end), from the kernel's tracepoints.

    perf record -e fuse:fuse_request_send,fuse:fuse_request_end -a -o fuse.data -- <command>
    perf script -i fuse.data | python3 bench/fuse_latency.py

Pairs each request's send with its end by request id (per connection) and prints, per opcode,
how many, the average latency and the total, largest total first. This is how bench/README.md
attributes each column's time to requests ("What limits each column").
"""
import collections
import re
import signal
import sys

EVENT = re.compile(r" (\d+\.\d+): +fuse:fuse_request_(send|end): connection (\d+) req (\d+)"
                   r"(?: opcode \d+ \((\w+)\))?")


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # | head is fine
    sent = {}
    latencies = collections.defaultdict(list)
    for line in sys.stdin:
        m = EVENT.search(line)
        if not m:
            continue
        t, kind, conn, req, op = float(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
        key = (conn, req)
        if kind == "send":
            sent[key] = (t, op)
        elif key in sent:
            t0, op0 = sent.pop(key)
            latencies[op0].append(t - t0)
    if not latencies:
        sys.exit("no fuse:fuse_request_send/end pairs in the input (see the usage above)")
    print(f"{'opcode':22s} {'count':>8s} {'avg us':>9s} {'total s':>8s}")
    for op, v in sorted(latencies.items(), key=lambda kv: -sum(kv[1])):
        print(f"{op:22s} {len(v):8d} {1e6 * sum(v) / len(v):9.1f} {sum(v):8.2f}")


if __name__ == "__main__":
    main()
