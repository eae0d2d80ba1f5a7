#!/usr/bin/env bash
# Runs every test: the Python worker runtime's pytest suite, then the Swift tests (which start real
# Python worker processes). Installs what it needs first.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

scripts/bootstrap.sh
# redis-server: the inbox/outbox tests (Swift and end-to-end) start their own.
scripts/install-broker-tools.sh

# The runtime's tests run in their own venv from the same interpreter the workers use.
venv="$root/.build/pytest-venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r python/runtime-requirements.txt pytest numpy mypy types-protobuf grpc-stubs
echo "== mypy: python/sidecar_worker"
(cd python && "$venv/bin/python" -m mypy sidecar_worker)
echo "== pytest: python/tests"
(cd python && "$venv/bin/python" -m pytest -q tests)

echo "== swift test"
swift build --build-tests
swift test --skip-build "$@"

# The network front as its users meet it: a real `sidecar serve`, called by the stock Open
# Inference Protocol client from PyPI (tritonclient, HTTP and gRPC), grpc health and curl.
e2e="$root/.build/e2e-venv"
if [ ! -x "$e2e/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$e2e"
fi
"$e2e/bin/pip" install -q --disable-pip-version-check "tritonclient[http,grpc]" grpcio-health-checking numpy pytest pyyaml redis hiredis
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
# openssl: Tests/e2e/certs.py makes the TLS tests' CA and certificates with it.
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
# Many nodes: each in its own network namespace, the repository behind nginx, haproxy in front
# (Tests/e2e/cluster.py). CI runs as root, so the namespace version must run, not the loopback fallback.
scripts/install-cluster-tools.sh
echo "== pytest: Tests/e2e (sidecar serve + tritonclient + curl; nodes in namespaces behind haproxy)"
SIDECAR_CLUSTER_NETNS="${SIDECAR_CLUSTER_NETNS:-1}" SIDECAR_BIN="$root/.build/debug/sidecar" "$e2e/bin/python" -m pytest -q Tests/e2e

# The Kubernetes image and manifests, offline: schemas (kubernetes-validate --strict), and ports,
# probe paths, flags and selectors against the real server started from the ConfigMap.
echo "== deploy/kubernetes (scripts/check-kubernetes.sh)"
SIDECAR_BIN="$root/.build/debug/sidecar" scripts/check-kubernetes.sh

# Every decoder of outside data, fuzzed: the committed corpora and past crashes replayed, then a
# short coverage-guided run per target (libFuzzer + ASan for Swift, atheris for the Python worker).
# Longer runs: scripts/fuzz.sh [TARGET] [SECONDS].
echo "== fuzz: replay + ${SIDECAR_FUZZ_SECONDS:-10} s per target (scripts/fuzz.sh)"
scripts/fuzz.sh all "${SIDECAR_FUZZ_SECONDS:-10}"
