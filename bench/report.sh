#!/usr/bin/env bash
# The full benchmark set behind BENCHMARKS.md, one run after the other, every table kept:
#
#   bench/report.sh                 # results in bench-results/<UTC date-time>/
#   OUT=/tmp/b QUICK=1 bench/report.sh
#
#   1-2. sled, sync = "always" (the default), twice in a row: unique, repeat, nokey, burst at 32 and 256
#        connections, with nginx proxy_pass, the upstream direct and (when installed) the peer
#        ldclabs/idempotent-proxy in the same run;
#   3.   sync = "periodic";   4. the Redis backend;
#   5.   request body size: 4 KiB and 64 KiB bodies (BODY_BYTES), unique and repeat, 32 connections;
#   6.   concurrency: 1, 8 and 64 connections, unique and nokey;
#   7.   bench/million.sh: 1,000,000 records (memory, disk, restart, replay latency).
#
# Needs nginx, wrk, redis-server (apt-get install -y nginx wrk redis-server); about 35 minutes
# (QUICK=1: 3 s per run and N=200000 records, about 12 minutes).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${OUT:-$root/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
dur=5s n=1000000
[ "${QUICK:-0}" = 1 ] && dur=3s n=200000
(cd "$root" && cargo build --release --quiet)

step() { # name, then env assignments for bench/run.sh
  local name=$1; shift
  echo "== $name" >&2
  env "$@" DURATION="$dur" RESULTS_DIR="$out/$name" bash "$here/run.sh" >"$out/$name.txt" 2>&1 ||
    echo "bench/report.sh: step $name failed (see $out/$name.txt)" >&2
}

step always-1 VARIANT=always
step always-2 VARIANT=always
step periodic VARIANT=periodic PEER=0
step redis VARIANT=redis PEER=0
for b in 4096 65536; do
  step "body-$b" VARIANT=always PEER=0 BODY_BYTES=$b SCENARIOS="unique repeat" CONNS=32 TARGETS="nginx proxy"
done
step concurrency VARIANT=always PEER=0 SCENARIOS="unique nokey" CONNS="1 8 64" TARGETS="nginx proxy"
echo "== million" >&2
N=$n RESULTS_DIR="$out/million" bash "$here/million.sh" >"$out/million.txt" 2>&1 ||
  echo "bench/report.sh: million.sh failed (see $out/million.txt)" >&2
echo "bench/report.sh: results in $out" >&2
