from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar_worker.codec import BatchFailure, check_results, decode_items, encode_outputs

PYTHON_DIR = Path(__file__).resolve().parents[1]


def test_decode_fast_path():
    decoded = decode_items([b'{"x": 1.5, "id": 7}', b"[1, 2]", b'"s"', b"null"])
    assert decoded.values == [{"x": 1.5, "id": 7}, [1, 2], "s", None]
    assert decoded.indices is None
    assert decoded.errors == []


@pytest.mark.parametrize("bad", [b"{", b"", b"1,2", b"\xff", b"[1]]"])
def test_decode_isolates_invalid_item(bad):
    decoded = decode_items([b"1", bad, b'"x"'])
    assert decoded.values == [1, "x"]
    assert decoded.indices == [0, 2]
    assert [e.index for e in decoded.errors] == [1]
    assert decoded.errors[0].error.type == "InvalidJSON"
    assert decoded.errors[0].error.message.startswith("the item is not valid JSON: ")


def test_encode_nested_sets_and_tuples():
    outputs, errors = encode_outputs([{"a": (1, 2), "b": {"c": [None, True]}}, {3}, frozenset()], 3)
    assert errors == []
    assert json.loads(outputs) == [{"a": [1, 2], "b": {"c": [None, True]}}, [3], []]


def test_encode_isolates_unserializable_item():
    outputs, errors = encode_outputs([1, object(), {"z": complex(1, 2)}, 4], 4)
    assert json.loads(outputs) == [1, None, None, 4]
    assert [(e.index, e.error.type) for e in errors] == [(1, "NotSerializable"), (2, "NotSerializable")]
    assert "result 1 (object)" in errors[0].error.message
    assert "result 2 (dict)" in errors[1].error.message


def test_encode_scatters_results_to_indices():
    outputs, errors = encode_outputs(["a", "c"], 3, [0, 2])
    assert (outputs, errors) == (b'["a",null,"c"]', [])


def test_numpy_arrays_and_scalars():
    np = pytest.importorskip("numpy")
    matrix = np.arange(6, dtype=np.float64).reshape(2, 3)
    results = [
        matrix,
        matrix[:, 1],  # not C-contiguous: goes through default() → tolist()
        np.float32(1.5),
        np.int64(7),
        np.bool_(True),
        {"probs": np.array([0.25, 0.75]), "label": np.str_("cat")},
        np.array(["a", "b"], dtype=object),
    ]
    outputs, errors = encode_outputs(results, len(results))
    assert errors == []
    assert json.loads(outputs) == [
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
        [1.0, 4.0],
        1.5,
        7,
        True,
        {"probs": [0.25, 0.75], "label": "cat"},
        ["a", "b"],
    ]


def test_check_results_accepts_list_tuple_and_ndarray():
    assert check_results([1, 2], 2) == [1, 2]
    assert check_results((1, 2), 2) == (1, 2)
    np = pytest.importorskip("numpy")
    assert check_results(np.array([[1, 2], [3, 4]]), 2) == [[1, 2], [3, 4]]


def test_check_results_wrong_length():
    with pytest.raises(BatchFailure) as info:
        check_results([1, 2, 3], 4)
    assert info.value.type_name == "WrongLength"
    assert info.value.message == (
        "handler returned 3 results for a batch of 4 items; predict must return one result per item, in order"
    )


@pytest.mark.parametrize("value, name", [({"a": 1}, "dict"), (None, "NoneType"), ("ab", "str"), (iter([1]), "list_iterator")])
def test_check_results_wrong_type(value, name):
    with pytest.raises(BatchFailure) as info:
        check_results(value, 2)
    assert info.value.type_name == "WrongType"
    assert info.value.message == f"handler returned {name}, expected a list with one result per item"


def test_zero_dimensional_ndarray_is_wrong_type():
    np = pytest.importorskip("numpy")
    with pytest.raises(BatchFailure) as info:
        check_results(np.float64(1.0) * np.ones(()), 1)
    assert info.value.type_name == "WrongType"


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PYTHON_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stdlib_json_fallback_without_orjson():
    out = run_python(
        """
import sys
sys.modules["orjson"] = None  # make `import orjson` fail
from sidecar_worker import codec
assert codec.JSON_BACKEND == "json", codec.JSON_BACKEND
d = codec.decode_items([b'{"a": 1}', b'{', b'2'])
assert d.values == [{"a": 1}, 2] and d.indices == [0, 2] and d.errors[0].error.type == "InvalidJSON"
out, errors = codec.encode_outputs([{"a": (1, 2)}, float("nan"), {3}], 3)
print(out.decode(), [(e.index, e.error.type) for e in errors])
"""
    )
    assert out.strip() == """[{"a":[1,2]},null,[3]] [(1, 'NotSerializable')]"""


def test_runtime_never_imports_numpy():
    out = run_python(
        """
import sys
from sidecar_worker import server, session, batch, codec
from sidecar_worker.loading import Handler
from sidecar_worker.proto import worker_pb2 as pb
r = batch.process_sync(Handler(lambda items: [{1, 2}] * len(items), False, "t"), pb.Batch(id=1, items=[b"1", b"x"]))
check = codec.check_results
try:
    check({}, 1)
except codec.BatchFailure:
    pass
print(r.outputs.decode(), "numpy" in sys.modules)
"""
    )
    assert out.strip() == "[[1,2],null] False"
