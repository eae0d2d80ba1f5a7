#!/usr/bin/env python3
"""The model repository's figures, measured on nodes in network namespaces (Tests/e2e/cluster.py):

  1. publish → ready on every node: a cold environment (empty caches) and a cached one;
  2. bytes moved per node for a second version that changes only the handler, beside a weights file;
  3. requests failed during a rollout under load (target 0);
  4. throughput through haproxy with 1, 2 and 3 nodes, and straight to one node in the same run.

All of it shares this machine's cores (nodes, nginx, haproxy, wrk): item 4 shows the cost of the
balancer hop, not scale. Run as root (namespaces); SIDECAR_BIN picks the binary (default release).

    .build/e2e-venv/bin/python scripts/bench-cluster.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SIDECAR_BIN", str(ROOT / ".build" / "release" / "sidecar"))
os.environ.setdefault("SIDECAR_CLUSTER_LOG_LEVEL", "warning")
sys.path.insert(0, str(ROOT / "Tests" / "e2e"))

import cluster as C  # noqa: E402
from test_repository import marked_model, publish, serves  # noqa: E402

WEIGHTS_BYTES = 8 << 20
WRK_SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
WRK_CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))


def wait_all(nodes, marker, version, timeout=300.0) -> float:
    started = time.monotonic()
    for node in nodes:
        C.wait_for(lambda node=node: serves(node, "echo", marker, version), started + timeout - time.monotonic(),
                   f"{node.name} serving {marker}")
    return time.monotonic() - started


def fetched(node) -> int:
    return int((node.status().get("repository") or {}).get("bytes_fetched") or 0)


def wrk(host: str, port: int) -> float:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text('wrk.method = "POST"\nwrk.body = \'{"instances": [1]}\'\nwrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(
        ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s", "-s", str(script), f"http://{host}:{port}/v1/models/echo:predict"],
        capture_output=True, text=True, check=True).stdout
    script.unlink()
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"    (wrk saw {errors.group(1)} non-2xx answers)")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main() -> None:
    with C.Cluster(nodes=3, mode="netns") as cl, tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        repo, url = cl.repository.directory("bench"), cl.repository.url("bench")
        nodes = [cl.node(i) for i in range(3)]
        print(f"binary {C.SIDECAR_BIN}; {len(nodes)} nodes in namespaces ({cl.mode}), repository behind nginx, haproxy in front")

        # 1. Cold: the nodes start with empty caches and no manifest yet; then the first publish.
        for node in nodes:
            node.start(repository=url, fresh_cache=True, wait=False, poll_interval=0.5)
        time.sleep(2)
        v1 = marked_model(tmp, "bench-v1", weights_bytes=WEIGHTS_BYTES)
        (v1 / "sidecar.yaml").write_text((v1 / "sidecar.yaml").read_text().replace("workers: 1", "workers: 2"))
        published = time.monotonic()
        publish(v1, repo)
        for node in nodes:
            node.wait_ready(300)
        wait_all(nodes, "bench-v1", "1")
        cold = time.monotonic() - published
        print(f"1. publish → serving on all 3 nodes, cold environment (empty caches): {cold:.1f} s")
        bytes_v1 = [fetched(n) for n in nodes]

        # 2 + 3. A handler-only version under load through haproxy: cached environment, bytes moved, failures.
        v2 = marked_model(tmp, "bench-v2", weights_bytes=WEIGHTS_BYTES)
        (v2 / "sidecar.yaml").write_text((v1 / "sidecar.yaml").read_text())
        (v2 / "weights.bin").write_bytes((v1 / "weights.bin").read_bytes())
        with cl.load(C.mixed_requests("echo"), threads=6) as load:
            time.sleep(2)
            published = time.monotonic()
            publish(v2, repo, "--name", "echo")
            cached = wait_all(nodes, "bench-v2", "2")
            time.sleep(3)
        tally = load.tally
        moved = [fetched(n) - before for n, before in zip(nodes, bytes_v1)]
        print(f"1. publish → serving on all 3 nodes, cached environment (handler-only change): {cached:.1f} s")
        print(f"2. bytes moved per node: version 1 {bytes_v1} (weights {WEIGHTS_BYTES} B); "
              f"version 2 (handler only) {moved}")
        print(f"3. rollout under 6 clients through haproxy: {tally.ok + tally.failed} requests, {tally.failed} failed "
              f"{dict(tally.failures())}; answered by {dict(tally.markers())}")

        # 4. Throughput: straight to one node, then through haproxy with 1, 2, 3 nodes, then straight again.
        direct = [wrk(nodes[0].address, nodes[0].http_port)]
        through = {}
        for up in (1, 2, 3):
            for i, node in enumerate(nodes):
                if i < up and not node.running():
                    node.start(repository=url, wait=True, poll_interval=0.5)
                if i >= up and node.running():
                    node.stop()
            cl.balancer.wait_states([n.name for n in nodes[:up]])
            through[up] = wrk(*cl.balancer.address)
        direct.append(wrk(nodes[0].address, nodes[0].http_port))
        ceiling = sum(direct) / 2
        print(f"4. KServe v1 echo, wrk -c{WRK_CONNECTIONS} {WRK_SECONDS} s: straight to one node {direct[0]:.0f} then {direct[1]:.0f} req/s")
        for up, rate in through.items():
            print(f"   through haproxy, {up} node(s): {rate:.0f} req/s = {rate / ceiling:.2f} × one node straight")


if __name__ == "__main__":
    main()
