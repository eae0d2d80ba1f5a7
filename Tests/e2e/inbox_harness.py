"""Helpers of the Redis Streams inbox/outbox end-to-end tests (Tests/e2e/test_inbox.py) and of
scripts/bench-inbox.py: a real redis-server on a free loopback port in its own directory, real
`sidecar serve --config FILE` processes with an `inboxes:` block, and the stream reads that the
assertions are made of.

Nothing here imports pytest: a broken expectation raises HarnessError (an AssertionError, so pytest
reports it as a failure with its message), and every message carries the logs that explain it.

Environment:
  SIDECAR_BIN        the server binary (default /work/main/.build/debug/sidecar)
  SIDECAR_CACHE_DIR  environment cache (default /work/main/.build/test-cache), passed as cache_dir
  SIDECAR_LOG_LEVEL  the servers' --log-level (default info: a failure shows what each node did)
  REDIS_SERVER       the broker binary (default: redis-server on PATH, else /usr/bin/redis-server)
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import redis
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODELS = HERE / "models"
SIDECAR_BIN = os.environ.get("SIDECAR_BIN", str(REPO / ".build" / "debug" / "sidecar"))
CACHE_DIR = os.environ.get("SIDECAR_CACHE_DIR", str(REPO / ".build" / "test-cache"))
LOG_LEVEL = os.environ.get("SIDECAR_LOG_LEVEL", "info")
INSTALL_HINT = "run scripts/install-broker-tools.sh (installs redis-server and libhiredis-dev from Debian)"

# The first start on a fresh cache builds the Python environment (pip); later starts take seconds.
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 45.0
LOG_TAIL_CHARS = 8000


class HarnessError(AssertionError):
    """A setup step or an expectation that did not hold; the message says which, with the logs."""


# ------------------------------------------------------------------------------------------- basics


def free_port(avoid: Iterable[int] = ()) -> int:
    avoid = set(avoid)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05):
    """Polls `predicate` until it returns something truthy (returned) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as error:
        return f"(log {path} unreadable: {error})"


def redis_server_binary() -> str:
    """The redis-server binary, or HarnessError saying how to install it (never a skip)."""
    candidate = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise HarnessError(f"redis-server not found ({candidate}): {INSTALL_HINT}")
    return candidate


def sidecar_binary(binary: str | None = None) -> str:
    binary = binary or SIDECAR_BIN
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise HarnessError(f"sidecar binary not found or not executable: {binary} (set SIDECAR_BIN)")
    return binary


# ------------------------------------------------------------------------------------------- broker


class RedisServer:
    """One redis-server on 127.0.0.1:port with its own directory and log.

    `persistent`: append-only file with fsync on every write (`--appendonly yes --appendfsync
    always`), so a stop (SIGTERM) and a start on the same port and directory lose nothing; otherwise
    no persistence at all. RDB snapshots are always off (`--save ''`)."""

    def __init__(self, directory: Path, persistent: bool = False, port: int | None = None, password: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.password = password
        self.port = port or free_port()
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--logfile", str(self.log_path), "--save", "",
                "--daemonize", "no", "--databases", "4"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout: float = 15.0) -> "RedisServer":
        if self.process is not None and self.process.poll() is None:
            raise HarnessError(f"redis-server on port {self.port} is already running")
        command = self.command()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd=str(self.directory))
        probe = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1,
                            socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise HarnessError(f"redis-server exited with {code} at start; command {command}\n"
                                       f"--- redis log ---\n{self.log_tail()}")
                try:
                    # Loaded: a restart with an append-only file answers LOADING until it has read it.
                    if probe.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise HarnessError(f"redis-server not answering PING on port {self.port} after {timeout} s\n"
                                       f"--- redis log ---\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Sends `sig` (SIGTERM: redis writes and fsyncs what it must, then exits 0) and waits."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise HarnessError(f"redis-server did not exit within {timeout} s of signal {sig}\n{self.log_tail()}")
        return self.process.returncode

    def close(self) -> None:
        """Teardown: clients closed, the server killed if still running."""
        for client in self._clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - teardown of a client whose server may be gone
                pass
        self._clients.clear()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self, decode: bool = True, **options) -> redis.Redis:
        """A redis-py client; closed by close(). decode=True gives str fields (the tests' case)."""
        options.setdefault("password", self.password)
        options.setdefault("socket_timeout", 30)
        options.setdefault("socket_connect_timeout", 5)
        client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=decode, **options)
        self._clients.append(client)
        return client

    def log_tail(self, chars: int = 3000) -> str:
        return tail(self.log_path, chars)


# ------------------------------------------------------------------------------------------ models


