"""Real worker subprocesses on a temporary Unix socket, driven by a grpc.aio client."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from sidecar_worker import PROTOCOL_VERSION, __version__
from sidecar_worker.proto import worker_pb2 as pb
from workerproc import SessionClient, WorkerProcess


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: Unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="sw-") as directory:
        yield Path(directory)


@pytest.fixture
def workers() -> Iterator[list]:
    started: list = []
    yield started
    for worker in started:
        worker.kill()


def start(workers: list, model_dir: Path, socket_dir: Path, **kwargs) -> WorkerProcess:
    worker = WorkerProcess(model_dir, socket_dir / "w0.sock", **kwargs)
    workers.append(worker)
    worker.wait_for_socket()
    return worker


def ping(n: int) -> pb.SupervisorMessage:
    return pb.SupervisorMessage(ping=pb.Ping(nonce=n))


SHUTDOWN = pb.SupervisorMessage(shutdown=pb.Shutdown())

HANDLER = """
import sys
import time

time.sleep(0.5)  # a slow model load: pings must still be answered meanwhile


class Model:
    def __init__(self, ctx):
        self.ctx = ctx
        self.calls = 0

    def predict(self, items):
        self.calls += 1
        self.ctx.logger.info("predict call %d with %d items", self.calls, len(items))
        print("printed by the handler")
        if items and items[0] == "raise":
            raise ValueError("asked to raise")
        return [{"in": x, "scale": self.ctx.config["scale"], "numpy": "numpy" in sys.modules} for x in items]
"""


def test_session_round_trip(model_dir, write_model, socket_dir, workers):
    write_model(HANDLER)
    worker = start(workers, model_dir, socket_dir, handler="handler:Model",
                   extra_args=["--config-json", '{"scale": 3}', "--max-message-bytes", "1048576"])

    async def scenario() -> None:
        client = SessionClient(worker.socket)
        hello = (await client.expect("hello")).hello
        assert (hello.protocol_version, hello.pid, hello.worker_index) == (PROTOCOL_VERSION, worker.proc.pid, 2)
        assert hello.runtime_version == __version__
        assert hello.python_version.count(".") == 2

        client.send(ping(1))  # answered while the handler is still loading
        assert (await client.expect("pong")).pong.nonce == 1
        ready = (await client.expect("ready")).ready
        assert ready.load_seconds >= 0.4

        client.send_batch(10, b'{"x": 1.5, "id": 7}', b"[oops", b"2")
        result = (await client.expect("result")).result
        assert result.id == 10 and not result.HasField("batch_error")
        assert json.loads(result.outputs) == [
            {"in": {"x": 1.5, "id": 7}, "scale": 3, "numpy": False}, None, {"in": 2, "scale": 3, "numpy": False}
        ]
        assert [(e.index, e.error.type) for e in result.item_errors] == [(1, "InvalidJSON")]

        client.send_batch(11, b'"raise"')
        failed = (await client.expect("result")).result
        assert (failed.id, failed.batch_error.type, failed.batch_error.message) == (11, "ValueError", "asked to raise")
        assert "handler.py" in failed.batch_error.traceback

        client.send(ping(2))
        assert (await client.expect("pong")).pong.nonce == 2

        client.send_batch(12, b"5")  # still usable after the raise
        assert json.loads((await client.expect("result")).result.outputs)[0]["in"] == 5

        client.send(SHUTDOWN)
        assert await client.recv() is None
        assert await client.status() == grpc.StatusCode.OK
        messages = [r.message for r in client.logs if r.logger == "sidecar.model.iris"]
        assert messages == ["predict call 1 with 2 items", "predict call 2 with 1 items", "predict call 3 with 1 items"]
        await client.close()

    asyncio.run(scenario())
    assert worker.proc.wait(timeout=10) == 0
    assert "printed by the handler" in worker.stdout()
    assert "predict call" not in worker.stderr()  # forwarded records are not also printed
    assert not worker.socket.exists()


ECHO_HANDLER = "def predict(items):\n    return items\n"


def test_max_message_bytes(model_dir, write_model, socket_dir, workers):
    write_model(ECHO_HANDLER)
    big = json.dumps("x" * (5 * 1024 * 1024)).encode()  # above gRPC's 4 MiB default
    worker = start(workers, model_dir, socket_dir)  # default --max-message-bytes: 256 MiB

    async def round_trip() -> None:
        client = SessionClient(worker.socket)
        await client.expect("hello")
        await client.expect("ready")
        client.send_batch(1, big)
        assert (await client.expect("result")).result.outputs == b"[" + big + b"]"
        client.send(SHUTDOWN)
        assert await client.recv() is None
        await client.close()

    asyncio.run(round_trip())
    assert worker.proc.wait(timeout=10) == 0

    worker = start(workers, model_dir, socket_dir, extra_args=["--max-message-bytes", str(1024 * 1024)])

    async def refused() -> None:
        client = SessionClient(worker.socket)
        await client.expect("hello")
        await client.expect("ready")
        client.send_batch(1, big)
        # The worker's gRPC rejects the message, which ends the session: the stream fails (with
        # RESOURCE_EXHAUSTED, or UNAVAILABLE/INTERNAL when the worker's exit wins the race).
        with pytest.raises(grpc.aio.AioRpcError):
            await client.recv()
        await client.close()

    asyncio.run(refused())
    assert worker.proc.wait(timeout=10) == 0


def test_load_failure_sends_traceback_and_exits_3(model_dir, write_model, socket_dir, workers):
    path = write_model("import json\n\nraise RuntimeError('no weights')\n")
    worker = start(workers, model_dir, socket_dir)

    async def scenario() -> None:
        client = SessionClient(worker.socket)
        await client.expect("hello")
        error = (await client.expect("load_failed")).load_failed.error
        assert error.type == "RuntimeError"
        assert error.message == "importing module 'handler' raised RuntimeError: no weights"
        assert f'File "{path}", line 3' in error.traceback
        assert await client.recv() is None
        assert await client.status() == grpc.StatusCode.OK
        await client.close()

    asyncio.run(scenario())
    assert worker.proc.wait(timeout=10) == 3


SLOW_HANDLER = """
import time

