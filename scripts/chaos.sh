#!/usr/bin/env bash
# Fault injection against `sidecar serve`: kill -9 and SIGSTOP of workers under load, poison items,
# a model whose restarts fail, SIGKILL and SIGTERM of the server, overload. Prints one table:
# scenario | sent | ok | failed | rejected | lost | notes. Exit code 0 when every scenario passed.
#
#   scripts/chaos.sh                    # all scenarios, against a release build made here
#   scripts/chaos.sh kill9 overload     # some of them
#   SIDECAR_BIN=.build/debug/sidecar scripts/chaos.sh   # an existing binary, nothing is built
#
# The scenarios live in scripts/chaos.py (Tests/e2e/test_faults.py runs the same ones).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ -z "${SIDECAR_BIN:-}" ]; then
  scripts/bootstrap.sh
  swift build -c release --product sidecar
  SIDECAR_BIN="$root/.build/release/sidecar"
fi

# The same venv as the end-to-end tests; chaos.py itself needs only the standard library and PyYAML.
venv="$root/.build/e2e-venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check pyyaml

export SIDECAR_BIN
export SIDECAR_CACHE_DIR="${SIDECAR_CACHE_DIR:-$root/.build/test-cache}"
exec "$venv/bin/python" scripts/chaos.py "$@"
