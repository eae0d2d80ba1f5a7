#!/usr/bin/env bash
# The network front under load (release build): wrk over HTTP (32 connections, a small OIP JSON
# request) and h2load over gRPC (8 connections × 16 streams, ModelInfer), against the echo model with
# 2 workers, load generator on the same machine. Prints req/s, p50 and p99 for each, then the same
# loads against the same server started with --benchmark-echo (items answered in Swift, no Python):
# the front's own ceiling on this machine, to read the first lines against. Each line also gives the
# CPU time per request of the server process and of its Python workers. Then the echo handler
# embedded (executor: embedded: CPython inside the server), and the no-Python Hummingbird echo of
# ../shared/bench/peers before and after everything (the HTTP ceiling of the stack itself). Each
# server also gets one connection alone (wrk -c1): the idle request's latency.
#
#   scripts/bench-front.sh            # DUR=10 seconds per load by default
#   SIDECAR_BIN=/other/sidecar RUNS="sidecar" scripts/bench-front.sh   # another build, some runs only
#
# Needs wrk and h2load (Debian: wrk, nghttp2-client) and installs them if missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
D=${DUR:-10}
HTTP_PORT=${HTTP_PORT:-18100}
GRPC_PORT=${GRPC_PORT:-18101}

command -v wrk >/dev/null && command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nghttp2-client >/dev/null; }
bin=${SIDECAR_BIN:-}
[ -n "$bin" ] || { swift build -c release --product sidecar >/dev/null; bin=.build/release/sidecar; }
runs=${RUNS:-limit front-alone embedded sidecar front-alone limit}
venv="$root/.build/e2e-venv"
[ -x "$venv/bin/python" ] || /usr/bin/python3.11 -m venv "$venv"
"$venv/bin/python" -c "import tritonclient.grpc, numpy" 2>/dev/null || "$venv/bin/pip" install -q "tritonclient[grpc]" numpy

work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
"$venv/bin/python" scripts/bench/grpc_body.py echo "$work/body"

# CPU time (clock ticks) of the server and of its worker processes, for CPU per request.
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
worker_ticks() { local t=0 p; for p in $(pgrep -P "$server"); do t=$((t + $(ticks "$p"))); done; echo $t; }
cpu_per_request() { # server-ticks-before workers-ticks-before requests
  awk -v s=$(( $(ticks "$server") - $1 )) -v w=$(( $(worker_ticks) - $2 )) -v n="$3" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (n > 0) printf "cpu/request: server=%.0fus workers=%.0fus", s / hz * 1e6 / n, w / hz * 1e6 / n }'
}

# One server, both loads; $1 labels the lines, $2 is the model directory, the rest are extra
# `sidecar serve` arguments.
measure() {
  local label=$1 model=$2; shift 2
  "$bin" serve "$model" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --no-admin --log-level warning "$@" >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/v2/health/ready" && break; sleep 0.5; done
  curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/v2/health/ready" || { echo "server not ready"; cat "$work/server.log"; exit 1; }
  # Warm up both paths.
  wrk -t1 -c32 -d2s -s scripts/bench/infer.lua "http://127.0.0.1:$HTTP_PORT/v2/models/echo/infer" >/dev/null 2>&1
  h2load -D 2 -c 8 -m 16 -d "$work/body" -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$GRPC_PORT/inference.GRPCInferenceService/ModelInfer" >/dev/null 2>&1
  local out rps p50 p99 non ok failed lat s0 w0
  s0=$(ticks "$server"); w0=$(worker_ticks)
  out=$(wrk -t1 -c32 -d${D}s -s scripts/bench/infer.lua --latency "http://127.0.0.1:$HTTP_PORT/v2/models/echo/infer" 2>&1)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); p50=$(echo "$out" | awk '$1=="50%" {print $2}'); p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  non=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  echo "$label http  wrk 32 connections       req/s=$rps p50=$p50 p99=$p99 non-2xx=${non:-0} $(cpu_per_request $s0 $w0 "$(echo "$out" | awk '/requests in/ {print $1}')")"
  s0=$(ticks "$server"); w0=$(worker_ticks)
  out=$(h2load -D ${D} -c 8 -m 16 -d "$work/body" -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$GRPC_PORT/inference.GRPCInferenceService/ModelInfer" 2>&1)
  rps=$(echo "$out" | grep -E 'finished in' | sed 's/.*, \([0-9.]*\) req\/s.*/\1/')
  ok=$(echo "$out" | awk '/^requests:/ {print $8}'); failed=$(echo "$out" | awk '/^requests:/ {print $10}')
  lat=$(echo "$out" | awk '/^time for request:/ {print "min="$4" max="$5" mean="$6}')
  echo "$label grpc  h2load 8 conns × 16 streams req/s=$rps succeeded=$ok failed=$failed time-for-request: $lat $(cpu_per_request $s0 $w0 "$ok")"
  out=$(wrk -t1 -c1 -d$(( D < 5 ? D : 5 ))s -s scripts/bench/infer.lua --latency "http://127.0.0.1:$HTTP_PORT/v2/models/echo/infer" 2>&1)
  echo "$label http  wrk 1 connection (idle)   req/s=$(echo "$out" | awk '/Requests\/sec/ {print $2}') p50=$(echo "$out" | awk '$1=="50%" {print $2}') p99=$(echo "$out" | awk '$1=="99%" {print $2}')"
  curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v l="$label" '/^sidecar_batch_size_(sum|count)\{model="echo"\}/ {v[$1]=$2} END {for (k in v) s=s" "k"="v[k]; print l" batches:" s}'
  kill $server; wait $server 2>/dev/null; server=
}

