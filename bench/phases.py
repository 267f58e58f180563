#!/usr/bin/env python3
"""Share of CPU samples per request phase, from a folded stack file (inferno-collapse-perf output).

    bench/phases.py bench/profiles/unique-always.folded

Each stack is charged to the first phase (in the order of PHASES) whose pattern appears in it, so a
sample inside sled under the claim counts as "store: claim". Also prints the top self-time frames.
"""
import collections
import re
import sys

# (phase, regex over the whole folded stack), first match wins.
PHASES = [
    ("store: durable wait / flusher", r"flusher|disk_sync|fdatasync|fsync|wal::|Wal"),
    ("store: claim", r"do_claim|::claim"),
    ("store: complete", r"do_complete|::complete"),
    ("store: other", r"store::"),
    ("upstream exchange (client)", r"hyper_util::client|hyper::client|proxy::forward|upstream::"),
    ("key derivation", r"key::|sha2"),
    ("proxy pipeline (other)", r"idemproxy::proxy"),
    ("server: accept / HTTP/1 server", r"hyper::server|hyper::proto|server::conn|idemproxy::server"),
    ("tokio runtime / scheduler", r"tokio::runtime|tokio::"),
    ("kernel networking", r"tcp_|inet_|ip_|__x64_sys_(sendto|recvfrom|write|read|epoll)|sock_"),
]


def main(path):
    totals = collections.Counter()
    selfs = collections.Counter()
    n = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            c = int(count)
            n += c
            frames = stack.split(";")
            selfs[frames[-1]] += c
            for name, pat in PHASES:
                if re.search(pat, stack):
                    totals[name] += c
                    break
            else:
                totals["other"] += c
    print(f"{n} samples")
    for name, c in totals.most_common():
        print(f"  {100 * c / n:5.1f}%  {name}")
    print("top self frames:")
    for name, c in selfs.most_common(25):
        print(f"  {100 * c / n:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    main(sys.argv[1])
