"""Runs the handler's load (`loading.load_handler`) in a background thread, so the event loop answers pings during a slow load."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from .loading import Context, Handler, HandlerLoadError, load_handler
from .proto import worker_pb2 as pb

log = logging.getLogger("sidecar.worker")


@dataclass(frozen=True)
class LoadOutcome:
    """Either `handler` (with `seconds`) or `error`."""

    handler: Optional[Handler]
    seconds: float
    error: Optional[pb.Error] = None


def load_now(spec: str, context: Context) -> LoadOutcome:
    """Load the handler on this thread; never raises."""
    start = time.perf_counter()
    try:
        handler = load_handler(spec, context)
    except HandlerLoadError as exc:
        return LoadOutcome(None, time.perf_counter() - start, pb.Error(
            type=exc.type_name, message=exc.message, traceback=exc.traceback_text))
    except BaseException as exc:  # a bug in the loader itself, or SystemExit from the model's import
        return LoadOutcome(None, time.perf_counter() - start, pb.Error(
            type=type(exc).__name__, message=f"loading {spec} failed: {exc}", traceback=traceback.format_exc()))
    seconds = time.perf_counter() - start
    log.info("loaded handler %s for model %s in %.3f s", spec, context.model_name, seconds)
    return LoadOutcome(handler, seconds)


def start_loading(spec: str, context: Context) -> "concurrent.futures.Future[LoadOutcome]":
    """Load in a daemon thread; the returned future always resolves to a `LoadOutcome`."""
    future: "concurrent.futures.Future[LoadOutcome]" = concurrent.futures.Future()

    def run() -> None:
        future.set_result(load_now(spec, context))

    threading.Thread(target=run, name="sidecar-load", daemon=True).start()
    return future
