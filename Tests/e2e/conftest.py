"""Session fixture: one real `sidecar serve` process for the whole end-to-end suite.

Environment:
  SIDECAR_BIN        the server binary (default /work/main/.build/debug/sidecar)
  SIDECAR_CACHE_DIR  environment cache (default /work/main/.build/test-cache)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SIDECAR_BIN = os.environ.get("SIDECAR_BIN", str(REPO / ".build" / "debug" / "sidecar"))
CACHE_DIR = os.environ.get("SIDECAR_CACHE_DIR", str(REPO / ".build" / "test-cache"))
MAX_BODY_BYTES = 1_000_000
READY_TIMEOUT_S = 240
STOP_TIMEOUT_S = 45


@dataclass
class Server:
    http_port: int
    grpc_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def http_url(self) -> str:  # for tritonclient.http ("host:port")
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base(self) -> str:  # for urllib / curl
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError as error:
            return f"(log unreadable: {error})"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str, context=None) -> bool:
    """GET BASE/v2/health/ready answers 200 (`context`: an ssl.SSLContext for an https BASE)."""
    try:
        with urllib.request.urlopen(base + "/v2/health/ready", timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False



def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Polls `predicate` until it returns something true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@contextlib.contextmanager
def running_server(model_dirs, extra_args=(), server_class=None, prefix="sidecar-e2e-", ready=None, admin=False):
    """`sidecar serve MODEL_DIR...` on two free loopback ports, ready; stopped by SIGTERM after,
    which must end it with exit code 0. `server_class` is `Server` or a subclass (same fields).
    `ready(srv) -> bool` says when the server is up (default: GET /v2/health/ready over plain HTTP
    answers 200; a server behind TLS or an API key needs its own). `admin=True` leaves the admin API
    on (pass `--admin-port PORT` in `extra_args`); by default it is off (`--no-admin`)."""
    if not (os.path.isfile(SIDECAR_BIN) and os.access(SIDECAR_BIN, os.X_OK)):
        pytest.fail(f"sidecar binary not found or not executable: {SIDECAR_BIN} (set SIDECAR_BIN)")
    http_port = _free_port()
    grpc_port = _free_port()
    while grpc_port == http_port:
        grpc_port = _free_port()
    log_dir = Path(tempfile.mkdtemp(prefix=prefix))
    log_path = log_dir / "server.log"
    command = [
        SIDECAR_BIN, "serve", *[str(d) for d in model_dirs],
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        # the admin API has its own tests (test_admin.py), with their own servers
        *([] if admin else ["--no-admin"]),
        "--cache-dir", CACHE_DIR,
        "--log-level", "warning",
        *extra_args,
    ]
    log_file = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO))
    srv = (server_class or Server)(http_port, grpc_port, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            code = process.poll()
            if code is not None:
                pytest.fail(f"sidecar serve exited with {code} before ready; command {command}\n--- log ---\n{srv.log()}")
            if ready(srv) if ready is not None else _ready(srv.base):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"sidecar serve not ready after {READY_TIMEOUT_S} s\n--- log ---\n{srv.log()}")
            time.sleep(0.25)
        yield srv
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                log_file.close()
                pytest.fail(f"sidecar serve did not stop within {STOP_TIMEOUT_S} s of SIGTERM\n--- log ---\n{srv.log()}")
        else:
            code = process.returncode
        log_file.close()
        assert code == 0, f"sidecar serve exit code {code} after SIGTERM (expected 0)\n--- log ---\n{srv.log()}"
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server():
    with running_server(
        [REPO / "Examples" / "echo", HERE / "models" / "typed"], ["--max-body-bytes", str(MAX_BODY_BYTES)]
    ) as srv:
        yield srv
