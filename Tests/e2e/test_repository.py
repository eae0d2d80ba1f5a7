"""Many nodes and a model repository (issue 14), across real network hops.

Three node slots, each `sidecar serve` in its own network namespace with its own cache directory,
the repository served by nginx from another namespace, haproxy in front of the nodes (round robin,
GET /v2/health/ready every 500 ms): see cluster.py. Without the privilege for namespaces the same
tests run on loopback ports (cluster.py says so on stderr).

Each test publishes into its own repository directory (`cluster.repository.directory(NAME)`,
served at `cluster.repository.url(NAME)`), so versions start at 1 in every test. The model is
Examples/echo with a handler that marks every answer (`marked_model`): KServe v1 predictions gain
"marker", OIP v2 answers an extra BYTES output "marker". Markers are unique per test, so two tests
never publish the same bundle (a bundle cached by a node in an earlier test would hide a fetch).

The interface under test (issue 14; written before the Swift side landed):
  sidecar publish DIR --repository PATH [--name] [--version] [--label] [--weight] [--workers]
  sidecar rollback NAME --repository PATH [--to VERSION]
  sidecar serve --repository SRC --poll-interval S     (SRC: a directory or an http(s) base URL)
  sidecar sync --server ADMIN_URL                      (POST /admin/v1/repository/sync)
  GET /repository/manifest.json, /repository/bundles/<sha256>.tar.gz or .files.json, /repository/files/<sha256>
  on every node's HTTP port
  /status: "repository": {source, last sync, last error, per model its versions and any failure
  reason}; each model entry has "version". Reasons are found by `failure_reasons`: every non-empty
  string under a key containing "error", "reason" or "fail", anywhere in "repository"; a refused
  bundle's reason names the bundle by its sha256 (at least the first 12 hex digits).
  /v2/health/ready: 200 once the node has loaded what the manifest asks for.
  POST /v2/models/{m}/versions/{v}/infer; model_version = the version that answered;
  GET /v2/models/{m} lists "versions".

Run: .build/e2e-venv/bin/python -m pytest -q Tests/e2e/test_repository.py
(needs nginx, haproxy, iproute2: scripts/install-cluster-tools.sh)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cluster as C  # noqa: E402 - needs the path above

REPO = HERE.parent.parent
ECHO = REPO / "Examples" / "echo"
SYNC_TIMEOUT_S = 60.0     # a published change reaching a running node (poll interval 1 s)
START_TIMEOUT_S = 180.0   # a node from nothing: bundle, cold environment (wheelhouse), workers
ROLLBACK_LIMIT_S = 15.0   # rollback: the old bundle and environment are cached
UNREACHABLE_REPORT_S = 60.0  # a silent repository reported in /status (past the 30 s request timeout)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    with C.Cluster(nodes=3) as made:
        yield made


@pytest.fixture
def report(capsys, request):
    """report(text): printed to the terminal even under -q (the figures a test measured)."""
    def say(text: str) -> None:
        with capsys.disabled():
            print(f"\n[{request.node.name}] {text}", flush=True)
    return say


@pytest.fixture
def cl(cluster, report):
    """The module's cluster with every node stopped and the repository reachable, before and after
    (a node slow to stop on SIGTERM, or exiting non-zero, is reported)."""
    cluster.reset()
    yield cluster
    for line in cluster.reset():
        report(f"teardown: {line}")


# ------------------------------------------------------------------------------------- models


MARKED_HANDLER = '''"""Examples/echo, marked: every answer says which version of the model gave it (e2e tests of
the model repository). JSON items come back with "marker" added; tensor items with a BYTES output
"marker" beside their inputs."""

MARKER = {marker!r}


def _mark(item):
    if isinstance(item, dict):
        if any(type(value).__module__ == "numpy" for value in item.values()):
            import numpy
            return {{**item, "marker": numpy.array([MARKER], dtype=object)}}
        return {{**item, "marker": MARKER}}
    return {{"item": item, "marker": MARKER}}


def predict(batch):
    return [_mark(item) for item in batch]
'''


def marked_model(parent: Path, marker: str, name: str = "echo", weights_bytes: int = 0) -> Path:
    """A copy of Examples/echo whose handler marks its answers with `marker`, one worker, named
    `name`; `weights_bytes` adds a file of random bytes (an incompressible, slow-to-fetch bundle)."""
    target = parent / f"{name}-{marker}"
    shutil.copytree(ECHO, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "handler.py").write_text(MARKED_HANDLER.format(marker=marker))
    config = (target / "sidecar.yaml").read_text().splitlines()
    config = [f"name: {name}" if line.startswith("name:") else "workers: 1" if line.startswith("workers:") else line
              for line in config]
    (target / "sidecar.yaml").write_text("\n".join(config) + "\n")
    if weights_bytes:
        (target / "weights.bin").write_bytes(random.Random(marker).randbytes(weights_bytes))
    return target


# ------------------------------------------------------------------------------------- helpers


def publish(model: Path, repository: Path, *args: str) -> str:
    done = C.sidecar("publish", str(model), "--repository", str(repository), *args)
    return done.stdout


def rollback(name: str, repository: Path, *args: str) -> str:
    return C.sidecar("rollback", name, "--repository", str(repository), *args).stdout


def bundles(repository: Path) -> set[str]:
    """The sha256 of every bundle file in a repository directory (`bundles/<sha256>.tar.gz`)."""
    return {p.name[:-len(".tar.gz")] for p in bundle_files(repository / "bundles")}


def bundle_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{64}\.tar\.gz", p.name)] if folder.is_dir() else []


def node_bundles(cache: Path) -> set[str]:
    """The bundles a node holds in its cache directory, by sha256: `<cache>/repository/` keeps
    `<sha256>.tar.gz` (as fetched) and/or `<sha256>/` (unpacked, what the host loads)."""
    folder = cache / "repository"
    if not folder.is_dir():
        return set()
    return {p.name[:64] for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{64}(\.tar\.gz)?", p.name)}


def repository_files(repository: Path) -> set[str]:
    """Every file of a repository directory, relative to it (temporary and lock files aside)."""
    return {str(p.relative_to(repository)) for p in repository.rglob("*") if p.is_file() and not p.name.startswith(".")}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_file(path: Path, data: bytes) -> None:
    """Writes `data` to `path` the way a careful publisher would: beside it, then rename."""
    tmp = path.with_name(path.name + ".incoming")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def start_nodes(cl: C.Cluster, indices: list[int], repository: str, **start_args) -> list[C.Node]:
    """Starts the nodes at once (so their cold starts overlap), waits until each is ready and
    haproxy has exactly these nodes up."""
    nodes = [cl.node(i) for i in indices]
    for node in nodes:
        node.start(repository=repository, wait=False, **start_args)
    for node in nodes:
        node.wait_ready(START_TIMEOUT_S)
    cl.balancer.wait_states([n.name for n in nodes])
    return nodes


def serves(node: C.Node, model: str, marker: str, version: str | None = None, tries: int = 4) -> bool:
    """The node answers `model` with `marker` (and OIP model_version `version`), `tries` times in
    a row over both protocols, straight to the node."""
    for n in range(tries):
        request = C.v1_request(model, n) if n % 2 else C.v2_request(model, n)
        answer = node.call(request)
        if not answer.ok or answer.marker != marker:
            return False
        if version is not None and request.path.startswith("/v2/") and answer.version != version:
            return False
    return True


def wait_serving(cl: C.Cluster, nodes: list[C.Node], model: str, marker: str, version: str | None = None,
                 timeout: float = SYNC_TIMEOUT_S) -> float:
    """Waits until every node serves `marker` (see `serves`); returns the seconds it took."""
    started = time.monotonic()
    for node in nodes:
        def check(node=node):
            if not node.running():
                raise AssertionError(f"node {node.name} exited with {node.process.popen.returncode}\n{node.log_tail()}")
            return serves(node, model, marker, version)

        def describe(node=node):
            answer = node.call(C.v2_request(model, 0))
            return (f"{node.name} answers {answer.status} marker={answer.marker} version={answer.version} "
                    f"{answer.reason or ''}\n{node_repository(node)}\n{cl.describe()}")
        C.wait_for(check, max(1.0, started + timeout - time.monotonic()),
                   f"{node.name} to serve {model} with marker {marker!r}" + (f" as version {version}" if version else ""),
                   describe)
    return time.monotonic() - started


def node_repository(node: C.Node) -> str:
    """The node's /status "repository" section, for messages."""
    try:
        return f"{node.name} /status repository: {json.dumps(node.status().get('repository'))[:2000]}"
    except Exception as error:  # noqa: BLE001 - only for a message
        return f"{node.name} /status: {error}"


