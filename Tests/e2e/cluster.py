"""Many Sidecar nodes on one machine, across real network hops, for end-to-end tests.

    with Cluster(nodes=3) as cluster:
        cluster.node(0).start(repository=cluster.repository.url("t1"))
        ...

What it builds (the namespace version, when this process is root and `ip netns` works):

    bridge sc-XXXX-br (10.77.N.1/24: the test process's address on it)
      ├─ veth ─ namespace sc-XXXX-repo  10.77.N.2   nginx: the model repository, read-only, with ETag, port 80
      ├─ veth ─ namespace sc-XXXX-lb    10.77.N.3   haproxy: round robin over the nodes' HTTP ports,
      │                                             GET /v2/health/ready every 500 ms (200 = up)
      ├─ veth ─ namespace sc-XXXX-n0    10.77.N.10  node 0: sidecar serve (HTTP 8000, gRPC 8001, admin 8002)
      └─ veth ─ namespace sc-XXXX-n1    10.77.N.11  node 1 ...

XXXX is a random suffix per Cluster and N a free /24 (0 when it is free), so parallel runs do not
collide. Every namespace has `lo` up, no default route: nothing leaves the bridge. Each node has its
own cache directory (a node restarted with an empty cache really starts from nothing) and its own log
file. `Cluster.close()` (also at interpreter exit) stops the nodes, kills whatever still runs in the
namespaces and deletes them; a run that died before that is cleaned up by the next one (leftovers
whose owner process is gone, found by their `sc-XXXX-` names and the state files in
/run/sidecar-cluster).

Without the privilege (not root, no `ip`, or `SIDECAR_CLUSTER_NETNS=0`) the same objects run on
loopback: nodes, nginx and haproxy on 127.0.0.1 with free ports. The fallback is announced on
stderr; `SIDECAR_CLUSTER_NETNS=1` makes it an error instead.

Python environments: nodes in namespaces cannot reach a package index, so they install the worker
runtime's requirements from a wheelhouse (`--pip-arg=--no-index --pip-arg=--find-links=DIR`),
downloaded once per requirements file into .build/cluster-wheelhouse by this process (which can
reach the index). A cold environment then takes seconds, not a minute. Environment:

  SIDECAR_BIN                  the server binary (default .build/debug/sidecar)
  SIDECAR_CLUSTER_NETNS        auto (default) | 1 (namespaces or fail) | 0 (loopback)
  SIDECAR_CLUSTER_WHEELHOUSE   a directory of wheels to use instead of the downloaded one; "none":
                               no wheelhouse (nodes use pip's index, so only on loopback)
  SIDECAR_CLUSTER_LOG_LEVEL    the nodes' --log-level (default info)
  SIDECAR_CLUSTER_KEEP         1: keep the work directory (logs, caches, configs) after close

Needs nginx, haproxy and iproute2 (scripts/install-cluster-tools.sh installs them).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent.parent
SIDECAR_BIN = os.environ.get("SIDECAR_BIN", str(REPO / ".build" / "debug" / "sidecar"))
ADMIN_TOKEN = "cluster-admin-token"
PREFIX = "sc"
NAME_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{4}})-")
STATE_DIR = Path("/run/sidecar-cluster") if os.geteuid() == 0 else Path(tempfile.gettempdir()) / "sidecar-cluster-state"
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 45.0
LOG_TAIL_CHARS = 4000
# haproxy's health checks: every CHECK_INTERVAL_S, down after CHECK_FALL failures, up after one success.
CHECK_INTERVAL_S = 0.5
CHECK_FALL = 2
NODE_HTTP_PORT, NODE_GRPC_PORT, NODE_ADMIN_PORT = 8000, 8001, 8002


def say(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             describe: Callable[[], str] | None = None, interval: float = 0.2):
    """Polls `predicate` until it returns something truthy (returned). Past `timeout` raises an
    AssertionError naming `what`, the last value the predicate returned (or raised), and
    `describe()` (usually Cluster.describe: the nodes' log tails). An AssertionError raised by the
    predicate ends the wait at once; other exceptions count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except AssertionError:
            raise  # the predicate saw something that waiting cannot fix (e.g. the process exited)
        except Exception as error:  # noqa: BLE001 - shown in the message if it never succeeds
            value, last = None, f"raised {error!r}"
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = describe() if describe else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {str(last)[:1500]}\n{extra}")
        time.sleep(interval)


def _run(argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([IP, *args], check=check)


IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)), "ip")


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)
    if not found:
        raise RuntimeError(f"{name} is not installed: run scripts/install-cluster-tools.sh")
    return found


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): a pid plus its start time
    names one process even after pid numbers are recycled."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    return start_time is not None and _start_time(pid) == start_time


