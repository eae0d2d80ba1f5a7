#!/usr/bin/env python3
"""Fault injection ("chaos") for `sidecar serve`: the scenarios of "Supervision that loses nothing".

Each scenario starts its own `sidecar serve` on free ports with a private copy of the faulty test
model (Tests/e2e/models/faulty, see its handler.py), drives load at it with plain HTTP clients,
injects one kind of fault and returns a Result with the counts of what the clients saw:

  sent      requests that reached the server (a connection was made and the request written)
  ok        2xx with the right answer (the echo of what was sent)
  failed    an HTTP error response, or a 2xx with a wrong answer
  rejected  an expected, clean refusal: 429 (and 503 while shutting down)
  lost      no HTTP response at all: reset, closed, or nothing within REQUEST_TIMEOUT_S

plus scenario facts (kills, detection times, RSS, ...) and `problems`: the expectations of the
contract that did not hold, in words. An empty `problems` list is a pass.

  python scripts/chaos.py                 # every scenario, then the table
  python scripts/chaos.py kill9 poison    # some of them
  python scripts/chaos.py -v ...          # with the facts of passing scenarios too

Environment: SIDECAR_BIN (default .build/debug/sidecar), SIDECAR_CACHE_DIR (default
.build/test-cache), SIDECAR_LOG_LEVEL (default warning). Needs PyYAML (scripts/chaos.sh installs it).
Importable: Tests/e2e/test_faults.py calls the scenario functions and asserts on their results.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent
FAULTY_MODEL = REPO / "Tests" / "e2e" / "models" / "faulty"
ECHO_MODEL = REPO / "Examples" / "echo"
SIDECAR_BIN = os.environ.get("SIDECAR_BIN", str(REPO / ".build" / "debug" / "sidecar"))
CACHE_DIR = os.environ.get("SIDECAR_CACHE_DIR", str(REPO / ".build" / "test-cache"))
# warning keeps the logs to what went wrong; info or debug when a scenario needs explaining.
LOG_LEVEL = os.environ.get("SIDECAR_LOG_LEVEL", "warning")

# A request without any response after this long counts as lost. Far above every latency the
# scenarios cause (a hung worker is detected in ping_timeout_s = 2 s), so only real losses land here.
REQUEST_TIMEOUT_S = 30.0
# The first start of a fresh cache builds the Python environment (pip); later starts take seconds.
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 45.0
LOG_TAIL_CHARS = 6000


# ------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    scenario: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    rejected: int = 0
    lost: int = 0
    facts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems

    def expect(self, condition: bool, problem: str) -> bool:
        """Records `problem` when `condition` is false, so one run reports every broken expectation
        instead of stopping at the first."""
        if not condition:
            self.problems.append(problem)
        return condition

    def take_counts(self, tally: "Tally", closing: bool = False) -> None:
        """`closing`: the server closes its listener during the load, so connections reset with their
        request unread are expected (and never accepted); otherwise each one is a problem."""
        self.sent, self.ok, self.failed = tally.sent, tally.counts["ok"], tally.counts["failed"]
        self.rejected, self.lost = tally.counts["rejected"], tally.counts["lost"]
        if tally.counts["refused"]:
            self.notes.append(f"{tally.counts['refused']} connections refused (never accepted)")
        if tally.counts["unread"]:
            self.notes.append(f"{tally.counts['unread']} connections reset before the server read the request (never accepted)")
            self.expect(closing, f"{tally.counts['unread']} connections reset with their request unread while the server was serving")
        for kind in ("failed", "lost", "unread"):
            if tally.samples[kind]:
                self.facts[f"{kind}_samples"] = tally.samples[kind]

    def describe(self, log: bool = True) -> str:
        """Everything a failing assertion should show: counts, facts, problems, the server log."""
        lines = [f"scenario {self.scenario}: sent {self.sent} ok {self.ok} failed {self.failed} "
                 f"rejected {self.rejected} lost {self.lost}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  {k}: {v}" for k, v in self.facts.items()]
        if log:
            lines += ["--- sidecar log (tail) ---", self.log_tail or "(empty)"]
        return "\n".join(lines)


# -------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_model(source: Path, into: Path, overrides: dict | None = None) -> Path:
    """A private copy of a model directory, its sidecar.yaml deep-merged with `overrides`.

    Scenarios toggle files (BROKEN) and settings in the copy, never in the repository, so they can
    run concurrently with other tests and leave nothing behind."""
    target = into / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "BROKEN"))
    if overrides:
        path = target / "sidecar.yaml"
        config = yaml.safe_load(path.read_text()) or {}
        path.write_text(yaml.safe_dump(_merge(config, overrides), sort_keys=False))
    return target


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class Sidecar:
    """One `sidecar serve` process for one scenario (a context manager: stops it, keeps the log)."""

    def __init__(self, models: list[Path], workdir: Path, extra_args: list[str] | None = None):
        self.models = models
        self.extra_args = extra_args or []
        self.http_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.admin_port = free_port()
        while self.admin_port in (self.http_port, self.grpc_port):
            self.admin_port = free_port()
        self.log_path = workdir / "sidecar.log"
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # ---- life

    def start(self) -> "Sidecar":
        if not (os.path.isfile(SIDECAR_BIN) and os.access(SIDECAR_BIN, os.X_OK)):
            raise RuntimeError(f"sidecar binary not found or not executable: {SIDECAR_BIN} (set SIDECAR_BIN)")
        command = [
            SIDECAR_BIN, "serve", *map(str, self.models),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--admin-port", str(self.admin_port),
            "--cache-dir", CACHE_DIR, "--log-level", LOG_LEVEL, *self.extra_args,
        ]
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=str(REPO))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"sidecar serve exited with {code} before ready\n{self.log_tail()}")
            if self.get("/v2/health/ready", timeout=2)[0] == 200:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar serve not ready after {READY_TIMEOUT_S} s\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; the exit code (None if it was never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> "Sidecar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(log unreadable: {error})"

    # ---- HTTP

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, object]:
        """(status, parsed JSON body or text); status None when there was no response."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            return None, None
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def model_status(self, model: str) -> dict | None:
        """GET /status/{model}, or None when the server does not answer it with 200."""
        status, body = self.get(f"/status/{model}")
        return body if status == 200 and isinstance(body, dict) else None

    def workers(self, model: str) -> tuple[list[dict], str]:
        """The model's workers as [{index, pid, state, restarts}] and where that came from.

        /status is the contract; the process table is the fallback (state "unknown"), so scenarios
        that only need pids (kill -9, lifeline) also run against a server without /status."""
        status = self.model_status(model)
        if status is not None and isinstance(status.get("workers"), list):
            return status["workers"], "status"
        return [{"index": index, "pid": pid, "state": "unknown", "restarts": None}
                for pid, index in worker_processes(self.pid, model)], "proc"

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid)


