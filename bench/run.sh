#!/usr/bin/env bash
# Side-by-side load benchmark: idemproxy against nginx proxy_pass (and direct upstream) under wrk, in one
# run, printing req/s, p50/p99 and ratios per scenario (see BENCHMARKS.md for method and figures).
#
#   bench/run.sh                      # sled, sync = "always" (the default)
#   VARIANT=periodic bench/run.sh     # sled, sync = "periodic"
#   VARIANT=redis bench/run.sh        # Redis backend (the harness starts redis-server)
#   ROUNDS=3 DURATION=10s SCENARIOS="unique repeat nokey burst" CONNS="32 256" bench/run.sh
#
# The Rust peer ldclabs/idempotent-proxy (Redis-backed) joins the same run as target "peer" when
# `idempotent-proxy-server` is on PATH (`cargo install idempotent-proxy-server`); PEER=0 leaves it out.
#
# Needs nginx, wrk (and redis-server for VARIANT=redis): apt-get install -y nginx wrk redis-server.
# bench.sh, idem.lua and the nginx templates in this folder are the shared harness (documented in bench.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
for tool in nginx wrk; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is needed (apt-get install -y nginx wrk)" >&2; exit 1; }
done
(cd "$root" && cargo build --release --quiet)
bin="$root/target/release/idemproxy"
variant=${VARIANT:-always}
cfg=$(mktemp /tmp/idemproxy-bench.XXXXXX.toml)
trap 'rm -f "$cfg"' EXIT
case $variant in
  always)   printf '[store]\nsync = "always"\n' >"$cfg"; extra="--data-dir {DATA}" ;;
  periodic) printf '[store]\nsync = "periodic"\n' >"$cfg"; extra="--data-dir {DATA}" ;;
  redis)    printf '[store]\nbackend = "redis"\n' >"$cfg"; extra="--redis-url {REDIS_URL}" ;;
  wait)     printf '[defaults]\non_in_flight = "wait"\n' >"$cfg"; extra="--data-dir {DATA}" ;;
  *) echo "bench/run.sh: unknown VARIANT $variant (always|periodic|redis|wait)" >&2; exit 2 ;;
esac
export PROXY_CMD="$bin run --config $cfg --listen {LISTEN} --upstream {UPSTREAM_URL} --admin-listen 127.0.0.1:0 $extra"
export SCENARIOS=${SCENARIOS:-"unique repeat nokey burst"}
if [ "${PEER:-1}" != 0 ] && command -v idempotent-proxy-server >/dev/null; then
  # It proxies only paths named by URL_<NAME> variables and reads a .env file in its working directory.
  export PEER_PATH=/URL_PAY
  export PEER_CMD='cd {DATA} && : > .env && exec env SERVER_ADDR={LISTEN} REDIS_URL={REDIS_URL} URL_PAY={UPSTREAM_URL}/pay REQUEST_TIMEOUT=30000 LOG_LEVEL=warn idempotent-proxy-server'
fi
exec bash "$here/bench.sh"
