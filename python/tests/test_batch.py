from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, List

import pytest

from sidecar_worker.batch import process_async, process_sync
from sidecar_worker.loading import Handler
from sidecar_worker.proto import worker_pb2 as pb


def batch(*items: bytes, batch_id: int = 9) -> pb.Batch:
    return pb.Batch(id=batch_id, items=list(items))


def sync(fn: Callable[[List[Any]], Any]) -> Handler:
    return Handler(predict=fn, is_async=False, spec="test:predict")


def test_echo_round_trip():
    result = process_sync(sync(lambda items: items), batch(b'{"x": 1.5, "id": 7}', b"[1]"))
    assert result.id == 9
    assert json.loads(result.outputs) == [{"x": 1.5, "id": 7}, [1]]
    assert not result.HasField("batch_error")
    assert list(result.item_errors) == []
    assert result.compute_seconds > 0


def test_invalid_item_is_skipped_and_null():
    seen = []

    def predict(items):
        seen.append(list(items))
        return [x * 10 for x in items]

    result = process_sync(sync(predict), batch(b"1", b"{oops", b"3"))
    assert seen == [[1, 3]]
    assert json.loads(result.outputs) == [10, None, 30]
    assert [(e.index, e.error.type) for e in result.item_errors] == [(1, "InvalidJSON")]


def test_all_items_invalid_and_empty_batch_skip_predict():
    def predict(items):
        raise AssertionError("predict must not be called")

    result = process_sync(sync(predict), batch(b"{", b"}"))
    assert json.loads(result.outputs) == [None, None]
    assert [e.index for e in result.item_errors] == [0, 1]
    assert process_sync(sync(predict), batch()).outputs == b"[]"


def test_wrong_length():
    result = process_sync(sync(lambda items: items[:-1]), batch(b"1", b"2", b"3", b"4"))
    assert result.batch_error.type == "WrongLength"
    assert result.batch_error.message == (
        "handler returned 3 results for a batch of 4 items; predict must return one result per item, in order"
    )
    assert result.outputs == b""


def test_wrong_type():
    result = process_sync(sync(lambda items: {"a": 1}), batch(b"1"))
    assert result.batch_error.type == "WrongType"
    assert result.batch_error.message == "handler returned dict, expected a list with one result per item"


def test_raising_handler_then_next_batch_works():
    calls = []

    def predict(items):
        calls.append(items)
        if len(calls) == 1:
            raise ValueError("bad input shape")
        return items

    handler = sync(predict)
    failed = process_sync(handler, batch(b"1"))
    assert failed.batch_error.type == "ValueError"
    assert failed.batch_error.message == "bad input shape"
    assert "in predict" in failed.batch_error.traceback
    assert 'raise ValueError("bad input shape")' in failed.batch_error.traceback
    assert failed.outputs == b""
    ok = process_sync(handler, batch(b"2"))
    assert not ok.HasField("batch_error")
    assert json.loads(ok.outputs) == [2]


def test_unserializable_result_isolated():
    result = process_sync(sync(lambda items: [1, object(), 3]), batch(b"1", b"2", b"3"))
    assert json.loads(result.outputs) == [1, None, 3]
    assert [(e.index, e.error.type) for e in result.item_errors] == [(1, "NotSerializable")]


def test_decode_and_encode_errors_together_sorted():
    result = process_sync(sync(lambda items: [object(), 2]), batch(b"1", b"x", b"2"))
    assert json.loads(result.outputs) == [None, None, 2]
    assert [(e.index, e.error.type) for e in result.item_errors] == [(0, "NotSerializable"), (1, "InvalidJSON")]


def test_numpy_result():
    np = pytest.importorskip("numpy")
    result = process_sync(sync(lambda items: np.asarray(items) * 2), batch(b"[1, 2]", b"[3, 4]"))
    assert json.loads(result.outputs) == [[2, 4], [6, 8]]


def test_async_handler():
    async def predict(items):
        await asyncio.sleep(0)
        return [x + 1 for x in items]

    async def failing(items):
        raise KeyError("k")

    handler = Handler(predict=predict, is_async=True, spec="t")
    result = asyncio.run(process_async(handler, batch(b"1", b"2")))
    assert json.loads(result.outputs) == [2, 3]
    failed = asyncio.run(process_async(Handler(predict=failing, is_async=True, spec="t"), batch(b"1")))
    assert failed.batch_error.type == "KeyError"



def test_error_kinds_are_stated_not_inferred_from_type_names():
    """The supervisor bisects by `kind`, never by the exception's name: a handler's own WrongLength
    is HANDLER_RAISED; a wrong-length return is WRONG_RESULT; bad input is INVALID_INPUT."""

    class WrongLength(Exception):
        pass

    def raising(items):
        raise WrongLength("mine")

    raised = process_sync(sync(raising), batch(b"1", b"2"))
    assert raised.batch_error.type == "WrongLength"
    assert raised.batch_error.kind == pb.HANDLER_RAISED
    short = process_sync(sync(lambda items: items[:1]), batch(b"1", b"2"))
    assert short.batch_error.kind == pb.WRONG_RESULT
    bad = process_sync(sync(lambda items: items), batch(b"1", b"nope"))
    assert [(e.index, e.error.kind) for e in bad.item_errors] == [(1, pb.INVALID_INPUT)]