# ------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; the command name may contain spaces and
    parentheses, so the fields are read after its last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has run its last instruction; once the
    sidecar dies its workers are reparented, and whoever reaps them is not us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def worker_of(pid: int, model_dir: Path) -> bool:
    """`pid` is a live worker serving `model_dir` (a scenario's private copy, so no other process's).

    pids come from /status or an earlier look, and pid numbers are recycled quickly (pid_max is
    often 32768): a bare pid could by now be an unrelated process, e.g. another test's worker."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    if "sidecar_worker" not in args or "--model-dir" not in args:
        return False
    return args[args.index("--model-dir") + 1] == str(model_dir) and alive(pid)


def signal_worker(pid: int, sig: int, model_dir: Path) -> bool:
    """Sends `sig` to `pid` if it is one of the scenario's workers (see worker_of)."""
    if not worker_of(pid, model_dir):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def worker_processes(parent: int, model: str) -> list[tuple[int, int]]:
    """(pid, worker index) of the live `python -m sidecar_worker --model-name MODEL` children of
    `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is None or stat[1] != parent or stat[0] in ("Z", "X"):
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "sidecar_worker" not in args or "--model-name" not in args:
            continue
        if args[args.index("--model-name") + 1] != model:
            continue
        index = int(args[args.index("--worker-index") + 1]) if "--worker-index" in args else -1
        found.append((int(entry), index))
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------- clients


@dataclass
class Call:
    """One request: where, what, and how to tell a right answer from a wrong one."""
    path: str
    body: dict
    verify: Callable[[object], str | None]  # parsed 2xx body -> None if right, else what is wrong
    headers: dict = field(default_factory=dict)


@dataclass
class Outcome:
    kind: str  # ok | failed | rejected | lost | refused | unread
    status: int | None
    seconds: float
    finished: float  # time.monotonic() when the answer (or its absence) was known
    message: str = ""
    headers: dict = field(default_factory=dict)


def v1_call(model: str, item) -> Call:
    """KServe v1 with one instance; the faulty and echo models answer with the item itself."""
    def verify(body):
        predictions = body.get("predictions") if isinstance(body, dict) else None
        return None if predictions == [item] else f"expected predictions [{item!r}], got {str(body)[:200]}"
    return Call(f"/v1/models/{model}:predict", {"instances": [item]}, verify)


def v2_call(model: str, number: int) -> Call:
    """OIP v2 JSON with one INT64 tensor; an echo handler returns it as the output of that name."""
    def verify(body):
        outputs = body.get("outputs") if isinstance(body, dict) else None
        data = outputs[0].get("data") if outputs and isinstance(outputs[0], dict) else None
        return None if data == [number] else f"expected data [{number}], got {str(body)[:200]}"
    return Call(f"/v2/models/{model}/infer",
                {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [number]}]}, verify)


def send(port: int, call: Call, rejects=frozenset({429}), connection: http.client.HTTPConnection | None = None,
         timeout: float = REQUEST_TIMEOUT_S) -> tuple[Outcome, http.client.HTTPConnection | None]:
    """Sends one request and classifies what came back. Reuses `connection` (keep-alive) when given;
    returns the connection to reuse next, or None when it is no longer usable."""
    started = time.monotonic()
    conn = connection
    try:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.connect()  # separately, so a refusal (never accepted) is told apart from a loss
    except ConnectionRefusedError as error:
        return Outcome("refused", None, time.monotonic() - started, time.monotonic(), repr(error)), None
    except OSError as error:
        return Outcome("lost", None, time.monotonic() - started, time.monotonic(), f"connect: {error!r}"), None
    body = json.dumps(call.body).encode()
    try:
        conn.request("POST", call.path, body=body, headers={"Content-Type": "application/json", **call.headers})
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as error:
        conn.close()
        if isinstance(error, ConnectionResetError) and error.errno == errno.ECONNRESET:
            # A TCP reset before any answer: the kernel resets a connection closed with data still
            # unread (or one left in a closed listener's backlog), so the server never read this
            # request: never accepted, like a refusal. (A server that read it and then dropped it
            # closes with nothing unread: EOF, http.client's RemoteDisconnected, counted lost.)
            return Outcome("unread", None, time.monotonic() - started, time.monotonic(), repr(error)[:300]), None
        # Closed without a response, or nothing within the timeout: the request is lost.
        return Outcome("lost", None, time.monotonic() - started, time.monotonic(), repr(error)[:300]), None
    finished = time.monotonic()
    headers = {k.lower(): v for k, v in response.getheaders()}
    reuse = None if response.will_close else conn
    if reuse is None:
        conn.close()
    seconds = finished - started
    if 200 <= response.status < 300:
        try:
            problem = call.verify(json.loads(data))
        except ValueError:
            problem = f"2xx body is not JSON: {data[:200]!r}"
        if problem:
            return Outcome("failed", response.status, seconds, finished, f"wrong answer: {problem}", headers), reuse
        return Outcome("ok", response.status, seconds, finished, "", headers), reuse
    message = data[:300].decode(errors="replace")
    kind = "rejected" if response.status in rejects else "failed"
    return Outcome(kind, response.status, seconds, finished, message, headers), reuse


class Tally:
    """Thread-safe counts, latencies and a few samples of every outcome."""

    def __init__(self):
        self.created = time.monotonic()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.statuses: Counter = Counter()
        self.samples: dict[str, list[str]] = {"failed": [], "lost": [], "rejected": [], "unread": []}
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.counts[outcome.kind] += 1
            self.statuses[outcome.status] += 1
            self.outcomes.append(outcome)
            samples = self.samples.get(outcome.kind)
            if samples is not None and len(samples) < 5:
                # When it was sent, relative to the start of the load: lines up with the server log.
                sent_at = outcome.finished - outcome.seconds - self.created
                samples.append(f"sent at +{sent_at:.2f} s, {outcome.status}: {outcome.message}"[:300])

    @property
    def sent(self) -> int:
        with self.lock:
            return sum(n for kind, n in self.counts.items() if kind not in ("refused", "unread"))

    def count(self, kind: str, after: float = float("-inf")) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.kind == kind and o.finished > after)


class Load:
    """Closed-loop clients, each sending `make_call(rng)` requests back to back until stopped.

    Closed loop on purpose: a client waits for its answer before the next request, so a stalled
    server shows up as missing throughput and every request's fate is known."""

    def __init__(self, port: int, clients: int, make_call: Callable[[random.Random], Call], *,
                 keepalive: bool = True, rejects=frozenset({429}), tally: Tally | None = None, pause: float = 0.0):
        self.port, self.clients, self.make_call = port, clients, make_call
        self.keepalive, self.rejects, self.pause = keepalive, rejects, pause
        self.tally = tally or Tally()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True, name=f"load-{n}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Tally:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        return self.tally

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        connection = None
        while not self._stop.is_set():
            outcome, connection = send(self.port, self.make_call(rng), self.rejects,
                                       connection if self.keepalive else None)
            if not self.keepalive and connection is not None:
                connection.close()
                connection = None
            self.tally.add(outcome)
            if outcome.kind in ("refused", "unread"):
                time.sleep(0.01)  # nothing listens any more; don't spin a core on connect()
            elif self.pause:
                time.sleep(self.pause)
        if connection is not None:
            connection.close()