# The no-Python Hummingbird echo (../shared/bench/peers' "limit"): the same JSON decoded and
# re-encoded by Hummingbird alone, on port 18110.
limit_src="$root/../shared/bench/limit"
limit() {
  [ -d "$limit_src" ] || { echo "hummingbird-echo: $limit_src not found, skipped"; return; }
  local build="$root/.build-limit"
  mkdir -p "$build/src" && cp -r "$limit_src/." "$build/src/"
  (cd "$build/src" && swift build -c release >/dev/null 2>&1) || { echo "hummingbird-echo: build failed"; return; }
  "$build/src/.build/release/hello" >"$work/limit.log" 2>&1 &
  server=$!
  sleep 2
  wrk -t1 -c32 -d2s -s scripts/bench/infer.lua "http://127.0.0.1:18110/v2/models/echo/infer" >/dev/null 2>&1
  local out
  out=$(wrk -t1 -c32 -d${D}s -s scripts/bench/infer.lua --latency "http://127.0.0.1:18110/v2/models/echo/infer" 2>&1)
  echo "hummingbird-echo http  wrk 32 connections req/s=$(echo "$out" | awk '/Requests\/sec/ {print $2}') p50=$(echo "$out" | awk '$1=="50%" {print $2}') p99=$(echo "$out" | awk '$1=="99%" {print $2}') (no Sidecar, no Python: the stack's ceiling)"
  kill $server; wait $server 2>/dev/null; server=
}

# The echo handler embedded: the same directory with executor: embedded.
mkdir -p "$work/echo-embedded"
cp Examples/echo/handler.py "$work/echo-embedded/"
sed -e 's/^workers:.*/workers: 1/' Examples/echo/sidecar.yaml > "$work/echo-embedded/sidecar.yaml"
echo "executor: embedded" >> "$work/echo-embedded/sidecar.yaml"

echo "Sidecar front benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, echo model, ${D}s per load"
echo "targets: HTTP ≥ 24000 req/s with p99 ≤ 5 ms; gRPC ≥ 30000 req/s; embedded HTTP ≥ 0.8 × hummingbird-echo, idle p50 within 0.2 ms of front-alone"
# Every item answered in Swift (--benchmark-echo, front-alone): the front and the batcher alone,
# no Python. The ceiling the Python lines sit under on this machine, today; measured first and last.
for run in $runs; do
  case $run in
    limit) limit ;;
    front-alone) measure front-alone Examples/echo --workers 2 --benchmark-echo ;;
    embedded) measure embedded "$work/echo-embedded" ;;
    sidecar) measure sidecar Examples/echo --workers 2 ;;
    *) echo "unknown run '$run' (limit, front-alone, embedded, sidecar)"; exit 2 ;;
  esac
done
