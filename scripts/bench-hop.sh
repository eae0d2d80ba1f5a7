#!/usr/bin/env bash
# The worker hop against the transport's floor (issue 16), one run, release builds:
#  1. Sidecar itself: the library API (sidecar-bench) on Examples/echo with one process worker,
#     a lone caller (1-item batches) and 1024-item calls; CPU per batch of the server (this
#     process: batcher, session, gRPC client) and of the worker (Python: runtime, codec, grpc.aio).
#  2. The floor: a bare grpc-swift-2 client (sidecar-hop-floor, no Sidecar code) streaming batches
#     of the sizes Sidecar formed, two in flight (Sidecar's window), to a bare grpcio server
#     speaking worker.proto (scripts/bench/hop_floor_server.py, no Sidecar code: it echoes each
#     batch), with grpcio's synchronous API and with grpc.aio; CPU per batch on each side.
#  3. Sidecar again (the host drifts: read each side against the floor beside it).
#
#   scripts/bench-hop.sh          # SECONDS_EACH=5
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
S=${SECONDS_EACH:-5}
swift build -c release --product sidecar-bench >/dev/null
swift build -c release --product sidecar-hop-floor >/dev/null
venv="$root/.build/e2e-venv"
[ -x "$venv/bin/python" ] || /usr/bin/python3.11 -m venv "$venv"
"$venv/bin/python" -c "import grpc, google.protobuf" 2>/dev/null || "$venv/bin/pip" install -q -r python/runtime-requirements.txt
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

sidecar() {
  .build/release/sidecar-bench --models 'echo=Examples/echo={"x": 1.5, "id": 7}' --workers 1 --executors process \
    --batch-sizes 1024 --seconds "$S" 2>/dev/null | tee "$work/sidecar.txt" | grep -E '^\| (executor|1 process)'
}
echo "== Sidecar: library API, echo, 1 process worker"
sidecar
# The batch sizes Sidecar formed (mean batch column), for the floor to send the same.
sizes=$(awk -F'|' '/^\| 1 process/ {gsub(/ /, "", $5); printf "%s%s", sep, $5; sep=","}' "$work/sidecar.txt")
echo "== floor: bare grpc-swift-2 client → bare grpcio server, batches of $sizes items, 2 in flight"
for api in sync aio; do
  rm -f "$work/floor.sock"
  "$venv/bin/python" scripts/bench/hop_floor_server.py --socket "$work/floor.sock" --api $api &
  server=$!
  for _ in $(seq 100); do [ -S "$work/floor.sock" ] && break; sleep 0.1; done
  .build/release/sidecar-hop-floor --socket "$work/floor.sock" --server-pid "$server" --items "$sizes" --seconds "$S" --label "floor-$api"
  kill "$server"; wait "$server" 2>/dev/null || true; server=
done
echo "== Sidecar again"
sidecar