def echo_items(model: str) -> Callable[[random.Random], Call]:
    """Plain items, half KServe v1 and half OIP v2, so both batch kinds (JSON, tensors) are hit."""
    def make(rng: random.Random) -> Call:
        number = rng.randrange(1_000_000)
        if rng.random() < 0.5:
            return v1_call(model, rng.choice([number, f"item-{number}"]))
        return v2_call(model, number)
    return make


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def status_shape_problems(status: dict) -> list[str]:
    """Where a ModelStatus does not match the contract (keys and types)."""
    problems = []
    expected = {"name": str, "state": str, "queued": int, "workers": list}
    for key, kind in expected.items():
        if not isinstance(status.get(key), kind):
            problems.append(f"ModelStatus.{key} is {status.get(key)!r}, expected {kind.__name__}")
    for key in ("reason", "detail"):
        if key not in status or not (status[key] is None or isinstance(status[key], str)):
            problems.append(f"ModelStatus.{key} missing or not str|null: {status.get(key, '(missing)')!r}")
    if status.get("state") not in ("loading", "ready", "failed"):
        problems.append(f"ModelStatus.state {status.get('state')!r} not loading|ready|failed")
    worker_keys = {"index": int, "state": str, "restarts": int, "batches_served": int, "items_served": int}
    for worker in status.get("workers") or []:
        for key, kind in worker_keys.items():
            if not isinstance(worker.get(key), kind):
                problems.append(f"WorkerStatus.{key} is {worker.get(key)!r}, expected {kind.__name__}")
        for key in ("pid", "last_error", "rss_bytes", "python_version"):
            if key not in worker:
                problems.append(f"WorkerStatus.{key} missing")
        if worker.get("state") not in ("starting", "ready", "busy", "draining", "hung", "dead", "stopped"):
            problems.append(f"WorkerStatus.state {worker.get('state')!r} not in the contract's states")
    return sorted(set(problems))


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


class Poll:
    """Calls `probe` every `interval` s on a thread until stopped and counts what it returned: what
    a load balancer's readiness probe would have seen during the fault, not just after it."""

    def __init__(self, probe: Callable[[], object], interval: float = 0.05):
        self.probe, self.interval = probe, interval
        self.seen: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="poll")

    def __enter__(self) -> "Poll":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen[self.probe()] += 1
            self._stop.wait(self.interval)


