#!/usr/bin/env bash
# Installs what Sidecar needs on a fresh Debian machine (Swift itself is expected on PATH):
# the system Python's venv module (worker environments), libpython (the embedded path) and
# hiredis (the Redis Streams inbox).
# Safe to run again: it installs only what is missing.
set -euo pipefail

missing=()
/usr/bin/python3.11 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3.11-venv python3-venv)
[ -e /usr/lib/x86_64-linux-gnu/libpython3.11.so ] || dpkg -s libpython3.11-dev >/dev/null 2>&1 || missing+=(libpython3.11-dev)
command -v /usr/bin/python3.11 >/dev/null || missing+=(python3.11)
# The build finds libpython's headers through pkg-config (the CPython system-library target).
command -v pkg-config >/dev/null || missing+=(pkgconf)
# The inbox/outbox front links Debian's hiredis (the CHiredis system-library target).
[ -f /usr/include/hiredis/hiredis.h ] || missing+=(libhiredis-dev)

if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
command -v swift >/dev/null || { echo "bootstrap: swift is not on PATH; install Swift 6.2 or later" >&2; exit 1; }