def _kill_tree(pid: int) -> None:
    """SIGKILL to `pid` and every process below it (nginx's workers, a node's Python workers),
    which would otherwise outlive it: they are not in its process group's way of dying."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(entry))
    doomed, queue = [], [pid]
    while queue:
        current = queue.pop()
        doomed.append(current)
        queue.extend(children.get(current, []))
    for victim in doomed:
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)


# ------------------------------------------------------------------------------------- leftovers


def clean_leftovers() -> list[str]:
    """Removes what an earlier run left behind (it crashed or was killed before its close): every
    state file whose owner is gone, with its processes, namespaces, links and work directory, and
    every `sc-XXXX-` namespace or link no live owner claims. Returns what was removed."""
    removed: list[str] = []
    live: set[str] = set()
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            suffix = path.stem
            if _alive(state.get("pid", -1), state.get("start_time")):
                live.add(suffix)
                continue
            for pid, start in state.get("processes", []):
                if _alive(pid, start):
                    _kill_tree(pid)
                    removed.append(f"process {pid} and its children")
            workdir = state.get("workdir")
            if workdir and Path(workdir).is_dir() and not state.get("keep"):
                discard(Path(workdir))
                removed.append(f"directory {workdir}")
            path.unlink(missing_ok=True)
    if os.geteuid() != 0 or not os.path.exists(IP):
        return removed
    namespaces = _ip("netns", "list", check=False).stdout.split("\n")
    for line in namespaces:
        name = line.split(" ")[0].strip()
        match = NAME_RE.match(name)
        if match and match.group(1) not in live:
            _delete_namespace(name)
            removed.append(f"namespace {name}")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = NAME_RE.match(name)
        if match and match.group(1) not in live:
            _ip("link", "delete", name, check=False)
            removed.append(f"link {name}")
    return removed


def _delete_namespace(name: str) -> None:
    """Kills every process in the namespace (nodes, their workers, nginx, haproxy), then deletes it."""
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    _ip("netns", "delete", name, check=False)


# ------------------------------------------------------------------------------------- wheelhouse


def wheelhouse() -> Path | None:
    """A directory of wheels for the worker runtime's requirements (see the module docstring)."""
    chosen = os.environ.get("SIDECAR_CLUSTER_WHEELHOUSE")
    if chosen:
        return None if chosen == "none" else Path(chosen)
    requirements = REPO / "python" / "runtime-requirements.txt"
    key = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()[:16]
    target = REPO / ".build" / "cluster-wheelhouse" / key
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=target.parent))
    say(f"downloading the worker runtime's wheels into {target} (once)")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                           "--only-binary=:all:", "-r", str(requirements), "-d", str(staging)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"pip download of {requirements} failed (set SIDECAR_CLUSTER_WHEELHOUSE to a directory of "
                           f"wheels):\n{done.stderr[-3000:]}")
    (staging / ".complete").write_text("")
    try:
        staging.rename(target)
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def discard(path: Path) -> None:
    """Removes a directory without waiting for it: renamed away at once, deleted by a detached
    `rm -rf` (deleting a few Python environments takes tens of seconds on some disks)."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.discarded-{os.urandom(3).hex()}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    subprocess.Popen(["rm", "-rf", str(trash)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


# ------------------------------------------------------------------------------------- the network


@dataclass
class Host:
    """One place processes run: a network namespace with one address, or (loopback) this machine."""
    role: str
    address: str
    namespace: str | None = None

    def command(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.namespace, *argv] if self.namespace else argv

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout)


class Network:
    """The bridge and the namespaces (mode "netns"), or nothing at all (mode "loopback")."""

    def __init__(self, suffix: str, mode: str):
        self.suffix, self.mode = suffix, mode
        self.bridge = f"{PREFIX}-{suffix}-br"
        self.namespaces: list[str] = []
        self.subnet: str | None = None
        self.host_address = "127.0.0.1"
        if mode == "netns":
            self._make_bridge()

    def _make_bridge(self) -> None:
        used = set(re.findall(r"inet 10\.77\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout))
        used |= set(re.findall(r"^10\.77\.(\d+)\.", _ip("-4", "route", "show").stdout, re.M))
        free = [n for n in range(256) if str(n) not in used]
        if not free:
            raise RuntimeError("every 10.77.N.0/24 is in use on this machine")
        n = 0 if 0 in free else random.choice(free)
        self.subnet = f"10.77.{n}"
        self.host_address = f"{self.subnet}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, role: str, last_octet: int) -> Host:
        if self.mode == "loopback":
            return Host(role, "127.0.0.1")
        namespace = f"{PREFIX}-{self.suffix}-{role}"
        peer = f"{PREFIX}{self.suffix}{role}p"
        address = f"{self.subnet}.{last_octet}"
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        _ip("link", "add", namespace, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        _ip("-n", namespace, "link", "set", peer, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "set", namespace, "master", self.bridge)
        _ip("link", "set", namespace, "up")
        return Host(role, address, namespace)

    def set_link(self, host: Host, up: bool) -> None:
        """The host's veth on the bridge side up or down: a network partition of that host."""
        assert host.namespace, "a link exists only in the namespace version"
        _ip("link", "set", host.namespace, "up" if up else "down")

    def close(self) -> None:
        for namespace in reversed(self.namespaces):
            _delete_namespace(namespace)
            _ip("link", "delete", namespace, check=False)  # gone with the namespace's peer, normally
        self.namespaces.clear()
        if self.mode == "netns":
            _ip("link", "delete", self.bridge, check=False)


# ------------------------------------------------------------------------------------- processes


