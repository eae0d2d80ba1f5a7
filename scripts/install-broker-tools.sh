#!/usr/bin/env bash
# Installs what the Redis Streams inbox/outbox needs from Debian: redis-server (the broker the
# end-to-end tests, Tests/e2e/test_inbox.py, and scripts/bench-inbox.py start on their own ports;
# it brings redis-cli) and libhiredis-dev (the C client library the Swift build links). Safe to run
# again: it installs only what is missing, and prints nothing when nothing is.
#
# The package's maintainer scripts would start the system redis-server on port 6379; nothing here
# uses it, so a policy-rc.d keeps services from starting during the install (only when the machine
# has none of its own).
set -euo pipefail

missing=()
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
command -v redis-cli >/dev/null || [ -x /usr/bin/redis-cli ] || missing+=(redis-tools)
if ! { [ -f /usr/include/hiredis/hiredis.h ] && dpkg-query -W -f='${Status}' libhiredis-dev 2>/dev/null | grep -q "install ok installed"; }; then
  missing+=(libhiredis-dev)
fi

[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-broker-tools: installing ${missing[*]}" >&2
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)

policy=/usr/sbin/policy-rc.d
made_policy=no
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# install-broker-tools.sh: no service starts during the install\nexit 101\n' \
    | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 755 "$policy"
  made_policy=yes
fi
cleanup() { [ "$made_policy" = yes ] && "${sudo[@]}" rm -f "$policy"; true; }
trap cleanup EXIT

"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
