#!/usr/bin/env bash
# Goodput under overload (release build, HTTP/1.1 OIP JSON, h2load): a model's capacity is measured
# first (closed loop at its 1× connection count), then it is offered 2×, 5× and 10× of it, closed
# loop (that many times the connections, each sending again as soon as it is answered, refused or
# not) and open loop (h2load --rps: a fixed rate spread over 10× the connections, whatever the
# answers). Each line prints goodput (200s per second) and its ratio to the capacity, refusals (429)
# and other failures per second, the p50/p99 of accepted requests (h2load's own per-request log,
# client side), the same for a light probe client beside the load (4 connections at 25 req/s on
# core 0: the loaded generator's own queueing inflates what it measures at 10×, the probe's does
# not), the server's CPU (% of one core, the server and its workers apart) and RSS. After
# the 10× loads, a probe (one connection, 100 req/s) measures how long until every request is
# accepted again within 2 × the 1× p99: the time to return to normal.
#
# Two models (scripts/bench/models/): `slow` (10 ms per batch of 8, 2 workers, max_queue 64:
# capacity 1,600/s by construction) and `echo` (CPU-bound: what two shared cores give).
# Placement: the load generator is one h2load thread pinned to core 1 (`taskset -c 1`); the server
# and its workers may run on both cores, so they share core 1 with it.
#
#   scripts/bench-overload.sh [slow|echo|all]     # DUR=10 seconds per load by default
#   SIDECAR_BIN=/other/sidecar scripts/bench-overload.sh slow
#   TARGET_MS=20 scripts/bench-overload.sh slow   # the model with batching.target_queue_delay_ms: 20
#   EXTRA="--config overload.yaml" scripts/bench-overload.sh   # more `sidecar serve` arguments
#
# Needs h2load (Debian: nghttp2-client) and installs it if missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
D=${DUR:-10}
PORT=${HTTP_PORT:-18120}
which=${1:-all}

