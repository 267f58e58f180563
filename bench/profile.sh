#!/usr/bin/env bash
# CPU profile of idemproxy under wrk, as a flame graph (SVG) and a per-phase table.
#
#   bench/profile.sh unique always      # scenario (unique|repeat|nokey|burst) and store variant
#   OUT=bench/profiles CONNS=32 DURATION=10 bench/profile.sh nokey always
#
# Starts an nginx upstream stub (the harness's template), the release binary, runs wrk for DURATION
# seconds and samples the proxy with `perf record -F 999 --call-graph dwarf` (hardware counters are not
# available in these VMs, so the cpu-clock event). Folds the stacks with inferno
# (`cargo install inferno`) into OUT/<scenario>-<variant>.svg and prints the share of samples per phase
# (bench/phases.py). Needs nginx, wrk, perf (Debian: linux-perf), inferno.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
scenario=${1:-unique}
variant=${2:-always}
conns=${CONNS:-32}
duration=${DURATION:-10}
out=${OUT:-$here/profiles}
label=${LABEL:-$scenario-$variant}
ub=${PORT_BASE:-18200}
up_port=$ub proxy_port=$((ub + 1))
mkdir -p "$out"
for tool in nginx wrk perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "profile.sh: $tool is needed" >&2; exit 1; }
done
(cd "$root" && cargo build --release --quiet)
dir=$(mktemp -d /tmp/idemproxy-prof.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
mkdir -p "$dir/tmp-up" "$dir/data"
sed -e "s|{WORKERS}|1|g" -e "s|{DIR}|$dir|g" -e "s|{PORT}|$up_port|g" "$here/nginx-upstream.conf.tmpl" >"$dir/up.conf"
nginx -c "$dir/up.conf" -p "$dir" & pids+=($!)
case $variant in
  always|periodic) printf '[store]\nsync = "%s"\n' "$variant" >"$dir/cfg.toml"; extra=(--data-dir "$dir/data") ;;
  redis) redis-server --port $((ub + 2)) --save '' --appendonly no >/dev/null & pids+=($!)
         printf '[store]\nbackend = "redis"\n' >"$dir/cfg.toml"; extra=(--redis-url "redis://127.0.0.1:$((ub + 2))") ;;
  *) echo "profile.sh: unknown variant $variant" >&2; exit 2 ;;
esac
"$root/target/release/idemproxy" run --config "$dir/cfg.toml" --listen "127.0.0.1:$proxy_port" \
  --upstream "http://127.0.0.1:$up_port" --admin-listen 127.0.0.1:0 "${extra[@]}" 2>"$dir/proxy.log" & proxy=$!
pids+=($proxy)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$proxy_port/" && break; sleep 0.05; done
url="http://127.0.0.1:$proxy_port/pay"
runid="p$(date +%s)"
if [ "$scenario" = repeat ]; then wrk -t1 -c32 -d2s -s "$here/idem.lua" "$url" -- repeat "$runid" >/dev/null; fi
wrk -t1 -c"$conns" -d2s -s "$here/idem.lua" "$url" -- "$scenario" "${runid}w" >/dev/null
cpu0=$(awk '{print $14+$15}' "/proc/$proxy/stat")
perf record -F 999 -e cpu-clock --call-graph dwarf,16384 -p "$proxy" -o "$dir/perf.data" -- sleep "$duration" 2>/dev/null &
perfpid=$!
wrk -t1 -c"$conns" -d"${duration}s" -s "$here/idem.lua" "$url" -- "$scenario" "$runid" >"$dir/wrk.txt"
wait $perfpid || true
cpu1=$(awk '{print $14+$15}' "/proc/$proxy/stat")
reqs=$(awk -F'\t' '/^RESULT/ {print $2}' "$dir/wrk.txt")
tck=$(getconf CLK_TCK)
echo "$label: $(grep -E 'Requests/sec' "$dir/wrk.txt") requests=$reqs cpu/req=$(( (cpu1 - cpu0) * 1000000 / tck / (reqs > 0 ? reqs : 1) )) us (while perf ran)"
perf script -i "$dir/perf.data" 2>/dev/null | inferno-collapse-perf >"$out/$label.folded"
inferno-flamegraph --minwidth 0.5 --title "idemproxy $label (c$conns)" <"$out/$label.folded" >"$out/$label.svg"
python3 "$here/phases.py" "$out/$label.folded"