class Process:
    """A long-running process of the cluster with its log file; registered with the cluster so
    close() and the next run's cleanup can find it."""

    def __init__(self, cluster: "Cluster", host: Host, argv: list[str], log_path: Path, env: dict | None = None):
        self.cluster, self.host, self.argv, self.log_path = cluster, host, argv, log_path
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            # `ip netns exec` execs the command itself: the pid is the program's.
            self.popen = subprocess.Popen(host.command(argv), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=str(REPO), env=env)
        cluster._register(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """`sig`, then SIGKILL after `timeout`; the exit code (negative: the signal that ended it)."""
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(log unreadable: {error})"


def _http(host: str, port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 5.0) -> tuple[int | None, bytes, dict]:
    """(status, body, lower-cased headers); status None and the error as body when nothing came back."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException) as error:
        return None, repr(error).encode(), {}
    finally:
        connection.close()


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


# ------------------------------------------------------------------------------------- repository


class RepositoryServer:
    """nginx serving `root` read-only (GET and HEAD, ETag, Last-Modified). Each test publishes into
    its own subdirectory (`directory(name)`) and points nodes at `url(name)`."""

    def __init__(self, cluster: "Cluster", host: Host, port: int):
        self.cluster, self.host, self.port = cluster, host, port
        self.dir = cluster.workdir / "nginx"
        self.root = cluster.workdir / "repository"
        for path in (self.dir / "tmp", self.root / "_harness"):
            path.mkdir(parents=True, exist_ok=True)
        (self.root / "_harness" / "ping").write_text("pong\n")
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.rate_file = self.dir / "bundle-rate.conf"
        self.rate_file.write_text("limit_rate 0;\n")
        self.conf = self.dir / "nginx.conf"
        user = "user root root;" if os.geteuid() == 0 else ""
        tmp = self.dir / "tmp"
        self.conf.write_text(f"""
{user}
worker_processes 1;
worker_shutdown_timeout 5s;
daemon off;
master_process on;
pid {self.dir}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 512; }}
http {{
    log_format repo '$msec $remote_addr "$request" $status $body_bytes_sent rt=$request_time inm="$http_if_none_match" ims="$http_if_modified_since"';
    access_log {self.access_log} repo;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/json json; application/gzip gz; text/plain txt; }}
    default_type application/octet-stream;
    sendfile on;
    etag on;
    server {{
        listen {host.address}:{port};
        root {self.root};
        autoindex off;
        location / {{
            limit_except GET {{ deny all; }}
            include {self.rate_file};
        }}
        location ~ /manifest\\.json$ {{
            limit_except GET {{ deny all; }}
        }}
    }}
}}
""")
        self.process: Process | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host.address}:{self.port}"

    def url(self, name: str) -> str:
        """The base URL nodes get as --repository for the test's repository `name`."""
        return f"{self.base}/{name}/"

    def directory(self, name: str) -> Path:
        """The test's repository directory (created empty): what `sidecar publish --repository` writes."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> None:
        if self.process and self.process.running():
            return
        nginx = _tool("nginx")
        self.process = Process(self.cluster, self.host,
                               [nginx, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.error_log)],
                               self.dir / "nginx.out")
        wait_for(lambda: self.get("/_harness/ping")[0] == 200 or (not self.process.running() and "exited"), 20,
                 f"nginx on {self.base}", lambda: self.process.log_tail() + self.error_tail())
        if not self.process.running():
            raise RuntimeError(f"nginx exited: {self.process.log_tail()}\n{self.error_tail()}")

    def stop(self) -> None:
        """nginx stops (SIGTERM: fast shutdown; open downloads are cut)."""
        if self.process:
            self.process.stop(signal.SIGTERM, timeout=10)

    def reload(self) -> None:
        assert self.process and self.process.running(), "nginx is not running"
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # new workers with the new configuration; old ones finish their downloads

    def limit_bundle_rate(self, rate: str | None) -> None:
        """Slows every download started from now on (bundles and whatever else the repository
        holds, manifests excepted) to `rate` per connection (nginx syntax: "256k"), or lifts the
        limit (None)."""
        self.rate_file.write_text(f"limit_rate {rate or 0};\n")
        self.reload()

    def get(self, path: str, headers: dict | None = None) -> tuple[int | None, bytes, dict]:
        return _http(self.host.address, self.port, "GET", path, headers=headers)

    def requests(self) -> list[dict]:
        """The access log parsed: [{end, start, client, method, path, status, bytes, inm, ims}]."""
        entries = []
        pattern = re.compile(r'^(\S+) (\S+) "(\S+) (\S+)[^"]*" (\d+) (\d+) rt=(\S+) inm="([^"]*)" ims="([^"]*)"')
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except OSError:
            return entries
        for line in lines:
            m = pattern.match(line)
            if m:
                end, rt = float(m.group(1)), float(m.group(7))
                entries.append({"end": end, "start": end - rt, "client": m.group(2), "method": m.group(3),
                                "path": m.group(4), "status": int(m.group(5)), "bytes": int(m.group(6)),
                                "inm": "" if m.group(8) == "-" else m.group(8),
                                "ims": "" if m.group(9) == "-" else m.group(9)})
        return entries

    def error_tail(self, chars: int = 2000) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# ------------------------------------------------------------------------------------- balancer


class Balancer:
    """haproxy in front of every node slot's HTTP port: round robin, `GET /v2/health/ready` every
    500 ms (200 = up; down after 2 failures, up after 1 success), a refused connection retried on
    another node (redispatch). Each response carries `X-Served-By: n<i>`. The stats socket tells
    which servers haproxy has up."""

    def __init__(self, cluster: "Cluster", host: Host, port: int, servers: list[tuple[str, str, int]]):
        self.cluster, self.host, self.port = cluster, host, port
        self.dir = cluster.workdir / "haproxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "admin.sock"
        self.conf = self.dir / "haproxy.cfg"
        lines = "\n".join(f"    server {name} {address}:{p}" for name, address, p in servers)
        inter = f"{int(CHECK_INTERVAL_S * 1000)}ms"
        self.conf.write_text(f"""
