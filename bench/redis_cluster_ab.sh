#!/usr/bin/env bash
# redis_cluster_ab.sh — one proxy on a single Redis against one on a 3-primary Redis Cluster, side by
# side in one run: first-seen (unique) and replay (repeat) req/s, ROUNDS rounds alternating the order.
# Environment: BIN (target/release/idemproxy), DURATION (5s), CONNS (64), ROUNDS (3), PORT_BASE (21000).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$HERE/../target/release/idemproxy}"
DURATION="${DURATION:-5s}" CONNS="${CONNS:-64}" ROUNDS="${ROUNDS:-3}" BASE="${PORT_BASE:-21000}"
UP=$BASE SINGLE=$((BASE + 1)) P1=$((BASE + 2)) P2=$((BASE + 3)) N1=$((BASE + 10)) N2=$((BASE + 11)) N3=$((BASE + 12)) R=$((BASE + 20))
DIR="$(mktemp -d /tmp/idem-cluster-ab.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
mkdir -p "$DIR/tmp"
cat >"$DIR/up.conf" <<NGINX
worker_processes 1; daemon off; pid $DIR/up.pid; error_log $DIR/up.err warn;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp;
  uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '{"ok":true}'; } } }
NGINX
nginx -p "$DIR" -c "$DIR/up.conf" & PIDS+=($!)
redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >/dev/null 2>&1 & PIDS+=($!)
for n in $N1 $N2 $N3; do
  mkdir -p "$DIR/n$n"
  redis-server --port "$n" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR/n$n" \
    --cluster-enabled yes --cluster-config-file nodes.conf >/dev/null 2>&1 & PIDS+=($!)
done
sleep 0.5
redis-cli --cluster create 127.0.0.1:$N1 127.0.0.1:$N2 127.0.0.1:$N3 --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p $N1 CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
printf '[store]\nredis_url = "redis://127.0.0.1:%s/0"\n' "$R" >"$DIR/single.toml"
printf '[store]\nredis_cluster = ["redis://127.0.0.1:%s", "redis://127.0.0.1:%s", "redis://127.0.0.1:%s"]\n' $N1 $N2 $N3 >"$DIR/cluster.toml"
"$BIN" run --config "$DIR/single.toml" --listen 127.0.0.1:$P1 --upstream http://127.0.0.1:$UP --admin-listen 127.0.0.1:0 >"$DIR/p1.log" 2>&1 & PIDS+=($!)
"$BIN" run --config "$DIR/cluster.toml" --listen 127.0.0.1:$P2 --upstream http://127.0.0.1:$UP --admin-listen 127.0.0.1:0 >"$DIR/p2.log" 2>&1 & PIDS+=($!)
for p in $P1 $P2; do
  for _ in $(seq 100); do curl -s -o /dev/null -X POST -H "Idempotency-Key: warm-$p" http://127.0.0.1:$p/pay && break; sleep 0.1; done
done
rps() { # port scenario
  wrk -t1 -c"$CONNS" -d"$DURATION" -s "$HERE/idem.lua" "http://127.0.0.1:$1/pay" -- "$2" "ab$RANDOM$RANDOM" 100 2>&1 \
    | awk '/^RESULT/ { printf "%.0f", $2 / ($3 / 1e6) }'
}
for scen in unique repeat; do
  for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then s=$(rps $P1 $scen); c=$(rps $P2 $scen); else c=$(rps $P2 $scen); s=$(rps $P1 $scen); fi
    awk -v sc=$scen -v r=$r -v s="$s" -v c="$c" 'BEGIN { printf "%s round %d: single %s req/s, cluster %s req/s, cluster/single %.2f\n", sc, r, s, c, c / s }'
  done
done