def predict(items):
    time.sleep(float(items[0]))
    return items
"""


def test_ping_not_queued_behind_batch_and_batches_keep_order(model_dir, write_model, socket_dir, workers):
    write_model(SLOW_HANDLER)
    worker = start(workers, model_dir, socket_dir)

    async def scenario() -> None:
        client = SessionClient(worker.socket)
        await client.expect("hello")
        await client.expect("ready")
        client.send_batch(1, b"0.8")
        client.send_batch(2, b"0")
        client.send(ping(7))
        started = time.monotonic()
        assert (await client.expect("pong")).pong.nonce == 7
        assert time.monotonic() - started < 0.5
        assert (await client.expect("result")).result.id == 1
        assert (await client.expect("result")).result.id == 2
        client.send(SHUTDOWN)
        assert await client.recv() is None
        await client.close()

    asyncio.run(scenario())
    assert worker.proc.wait(timeout=10) == 0


def test_sigterm_finishes_in_flight_batch(model_dir, write_model, socket_dir, workers):
    write_model(SLOW_HANDLER)
    worker = start(workers, model_dir, socket_dir)

    async def scenario() -> None:
        client = SessionClient(worker.socket)
        await client.expect("hello")
        await client.expect("ready")
        client.send_batch(1, b"0.5")
        await asyncio.sleep(0.2)
        worker.proc.send_signal(signal.SIGTERM)
        result = (await client.expect("result")).result
        assert json.loads(result.outputs) == [0.5]
        assert await client.recv() is None
        await client.close()

    asyncio.run(scenario())
    assert worker.proc.wait(timeout=10) == 0


def test_sigterm_without_session_exits_0(model_dir, write_model, socket_dir, workers):
    write_model(SLOW_HANDLER)
    worker = start(workers, model_dir, socket_dir)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=5) == 0


def test_lifeline_exits_when_stdin_closes(model_dir, write_model, socket_dir, workers):
    write_model(SLOW_HANDLER)
    worker = start(workers, model_dir, socket_dir, lifeline=True)
    time.sleep(0.3)
    assert worker.proc.poll() is None  # the open pipe keeps it alive
    assert worker.proc.stdin is not None
    worker.proc.stdin.close()
    started = time.monotonic()
    try:
        code = worker.proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pytest.fail("worker did not exit within 2 s of stdin closing")
    assert code == 0
    assert time.monotonic() - started < 2
    assert "stdin closed" in worker.stderr()
