"""Helpers to run a real worker subprocess and talk to it like the supervisor does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, List, Optional, Sequence

import grpc

from sidecar_worker.proto import worker_pb2 as pb
from sidecar_worker.proto import worker_pb2_grpc

PYTHON_DIR = Path(__file__).resolve().parents[1]


class WorkerProcess:
    def __init__(
        self,
        model_dir: Path,
        socket: Path,
        handler: str = "handler:predict",
        extra_args: Sequence[str] = (),
        lifeline: bool = False,
    ) -> None:
        self.socket = socket
        self.stdout_path = socket.parent / "stdout.txt"
        self.stderr_path = socket.parent / "stderr.txt"
        env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
        args = [
            sys.executable, "-m", "sidecar_worker",
            "--socket", str(socket),
            "--model-dir", str(model_dir),
            "--handler", handler,
            "--model-name", "iris",
            "--worker-index", "2",
            *extra_args,
        ]
        if not lifeline:
            args.append("--no-lifeline")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                cwd=model_dir,
                env=env,
                stdin=subprocess.PIPE if lifeline else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"socket never appeared: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SessionClient:
    """One Session stream. Log records are collected in `logs` as they pass by."""

    def __init__(self, socket: Path, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self._channel = grpc.aio.insecure_channel(
            f"unix:{socket}",
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._requests: "asyncio.Queue[Optional[pb.SupervisorMessage]]" = asyncio.Queue()
        self._call = worker_pb2_grpc.WorkerStub(self._channel).Session(self._request_stream())
        self.logs: List[pb.LogRecord] = []

    async def _request_stream(self) -> AsyncIterator[pb.SupervisorMessage]:
        while True:
            message = await self._requests.get()
            if message is None:
                return
            yield message

    def send(self, message: pb.SupervisorMessage) -> None:
        self._requests.put_nowait(message)

    def send_batch(self, batch_id: int, *items: bytes) -> None:
        self.send(pb.SupervisorMessage(batch=pb.Batch(id=batch_id, items=list(items))))

    async def recv(self, timeout: float = 20.0) -> Optional[pb.WorkerMessage]:
        """The next non-log message, or None at the end of the stream."""
        while True:
            message = await asyncio.wait_for(self._call.read(), timeout)
            if message is grpc.aio.EOF:
                return None
            if message.WhichOneof("kind") == "log":
                self.logs.append(message.log)
                continue
            return message

    async def expect(self, kind: str, timeout: float = 20.0) -> pb.WorkerMessage:
        message = await self.recv(timeout)
        assert message is not None, f"stream ended while expecting {kind}"
        assert message.WhichOneof("kind") == kind, f"expected {kind}, got {message}"
        return message

    async def status(self) -> grpc.StatusCode:
        return await self._call.code()

    async def close(self) -> None:
        self._requests.put_nowait(None)
        await self._channel.close()