def readiness_probe(server: "Sidecar", model: str) -> Callable[[], str]:
    """'200/ready', '503/loading', ...: the model's readiness code and its /status state."""
    def probe() -> str:
        code = server.get(f"/v2/models/{model}/ready", timeout=2)[0]
        status = server.model_status(model)
        return f"{code}/{status.get('state') if status else '?'}"
    return probe


# --------------------------------------------------------------------------------------- scenarios


@contextlib.contextmanager
def observed(server: "Sidecar", result: Result) -> Iterator[None]:
    """Runs a scenario's body against a started `server`: an exception becomes one of the result's
    problems (a scenario reports, never raises), and the server is stopped and its log kept."""
    try:
        server.start()
        yield
    except Exception as error:  # noqa: BLE001 - a scenario reports, never raises
        result.problems.append(f"error: {error!r}"[:2000])
    finally:
        server.stop()
        result.log_tail = server.log_tail()


def scenario_kill9(duration: float = 20.0, clients: int = 16, kill_every: float = 0.5) -> Result:
    """SIGKILL a random worker every `kill_every` s under steady load: the batches a killed worker
    held are dispatched again, so no client sees a failure or loses a request."""
    result = Result("kill9")
    with tempfile.TemporaryDirectory(prefix="chaos-kill9-") as tmp:
        # The model's own crash-loop breaker stays on (3 failures in 30 s): ~40 SIGKILLs in 20 s
        # must not trip it, because a SIGKILL from outside is not the model's failure.
        model = copy_model(FAULTY_MODEL, Path(tmp))
        server = Sidecar([model], Path(tmp))
        with observed(server, result):
            rng = random.Random(9)
            kills, skipped, sources = 0, 0, Counter()
            poll = Poll(readiness_probe(server, "faulty"), interval=0.1)
            with poll, Load(server.http_port, clients, echo_items("faulty")) as load:
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    time.sleep(kill_every)
                    workers, source = server.workers("faulty")
                    sources[source] += 1
                    # Only workers that are up: killing one still loading tests start-up failures,
                    # which is the breaker's business (import_failure).
                    targets = [w["pid"] for w in workers
                               if w.get("pid") and w.get("state") in ("ready", "busy", "unknown") and alive(w["pid"])]
                    if targets and signal_worker(rng.choice(targets), signal.SIGKILL, model):
                        kills += 1
                    else:
                        skipped += 1
                tally = load.stop()
            result.take_counts(tally)
            # Reported, not judged: with both workers down at once there is a moment with no
            # ready worker, and what readiness says then is the poison scenario's question.
            result.facts.update(kills=kills, ticks_without_target=skipped, pid_source=dict(sources),
                                readiness_seen=dict(poll.seen))
            latencies = [o.seconds for o in tally.outcomes if o.kind == "ok"]
            result.facts["ok_p99_ms"] = round(1000 * (percentile(latencies, 0.99) or 0), 1)
            result.notes.append(f"{kills} kills")
            result.expect(kills >= duration / kill_every / 2,
                          f"only {kills} kills happened: no live worker to kill at {skipped} ticks (workers not replaced?)")
            result.expect(result.failed == 0, f"{result.failed} requests failed")
            result.expect(result.lost == 0, f"{result.lost} requests lost")
            result.expect(result.ok > 0, "no request succeeded")
            after = server.get("/v2/models/faulty/ready")[0]
            result.expect(after == 200, f"model not ready after the kills: /v2/models/faulty/ready -> {after}")
    return result


def scenario_sigstop(clients: int = 8, before: float = 2.0, after: float = 3.0) -> Result:
    """SIGSTOP one worker under load: its pings go unanswered, so within ping_timeout_s it is
    declared hung, killed and replaced; its batches go to the other worker; nothing fails."""
    result = Result("sigstop")
    stopped_pid = None
    with tempfile.TemporaryDirectory(prefix="chaos-sigstop-") as tmp:
        model = copy_model(FAULTY_MODEL, Path(tmp))
        ping_timeout = float(yaml.safe_load((model / "sidecar.yaml").read_text())["timeouts"]["ping_timeout_s"])
        server = Sidecar([model], Path(tmp))
        try:
            server.start()
            with Load(server.http_port, clients, echo_items("faulty")) as load:
                time.sleep(before)
                workers, source = server.workers("faulty")
                result.facts["pid_source"] = source
                if source != "status":
                    result.problems.append("GET /status/faulty is not answered with a ModelStatus (200)")
                target = next(w for w in workers if w.get("pid") and alive(w["pid"]))
                stopped_pid, index, restarts = target["pid"], target["index"], target.get("restarts")
                ok_at_stop = load.tally.count("ok")
                if not signal_worker(stopped_pid, signal.SIGSTOP, model):
                    raise RuntimeError(f"worker {stopped_pid} vanished before it could be stopped")
                stopped_at = time.monotonic()

                def replaced():
                    # The slot runs a different, live process (and /status counts the restart).
                    now, _ = server.workers("faulty")
                    slot = next((w for w in now if w["index"] == index and w.get("pid") not in (None, stopped_pid)), None)
                    if slot is None or not alive(slot["pid"]):
                        return None
                    return slot

                slot = wait_until(replaced, ping_timeout + 10)
                detected = time.monotonic() - stopped_at
                served_meanwhile = load.tally.count("ok") - ok_at_stop
                time.sleep(after)
                tally = load.stop()
            result.take_counts(tally)
            if slot is None:
                result.problems.append(f"worker {index} (pid {stopped_pid}) was not replaced within {ping_timeout + 10:.0f} s")
            else:
                result.facts.update(detected_s=round(detected, 2), old_pid=stopped_pid, new_pid=slot["pid"],
                                    restarts=f"{restarts} -> {slot.get('restarts')}")
                result.notes.append(f"replaced in {detected:.1f} s")
                result.expect(detected <= ping_timeout + 3,
                              f"hung worker replaced after {detected:.1f} s; ping_timeout_s is {ping_timeout}")
                if source == "status":
                    result.expect(isinstance(restarts, int) and slot.get("restarts") == restarts + 1,
                                  f"/status restarts went {restarts} -> {slot.get('restarts')}, expected +1")
            result.expect(not alive(stopped_pid), f"the stopped worker {stopped_pid} is still there (never killed)")
            result.facts["ok_while_stopped"] = served_meanwhile
            result.expect(served_meanwhile > 0, "no request succeeded while one worker was stopped")
            result.expect(result.failed == 0, f"{result.failed} requests failed")
            result.expect(result.lost == 0, f"{result.lost} requests lost")
            status = server.model_status("faulty")
            if status is not None:
                result.problems += status_shape_problems(status)
        except Exception as error:  # noqa: BLE001
            result.problems.append(f"error: {error!r}"[:2000])
        finally:
            if stopped_pid:  # never leave a stopped process behind
                signal_worker(stopped_pid, signal.SIGKILL, model)
            server.stop()
            result.log_tail = server.log_tail()
    return result


