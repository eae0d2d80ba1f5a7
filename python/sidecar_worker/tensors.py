"""Open Inference Protocol tensors: ``TensorItem`` ⇄ dicts of numpy arrays.

numpy is imported lazily, on the first tensor batch, so JSON-only models need not install it.
Decoded numeric arrays are read-only views of the request bytes (``np.frombuffer``, no copy): a
handler that wants to modify an input in place must ``.copy()`` it first. BYTES inputs are arrays of
dtype object holding ``bytes`` elements.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .proto import worker_pb2 as pb

MISSING_NUMPY = "Open Inference Protocol tensor requests need numpy in the model's requirements.txt"

# Open Inference Protocol datatype -> little-endian numpy dtype (BYTES is handled separately).
_DTYPES: Dict[str, str] = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# (numpy dtype kind, item size) -> datatype, for outputs.
_DATATYPES: Dict[Any, str] = {("b", 1): "BOOL"}
_DATATYPES.update({("u", n): f"UINT{8 * n}" for n in (1, 2, 4, 8)})
_DATATYPES.update({("i", n): f"INT{8 * n}" for n in (1, 2, 4, 8)})
_DATATYPES.update({("f", n): f"FP{8 * n}" for n in (2, 4, 8)})

_LENGTH = struct.Struct("<I")
# A BYTES input is an array of dtype object: one pointer per element.
_POINTER_SIZE = struct.calcsize("P")
# Shapes quoted in error messages are cut after this many dimensions (a claimed shape can be a
# megabyte of them).
_QUOTED_DIMS = 16


class TensorError(Exception):
    """One item cannot be decoded or encoded; ``type_name`` goes into its ``ItemError``."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message


_numpy: Any = None
# Filled with numpy itself: datatype -> np.dtype, and np.dtype -> datatype for outputs.
_NP_DTYPES: Dict[str, Any] = {}
_NP_DATATYPES: Dict[Any, str] = {}
# numpy's limits on one array, set by load_numpy: the most dimensions (32 before numpy 2.0, 64
# since) and bytes (npy_intp). Shapes beyond them are refused before numpy raises ValueError.
_max_dims = 32
_max_bytes = 2**31 - 1


def load_numpy() -> Any:
    """The numpy module, or `TensorError` ``MissingNumpy`` when the model's environment lacks it.

    Cached in a global: an ``import`` statement costs microseconds even when the module is loaded,
    and this runs for every tensor of every item.
    """
    global _numpy, _max_dims, _max_bytes
    if _numpy is None:
        try:
            import numpy
        except ImportError:
            raise TensorError("MissingNumpy", MISSING_NUMPY) from None
        for datatype, code in _DTYPES.items():
            dtype = numpy.dtype(code)
            _NP_DTYPES[datatype] = dtype
            _NP_DATATYPES[dtype] = datatype
        try:  # asked of numpy rather than read off its version
            numpy.empty((1,) * 64, dtype=numpy.uint8)
            _max_dims = 64
        except ValueError:
            _max_dims = 32
        _max_bytes = int(numpy.iinfo(numpy.intp).max)
        _numpy = numpy
    return _numpy


def _invalid(tensor: pb.Tensor, problem: str) -> TensorError:
    shape = tensor.shape
    if len(shape) <= _QUOTED_DIMS:
        quoted = str(list(shape))
    else:
        quoted = f"[{', '.join(map(str, shape[:_QUOTED_DIMS]))}, ...] ({len(shape)} dimensions)"
    return TensorError(
        "InvalidTensor",
        f"tensor {tensor.name!r} ({tensor.datatype}, shape {quoted}, {len(tensor.data)} bytes): {problem}",
    )


def _element_count(tensor: pb.Tensor, shape: Tuple[int, ...], itemsize: int) -> int:
    """The number of elements `shape` claims; `InvalidTensor` for a shape no numpy array can have.

    Checked before any product of the whole shape: math.prod over 100,000 dimensions of 2**63 takes
    half a minute, and its result is too long to print.
    """
    if len(shape) > _max_dims:
        raise _invalid(tensor, f"{len(shape)} dimensions, numpy arrays have at most {_max_dims}")
    # numpy multiplies the non-zero dimensions even when one is 0: [0, 2**62, 2**62] is too big too.
    nbytes = itemsize
    for dim in shape:
        if dim < 0:
            raise _invalid(tensor, "negative dimension in shape")
        if dim:
            nbytes *= dim
    if nbytes > _max_bytes:
        problem = f"shape claims more than {_max_bytes} bytes ({itemsize}-byte elements), the most a numpy array holds"
        raise _invalid(tensor, problem)
    return math.prod(shape)