def copy_model(source: Path, into: Path, name: str | None = None, overrides: dict | None = None) -> Path:
    """A private copy of a model directory (so a test can write its sidecar.yaml), its sidecar.yaml
    deep-merged with `overrides`, and renamed to `name` if given."""
    target = Path(into) / (name or Path(source).name)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / "sidecar.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else {}
    config = config or {}
    if name:
        config["name"] = name
    if overrides:
        config = merge(config, overrides)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# -------------------------------------------------------------------------------------------- server


class SidecarServer:
    """One node: `sidecar serve --config FILE` with `models`, fresh `http_port`/`grpc_port` on each
    start, `admin_port: off`, `cache_dir` and `inboxes`. The log (stdout and stderr) of every life is
    appended to one file, each life headed by a line naming it, so a restart's story reads in order.
    """

    def __init__(self, workdir: Path, name: str, models: list[Path], inboxes: dict | None = None,
                 extra: dict | None = None, binary: str | None = None, log_level: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.models = [Path(m) for m in models]
        self.inboxes = inboxes
        self.extra = extra or {}
        self.binary = binary
        self.log_level = log_level or LOG_LEVEL
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.http_port = 0
        self.grpc_port = 0
        self.process: subprocess.Popen | None = None
        self.lives = 0
        self._log_file = None

    # ---- life

    def write_config(self) -> dict:
        self.http_port = free_port()
        self.grpc_port = free_port(avoid=[self.http_port])
        config: dict = {
            "models": [str(m) for m in self.models],
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "admin_port": "off",
            "cache_dir": CACHE_DIR,
        }
        if self.inboxes is not None:
            config["inboxes"] = self.inboxes
        config.update(self.extra)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return config

    def spawn(self) -> "SidecarServer":
        """Starts the process and returns at once (it may still be loading)."""
        if self.process is not None and self.process.poll() is None:
            raise HarnessError(f"{self.name} is already running (pid {self.process.pid})")
        binary = sidecar_binary(self.binary)
        self.write_config()
        self.lives += 1
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== {self.name}: life {self.lives}, http {self.http_port} =====\n".encode())
        self._log_file.flush()
        command = [binary, "serve", "--config", str(self.config_path), "--log-level", self.log_level]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, cwd=str(REPO))
        return self

    def start(self, timeout: float = READY_TIMEOUT_S) -> "SidecarServer":
        return self.spawn().wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "SidecarServer":
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise HarnessError(f"{self.name}: sidecar serve exited with {code} before ready\n"
                                   f"--- config ---\n{self.config_path.read_text()}\n--- log ---\n{self.log_tail()}")
            if self.get("/v2/health/ready", timeout=2)[0] == 200:
                return self
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name}: not ready after {timeout} s\n--- log ---\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL and reap; the return code (-9)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(30)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (SIGCONT first, in case it is stopped), then SIGKILL if it lingers. The exit code,
        or HarnessError if it had to be killed."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGCONT)
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise HarnessError(f"{self.name}: did not exit within {timeout} s of SIGTERM\n--- log ---\n{self.log_tail()}")
        return self.process.returncode

    def close(self) -> None:
        """Teardown: kills what is still running (SIGCONT first), closes the log."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.process.kill()
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return tail(self.log_path, chars)

    # ---- HTTP

    def request(self, method: str, path: str, body: object | None = None, timeout: float = 5.0) -> tuple[int | None, object]:
        """(status, parsed JSON body or text); status None when there was no response."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            return None, None
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, object]:
        return self.request("GET", path, timeout=timeout)

    def status(self) -> dict:
        code, body = self.get("/status")
        if code != 200 or not isinstance(body, dict):
            raise HarnessError(f"{self.name}: GET /status answered {code}: {str(body)[:500]}\n--- log ---\n{self.log_tail()}")
        return body

    def inbox_status(self, model: str, stream: str | None = None) -> dict:
        """The /status "inboxes" entry of `model` (and `stream`)."""
        body = self.status()
        entries = body.get("inboxes")
        if not isinstance(entries, list):
            raise HarnessError(f"{self.name}: GET /status has no \"inboxes\" list: {json.dumps(body)[:1500]}")
        for entry in entries:
            if isinstance(entry, dict) and entry.get("model") == model and (stream is None or entry.get("stream") == stream):
                return entry
        raise HarnessError(f"{self.name}: GET /status lists no inbox for model {model!r} stream {stream!r}: {entries}")

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        if code != 200:
            raise HarnessError(f"{self.name}: GET /metrics answered {code}")
        return body if isinstance(body, str) else json.dumps(body)

    def predict_v1(self, model: str, instances: list) -> tuple[int | None, object]:
        return self.request("POST", f"/v1/models/{model}:predict", {"instances": instances}, timeout=30)


