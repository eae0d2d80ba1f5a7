"""The worker isolates the items of a raising batch itself (issue 20): every raising item gets its
own error and nothing else does, at every failure rate, in few handler calls; `isolate` off
(retry: false) runs no item twice; a model whose batches fail for every item fails fast and comes
back as soon as items succeed."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Callable, List

import pytest

from sidecar_worker.batch import process_async, process_sync
from sidecar_worker.isolation import FAIL_FAST_AFTER, Isolator
from sidecar_worker.loading import Handler
from sidecar_worker.proto import worker_pb2 as pb


def batch(items: List[Any], isolate: bool = True, batch_id: int = 3) -> pb.Batch:
    return pb.Batch(id=batch_id, items=[json.dumps(item).encode() for item in items], isolate=isolate)


class Counting:
    """A handler that raises for a whole batch holding a marked item, and counts what it ran."""

    def __init__(self) -> None:
        self.calls = 0
        self.runs: List[Any] = []

    def __call__(self, values: List[Any]) -> List[Any]:
        self.calls += 1
        self.runs.extend(values)
        bad = [v for v in values if isinstance(v, dict) and v.get("bad")]
        if bad:
            raise ValueError(f"bad item {bad[0]['n']}")
        return [v["n"] * 10 for v in values]


def handler(fn: Callable[[List[Any]], Any]) -> Handler:
    return Handler(predict=fn, is_async=False, spec="test:predict")


def items(count: int, bad: set[int]) -> List[Any]:
    return [{"n": n, "bad": n in bad} for n in range(count)]


def outcome(result: pb.BatchResult, count: int) -> List[Any]:
    """Per item: its prediction, or ("error", message); a fail-fast batch error goes to every item."""
    if result.fail_fast:
        return [("error", result.batch_error.message)] * count
    assert not result.HasField("batch_error"), result.batch_error
    values = json.loads(result.outputs)
    assert len(values) == count
    errors = {e.index: e.error for e in result.item_errors}
    return [("error", errors[i].message) if i in errors else values[i] for i in range(count)]


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_each_raising_item_gets_its_own_error_and_nothing_else_does(rate: float) -> None:
    rng = random.Random(int(rate * 1000))
    isolator = Isolator()
    for _ in range(20):
        bad = {n for n in range(64) if rng.random() < rate}
        fn = Counting()
        result = process_sync(handler(fn), batch(items(64, bad)), isolator)
        got = outcome(result, 64)
        for n in range(64):
            if n in bad:
                # Its own error; at 100 % the model fails fast: the batch's error, saying so.
                own = got[n][1] == f"bad item {n}"
                fast = result.fail_fast and got[n][1].startswith(f"bad item {min(bad)} (the batch's error")
                assert got[n][0] == "error" and (own or fast), (n, got[n])
            else:
                assert got[n] == n * 10, (n, got[n])
        if not bad:
            assert fn.calls == 1 and result.isolation_calls == 0


def test_one_raising_item_costs_a_bisection_not_a_call_per_item() -> None:
    fn = Counting()
    result = process_sync(handler(fn), batch(items(64, {37})), Isolator())
    assert outcome(result, 64)[37] == ("error", "bad item 37")
    assert result.isolation_calls <= 13, result.isolation_calls  # at most 2·log2(64) + 1
    assert result.item_errors[0].error.kind == pb.HANDLER_RAISED
    assert "ValueError" in result.item_errors[0].error.traceback


def test_dense_failures_go_item_by_item() -> None:
    isolator = Isolator()
    for _ in range(2):
        process_sync(handler(Counting()), batch(items(16, set(range(0, 16, 2)))), isolator)
    assert isolator.dense
    fn = Counting()
    result = process_sync(handler(fn), batch(items(16, set(range(0, 16, 2)))), isolator)
    assert result.isolation_calls == 16, "one by one: n calls, not 2n - 1"


def test_without_isolate_no_item_runs_twice() -> None:
    fn = Counting()
    result = process_sync(handler(fn), batch(items(8, {3}), isolate=False), Isolator())
    assert result.HasField("batch_error") and result.batch_error.kind == pb.HANDLER_RAISED
    assert fn.calls == 1 and len(fn.runs) == 8


def test_everything_failing_fails_fast_then_recovers() -> None:
    isolator = Isolator()
    for _ in range(FAIL_FAST_AFTER):
        result = process_sync(handler(Counting()), batch(items(32, set(range(32)))), isolator)
        assert not result.fail_fast
    assert isolator.fail_fast
    fn = Counting()
    result = process_sync(handler(fn), batch(items(32, set(range(32)))), isolator)
    assert result.fail_fast and fn.calls == 2, "the batch and one probe"
    # One error for every item, which the supervisor hands out without bisecting.
    assert result.batch_error.message.startswith("bad item 0") and "not run alone" in result.batch_error.message
    # Items succeed again: the probe sees it and the batch is isolated normally.
    fn = Counting()
    result = process_sync(handler(fn), batch(items(32, {5})), isolator)
    assert not isolator.fail_fast and not result.fail_fast
    assert outcome(result, 32)[6] == 60 and outcome(result, 32)[5] == ("error", "bad item 5")


def test_a_wrong_length_inside_isolation_fails_the_batch() -> None:
    def fn(values: List[Any]) -> List[Any]:
        if len(values) == 8:
            raise ValueError("whole batch")
        return [1]  # wrong for any sub-batch but a lone item
    result = process_sync(handler(fn), batch(items(8, set())), Isolator())
    assert result.HasField("batch_error") and result.batch_error.kind == pb.WRONG_RESULT


def test_async_handlers_are_isolated_the_same_way() -> None:
    counting = Counting()

    async def fn(values: List[Any]) -> List[Any]:
        return counting(values)

    result = asyncio.run(process_async(Handler(predict=fn, is_async=True, spec="test:predict"), batch(items(16, {2, 9})), Isolator()))
    got = outcome(result, 16)
    assert got[2] == ("error", "bad item 2") and got[9] == ("error", "bad item 9") and got[3] == 30
