"""Running one batch through the handler: decode, predict, check, encode → ``BatchResult``.

`process_sync` runs in the worker's single predict thread; `process_async` on the event loop.
A batch with ``tensor_items`` takes the tensor path (`tensors`): the handler gets dicts of ndarrays
and the results go into ``BatchResult.tensor_outputs``; otherwise items are JSON values (`codec`).
"""

from __future__ import annotations

import time
import traceback
from typing import Any, List, Optional, Sequence, Tuple

from .codec import BatchFailure, DecodedItems, check_results, decode_items, encode_outputs, item_error
from .loading import Handler
from .proto import worker_pb2 as pb
from .tensors import TensorError, decode_tensor_item, encode_tensor_outputs, load_numpy, split_rows


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
            kind=pb.HANDLER_RAISED,
        ),
        compute_seconds=seconds,
    )


def _decode_tensors(items: Sequence[pb.TensorItem]) -> DecodedItems:
    """Decode each item's tensors; a bad item becomes an item error (all of them without numpy)."""
    try:
        load_numpy()
    except TensorError as exc:
        # numpy missing from the model's environment: not the caller's error.
        return DecodedItems([], [], [item_error(i, exc.type_name, exc.message, pb.RUNTIME_FAILED) for i in range(len(items))])
    decoded = DecodedItems([], [], [])
    for index, item in enumerate(items):
        try:
            decoded.values.append(decode_tensor_item(item))
        except TensorError as exc:
            decoded.errors.append(item_error(index, exc.type_name, f"item {index}: {exc.message}", pb.INVALID_INPUT))
        else:
            assert decoded.indices is not None
            decoded.indices.append(index)
    if not decoded.errors:
        decoded.indices = None
    return decoded


def _encode_tensors(
    results: Sequence[Any], outputs: Any, count: int, indices: Optional[List[int]]
) -> List[pb.ItemError]:
    """One TensorItem per batch item, added to `outputs` in place (empty where there is no result);
    failures become item errors."""
    items = [outputs.add() for _ in range(count)]
    errors: List[pb.ItemError] = []
    for k, result in enumerate(results):
        index = k if indices is None else indices[k]
        try:
            encode_tensor_outputs(result, items[index])
        except Exception as exc:
            items[index].Clear()
            message = exc.message if isinstance(exc, TensorError) else f"{type(exc).__name__}: {exc}"
            errors.append(
                item_error(index, "NotSerializable", f"result {index} cannot be sent as tensors: {message}", pb.NOT_SERIALIZABLE)
            )
    return errors


def _decode(batch: pb.Batch) -> DecodedItems:
    return _decode_tensors(batch.tensor_items) if batch.tensor_items else decode_items(batch.items)


def _nothing_to_predict(batch: pb.Batch, decoded: DecodedItems) -> Optional[pb.BatchResult]:
    if decoded.values:
        return None
    if batch.tensor_items:
        empty = [pb.TensorItem() for _ in batch.tensor_items]
        return pb.BatchResult(id=batch.id, tensor_outputs=empty, item_errors=decoded.errors)
    outputs, _ = encode_outputs([], len(batch.items), [])
    return pb.BatchResult(id=batch.id, outputs=outputs, item_errors=decoded.errors)


def _finish(batch: pb.Batch, decoded: DecodedItems, results: Any, seconds: float) -> pb.BatchResult:
    tensors = bool(batch.tensor_items)
    try:
        # An ndarray result is split into rows here so that each row keeps its dtype.
        checked = check_results(split_rows(results) if tensors else results, len(decoded.values))
    except BatchFailure as failure:
        return pb.BatchResult(
            id=batch.id,
            item_errors=decoded.errors,
            batch_error=pb.Error(type=failure.type_name, message=failure.message, kind=pb.WRONG_RESULT),
            compute_seconds=seconds,
        )
    result = pb.BatchResult(id=batch.id, compute_seconds=seconds)
    if tensors:
        # Built in place: a list of TensorItems passed to the constructor would be copied.
        encode_errors = _encode_tensors(checked, result.tensor_outputs, len(batch.tensor_items), decoded.indices)
    else:
        result.outputs, encode_errors = encode_outputs(checked, len(batch.items), decoded.indices)
    errors = decoded.errors + encode_errors
    if decoded.errors and encode_errors:
        errors.sort(key=lambda e: e.index)
    result.item_errors.extend(errors)
    return result


def process_sync(handler: Handler, batch: pb.Batch) -> pb.BatchResult:
    decoded = _decode(batch)
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
    decoded = _decode(batch)
    empty = _nothing_to_predict(batch, decoded)
    if empty is not None:
        return empty
    start = time.perf_counter()
    try:
        results = await handler.predict(decoded.values)
    except Exception as exc:
        return _handler_raised(batch.id, exc, time.perf_counter() - start, decoded.errors)
    return _finish(batch, decoded, results, time.perf_counter() - start)
