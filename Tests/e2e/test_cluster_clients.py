"""Push deploys and gRPC clients across the nodes of a cluster (issue 15, items 4 and 5), across
real network hops: three `sidecar serve` nodes in network namespaces behind haproxy, nginx for the
repository (cluster.py; the fixtures and helpers are test_repository's).

  sidecar deploy DIR --nodes URL,URL...|dns:NAME:PORT --token-file FILE [--name] [--publish REPO]
      packs once, GET /admin/v1/bundles/SHA256 on every node, PUT it only where it is missing,
      POST /admin/v1/deployments; one line per node ("ready (sent N bytes)", "ready (had the
      bundle)", "FAILED: ..."), then "NAME version V (bundle SHA12…) serves on K of N node(s)";
      exit 0 / 1 / 3 for all / some / none.
  gRPC clients with DNS round robin over a name resolving to every node (a headless Service):
      the stock tritonclient.grpc (target dns:///NAME:8001, lb policy round_robin, grpc's native
      resolver: getaddrinfo) and Examples/SwiftClient (grpc-swift-2, .build/debug/sidecar-client-example).

A "headless Service" here is /etc/hosts: the CLI and the clients run under `unshare --mount` with a
hosts file bind-mounted over /etc/hosts that gives NAME every node's address (glibc's getaddrinfo
answers every line of a name). Node addresses share one port only with namespaces, so the tests
that resolve a name need them (on loopback they are skipped, saying why).

Run: .build/e2e-venv/bin/python -m pytest -q Tests/e2e/test_cluster_clients.py
(needs nginx, haproxy, iproute2: scripts/install-cluster-tools.sh; the Swift client: swift build --build-tests)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cluster as C  # noqa: E402 - needs the path above
from test_repository import START_TIMEOUT_S, marked_model, serves, start_nodes  # noqa: E402
from test_repository import cl, cluster, report  # noqa: E402,F401 - fixtures, used by name

REPO = HERE.parent.parent
CLIENT_EXAMPLE = Path(os.environ.get("SIDECAR_CLIENT_EXAMPLE", str(REPO / ".build" / "debug" / "sidecar-client-example")))
SERVICE = "sidecar-headless.cluster.test"   # the "headless Service" name the hosts file defines
DEPLOY_TIMEOUT_S = 240.0                     # one `sidecar deploy` (a cold environment on every node at most)
GRPC_REQUESTS = 300
# A node that does not answer is reported after the CLI's short first check (10 s), not after
# --timeout (left at its default of 600 s here, so a CLI that waited for it would fail the bound).
UNREACHABLE_REPORTED_S = 20


# ------------------------------------------------------------------------------------- helpers


def hosts_file(path: Path, name: str, addresses: list[str]) -> Path:
    """A copy of /etc/hosts with one line per address for `name` (what a headless Service's DNS
    name answers)."""
    original = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
    path.write_text(original.rstrip("\n") + "\n" + "".join(f"{address} {name}\n" for address in addresses))
    return path


def with_hosts(hosts: Path | None, argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace whose /etc/hosts is `hosts` (nothing else changes)."""
    if hosts is None:
        return argv
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to give a client its own /etc/hosts"
    return [unshare, "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]


def needs_one_port(cl: C.Cluster) -> None:
    # Not skipped: without namespaces this check cannot be made, and that is a failure to see
    # (CI runs as root with SIDECAR_CLUSTER_NETNS=1, so the cluster is never on loopback there).
    assert cl.mode == "netns", ("a name resolving to every node needs every node on the same port, which needs "
                                "network namespaces (run as root); cluster.py fell back to loopback here")


def deploy(model: Path, *args: str, hosts: Path | None = None, timeout: float = DEPLOY_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`sidecar deploy MODEL ARGS...` (the token only from --token-file: $SIDECAR_ADMIN_TOKEN removed)."""
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_ADMIN_TOKEN"}
    argv = with_hosts(hosts, [C.SIDECAR_BIN, "deploy", str(model), *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)


def shown(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"


def node_lines(done: subprocess.CompletedProcess, url: str) -> list[str]:
    """The output lines about the node at admin URL `url` (its line starts with the URL)."""
    return [line for line in done.stdout.splitlines() if line.split(" ", 1)[0] == url]


def node_line(done: subprocess.CompletedProcess, url: str) -> str:
    lines = node_lines(done, url)
    assert len(lines) == 1, f"expected one line for {url}, got {lines}\n{shown(done)}"
    return lines[0]


SUMMARY = re.compile(r"^(\S+) version (\S+) \(bundle ([0-9a-f]{12})\S*\) serves on (\d+) of (\d+) node\(s\)$", re.M)


def summary(done: subprocess.CompletedProcess) -> tuple[str, str, str, int, int]:
    """(name, version, bundle's first 12 hex digits, nodes serving, nodes) from deploy's last line."""
    found = SUMMARY.findall(done.stdout)
    assert len(found) == 1, f"no summary line 'NAME version V (bundle SHA…) serves on K of N node(s)'\n{shown(done)}"
    name, version, bundle, serving, total = found[0]
    return name, version, bundle, int(serving), int(total)


def grpc_counts(nodes: list[C.Node], model: str = "echo") -> dict[str, float]:
    """Each node's sidecar_requests_total{model, protocol="grpc"}."""
    return {n.name: n.metric("sidecar_requests_total", model=model, protocol="grpc") for n in nodes}


def spread(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {name: int(after[name] - before[name]) for name in before}


def through_balancer(cl: C.Cluster, model: str, count: int = 30) -> list[C.Answer]:
    return [cl.through_balancer(C.v2_request(model, i) if i % 2 else C.v1_request(model, i)) for i in range(count)]


# The stock Python client, in its own process (its own /etc/hosts). argv: target model total
# duration threads. `total` requests (0: no limit) or `duration` seconds (0: no limit) over `threads`
# threads sharing one client; prints {"started": t} at the first answer, then every request as
# [n, sent, done, ok, error] (time.monotonic(): CLOCK_MONOTONIC, the test process's clock too).
TRITON_CLIENT = r'''
import json, sys, threading, time
import numpy as np
import tritonclient.grpc as grpcclient

target, model = sys.argv[1], sys.argv[2]
total, duration, threads = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
client = grpcclient.InferenceServerClient(target, channel_args=[("grpc.lb_policy_name", "round_robin")])
records, lock, issued, started = [], threading.Lock(), [0], threading.Event()


def take():
    with lock:
        if total and issued[0] >= total:
            return None
        issued[0] += 1
        return issued[0] - 1


def run(begin):
    while not duration or time.monotonic() < begin + duration:
        n = take()
        if n is None:
            return
        x = grpcclient.InferInput("x", [1], "INT64")
        x.set_data_from_numpy(np.array([n], dtype=np.int64))
        sent = time.monotonic()
        try:
            result = client.infer(model, [x], request_id=f"py-{n}", client_timeout=10)
            got = result.as_numpy("x")
            ok = got is not None and got.tolist() == [n]
            error = None if ok else f"wrong answer: x={got!r}"
        except Exception as e:
            ok, error = False, f"{type(e).__name__}: {e}"[:300]
        with lock:
            records.append([n, sent, time.monotonic(), ok, error])
        if ok and not started.is_set():
            started.set()
            print(json.dumps({"started": sent}), flush=True)


begin = time.monotonic()
workers = [threading.Thread(target=run, args=(begin,)) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({"records": records}), flush=True)
'''


class TritonRun:
    """The Python client (TRITON_CLIENT) in a subprocess with its own /etc/hosts and grpc's native
    (getaddrinfo) resolver; `wait_started()` returns when it has its first answer."""

    def __init__(self, hosts: Path, target: str, model: str, total: int = 0, duration: float = 0, threads: int = 1):
        env = dict(os.environ, GRPC_DNS_RESOLVER="native")
        argv = with_hosts(hosts, [sys.executable, "-c", TRITON_CLIENT, target, model, str(total), str(duration), str(threads)])
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: grpc's logging cannot block it
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=str(REPO))
        self.lines: list[str] = []
        self.started_at: float | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)
            if line.startswith('{"started"'):
                self.started_at = json.loads(line)["started"]
                self._started.set()
        self._started.set()

    def wait_started(self, timeout: float = 30) -> float:
        assert self._started.wait(timeout) and self.started_at is not None, \
            f"the Python gRPC client got no answer within {timeout:.0f} s\n{self.describe()}"
        return self.started_at

    def finish(self, timeout: float = 120) -> list[list]:
        """Waits for the client; its records [n, sent, done, ok, error]."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"the Python gRPC client did not finish within {timeout:.0f} s\n{self.describe()}")
        self._reader.join(10)
        assert self.popen.returncode == 0, f"the Python gRPC client exited {self.popen.returncode}\n{self.describe()}"
        found = [json.loads(line)["records"] for line in self.lines if line.startswith('{"records"')]
        assert found, f"the Python gRPC client printed no records\n{self.describe()}"
        return found[0]

    def describe(self) -> str:
        self.stderr.seek(0)
        stderr = self.stderr.read()
        return f"--- client stdout (head) ---\n{''.join(self.lines)[:1500]}\n--- client stderr ---\n{stderr[-3000:]}"


def swift_client(hosts: Path, target: str, model: str, requests: int, timeout: float = 180) -> subprocess.Popen:
    if not (CLIENT_EXAMPLE.is_file() and os.access(CLIENT_EXAMPLE, os.X_OK)):
        pytest.fail(f"the Swift example client {CLIENT_EXAMPLE} is missing: run `swift build --build-tests` "
                    f"(it builds Examples/SwiftClient as sidecar-client-example), or set SIDECAR_CLIENT_EXAMPLE")
    argv = with_hosts(hosts, [str(CLIENT_EXAMPLE), target, model, str(requests)])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def swift_result(process: subprocess.Popen, timeout: float = 180) -> tuple[int, int, str]:
    """(answered, failed, output) from the Swift client's last line `answered N, failed M`."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"sidecar-client-example did not finish within {timeout:.0f} s\n{out[-2000:]}\n{err[-2000:]}")
    text = f"exit {process.returncode}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
    assert process.returncode == 0, f"sidecar-client-example failed\n{text}"
    found = re.findall(r"^answered (\d+), failed (\d+)$", out, re.M)
    assert found, f"sidecar-client-example printed no 'answered N, failed M'\n{text}"
    return int(found[-1][0]), int(found[-1][1]), text


def echo_nodes_from_repository(cl: C.Cluster, tmp_path: Path, marker: str) -> list[C.Node]:
    """Three nodes serving the marked echo model, published to the test's own repository."""
    repo, url = cl.repository.directory(marker), cl.repository.url(marker)
    C.sidecar("publish", str(marked_model(tmp_path, marker)), "--repository", str(repo))
    nodes = start_nodes(cl, [0, 1, 2], url)
    for node in nodes:
        assert serves(node, "echo", marker, version="1"), f"{node.name} does not serve {marker}\n{cl.describe()}"
    return nodes


# ------------------------------------------------------------------------------------- sidecar deploy


def test_deploy_to_node_urls(cl, tmp_path, report):
    """`sidecar deploy` to three nodes that have no repository: every node serves it (straight and
    through haproxy); deploying the same directory again sends no bytes; a new version deployed
    under load through haproxy fails no request; one node down: exit 1 and that node's line says
    FAILED; every node down: exit 3."""
    nodes = start_nodes(cl, [0, 1, 2], None)
    urls = [n.admin_url for n in nodes]
    token = ("--token-file", str(cl.token_file))
    targets = ("--nodes", ",".join(urls))

    v1 = marked_model(tmp_path, "deploy-v1")
    started = time.monotonic()
    done = deploy(v1, *targets, *token, "--name", "echo")
    first_took = time.monotonic() - started
    assert done.returncode == 0, f"deploy to 3 running nodes\n{shown(done)}\n{cl.describe()}"
    name, version, bundle, serving, total = summary(done)
    assert (name, serving, total) == ("echo", 3, 3), shown(done)
    sent = {}
    for url in urls:
        line = node_line(done, url)
        m = re.search(r"ready \(sent (\d+) bytes\)", line)
        assert m, f"a node without the bundle is sent it: {line!r}\n{shown(done)}"
        sent[url] = int(m.group(1))
    for node in nodes:
        assert serves(node, "echo", "deploy-v1", version=version), f"{node.name} does not serve deploy-v1 as {version}\n{cl.describe()}"
    answers = through_balancer(cl, "echo")
    assert all(a.ok and a.marker == "deploy-v1" for a in answers), [(a.served_by, a.reason, a.marker) for a in answers]
    assert set(a.served_by for a in answers) == {"n0", "n1", "n2"}, Counter(a.served_by for a in answers)

    # The same directory again: every node has the bundle, so no bytes are sent.
    started = time.monotonic()
    again = deploy(v1, *targets, *token, "--name", "echo")
    again_took = time.monotonic() - started
    assert again.returncode == 0, f"the same deploy again\n{shown(again)}"
    assert summary(again)[1:] == (version, bundle, 3, 3), f"the same directory packs to another bundle or version\n{shown(again)}"
    for url in urls:
        line = node_line(again, url)
        assert "had the bundle" in line and "sent" not in line, f"a node that has the bundle was sent it again: {line!r}"
    for node in nodes:
        assert serves(node, "echo", "deploy-v1", version=version), f"{node.name} after the second deploy\n{cl.describe()}"

    # A new version under load through haproxy.
    v2 = marked_model(tmp_path, "deploy-v2")
    threads = 6
    with cl.load(C.mixed_requests("echo"), threads=threads) as load:
        time.sleep(1.0)
        started = time.monotonic()
        rolled = deploy(v2, *targets, *token, "--name", "echo")
        finished = time.monotonic()
        time.sleep(1.5)
    tally = load.tally
    assert rolled.returncode == 0, f"deploy of v2 under load\n{shown(rolled)}\n{cl.describe()}"
    version2 = summary(rolled)[1]
    assert version2 != version, shown(rolled)
    late = Counter(a.marker for a in tally.answers if a.ok and a.sent > finished)
    report(f"deploy v1 to 3 nodes: {first_took:.1f} s, sent {sorted(set(sent.values()))} bytes per node; again: "
           f"{again_took:.1f} s, nothing sent; v2 under {threads} clients through haproxy: {finished - started:.1f} s, "
           f"{len(tally.answers)} requests, {tally.failed} failed, markers {dict(tally.markers())}, "
           f"served by {dict(tally.served_by())}")
    assert tally.failed == 0, f"requests failed while v2 was deployed\n{tally.describe()}"
    assert tally.markers()["deploy-v1"] > 0 and tally.markers()["deploy-v2"] > 0, tally.describe()
    assert set(late) == {"deploy-v2"}, f"after deploy returned, every node answers v2; requests sent since got {dict(late)}"
    for node in nodes:
        assert serves(node, "echo", "deploy-v2", version=version2), f"{node.name} does not serve deploy-v2\n{cl.describe()}"

    # One node down: exit 1, its line FAILED, the others serve v3.
    nodes[2].stop()
    v3 = marked_model(tmp_path, "deploy-v3")
    started = time.monotonic()
    partial = deploy(v3, *targets, *token, "--name", "echo")
    partial_took = time.monotonic() - started
    assert partial.returncode == 1, f"deploy with one of three nodes down must exit 1\n{shown(partial)}"
    assert summary(partial)[3:] == (2, 3), shown(partial)
    assert "FAILED" in node_line(partial, urls[2]), shown(partial)
    for url in urls[:2]:
        assert "ready" in node_line(partial, url) and "FAILED" not in node_line(partial, url), shown(partial)
    for node in nodes[:2]:
        assert serves(node, "echo", "deploy-v3"), f"{node.name} does not serve deploy-v3\n{cl.describe()}"

    # Every node down: exit 3.
    for node in nodes[:2]:
        node.stop()
    started = time.monotonic()
    none = deploy(v3, *targets, *token, "--name", "echo")
    none_took = time.monotonic() - started
    assert none.returncode == 3, f"deploy with every node down must exit 3\n{shown(none)}"
    assert summary(none)[3:] == (0, 3), shown(none)
    for url in urls:
        assert "FAILED" in node_line(none, url), shown(none)
    assert none_took < UNREACHABLE_REPORTED_S, f"three dead nodes took {none_took:.1f} s to report\n{shown(none)}"
    report(f"one node down: exit 1 after {partial_took:.1f} s, {node_line(partial, urls[2])!r}; every node down: exit 3 "
           f"after {none_took:.1f} s")


def test_deploy_by_dns_name_and_publish(cl, tmp_path, report):
    """`--nodes dns:NAME:8002` where NAME resolves to the three nodes (a headless Service) reaches
    all three; with `--publish REPO` the repository gets the version (manifest), and a node started
    later on that repository, with an empty cache, serves it."""
    needs_one_port(cl)
    nodes = start_nodes(cl, [0, 1, 2], None)
    hosts = hosts_file(tmp_path / "hosts", SERVICE, [n.address for n in nodes])
    repo, url = cl.repository.directory("deploy-dns"), cl.repository.url("deploy-dns")
    model = marked_model(tmp_path, "deploy-dns")

    started = time.monotonic()
    done = deploy(model, "--nodes", f"dns:{SERVICE}:{C.NODE_ADMIN_PORT}", "--token-file", str(cl.token_file),
                  "--name", "echo", "--publish", str(repo), hosts=hosts)
    took = time.monotonic() - started
    assert done.returncode == 0, f"deploy --nodes dns:{SERVICE}:{C.NODE_ADMIN_PORT}\n{shown(done)}\n{cl.describe()}"
    name, version, bundle, serving, total = summary(done)
    assert (name, serving, total) == ("echo", 3, 3), f"the name resolves to 3 nodes\n{shown(done)}"
    for node in nodes:
        line = node_line(done, node.admin_url)
        assert "ready" in line, line

    manifest = json.loads((repo / "manifest.json").read_text())
    versions = manifest.get("models", {}).get("echo", {}).get("versions", [])
    assert [v.get("version") for v in versions] == [version], f"the manifest names version {version}: {manifest}"
    assert versions[0].get("bundle", "").startswith(bundle), \
        f"the repository holds another bundle ({versions[0].get('bundle')}) than the one deployed ({bundle}…)"
    assert (repo / "bundles" / f"{versions[0]['bundle']}.tar.gz").is_file(), sorted(p.name for p in (repo / "bundles").iterdir())
    assert re.search(rf"published echo version {re.escape(version)} to ", done.stdout), shown(done)
    for node in nodes:
        assert serves(node, "echo", "deploy-dns", version=version), f"{node.name} does not serve the deploy\n{cl.describe()}"

    # A node that joins later (an empty disk) gets it from the repository.
    late = nodes[2]
    late.stop()
    started = time.monotonic()
    late.start(repository=url, fresh_cache=True, timeout=START_TIMEOUT_S)
    joined = time.monotonic() - started
    assert serves(late, "echo", "deploy-dns", version=version), f"{late.name} on {url} does not serve version {version}\n{cl.describe()}"
    report(f"deploy by dns:{SERVICE} (3 addresses) with --publish: {took:.1f} s, version {version}; "
           f"a node started later with an empty cache on the repository ready in {joined:.1f} s")


# ------------------------------------------------------------------------------------- gRPC clients


def test_tritonclient_round_robin_and_failover(cl, tmp_path, report):
    """The stock tritonclient.grpc with target dns:///NAME:8001 and round robin: ~300 requests
    spread over the three nodes (their gRPC request counters); one node SIGKILLed mid-run: only the
    requests in flight on it fail, none a couple of seconds later, and the client keeps going."""
    needs_one_port(cl)
    nodes = echo_nodes_from_repository(cl, tmp_path, "grpc-py")
    hosts = hosts_file(tmp_path / "hosts", SERVICE, [n.address for n in nodes])
    target = f"dns:///{SERVICE}:{C.NODE_GRPC_PORT}"

    before = grpc_counts(nodes)
    run = TritonRun(hosts, target, "echo", total=GRPC_REQUESTS, threads=1)
    records = run.finish()
    shares = spread(before, grpc_counts(nodes))
    failed = [r for r in records if not r[3]]
    took = max(r[2] for r in records) - min(r[1] for r in records)
    report(f"tritonclient, {GRPC_REQUESTS} sequential requests over {target} in {took:.2f} s: per node {shares}, "
           f"{len(failed)} failed")
    assert len(records) == GRPC_REQUESTS and not failed, f"{len(failed)} failed: {failed[:5]}\n{run.describe()}"
    assert sum(shares.values()) == GRPC_REQUESTS, f"the nodes counted {shares} gRPC requests, {GRPC_REQUESTS} were sent"
    assert all(n >= GRPC_REQUESTS // 5 for n in shares.values()), f"round robin over 3 nodes, got {shares}"

    # One node SIGKILLed under 4 client threads.
    threads, victim = 4, nodes[2]
    before = grpc_counts(nodes[:2])
    run = TritonRun(hosts, target, "echo", duration=6.0, threads=threads)
    run.wait_started()
    time.sleep(1.5)
    killed_at = time.monotonic()
    victim.kill()
    records = run.finish()
    after = spread(before, grpc_counts(nodes[:2]))
    settled = killed_at + 2.0
    failed = [r for r in records if not r[3]]
    late_ok = sum(1 for r in records if r[3] and r[1] >= settled)
    reasons = Counter(str(r[4])[:120] for r in failed)
    report(f"tritonclient, {threads} threads, {victim.name} SIGKILLed: {len(records)} requests, {len(failed)} failed "
           f"{dict(reasons)} at {[round(r[1] - killed_at, 3) for r in failed][:10]} s from the kill; "
           f"{late_ok} answered from +2 s on; survivors counted {after}")
    assert not [r for r in failed if r[1] >= settled], \
        f"requests still failed 2 s after the kill: {[(round(r[1] - killed_at, 2), r[4]) for r in failed][:10]}"
    assert len(failed) <= threads, \
        f"{len(failed)} failed, more than the {threads} that could be in flight on {victim.name}: " \
        f"{[(round(r[1] - killed_at, 3), r[4]) for r in failed][:10]}"
    assert late_ok > 100, f"the client did not keep going after the kill: {late_ok} answers from +2 s on\n{run.describe()}"
    assert all(n > 0 for n in after.values()), f"the surviving nodes' gRPC counters: {after}"


def test_swift_client_round_robin(cl, tmp_path, report):
    """Examples/SwiftClient (grpc-swift-2, DNS resolver, round robin) with dns:NAME:8001: its
    requests spread over the three nodes (their gRPC request counters)."""
    needs_one_port(cl)
    if not (CLIENT_EXAMPLE.is_file() and os.access(CLIENT_EXAMPLE, os.X_OK)):
        pytest.fail(f"the Swift example client {CLIENT_EXAMPLE} is missing: run `swift build --build-tests` "
                    f"(it builds Examples/SwiftClient as sidecar-client-example), or set SIDECAR_CLIENT_EXAMPLE")
    nodes = echo_nodes_from_repository(cl, tmp_path, "grpc-swift")
    hosts = hosts_file(tmp_path / "hosts", SERVICE, [n.address for n in nodes])
    target = f"dns:{SERVICE}:{C.NODE_GRPC_PORT}"

    before = grpc_counts(nodes)
    started = time.monotonic()
    answered, failed, text = swift_result(swift_client(hosts, target, "echo", GRPC_REQUESTS))
    took = time.monotonic() - started
    shares = spread(before, grpc_counts(nodes))
    report(f"sidecar-client-example, {GRPC_REQUESTS} requests over {target} in {took:.2f} s (process included): "
           f"answered {answered}, failed {failed}, per node {shares}")
    assert (answered, failed) == (GRPC_REQUESTS, 0), text
    assert sum(shares.values()) == GRPC_REQUESTS, f"the nodes counted {shares} gRPC requests, {GRPC_REQUESTS} were sent"
    assert all(n >= GRPC_REQUESTS // 5 for n in shares.values()), f"round robin over 3 nodes, got {shares}\n{text}"