# ----------------------------------------------------------------------------------------- metrics


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        key = text[i:eq].strip().lstrip(",").strip()
        assert text[eq + 1] == '"', text
        j = eq + 2
        value = []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
            value.append(text[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return labels


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` (exactly that name) in Prometheus text."""
    found = []
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name):]
        if rest.startswith("{"):
            close = rest.rindex("}")
            labels = _parse_labels(rest[1:close])
            value = rest[close + 1:].split()
        elif rest.startswith(" "):
            labels, value = {}, rest.split()
        else:
            continue  # a longer name with this prefix
        if value:
            found.append((labels, float(value[0])))
    return found


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None if there is none."""
    values = [v for l, v in metric_samples(text, name) if all(l.get(k) == want for k, want in labels.items())]
    return sum(values) if values else None


# ------------------------------------------------------------------------------------------ streams


def item_messages(count: int, prefix: str = "req", start: int = 0) -> list[dict[str, str]]:
    """`count` inbox messages {"id", "item"} with distinct JSON items (an echo answers each with its item)."""
    return [{"id": f"{prefix}-{n}", "item": json.dumps({"n": n, "text": f"{prefix} {n}", "v": [n % 7, n * 0.5]})}
            for n in range(start, start + count)]


def xadd_all(client: redis.Redis, stream: str, messages: list[dict], chunk: int = 1000) -> list[str]:
    """XADDs every message in order, pipelined by `chunk`; the entry ids, in order."""
    ids: list[str] = []
    for start in range(0, len(messages), chunk):
        pipe = client.pipeline(transaction=False)
        for fields in messages[start:start + chunk]:
            pipe.xadd(stream, fields)
        ids += [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]
    return ids


def read_stream(client: redis.Redis, stream: str, chunk: int = 5000) -> list[tuple[str, dict]]:
    """Every entry of `stream` as (entry id, fields), oldest first; [] if it does not exist."""
    entries: list[tuple[str, dict]] = []
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=chunk)
        if not batch:
            return entries
        entries += batch
        if len(batch) < chunk:
            return entries
        last = batch[-1][0]
        start = "(" + last


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    """XPENDING's count for the group (0 if the stream or the group does not exist yet)."""
    try:
        return int(client.xpending(stream, group)["pending"])
    except redis.exceptions.ResponseError as error:
        if "NOGROUP" in str(error):
            return 0
        raise


def pending_by_consumer(client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    try:
        summary = client.xpending(stream, group)
    except redis.exceptions.ResponseError as error:
        if "NOGROUP" in str(error):
            return {}
        raise
    return {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}


def pending_entries(client: redis.Redis, stream: str, group: str, consumer: str | None = None,
                    count: int = 100000) -> list[dict]:
    """XPENDING's extended form: [{message_id, consumer, time_since_delivered, times_delivered}]."""
    try:
        if consumer is None:
            return client.xpending_range(stream, group, "-", "+", count)
        return client.xpending_range(stream, group, "-", "+", count, consumername=consumer)
    except redis.exceptions.ResponseError as error:
        if "NOGROUP" in str(error):
            return []
        raise


def group_info(client: redis.Redis, stream: str, group: str) -> dict | None:
    try:
        for info in client.xinfo_groups(stream):
            if info.get("name") == group:
                return info
    except redis.exceptions.ResponseError:
        return None
    return None


def distinct_ids(client: redis.Redis, stream: str) -> set[str]:
    return {fields.get("id") for _, fields in read_stream(client, stream)}


def group_results(entries: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """Outbox entries grouped by their `id` field: id -> [(entry id, fields), ...]."""
    by_id: dict[str, list[tuple[str, dict]]] = {}
    for entry_id, fields in entries:
        by_id.setdefault(fields.get("id"), []).append((entry_id, fields))
    return by_id


def exactly_once(entries: list[tuple[str, dict]], expected: Iterable[str]) -> tuple[dict[str, dict], list[str]]:
    """Checks an outbox against the request ids sent: (id -> the one result's fields, problems).
    A problem for every missing id, duplicated id, and id that was never sent (samples shown)."""
    expected = list(expected)
    by_id = group_results(entries)
    problems = []
    missing = [i for i in expected if i not in by_id]
    duplicated = {i: len(v) for i, v in by_id.items() if len(v) > 1}
    unexpected = sorted(set(by_id) - set(expected), key=str)
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} ids have no result, e.g. {missing[:10]}")
    if duplicated:
        sample = {i: [e for e, _ in by_id[i]] for i in list(duplicated)[:5]}
        problems.append(f"{len(duplicated)} ids have more than one result, e.g. {sample} "
                        f"(counts {dict(list(duplicated.items())[:10])})")
    if unexpected:
        problems.append(f"{len(unexpected)} results for ids never sent, e.g. {unexpected[:10]}")
    return {i: v[0][1] for i, v in by_id.items()}, problems
