"""Running one batch through the handler: decode, predict, check, encode → ``BatchResult``.

`process_sync` runs in the worker's single predict thread; `process_async` on the event loop.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, List, Optional

from .codec import BatchFailure, DecodedItems, check_results, decode_items, encode_outputs
from .handler import Handler
from .proto import worker_pb2 as pb


def _handler_raised(batch_id: int, exc: Exception, seconds: float, errors: List[pb.ItemError]) -> pb.BatchResult:
    tb = exc.__traceback__
    # Drop this module's frame (the predict call) when the handler's own frames follow it.
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return pb.BatchResult(
        id=batch_id,
        item_errors=errors,
        batch_error=pb.Error(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, tb)),
        ),
        compute_seconds=seconds,
    )


def _nothing_to_predict(batch: pb.Batch, decoded: DecodedItems) -> Optional[pb.BatchResult]:
    if decoded.values:
        return None
    outputs, _ = encode_outputs([], len(batch.items), [])
    return pb.BatchResult(id=batch.id, outputs=outputs, item_errors=decoded.errors)


def _finish(batch: pb.Batch, decoded: DecodedItems, results: Any, seconds: float) -> pb.BatchResult:
    try:
        checked = check_results(results, len(decoded.values))
    except BatchFailure as failure:
        return pb.BatchResult(
            id=batch.id,
            item_errors=decoded.errors,
            batch_error=pb.Error(type=failure.type_name, message=failure.message),
            compute_seconds=seconds,
        )
    outputs, encode_errors = encode_outputs(checked, len(batch.items), decoded.indices)
    errors = decoded.errors + encode_errors
    if decoded.errors and encode_errors:
        errors.sort(key=lambda e: e.index)
    return pb.BatchResult(id=batch.id, outputs=outputs, item_errors=errors, compute_seconds=seconds)


def process_sync(handler: Handler, batch: pb.Batch) -> pb.BatchResult:
    decoded = decode_items(batch.items)
    empty = _nothing_to_predict(batch, decoded)
    if empty is not None:
        return empty
    start = time.perf_counter()
    try:
        results = handler.predict(decoded.values)
    except Exception as exc:
        return _handler_raised(batch.id, exc, time.perf_counter() - start, decoded.errors)
    return _finish(batch, decoded, results, time.perf_counter() - start)


async def process_async(handler: Handler, batch: pb.Batch) -> pb.BatchResult:
    decoded = decode_items(batch.items)
    empty = _nothing_to_predict(batch, decoded)
    if empty is not None:
        return empty
    start = time.perf_counter()
    try:
        results = await handler.predict(decoded.values)
    except Exception as exc:
        return _handler_raised(batch.id, exc, time.perf_counter() - start, decoded.errors)
    return _finish(batch, decoded, results, time.perf_counter() - start)
