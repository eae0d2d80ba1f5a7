#!/usr/bin/env bash
# Runs every test: the Python worker runtime's pytest suite, then the Swift tests (which start real
# Python worker processes). Installs what it needs first.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

scripts/bootstrap.sh

# The runtime's tests run in their own venv from the same interpreter the workers use.
venv="$root/.build/pytest-venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r python/runtime-requirements.txt pytest numpy
echo "== pytest: python/tests"
(cd python && "$venv/bin/python" -m pytest -q tests)

echo "== swift test"
swift build --build-tests
swift test --skip-build "$@"
