#!/usr/bin/env bash
# million.sh — how the sled store scales with the number of stored records (issue "performance").
#
# For each record count (a 1,000-record baseline, then N, default 1,000,000), on a fresh data dir:
#   1. populate: proxy with [store] sync = "periodic", wrk (1 thread) POSTs keys k0..k<N-1> once
#      each through it to an nginx stub answering 201 + a ~200-byte JSON body (million.lua).
#      Periodic sync is only for speed: the records written are identical to sync = "always".
#   2. measure: proxy RSS (VmRSS, VmHWM), data dir (du -sb), idemproxy_records_stored_total.
#   3. clean restart: SIGTERM, wait for exit (code must be 0), start again with the default
#      sync = "always", time exec -> the "listening on" log line. Then unclean restart: SIGKILL,
#      start again, time it the same way.
#   4. replay: wrk 1 thread, CONNS connections, a WARMUP run (not measured) then REPLAY_ROUNDS
#      runs of DURATION (medians reported; the machine is noisy), POSTing
#      keys drawn at random from k0..k<N-1>; every request must be a replay (checked with the
#      proxy's replayed counter and the stub's hit log: 0 upstream hits). RSS after it.
# Then one table with PASS/FAIL against the targets, evaluated on the N row:
#   RSS <= 150 MB, data dir <= 1 GB, clean and unclean restart <= 2 s, p99(N)/p99(1k) <= 1.5.
#
# Usage (from anywhere; BIN relative paths are taken from the repo root):
#   bench/million.sh                                     # N=1000000, BIN=target/release/idemproxy
#   BIN=/tmp/idemproxy-base N=20000 bench/million.sh     # quick check
#   RESULTS_DIR=/some/dir bench/million.sh               # also writes /some/dir/million.txt
#
# Environment (all optional):
#   BIN          proxy binary (default target/release/idemproxy; this script never builds)
#   N            record count of the big case (default 1000000)
#   BASE_N       record count of the baseline (default 1000)
#   POP_CONNS    wrk connections while populating (default 32)
#   CONNS        wrk connections for the replay run (default 32)
#   DURATION     replay run length (default 10s)
#   WARMUP       replay warm-up before the measured runs (default 2s; 0 = none)
#   REPLAY_ROUNDS measured replay runs per case; the table shows medians (default 3)
#   POP_RATE_MIN lowest populate rate (req/s) the populate time-out allows for (default 500)
#   RESTART_WAIT seconds to wait for "listening on" after a (re)start (default 300)
#   PORT_BASE    upstream stub PORT_BASE, proxy +1, admin +2 (default 18100; stays in 18100-18110)
#   RESULTS_DIR  if set, the table is also written to $RESULTS_DIR/million.txt
#   STORE_EXTRA  extra lines for the [store] table of both configs (e.g. 'cache_capacity = "32MiB"')
#   KEEP=1       keep the scratch dir (logs, configs, data dirs) instead of deleting it
#
# Needs nginx, wrk, curl, du, awk. 2-core shared machine: only the ratio from one run means much.
# Runtime at N=1M: about 4 min (populate ~150 s at ~6.5k req/s) and ~1.5 GB of scratch in /tmp
# (mktemp -d /tmp/million.XXXXXX, deleted at exit unless KEEP=1). Full logs go to stderr.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${BIN:-target/release/idemproxy}
[[ "$BIN" == /* ]] || BIN="$ROOT/$BIN"
N=${N:-1000000}
BASE_N=${BASE_N:-1000}
POP_CONNS=${POP_CONNS:-32}
CONNS=${CONNS:-32}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
REPLAY_ROUNDS=${REPLAY_ROUNDS:-3}
POP_RATE_MIN=${POP_RATE_MIN:-500}
RESTART_WAIT=${RESTART_WAIT:-300}
PORT_BASE=${PORT_BASE:-18100}
UPORT=$PORT_BASE
PPORT=$((PORT_BASE + 1))
APORT=$((PORT_BASE + 2))
RESULTS_DIR=${RESULTS_DIR:-}
KEEP=${KEEP:-0}

# targets (issue "performance")
T_RSS_MB=150
T_DATA_MB=1024
T_RESTART_MS=2000
T_P99_RATIO=1.5

die() { echo "million.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for tool in nginx wrk curl du awk; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
[[ -x "$BIN" ]] || die "BIN=$BIN is not an executable (this script does not build it)"
[[ -f "$HERE/million.lua" && -f "$HERE/million-upstream.conf.tmpl" ]] || die "million.lua / million-upstream.conf.tmpl missing next to million.sh"
((PORT_BASE >= 18100 && PORT_BASE + 2 <= 18110)) || die "PORT_BASE must keep ports within 18100-18110"
[[ "$N" =~ ^[0-9]+$ && "$BASE_N" =~ ^[0-9]+$ && N -ge 1 && BASE_N -ge 1 ]] || die "N and BASE_N must be positive integers"

ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || true

WORKDIR=$(mktemp -d /tmp/million.XXXXXX) || die "mktemp failed"

# ---------------------------------------------------------------- processes and cleanup
UP_PID= PROXY_PID= WRK_PID=
cleanup() {
  local p
  for p in "$WRK_PID" "$PROXY_PID" "$UP_PID"; do
    [[ -n "$p" ]] && kill -TERM "$p" 2>/dev/null
  done
  for p in "$WRK_PID" "$PROXY_PID" "$UP_PID"; do
    [[ -n "$p" ]] || continue
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if [[ "$KEEP" == 1 ]]; then
    echo "million.sh: scratch kept in $WORKDIR" >&2
  else
    rm -rf "$WORKDIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $UPORT $PPORT $APORT; do port_open "$p" && die "port $p is already in use"; done

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# ---------------------------------------------------------------- upstream stub
mkdir -p "$WORKDIR/tmp-up"
sed -e "s|{DIR}|$WORKDIR|g" -e "s|{PORT}|$UPORT|g" "$HERE/million-upstream.conf.tmpl" >"$WORKDIR/upstream.conf"
HITS="$WORKDIR/upstream-access.log"
nginx -c "$WORKDIR/upstream.conf" -p "$WORKDIR" >"$WORKDIR/upstream.out" 2>&1 </dev/null &
UP_PID=$!
for _ in $(seq 100); do port_open "$UPORT" && break; kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
port_open "$UPORT" || { cat "$WORKDIR/upstream.out" "$WORKDIR/upstream-error.log" >&2 2>/dev/null; die "upstream stub did not start"; }
log "upstream stub up on 127.0.0.1:$UPORT (pid $UP_PID)"

# STORE_EXTRA: more [store] lines for both configs, e.g. STORE_EXTRA='cache_capacity = "32MiB"'.
printf '[store]\nsync = "periodic"\n%s\n' "${STORE_EXTRA:-}" >"$WORKDIR/periodic.toml"
printf '[store]\nsync = "always"\n%s\n' "${STORE_EXTRA:-}" >"$WORKDIR/always.toml"

# ---------------------------------------------------------------- proxy control
# start_proxy CFG DATADIR ERRLOG — sets PROXY_PID and START_MS (ms resolution: the
# "listening on" line's own timestamp minus the time taken just before exec)
START_MS=
start_proxy() {
  local cfg=$1 data=$2 err=$3 t0 deadline line ts t1
  : >"$err"
  t0=$(date +%s%N)
  "$BIN" run --config "$cfg" --listen "127.0.0.1:$PPORT" --upstream "http://127.0.0.1:$UPORT" \
    --admin-listen "127.0.0.1:$APORT" --data-dir "$data" 2>"$err" >/dev/null </dev/null &
  PROXY_PID=$!
  deadline=$(( $(date +%s) + RESTART_WAIT ))
  while :; do
    line=$(grep -m1 "listening on 127.0.0.1:$PPORT" "$err")
    [[ -n "$line" ]] && break
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
      echo "---- proxy log (tail) ----" >&2; tail -n 30 "$err" >&2
      PROXY_PID=; START_MS=; return 1
    fi
    (( $(date +%s) > deadline )) && { log "proxy not listening after ${RESTART_WAIT}s"; START_MS=; return 1; }
    sleep 0.02
  done
  t1=$(date +%s%N)
  ts=$(awk '{print $1}' <<<"$line")
  if ts=$(date -d "$ts" +%s%N 2>/dev/null); then
    START_MS=$(awk -v a="$ts" -v b="$t0" 'BEGIN{printf "%d", (a-b)/1e6}')
  else   # log format without a parsable timestamp: fall back to the polling time
    START_MS=$(( (t1 - t0) / 1000000 ))
  fi
  for _ in $(seq 100); do port_open "$PPORT" && break; sleep 0.05; done
  return 0
}

# stop_proxy SIGNAL — returns the exit code (or 255 if it had to be SIGKILLed after 60 s)
stop_proxy() {
  local sig=$1 rc
  [[ -n "$PROXY_PID" ]] || return 0
  # SIGKILL: nothing to learn from the exit status; disown so bash prints no "Killed" notice
  [[ "$sig" == KILL ]] && disown "$PROXY_PID" 2>/dev/null
  kill "-$sig" "$PROXY_PID" 2>/dev/null
  for _ in $(seq 600); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$PROXY_PID" 2>/dev/null; then
    log "proxy did not exit 60 s after SIG$sig: SIGKILL"
    kill -KILL "$PROXY_PID" 2>/dev/null
  fi
  if [[ "$sig" == KILL ]]; then rc=137; else { wait "$PROXY_PID"; } 2>/dev/null; rc=$?; fi
  PROXY_PID=
  return $rc
}

metric() {  # metric NAME[{labels}] -> value (0 if absent)
  curl -s --max-time 10 "http://127.0.0.1:$APORT/metrics" |
    awk -v m="$1" '$1 == m {v = $2} END {printf "%d", v + 0}'
}
rss_kb()  { awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status" 2>/dev/null || echo 0; }
hwm_kb()  { awk '/^VmHWM:/ {print $2}' "/proc/$PROXY_PID/status" 2>/dev/null || echo 0; }
mb()      { awk -v k="$1" 'BEGIN{printf "%.1f", k / 1024}'; }
hits()    { [[ -f "$HITS" ]] && wc -l <"$HITS" || echo 0; }

# run_wrk OUTFILE TIMEOUT_S wrk-args... — runs wrk in the background (so the trap can stop it);
# sets RES to its RESULT line (not called in $(...): WRK_PID must be visible to the trap)
# If WRK_MARKER is set, wrk gets SIGINT (prints its summary and exits) as soon as that file
# exists, and WRK_MARKER_MS is the ms from wrk's start until the file was seen.
RES= WRK_MARKER= WRK_MARKER_MS=
run_wrk() {
  local out=$1 tmo=$2 i t0; shift 2
  RES= WRK_MARKER_MS=
  t0=$(date +%s%N)
  wrk "$@" >"$out" 2>&1 </dev/null &
  WRK_PID=$!
  for ((i = 0; i < tmo * 20; i++)); do
    kill -0 "$WRK_PID" 2>/dev/null || break
    if [[ -n "$WRK_MARKER" && -z "$WRK_MARKER_MS" && -e "$WRK_MARKER" ]]; then
      WRK_MARKER_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
      kill -INT "$WRK_PID" 2>/dev/null
    fi
    sleep 0.05
  done
  if kill -0 "$WRK_PID" 2>/dev/null; then
    log "wrk still running after ${tmo}s: stopping it"; kill -TERM "$WRK_PID" 2>/dev/null
  fi
  wait "$WRK_PID" 2>/dev/null
  WRK_PID=
  RES=$(grep -m1 '^RESULT' "$out") || { echo "---- wrk output ----" >&2; cat "$out" >&2; return 1; }
}

# ---------------------------------------------------------------- one case
declare -A R=()   # R[<n>,<field>]
ODD=()            # anything odd, printed under the table
odd() { ODD+=("N=$1: $2"); log "ODD N=$1: $2"; }

run_case() {
  local n=$1 tag=n$1 data err secs pop_tmo rc
  data="$WORKDIR/data-$tag"
  err="$WORKDIR/proxy-$tag"
  log "==== N=$n: populate (sync = \"periodic\") on fresh $data"
  start_proxy "$WORKDIR/periodic.toml" "$data" "$err-populate.log" || { odd "$n" "proxy failed to start for populate"; return 1; }

  # populate: bounded by POP_RATE_MIN; the lua stops the thread after the N-th keyed response
  pop_tmo=$(( n / POP_RATE_MIN + 60 ))
  local h0; h0=$(hits)
  WRK_MARKER="$WORKDIR/populated-$tag"
  run_wrk "$WORKDIR/wrk-populate-$tag.txt" $((pop_tmo + 30)) -t1 -c"$POP_CONNS" -d"${pop_tmo}s" --timeout 30s \
        -s "$HERE/million.lua" "http://127.0.0.1:$PPORT/pay" -- populate "$n" "$WRK_MARKER" || { odd "$n" "populate wrk failed"; }
  local req dur_us e_conn e_read e_write e_status e_tmo sent answered
  IFS=$'\t' read -r _ req dur_us e_conn e_read e_write e_status e_tmo _ _ _ _ _ sent answered <<<"$RES"
  WRK_MARKER=
  # populate time: wrk start -> all N keyed responses in (the marker), else wrk's own duration
  [[ -n "$WRK_MARKER_MS" ]] || { WRK_MARKER_MS=$(( ${dur_us:-0} / 1000 )); odd "$n" "populate did not finish within ${pop_tmo}s"; }
  secs=$(awk -v d="$WRK_MARKER_MS" 'BEGIN{printf "%.1f", d / 1e3}')
  R[$n,pop_s]=$secs
  R[$n,pop_rps]=$(awk -v r="${answered:-0}" -v d="$WRK_MARKER_MS" 'BEGIN{printf "%.0f", r / (d / 1e3)}')
  sleep 1   # let the last periodic flush land (metrics are in-memory anyway)
  local stored posts
  stored=$(metric idemproxy_records_stored_total)
  posts=$(awk -v h0="$h0" 'NR > h0 && $1 == "POST"' "$HITS" | wc -l)
  R[$n,stored]=$stored
  log "populate: ${req:-?} requests in ${secs}s (${R[$n,pop_rps]} keyed req/s), keyed sent=$sent answered=$answered, non2xx=$e_status sockerr=$((e_conn + e_read + e_write + e_tmo)), records_stored_total=$stored, upstream POSTs=$posts"
  [[ "$sent" == "$n" && "$answered" -ge "$n" ]] || odd "$n" "populate: keyed sent=$sent answered=$answered (expected $n)"
  (( e_status > 0 )) && odd "$n" "populate: $e_status non-2xx responses"
  (( e_conn + e_read + e_write + e_tmo > 0 )) && odd "$n" "populate: socket errors connect=$e_conn read=$e_read write=$e_write timeout=$e_tmo"
  [[ "$stored" == "$n" ]] || odd "$n" "populate: idemproxy_records_stored_total=$stored, expected $n"
  [[ "$posts" == "$n" ]] || odd "$n" "populate: upstream got $posts POSTs, expected $n"

  R[$n,rss_pop]=$(rss_kb); R[$n,hwm_pop]=$(hwm_kb)
  R[$n,data_pop]=$(du -sb "$data" | awk '{print $1}')
  R[$n,size_metric]=$(metric idemproxy_store_size_bytes)
  log "after populate: VmRSS $(mb "${R[$n,rss_pop]}") MB, VmHWM $(mb "${R[$n,hwm_pop]}") MB, data dir $(mb $((${R[$n,data_pop]} / 1024))) MB (du -sb), idemproxy_store_size_bytes=${R[$n,size_metric]}"

  # clean restart
  stop_proxy TERM; rc=$?
  [[ $rc == 0 ]] || odd "$n" "clean stop (SIGTERM) exited $rc"
  R[$n,data_stop]=$(du -sb "$data" | awk '{print $1}')
  if start_proxy "$WORKDIR/always.toml" "$data" "$err-clean.log"; then
    R[$n,clean_ms]=$START_MS
    R[$n,rss_start]=$(rss_kb)
    log "clean restart (sync = \"always\"): ${START_MS} ms to 'listening on'; VmRSS $(mb "${R[$n,rss_start]}") MB; data dir after stop $(mb $((${R[$n,data_stop]} / 1024))) MB"
  else
    R[$n,clean_ms]=FAILED; odd "$n" "clean restart failed"; return 1
  fi
  sleep 1

  # unclean restart
  stop_proxy KILL
  if start_proxy "$WORKDIR/always.toml" "$data" "$err-unclean.log"; then
    R[$n,unclean_ms]=$START_MS
    log "unclean restart (SIGKILL, then start): ${START_MS} ms to 'listening on'"
  else
    R[$n,unclean_ms]=FAILED; odd "$n" "unclean restart failed"; return 1
  fi

  # replay
  local rep0 fwd0 h1 rep1 fwd1 h2
  if [[ "$WARMUP" != 0 && "$WARMUP" != 0s ]]; then
    run_wrk "$WORKDIR/wrk-warmup-$tag.txt" 120 -t1 -c"$CONNS" -d"$WARMUP" --timeout 10s \
          -s "$HERE/million.lua" "http://127.0.0.1:$PPORT/pay" -- replay "$n" 777
    IFS=$'\t' read -r _ req dur_us _ _ _ _ _ _ _ _ p99 _ <<<"$RES"
    log "replay warm-up ($WARMUP, not measured): $req requests, p99 $(awk -v u="${p99:-0}" 'BEGIN{printf "%.2f", u / 1000}') ms"
  fi
  rep0=$(metric 'idemproxy_requests_total{route="default",outcome="replayed"}')
  fwd0=$(metric 'idemproxy_requests_total{route="default",outcome="forwarded"}')
  h1=$(hits)
  local r p50 p90 p99 p999 mean rps tot_req=0 tot_status=0 tot_sock=0 rows=""
  for ((r = 1; r <= REPLAY_ROUNDS; r++)); do
    run_wrk "$WORKDIR/wrk-replay-$tag-$r.txt" 120 -t1 -c"$CONNS" -d"$DURATION" --timeout 10s \
          -s "$HERE/million.lua" "http://127.0.0.1:$PPORT/pay" -- replay "$n" "$((4242 + r))" || { odd "$n" "replay wrk failed (round $r)"; continue; }
    IFS=$'\t' read -r _ req dur_us e_conn e_read e_write e_status e_tmo mean p50 p90 p99 p999 _ _ <<<"$RES"
    rps=$(awk -v r="${req:-0}" -v d="${dur_us:-1}" 'BEGIN{printf "%.0f", r / (d / 1e6)}')
    tot_req=$((tot_req + req)); tot_status=$((tot_status + e_status)); tot_sock=$((tot_sock + e_conn + e_read + e_write + e_tmo))
    rows+="$rps $p50 $p99"$'\n'
    log "replay round $r/$REPLAY_ROUNDS: $req requests, $rps req/s, p50 $(awk -v u="$p50" 'BEGIN{printf "%.2f", u/1000}') ms, p90 $(awk -v u="$p90" 'BEGIN{printf "%.2f", u/1000}') ms, p99 $(awk -v u="$p99" 'BEGIN{printf "%.2f", u/1000}') ms, p99.9 $(awk -v u="$p999" 'BEGIN{printf "%.2f", u/1000}') ms, non2xx=$e_status sockerr=$((e_conn + e_read + e_write + e_tmo))"
  done
  rep1=$(metric 'idemproxy_requests_total{route="default",outcome="replayed"}')
  fwd1=$(metric 'idemproxy_requests_total{route="default",outcome="forwarded"}')
  sleep 0.2; h2=$(hits)
  # medians over the rounds (column by column)
  med() { awk -v c="$1" 'NF {print $c}' <<<"$rows" | sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2); else print 0}'; }
  R[$n,rep_rps]=$(med 1)
  R[$n,p50]=$(awk -v u="$(med 2)" 'BEGIN{printf "%.2f", u / 1000}')
  R[$n,p99us]=$(med 3)
  R[$n,p99]=$(awk -v u="${R[$n,p99us]}" 'BEGIN{printf "%.2f", u / 1000}')
  R[$n,rss_rep]=$(rss_kb); R[$n,hwm_rep]=$(hwm_kb)
  R[$n,replayed]=$((rep1 - rep0)); R[$n,up_hits]=$((h2 - h1))
  log "replay (median of $REPLAY_ROUNDS): ${R[$n,rep_rps]} req/s, p50 ${R[$n,p50]} ms, p99 ${R[$n,p99]} ms; $tot_req requests, replayed counter +$((rep1 - rep0)), forwarded +$((fwd1 - fwd0)), upstream hits +$((h2 - h1))"
  log "after replay: VmRSS $(mb "${R[$n,rss_rep]}") MB, VmHWM $(mb "${R[$n,hwm_rep]}") MB"
  # wrk's request count excludes requests cut off at the end of a run; the proxy's counter
  # may count those few too, so allow replayed >= requests
  (( rep1 - rep0 >= tot_req )) || odd "$n" "replay: only $((rep1 - rep0)) of $tot_req requests were replays"
  (( fwd1 > fwd0 )) && odd "$n" "replay: $((fwd1 - fwd0)) requests were forwarded (not replays)"
  (( h2 > h1 )) && odd "$n" "replay: the upstream got $((h2 - h1)) hits"
  (( tot_status > 0 )) && odd "$n" "replay: $tot_status non-2xx responses"
  (( tot_sock > 0 )) && odd "$n" "replay: $tot_sock socket errors"

  local warn
  warn=$(cat "$err"-*.log | grep -cE ' (WARN|ERROR) ')
  (( warn > 0 )) && odd "$n" "$warn WARN/ERROR lines in the proxy logs, e.g.: $(cat "$err"-*.log | grep -m1 -E ' (WARN|ERROR) ')"
  stop_proxy TERM; rc=$?
  [[ $rc == 0 ]] || odd "$n" "final stop (SIGTERM) exited $rc"
  R[$n,data_end]=$(du -sb "$data" | awk '{print $1}')
  if [[ "$KEEP" != 1 ]]; then rm -rf "$data"; fi
  return 0
}

T_START=$(date +%s)
log "BIN=$BIN N=$N BASE_N=$BASE_N scratch=$WORKDIR"
run_case "$BASE_N" || log "baseline case did not complete"
run_case "$N" || log "N=$N case did not complete"
T_TOTAL=$(( $(date +%s) - T_START ))

# ---------------------------------------------------------------- table
pf() { [[ "$1" == 1 ]] && echo PASS || echo FAIL; }
g() { echo "${R[$1,$2]:--}"; }
dmb() { local b=${R[$1,$2]:-}; [[ -n "$b" ]] && awk -v b="$b" 'BEGIN{printf "%.0f", b / 1048576}' || echo -; }
kmb() { local k=${R[$1,$2]:-}; [[ -n "$k" ]] && awk -v k="$k" 'BEGIN{printf "%.0f", k / 1024}' || echo -; }

TABLE="$WORKDIR/million.txt"
{
  echo "idemproxy sled store scaling — $(date -u +%Y-%m-%dT%H:%M:%SZ), BIN=$BIN ($(stat -c %Y "$BIN" | xargs -I{} date -u -d @{} +%Y-%m-%dT%H:%MZ) mtime), $(nproc) cores, total ${T_TOTAL}s"
  echo "populate: sync=\"periodic\" (speed only; identical records), wrk -t1 -c$POP_CONNS; restarts and replay: sync=\"always\"; replay: wrk -t1 -c$CONNS -d$DURATION x$REPLAY_ROUNDS (medians) after ${WARMUP} warm-up, random keys"
  echo "RSS in MB (VmRSS; HWM = VmHWM peak); data dir in MB (du -sb) after populate / after final stop"
  echo
  printf '%-9s %8s %8s %9s %12s %8s %11s %10s %11s %9s %8s %8s %7s\n' \
    records stored pop_s pop_req/s "RSS pop/HWM" "RSS rep" "data MB" clean_ms unclean_ms rep_req/s p50_ms p99_ms up_hits
  for n in "$BASE_N" "$N"; do
    printf '%-9s %8s %8s %9s %12s %8s %11s %10s %11s %9s %8s %8s %7s\n' \
      "$n" "$(g "$n" stored)" "$(g "$n" pop_s)" "$(g "$n" pop_rps)" "$(kmb "$n" rss_pop)/$(kmb "$n" hwm_pop)" \
      "$(kmb "$n" rss_rep)" "$(dmb "$n" data_pop)/$(dmb "$n" data_end)" "$(g "$n" clean_ms)" "$(g "$n" unclean_ms)" \
      "$(g "$n" rep_rps)" "$(g "$n" p50)" "$(g "$n" p99)" "$(g "$n" up_hits)"
  done
  echo
  ratio=$(awk -v a="${R[$N,p99us]:-0}" -v b="${R[$BASE_N,p99us]:-0}" 'BEGIN{ if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }')
  rss_max=$(printf '%s\n' "${R[$N,rss_pop]:-0}" "${R[$N,hwm_pop]:-0}" "${R[$N,rss_rep]:-0}" "${R[$N,hwm_rep]:-0}" | sort -n | tail -1)
  data_max=$(printf '%s\n' "${R[$N,data_pop]:-0}" "${R[$N,data_stop]:-0}" "${R[$N,data_end]:-0}" | sort -n | tail -1)
  ok() { awk "BEGIN{ exit !($1) }" && echo 1 || echo 0; }
  echo "targets at $N records:"
  [[ -n "${R[$N,rss_rep]:-}" ]] && v=$(ok "$rss_max <= $T_RSS_MB * 1024") || v=0
  printf '  %-48s %-26s %s\n' "RSS (max of populate, replay, VmHWM) <= ${T_RSS_MB} MB" "$(mb "$rss_max") MB" "$(pf "$v")"
  [[ -n "${R[$N,data_end]:-}" ]] && v=$(ok "$data_max <= $T_DATA_MB * 1048576") || v=0
  printf '  %-48s %-26s %s\n' "data dir (max seen) <= 1 GB" "$(awk -v b="$data_max" 'BEGIN{printf "%.1f", b/1048576}') MB" "$(pf "$v")"
  c=${R[$N,clean_ms]:-FAILED}; [[ "$c" =~ ^[0-9]+$ ]] && v=$(ok "$c <= $T_RESTART_MS") || v=0
  printf '  %-48s %-26s %s\n' "clean restart to 'listening on' <= ${T_RESTART_MS} ms" "$c ms" "$(pf "$v")"
  c=${R[$N,unclean_ms]:-FAILED}; [[ "$c" =~ ^[0-9]+$ ]] && v=$(ok "$c <= $T_RESTART_MS") || v=0
  printf '  %-48s %-26s %s\n' "unclean restart (SIGKILL) <= ${T_RESTART_MS} ms" "$c ms" "$(pf "$v")"
  [[ "$ratio" != - ]] && v=$(ok "$ratio <= $T_P99_RATIO") || v=0
  printf '  %-48s %-26s %s\n' "replay p99(${N})/p99(${BASE_N}) <= ${T_P99_RATIO}" "$ratio ($(g "$N" p99) / $(g "$BASE_N" p99) ms)" "$(pf "$v")"
  v=1; for n in "$BASE_N" "$N"; do [[ "${R[$n,up_hits]:-x}" == 0 && "${R[$n,stored]:-x}" == "$n" ]] || v=0; done
  printf '  %-48s %-26s %s\n' "all records stored, replays hit no upstream" "" "$(pf "$v")"
  if ((${#ODD[@]})); then
    echo; echo "odd:"; printf '  %s\n' "${ODD[@]}"
  fi
} >"$TABLE"
echo
cat "$TABLE"
if [[ -n "$RESULTS_DIR" ]]; then
  mkdir -p "$RESULTS_DIR" && cp "$TABLE" "$RESULTS_DIR/million.txt" && log "table written to $RESULTS_DIR/million.txt"
fi
