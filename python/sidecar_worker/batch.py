"""Running one batch through the handler: decode, predict, check, encode → ``BatchResult``.

`process_sync` runs in the worker's single predict thread; `process_async` on the event loop.
A batch with ``tensor_items`` takes the tensor path (`tensors`): the handler gets dicts of ndarrays
and the results go into ``BatchResult.tensor_outputs``; otherwise items are JSON values (`codec`).
"""

from __future__ import annotations

import time
import traceback
from types import TracebackType
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple

from .codec import BatchFailure, DecodedItems, check_results, decode_items, encode_outputs, item_error
from .isolation import Isolator, Outcome, Plan, Raised
from .loading import Handler
from .proto import worker_pb2 as pb
from .tensors import TensorError, decode_tensor_item, encode_tensor_outputs, load_numpy, split_rows


def _handler_raised(batch_id: int, exc: BaseException, seconds: float, errors: List[pb.ItemError]) -> pb.BatchResult:
    return pb.BatchResult(id=batch_id, item_errors=errors, batch_error=_format(exc), compute_seconds=seconds)


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


# Formatted stacks by the frames they show: a handler raising on many items raises from the same
# lines each time, and formatting a stack (source lines, 3.11's position carets) costs a hundred
# times what the rest of an item's error does. Bounded: cleared when full.
_STACKS: Dict[Tuple[Tuple[Any, int], ...], str] = {}
_STACKS_LIMIT = 256


def _stack(tb: Optional[TracebackType]) -> str:
    key = tuple((frame.f_code, line) for frame, line in traceback.walk_tb(tb))
    text = _STACKS.get(key)
    if text is None:
        if len(_STACKS) >= _STACKS_LIMIT:
            _STACKS.clear()
        text = "".join(traceback.StackSummary.extract(traceback.walk_tb(tb)).format())
        _STACKS[key] = text
    return text


def _format(exc: BaseException) -> pb.Error:
    tb = exc.__traceback__
    # Drop this module's frames (the predict call, the isolation driver) when the handler's own follow.
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if exc.__cause__ or exc.__context__ else (
        "Traceback (most recent call last):\n" + _stack(tb) + "".join(traceback.format_exception_only(type(exc), exc))
        if tb is not None else "".join(traceback.format_exception_only(type(exc), exc))
    )
    return pb.Error(type=type(exc).__name__, message=str(exc), traceback=text, kind=pb.HANDLER_RAISED)


def _checked(batch: pb.Batch, results: Any, expected: int) -> Sequence[Any]:
    """A sub-batch's results as `_finish` would check them; raises `BatchFailure`."""
    return check_results(split_rows(results) if batch.tensor_items else results, expected)


def _wrong_result(batch: pb.Batch, decoded: DecodedItems, failure: BatchFailure, seconds: float, calls: int) -> pb.BatchResult:
    return pb.BatchResult(
        id=batch.id,
        item_errors=decoded.errors,
        batch_error=pb.Error(type=failure.type_name, message=failure.message, kind=pb.WRONG_RESULT),
        compute_seconds=seconds,
        isolation_calls=calls,
    )


def _isolated(batch: pb.Batch, decoded: DecodedItems, out: List[Any], seconds: float, calls: int) -> pb.BatchResult:
    """The batch answered item by item: each result encoded, each ``Raised`` its own error."""
    values: List[Any] = []
    indices: List[int] = []
    errors = list(decoded.errors)
    for k, outcome in enumerate(out):
        index = k if decoded.indices is None else decoded.indices[k]
        if isinstance(outcome, Raised):
            errors.append(pb.ItemError(index=index, error=_format(outcome.error)))
        else:
            values.append(outcome)
            indices.append(index)
    result = pb.BatchResult(id=batch.id, compute_seconds=seconds, isolation_calls=calls)
    if batch.tensor_items:
        encode_errors = _encode_tensors(values, result.tensor_outputs, len(batch.tensor_items), indices)
    else:
        result.outputs, encode_errors = encode_outputs(values, len(batch.items), indices)
    errors.extend(encode_errors)
    errors.sort(key=lambda e: e.index)
    result.item_errors.extend(errors)
    return result


