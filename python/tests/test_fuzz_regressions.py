"""Inputs the fuzzers in python/fuzz found mishandled, each pinned to the behaviour fixed for it.

A decoder of client data must return a value or fail that item alone (``InvalidTensor``,
``InvalidJSON``): any other exception escaped batch.py's per-item isolation and failed every item of
the batch.
"""

from __future__ import annotations

import json
import struct
import time
from typing import List

import pytest

from sidecar_worker.codec import decode_items
from sidecar_worker.proto import worker_pb2 as pb

np = pytest.importorskip("numpy")

from sidecar_worker.tensors import TensorError, decode_tensor_items  # noqa: E402


def invalid(datatype: str, shape: List[int], data: bytes = b"") -> str:
    """The ``InvalidTensor`` message for one tensor, which must fail to decode."""
    with pytest.raises(TensorError) as info:
        decode_tensor_items([pb.TensorItem(tensors=[pb.Tensor(name="t", datatype=datatype, shape=shape, data=data)])])
    assert info.value.type_name == "InvalidTensor"
    return info.value.message


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**62, 2**62, 0], [2**61, 0, 2**61, 3]])
def test_empty_shape_whose_other_dimensions_overflow(datatype, shape):
    # numpy raised ValueError ("array is too big", "cannot reshape") for these 0-element shapes.
    assert "more than 9223372036854775807 bytes" in invalid(datatype, shape)


@pytest.mark.parametrize(
    "datatype, shape", [("FP32", [0, 2**61 - 1]), ("FP32", [2**61 - 1, 0]), ("BYTES", [0, 2**60 - 1])]
)
def test_empty_shapes_at_numpy_limit_still_decode(datatype, shape):
    [inputs] = decode_tensor_items([pb.TensorItem(tensors=[pb.Tensor(name="e", datatype=datatype, shape=shape)])])
    assert inputs["e"].shape == tuple(shape) and inputs["e"].size == 0
    # One more element's worth of bytes is numpy's "array is too big".
    assert "more than" in invalid(datatype, [0, 2**61] if datatype == "FP32" else [0, 2**60])


@pytest.mark.parametrize("datatype, data", [("UINT8", b"\x07"), ("BYTES", struct.pack("<I", 1) + b"a")])
def test_more_dimensions_than_numpy_holds(datatype, data):
    # numpy's reshape raised ValueError ("maximum supported dimension") for 65 dimensions of 1.
    message = invalid(datatype, [1] * 65, data)
    assert "65 dimensions" in message and "at most" in message


def test_claimed_size_too_long_to_print():
    # Printing the claimed byte count raised ValueError (Python's 4300-digit limit on int → str).
    message = invalid("INT32", [2**63 - 1] * 600, b"\x00" * 4)
    assert "600 dimensions" in message


def test_huge_shape_is_rejected_quickly_with_a_short_message():
    # A 1 MB shape of 100,000 dimensions: math.prod over it took about 30 s (big-int products).
    start = time.perf_counter()
    message = invalid("FP32", [2**63 - 1] * 100_000)
    assert time.perf_counter() - start < 1
    assert len(message) < 500 and "100000 dimensions" in message


@pytest.mark.parametrize(
    "items, invalid",
    [
        ([b'1,"', b'"'], [0, 1]),  # joined: [1,","]
        ([b"0,[0", b"42", b"0],0"], [0, 2]),  # joined: [0,[0,42,0],0]
        ([b"[1", b"2],3"], [0, 1]),  # joined: [[1,2],3]
        ([b'{"a":1', b'"b":2},3'], [0, 1]),  # joined: [{"a":1,"b":2},3]
    ],
)
def test_items_that_are_not_one_value_each_fail_alone(items, invalid):
    # Joined into one array, these parsed into as many values as there are items, so the items got
    # values spliced from their neighbours instead of InvalidJSON errors.
    decoded = decode_items(items)
    assert [(e.index, e.error.type) for e in decoded.errors] == [(i, "InvalidJSON") for i in invalid]
    valid = [i for i in range(len(items)) if i not in invalid]
    assert decoded.indices == valid and decoded.values == [json.loads(items[i]) for i in valid]