def scenario_poison(good: int = 62, rounds: int = 2) -> Result:
    """One item that raises and one that kills its worker, sent concurrently with good items so they
    share batches: bisection fails exactly those two (ValueError; WorkerDied after max_retries+1
    crashes), every good item gets its answer, and the model stays ready."""
    result = Result("poison")
    with tempfile.TemporaryDirectory(prefix="chaos-poison-") as tmp:
        # A free worker lingers for the batch to fill, so the concurrent single-item requests
        # really share batches with the poison instead of racing to an idle worker one by one.
        model = copy_model(FAULTY_MODEL, Path(tmp), {"batching": {"max_delay_ms": 100}})
        config = yaml.safe_load((model / "sidecar.yaml").read_text())
        max_retries = int(config.get("max_retries", 2))
        server = Sidecar([model], Path(tmp))
        with observed(server, result):
            tally = Tally()
            before, _ = server.workers("faulty")
            restarts_before = sum(w.get("restarts") or 0 for w in before)
            with Poll(readiness_probe(server, "faulty")) as poll:
                for round_ in range(rounds):
                    poison_round(server, result, tally, round_, good)
                time.sleep(0.5)
            result.take_counts(tally)
            result.facts["readiness_seen"] = dict(poll.seen)
            after, source = server.workers("faulty")
            if source == "status":
                restarts = sum(w.get("restarts") or 0 for w in after) - restarts_before
                result.facts["worker_restarts"] = restarts
                result.expect(restarts >= rounds * (max_retries + 1),
                              f"{restarts} worker restarts; each crash item should crash max_retries+1 = "
                              f"{max_retries + 1} times")
            result.facts["mean_batch_size"] = mean_batch_size(server, "faulty")
            result.notes.append(f"counts are the good items: {good} per round, {rounds} rounds, with a raise and a crash item")
            result.expect(result.failed == 0, f"{result.failed} good items failed")
            result.expect(result.lost == 0, f"{result.lost} good items lost")
            # Crashes caused by a batch are not a crash loop: the model never goes FAILED, and, by
            # the contract (503 only when FAILED), its readiness never drops while workers restart.
            result.expect(not any("failed" in seen for seen in poll.seen),
                          f"the model went FAILED during the poison: {dict(poll.seen)}")
            unready = sum(n for seen, n in poll.seen.items() if not seen.startswith("200"))
            result.expect(unready == 0, f"readiness was not 200 in {unready} of {sum(poll.seen.values())} polls "
                          f"during the poison (code/state seen: {dict(poll.seen)})")
            ready = wait_until(lambda: server.get("/v2/models/faulty/ready")[0] == 200, 5)
            status = server.model_status("faulty")
            if status is None:
                result.problems.append("GET /status/faulty is not answered with a ModelStatus (200)")
            else:
                result.expect(bool(ready) and status.get("state") == "ready",
                              f"not ready 5 s after the poison: /status/faulty state {status.get('state')!r}, "
                              f"reason {status.get('reason')!r}")
    return result


def poison_round(server: Sidecar, result: Result, tally: Tally, round_: int, good: int) -> None:
    """`good` single-item requests plus one raise and one crash item, released together (a barrier)
    so they meet in the queue. Good outcomes go to `tally`; the poison items are expected to fail,
    so they are checked here instead of counted."""
    calls = [("good", v1_call("faulty", f"good-{round_}-{n}")) for n in range(good)]
    calls.insert(random.Random(round_).randrange(len(calls)), ("raise", v1_call("faulty", {"raise": f"poison-{round_}"})))
    calls.insert(random.Random(round_ + 100).randrange(len(calls)), ("crash", v1_call("faulty", {"crash": True})))
    outcomes: dict[int, Outcome] = {}
    barrier = threading.Barrier(len(calls))

    def one(n: int, call: Call) -> None:
        barrier.wait()
        outcomes[n], connection = send(server.http_port, call)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=one, args=(n, c)) for n, (_, c) in enumerate(calls)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.facts[f"round{round_}_s"] = round(time.monotonic() - started, 2)
    for n, (kind, _) in enumerate(calls):
        outcome = outcomes[n]
        if kind == "good":
            tally.add(outcome)
            continue
        result.facts[f"{kind}{round_}"] = f"{outcome.status} {outcome.message[:400]}"
        if kind == "raise":
            result.expect(outcome.status == 500 and "ValueError" in outcome.message and f"poison-{round_}" in outcome.message,
                          f"raise item: expected 500 naming ValueError poison-{round_}, got {outcome.kind} "
                          f"{outcome.status} {outcome.message[:400]}")
        else:
            result.expect(outcome.status == 500 and "WorkerDied" in outcome.message,
                          f"crash item: expected 500 naming WorkerDied, got {outcome.kind} "
                          f"{outcome.status} {outcome.message[:400]}")