global
    log stdout format raw local0 info
    stats socket {self.socket} mode 600 level admin
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    timeout http-keep-alive 10s
    retries 3
    option redispatch 1

frontend cluster
    bind {host.address}:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
    default-server check inter {inter} fastinter {inter} downinter {inter} rise 1 fall {CHECK_FALL}
{lines}
""")
        self.process: Process | None = None

    def start(self) -> None:
        haproxy = _tool("haproxy")
        check = _run([haproxy, "-c", "-f", str(self.conf)], check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {self.conf}: {check.stdout}{check.stderr}")
        self.process = Process(self.cluster, self.host, [haproxy, "-db", "-f", str(self.conf)], self.dir / "haproxy.log")
        wait_for(lambda: self.states() or (not self.process.running() and "exited"), 20, "haproxy's stats socket",
                 lambda: self.process.log_tail())
        if not self.process.running():
            raise RuntimeError(f"haproxy exited: {self.process.log_tail()}")

    @property
    def address(self) -> tuple[str, int]:
        return self.host.address, self.port

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """{"n0": "UP", "n1": "DOWN", ...}: haproxy's view of each node (empty if it cannot be asked)."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        lines = [line for line in text.splitlines() if line]
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "nodes" and row.get("svname") not in ("BACKEND", "FRONTEND"):
                states[row["svname"]] = row.get("status", "?").split(" ")[0]
        return states

    def wait_states(self, up: Iterable[str], timeout: float = 30) -> dict[str, str]:
        """Waits until exactly the servers `up` are UP (every other one DOWN) in haproxy's view."""
        wanted = set(up)

        def settled():
            states = self.states()
            return states if states and {n for n, s in states.items() if s == "UP"} == wanted else None
        return wait_for(settled, timeout, f"haproxy to have exactly {sorted(wanted)} up", self.cluster.describe)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.process.log_tail(chars) if self.process else ""


# ------------------------------------------------------------------------------------- nodes


