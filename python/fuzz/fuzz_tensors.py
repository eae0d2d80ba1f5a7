"""atheris target: the worker's tensor decoders and encoders (`sidecar_worker.tensors`).

Decoders (`decode_tensor_item`, `decode_tensor`, `_decode_bytes`) read client data: for any
message they must return arrays that hold exactly the message's elements, or raise `TensorError`
``InvalidTensor``, which batch.py turns into an error for that item alone. Anything else (a numpy
ValueError, IndexError, MemoryError from a claimed shape, a hang) escapes the per-item isolation and
fails the whole batch, so it is left to crash the fuzzer. Encoders (`encode_tensor_outputs`) take
handler results: they may raise (batch.py turns any Exception into a ``NotSerializable`` item error),
but what they emit must decode back to the same values.

The first input byte picks the mode: a TensorItem built with FuzzedDataProvider, the rest of the
input parsed as a serialized TensorItem and Tensor (the corpus seeds), or handler outputs built with
FuzzedDataProvider.

Run: python fuzz_tensors.py [libFuzzer flags] [corpus dir]   (python/fuzz/run.sh sets up a venv)
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sidecar_worker from this tree

with atheris.instrument_imports(include=["sidecar_worker"]):
    from sidecar_worker import tensors
    from sidecar_worker.proto import worker_pb2 as pb
    from sidecar_worker.tensors import TensorError

import numpy as np
from google.protobuf.message import DecodeError

tensors.load_numpy()  # fills the dtype tables and numpy limits, as batch.py does first

# Mode = first byte % MODES.
BUILT, SERIALIZED, OUTPUTS = 0, 1, 2
MODES = 3

DATATYPES = {**{k: np.dtype(v) for k, v in tensors._DTYPES.items()}, "BYTES": np.dtype(object)}
# Near misses and junk: each must be "unknown datatype", never a numpy error.
ODD_DATATYPES = ["", "FP8", "BF16", "fp32", "STRING", "BYTES ", "INT128", "O", "<f4", "\x00", "é"]
# Dimensions at the edges: numpy's byte limit, 32/64-bit boundaries, negative ones.
EDGE_DIMS = [0, 1, 2, 3, -1, -2, 2**31 - 1, 2**31, 2**32, 2**40, 2**60, 2**62, 2**63 - 1, -(2**63)]
# Small names so that duplicates happen.
NAMES = ["x", "y", "", "é", "x\x00"]
CAP = 1 << 12  # the harness builds exact-size data only for shapes of at most this many elements


def claimed(shape: List[int], cap: int = CAP) -> Optional[int]:
    """The element count of `shape` if it is valid and at most `cap`, else None (no big products:
    the harness itself must not hang on a shape of 100,000 huge dimensions)."""
    if any(d < 0 for d in shape):
        return None
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > cap:
            return None
    return count


def consume_shape(fdp: atheris.FuzzedDataProvider) -> List[int]:
    def dim() -> int:
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind <= 1:
            return fdp.ConsumeIntInRange(0, 4)
        if kind == 2:
            return fdp.PickValueInList(EDGE_DIMS)
        return fdp.ConsumeInt(8)  # any int64

    kind = fdp.ConsumeIntInRange(0, 15)
    if kind == 0:
        # Many dimensions from few bytes: a 100,000-dimension shape is a 1 MB message on the wire.
        return [dim()] * fdp.ConsumeIntInRange(0, 100_000)
    if kind == 1:
        return [dim() for _ in range(fdp.ConsumeIntInRange(0, 70))]  # around numpy's 32/64 limit
    return [dim() for _ in range(fdp.ConsumeIntInRange(0, 4))]


def bytes_layout(elements: List[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def consume_data(fdp: atheris.FuzzedDataProvider, datatype: str, shape: List[int]) -> bytes:
    """Data of the right size most of the time (to get past the size checks), else a near miss."""
    count = claimed(shape)
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 3 or count is None:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if datatype == "BYTES":
        elements = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)) for _ in range(min(count, 64))]
        data = bytes_layout(elements)
        if how == 1:  # a corrupt length prefix: huge, truncated or pointing past the end
            at = fdp.ConsumeIntInRange(0, len(data))
            prefix = struct.pack("<I", fdp.PickValueInList([2**32 - 1, 2**31, 5, 1]))
            return data[:at] + prefix[: fdp.ConsumeIntInRange(1, 4)]
        if how == 2:
            return data + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
        return data
    itemsize = DATATYPES[datatype].itemsize if datatype in DATATYPES else 1
    size = count * itemsize + (fdp.ConsumeIntInRange(-8, 8) if how == 1 else 0)
    return fdp.ConsumeBytes(max(size, 0)).ljust(max(size, 0), b"\x00")


def build_item(fdp: atheris.FuzzedDataProvider) -> pb.TensorItem:
    item = pb.TensorItem()
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if fdp.ConsumeIntInRange(0, 15) == 0:
            datatype = fdp.PickValueInList(ODD_DATATYPES) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(6)
        else:
            datatype = fdp.PickValueInList(sorted(DATATYPES))
        shape = consume_shape(fdp)
        data = consume_data(fdp, datatype, shape)
        item.tensors.add(name=fdp.PickValueInList(NAMES), datatype=datatype, shape=shape, data=data)
    return item


def check_error(exc: TensorError, among: Sequence[pb.Tensor]) -> None:
    assert exc.type_name == "InvalidTensor", exc.type_name
    assert any(exc.message.startswith(f"tensor {t.name!r} ") for t in among), exc.message
    # Messages quote the tensor's name and datatype (client text), not a megabyte of its shape.
    quoted = max(len(repr(t.name)) + 2 * len(repr(t.datatype)) for t in among)
    assert len(exc.message) < 2000 + quoted, len(exc.message)


def check_decoded(tensor: pb.Tensor, array: Any) -> None:
    """`array` holds exactly `tensor`'s elements (so it takes no more memory than the data)."""
    assert isinstance(array, np.ndarray) and array.shape == tuple(tensor.shape), (array.shape, list(tensor.shape)[:8])
    if tensor.datatype == "BYTES":
        assert array.dtype == object
        assert bytes_layout(array.ravel().tolist()) == tensor.data
    else:
        assert array.dtype == DATATYPES[tensor.datatype]
        assert array.tobytes() == tensor.data


