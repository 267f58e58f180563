#!/usr/bin/env python3
"""Where the CPU goes, from a folded stack file (inferno-collapse-perf output of bench/profile.sh).

    bench/phases.py bench/profiles/after-unique-c32.folded [more.folded ...]

Every sample is charged to one component: the deepest frame of its stack that matches a pattern of
COMPONENTS (so time in sled under the store's overlay counts as sled, time in the kernel's TCP stack
under hyper's write counts as kernel networking). Prints one column per file, in % of samples, and the
share of each thread.
"""
import collections
import re
import sys

COMPONENTS = [
    ("sled (tree inserts, reads, flushes)", r"^sled::|<sled::"),
    ("kernel: fdatasync / block I/O", r"fdatasync|blk_|virtio|iowrite"),
    ("kernel: TCP / loopback send and receive", r"tcp_|__x64_sys_(sendto|recvfrom|write|read|writev)|sock_|inet_|ip_|skb"),
    ("kernel: scheduling, futex, epoll", r"finish_task_switch|^_*schedule|futex|epoll|try_to_wake_up|_raw_spin"),
    ("allocator (mimalloc)", r"^mi_|mimalloc"),
    ("store log (wal)", r"idemproxy::store::sled::wal"),
    ("store (overlay, records, filter)", r"idemproxy::store|fastbloom"),
    ("hyper HTTP/1 (server and client)", r"^hyper::|<hyper::"),
    ("hyper-util client pool", r"hyper_util::client"),
    ("proxy pipeline", r"idemproxy::proxy|idemproxy::key|sha2"),
    ("server accept / connections", r"idemproxy::server|hyper_util::server"),
    ("metrics", r"metrics"),
    ("tokio runtime, timers, channels", r"tokio::"),
    ("libc / memcpy", r"__memcpy|__memcmp|__memset|libc"),
]


def load(path):
    comp = collections.Counter()
    threads = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            c = int(count)
            total += c
            frames = stack.split(";")
            threads[re.sub(r"-?\d+$", "", frames[0])] += c
            name = "other"
            for fr in reversed(frames[1:]):
                hit = next((n for n, p in COMPONENTS if re.search(p, fr)), None)
                if hit:
                    name = hit
                    break
            comp[name] += c
    return comp, threads, total


def main(paths):
    data = [load(p) for p in paths]
    names = [n for n, _ in COMPONENTS] + ["other"]
    short = [p.rsplit("/", 1)[-1].removesuffix(".folded") for p in paths]
    print("| component | " + " | ".join(short) + " |")
    print("|---|" + "---|" * len(paths))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{100 * c[n] / t:.1f}%" for c, _, t in data) + " |")
    threads = sorted({k for _, th, _ in data for k in th}, key=lambda k: -sum(th[k] for _, th, _ in data))
    for k in threads[:8]:
        print(f"| thread `{k}` | " + " | ".join(f"{100 * th[k] / t:.1f}%" for _, th, t in data) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