def failure_reasons(section: object) -> list[str]:
    """Every non-empty string under a key containing "error", "reason" or "fail" in a /status
    "repository" section (see the module docstring)."""
    found: list[str] = []

    def walk(value: object, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and value and any(w in key.lower() for w in ("error", "reason", "fail")):
            found.append(value)
    walk(section)
    return found


def reasons_of(node: C.Node) -> list[str]:
    """The failure reasons in the node's /status "repository" ([] when /status does not answer)."""
    code, status = node.get("/status")
    return failure_reasons(status.get("repository")) if code == 200 and isinstance(status, dict) else []


def model_entries(status: dict, name: str) -> list[dict]:
    return [m for m in status.get("models", []) if m.get("name") == name]


def unverified_cached_bundles(cache: Path) -> list[str]:
    """Bundle archives in a node's cache whose content does not match their sha256 name, and
    staging directories left behind."""
    folder = cache / "repository"
    problems = [f"{p} does not match its sha256" for p in bundle_files(folder) if sha256_file(p) != p.name[:64]]
    if folder.is_dir():
        problems += [f"{p} left behind" for p in folder.iterdir() if p.name.startswith(".staging")]
    return problems


# ------------------------------------------------------------------------------------- the harness


def test_harness_balances_across_namespaced_nodes(cl, tmp_path, report):
    """The harness itself, with plain `sidecar serve DIR` nodes (no repository): each node runs in
    its own namespace and is reached over the bridge, each reaches the repository server, haproxy
    spreads requests over both and drops a node killed with SIGKILL."""
    model = marked_model(tmp_path, "harness")
    nodes = [cl.node(0), cl.node(1)]
    for node in nodes:
        node.start([model], wait=False)
    for node in nodes:
        node.wait_ready(START_TIMEOUT_S)
    if cl.mode == "netns":
        for node in nodes:
            assert node.namespace_of_process() == node.host.namespace, f"{node.name} runs in {node.namespace_of_process()!r}"
            done = node.host.run([sys.executable, "-c", "import sys, urllib.request; "
                                  "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                                  f"{cl.repository.base}/_harness/ping"])
            assert done.returncode == 0 and "pong" in done.stdout, f"{node.name} cannot reach the repository: {done.stderr}"
        assert len({n.address for n in nodes}) == 2
    cl.balancer.wait_states(["n0", "n1"])

    before = {n.name: n.metric("sidecar_requests_total", model="echo") for n in nodes}
    answers = [cl.through_balancer(C.v2_request("echo", i) if i % 2 else C.v1_request("echo", i)) for i in range(40)]
    assert all(a.ok and a.marker == "harness" for a in answers), [a.reason for a in answers if not a.ok]
    spread = Counter(a.served_by for a in answers)
    assert spread["n0"] >= 15 and spread["n1"] >= 15, f"round robin over two nodes, got {dict(spread)}"
    for node in nodes:
        reached = node.metric("sidecar_requests_total", model="echo") - before[node.name]
        assert reached >= 15, f"{node.name} counted {reached} requests of the 40 sent through haproxy"

    threads = 6
    with cl.load(C.mixed_requests("echo"), threads=threads) as load:
        time.sleep(2.0)
        killed_at = time.monotonic()
        nodes[1].kill()
        C.wait_for(lambda: cl.balancer.states().get("n1") == "DOWN", 10, "haproxy to mark n1 DOWN", cl.describe, interval=0.05)
        detected = time.monotonic() - killed_at
        time.sleep(3.0)
    tally = load.tally
    settled = killed_at + C.CHECK_FALL * C.CHECK_INTERVAL_S + 1.0
    report(f"SIGKILL of n1 under {threads} clients: haproxy marked it DOWN after {detected:.2f} s; "
           f"{tally.failed} of {len(tally.answers)} requests failed {dict(tally.failures())} "
           f"(in flight on n1 at the kill); served by {dict(tally.served_by())}")
    assert tally.ok > 200, tally.describe()
    assert tally.failed <= threads, f"more failures than requests that could be in flight on n1\n{tally.describe()}"
    assert not tally.failures(after=settled), f"requests still failed after haproxy dropped n1\n{tally.describe()}"
    late = Counter(a.served_by for a in tally.answers if a.ok and a.sent > settled)
    assert set(late) == {"n0"}, f"after the kill only n0 answers, got {dict(late)}"


# ------------------------------------------------------------------------------------- repository


def test_publish_reaches_every_node(cl, tmp_path, report):
    """Nodes started on a repository serve what it holds; a model published while they run reaches
    every node; each node serves its own copy of the repository; an unchanged manifest is polled
    with conditional requests."""
    repo, url = cl.repository.directory("publish"), cl.repository.url("publish")
    out = publish(marked_model(tmp_path, "publish-v1"), repo)
    assert (repo / "manifest.json").is_file(), f"publish wrote no manifest.json: {out}"
    manifest = json.loads((repo / "manifest.json").read_text())
    (sha,) = bundles(repo)
    assert sha256_file(repo / "bundles" / f"{sha}.tar.gz") == sha, "a bundle's file name is its sha256"

    started = time.monotonic()
    nodes = start_nodes(cl, [0, 1, 2], url)
    report(f"3 nodes from start to ready: {time.monotonic() - started:.1f} s")
    for node in nodes:
        assert serves(node, "echo", "publish-v1", version="1"), f"{node.name} does not serve version 1\n{cl.describe()}"
        code, meta = node.get("/v2/models/echo")
        assert code == 200 and "1" in meta.get("versions", []), f"{node.name} GET /v2/models/echo: {meta}"
        status = node.status()
        assert any(m.get("version") == "1" for m in model_entries(status, "echo")), f"{node.name}: {status.get('models')}"
        assert url in json.dumps(status.get("repository")), f"{node.name} /status repository names its source: {node_repository(node)}"
        code, served = node.get("/repository/manifest.json")
        assert code == 200 and served == manifest, f"{node.name} /repository/manifest.json: {code} {str(served)[:500]}"

    through = [cl.through_balancer(C.v2_request("echo", i) if i % 2 else C.v1_request("echo", i)) for i in range(30)]
    assert all(a.ok and a.marker == "publish-v1" for a in through), [(a.reason, a.marker) for a in through]
    assert set(a.served_by for a in through) == {"n0", "n1", "n2"}, Counter(a.served_by for a in through)

    published = time.monotonic()
    publish(marked_model(tmp_path, "publish-greeter", name="greeter"), repo)
    wait_serving(cl, nodes, "greeter", "publish-greeter")
    report(f"a second model published while serving reached all 3 nodes in {time.monotonic() - published:.1f} s")
    for node in nodes:
        assert serves(node, "echo", "publish-v1"), f"{node.name} stopped serving echo after greeter was published"

    # Unchanged manifest: the polls are conditional (ETag or Last-Modified) and answered 304.
    time.sleep(3.0)
    quiet_since = time.time() - 2.5
    polls = [e for e in cl.repository.requests() if e["path"] == "/publish/manifest.json" and e["start"] > quiet_since]
    assert len(polls) >= 3, f"3 nodes polling every second made {len(polls)} manifest requests in 2.5 s"
    unconditional = [e for e in polls if e["status"] != 304 or not (e["inm"] or e["ims"])]
    assert not unconditional, f"polls of an unchanged manifest that were not conditional 304s: {unconditional[:5]}"

    # Each node serves the bundles its manifest names, so any node (or client) can fetch from it:
    # the file index the manifest names (and every file it lists), or the .tar.gz for a bundle
    # without an index.
    manifest = json.loads((repo / "manifest.json").read_text())
    index_sha = manifest["models"]["echo"]["versions"][0].get("files")
    for node in nodes:
        if index_sha:
            code, data, _ = node.get_bytes(f"/repository/bundles/{sha}.files.json")
            assert code == 200 and hashlib.sha256(data).hexdigest() == index_sha, \
                f"{node.name} GET /repository/bundles/{sha}.files.json (named by the manifest it serves): {code} {data[:200]!r}"
            for entry in json.loads(data)["entries"]:
                if entry["kind"] == "directory":
                    continue
                code, blob, _ = node.get_bytes(f"/repository/files/{entry['sha256']}")
                assert code == 200 and hashlib.sha256(blob).hexdigest() == entry["sha256"], \
                    f"{node.name} GET /repository/files/{entry['sha256']} ({entry['path']}): {code}"
        else:
            code, data, _ = node.get_bytes(f"/repository/bundles/{sha}.tar.gz")
            assert code == 200 and hashlib.sha256(data).hexdigest() == sha, \
                f"{node.name} GET /repository/bundles/{sha}.tar.gz (named by the manifest it serves): {code} {data[:200]!r}"


def test_node_started_later_catches_up(cl, tmp_path, report):
    """A node that starts after a rollout, with an empty cache, comes up on the current version; a
    node can use another node as its repository and follows it."""
    repo, url = cl.repository.directory("later"), cl.repository.url("later")
    publish(marked_model(tmp_path, "later-v1"), repo)
    first = start_nodes(cl, [0, 1], url)
    publish(marked_model(tmp_path, "later-v2"), repo)
    wait_serving(cl, first, "echo", "later-v2", version="2")

    late = cl.node(2)
    started = time.monotonic()
    late.start(repository=url, fresh_cache=True, timeout=START_TIMEOUT_S)
    report(f"n2 with an empty cache, from start to ready on version 2: {time.monotonic() - started:.1f} s")
    assert serves(late, "echo", "later-v2", version="2"), f"n2's first answers are not version 2\n{cl.describe()}"
    cl.balancer.wait_states(["n0", "n1", "n2"])

    # n2 again from nothing, this time with n0 as its repository.
    late.stop()
    restarted = time.time()
    started = time.monotonic()
    late.start(repository=first[0].repository_url, fresh_cache=True, timeout=START_TIMEOUT_S)
    report(f"n2 with an empty cache from n0's repository, to ready: {time.monotonic() - started:.1f} s")
    assert serves(late, "echo", "later-v2", version="2"), f"n2 (from n0) does not serve version 2\n{cl.describe()}"
    if cl.mode == "netns":
        from_nginx = [e for e in cl.repository.requests() if e["client"] == late.address and e["start"] >= restarted]
        assert not from_nginx, f"n2 was told to use n0, yet fetched from nginx: {from_nginx[:3]}"

    # A new version reaches n2 through n0.
    publish(marked_model(tmp_path, "later-v3"), repo)
    took = wait_serving(cl, [first[0], late], "echo", "later-v3", version="3")
    report(f"version 3 reached n0 and, through n0, n2 in {took:.1f} s")


def test_rollout_under_load_fails_no_request(cl, tmp_path, report):
    """v1 → v2 on three nodes while clients send requests through haproxy: not one fails, and a
    node that answered with v2 does not go back to v1."""
    repo, url = cl.repository.directory("rollout"), cl.repository.url("rollout")
    publish(marked_model(tmp_path, "rollout-v1"), repo)
    nodes = start_nodes(cl, [0, 1, 2], url)
    with cl.load(C.mixed_requests("echo"), threads=6) as load:
        time.sleep(2.0)
        published = time.monotonic()
        publish(marked_model(tmp_path, "rollout-v2"), repo)
        wait_serving(cl, nodes, "echo", "rollout-v2", version="2")
        took = time.monotonic() - published
        time.sleep(2.0)
    tally = load.tally
    report(f"rollout v1 → v2 on 3 nodes under 6 clients: every node on v2 {took:.1f} s after publish; "
           f"{len(tally.answers)} requests, {tally.failed} failed; markers {dict(tally.markers())}")
    assert tally.failed == 0, f"requests failed during the rollout\n{tally.describe()}\n{cl.describe()}"
    assert set(tally.markers()) == {"rollout-v1", "rollout-v2"}, tally.describe()
    for node in nodes:
        mine = sorted((a for a in tally.answers if a.served_by == node.name), key=lambda a: a.sent)
        first_v2 = next((a.done for a in mine if a.marker == "rollout-v2"), None)
        assert first_v2 is not None, f"{node.name} never answered with v2 through haproxy"
        back = [a for a in mine if a.marker == "rollout-v1" and a.sent > first_v2 + 0.5]
        assert not back, f"{node.name} answered v1 {len(back)} times after it had answered v2"
    versions = {a.version for a in tally.answers if a.ok and a.version is not None}
    assert versions == {"1", "2"}, f"OIP model_version seen: {versions}"
    assert all((a.marker, a.version) in (("rollout-v1", "1"), ("rollout-v2", "2"))
               for a in tally.answers if a.ok and a.version is not None), "model_version disagrees with who answered"


def test_canary_weight_and_sticky_ids(cl, tmp_path, report):
    """stable 80 / canary 20: over 1,000 requests through haproxy about 20 % reach the canary; an
    OIP request with an "id" always reaches the same version, whichever node takes it; a version
    can be asked for by name; metadata lists both."""
    repo, url = cl.repository.directory("canary"), cl.repository.url("canary")
    publish(marked_model(tmp_path, "canary-v1"), repo, "--weight", "80")
    nodes = start_nodes(cl, [0, 1], url)
    publish(marked_model(tmp_path, "canary-v2"), repo, "--label", "canary", "--weight", "20")

    def both_loaded(node):
        code, meta = node.get("/v2/models/echo")
        listed = set(meta.get("versions", [])) if code == 200 and isinstance(meta, dict) else set()
        return {"1", "2"} <= listed and node.call(C.v2_request("echo", 5, version="2")).marker == "canary-v2"
    for node in nodes:
        C.wait_for(lambda node=node: both_loaded(node), SYNC_TIMEOUT_S, f"{node.name} to load the canary (version 2)",
                   lambda node=node: node_repository(node) + "\n" + cl.describe())
        for version, marker in (("1", "canary-v1"), ("2", "canary-v2")):
            for n in range(5):
                answer = node.call(C.v2_request("echo", n, version=version))
                assert answer.ok and answer.marker == marker and answer.version == version, \
                    f"{node.name} /versions/{version}/infer answered {answer.version}/{answer.marker}: {answer.reason}"

    load = cl.load(C.mixed_requests("echo"), threads=4, total=1000, seed=14).start()
    tally = load.wait()
    markers = tally.markers()
    share = markers["canary-v2"] / max(1, tally.ok)
    report(f"canary weight 20: {markers['canary-v2']} of {tally.ok} requests reached it ({share:.1%}); "
           f"{tally.failed} failed; served by {dict(tally.served_by())}")
    assert tally.failed == 0 and tally.ok == 1000, tally.describe()
    assert set(markers) == {"canary-v1", "canary-v2"}, tally.describe()
    assert abs(share - 0.20) <= 0.05, f"canary share {share:.1%} over 1,000 requests, expected 20 % ± 5"

    chosen: dict[str, set[str]] = {}
    nodes_seen: dict[str, set[str]] = {}
    for k in range(100):
        request_id = f"user-{k}"
        for n in range(4):
            answer = cl.through_balancer(C.v2_request("echo", n, request_id=request_id))
            assert answer.ok, f"{request_id}: {answer.reason}"
            chosen.setdefault(request_id, set()).add(answer.marker)
            nodes_seen.setdefault(request_id, set()).add(answer.served_by)
    split = {i: m for i, m in chosen.items() if len(m) > 1}
    on_canary = sum(1 for m in chosen.values() if m == {"canary-v2"})
    across = sum(1 for s in nodes_seen.values() if len(s) > 1)
    report(f"sticky ids: 100 ids × 4 requests, {on_canary} ids on the canary, {len(split)} split; "
           f"{across} ids were answered by both nodes")
    assert not split, f"ids answered by both versions: {dict(list(split.items())[:5])}"
    assert 5 <= on_canary <= 40, f"{on_canary} of 100 ids on a canary of weight 20"
    assert across >= 50, "haproxy should have sent most ids to both nodes (round robin)"


def test_rollback_is_fast(cl, tmp_path, report):
    """Rollback points stable back to the previous version; the old bundle and environment are
    still cached, so every node serves it again within seconds, fetching and building nothing."""
    repo, url = cl.repository.directory("rollback"), cl.repository.url("rollback")
    publish(marked_model(tmp_path, "rollback-v1"), repo)
    nodes = start_nodes(cl, [0, 1], url)
    publish(marked_model(tmp_path, "rollback-v2"), repo)
    wait_serving(cl, nodes, "echo", "rollback-v2", version="2")
    logs_before = {n.name: len(n.log_since_start()) for n in nodes}

    asked = time.time()
    started = time.monotonic()
    out = rollback("echo", repo)
    wait_serving(cl, nodes, "echo", "rollback-v1", version="1", timeout=ROLLBACK_LIMIT_S + 30)
    elapsed = time.monotonic() - started
    report(f"rollback to version 1 served by both nodes {elapsed:.1f} s after `sidecar rollback` ({out.strip()[:120]!r})")
    assert elapsed < ROLLBACK_LIMIT_S, f"rollback took {elapsed:.1f} s (limit {ROLLBACK_LIMIT_S} s)\n{cl.describe()}"
    for node in nodes:
        since = node.log_since_start()[logs_before[node.name]:]
        assert "building Python environment" not in since, f"{node.name} rebuilt an environment for the rollback:\n{since[-2000:]}"
    refetched = [e for e in cl.repository.requests()
                 if e["start"] >= asked and ("/bundles/" in e["path"] or "/files/" in e["path"])]
    assert not refetched, f"bundles fetched again for a rollback to a cached version: {refetched[:4]}"

    # Forward again with --to, and a sync asked for instead of waiting for the poll.
    rollback("echo", repo, "--to", "2")
    for node in nodes:
        done = C.sidecar("sync", "--server", node.admin_url)
        assert done.stdout.strip(), f"sidecar sync printed nothing for {node.name}"
    took = wait_serving(cl, nodes, "echo", "rollback-v2", version="2", timeout=ROLLBACK_LIMIT_S)
    report(f"rollback --to 2 with sidecar sync: both nodes on version 2 after {took:.1f} s")


def _stage(repo: Path, staging: Path, model: Path) -> tuple[str, dict[str, bytes]]:
    """Publishes `model` into a copy of `repo` that nobody serves; returns the new bundle's sha256
    and every file the publish added (path relative to the repository → bytes), manifest aside."""
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(repo, staging)
    publish(model, staging)
    (sha,) = bundles(staging) - bundles(repo)
    added = {path: (staging / path).read_bytes() for path in repository_files(staging) - repository_files(repo)
             if path != "manifest.json"}
    return sha, added


def _go_live(repo: Path, staging: Path, files: dict[str, bytes]) -> None:
    """Puts `files` (maybe damaged) into the served repository, then the staged manifest: nodes see
    a manifest whose new version is made of exactly these bytes, whichever of them they fetch."""
    for relative, data in files.items():
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        replace_file(repo / relative, data)
    replace_file(repo / "manifest.json", (staging / "manifest.json").read_bytes())


def _flipped(data: bytes) -> bytes:
    damaged = bytearray(data)
    middle = len(damaged) // 2
    for i in range(middle, min(len(damaged), middle + 64)):
        damaged[i] ^= 0xFF
    return bytes(damaged)


def test_corrupt_and_truncated_bundles_are_refused(cl, tmp_path, report):
    """A bundle whose bytes were flipped, then one cut short: each is refused (the sha256 does not
    match) while the old version keeps serving and the nodes stay ready; /status gives the reason
    naming the bundle; nothing unverified stays in the cache. The good bundle then goes live."""
    repo, url = cl.repository.directory("corrupt"), cl.repository.url("corrupt")
    staging = tmp_path / "staging"
    publish(marked_model(tmp_path, "corrupt-v1"), repo)
    nodes = start_nodes(cl, [0, 1], url)

    with cl.load(C.mixed_requests("echo"), threads=4) as load:
        # Every file v2's publish wrote (its bundle, and whatever else the publisher keeps
        # beside it) goes live with bytes flipped in its middle.
        sha2, files2 = _stage(repo, staging, marked_model(tmp_path, "corrupt-v2"))
        _go_live(repo, staging, {path: _flipped(data) for path, data in files2.items()})
        for node in nodes:
            C.wait_for(lambda node=node: any(sha2[:12] in r for r in reasons_of(node)), SYNC_TIMEOUT_S,
                       f"{node.name} to report the corrupted bundle {sha2[:12]} in /status",
                       lambda node=node: node_repository(node) + "\n" + cl.describe())
            assert serves(node, "echo", "corrupt-v1", version="1"), f"{node.name} stopped serving v1\n{cl.describe()}"
        corrupt_reasons = {n.name: [r for r in reasons_of(n) if sha2[:12] in r] for n in nodes}

        sha3, files3 = _stage(repo, staging, marked_model(tmp_path, "corrupt-v3"))
        _go_live(repo, staging, {path: data[: len(data) // 2] for path, data in files3.items()})
        for node in nodes:
            C.wait_for(lambda node=node: any(sha3[:12] in r for r in reasons_of(node)), SYNC_TIMEOUT_S,
                       f"{node.name} to report the truncated bundle {sha3[:12]} in /status",
                       lambda node=node: node_repository(node) + "\n" + cl.describe())
            assert serves(node, "echo", "corrupt-v1", version="1"), f"{node.name} stopped serving v1\n{cl.describe()}"
            cached = node_bundles(node.cache_dir)
            assert cached, f"{node.name} has no bundle in {node.cache_dir / 'repository'}, yet serves from the repository"
            assert not unverified_cached_bundles(node.cache_dir), unverified_cached_bundles(node.cache_dir)
            assert sha2 not in cached and sha3 not in cached, f"{node.name} kept a refused bundle in its cache: {cached}"
        assert cl.balancer.states() == {"n0": "UP", "n1": "UP", "n2": "DOWN"}, \
            f"a refused bundle must not make a serving node unready: {cl.balancer.states()}"
        truncated_reasons = {n.name: [r for r in reasons_of(n) if sha3[:12] in r] for n in nodes}

        # The good files go live under the same names: the nodes take them (sync asked, not waited for).
        _go_live(repo, staging, files3)
        for node in nodes:
            code, body = node.admin("POST", "/admin/v1/repository/sync")
            assert code is not None and code < 500, f"{node.name} POST /admin/v1/repository/sync: {code} {body}"
        wait_serving(cl, nodes, "echo", "corrupt-v3", version="3")
    tally = load.tally
    report(f"corrupt: {corrupt_reasons['n0'][:1]}; truncated: {truncated_reasons['n0'][:1]}; "
           f"{len(tally.answers)} requests meanwhile, {tally.failed} failed")
    assert tally.failed == 0, f"requests failed while bad bundles were refused\n{tally.describe()}"


def test_repository_unreachable(cl, tmp_path, report):
    """The repository goes away (its link down; nginx stopped on loopback): nodes keep serving what
    they have, /status reports the error; once it is back they catch up on what was published."""
    repo, url = cl.repository.directory("unreachable"), cl.repository.url("unreachable")
    publish(marked_model(tmp_path, "unreachable-v1"), repo)
    nodes = start_nodes(cl, [0, 1], url)
    with cl.load(C.mixed_requests("echo"), threads=4) as load:
        time.sleep(1.0)
        cl.partition_repository()
        cut = time.monotonic()
        publish(marked_model(tmp_path, "unreachable-v2"), repo)
        for node in nodes:
            # A poll on a kept-alive connection to a host that went silent ends at the source's
            # request timeout (30 s), not at once as a refused connection would.
            C.wait_for(lambda node=node: reasons_of(node), UNREACHABLE_REPORT_S,
                       f"{node.name} to report the unreachable repository in /status",
                       lambda node=node: node_repository(node) + "\n" + cl.describe())
        reported = time.monotonic() - cut
        time.sleep(2.0)
        for node in nodes:
            assert serves(node, "echo", "unreachable-v1", version="1"), f"{node.name} stopped serving v1\n{cl.describe()}"
        assert cl.balancer.states() == {"n0": "UP", "n1": "UP", "n2": "DOWN"}, \
            f"an unreachable repository must not make serving nodes unready: {cl.balancer.states()}"
        errors = {n.name: reasons_of(n)[:1] for n in nodes}
        cl.heal_repository()
        healed = time.monotonic()
        wait_serving(cl, nodes, "echo", "unreachable-v2", version="2")
        caught_up = time.monotonic() - healed
    tally = load.tally
    report(f"repository cut: reported after {reported:.1f} s ({errors['n0']}); both nodes on v2 {caught_up:.1f} s after "
           f"it came back; {len(tally.answers)} requests meanwhile, {tally.failed} failed")
    assert tally.failed == 0, f"requests failed while the repository was away\n{tally.describe()}"


def test_manifest_changed_during_fetch(cl, tmp_path, report):
    """v2 is a slow download (3 MB of weights, bundles limited to 200 KB/s); v3 is published while
    v2 is still being fetched. Every node ends on v3 and does not fall back to v2 once the
    v2 download ends."""
    repo, url = cl.repository.directory("midfetch"), cl.repository.url("midfetch")
    publish(marked_model(tmp_path, "midfetch-v1"), repo)
    nodes = start_nodes(cl, [0, 1], url)
    cl.repository.limit_bundle_rate("200k")
    before = repository_files(repo)
    publish(marked_model(tmp_path, "midfetch-v2", weights_bytes=3_000_000), repo)
    v2_paths = {f"/midfetch/{path}" for path in repository_files(repo) - before}
    published_v2 = time.time()
    time.sleep(3.0)  # nodes poll every second: their v2 downloads (15 s at this rate) are under way
    publish(marked_model(tmp_path, "midfetch-v3"), repo)
    published_v3 = time.time()
    took = wait_serving(cl, nodes, "echo", "midfetch-v3", version="3")
    # Until well after the v2 downloads would have ended, the nodes stay on v3.
    seen: Counter = Counter()
    while time.time() < published_v2 + 25:
        for node in nodes:
            answer = node.call(C.v2_request("echo", 1))
            seen[(node.name, answer.marker if answer.ok else answer.reason)] += 1
        time.sleep(0.2)
    cl.repository.limit_bundle_rate(None)
    v2_fetches = [e for e in cl.repository.requests() if e["path"] in v2_paths and e["bytes"] > 100_000]
    report(f"v3 published {published_v3 - published_v2:.1f} s into the v2 download: both nodes on v3 {took:.1f} s later; "
           f"v2 downloads (client, status, bytes, start and length in s): "
           f"{[(e['client'], e['status'], e['bytes'], round(e['start'] - published_v2, 1), round(e['end'] - e['start'], 1)) for e in v2_fetches]}")
    assert set(m for (_, m) in seen) == {"midfetch-v3"}, f"after reaching v3 the nodes answered {dict(seen)}"
    assert any(e["start"] < published_v3 for e in v2_fetches), \
        f"no large v2 download had started before v3 was published, so nothing overlapped: {v2_fetches} (v2 paths {v2_paths})"


def test_sigkill_under_load(cl, tmp_path, report):
    """A node killed with SIGKILL under load: haproxy drops it within its check interval; only the
    requests in flight on that node fail (counted and reported), none after; its workers exit."""
    repo, url = cl.repository.directory("sigkill"), cl.repository.url("sigkill")
    publish(marked_model(tmp_path, "sigkill-v1"), repo)
    nodes = start_nodes(cl, [0, 1], url)
    threads = 8
    with cl.load(C.mixed_requests("echo"), threads=threads) as load:
        time.sleep(3.0)
        killed_at = time.monotonic()
        nodes[1].kill()
        C.wait_for(lambda: cl.balancer.states().get("n1") == "DOWN", 10, "haproxy to mark n1 DOWN", cl.describe, interval=0.05)
        detected = time.monotonic() - killed_at
        time.sleep(4.0)
    tally = load.tally
    settled = killed_at + C.CHECK_FALL * C.CHECK_INTERVAL_S + 1.0
    in_flight = sum(tally.failures(before=killed_at + 0.1).values())
    report(f"SIGKILL of n1 under {threads} clients: DOWN in haproxy after {detected:.2f} s; {tally.failed} of "
           f"{len(tally.answers)} requests failed ({dict(tally.failures())}), {in_flight} of them sent before the kill; "
           f"{sum(tally.failures(after=settled).values())} after {settled - killed_at:.1f} s")
    assert tally.ok > 200, tally.describe()
    assert tally.failed <= threads, f"more failures than requests that could be in flight on n1\n{tally.describe()}"
    assert not tally.failures(after=settled), f"requests failed after haproxy dropped n1\n{tally.describe()}"
    if cl.mode == "netns":
        C.wait_for(lambda: not nodes[1].pids_in_namespace(), 15, "n1's workers to exit after the server's SIGKILL",
                   lambda: str(nodes[1].pids_in_namespace()))


def test_two_nodes_build_one_env_at_once(cl, tmp_path, report):
    """Two nodes sharing one empty --cache-dir start at the same moment: both serve, one
    environment is built (the other waits for it), the shared bundle cache holds verified files."""
    repo, url = cl.repository.directory("sharedenv"), cl.repository.url("sharedenv")
    publish(marked_model(tmp_path, "sharedenv-v1"), repo)
    shared = cl.workdir / "shared-cache"
    shutil.rmtree(shared, ignore_errors=True)
    started = time.monotonic()
    nodes = start_nodes(cl, [0, 1], url, cache_dir=shared)
    report(f"two nodes on one empty cache, both ready after {time.monotonic() - started:.1f} s")
    for node in nodes:
        assert serves(node, "echo", "sharedenv-v1", version="1"), f"{node.name} does not serve v1\n{cl.describe()}"
    envs = sorted(p.name for p in (shared / "envs").iterdir() if p.is_dir())
    assert len(envs) == 1, f"expected one environment in the shared cache, found {envs}"
    builds = {n.name: n.log_since_start().count("building Python environment") for n in nodes}
    assert sum(builds.values()) == 1, f"environment builds per node: {builds} (one should build, the other reuse)"
    assert node_bundles(shared) == bundles(repo), f"shared bundle cache holds {node_bundles(shared)}, published {bundles(repo)}"
    assert not unverified_cached_bundles(shared), unverified_cached_bundles(shared)
