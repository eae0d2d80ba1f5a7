"""Process setup: logging, lifeline, background load, the grpc.aio server on a Unix socket, signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import grpc

from . import PROTOCOL_VERSION, __version__, lifeline
from .loading import make_context
from .startup import LoadOutcome, start_loading
from .logs import LogForwarder, install
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc
from .session import WorkerService

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# How long stopping the server waits for the finished session's last messages to go out.
SERVER_STOP_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Options:
    socket: Path
    model_dir: Path
    handler: str
    model_name: str
    worker_index: int
    config: Dict[str, Any]
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    lifeline: bool = True


def _remove_stale_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


async def serve(
    options: Options,
    load: "concurrent.futures.Future[LoadOutcome]",
    logs: Optional[LogForwarder],
) -> int:
    """Serve one session; return the process exit code (0, or 3 when the handler failed to load)."""
    loop = asyncio.get_running_loop()
    finished: "asyncio.Future[int]" = loop.create_future()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-predict")
    hello = pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        pid=os.getpid(),
        python_version=platform.python_version(),
        runtime_version=__version__,
        worker_index=options.worker_index,
    )
    service = WorkerService(load, hello, logs, executor, finished)
    # Before the socket exists: a supervisor that sees the socket may send SIGTERM right away.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.max_message_bytes),
        ]
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    # Bind under a temporary name and rename once listening, so that the socket path exists only when
    # connections to it succeed (the supervisor connects as soon as it sees the file).
    binding = options.socket.with_name(options.socket.name + ".tmp")
    _remove_stale_socket(options.socket)
    _remove_stale_socket(binding)
    server.add_insecure_port(f"unix:{binding}")
    await server.start()
    os.replace(binding, options.socket)
    try:
        return await finished
    finally:
        await server.stop(grace=SERVER_STOP_GRACE_SECONDS)
        executor.shutdown(wait=False)
        _remove_stale_socket(options.socket)


def run(options: Options) -> int:
    """Run a worker process to completion and return its exit code."""
    logs = install()
    if options.lifeline:
        lifeline.start()
    model_dir = str(options.model_dir)
    if not sys.path or sys.path[0] != model_dir:
        sys.path.insert(0, model_dir)
    context = make_context(options.model_dir, options.worker_index, options.model_name, options.config)
    load = start_loading(options.handler, context)  # before the server, so loading starts at once
    return asyncio.run(serve(options, load, logs))