command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
bin=${SIDECAR_BIN:-}
[ -n "$bin" ] || { swift build -c release --product sidecar >/dev/null; bin=.build/release/sidecar; }
py=python3
stats="$root/scripts/bench/overload_stats.py"
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
printf '%s' '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}' >"$work/body"

ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
worker_ticks() { local t=0 p; for p in $(pgrep -P "$server"); do t=$((t + $(ticks "$p"))); done; echo $t; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
now_us() { date +%s%6N; }

# h2load over HTTP/1.1 on core 1; $1 = log file, the rest are h2load's load arguments.
load() {
  local log=$1; shift
  taskset -c 1 h2load --h1 -t1 "$@" -d "$work/body" -H 'content-type: application/json' --log-file "$log" \
    "http://127.0.0.1:$PORT/v2/models/$model/infer" >"$log.out" 2>&1 || true
}

# One load level: $1 label, $2 ratio label, the rest h2load arguments. Prints the line; sets
# $goodput and $p99 for the caller.
level() {
  local label=$1; shift
  local log="$work/$model-$label.log" s0 w0 t0 t1 line
  rm -f "$log"
  s0=$(ticks "$server"); w0=$(worker_ticks); t0=$(now_us)
  # The probe: 4 connections at 25 req/s each, on core 0, beside the load. The load generator is
  # saturated at 10× (its own queueing adds to what it measures); the probe's client is not, so
  # its accepted requests' latency is what a caller sees from the server.
  (sleep 1; taskset -c 0 h2load --h1 -t1 -c4 --rps 25 -D $((D - 2)) -d "$work/body" -H 'content-type: application/json' \
    --log-file "$log.probe" "http://127.0.0.1:$PORT/v2/models/$model/infer" >/dev/null 2>&1) &
  local probe=$!
  load "$log" "$@"
  wait $probe 2>/dev/null || true
  t1=$(now_us)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e6 }')  # for CPU %
  line=$($py "$stats" load "$log")
  local probe_line; probe_line=$($py "$stats" load "$log.probe" 2>/dev/null | sed 's/.*p50_ms=\([0-9.na]*\) p99_ms=\([0-9.na]*\).*/probe_p50_ms=\1 probe_p99_ms=\2/')
  goodput=$(echo "$line" | sed 's/.*goodput=\([0-9]*\).*/\1/')
  p99=$(echo "$line" | sed 's/.*p99_ms=\([0-9.na]*\).*/\1/')
  local cpu; cpu=$(awk -v s=$(( $(ticks "$server") - s0 )) -v w=$(( $(worker_ticks) - w0 )) -v t="$secs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "server_cpu=%.0f%% workers_cpu=%.0f%%", s / hz / t * 100, w / hz / t * 100 }')
  local ratio=""
  [ -n "${capacity:-}" ] && ratio=$(awk -v g="$goodput" -v c="$capacity" 'BEGIN { printf " goodput/capacity=%.2f", g / c }')
  echo "$model $label $line$ratio $probe_line $cpu rss=$(rss_mb "$server")MB"
  probe_p99=$(echo "$probe_line" | sed 's/.*probe_p99_ms=//')
  last_end=$t1
}

recovery() {
  local log="$work/$model-probe.log" limit
  limit=$(awk -v p="$base_p99" 'BEGIN { printf "%.2f", 2 * p }')
  load "$log" -c1 --rps 100 -D 3
  echo "$model after 10x: $($py "$stats" recovery "$log" --since "$last_end" --limit-ms "$limit") (normal: accepted within ${limit} ms, 2 × the 1× p99)"
}

run_model() {
  model=$1
  local dir="scripts/bench/models/overload_$model" base=$2
  if [ -n "${TARGET_MS:-}" ]; then
    # Adaptive admission: the same model with a queue-delay target (its batching block is last).
    rm -rf "$work/model"; cp -r "$dir" "$work/model"; dir="$work/model"
    echo "  target_queue_delay_ms: $TARGET_MS" >>"$dir/sidecar.yaml"
    echo "$model: adaptive admission, batching.target_queue_delay_ms=$TARGET_MS"
  fi
  "$bin" serve "$dir" --http-port "$PORT" --grpc-port $((PORT + 1)) --no-admin --log-level warning ${EXTRA:-} >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" && break; sleep 0.5; done
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" || { echo "server not ready"; cat "$work/server.log"; exit 1; }
  load "$work/warm.log" -c "$base" -D 2
  capacity=
  level "1x-closed-c$base" -D "$D" -c "$base"
  capacity=$goodput
  base_p99=$p99
  echo "$model capacity=$capacity req/s (goodput at $base connections), accepted p99 at 1x=${base_p99} ms (probe: ${probe_p99} ms)"
  for k in 2 5 10; do
    level "${k}x-closed-c$((k * base))" -D "$D" -c $((k * base))
  done
  recovery
  # Open loop: k × capacity requests per second from 10× the connections, each at its share of the
  # rate. The connections are opened a few at a time over one period of their rate, so their sends
  # are spread evenly (opened at once, every connection would send in the same instant: bursts of
  # hundreds that no queue absorbs, which is a test of the load generator, not of the server).
  local clients=$((10 * base))
  for k in 1 2 5 10; do
    local rps period total
    rps=$(awk -v k="$k" -v c="$capacity" -v n="$clients" 'BEGIN { printf "%.3f", k * c / n }')
    period=$(awk -v r="$rps" -v n="$clients" 'BEGIN { p = 4 * 1000 / r / n; printf "%d", (p < 1 ? 1 : p) }')
    total=$(( k * capacity * D ))
    level "${k}x-open-rate$((k * capacity))" -c "$clients" --rps "$rps" -r 4 --rate-period "${period}ms" -n "$total"
  done
  recovery
  curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$model" '/^sidecar_batch_size_(sum|count)\{/ {v[$1]=$2} END {for (k in v) s=s" "k"="v[k]; print m" batches:" s}'
  kill $server; wait $server 2>/dev/null || true; server=
}

case "$which" in
  slow) run_model slow 64 ;;
  echo) run_model echo 64 ;;
  all) run_model slow 64; run_model echo 64 ;;
  *) echo "usage: $0 [slow|echo|all]" >&2; exit 2 ;;
esac