def _decode_bytes(np: Any, tensor: pb.Tensor, count: int) -> Any:
    data = tensor.data
    elements: List[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise _invalid(tensor, f"malformed BYTES data: truncated length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise _invalid(
                tensor, f"malformed BYTES data: element {len(elements)} of {length} bytes runs past the end"
            )
        elements.append(data[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise _invalid(tensor, f"BYTES data holds {len(elements)} elements, the shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def decode_tensor(np: Any, tensor: pb.Tensor) -> Any:
    """One input tensor as an ndarray of its shape; `TensorError` ``InvalidTensor`` if inconsistent."""
    shape = tuple(tensor.shape)
    datatype = tensor.datatype
    if datatype == "BYTES":
        return _decode_bytes(np, tensor, _element_count(tensor, shape, _POINTER_SIZE)).reshape(shape)
    dtype = _NP_DTYPES.get(datatype)
    if dtype is None:
        raise _invalid(tensor, f"unknown datatype {datatype!r}")
    count = _element_count(tensor, shape, dtype.itemsize)
    data = tensor.data
    if len(data) != count * dtype.itemsize:
        raise _invalid(tensor, f"expected {count * dtype.itemsize} bytes ({count} elements × {dtype.itemsize} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_tensor_item(item: pb.TensorItem) -> Dict[str, Any]:
    """The item's input tensors as a dict name -> ndarray; raises `TensorError`."""
    np = load_numpy()
    inputs: Dict[str, Any] = {}
    for tensor in item.tensors:
        name = tensor.name
        if name in inputs:
            raise _invalid(tensor, "duplicate input name")
        inputs[name] = decode_tensor(np, tensor)
    return inputs


def decode_tensor_items(items: Sequence[pb.TensorItem]) -> List[Dict[str, Any]]:
    """Every item decoded; raises `TensorError` for the first bad one (batch.py isolates items)."""
    return [decode_tensor_item(item) for item in items]


def split_rows(results: Any) -> Any:
    """A handler's ndarray of results as a list of rows (keeping the dtype), else ``results``."""
    np = load_numpy()
    if isinstance(results, np.ndarray) and results.ndim > 0:
        return list(results)
    return results


def _encode_element(element: Any) -> bytes:
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, bytes):
        return element
    raise TypeError(f"BYTES elements must be str or bytes, got {type(element).__name__}")


def encode_tensor(np: Any, name: str, value: Any, into: pb.TensorItem) -> None:
    """Appends `value` as tensor `name` to `into` (built in place: assigning a message copies it)."""
    array = value if type(value) is np.ndarray else np.asarray(value)
    if array.dtype.kind == "S" and not isinstance(value, np.ndarray):
        # numpy's fixed-width bytes drop trailing NUL bytes: keep Python bytes objects as they are.
        array = np.asarray(value, dtype=object)
    dtype = array.dtype
    if dtype.kind in "USO":
        parts: List[bytes] = []
        for element in array.ravel(order="C").tolist():
            encoded = _encode_element(element)
            parts += (_LENGTH.pack(len(encoded)), encoded)
        into.tensors.add(name=name, datatype="BYTES", shape=array.shape, data=b"".join(parts))
        return
    datatype = _NP_DATATYPES.get(dtype)
    if datatype is None:
        datatype = _DATATYPES.get((dtype.kind, dtype.itemsize))
        if datatype is None:
            raise TensorError("NotSerializable", f"output {name!r} has dtype {dtype}, which no tensor datatype holds")
        array = array.astype(dtype.newbyteorder("<"), copy=False)  # big-endian or otherwise unusual
    into.tensors.add(name=name, datatype=datatype, shape=array.shape, data=array.tobytes(order="C"))


def encode_tensor_outputs(result: Any, into: Optional[pb.TensorItem] = None) -> pb.TensorItem:
    """One item's result, a dict name -> array-like or one array-like (a tensor named ""), appended
    to `into` (a new TensorItem if None), which is returned."""
    np = load_numpy()
    if into is None:
        into = pb.TensorItem()
    if isinstance(result, dict):
        for name in result:
            if not isinstance(name, str):
                raise TensorError("NotSerializable", f"output names must be str, got {type(name).__name__}")
        for name, value in result.items():
            encode_tensor(np, name, value, into)
    else:
        encode_tensor(np, "", result, into)
    return into
