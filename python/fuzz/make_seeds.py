"""Writes the seed corpora under corpus/<target>/ (a few valid messages like the ones in
python/tests) and the crash regressions under regressions/<target>/ (the fuzzers' findings).

Each file is one mode byte (the target's SERIALIZED mode: the rest is a serialized message) and a
serialized Batch (codec) or TensorItem (tensors), so that it keeps its meaning when the harnesses'
FuzzedDataProvider modes change. Files are named after what they hold; running this again rewrites
them identically. run.sh replays both. Run: python make_seeds.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sidecar_worker.proto import worker_pb2 as pb  # noqa: E402

SERIALIZED = 1  # the mode byte of fuzz_codec.SERIALIZED and fuzz_tensors.SERIALIZED


def bytes_data(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor(name: str, datatype: str, shape: List[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype, shape=shape, data=data)


def codec_seeds() -> Dict[str, pb.Batch]:
    return {
        "iris": pb.Batch(id=1, items=[b'{"sepal_length": 5.1, "sepal_width": 3.5}', b"[5.1, 3.5, 1.4, 0.2]"]),
        "scalars": pb.Batch(id=2, items=[b'{"x": 1.5, "id": 7}', b"[1, 2]", b'"s"', b"null"]),
        "one-bad": pb.Batch(id=3, items=[b"1", b"{", b'"x"']),
        "not-one-value": pb.Batch(id=4, items=[b"1,2", b"", b"[1]]"]),
        "unicode": pb.Batch(id=5, items=['{"text": "héllo 日本"}'.encode(), b'"\\u00e9\\n"']),
    }


def tensor_seeds() -> Dict[str, pb.TensorItem]:
    fp32 = tensor("x", "FP32", [2], struct.pack("<2f", 1.0, 2.0))
    return {
        "fp32": pb.TensorItem(tensors=[fp32]),
        "int32-2x2-and-bytes": pb.TensorItem(
            tensors=[
                tensor("x", "INT32", [2, 2], struct.pack("<4i", 1, 2, 3, 4)),
                tensor("tags", "BYTES", [2], bytes_data(b"a", "é".encode())),
            ]
        ),
        "bytes-2x2": pb.TensorItem(tensors=[tensor("s", "BYTES", [2, 2], bytes_data(b"ab", b"", b"\x00\xff", b"c"))]),
        "every-numeric-datatype": pb.TensorItem(
            tensors=[
                tensor(datatype.lower(), datatype, [2, 3], bytes(6 * size))
                for datatype, size in [
                    ("BOOL", 1), ("UINT8", 1), ("UINT16", 2), ("UINT32", 4), ("UINT64", 8), ("INT8", 1),
                    ("INT16", 2), ("INT32", 4), ("INT64", 8), ("FP16", 2), ("FP32", 4), ("FP64", 8),
                ]
            ]
        ),
        "scalar-and-empty": pb.TensorItem(
            tensors=[tensor("s", "FP64", [], bytes(8)), tensor("e", "INT8", [0, 3], b"")]
        ),
        "size-mismatch": pb.TensorItem(tensors=[tensor("pixels", "FP32", [2, 3], bytes(20))]),
        "malformed-bytes": pb.TensorItem(tensors=[tensor("s", "BYTES", [1], struct.pack("<I", 5) + b"abc")]),
    }


def codec_regressions() -> Dict[str, pb.Batch]:
    # Joined into one array, these items made as many values as items, none of them its own.
    return {
        "split-string": pb.Batch(id=1, items=[b'1,"', b'"']),
        "split-array": pb.Batch(id=2, items=[b"0,[0", b"42", b"0],0"]),
    }


def tensor_regressions() -> Dict[str, pb.TensorItem]:
    # Each raised a numpy ValueError (or Python's, printing a 6,000-digit size) instead of InvalidTensor.
    def one(datatype: str, shape: List[int], data: bytes = b"") -> pb.TensorItem:
        return pb.TensorItem(tensors=[tensor("t", datatype, shape, data)])

    return {
        "empty-shape-too-big": one("FP32", [0, 2**62, 2**62]),
        "empty-shape-reshape-overflow": one("BYTES", [2**62, 2**62, 0]),
        "65-dimensions": one("UINT8", [1] * 65, b"\x07"),
        "600-huge-dimensions": one("INT32", [2**63 - 1] * 600, bytes(4)),
    }


def write(directory: Path, messages: Dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, message in messages.items():
        (directory / name).write_bytes(bytes([SERIALIZED]) + message.SerializeToString(deterministic=True))
    print(f"{directory}: {len(messages)} inputs")


def main() -> None:
    write(HERE / "corpus" / "codec", codec_seeds())
    write(HERE / "corpus" / "tensors", tensor_seeds())
    write(HERE / "regressions" / "codec", codec_regressions())
    write(HERE / "regressions" / "tensors", tensor_regressions())


if __name__ == "__main__":
    main()
