#!/usr/bin/env bash
# What the edge costs (release build), one run, each figure beside its ceiling:
#  1. Small OIP requests (wrk, 32 keep-alive connections, echo model, 2 workers) with the edge off,
#     TLS on, API keys on, both on, and off again (the ceiling before and after); then 8 clients
#     opening a new connection per request, plain and TLS (the handshake's cost).
#  2. A latency budget: a primary slowed to 200 ms per batch, called by 8 closed-loop clients,
#     without a fallback and with `fallback: {model: edge_popular, after_ms: 50}`: p50/p99 the caller sees.
#
#   scripts/bench-edge.sh           # DUR=10 seconds per load
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
D=${DUR:-10}
HTTP_PORT=${HTTP_PORT:-18200}
GRPC_PORT=${GRPC_PORT:-18201}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
bin=${SIDECAR_BIN:-}
[ -n "$bin" ] || { swift build -c release --product sidecar >/dev/null; bin=.build/release/sidecar; }

work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/server.key" -out "$work/server.crt" -days 1 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
KEY=bench-key-0123456789
printf 'keys:\n  - name: bench\n    sha256: %s\n' "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" >"$work/keys.yaml"
for i in $(seq 1 20); do printf '  - name: other%s\n    sha256: %s\n' "$i" "$(printf %s "other$i" | sha256sum | cut -d' ' -f1)" >>"$work/keys.yaml"; done
printf '' >"$work/off.yaml"
printf 'tls: {cert_file: server.crt, key_file: server.key}\n' >"$work/tls.yaml"
printf 'auth: {keys_file: keys.yaml}\n' >"$work/keys-on.yaml"
printf 'tls: {cert_file: server.crt, key_file: server.key}\nauth: {keys_file: keys.yaml}\n' >"$work/both.yaml"
declare -A closes_done
cat >"$work/close.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Connection"] = "close"
LUA
cat >"$work/predict.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"instances":[1]}'
wrk.headers["Content-Type"] = "application/json"
LUA

start() { # config models...
  local config=$1; shift
  "$bin" serve "$@" --config "$work/$config" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --no-admin --log-level warning >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -skf -o /dev/null "http://127.0.0.1:$HTTP_PORT/v2/health/ready" && break; curl -skf -o /dev/null "https://127.0.0.1:$HTTP_PORT/v2/health/ready" && break; sleep 0.5; done
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
line() { # label wrk-output [server-ticks-before]
  local out=$2 cpu=""
  if [ -n "${3:-}" ]; then
    cpu=$(awk -v t=$(( $(ticks "$server") - $3 )) -v n="$(echo "$out" | awk '/requests in/ {print $1}')" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { if (n > 0) printf " server-cpu/request=%.0fus", t / hz * 1e6 / n }')
  fi
  echo "$1$cpu req/s=$(echo "$out" | awk '/Requests\/sec/ {print $2}') p50=$(echo "$out" | awk '$1=="50%" {print $2}') p99=$(echo "$out" | awk '$1=="99%" {print $2}') non-2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}' | grep . || echo 0) errors=$(echo "$out" | awk '/Socket errors/ {print $0}' | grep . || echo none)"
}

echo "== small requests: echo, 2 workers, wrk 32 keep-alive connections, ${D}s each (twice round, then off again)"
for mode in off tls keys-on both off tls keys-on both off; do
  scheme=http; [[ $mode == tls || $mode == both ]] && scheme=https
  header=(); [[ $mode == keys-on || $mode == both ]] && header=(-H "Authorization: Bearer $KEY")
  start "$mode.yaml" Examples/echo
  url="$scheme://127.0.0.1:$HTTP_PORT/v2/models/echo/infer"
  wrk -t1 -c32 -d2s -s scripts/bench/infer.lua "${header[@]}" "$url" >/dev/null 2>&1
  t0=$(ticks "$server")
  out=$(wrk -t1 -c32 -d${D}s -s scripts/bench/infer.lua --latency "${header[@]}" "$url" 2>&1)
  line "$(printf '%-8s' "$mode")" "$out" "$t0"
  if [[ $mode == off || $mode == tls ]] && [ -z "${closes_done[$mode]:-}" ]; then
    closes_done[$mode]=1
    # wrk counts each close by the server (Connection: close) as a read error.
    t0=$(ticks "$server")
    out=$(wrk -t1 -c8 -d${D}s -s "$work/close.lua" --latency "$url" 2>&1)
    line "$(printf '%-8s' "$mode") new connection per request (8 clients)" "$out" "$t0"
  fi
  stop
done

echo "== latency budget: primary 200 ms per batch, 2 workers, 8 closed-loop clients, ${D}s each"
start off.yaml scripts/bench/models/edge_slow scripts/bench/models/edge_slow_budget scripts/bench/models/edge_popular
for model in edge_slow edge_slow_budget; do
  url="http://127.0.0.1:$HTTP_PORT/v1/models/$model:predict"
  line "$(printf '%-17s' "$model")" "$(wrk -t1 -c8 -d${D}s -s "$work/predict.lua" --latency "$url" 2>&1)"
done
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep '^sidecar_fallback_total{model="edge_slow_budget",reason="timeout"}' || true
stop
