"""atheris target: the worker's JSON codec (`sidecar_worker.codec`).

`decode_items` reads the items of a batch, client data: every item that is one valid JSON value
must decode to that value, every other item must become an ``InvalidJSON`` error of its own, and
nothing may raise. `check_results` and `encode_outputs` take what a handler returned: the first
returns it or raises `BatchFailure`; the second never raises and always emits one JSON array with
exactly one element per item (``null`` for each item it reports as ``NotSerializable``).

The first input byte picks the mode: items built with FuzzedDataProvider (from JSON fragments, or
cut from the text of a valid array, so that items which are not one value each are common), the
rest of the input parsed as a serialized Batch (the corpus seeds), or handler results built with
FuzzedDataProvider.

Run: python fuzz_codec.py [libFuzzer flags] [corpus dir]   (python/fuzz/run.sh sets up a venv)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sidecar_worker from this tree

with atheris.instrument_imports(include=["sidecar_worker"]):
    from sidecar_worker import codec
    from sidecar_worker.codec import BatchFailure
    from sidecar_worker.proto import worker_pb2 as pb

import numpy as np  # loaded, as by a numpy handler: encode_outputs then serializes numpy natively
from google.protobuf.message import DecodeError

# Mode = first byte % MODES.
BUILT, SERIALIZED, RESULTS = 0, 1, 2
MODES = 3

# Pieces of JSON: random sequences of them are often almost-valid, or valid only when joined.
FRAGMENTS = [
    b"[", b"]", b"{", b"}", b",", b":", b'"', b'"a"', b'"\\"', b"\\", b"1", b"-0.5e3", b"null", b"true",
    b" ", b"\n", b'"k":', b"[1,2]", b'{"x":1.5}', b"\xff", b"\x00", b"NaN", b"1e400", b'"\\ud800"',
]


def consume_item(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 3) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    if fdp.ConsumeIntInRange(0, 15) == 0:
        return b"[" * fdp.ConsumeIntInRange(0, 3000)  # deep nesting
    return b"".join(fdp.PickValueInList(FRAGMENTS) for _ in range(fdp.ConsumeIntInRange(0, 6)))


def consume_json(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON value whose text has commas in many places: in strings, arrays and objects."""
    kind = fdp.ConsumeIntInRange(0, 5 if depth < 3 else 3)
    if kind == 0:
        return fdp.PickValueInList([None, True, 0, -1.5, 1e300])
    if kind == 1:
        return fdp.ConsumeInt(4)
    if kind <= 3:
        chars = [",", '"', "[", "]", "{", "}", ":", "a", "\\", " "]
        return "".join(fdp.PickValueInList(chars) for _ in range(fdp.ConsumeIntInRange(0, 4)))
    children = [consume_json(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return children if kind == 4 else {str(i): child for i, child in enumerate(children)}


def consume_split(fdp: atheris.FuzzedDataProvider) -> List[bytes]:
    """The text of a valid JSON array cut at some of its commas (also ones inside strings or nested
    values): joined back with commas the items make a valid array, though not each a valid value."""
    text = json.dumps([consume_json(fdp) for _ in range(fdp.ConsumeIntInRange(1, 4))], separators=(",", ":"))
    inner = text[1:-1].encode()
    commas = [i for i, c in enumerate(inner) if c == ord(",")]
    cuts = sorted({fdp.PickValueInList(commas) for _ in range(fdp.ConsumeIntInRange(0, 3))}) if commas else []
    items, start = [], 0
    for cut in cuts:
        items.append(inner[start:cut])
        start = cut + 1
    return items + [inner[start:]]


def same(a: Any, b: Any) -> bool:
    """Equality that also holds for NaN (a JSON parser may read 'NaN' or overflow to inf)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_decode(items: Sequence[bytes]) -> None:
    decoded = codec.decode_items(items)  # must not raise
    # The reference: each item parsed on its own.
    values: List[Any] = []
    valid: List[int] = []
    for index, item in enumerate(items):
        try:
            values.append(codec.loads(item))
        except Exception:
            continue
        valid.append(index)
    indices = list(range(len(items))) if decoded.indices is None else decoded.indices
    assert indices == valid, (items, indices, valid)
    assert same(decoded.values, values), (items, decoded.values, values)
    assert [e.index for e in decoded.errors] == [i for i in range(len(items)) if i not in valid]
    assert all(e.error.type == "InvalidJSON" for e in decoded.errors)
    assert decoded.indices is None or decoded.errors, "indices is None exactly when every item decoded"


class Opaque:
    """Not JSON-serializable."""


def consume_result(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 18 if depth < 4 else 11)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 10))  # beyond 64 bits too
    if kind == 3:
        return fdp.ConsumeFloat()  # NaN and infinities too
    if kind == 4:
        return fdp.ConsumeUnicode(8)  # lone surrogates too
    if kind == 5:
        return fdp.ConsumeBytes(4)
    if kind == 6:
        return complex(fdp.ConsumeFloat(), 1)
    if kind == 7:
        return Opaque()
    if kind == 8:
        dtype = fdp.PickValueInList(["f8", "f4", "f2", "i8", "u8", "?", "c8", "M8[s]", "U3", "O"])
        return np.zeros(1, dtype=dtype)[0] if fdp.ConsumeBool() else np.zeros(2, dtype=dtype)
    if kind == 9:
        return np.arange(6, dtype=np.float64).reshape(2, 3)[:, 1]  # not C-contiguous
    if kind == 10:
        nested: List[Any] = []
        # Up to 150 levels, not past orjson's recursion limit (255): orjson corrupts the heap on
        # some values nested about 220 deep, in versions before 3.12 and after
        # (python/fuzz/dependency-crashes/orjson/), which crashes the worker, not the server.
        for _ in range(fdp.ConsumeIntInRange(0, 150)):
            nested = [nested]
        return nested
    if kind == 11:
        loop: List[Any] = []
        loop.append(loop)
        return loop
    children = [consume_result(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 12:
        return children
    if kind == 13:
        return tuple(children)
    if kind == 14:
        return {fdp.ConsumeUnicode(3): child for child in children}
    if kind == 15:
        return {fdp.PickValueInList([1, None, (1,), 2.5]): child for child in children}  # non-str keys
    if kind == 16:
        return {fdp.ConsumeInt(2) for _ in children}
    if kind == 17:
        return frozenset(fdp.ConsumeUnicode(2) for _ in children)
    return object_array(children)


def object_array(values: List[Any]) -> Any:
    """A 1-d object ndarray of `values` (np.array would nest lists or refuse ragged ones)."""
    array = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        array[index] = value
    return array


def check_encode(fdp: atheris.FuzzedDataProvider) -> None:
    count = fdp.ConsumeIntInRange(1, 6)
    shape = fdp.ConsumeIntInRange(0, 4)
    results: Any
    if shape == 0:
        results = consume_result(fdp)  # anything, even not a list
    else:
        n = count if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 8)
        results = [consume_result(fdp) for _ in range(n)]
        if shape == 2:
            results = tuple(results)
        elif shape == 3:
            results = object_array(results) if n else np.zeros((0, 2))
    # The items that decoded, when some did not: results go to these batch positions.
    expected = count
    indices: Optional[List[int]] = None
    if fdp.ConsumeBool():
        indices = sorted({fdp.ConsumeIntInRange(0, count - 1) for _ in range(count)})
        expected = len(indices)
    try:
        checked = codec.check_results(results, expected)
    except BatchFailure as failure:
        assert failure.type_name in ("WrongType", "WrongLength"), failure.type_name
        return
    assert len(checked) == expected
    outputs, errors = codec.encode_outputs(checked, count, indices)  # must not raise
    array = json.loads(outputs)  # valid JSON, one element per item
    assert isinstance(array, list) and len(array) == count, (outputs, count)
    positions = list(range(count)) if indices is None else indices
    failed = [e.index for e in errors]
    assert failed == sorted(set(failed)) and set(failed) <= set(positions), (failed, positions)
    for index in range(count):
        if index in failed or index not in positions:
            assert array[index] is None, (index, array[index])
    assert all(e.error.type == "NotSerializable" for e in errors)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % MODES, data[1:]
    if mode == SERIALIZED:
        try:
            batch = pb.Batch.FromString(rest)
        except DecodeError:
            return
        check_decode(list(batch.items))
        return
    fdp = atheris.FuzzedDataProvider(rest)
    if mode == BUILT:
        if fdp.ConsumeBool():
            check_decode(consume_split(fdp))
        else:
            check_decode([consume_item(fdp) for _ in range(fdp.ConsumeIntInRange(0, 6))])
    else:
        check_encode(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
