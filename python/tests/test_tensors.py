from __future__ import annotations

import asyncio
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

np = pytest.importorskip("numpy")

from sidecar_worker import tensors  # noqa: E402
from sidecar_worker.batch import process_async, process_sync  # noqa: E402
from sidecar_worker.loading import Handler  # noqa: E402
from sidecar_worker.proto import worker_pb2 as pb  # noqa: E402
from sidecar_worker.tensors import (  # noqa: E402
    TensorError,
    decode_tensor_items,
    encode_tensor_outputs,
)

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def bytes_data(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor(name: str, datatype: str, shape: List[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype, shape=shape, data=data)


def item(*tensors_: pb.Tensor) -> pb.TensorItem:
    return pb.TensorItem(tensors=list(tensors_))


def fp32_item(values: List[float], name: str = "x") -> pb.TensorItem:
    return item(tensor(name, "FP32", [len(values)], struct.pack(f"<{len(values)}f", *values)))


def tensor_batch(*items: pb.TensorItem, batch_id: int = 4) -> pb.Batch:
    return pb.Batch(id=batch_id, tensor_items=list(items))


def sync(fn: Callable[[List[Any]], Any]) -> Handler:
    return Handler(predict=fn, is_async=False, spec="test:predict")


def decoded_outputs(result: pb.BatchResult) -> List[Dict[str, Any]]:
    return [{t.name: tensors.decode_tensor(np, t) for t in out.tensors} for out in result.tensor_outputs]


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_numeric_round_trip(datatype):
    dtype = NUMERIC[datatype]
    values = (np.arange(24) % 7 - 2).astype(dtype).reshape(2, 3, 4)
    data = values.astype(values.dtype.newbyteorder("<")).tobytes()
    [inputs] = decode_tensor_items([item(tensor("in", datatype, [2, 3, 4], data))])
    decoded = inputs["in"]
    assert decoded.dtype == dtype and decoded.shape == (2, 3, 4)
    assert np.array_equal(decoded, values)
    assert not decoded.flags.writeable  # a view of the request bytes

    [out] = encode_tensor_outputs({"out": decoded}).tensors
    assert (out.name, out.datatype, list(out.shape), out.data) == ("out", datatype, [2, 3, 4], data)


def test_big_endian_and_non_contiguous_outputs_are_little_endian_row_major():
    array = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian, Fortran-ordered view
    [out] = encode_tensor_outputs(array).tensors
    assert (out.name, out.datatype, list(out.shape)) == ("", "INT32", [3, 2])
    assert out.data == struct.pack("<6i", 0, 3, 1, 4, 2, 5)


def test_bytes_in_and_out():
    data = bytes_data(b"ab", b"", "é".encode(), b"\x00\xff")
    [inputs] = decode_tensor_items([item(tensor("s", "BYTES", [2, 2], data))])
    decoded = inputs["s"]
    assert decoded.dtype == object and decoded.shape == (2, 2)
    assert decoded.tolist() == [[b"ab", b""], ["é".encode(), b"\x00\xff"]]

    [out] = encode_tensor_outputs({"s": decoded}).tensors
    assert (out.datatype, list(out.shape), out.data) == ("BYTES", [2, 2], data)

    [text] = encode_tensor_outputs(np.array(["héllo", "", "日本"])).tensors
    assert (text.datatype, list(text.shape)) == ("BYTES", [3])
    assert text.data == bytes_data("héllo".encode(), b"", "日本".encode())
    # Python bytes keep their trailing NUL bytes (numpy's "S" dtype would drop them).
    assert encode_tensor_outputs([b"a\x00", b""]).tensors[0].data == bytes_data(b"a\x00", b"")


def test_dict_and_single_outputs():
    out = encode_tensor_outputs({"label": ["cat"], "score": np.float32(0.5), "flags": [[True, False]]})
    assert [(t.name, t.datatype, list(t.shape)) for t in out.tensors] == [
        ("label", "BYTES", [1]),
        ("score", "FP32", []),
        ("flags", "BOOL", [1, 2]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in encode_tensor_outputs([1.5, 2.5]).tensors] == [
        ("", "FP64", [2])
    ]
    assert encode_tensor_outputs(7).tensors[0].datatype == "INT64"


def test_unsupported_outputs():
    with pytest.raises(TensorError, match=r"output 'z' has dtype complex128") as info:
        encode_tensor_outputs({"z": np.array([1 + 2j])})
    assert info.value.type_name == "NotSerializable"
    with pytest.raises(TypeError, match="got int"):
        encode_tensor_outputs(np.array([b"a", 3], dtype=object))


def test_decode_errors():
    def error(*tensors_: pb.Tensor) -> TensorError:
        with pytest.raises(TensorError) as info:
            decode_tensor_items([item(*tensors_)])
        assert info.value.type_name == "InvalidTensor"
        return info.value

    short = error(tensor("pixels", "FP32", [2, 3], b"\x00" * 20))
    assert short.message == (
        "tensor 'pixels' (FP32, shape [2, 3], 20 bytes): expected 24 bytes (6 elements × 4 bytes)"
    )
    assert "malformed BYTES" in error(tensor("s", "BYTES", [1], struct.pack("<I", 5) + b"abc")).message
    assert "truncated length prefix" in error(tensor("s", "BYTES", [2], bytes_data(b"a") + b"\x01")).message
    assert "holds 1 elements, the shape needs 2" in error(tensor("s", "BYTES", [2], bytes_data(b"a"))).message
    assert "unknown datatype 'FP8'" in error(tensor("q", "FP8", [1], b"\x00")).message
    with pytest.raises(TensorError, match="'late'"):
        decode_tensor_items([fp32_item([1.0]), item(tensor("late", "FP64", [1], b""))])
    assert "duplicate" in error(fp32_item([1.0]).tensors[0], fp32_item([2.0]).tensors[0]).message


def test_batch_calls_handler_with_dicts_and_fills_tensor_outputs():
    seen: List[Any] = []

    def predict(items):
        seen.extend(items)
        return [{"doubled": x["x"] * 2} for x in items]

    result = process_sync(sync(predict), tensor_batch(fp32_item([1, 2]), fp32_item([3])))
    assert result.id == 4 and result.outputs == b"" and not result.HasField("batch_error")
    assert list(result.item_errors) == [] and result.compute_seconds > 0
    assert [sorted(x) for x in seen] == [["x"], ["x"]]
    outputs = decoded_outputs(result)
    assert [o["doubled"].tolist() for o in outputs] == [[2, 4], [6]]
    assert outputs[0]["doubled"].dtype == np.float32


def test_ndarray_result_is_split_into_rows_keeping_dtype():
    result = process_sync(sync(lambda items: np.stack([x["x"] for x in items])), tensor_batch(
        fp32_item([1, 2]), fp32_item([3, 4])
    ))
    assert [(t.name, t.datatype, list(t.shape)) for o in result.tensor_outputs for t in o.tensors] == [
        ("", "FP32", [2]),
        ("", "FP32", [2]),
    ]


def test_size_mismatch_isolated_to_its_item():
    seen: List[Any] = []

    def predict(items):
        seen.extend(items)
        return [x["x"] + 1 for x in items]

    bad = item(tensor("pixels", "FP32", [3], b"\x00" * 8))
    result = process_sync(sync(predict), tensor_batch(fp32_item([1]), bad, fp32_item([5])))
    assert len(seen) == 2
    [error] = result.item_errors
    assert (error.index, error.error.type) == (1, "InvalidTensor")
    assert "'pixels'" in error.error.message and "FP32" in error.error.message
    assert "[3]" in error.error.message and "8 bytes" in error.error.message and "12 bytes" in error.error.message
    assert len(result.tensor_outputs) == 3
    assert list(result.tensor_outputs[1].tensors) == []
    assert [o.get("", np.array([])).tolist() for o in decoded_outputs(result)] == [[2.0], [], [6.0]]


def test_malformed_bytes_and_unserializable_output_sorted():
    bad = item(tensor("s", "BYTES", [1], b"\x09\x00"))
    result = process_sync(sync(lambda items: [object()]), tensor_batch(fp32_item([1]), bad))
    assert [(e.index, e.error.type) for e in result.item_errors] == [(0, "NotSerializable"), (1, "InvalidTensor")]
    assert "TypeError" in result.item_errors[0].error.message
    assert "malformed BYTES" in result.item_errors[1].error.message
    assert [len(o.tensors) for o in result.tensor_outputs] == [0, 0]


def test_all_items_invalid_skip_predict():
    def predict(items):
        raise AssertionError("predict must not be called")

    bad = item(tensor("x", "INT8", [2], b"\x01"))
    result = process_sync(sync(predict), tensor_batch(bad, bad))
    assert [e.index for e in result.item_errors] == [0, 1]
    assert len(result.tensor_outputs) == 2 and result.outputs == b""


def test_wrong_length_and_wrong_type():
    result = process_sync(sync(lambda items: items[:-1]), tensor_batch(fp32_item([1]), fp32_item([2])))
    assert result.batch_error.type == "WrongLength"
    assert "returned 1 results for a batch of 2 items" in result.batch_error.message
    assert list(result.tensor_outputs) == []
    assert process_sync(sync(lambda items: "x"), tensor_batch(fp32_item([1]))).batch_error.type == "WrongType"


def test_raising_handler():
    def predict(items):
        raise ValueError("bad tensor")

    result = process_sync(sync(predict), tensor_batch(fp32_item([1])))
    assert (result.batch_error.type, result.batch_error.message) == ("ValueError", "bad tensor")
    assert 'raise ValueError("bad tensor")' in result.batch_error.traceback
    assert list(result.tensor_outputs) == []


def test_async_handler():
    async def predict(items):
        await asyncio.sleep(0)
        return [x["x"].sum() for x in items]

    async def failing(items):
        raise KeyError("k")

    result = asyncio.run(process_async(Handler(predict, True, "t"), tensor_batch(fp32_item([1, 2]), fp32_item([4]))))
    assert [o[""].tolist() for o in decoded_outputs(result)] == [3.0, 4.0]
    failed = asyncio.run(process_async(Handler(failing, True, "t"), tensor_batch(fp32_item([1]))))
    assert failed.batch_error.type == "KeyError"


def test_missing_numpy_fails_every_item(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` raise ImportError
    monkeypatch.setattr(tensors, "_numpy", None)  # forget the cached module

    def predict(items):
        raise AssertionError("predict must not be called")

    result = process_sync(sync(predict), tensor_batch(fp32_item([1]), fp32_item([2])))
    assert [(e.index, e.error.type, e.error.message) for e in result.item_errors] == [
        (i, "MissingNumpy", tensors.MISSING_NUMPY) for i in range(2)
    ]
    assert len(result.tensor_outputs) == 2


HANDLER = """
import numpy as np


def predict(items):
    return [{"sum": x["x"].sum(axis=-1, dtype=np.int32), "tag": [t.decode().upper() for t in x["tags"]]} for x in items]
"""


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sw-") as directory:
        yield Path(directory)


def test_end_to_end_tensor_batch(model_dir, write_model, socket_dir):
    from workerproc import SessionClient, WorkerProcess

    write_model(HANDLER)
    worker = WorkerProcess(model_dir, socket_dir / "w0.sock")
    try:
        worker.wait_for_socket()

        async def scenario() -> pb.BatchResult:
            client = SessionClient(worker.socket)
            await client.expect("hello")
            await client.expect("ready")
            good = item(
                tensor("x", "INT32", [2, 2], struct.pack("<4i", 1, 2, 3, 4)),
                tensor("tags", "BYTES", [2], bytes_data(b"a", "é".encode())),
            )
            bad = item(tensor("x", "INT32", [2, 2], b"\x00" * 4))
            client.send(pb.SupervisorMessage(batch=tensor_batch(good, bad, batch_id=77)))
            result = (await client.expect("result")).result
            client.send(pb.SupervisorMessage(shutdown=pb.Shutdown()))
            await client.close()
            return result

        result = asyncio.run(scenario())
    finally:
        worker.kill()

    assert result.id == 77 and not result.HasField("batch_error")
    assert [(e.index, e.error.type) for e in result.item_errors] == [(1, "InvalidTensor")]
    assert len(result.tensor_outputs) == 2 and list(result.tensor_outputs[1].tensors) == []
    [out] = decoded_outputs(result)[:1]
    assert out["sum"].tolist() == [3, 7] and out["sum"].dtype == np.int32
    assert out["tag"].tolist() == [b"A", "É".encode()]