class Node:
    """One `sidecar serve` in its own namespace, with its own cache directory and log file."""

    def __init__(self, cluster: "Cluster", index: int, host: Host, ports: tuple[int, int, int]):
        self.cluster, self.index, self.host = cluster, index, host
        self.name = f"n{index}"
        self.http_port, self.grpc_port, self.admin_port = ports
        self.dir = cluster.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.dir / "cache"
        self.log_path = self.dir / "node.log"
        self.process: Process | None = None
        self.started_at: float | None = None
        self.argv: list[str] = []
        self.log_offset = 0

    # ---- addresses

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def base(self) -> str:
        """The node's HTTP URL as the test process reaches it (over the bridge)."""
        return f"http://{self.address}:{self.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.address}:{self.admin_port}"

    @property
    def repository_url(self) -> str:
        """This node's own read-only repository, for another node's --repository."""
        return f"{self.base}/repository/"

    # ---- life

    def command(self, models: Iterable[Path | str] = (), repository: str | None = None, poll_interval: float | None = 1,
                cache_dir: Path | None = None, log_level: str | None = None, extra: Iterable[str] = ()) -> list[str]:
        listen = "0.0.0.0" if self.host.namespace else self.address
        argv = [SIDECAR_BIN, "serve", *map(str, models),
                "--host", listen, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--admin-host", listen, "--admin-port", str(self.admin_port),
                "--admin-token-file", str(self.cluster.token_file),
                "--cache-dir", str(cache_dir or self.cache_dir),
                "--log-level", log_level or os.environ.get("SIDECAR_CLUSTER_LOG_LEVEL", "info")]
        if repository is not None:
            argv += ["--repository", repository]
            if poll_interval is not None:
                argv += ["--poll-interval", f"{poll_interval:g}"]
        if self.cluster.wheelhouse:
            argv += ["--pip-arg=--no-index", f"--pip-arg=--find-links={self.cluster.wheelhouse}"]
        return argv + list(extra)

    def start(self, models: Iterable[Path | str] = (), *, repository: str | None = None, poll_interval: float | None = 1,
              fresh_cache: bool = False, cache_dir: Path | None = None, wait: bool = True,
              timeout: float = READY_TIMEOUT_S, log_level: str | None = None, extra: Iterable[str] = ()) -> "Node":
        """Starts `sidecar serve` (model directories and/or `--repository`); waits until
        /v2/health/ready is 200 unless `wait` is False. `fresh_cache` empties the node's own cache
        first (a node with an empty disk); `cache_dir` uses another directory instead of it."""
        if self.running():
            raise RuntimeError(f"node {self.name} is already running")
        if fresh_cache:
            discard(cache_dir or self.cache_dir)
        self.argv = self.command(models, repository, poll_interval, cache_dir, log_level, extra)
        self._spawn()
        if wait:
            self.wait_ready(timeout)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def ready(self) -> bool:
        return self.get("/v2/health/ready", timeout=2)[0] == 200

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "Node":
        def check():
            if not self.running():
                raise AssertionError(f"node {self.name} exited with {self.process.popen.returncode} before it was ready\n"
                                     f"--- {self.name} log ---\n{self.log_tail()}")
            return self.ready()
        wait_for(check, timeout, f"node {self.name} ({self.base}) to answer /v2/health/ready with 200", self.cluster.describe)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful: finishes what is in flight), SIGKILL after `timeout`; the exit code."""
        return self.process.stop(signal.SIGTERM, timeout) if self.process else None

    def kill(self) -> int | None:
        """SIGKILL: the node dies without a word (its workers follow through their lifeline)."""
        return self.process.stop(signal.SIGKILL, 10) if self.process else None

    def restart(self, fresh_cache: bool = True, wait: bool = True, timeout: float = READY_TIMEOUT_S) -> "Node":
        """Stops the node (SIGTERM) and starts it again with the same arguments, by default with an
        empty cache (its own cache directory: a node that comes back with an empty disk)."""
        self.stop()
        if fresh_cache:
            discard(self.cache_dir)
        self._spawn()
        if wait:
            self.wait_ready(timeout)
        return self

    def _spawn(self, patience: float = 180.0) -> None:
        """Starts the process; while the binary is being rebuilt (exec fails with "Text file
        busy") tries again every second, up to `patience` seconds."""
        deadline = time.monotonic() + patience
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        while True:
            before = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self.process = Process(self.cluster, self.host, self.argv, self.log_path)
            except OSError as error:  # loopback: Popen execs the binary itself
                if error.errno != errno.ETXTBSY or time.monotonic() > deadline:
                    raise
                time.sleep(1)
                continue
            self.started_at = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(0.3)
            if self.process.running() or time.monotonic() > deadline:
                return
            with open(self.log_path, "rb") as log:
                log.seek(before)
                if b"Text file busy" not in log.read():
                    return
            time.sleep(1)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(log unreadable: {error})"

    def log_since_start(self) -> str:
        """The log of the node's latest start (start or restart) only."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(getattr(self, "log_offset", 0))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def namespace_of_process(self) -> str | None:
        """The network namespace the node's process runs in, as `ip netns identify` names it."""
        if not self.running():
            return None
        return _ip("netns", "identify", str(self.process.pid), check=False).stdout.strip() or None

    def pids_in_namespace(self) -> list[int]:
        """Every process in the node's namespace (the server and its workers)."""
        if not self.host.namespace:
            return []
        return [int(p) for p in _ip("netns", "pids", self.host.namespace, check=False).stdout.split() if p.isdigit()]

    # ---- HTTP

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, object]:
        status, data, _ = _http(self.address, self.http_port, "GET", path, timeout=timeout)
        return status, _json(data)

    def get_bytes(self, path: str, timeout: float = 10.0) -> tuple[int | None, bytes, dict]:
        return _http(self.address, self.http_port, "GET", path, timeout=timeout)

    def status(self) -> dict:
        """GET /status (raises AssertionError if it does not answer 200 with JSON)."""
        code, body = self.get("/status")
        assert code == 200 and isinstance(body, dict), f"{self.name} GET /status: {code} {str(body)[:500]}"
        return body

    def call(self, request: "Request", timeout: float = 10.0) -> "Answer":
        """One inference request straight to this node (not through haproxy)."""
        return send(self.address, self.http_port, request, timeout=timeout)[0]

    def admin(self, method: str, path: str, body: object = None, timeout: float = 120) -> tuple[int | None, object]:
        data = None if body is None else json.dumps(body).encode()
        status, raw, _ = _http(self.address, self.admin_port, method, path, body=data,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
                               timeout=timeout)
        return status, _json(raw)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus metric's samples on this node whose labels include `labels`."""
        code, text = self.get("/metrics")
        assert code == 200 and isinstance(text, str), f"{self.name} /metrics: {code}"
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.eE+-]+)$", line)
            if not m:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total


# ------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    method: str
    path: str
    body: dict | None
    check: Callable[[object], tuple[str | None, str | None]]  # parsed 200 body -> (problem, marker)


@dataclass
class Answer:
    ok: bool
    status: int | None
    version: str | None = None   # the OIP response's model_version (None for KServe v1)
    marker: str | None = None    # what the handler put in its answer (see the tests' marked models)
    served_by: str | None = None  # haproxy's X-Served-By: which node answered
    reason: str | None = None    # why not ok: "http 503: ...", "ConnectionRefusedError", "wrong answer: ..."
    body: object = None
    sent: float = 0.0            # time.monotonic() when sent and when the answer (or its absence) came
    done: float = 0.0