def mean_batch_size(server: Sidecar, model: str) -> float | None:
    """From /metrics: sidecar_batch_size sum / count for the model (evidence that items shared batches)."""
    status, text = server.get("/metrics")
    if status != 200 or not isinstance(text, str):
        return None
    total = count = None
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("sidecar_batch_size_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sidecar_batch_size_count"):
            count = float(line.rsplit(" ", 1)[1])
    return round(total / count, 2) if total is not None and count else None


def scenario_import_failure(clients: int = 4, fail_within: float = 30.0) -> Result:
    """Restarts of faulty fail to import (BROKEN flag) while its workers are killed: after
    max_failures failures in window_s the crash-loop breaker marks it FAILED with the reason visible
    in /status, readiness 503, inference 503 at once; echo, in the same process, answers everything."""
    result = Result("import_failure")
    with tempfile.TemporaryDirectory(prefix="chaos-import-") as tmp:
        faulty = copy_model(FAULTY_MODEL, Path(tmp))
        echo = copy_model(ECHO_MODEL, Path(tmp))
        server = Sidecar([faulty, echo], Path(tmp))
        with observed(server, result):
            faulty_tally = Tally()  # faulty's own answers: anything but silence is acceptable
            with Load(server.http_port, clients, echo_items("echo")) as load, \
                    Load(server.http_port, 1, lambda rng: v1_call("faulty", rng.randrange(1000)),
                         rejects=frozenset({429, 503}), tally=faulty_tally, pause=0.05):
                # (paced: once FAILED its 503s come back at once, and a spinning client would take
                # the CPU that echo's clients need on a small machine)
                time.sleep(1.0)
                (faulty / "BROKEN").write_text("restarts of this model fail to import\n")
                started = time.monotonic()
                loaded = {pid for pid, _ in worker_processes(server.pid, "faulty")}
                kills = 0

                def failed_yet():
                    # Kills only workers that loaded the handler before BROKEN appeared; their
                    # replacements are left to fail the import on their own, so the last failure
                    # (the one /status must explain) is the ImportError, not one of our kills.
                    nonlocal kills
                    status = server.model_status("faulty")
                    if status is not None and status.get("state") == "failed":
                        return status
                    workers, source = server.workers("faulty")
                    for worker in workers:
                        pid = worker.get("pid")
                        up = worker.get("state") in ("ready", "busy") if source == "status" else pid in loaded
                        if pid and up and signal_worker(pid, signal.SIGKILL, faulty):
                            kills += 1
                    return None

                status = wait_until(failed_yet, fail_within, interval=0.3)
                took = time.monotonic() - started
                result.facts.update(kills=kills, seconds_to_failed=round(took, 2))
                ready_status = server.get("/v2/models/faulty/ready")[0]
                infer = send(server.http_port, v1_call("faulty", 1), rejects=frozenset())[0]
                time.sleep(2.0)  # echo keeps being measured while faulty stays FAILED
                load.stop()
            result.take_counts(load.tally)
            if status is None:
                last = server.model_status("faulty")
                result.problems.append(
                    f"faulty not FAILED within {fail_within:.0f} s of BROKEN + {kills} kills; /status/faulty: "
                    + (json.dumps(last)[:600] if last is not None else "not answered (no /status)"))
            else:
                result.notes.append(f"FAILED after {took:.1f} s, {kills} kills")
                reason = status.get("reason") or ""
                result.facts["reason"] = reason[:300]
                result.expect("BROKEN flag present" in reason or "ImportError" in reason,
                              f"/status reason does not name the import error: {reason!r}")
                result.problems += status_shape_problems(status)
            result.facts["ready_status"] = ready_status
            result.expect(ready_status == 503, f"/v2/models/faulty/ready -> {ready_status} (expected 503)")
            result.facts["infer_when_failed"] = f"{infer.status} in {infer.seconds * 1000:.0f} ms: {infer.message[:160]}"
            result.expect(infer.status == 503 and "FAILED" in infer.message and infer.seconds < 1.0,
                          f"inference on the FAILED model: {infer.status} in {infer.seconds:.2f} s {infer.message[:200]!r} "
                          f"(expected 503 naming FAILED, at once)")
            result.facts["faulty_requests"] = dict(faulty_tally.counts)
            result.notes.append("counts are echo's; faulty's: " + ", ".join(f"{n} {k}" for k, n in sorted(faulty_tally.counts.items())))
            # Nothing here touches echo's workers; if one was replaced anyway, say why.
            echo_status = server.model_status("echo") or {}
            echo_restarts = [(w.get("index"), w.get("restarts"), w.get("last_error"))
                             for w in echo_status.get("workers", []) if w.get("restarts")]
            if echo_restarts:
                result.facts["echo_restarts"] = echo_restarts
            result.expect(faulty_tally.counts["lost"] == 0,
                          f"{faulty_tally.counts['lost']} requests to faulty got no answer: {faulty_tally.samples['lost']}")
            result.expect(result.ok > 0 and result.failed == 0 and result.lost == 0 and result.rejected == 0,
                          f"echo was disturbed: ok {result.ok} failed {result.failed} rejected {result.rejected} lost {result.lost}")
            # The fix, then a reload through the CLI: the model comes back.
            (faulty / "BROKEN").unlink(missing_ok=True)
            reload = subprocess.run(
                [SIDECAR_BIN, "reload", "faulty", "--server", f"http://127.0.0.1:{server.admin_port}"],
                capture_output=True, text=True, timeout=120)
            after = send(server.http_port, v1_call("faulty", 7), rejects=frozenset())[0]
            result.facts["reload"] = f"exit {reload.returncode}: {(reload.stdout + reload.stderr).strip()[:200]}; then {after.status}"
            result.expect(reload.returncode == 0 and after.kind == "ok",
                          f"`sidecar reload faulty` after removing BROKEN: {result.facts['reload']} {after.message[:200]!r}")
            if reload.returncode == 0 and after.kind == "ok":
                result.notes.append("back after `sidecar reload`")
    return result