def decode_item(item: pb.TensorItem) -> None:
    try:
        inputs = tensors.decode_tensor_item(item)
    except TensorError as exc:
        check_error(exc, item.tensors)
        return
    assert list(inputs) == [t.name for t in item.tensors]
    for tensor in item.tensors:
        check_decoded(tensor, inputs[tensor.name])


def decode_one(tensor: pb.Tensor) -> None:
    try:
        array = tensors.decode_tensor(np, tensor)
    except TensorError as exc:
        check_error(exc, [tensor])
        return
    check_decoded(tensor, array)


# Output dtypes: every datatype's, other byte orders and the ones no datatype holds.
OUTPUT_DTYPES = [
    "?", "u1", "<u2", ">u2", "<u4", ">u4", "<u8", ">u8", "i1", "<i2", ">i2", "<i4", ">i4", "<i8", ">i8",
    "<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "g", "c8", "c16", "M8[s]", "m8[ms]", "V3", "S3", "U2", "O",
]


def consume_element(fdp: atheris.FuzzedDataProvider) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeUnicode(6)  # surrogates included: not UTF-8 encodable
    if kind == 1:
        return fdp.ConsumeBytes(6)
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 10))  # beyond int64 too
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return None
    if kind == 6:
        return np.str_(fdp.ConsumeUnicodeNoSurrogates(4))
    return np.bytes_(fdp.ConsumeBytes(4))


def consume_array(fdp: atheris.FuzzedDataProvider) -> Any:
    dtype = np.dtype(fdp.PickValueInList(OUTPUT_DTYPES))
    shape = tuple(fdp.ConsumeIntInRange(0, 3) for _ in range(fdp.ConsumeIntInRange(0, 4)))
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = [consume_element(fdp) for _ in range(count)]
    elif dtype.kind == "U":
        # Arbitrary bytes would make code points numpy refuses to read back; these are valid.
        text = [fdp.ConsumeUnicode(dtype.itemsize // 4) for _ in range(count)]
        array = np.array(text, dtype=dtype) if count else np.empty(0, dtype=dtype)
    else:
        size = count * dtype.itemsize
        array = np.frombuffer(fdp.ConsumeBytes(size).ljust(size, b"\x00"), dtype=dtype)
    array = array.reshape(shape)
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 1:
        array = array.T  # not C-contiguous
    elif how == 2 and array.ndim:
        array = array[::-1]  # negative strides
    return array


def consume_value(fdp: atheris.FuzzedDataProvider) -> Any:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return consume_array(fdp)
    if kind == 1:
        return consume_element(fdp)
    if kind == 2:
        return [consume_element(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    rows = fdp.ConsumeIntInRange(0, 3)
    width = fdp.ConsumeIntInRange(0, 3)
    return [[consume_element(fdp) for _ in range(width)] for _ in range(rows)]


def expected_elements(value: Any) -> List[Any]:
    """The BYTES elements the encoder should send for `value` (see `tensors.encode_tensor`)."""
    array = np.asarray(value)
    if array.dtype.kind == "S" and not isinstance(value, np.ndarray):
        array = np.asarray(value, dtype=object)
    return [e.encode() if isinstance(e, str) else e for e in array.ravel().tolist()]


def encode(fdp: atheris.FuzzedDataProvider) -> None:
    result: Any
    if fdp.ConsumeBool():
        result = {}
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            odd_name = fdp.ConsumeIntInRange(0, 7) == 0  # not a str: NotSerializable
            name: Any = fdp.PickValueInList([1, b"x", None]) if odd_name else fdp.PickValueInList(NAMES)
            result[name] = consume_value(fdp)
    else:
        result = consume_value(fdp)
    try:
        out = tensors.encode_tensor_outputs(result)
    except (TensorError, TypeError, ValueError, OverflowError):
        return  # batch.py sends these as NotSerializable item errors
    values = list(result.values()) if isinstance(result, dict) else [result]
    assert [t.name for t in out.tensors] == (list(result) if isinstance(result, dict) else [""])
    for tensor, value in zip(out.tensors, values):
        # What the worker sends must pass the same checks as what it receives.
        array = tensors.decode_tensor(np, tensor)
        source = np.asarray(value)
        assert array.shape == source.shape, (array.shape, source.shape)
        if tensor.datatype == "BYTES":
            assert array.ravel().tolist() == expected_elements(value)
        else:
            little = source.astype(source.dtype.newbyteorder("<"))
            assert tensor.datatype == tensors._DATATYPES[(source.dtype.kind, source.dtype.itemsize)]
            assert array.tobytes() == little.tobytes()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % MODES, data[1:]
    if mode == SERIALIZED:
        # What a malicious or buggy peer could put on the wire, starting from valid messages.
        try:
            item = pb.TensorItem.FromString(rest)
        except DecodeError:
            item = None
        if item is not None:
            decode_item(item)
        try:
            tensor = pb.Tensor.FromString(rest)
        except DecodeError:
            return
        decode_one(tensor)
        return
    fdp = atheris.FuzzedDataProvider(rest)
    if mode == BUILT:
        item = build_item(fdp)
        decode_item(item)
        for tensor in item.tensors:
            decode_one(tensor)
    else:
        encode(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