def v1_request(model: str, n: int) -> Request:
    """KServe v1 with one instance {"n": n}; the answer must be that instance (a marked model adds
    its "marker")."""
    def check(body):
        predictions = body.get("predictions") if isinstance(body, dict) else None
        if not (isinstance(predictions, list) and len(predictions) == 1 and isinstance(predictions[0], dict)):
            return f"expected one prediction, got {str(body)[:200]}", None
        prediction = predictions[0]
        if prediction.get("n") != n:
            return f"expected n={n}, got {str(prediction)[:200]}", None
        return None, prediction.get("marker")
    return Request("POST", f"/v1/models/{model}:predict", {"instances": [{"n": n}]}, check)


def v2_request(model: str, n: int, request_id: str | None = None, version: str | None = None) -> Request:
    """OIP v2 JSON with one INT64 tensor x=[n] (optionally an "id", optionally to one version);
    the answer must carry x=[n] (a marked model adds a BYTES output "marker")."""
    def check(body):
        outputs = body.get("outputs") if isinstance(body, dict) else None
        if not isinstance(outputs, list):
            return f"no outputs in {str(body)[:200]}", None
        by_name = {o.get("name"): o for o in outputs if isinstance(o, dict)}
        if (by_name.get("x") or {}).get("data") != [n]:
            return f"expected x=[{n}], got {str(body)[:200]}", None
        if request_id is not None and body.get("id") != request_id:
            return f"expected id {request_id!r}, got {body.get('id')!r}", None
        marker = (by_name.get("marker") or {}).get("data")
        return None, marker[0] if isinstance(marker, list) and marker else None
    path = f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"
    body: dict = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [n]}]}
    if request_id is not None:
        body["id"] = request_id
    return Request("POST", path, body, check)


def mixed_requests(model: str) -> Callable[[random.Random], Request]:
    """Half KServe v1, half OIP v2 (no id): what the load generator sends by default."""
    def make(rng: random.Random) -> Request:
        n = rng.randrange(1_000_000)
        return v1_request(model, n) if rng.random() < 0.5 else v2_request(model, n)
    return make


def send(host: str, port: int, request: Request, connection: http.client.HTTPConnection | None = None,
         timeout: float = 30.0) -> tuple[Answer, http.client.HTTPConnection | None]:
    """Sends one request (on `connection` if given: keep-alive) and judges the answer; returns the
    connection to reuse, or None when it cannot be reused."""
    sent = time.monotonic()
    conn = connection or http.client.HTTPConnection(host, port, timeout=timeout)
    data = json.dumps(request.body).encode() if request.body is not None else None
    try:
        conn.request(request.method, request.path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as error:
        conn.close()
        return Answer(False, None, reason=type(error).__name__, body=str(error)[:300], sent=sent, done=time.monotonic()), None
    done = time.monotonic()
    served_by = response.getheader("X-Served-By")
    reuse = None if response.will_close else conn
    if reuse is None:
        conn.close()
    body = _json(raw)
    if response.status != 200:
        message = body.get("error") if isinstance(body, dict) else str(body)
        return Answer(False, response.status, served_by=served_by, reason=f"http {response.status}: {str(message)[:200]}",
                      body=body, sent=sent, done=done), reuse
    problem, marker = request.check(body)
    version = body.get("model_version") if isinstance(body, dict) else None
    if problem:
        return Answer(False, 200, version, marker, served_by, f"wrong answer: {problem}", body, sent, done), reuse
    return Answer(True, 200, version, marker, served_by, None, body, sent, done), reuse


class Load:
    """Closed-loop clients through haproxy (or any address): `threads` clients each send
    `make_request(rng)` back to back on a keep-alive connection, until stop(), `duration` seconds
    or `total` requests — whichever comes first; never longer than `max_seconds`.

        with cluster.load(mixed_requests("echo"), threads=8) as load:
            ...
        tally = load.tally  (after the block)
    """

    def __init__(self, address: tuple[str, int], make_request: Callable[[random.Random], Request], threads: int = 4,
                 duration: float | None = None, total: int | None = None, max_seconds: float = 300.0, seed: int = 0):
        self.address, self.make_request, self.threads = address, make_request, threads
        self.duration, self.total, self.max_seconds, self.seed = duration, total, max_seconds, seed
        self.tally = Tally()
        self._stop = threading.Event()
        self._count = 0
        self._count_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.started = 0.0

    def start(self) -> "Load":
        self.started = time.monotonic()
        for n in range(self.threads):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True, name=f"load-{n}")
            thread.start()
            self._workers.append(thread)
        return self

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self) -> "Tally":
        """Waits until the load ends by itself (duration or total)."""
        for thread in self._workers:
            thread.join(self.max_seconds + 60)
        return self.tally

    def stop(self) -> "Tally":
        self._stop.set()
        return self.wait()

    def _take(self) -> bool:
        with self._count_lock:
            if self.total is not None and self._count >= self.total:
                return False
            self._count += 1
            return True

    def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        connection = None
        limit = self.started + min(self.duration if self.duration is not None else self.max_seconds, self.max_seconds)
        while not self._stop.is_set() and time.monotonic() < limit and self._take():
            answer, connection = send(*self.address, self.make_request(rng), connection)
            self.tally.add(answer)
            if answer.status is None:
                time.sleep(0.02)  # nothing answers: do not spin on connect()
        if connection is not None:
            connection.close()


