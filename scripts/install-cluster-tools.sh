#!/usr/bin/env bash
# Installs what the many-nodes end-to-end tests (Tests/e2e/cluster.py, test_repository.py) use from
# Debian: nginx (the model repository's web server), haproxy (the load balancer in front of the
# nodes) and iproute2 (`ip netns`, veth, bridge). Safe to run again: it installs only what is missing.
#
# The packages' maintainer scripts would start the system services (nginx on port 80 of this
# machine); the tests run their own instances with their own configuration, so a policy-rc.d keeps
# the services from starting during the install (only when the machine has none of its own).
set -euo pipefail

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)

[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-cluster-tools: installing ${missing[*]}" >&2
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)

policy=/usr/sbin/policy-rc.d
made_policy=no
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# install-cluster-tools.sh: no service starts during the install\nexit 101\n' \
    | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 755 "$policy"
  made_policy=yes
fi
cleanup() { [ "$made_policy" = yes ] && "${sudo[@]}" rm -f "$policy"; true; }
trap cleanup EXIT

"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
