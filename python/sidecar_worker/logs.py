"""Forwarding Python log records to the supervisor as ``LogRecord`` messages.

Records may come from any thread. Before a session is attached they are buffered (the newest
`BUFFER_CAPACITY` are kept) and flushed into the session's outgoing queue on `LogForwarder.attach`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from .proto import worker_pb2 as pb

BUFFER_CAPACITY = 1000

Put = Callable[[pb.WorkerMessage], None]


class LogForwarder(logging.Handler):
    def __init__(self, capacity: int = BUFFER_CAPACITY) -> None:
        super().__init__(level=logging.NOTSET)
        self.setFormatter(logging.Formatter("%(message)s"))  # adds exception text when present
        self._buffer: Deque[pb.WorkerMessage] = deque(maxlen=capacity)
        self._sink: Optional[Tuple[asyncio.AbstractEventLoop, Put]] = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        message = pb.WorkerMessage(log=pb.LogRecord(level=record.levelno, logger=record.name, message=text))
        sink = self._sink
        if sink is None:
            self._buffer.append(message)
            return
        loop, put = sink
        try:
            loop.call_soon_threadsafe(put, message)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def attach(self, loop: asyncio.AbstractEventLoop, put: Put) -> None:
        """Send buffered and future records through ``put`` (called on ``loop``'s thread)."""
        self.acquire()  # emit() runs under this lock, so no record slips between flush and switch
        try:
            while self._buffer:
                put(self._buffer.popleft())
            self._sink = (loop, put)
        finally:
            self.release()

    def detach(self) -> None:
        self.acquire()
        try:
            self._sink = None
        finally:
            self.release()


def install(level: int = logging.INFO) -> LogForwarder:
    """Make a `LogForwarder` the root logger's only handler (so nothing is also printed to stderr)."""
    forwarder = LogForwarder()
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(forwarder)
    root.setLevel(level)
    return forwarder