class Tally:
    """What the clients saw: every answer, with counts by outcome, failure reason, version, marker
    and the node that answered."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers: list[Answer] = []

    def add(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def _list(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    @property
    def ok(self) -> int:
        return sum(1 for a in self._list() if a.ok)

    @property
    def failed(self) -> int:
        return sum(1 for a in self._list() if not a.ok)

    def failures(self, after: float = float("-inf"), before: float = float("inf")) -> Counter:
        """Failed requests by reason, among those sent in [after, before)."""
        return Counter(a.reason for a in self._list() if not a.ok and after <= a.sent < before)

    def versions(self) -> Counter:
        return Counter(a.version for a in self._list() if a.ok)

    def markers(self) -> Counter:
        return Counter(a.marker for a in self._list() if a.ok)

    def served_by(self) -> Counter:
        return Counter(a.served_by for a in self._list() if a.ok)

    def describe(self) -> str:
        answers = self._list()
        failed = [a for a in answers if not a.ok]
        lines = [f"{len(answers)} requests: {len(answers) - len(failed)} ok, {len(failed)} failed",
                 f"  failures by reason: {dict(Counter(a.reason for a in failed))}",
                 f"  versions: {dict(self.versions())}  markers: {dict(self.markers())}  served by: {dict(self.served_by())}"]
        start = answers[0].sent if answers else 0.0
        for a in failed[:8]:
            lines.append(f"  failed at +{a.sent - start:.2f} s via {a.served_by}: {a.reason} {str(a.body)[:160]}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- CLI


def sidecar(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the sidecar CLI here (publish, rollback, sync, ...); with `check` a non-zero exit is an
    AssertionError showing its output."""
    env = dict(os.environ, SIDECAR_ADMIN_TOKEN=ADMIN_TOKEN)
    done = subprocess.run([SIDECAR_BIN, *args], capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)
    if check:
        assert done.returncode == 0, (f"sidecar {' '.join(args)} exited {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}"
                                      f"\n--- stderr ---\n{done.stderr[-3000:]}")
    return done


# ------------------------------------------------------------------------------------- cluster


def namespaces_possible() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists(IP):
        return "no `ip` command (apt-get install iproute2)"
    probe = f"{PREFIX}-{os.urandom(2).hex()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