def scenario_supervisor_sigkill(within: float = 2.0) -> Result:
    """SIGKILL the sidecar itself: its workers have no one to serve and must exit on their own
    (stdin lifeline) within `within` seconds, even one busy in handler code."""
    result = Result("supervisor_sigkill")
    with tempfile.TemporaryDirectory(prefix="chaos-sigkill-") as tmp:
        model = copy_model(FAULTY_MODEL, Path(tmp))
        server = Sidecar([model], Path(tmp))
        pids: set[int] = set()
        try:
            server.start()
            # One worker stuck in a long batch: its executor thread is busy, the lifeline must not be.
            busy = threading.Thread(target=send, args=(server.http_port, v1_call("faulty", {"sleep": 30})), daemon=True)
            busy.start()
            time.sleep(0.5)
            workers, source = server.workers("faulty")
            pids = {w["pid"] for w in workers if w.get("pid")} | {pid for pid, _ in worker_processes(server.pid, "faulty")}
            result.facts.update(worker_pids=sorted(pids), pid_source=source,
                                worker_states=[w.get("state") for w in workers])
            result.expect(len(pids) >= 2, f"expected 2 workers before the kill, found {sorted(pids)}")
            if source == "status":  # (a precondition of the test, not a server expectation)
                result.expect(any(w.get("state") == "busy" for w in workers),
                              f"no worker was busy with the 30 s item before the kill: {workers}")
            server.process.kill()
            server.process.wait()
            killed_at = time.monotonic()
            # Wait past the limit so the report says how long it really took.
            gone = wait_until(lambda: not any(worker_of(p, model) for p in pids), within + 8)
            took = time.monotonic() - killed_at
            survivors = sorted(p for p in pids if worker_of(p, model))
            result.facts["seconds_to_exit"] = round(took, 2) if gone else None
            result.notes.append(f"workers gone in {took:.1f} s" if gone else f"workers alive after {took:.0f} s: {survivors}")
            result.expect(bool(gone) and took <= within,
                          f"workers {sorted(pids)} not all gone within {within} s of SIGKILL (took {took:.1f} s; "
                          f"alive: {survivors})")
        except Exception as error:  # noqa: BLE001
            result.problems.append(f"error: {error!r}"[:2000])
        finally:
            for pid in pids:  # never leave orphans behind, whatever happened
                signal_worker(pid, signal.SIGKILL, model)
            server.stop()
            # A SIGKILLed server cannot remove its socket directory (/tmp/sidecar-PID-*); do it here.
            if server.process is not None:
                for leftover in Path(tempfile.gettempdir()).glob(f"sidecar-{server.pid}-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            result.log_tail = server.log_tail()
    return result


def scenario_sigterm_under_load(clients: int = 16, before: float = 3.0, exit_within: float = 30.0) -> Result:
    """SIGTERM under load: the server stops accepting, answers everything it accepted (slow items
    included) and exits 0. Clients use a connection per request, so "refused" (never accepted) is
    told apart from "lost" (accepted, never answered). A connection made just before the listener
    closes may be reset with its request unread ("unread": never accepted either)."""
    result = Result("sigterm_under_load")
    with tempfile.TemporaryDirectory(prefix="chaos-sigterm-") as tmp:
        model = copy_model(FAULTY_MODEL, Path(tmp))
        server = Sidecar([model], Path(tmp))

        def make(rng: random.Random) -> Call:
            # Some are slow, so SIGTERM surely finds requests in Python, mid-batch. (Few: the handler
            # sleeps item after item, so every slow item in a batch delays the whole batch.)
            if rng.random() < 0.1:
                return v1_call("faulty", {"sleep": 0.2, "n": rng.randrange(10**6)})
            return echo_items("faulty")(rng)

        with observed(server, result):
            with Load(server.http_port, clients, make, keepalive=False, rejects=frozenset({429, 503})) as load:
                time.sleep(before)
                server.process.send_signal(signal.SIGTERM)
                termed_at = time.monotonic()
                try:
                    code = server.process.wait(exit_within)
                except subprocess.TimeoutExpired:
                    code = None
                took = time.monotonic() - termed_at
                time.sleep(0.5)  # a little of the refused tail, to see refusals really are refusals
                tally = load.stop()
            result.take_counts(tally, closing=True)
            after_term = tally.count("ok", after=termed_at)
            result.facts.update(exit_code=code, seconds_to_exit=round(took, 2), ok_after_sigterm=after_term,
                                statuses={str(k): v for k, v in tally.statuses.items()})
            result.notes.append(f"exit {code} in {took:.1f} s, {after_term} answered after SIGTERM")
            result.expect(code == 0, f"exit code {code} after SIGTERM (expected 0 within {exit_within} s)")
            result.expect(result.failed == 0, f"{result.failed} requests failed")
            result.expect(result.lost == 0, f"{result.lost} requests accepted but never answered")
            result.expect(after_term > 0, "nothing was answered after SIGTERM: were in-flight requests dropped?")
    return result


def scenario_overload(clients: int = 128, duration: float = 8.0, item_s: float = 0.02, max_queue: int = 64) -> Result:
    """Far more load than the model can take: the queue stays at max_queue, the rest get a 429 with
    Retry-After at once, memory stays flat, and the server serves normally afterwards."""
    result = Result("overload")
    with tempfile.TemporaryDirectory(prefix="chaos-overload-") as tmp:
        # One worker, every item sleeps item_s: capacity is 1/item_s items/s whatever the batching.
        model = copy_model(FAULTY_MODEL, Path(tmp), {"workers": 1, "batching": {"max_batch_size": 4, "max_queue": max_queue}})
        capacity = 1 / item_s
        server = Sidecar([model], Path(tmp))
        with observed(server, result):
            baseline = server.rss_mb()
            peak = baseline or 0.0
            load = Load(server.http_port, clients, lambda rng: v1_call("faulty", {"sleep": item_s, "n": rng.randrange(10**6)}))
            started = time.monotonic()
            with load:
                while time.monotonic() - started < duration:
                    peak = max(peak, server.rss_mb() or 0.0)
                    time.sleep(0.1)
                tally = load.stop()
            elapsed = time.monotonic() - started
            result.take_counts(tally)
            rejections = [o for o in tally.outcomes if o.kind == "rejected"]
            p50 = percentile([o.seconds for o in rejections], 0.5)
            offered = result.sent / elapsed
            without_retry_after = sum(1 for o in rejections if "retry-after" not in o.headers)
            without_error = sum(1 for o in rejections if '"error"' not in o.message)
            result.facts.update(capacity_per_s=capacity, offered_per_s=round(offered), ok_per_s=round(result.ok / elapsed, 1),
                                p50_429_ms=round(1000 * p50, 1) if p50 is not None else None,
                                rss_baseline_mb=round(baseline or 0, 1), rss_max_mb=round(peak, 1))
            result.notes.append(f"{offered / capacity:.0f}x capacity, 429 p50 "
                                f"{1000 * p50:.1f} ms" if p50 is not None else f"{offered / capacity:.0f}x capacity, no 429")
            result.notes.append(f"RSS max {peak:.0f} MB (baseline {baseline or 0:.0f})")
            result.expect(offered >= 10 * capacity, f"offered only {offered:.0f}/s for capacity {capacity:.0f}/s: "
                          "the load generator did not reach 10x (test too weak, not a server fault)")
            result.expect(result.rejected > result.ok, f"{result.rejected} 429s for {result.ok} ok: the extra load was not refused")
            # A queued request waits up to max_queue * item_s (1.3 s); a refusal must not queue. The
            # bound is loose because the clients' own threads share the machine's cores.
            result.expect(p50 is not None and p50 < 0.15, f"429s are slow: p50 {p50} s")
            result.expect(without_retry_after == 0, f"{without_retry_after} 429s without Retry-After")
            result.expect(without_error == 0, f"{without_error} 429s without an {{\"error\": ...}} body")
            result.expect(result.failed == 0, f"{result.failed} requests failed")
            result.expect(result.lost == 0, f"{result.lost} requests lost")
            result.expect(baseline is not None and peak - baseline < 200,
                          f"sidecar RSS grew from {baseline} to {peak:.0f} MB under overload")
            # The queue drains (at most max_queue * item_s) and a normal request is served again.
            def served() -> bool:
                return send(server.http_port, v1_call("faulty", "after"))[0].kind == "ok"
            result.expect(bool(wait_until(served, 10, 0.2)), "no normal request succeeded within 10 s after the overload")
    return result


SCENARIOS: dict[str, Callable[[], Result]] = {
    "kill9": scenario_kill9,
    "sigstop": scenario_sigstop,
    "poison": scenario_poison,
    "import_failure": scenario_import_failure,
    "supervisor_sigkill": scenario_supervisor_sigkill,
    "sigterm_under_load": scenario_sigterm_under_load,
    "overload": scenario_overload,
}


# ---------------------------------------------------------------------------------------------- main


def table(results: list[Result]) -> str:
    header = ["scenario", "sent", "ok", "failed", "rejected", "lost", "notes"]
    rows = []
    for r in results:
        verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.problems)
        rows.append([r.scenario, str(r.sent), str(r.ok), str(r.failed), str(r.rejected), str(r.lost),
                     "; ".join([verdict, *r.notes])])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(6)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " | " + cells[6]  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths) + "-+-" + "-" * 5, *map(line, rows)])


def main(argv: list[str]) -> int:
    verbose = "-v" in argv or "--verbose" in argv  # facts of passing scenarios too
    names = [a for a in argv if a not in ("-v", "--verbose")] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = SCENARIOS[name]()
        print(f"   {'PASS' if result.passed else 'FAIL'} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        if verbose or not result.passed:
            details = result.describe(log=not result.passed)
            print("\n".join("   " + line for line in details.splitlines()), file=sys.stderr)
        results.append(result)
    print(table(results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