def _every_item_failed(batch: pb.Batch, decoded: DecodedItems, exc: BaseException, seconds: float, calls: int) -> pb.BatchResult:
    """Fail fast: the batch's error for every item, formatted once, no isolation; the message says
    so, since it may name another item of the batch."""
    error = _format(exc)
    error.message = f"{error.message} (the batch's error: the model's recent batches failed for every item, so items were not run alone)"
    if not decoded.errors:
        # One error for the supervisor to give every item (with fail_fast it does not bisect):
        # 64 copies of a traceback cost more than the rest of the batch.
        return pb.BatchResult(id=batch.id, batch_error=error, compute_seconds=seconds, isolation_calls=calls, fail_fast=True)
    errors = list(decoded.errors)
    for k in range(len(decoded.values)):
        errors.append(pb.ItemError(index=k if decoded.indices is None else decoded.indices[k], error=error))
    errors.sort(key=lambda e: e.index)
    result = pb.BatchResult(id=batch.id, compute_seconds=seconds, isolation_calls=calls, fail_fast=True)
    if batch.tensor_items:
        result.tensor_outputs.extend(pb.TensorItem() for _ in batch.tensor_items)
    else:
        result.outputs, _ = encode_outputs([], len(batch.items), [])
    result.item_errors.extend(errors)
    return result


def _should_isolate(batch: pb.Batch, decoded: DecodedItems) -> bool:
    # A lone item's error is its own already; without `isolate` (retry: false) no item runs twice.
    return batch.isolate and len(decoded.values) > 1


# What a batch's processing yields: the items of the next handler call (the whole batch first, then
# the fail-fast probe and the isolation plan's sub-batches); what it is sent: (True, what the call
# returned) or (False, what it raised); what it returns: the BatchResult.
Steps = Generator[List[Any], Outcome, pb.BatchResult]


def _steps(batch: pb.Batch, isolator: Optional[Isolator]) -> Steps:
    """One batch, from decoding to its BatchResult, with every handler call left to the driver
    (``process_sync`` or ``process_async``), so sync and async handlers share all of it. Calls
    after the first are made outside the driver's ``except`` block, so an item's own exception is
    not chained to the batch's."""
    decoded = _decode(batch)
    empty = _nothing_to_predict(batch, decoded)
    if empty is not None:
        return empty
    start = time.perf_counter()
    ok, value = yield decoded.values
    if ok:
        if isolator is not None:
            isolator.succeeded()
        return _finish(batch, decoded, value, time.perf_counter() - start)
    failure = value
    assert isinstance(failure, BaseException)
    if isolator is None or not _should_isolate(batch, decoded):
        return _handler_raised(batch.id, failure, time.perf_counter() - start, decoded.errors)
    values = decoded.values
    calls = 0
    try:
        if isolator.fail_fast:
            calls += 1
            probe_ok, probe = yield values[:1]
            if not probe_ok:
                return _every_item_failed(batch, decoded, failure, time.perf_counter() - start, calls)
            _checked(batch, probe, 1)
            isolator.succeeded()
        plan: Plan = isolator.plan(len(values))
        lo, hi = next(plan)
        while True:
            calls += 1
            ok, value = yield values[lo:hi]
            lo, hi = plan.send((True, _checked(batch, value, hi - lo)) if ok else (False, value))
    except StopIteration as done:
        return _isolated(batch, decoded, done.value, time.perf_counter() - start, calls)
    except BatchFailure as bad:
        return _wrong_result(batch, decoded, bad, time.perf_counter() - start, calls)


def process_sync(handler: Handler, batch: pb.Batch, isolator: Optional[Isolator] = None) -> pb.BatchResult:
    steps = _steps(batch, isolator)
    try:
        items = next(steps)
        while True:
            outcome: Outcome
            try:
                outcome = (True, handler.predict(items))
            except Exception as exc:
                outcome = (False, exc)
            items = steps.send(outcome)
    except StopIteration as done:
        result: pb.BatchResult = done.value
        return result


async def process_async(handler: Handler, batch: pb.Batch, isolator: Optional[Isolator] = None) -> pb.BatchResult:
    steps = _steps(batch, isolator)
    try:
        items = next(steps)
        while True:
            outcome: Outcome
            try:
                outcome = (True, await handler.predict(items))
            except Exception as exc:
                outcome = (False, exc)
            items = steps.send(outcome)
    except StopIteration as done:
        result: pb.BatchResult = done.value
        return result