class Cluster:
    """`nodes` node slots (namespaces made up front, processes started by the tests), nginx for the
    repository and haproxy in front of the slots. A context manager; close() is idempotent and
    also runs at interpreter exit."""

    def __init__(self, nodes: int = 3, mode: str | None = None):
        self.size = nodes
        self.closed = False
        self.processes: list[tuple[int, str | None]] = []
        self.suffix = os.urandom(2).hex()
        self.keep = os.environ.get("SIDECAR_CLUSTER_KEEP") == "1"
        for item in clean_leftovers():
            say(f"removed a leftover of an earlier run: {item}")
        wanted = mode or {"0": "loopback", "1": "netns"}.get(os.environ.get("SIDECAR_CLUSTER_NETNS", "auto"), "auto")
        if wanted in ("auto", "netns"):
            why_not = namespaces_possible()
            if why_not and wanted == "netns":
                raise RuntimeError(f"network namespaces were required (SIDECAR_CLUSTER_NETNS=1) but cannot be made: {why_not}")
            if why_not:
                say(f"NETWORK NAMESPACES UNAVAILABLE ({why_not}): the nodes, nginx and haproxy run on loopback ports instead")
            wanted = "loopback" if why_not else "netns"
        self.mode = wanted
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sidecar-cluster-{self.suffix}-"))
        self.token_file = self.workdir / "admin-token"
        self.token_file.write_text(ADMIN_TOKEN + "\n")
        self.token_file.chmod(0o600)
        self._write_state()
        atexit.register(self.close)
        self.network: Network | None = None
        try:
            self.wheelhouse = wheelhouse()
            if self.wheelhouse is None and self.mode == "netns":
                say("no wheelhouse: nodes in namespaces cannot reach a package index, so cold environments will fail")
            self.network = Network(self.suffix, self.mode)
            loop = self.mode == "loopback"
            repo_host = self.network.host("repo", 2)
            lb_host = self.network.host("lb", 3)
            self.nodes: list[Node] = []
            for i in range(nodes):
                host = self.network.host(f"n{i}", 10 + i)
                ports = (free_port(), free_port(), free_port()) if loop else (NODE_HTTP_PORT, NODE_GRPC_PORT, NODE_ADMIN_PORT)
                self.nodes.append(Node(self, i, host, ports))
            self.repository = RepositoryServer(self, repo_host, free_port() if loop else 80)
            self.repository.start()
            self.balancer = Balancer(self, lb_host, free_port() if loop else 80,
                                     [(n.name, n.address, n.http_port) for n in self.nodes])
            self.balancer.start()
            if self.mode == "netns":
                self._check_paths()
            say(f"{self.mode} cluster {self.suffix}: repository {self.repository.base}, balancer "
                f"{self.balancer.address[0]}:{self.balancer.address[1]}, nodes "
                f"{', '.join(n.address + ':' + str(n.http_port) for n in self.nodes)}; work directory {self.workdir}")
        except BaseException:
            self.close()
            raise

    # ---- bookkeeping

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "workdir": str(self.workdir),
                 "mode": getattr(self, "mode", None), "keep": self.keep, "processes": self.processes}
        path = STATE_DIR / f"{self.suffix}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def _register(self, pid: int) -> None:
        self.processes.append((pid, _start_time(pid)))
        self._write_state()

    def _check_paths(self) -> None:
        """The paths the tests rely on: this process → repository and balancer over the bridge
        (checked by their start), node namespaces → repository."""
        node = self.nodes[0]
        done = node.host.run([sys.executable, "-c",
                              "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                              f"{self.repository.base}/_harness/ping"], timeout=30)
        if done.returncode != 0 or "pong" not in done.stdout:
            raise RuntimeError(f"namespace {node.host.namespace} cannot reach the repository {self.repository.base}: "
                               f"{done.stdout}{done.stderr}")

    # ---- use

    def node(self, index: int) -> Node:
        return self.nodes[index]

    def load(self, make_request: Callable[[random.Random], Request], threads: int = 4, **kwargs) -> Load:
        """A load generator through haproxy (not started: use it as a context manager, or .start())."""
        return Load(self.balancer.address, make_request, threads, **kwargs)

    def through_balancer(self, request: Request, timeout: float = 10.0) -> Answer:
        return send(*self.balancer.address, request, timeout=timeout)[0]

    def partition_repository(self) -> None:
        """The repository becomes unreachable: its veth goes down (namespaces) or nginx stops (loopback)."""
        if self.mode == "netns":
            self.network.set_link(self.repository.host, up=False)
        else:
            self.repository.stop()

    def heal_repository(self) -> None:
        if self.mode == "netns":
            self.network.set_link(self.repository.host, up=True)
        self.repository.start()

    def reset(self) -> list[str]:
        """Between tests: every node stopped (SIGTERM), the repository reachable and unthrottled.
        Returns what was odd about the stops (a node slower than 10 s, or exiting non-zero)."""
        odd = []
        for node in self.nodes:
            if node.running():
                started = time.monotonic()
                code = node.stop()
                took = time.monotonic() - started
                if took > 10 or code != 0:
                    odd.append(f"{node.name} took {took:.1f} s to stop after SIGTERM, exit code {code}")
        for line in odd:
            say(line)
        self.heal_repository()
        if self.repository.rate_file.read_text() != "limit_rate 0;\n":
            self.repository.limit_bundle_rate(None)
        return odd

    def describe(self, chars: int = LOG_TAIL_CHARS) -> str:
        """For failure messages: haproxy's view, every node that ran (state and log tail), nginx's errors."""
        parts = [f"--- cluster {self.suffix} ({self.mode}), work directory {self.workdir}"]
        with contextlib.suppress(Exception):
            parts.append(f"haproxy sees: {self.balancer.states()}")
        for node in self.nodes:
            if node.process is None:
                continue
            state = "running" if node.running() else f"exited {node.process.popen.returncode}"
            parts.append(f"--- {node.name} {node.address}:{node.http_port} ({state}) log tail ---\n{node.log_tail(chars)}")
        with contextlib.suppress(Exception):
            errors = self.repository.error_tail(800)
            if errors.strip():
                parts.append(f"--- nginx error log tail ---\n{errors}")
        return "\n".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        problems = []
        started = time.monotonic()
        steps: dict[str, float] = {}
        for node in getattr(self, "nodes", []):
            try:
                if node.running():
                    node.stop(timeout=20)
            except Exception as error:  # noqa: BLE001 - keep tearing down
                problems.append(f"{node.name}: {error!r}")
        for server in (getattr(self, "balancer", None), getattr(self, "repository", None)):
            try:
                if server is not None and server.process is not None:
                    server.process.stop(signal.SIGTERM, timeout=5)  # nginx stops its workers first
            except Exception as error:  # noqa: BLE001
                problems.append(f"{type(server).__name__}: {error!r}")
        steps["nodes"] = time.monotonic() - started
        for pid, start in self.processes:
            if _alive(pid, start):
                _kill_tree(pid)
        try:
            if self.network:
                self.network.close()
        except Exception as error:  # noqa: BLE001
            problems.append(f"network: {error!r}")
        steps["network"] = time.monotonic() - started - steps["nodes"]
        if not self.keep:
            discard(self.workdir)
        else:
            say(f"kept {self.workdir}")
        (STATE_DIR / f"{self.suffix}.json").unlink(missing_ok=True)
        if problems:
            say(f"teardown problems: {problems}")
        took = time.monotonic() - started
        if took > 10:
            say(f"closing the cluster took {took:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in steps.items())})")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
