"""The worker runtime inside the Swift server (``executor: embedded``).

The Swift side (``Sources/Sidecar/Embedded``) runs each embedded model on its own OS thread and calls
into this module with the GIL held. Only bytes cross the boundary, in the worker protocol's own
messages: `Runner.run` takes a serialized ``Batch`` and returns a serialized ``BatchResult``, so the
decode / predict / check / encode code is `batch.process_sync` / `process_async`, the same as in a
worker process. What differs from a process worker is only how batches arrive (a call instead of a
gRPC stream) and what a handler shares with its neighbours (the interpreter, the working directory).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .batch import process_async, process_sync
from .isolation import Isolator
from .loading import Handler, make_context
from .logs import LogForwarder
from .proto import worker_pb2 as pb
from .startup import load_now


class BatchTimeout(TimeoutError):
    """Raised in a handler's thread by the server when its batch runs past ``batch_timeout_s``."""


def _modules_under(directory: str) -> List[str]:
    """Names of imported modules whose file lies in `directory` (the model's own code)."""
    prefix = directory.rstrip(os.sep) + os.sep
    names = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.startswith(prefix):
            names.append(name)
    return names


class Runner:
    """One embedded model's handler; every method runs on that model's thread with the GIL held."""

    def __init__(self, handler: Handler, model_dir: str, logger: logging.Logger, forwarder: "_EmbeddedLogs") -> None:
        self._handler = handler
        self._model_dir = model_dir
        self._logger = logger
        self._forwarder = forwarder
        self._isolator = Isolator()
        # An async handler gets an event loop of its own, run on the model's thread for each batch.
        self._loop: Optional[asyncio.AbstractEventLoop] = asyncio.new_event_loop() if handler.is_async else None

    def run(self, data: bytes) -> bytes:
        """One batch: a serialized ``Batch`` in, a serialized ``BatchResult`` out. Never raises
        (except for the server's `BatchTimeout` landing outside the handler: the caller expects it)."""
        batch = pb.Batch.FromString(data)
        try:
            if self._loop is not None:
                result = self._loop.run_until_complete(process_async(self._handler, batch, self._isolator))
            else:
                result = process_sync(self._handler, batch, self._isolator)
        except BatchTimeout:
            raise
        except Exception as exc:  # a bug in the runtime; the server must still get an answer
            logging.getLogger("sidecar.worker").exception("processing batch %d failed", batch.id)
            result = pb.BatchResult(
                id=batch.id,
                batch_error=pb.Error(type="InternalError", message=f"{type(exc).__name__}: {exc}", kind=pb.RUNTIME_FAILED),
            )
        return result.SerializeToString()

    def drain_logs(self) -> Tuple[bytes, ...]:
        """Serialized ``LogRecord``s logged since the last call; usually ``()``, which allocates nothing."""
        return self._forwarder.drain()

    def close(self) -> None:
        """Unloading: forget the model's modules and directory, so that a reload imports its code
        afresh (modules stay cached in ``sys.modules`` otherwise) and no later model sees them."""
        _forget(self._model_dir, self._logger, self._forwarder)
        if self._loop is not None:
            self._loop.close()


class _EmbeddedLogs(LogForwarder):
    """Buffers records for the model's thread to hand to the server's logger after each batch.

    Records from other threads (a handler's own) are buffered too; the deque is thread-safe for
    append and popleft.
    """

    def drain(self) -> Tuple[bytes, ...]:
        buffer = self._buffer
        if not buffer:
            return ()
        records = []
        while buffer:
            records.append(buffer.popleft().log.SerializeToString())
        return tuple(records)


def _forget(directory: str, logger: logging.Logger, forwarder: logging.Handler) -> None:
    for name in _modules_under(directory):
        sys.modules.pop(name, None)
    while directory in sys.path:
        sys.path.remove(directory)
    importlib.invalidate_caches()
    logger.removeHandler(forwarder)


def load(model_dir: str, handler: str, model_name: str, config_json: str) -> Tuple[Optional[Runner], bytes]:
    """Load the handler; returns ``(runner, b"")`` or ``(None, serialized LoadFailed)``."""
    import json

    config: Dict[str, Any] = json.loads(config_json)
    directory = str(Path(model_dir).resolve())
    forwarder = _EmbeddedLogs()
    # The model's own logger (its Context.logger) goes to the server's log; a logger per model, so
    # that neighbours' records do not mix. Other loggers print warnings to stderr (Python's default).
    logger = logging.getLogger(f"sidecar.model.{model_name}")
    logger.addHandler(forwarder)
    logger.setLevel(logging.INFO)
    outcome = load_now(handler, make_context(Path(directory), 0, model_name, config))
    if outcome.handler is None:
        _forget(directory, logger, forwarder)
        return None, pb.LoadFailed(error=outcome.error).SerializeToString()
    return Runner(outcome.handler, directory, logger, forwarder), b""


def python_version() -> str:
    return sys.version.split()[0]


_fault_file: Optional[Any] = None


def enable_fault_log(path: str) -> None:
    """Send `faulthandler`'s report of a crash (every thread's Python stack) to `path`.

    Empty logs of servers that have exited (without a crash) are removed; a non-empty one is the
    evidence of a crash and stays, and so does every log of a server still running.
    """
    global _fault_file
    import faulthandler
    import glob

    for old in glob.glob(os.path.join(os.path.dirname(path), "faults-*.log")):
        if old == path or not _exited(old):
            continue  # a running server's log: it may still need it
        try:
            if os.path.getsize(old) == 0:
                os.remove(old)
        except OSError:
            pass
    _fault_file = open(path, "w")
    faulthandler.enable(file=_fault_file, all_threads=True)


def _exited(log_path: str) -> bool:
    """Whether the server that owns ``faults-<pid>.log`` is gone."""
    name = os.path.basename(log_path)
    try:
        pid = int(name[len("faults-") : -len(".log")])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
