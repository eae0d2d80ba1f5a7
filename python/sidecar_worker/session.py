"""The ``Worker/Session`` stream: Hello, Ready/LoadFailed, batches, pings, logs, shutdown.

All outgoing messages go through one queue, drained by the response generator (the only writer).
Pings are answered on the event loop as soon as they are read. Sync handlers run in a single
predict thread, so batches execute one at a time in arrival order; async handlers run on the loop.

A sync batch that is known to be short (recent batches took under INLINE_BELOW_SECONDS on average)
runs inline on the loop instead, when the predict thread is idle: the hand-off to the thread and back
costs more than such a batch itself. Pings then wait at most that long; a batch that turns out slow
moves the average up, and the next ones go back to the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import AsyncIterator, List, Optional, Set

import grpc

from .batch import process_async, process_sync
from .isolation import Isolator
from .loading import Handler
from .startup import LoadOutcome
from .logs import LogForwarder
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc

log = logging.getLogger("sidecar.worker")

# Exit code when the handler failed to load.
EXIT_LOAD_FAILED = 3
# How long SIGTERM/SIGINT waits for in-flight batches before ending the stream anyway.
SIGNAL_GRACE_SECONDS = 5.0
# Sync batches shorter than this on average run inline on the event loop (see the module docstring).
INLINE_BELOW_SECONDS = 0.002


class _Session:
    """State of one Session stream."""

    def __init__(
        self,
        load: "asyncio.Future[LoadOutcome]",
        hello: pb.Hello,
        logs: Optional[LogForwarder],
        executor: concurrent.futures.Executor,
        stop: asyncio.Event,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._load = load
        self._hello = hello
        self._logs = logs
        self._executor = executor
        self._stop = stop
        self._out: "asyncio.Queue[Optional[pb.WorkerMessage]]" = asyncio.Queue()
        self._handler: "asyncio.Future[Optional[Handler]]" = self._loop.create_future()
        # Which items of a raising batch raise: one policy per worker (its failure history).
        self._isolator = Isolator()
        self._inflight: Set["asyncio.Task[None]"] = set()
        # Average wall time of recent sync batches (starts high: the first batches use the thread).
        self._recent_seconds = 1.0
        # Sync batches handed to the predict thread and not finished: while any is, later batches
        # must queue behind it there, to keep the one-at-a-time, in-order guarantee.
        self._in_thread = 0
        self._tasks: List["asyncio.Task[None]"] = []
        self.exit_code = 0

    def _put(self, message: Optional[pb.WorkerMessage]) -> None:
        self._out.put_nowait(message)

    def start(self, requests: AsyncIterator[pb.SupervisorMessage]) -> None:
        """Queue Hello (and buffered logs), start awaiting the load and reading requests."""
        self._put(pb.WorkerMessage(hello=self._hello))
        if self._logs is not None:
            self._logs.attach(self._loop, self._put)
        self._tasks = [
            asyncio.ensure_future(self._await_load()),
            asyncio.ensure_future(self._serve(requests)),
        ]

    async def next_message(self) -> Optional[pb.WorkerMessage]:
        """The next message to write, or None when the stream must end."""
        return await self._out.get()

    def close(self) -> None:
        if self._logs is not None:
            self._logs.detach()
        for task in self._tasks + list(self._inflight):
            task.cancel()

    async def _await_load(self) -> None:
        outcome = await self._load
        if outcome.handler is None:
            self._put(pb.WorkerMessage(load_failed=pb.LoadFailed(error=outcome.error)))
            self.exit_code = EXIT_LOAD_FAILED
            self._handler.set_result(None)
            self._put(None)
        else:
            self._put(pb.WorkerMessage(ready=pb.Ready(load_seconds=outcome.seconds)))
            self._handler.set_result(outcome.handler)

    async def _serve(self, requests: AsyncIterator[pb.SupervisorMessage]) -> None:
        reader = asyncio.ensure_future(self._read(requests))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
        grace: Optional[float] = None
        if reader.done():
            stop.cancel()
            if not reader.cancelled() and reader.exception() is not None:
                log.warning("reading from the supervisor failed: %r", reader.exception())
        else:  # SIGTERM / SIGINT
            reader.cancel()
            grace = SIGNAL_GRACE_SECONDS
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        self._put(None)

    async def _read(self, requests: AsyncIterator[pb.SupervisorMessage]) -> None:
        """Read until Shutdown or the supervisor half-closes the stream."""
        async for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "ping":
                self._put(pb.WorkerMessage(pong=pb.Pong(nonce=message.ping.nonce)))
            elif kind == "batch":
                task = asyncio.ensure_future(self._process(message.batch))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            elif kind == "shutdown":
                return

    async def _process(self, batch: pb.Batch) -> None:
        handler = await self._handler
        if handler is None:
            return
        try:
            if handler.is_async:
                result = await process_async(handler, batch, self._isolator)
            else:
                start = time.perf_counter()
                if self._in_thread == 0 and self._recent_seconds < INLINE_BELOW_SECONDS:
                    result = process_sync(handler, batch, self._isolator)
                else:
                    self._in_thread += 1
                    try:
                        result = await self._loop.run_in_executor(self._executor, process_sync, handler, batch, self._isolator)
                    finally:
                        self._in_thread -= 1
                self._note_duration(time.perf_counter() - start)
        except Exception as exc:  # a bug in the runtime; never leave the supervisor waiting
            log.exception("processing batch %d failed", batch.id)
            result = pb.BatchResult(
                id=batch.id,
                batch_error=pb.Error(type="InternalError", message=f"{type(exc).__name__}: {exc}", kind=pb.RUNTIME_FAILED),
            )
        self._put(pb.WorkerMessage(result=result))

    def _note_duration(self, seconds: float) -> None:
        # An exponential average: a few fast batches bring it down, one slow batch sends it up.
        self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * seconds


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves exactly one Session; when it ends, ``finished`` resolves to the process exit code."""

    def __init__(
        self,
        load: "concurrent.futures.Future[LoadOutcome]",
        hello: pb.Hello,
        logs: Optional[LogForwarder],
        executor: concurrent.futures.Executor,
        finished: "asyncio.Future[int]",
    ) -> None:
        self._load = asyncio.wrap_future(load)
        self._hello = hello
        self._logs = logs
        self._executor = executor
        self._finished = finished
        self._stop = asyncio.Event()
        self._started = False

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM/SIGINT): finish in-flight batches briefly, end the stream."""
        if self._started:
            self._stop.set()
        else:
            self._finish(0)

    def _finish(self, code: int) -> None:
        if not self._finished.done():
            self._finished.set_result(code)

    async def Session(  # noqa: N802 - the gRPC method name
        self, request_iterator: AsyncIterator[pb.SupervisorMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerMessage]:
        if self._started or self._finished.done():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker already has a session")
        self._started = True
        session = _Session(self._load, self._hello, self._logs, self._executor, self._stop)
        session.start(request_iterator)
        try:
            while True:
                message = await session.next_message()
                if message is None:
                    return
                yield message
        finally:
            session.close()
            self._finish(session.exit_code)
