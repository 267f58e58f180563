#!/usr/bin/env bash
# redis_capacity.sh — what one Redis primary costs per request, measured: Redis commands, network bytes
# and CPU per first-seen and per replayed request, and memory per stored record, for a given response
# size; from those, first-seen requests per second one Redis core can take.
#
# Starts its own redis-server, an nginx upstream answering BODY bytes of JSON, and one idemproxy on the
# Redis backend; runs wrk (bench/idem.lua) per scenario, reading Redis's INFO before and after.
#
# Environment: BIN (default target/release/idemproxy), DURATION (10s), CONNS (64), BODY (bytes of the
# upstream's answer, default 200), MIN_REPLICAS (0; with 1 or more, that many replicas are started and
# the proxy waits for them), PORT_BASE (19080).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$HERE/../target/release/idemproxy}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
BODY="${BODY:-200}"
MIN_REPLICAS="${MIN_REPLICAS:-0}"
BASE="${PORT_BASE:-19080}"
UP=$BASE PROXY=$((BASE + 1)) REDIS=$((BASE + 2))
DIR="$(mktemp -d /tmp/idem-redis-capacity.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

body="$(python3 -c "import json,sys; n=int(sys.argv[1]); print(json.dumps({'id':'ch_'+'x'*12,'status':'succeeded','pad':'a'*max(0,n-60)}))" "$BODY")"
mkdir -p "$DIR/tmp"
cat >"$DIR/upstream.conf" <<NGINX
worker_processes 1; daemon off; pid $DIR/up.pid; error_log $DIR/up.err warn;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp;
  fastcgi_temp_path $DIR/tmp; uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '$body'; } } }
NGINX
nginx -p "$DIR" -c "$DIR/upstream.conf" & PIDS+=($!)
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
  --repl-diskless-sync-delay 0 >"$DIR/redis.log" 2>&1 & PIDS+=($!)
for i in $(seq 1 "$MIN_REPLICAS"); do
  mkdir -p "$DIR/replica$i"
  redis-server --port $((REDIS + 10 + i)) --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR/replica$i" \
    --replicaof 127.0.0.1 "$REDIS" >"$DIR/replica$i.log" 2>&1 & PIDS+=($!)
done
sleep 0.3
# Replicas count for WAIT once their sync is over (state=online).
until [ "$(redis-cli -p "$REDIS" INFO replication | grep -c 'state=online')" -ge "$MIN_REPLICAS" ]; do sleep 0.2; done
cat >"$DIR/proxy.toml" <<TOML
[store]
backend = "redis"
redis_url = "redis://127.0.0.1:$REDIS/0"
redis_min_replicas = $MIN_REPLICAS
TOML
"$BIN" run --config "$DIR/proxy.toml" --listen "127.0.0.1:$PROXY" --upstream "http://127.0.0.1:$UP" \
  --admin-listen 127.0.0.1:0 >"$DIR/proxy.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do
  curl -s -o /dev/null -X POST -H 'Idempotency-Key: warm' "http://127.0.0.1:$PROXY/pay" && break; sleep 0.1
done

snap() { redis-cli -p "$REDIS" INFO all; }
measure() { # scenario
  local scen=$1 before after out
  before="$(snap)"
  out="$(wrk -t1 -c"$CONNS" -d"$DURATION" -s "$HERE/idem.lua" "http://127.0.0.1:$PROXY/pay" -- "$scen" "cap$RANDOM$RANDOM" 100 2>&1)"
  after="$(snap)"
  python3 - "$scen" "$BODY" <<PY "$before" "$after" "$out"
import sys, re
scen, body, before, after, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def parse(t):
    d = {}
    for line in t.splitlines():
        if ':' in line and not line.startswith('#'):
            k, v = line.split(':', 1)
            d[k.strip()] = v.strip()
    return d
b, a = parse(before), parse(after)
res = [l for l in out.splitlines() if l.startswith('RESULT')]
req = int(res[-1].split()[1]) if res else 0
dur = int(res[-1].split()[2]) / 1e6 if res else 1
def calls(d):
    out = {}
    for k, v in d.items():
        if k.startswith('cmdstat_'):
            out[k[8:]] = int(re.search(r'calls=(\d+)', v).group(1))
    return out
cb, ca = calls(b), calls(a)
cmds = {k: ca[k] - cb.get(k, 0) for k in ca if ca[k] - cb.get(k, 0) > 0 and k not in ('info',)}
cpu = lambda d: float(d['used_cpu_sys']) + float(d['used_cpu_user'])
n = max(req, 1)
cpu_us = (cpu(a) - cpu(b)) * 1e6 / n
netin = (int(a['total_net_input_bytes']) - int(b['total_net_input_bytes'])) / n
netout = (int(a['total_net_output_bytes']) - int(b['total_net_output_bytes'])) / n
keys = lambda d: sum(int(re.search(r'keys=(\d+)', v).group(1)) for k, v in d.items() if re.fullmatch(r'db\d+', k))
newkeys = keys(a) - keys(b)
mem = int(a['used_memory']) - int(b['used_memory'])
r = res[-1].split() if res else []
lat = f"p50 {int(r[9])/1000:.2f} ms, p99 {int(r[11])/1000:.2f} ms" if len(r) > 11 else ""
print(f"{scen:7s} body {body:>6s} B: {req/dur:8.0f} req/s ({lat}), Redis {sum(cmds.values())/n:.2f} commands/request "
      f"({', '.join(f'{k} {v/n:.2f}' for k, v in sorted(cmds.items()))}), "
      f"{cpu_us:.1f} µs Redis CPU/request -> one Redis core ~{1e6/max(cpu_us,0.01):,.0f} req/s, "
      f"net {netin:.0f} B in + {netout:.0f} B out per request"
      + (f", {newkeys} new keys, {mem/max(newkeys/2,1):.0f} B of Redis memory per record (record + index)" if scen == 'unique' else ''))
PY
}
measure unique
measure repeat
