#!/usr/bin/env bash
# Checks deploy/kubernetes offline: renders the kustomize base and overlays, validates every
# document with `kubernetes-validate --strict`, checks the manifests and the Dockerfile against each
# other and against the real server (started from the ConfigMap's config and the Deployment's args
# on loopback ports, its probe paths and grpc.health.v1 asked). scripts/check_kubernetes.py says
# what exactly; it exits non-zero with one line per mismatch.
#
#   scripts/check-kubernetes.sh                 # needs .build/debug/sidecar (swift build --product sidecar)
#   SIDECAR_BIN=.build/release/sidecar scripts/check-kubernetes.sh
#   K8S_VERSIONS="1.30.0 1.37.0" scripts/check-kubernetes.sh   # the schemas kubernetes-validate uses
#   K8S_CHECK_RENDERER=fallback scripts/check-kubernetes.sh      # render without kubectl/kustomize
#
# Installs what it needs, once: kubernetes-validate (which ships the Kubernetes schemas), PyYAML and
# grpcio-health-checking from PyPI into .build/k8s-venv. Kustomize: `kubectl kustomize` (or
# `kustomize build`) when on PATH — neither is in Debian 12 in a version that knows `patches:`, and
# no release binary can be downloaded here — cross-checked against the small renderer in
# check_kubernetes.py, which renders alone where neither exists.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

venv="$root/.build/k8s-venv"
requirements="kubernetes-validate==1.37.0 PyYAML==6.0.4 grpcio-health-checking==1.85.1"
stamp="$venv/.installed"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ]; then
  echo "check-kubernetes: installing $requirements into $venv" >&2
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $requirements
  echo "$requirements" > "$stamp"
fi

export SIDECAR_BIN="${SIDECAR_BIN:-$root/.build/debug/sidecar}"
exec "$venv/bin/python" "$root/scripts/check_kubernetes.py" "$@"
