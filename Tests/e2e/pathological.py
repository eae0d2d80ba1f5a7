#!/usr/bin/env python3
"""A seeded generator of pathological inference requests, and a driver that sends them to a running
`sidecar serve` (the e2e suite's: Examples/echo and models/typed) while checking that it survives.

Every case is built from its own ``random.Random(f"{seed}:{index}")``, so one case replays alone from
its seed and index. A case is one request (or one gRPC stream of requests) of one protocol:

  http-json    POST /v2/models/{m}/infer, JSON tensors: huge / negative / zero / many dimensions,
               products past 64 bits, every datatype and unknown ones, data of the wrong length,
               nested and ragged data, wrong JSON types (strings for numbers, objects, nulls, 1e400,
               -0, integers past 2**64), odd parameters.timeout, duplicate inputs, empty inputs,
               requested outputs, truncated and byte-corrupted bodies, deep nesting.
  http-binary  the binary tensor extension: Inference-Header-Content-Length past the body, negative,
               non-numeric, huge; binary_data_size past the end, negative, huge, of the wrong type,
               not matching the shape; BYTES length prefixes claiming past the end; trailing bytes;
               binary_data_output / binary_data flags.
  kserve-v1    POST /v1/models/{m}:predict: instances not a list, missing, empty, deeply nested,
               many, of odd JSON types; other verbs.
  (every HTTP protocol may also carry an odd Sidecar-Timeout-Ms header or a truncated body)
  grpc-infer   ModelInfer through a raw channel and the protobuf stubs (so that messages a client
               library would refuse can be sent): pathological shapes in int64, raw_input_contents
               of the wrong count or length, BYTES prefixes past the end, typed contents of the
               wrong field, length or range, parameters timeout of every type and sign, grpc
               timeouts from a millisecond to centuries, odd model names and versions.
  grpc-stream  ModelStreamInfer: a few pathological requests then a good one, which must be
               answered correctly on the same stream.

What a case may get: an error answer (HTTP 4xx; 500 / INTERNAL only with a Python exception's type,
i.e. the handler raised; 504 / DEADLINE_EXCEEDED only when the request carried a deadline under the
case timeout; gRPC INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...), or a success unless the
generator knows the request is malformed (then a success is an offense too). Offenses: any other
5xx or gRPC code (UNAVAILABLE, UNKNOWN, INTERNAL without a Python error), a 500 InvalidTensor (the
worker runtime refused a tensor that the front should have refused with 400), error trailers too
large for the client to read, a connection reset / EOF, no answer within CASE_TIMEOUT_S, a malformed
success, the server process gone, or a good probe (sent every few cases) failing after it.

The generator's "malformed" verdicts are three-valued (certainly / certainly not / unsure) and only
"certainly" ones demand an error, so a request it cannot judge never makes a false failure.

As a script:
  pathological.py --seed S --case N             print case N's exact request
  pathological.py --seed S --list 0:40          one line per case
  pathological.py --http-port P --grpc-port G [--seed S] [--seconds T | --case N]
                                                drive a running server
  pathological.py --serve [--seed S] [--seconds T]
                                                start `sidecar serve` as the e2e fixture does
                                                (conftest.server, $SIDECAR_BIN) and drive it
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc
from google.protobuf import text_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

CASE_TIMEOUT_S = 10.0
PROBE_EVERY = 5
HOST = "127.0.0.1"
MAX_BODY_BYTES = 1_000_000  # the e2e fixture's --max-body-bytes

ELEMENT_SIZE: Dict[str, Optional[int]] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "FP32": 4, "FP64": 8, "BYTES": None,
}
KNOWN_TYPES = list(ELEMENT_SIZE)
UNKNOWN_TYPES = ["FP33", "fp32", "Fp32", "INT128", "UINT128", "FP8", "BF16", "STRING", "TYPE_FP32", "",
                 " FP32", "FP32 ", "BYTES\u0000", "ÜINT8", "INT", "FLOAT", "X" * 300]
INT_RANGE = {
    "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1), "UINT64": (0, 2**64 - 1),
    "INT8": (-2**7, 2**7 - 1), "INT16": (-2**15, 2**15 - 1), "INT32": (-2**31, 2**31 - 1), "INT64": (-2**63, 2**63 - 1),
}
STRUCT_CODE = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
               "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d"}
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1

KNOWN_MODELS = ["typed", "echo"]
# None of these percent-decodes to a loaded model's name.
UNKNOWN_MODELS_HTTP = ["no-such-model", "Typed", "ECHO", "echo2", "typed.", "_unknown", "a" * 300, "%00", "%2e%2e",
                       "typed%2Fx", "typed%20", "%C3%BC", "0", "-1"]
UNKNOWN_MODELS_GRPC = ["no-such-model", "Typed", "echo2", "", " typed", "typed\u0000", "ü" * 50, "a" * 1000, "../typed"]
TYPED_OUTPUTS = {"doubled", "label"}

# dimensions
HUGE_DIMS = [2**63 - 1, 99999999999, 2**62, 2**61, 2**32, 2**32 + 1, 2**31, 2**31 - 1, 3037000500, 2**53 + 1, 10**18, 4611686018427387904]
BEYOND_INT64_DIMS = [2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30, -2**63 - 1, 99999999999999999999]
NEGATIVE_DIMS = [-1, -2, -4, -99999999999, -2**63, -2**62, -2**31]
OVERFLOW_SHAPES = [
    [99999999999, 99999999999], [2**32, 2**32], [2**62, 4], [2**31, 2**31], [3037000500, 3037000500],
    [2**61, 4], [2**61, 8], [2**63 - 1, 2], [2**63 - 1, 2**63 - 1], [2**63 - 1, 2**63 - 1, 0], [0, 2**63 - 1, 2**63 - 1],
    [2**62, 2**62, 0], [1, 2**63 - 1, 2], [2] * 63, [2] * 64, [4] * 32, [16] * 16, [2**16] * 4, [2**21] * 3,
    [-2**63, -1], [-1, -2**63], [-2**62, 4], [2**62, -4], [-3037000500, 3037000500], [99999999999, 99999999999, -1],
    [2**33, 2**31], [2**63 - 1, 1, 1, 2], [1] * 60 + [2**32, 2**32],
]


class Raw(str):
    """JSON text written as is (numbers Python's json cannot write, deep nesting, broken fragments)."""


class Obj(list):
    """A JSON object as a list of (key, value) pairs, so that keys may repeat."""


def enc(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + enc(v) for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + enc(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(enc(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value)}")


def both(*flags: Optional[bool]) -> Optional[bool]:
    """Three-valued AND: False if any is False, None if any is unsure, else True."""
    if any(f is False for f in flags):
        return False
    if any(f is None for f in flags):
        return None
    return True


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


PRODUCT_CAP = 2**130  # far past any count a request can hold; keeps 40,000 dimensions of 2**63 cheap


def product(shape: List[int]) -> int:
    """The exact element count, or ±PRODUCT_CAP once it is past that."""
    if any(d == 0 for d in shape):
        return 0
    p = 1
    for d in shape:
        p *= d
        if abs(p) > PRODUCT_CAP:
            negatives = sum(1 for v in shape if v < 0)
            return -PRODUCT_CAP if negatives % 2 else PRODUCT_CAP
    return p


# ----------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    seed: int
    index: int
    protocol: str  # http-json | http-binary | kserve-v1 | grpc-infer | grpc-stream
    kind: str
    model: str
    note: str
    reject: bool  # the generator knows it is malformed: a success is an offense
    timeout_s: Optional[float] = None  # shortest deadline it carries (504 / DEADLINE_EXCEEDED allowed below CASE_TIMEOUT_S)
    # HTTP
    path: str = ""
    body: bytes = b""
    headers: Dict[str, str] = dataclasses.field(default_factory=dict)
    oversize: bool = False
    echo_shapes: Optional[Dict[str, List[int]]] = None  # for a 200 from echo: output name -> shape
    v1_count: Optional[int] = None  # for a 200 from KServe v1: how many predictions
    # gRPC
    grpc_requests: List[Any] = dataclasses.field(default_factory=list)
    grpc_rejects: List[bool] = dataclasses.field(default_factory=list)  # per stream message
    grpc_timeout: Optional[float] = None
    grpc_metadata: Tuple[Tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"seed={self.seed} case={self.index} {self.protocol}/{self.kind} model={self.model!r}: {self.note}"

    def request_text(self, limit: int = 1500) -> str:
        """The exact request (cut to about `limit` characters per part)."""
        if self.protocol.startswith("grpc"):
            parts = []
            call = "ModelStreamInfer" if self.protocol == "grpc-stream" else "ModelInfer"
            parts.append(f"gRPC {call} timeout={self.grpc_timeout!r} metadata={list(self.grpc_metadata)!r}")
            for i, message in enumerate(self.grpc_requests):
                text = text_format.MessageToString(message, as_one_line=True, as_utf8=False)
                if len(text) > limit:
                    text = text[:limit] + f"... ({len(text)} chars)"
                parts.append(f"  message {i}: {text}")
            return "\n".join(parts)
        body = self.body
        shown = repr(body[:limit]) + (f"... ({len(body)} bytes)" if len(body) > limit else f" ({len(body)} bytes)")
        return f"POST {self.path} headers={self.headers!r}\n  body={shown}"


# ------------------------------------------------------------------------------------ generator


def good_value(r: random.Random, dt: str, nonnegative: bool = False) -> Any:
    if dt == "BOOL":
        return r.random() < 0.5
    if dt in INT_RANGE:
        lo, hi = INT_RANGE[dt]
        if nonnegative:
            lo = max(lo, 0)
        return r.choice([lo, hi, 0, 1, r.randint(lo, hi)])
    if dt in ("FP16", "FP32", "FP64"):
        pool = [0.0, 1.5, 65504.0, 1e10, 1e-10, 3.4e38, 1e300, float(r.randint(0, 1000)), r.uniform(0, 1e6), 7]
        if not nonnegative:
            pool += [-2.25, -1e-10, float(r.randint(-1000, 0))]
        return r.choice(pool)
    if dt == "BYTES":
        return r.choice(["", "a", "héllo", "日本語", "\u0000", "\"\\", "x" * r.randint(0, 50), "\U0001f680"])
    return r.randint(0, 9)


def bad_value(r: random.Random, dt: str) -> Tuple[Any, Optional[bool]]:
    """A value that is wrong for `dt` (False) or that the server may take or refuse (None)."""
    if dt == "BOOL":
        return r.choice([0, 1, "true", None, Obj(), 1.0]), False
    if dt in INT_RANGE:
        lo, hi = INT_RANGE[dt]
        return r.choice([
            (lo - 1, False), (hi + 1, False), (2**64, False), (10**30, False), (1.5, False), ("1", False),
            (None, False), (True, False), (Obj([("a", 1)]), False), (Raw("1e400"), False), (Raw("-0"), None),
            (Raw("1.0"), None), (Raw("1E2"), None), (Raw("1" + "0" * 400), False),
        ])
    if dt in ("FP16", "FP32", "FP64"):
        return r.choice([
            ("1.0", False), (None, False), (True, False), (Obj(), False), (Raw("1e400"), None), (Raw("-1e400"), None),
            (Raw("1" + "0" * 400), None), (2**64 + 1, True), (10**30, True), (Raw("-0"), None), (Raw("-0.0"), None),
            (Raw("1E-400"), None), ("NaN", False),
        ])
    if dt == "BYTES":
        return r.choice([(1, False), (None, False), (True, False), (Obj(), False), (1.5, False), (Raw('"\\ud800"'), None),
                         (Raw('"\\u0000"'), True)])
    return 0, None


def gen_shape(r: random.Random, grpc_range: bool = False) -> Tuple[List[Any], str]:
    """A shape and what kind it is. In int64 range when `grpc_range`."""
    kinds = ["small", "small", "huge", "overflow", "overflow", "negative", "many", "zero"]
    if not grpc_range:
        kinds += ["beyond"]
    kind = r.choice(kinds)
    if r.random() < 0.04:
        kind = "very-many"
    if kind == "small":
        shape = [r.randint(0, 4) for _ in range(r.randint(0, 4))]
    elif kind == "huge":
        shape = [r.choice([1, 2, 4, r.randint(0, 3)]) for _ in range(r.randint(0, 3))]
        for _ in range(r.randint(1, 2)):
            shape.insert(r.randint(0, len(shape)), r.choice(HUGE_DIMS))
    elif kind == "overflow":
        if r.random() < 0.6:
            shape = list(r.choice(OVERFLOW_SHAPES))
        else:  # random factors until the product passes 2**63
            shape, p = [], 1
            while p <= 2**63:
                d = r.choice([2, 3, 7, 2**8, 2**16, 2**20, 2**31, 2**32, 99999999999, 10**9])
                shape.append(d)
                p *= d
            if r.random() < 0.3:
                shape.insert(r.randint(0, len(shape)), 0)
    elif kind == "negative":
        shape = [r.randint(0, 4) for _ in range(r.randint(0, 3))]
        for _ in range(r.randint(1, 2)):
            shape.insert(r.randint(0, len(shape)), r.choice(NEGATIVE_DIMS))
    elif kind == "many":
        n = r.choice([5, 8, 16, 31, 32, 33, 63, 64, 64, r.randint(5, 64), 65, 70])
        pool = r.choice([[1], [0, 1], [1, 2], [0, 1, 2, 3], [1, 1, 1, 2], [2**62, 1, 0]])
        shape = [r.choice(pool) for _ in range(n)]
    elif kind == "very-many":  # far past numpy's 64 (the JSON stays under the body limit)
        n = r.choice([65, 100, 1000, 10_000, 40_000])
        pool = r.choice([[1], [0, 1], [2**63 - 1], [2**63 - 1, 0], [1, 2, 99999999999]])
        shape = [r.choice(pool) for _ in range(n)]
    elif kind == "zero":
        shape = [r.choice([0, 0, 1, 4, 2**63 - 1, 99999999999]) for _ in range(r.randint(1, 5))]
        shape[r.randrange(len(shape))] = 0
    else:  # beyond: not a valid JSON list of Int
        shape = [r.randint(0, 4) for _ in range(r.randint(0, 2))]
        shape.insert(r.randint(0, len(shape)), r.choice(BEYOND_INT64_DIMS + [Raw("4.0"), Raw("1.5"), Raw("1e400"), Raw("-0"), "4",
                                                                         None, True, [1], Obj()]))
    if grpc_range:
        shape = [max(INT64_MIN, min(INT64_MAX, d)) for d in shape]
    return shape, kind


def shape_facts(shape: Any) -> Tuple[Optional[bool], Optional[int]]:
    """(the server can take it as a list of Int: True/False/None, the exact element count if so)."""
    if not isinstance(shape, list):
        return False, None
    unsure = False
    for d in shape:
        if isinstance(d, Raw):
            if str(d) == "-0":
                unsure = True  # an Int 0, probably
                continue
            if str(d) in ("4.0",):
                unsure = True
                continue
            return False, None
        if not is_int(d) or not (INT64_MIN <= d <= INT64_MAX):
            return False, None
    if unsure:
        return None, None
    return True, product(shape)


def leaves_layout(r: random.Random, leaves: List[Any], shape: List[Any]) -> Tuple[Any, str]:
    """Arranges the leaves as JSON `data`: flat, nested by the shape, ragged, or a scalar."""
    choice = r.random()
    small = all(is_int(d) and 0 <= d <= 8 for d in shape) and 1 <= len(shape) <= 16
    if choice < 0.5 or not leaves:
        return list(leaves), "flat"
    if choice < 0.7 and small and product(shape) == len(leaves):
        def nest(items: List[Any], dims: List[int]) -> Any:
            if len(dims) == 1:
                return list(items)
            step = product(dims[1:])
            return [nest(items[i * step:(i + 1) * step], dims[1:]) for i in range(dims[0])]
        return nest(leaves, shape), "nested"
    if choice < 0.9:
        out: List[Any] = []
        stack = [out]
        for leaf in leaves:
            roll = r.random()
            if roll < 0.25 and len(stack) < 12:
                new: List[Any] = []
                stack[-1].append(new)
                stack.append(new)
            elif roll < 0.4 and len(stack) > 1:
                stack.pop()
            if r.random() < 0.1:
                stack[-1].append([])  # no leaves
            stack[-1].append(leaf)
        return out, "ragged"
    if len(leaves) == 1:
        return leaves[0], "scalar"
    return list(leaves), "flat"


@dataclasses.dataclass
class TensorFacts:
    name: Any
    datatype: Any
    shape: Any
    valid: Optional[bool]  # consistent on its own (shape decodable, non-negative, data matches)
    note: str


def gen_json_tensor(r: random.Random, model: str, name: Optional[str] = None) -> Tuple[Obj, TensorFacts]:
    if name is None:
        name = r.choice(["x", "x", "x", "a", "b", "text", "", "x" * 100, "ü", 'in"put', "0"])
    if r.random() < 0.85:
        dt = r.choice(KNOWN_TYPES)
        if model == "typed" and r.random() < 0.4:
            dt = "FP32"
    else:
        dt = r.choice(UNKNOWN_TYPES)
    if model == "typed" and r.random() < 0.25:
        shape: List[Any] = [r.choice([0, 1, 2, 3, r.choice(HUGE_DIMS), r.choice(NEGATIVE_DIMS)]), 4]
        skind = "typed-like"
    else:
        shape, skind = gen_shape(r)
    shape_ok, count = shape_facts(shape)
    if count is not None and 0 <= count <= 64:
        n = count if r.random() < 0.7 else max(0, count + r.choice([-3, -2, -1, 1, 2, 5]))
    else:
        n = r.randint(0, 8)
    leaves, leaf_ok = [], True
    bad_rate = r.choice([0, 0, 0, 0.1, 0.5])
    nonneg = model == "typed" and r.random() < 0.8
    for _ in range(n):
        if r.random() < bad_rate:
            v, ok = bad_value(r, dt)
            leaf_ok = both(leaf_ok, ok)
        else:
            v = good_value(r, dt, nonneg)
        leaves.append(v)
    fields: List[Tuple[str, Any]] = [("name", name), ("shape", shape), ("datatype", dt)]
    data_roll = r.random()
    layout = "flat"
    data_leaves: Optional[int] = len(leaves)
    if data_roll < 0.06:
        data_leaves, layout = None, "none"
    elif data_roll < 0.12:
        odd = r.choice([None, Obj([("a", 1)]), "1,2,3", True])
        fields.append(("data", odd))
        # one leaf: a string is a BYTES element, true a BOOL one; null and objects are nothing's
        data_leaves, layout = 1, "odd"
        leaf_ok = (odd == "1,2,3" and dt == "BYTES") or (odd is True and dt == "BOOL")
    else:
        data, layout = leaves_layout(r, leaves, shape)
        fields.append(("data", data))
    params_ok: Optional[bool] = True
    extra = r.random()
    duplicate_keys = False
    if extra < 0.1:
        params = r.choice([Obj(), Obj([("binary_data_size", None)]), Obj([("shared_memory_region", "x")]), None, 5])
        fields.append(("parameters", params))
        if params is None:
            params_ok = None  # decodeIfPresent of null: probably no parameters
        elif not isinstance(params, Obj):
            params_ok = False
        elif any(k == "binary_data_size" for k, _ in params):
            params_ok = False  # null is not a non-negative integer
    elif extra < 0.15:
        fields.insert(r.randint(0, len(fields)), (r.choice(["name", "shape", "datatype", "data"]), r.choice([None, 1, "x", [2, 2]])))
        duplicate_keys = True
    r.shuffle(fields)
    shape_ok, count = shape_facts(shape)
    if duplicate_keys:
        valid: Optional[bool] = None  # which of the repeated keys counts is the decoder's business
    else:
        checks: List[Optional[bool]] = [dt in ELEMENT_SIZE, params_ok, data_leaves is not None, leaf_ok]
        if shape_ok is not True:
            checks.append(shape_ok)
        elif any(d < 0 for d in shape):
            checks.append(False)
        else:
            checks.append(data_leaves is not None and count == data_leaves)
        valid = both(*checks)
    n_note = f"{layout}:{n}"
    note = f"{name!r} {dt!r} {skind} shape={enc(shape)[:80]} data={n_note}"
    return Obj(fields), TensorFacts(name, dt, shape, valid, note)


def timeout_param(r: random.Random) -> Tuple[Any, Optional[bool], Optional[float], str]:
    """An OIP `timeout` parameter (µs): (JSON value, valid?, deadline seconds, note)."""
    value, ok = r.choice([
        (-1, False), (-2**63, False), (2**63 - 1, True), (2**63, True), (2**64 + 5, True), (0, True), (1, True),
        (1e30, True), (1e300, True), (Raw("1e400"), None), (Raw("-0"), None), (-1e-9, False), (1.5, True),
        ("1000", False), (None, False), (True, False), (Obj(), False), ([1000], False), (9.3e18, True), (9.22e18, True),
        (50_000_000, True), (1e15, True),
    ])
    seconds: Optional[float] = None
    if ok is None:
        seconds = 0.0
    elif ok:
        seconds = float(value) / 1e6
    return value, ok, seconds, f"timeout={enc(value)[:40]}"


SIDECAR_TIMEOUTS = ["99999999999999999999", "1e30", "1e308", "1e309", "-1", "-0", "NaN", "nan", "inf", "-inf", "Infinity",
                    "abc", "", " 5 ", "0", "0.0001", "1e-300", "5000", "0x10", str(2**63), "9.3e15", "9223372036854775807",
                    "1e15", "86400000", "1_000", "5,000", "+5", ".5", "5.", "1e", "--1"]
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$")


def header_timeout_facts(value: str) -> Tuple[Optional[bool], Optional[float]]:
    text = value.strip(" \t")
    if _DECIMAL.match(text):
        ms = float(text)
        if math.isfinite(ms):
            return True, ms / 1000.0
        return False, None
    if text.lower() in ("nan", "inf", "-inf", "infinity", "abc", "", "1e", "--1", "5,000", "1_000") or text.startswith("-") and text not in ("-0",):
        return False, None
    return None, 0.0


def maybe_timeout_header(r: random.Random, headers: Dict[str, str]) -> Tuple[Optional[bool], Optional[float], str]:
    if r.random() >= 0.22:
        return True, None, ""
    value = r.choice(SIDECAR_TIMEOUTS)
    headers["Sidecar-Timeout-Ms"] = value
    ok, seconds = header_timeout_facts(value)
    return ok, seconds, f" Sidecar-Timeout-Ms={value!r}"


def min_timeout(*values: Optional[float]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def mutate_body(r: random.Random, body: bytes) -> Tuple[bytes, str, bool]:
    """(body, note, certainly broken): truncation, byte corruption, or invalid UTF-8."""
    roll = r.random()
    if roll < 0.5 and body:
        cut = r.randrange(0, len(body))
        return body[:cut], f"truncated at {cut}/{len(body)}", True
    if roll < 0.85 and body:
        out = bytearray(body)
        for _ in range(r.randint(1, 4)):
            out[r.randrange(len(out))] = r.choice([0x00, 0xFF, 0x22, 0x5C, 0x7B, 0x5D, 0x2C, 0x30, 0x2D, r.randrange(256)])
        return bytes(out), "bytes corrupted", False
    pos = r.randrange(0, len(body) + 1)
    junk = r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"])
    return body[:pos] + junk + body[pos:], f"{junk!r} inserted at {pos}", False


class Generator:
    def __init__(self, seed: int):
        self.seed = seed
        self.errors: List[str] = []

    def case(self, index: int) -> Optional[Case]:
        """Case `index`, or None (recorded in `errors`) if the generator itself failed on it."""
        try:
            return self._case(index)
        except Exception as error:  # noqa: BLE001 - a generator bug must not stop the run, nor hide
            self.errors.append(f"seed={self.seed} case={index}: {error!r}")
            return None

    def _case(self, index: int) -> Case:
        r = random.Random(f"{self.seed}:{index}")
        protocol = r.choices(["http-json", "http-binary", "kserve-v1", "grpc-infer", "grpc-stream"], [30, 20, 12, 28, 10])[0]
        maker = {
            "http-json": self._http_json, "http-binary": self._http_binary, "kserve-v1": self._kserve,
            "grpc-infer": self._grpc_infer, "grpc-stream": self._grpc_stream,
        }[protocol]
        return maker(r, index)

    # -- helpers

    def _model(self, r: random.Random, grpc_names: bool = False) -> Tuple[str, bool]:
        if r.random() < 0.12:
            return r.choice(UNKNOWN_MODELS_GRPC if grpc_names else UNKNOWN_MODELS_HTTP), False
        return r.choice(KNOWN_MODELS), True

    def _v2_path(self, r: random.Random, model: str) -> Tuple[str, bool]:
        if r.random() < 0.08:
            version = r.choice(["1", "2", "0", "-1", "99999999999999999999", "abc", "1.0"])
            return f"/v2/models/{model}/versions/{version}/infer", version == "1"
        return f"/v2/models/{model}/infer", True

    @staticmethod
    def _typed_match(model: str, tensors: List[TensorFacts]) -> Optional[bool]:
        """Whether the inputs suit the model's declaration (typed: x FP32 [-1, 4])."""
        if model != "typed":
            return True
        if len(tensors) != 1:
            return False
        t = tensors[0]
        if t.name != "x" or t.datatype != "FP32" or not isinstance(t.shape, list) or len(t.shape) != 2:
            return False
        if not is_int(t.shape[1]):
            return None
        return t.shape[1] == 4

    @staticmethod
    def _unique(tensors: List[TensorFacts]) -> Optional[bool]:
        names = [t.name for t in tensors]
        if not all(isinstance(n, str) for n in names):
            return None
        return len(set(names)) == len(names)

    # -- OIP HTTP JSON

    def _http_json(self, r: random.Random, index: int) -> Case:
        model, known = self._model(r)
        path, version_ok = self._v2_path(r, model)
        headers = {"Content-Type": r.choice(["application/json", "application/json", "text/plain", "application/octet-stream"])}
        kind = r.choices(["tensors", "structure", "timeout", "deep", "big"], [55, 18, 12, 8, 7])[0]
        timeout_s: Optional[float] = None
        notes: List[str] = []
        echo_shapes: Optional[Dict[str, List[int]]] = None
        if kind in ("tensors", "timeout", "big"):
            tensors: List[TensorFacts] = []
            inputs = []
            count = 1 if kind == "big" else r.choices([0, 1, 2, 3], [5, 65, 20, 10])[0]
            for i in range(count):
                name = None
                if i > 0 and r.random() < 0.3 and tensors:
                    name = tensors[0].name if isinstance(tensors[0].name, str) else None  # a duplicate
                if kind == "timeout":
                    obj, facts = self._good_json_tensor(r, model)
                elif kind == "big":
                    obj, facts = self._big_tensor(r, model)
                else:
                    obj, facts = gen_json_tensor(r, model, name)
                inputs.append(obj)
                tensors.append(facts)
                notes.append(facts.note)
            top: List[Tuple[str, Any]] = [("inputs", inputs)]
            params: List[Tuple[str, Any]] = []
            timeout_ok: Optional[bool] = True
            if kind == "timeout" or r.random() < 0.1:
                value, timeout_ok, timeout_s, note = timeout_param(r)
                params.append(("timeout", value))
                notes.append(note)
            if r.random() < 0.15:
                flag = r.choice([True, False, "yes", 1, None, Obj()])
                params.append(("binary_data_output", flag))
                notes.append(f"binary_data_output={enc(flag)}")
            if params or r.random() < 0.05:
                top.append(("parameters", Obj(params)))
            outputs_ok: Optional[bool] = True
            if r.random() < 0.15:
                names = r.sample(["doubled", "label", "x", "a", "nope", "", "text"], r.randint(0, 3))
                outs = [Obj([("name", n)] + ([("parameters", Obj([("binary_data", r.choice([True, False, "x", None]))]))] if r.random() < 0.5 else []))
                        for n in names]
                if r.random() < 0.1:
                    outs.append(r.choice([Obj(), "doubled", 5, Obj([("name", 5)])]))
                    outputs_ok = False
                top.append(("outputs", outs))
                available = TYPED_OUTPUTS if model == "typed" else {t.name for t in tensors}
                if outputs_ok is not False and not set(names) <= available:
                    outputs_ok = False
                notes.append(f"outputs={names}")
            if r.random() < 0.1:
                rid = r.choice(["id-1", "", "ü" * 10, 5, None, Obj(), "x" * 2000])
                top.append(("id", rid))
                outputs_ok = both(outputs_ok, True if isinstance(rid, str) or rid is None else False)
            r.shuffle(top)
            body = enc(Obj(top)).encode()
            valid = both(*(t.valid for t in tensors), self._unique(tensors), self._typed_match(model, tensors), timeout_ok, outputs_ok)
            # (an unnamed output is renamed by the server, by design: not checked)
            if model == "echo" and valid is True and not any(k == "outputs" for k, _ in top) and all(t.name for t in tensors):
                echo_shapes = {t.name: list(t.shape) for t in tensors}
        elif kind == "structure":
            body, valid, note = self._json_structure(r, model)
            notes.append(note)
        else:
            body, valid, note = self._deep(r, "inputs")
            notes.append(note)
        header_ok, header_s, header_note = maybe_timeout_header(r, headers)
        timeout_s = min_timeout(timeout_s, header_s)
        if header_note:
            notes.append(header_note.strip())
        if r.random() < 0.12:
            body, note, broken = mutate_body(r, body)
            notes.append(note)
            valid = False if broken else None
            echo_shapes = None
        reject = (not known) or (not version_ok) or valid is False or header_ok is False
        return Case(self.seed, index, "http-json", kind, model, "; ".join(notes)[:400], reject, timeout_s,
                    path=path, body=body, headers=headers, oversize=len(body) > MAX_BODY_BYTES,
                    echo_shapes=None if reject else echo_shapes)

    def _good_json_tensor(self, r: random.Random, model: str) -> Tuple[Obj, TensorFacts]:
        rows = r.randint(0, 3)
        data = [float(r.randint(0, 100)) for _ in range(rows * 4)]
        name = "x" if model == "typed" else r.choice(["x", "y"])
        obj = Obj([("name", name), ("shape", [rows, 4]), ("datatype", "FP32"), ("data", data)])
        return obj, TensorFacts(name, "FP32", [rows, 4], True, f"good x [{rows},4]")

    def _big_tensor(self, r: random.Random, model: str) -> Tuple[Obj, TensorFacts]:
        """Many elements (up to the body limit, sometimes past it)."""
        dt = r.choice(["FP32", "FP32", "INT8", "BYTES", "BOOL", "UINT64"])
        n = r.choice([1000, 10_000, 50_000, 120_000, 300_000])
        claim = n if r.random() < 0.6 else r.choice([n + 1, n - 1, 2**63 - 1, 99999999999])
        if dt == "BYTES":
            data = Raw("[" + ",".join(['"ab"'] * n) + "]")
        elif dt == "BOOL":
            data = Raw("[" + ",".join(["true"] * n) + "]")
        else:
            data = Raw("[" + ",".join(["1"] * n) + "]")
        shape = [claim] if model != "typed" or claim % 4 else [claim // 4, 4]
        name = "x" if model == "typed" else "big"
        obj = Obj([("name", name), ("shape", shape), ("datatype", dt), ("data", data)])
        return obj, TensorFacts(name, dt, shape, claim == n, f"big {dt} n={n} shape={shape}")

    def _json_structure(self, r: random.Random, model: str) -> Tuple[bytes, Optional[bool], str]:
        """Bodies whose JSON structure is wrong: a success is never right."""
        good = Obj([("name", "x"), ("shape", [1, 4]), ("datatype", "FP32"), ("data", [1, 2, 3, 4])])
        missing = r.choice(["name", "shape", "datatype"])
        choices = [
            ("not an object", r.choice(["[1, 2, 3]", '"inputs"', "5", "null", "true", "[]", "{}" if False else "[{}]"])),
            ("inputs not a list", enc(Obj([("inputs", r.choice([Obj(), None, "x", 5, good]))]))),
            ("input not an object", enc(Obj([("inputs", [r.choice([None, 1, "x", [good]])])]))),
            ("missing field", enc(Obj([("inputs", [Obj([kv for kv in good if kv[0] != missing])])]))),
            ("name not a string", enc(Obj([("inputs", [Obj([("name", r.choice([5, None, ["x"], Obj()]))] + list(good[1:]))])]))),
            ("datatype not a string", enc(Obj([("inputs", [Obj(list(good[:2]) + [("datatype", r.choice([11, None, ["FP32"]]))] + list(good[3:]))])]))),
            ("shape not a list", enc(Obj([("inputs", [Obj([good[0], ("shape", r.choice(["1,4", Obj(), 4, None, True, [[1, 4]], ["1", "4"]]))] + list(good[2:]))])]))),
            ("empty body", ""),
            ("whitespace body", " \n\t "),
            ("not JSON", r.choice(["inputs=x", "\x00\x01", "{'inputs': []}", "{\"inputs\": [}", "{\"inputs\": []", "NaN"])),
            ("parameters not an object", enc(Obj([("inputs", [good]), ("parameters", r.choice([5, "x", [1]]))]))),
            ("outputs not a list", enc(Obj([("inputs", [good]), ("outputs", r.choice([5, "doubled", Obj([("name", "doubled")])]))]))),
        ]
        note, text = r.choice(choices)
        return text.encode(), False, note

    def _deep(self, r: random.Random, where: str) -> Tuple[bytes, Optional[bool], str]:
        depth = r.choice([64, 256, 512, 513, 1000, 10_000, 100_000, 400_000])
        opener, closer = r.choice([("[", "]"), ('{"a":', "}")])
        nested = opener * depth + "1" + closer * depth
        if where == "inputs":
            spot = r.choice(["data", "shape", "parameters", "top"])
            if spot == "data":
                text = '{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + nested + "}]}"
                valid: Optional[bool] = None if opener == "[" else False
            elif spot == "shape":
                text = '{"inputs":[{"name":"x","shape":' + nested + ',"datatype":"FP32","data":[1]}]}'
                valid = False
            elif spot == "parameters":
                text = '{"inputs":[],"parameters":{"p":' + nested + "}}"
                valid = None
            else:
                text = nested
                valid = False
            return text.encode(), valid, f"nesting {depth} deep in {spot} ({opener})"
        return ('{"instances":[' + nested + "]}").encode(), None, f"instance nested {depth} deep ({opener})"

    # -- OIP HTTP binary extension

    def _http_binary(self, r: random.Random, index: int) -> Case:
        model, known = self._model(r)
        path, version_ok = self._v2_path(r, model)
        headers: Dict[str, str] = {}
        if r.random() < 0.8:
            headers["Content-Type"] = "application/octet-stream"
        notes: List[str] = []
        inputs: List[Obj] = []
        tensors: List[TensorFacts] = []
        blobs: List[bytes] = []
        declared: List[Any] = []  # binary_data_size per binary input, in order (or None for JSON-data inputs)
        count = r.choices([0, 1, 2, 3], [4, 60, 26, 10])[0]
        for i in range(count):
            if r.random() < 0.2:
                obj, facts = gen_json_tensor(r, model)
                inputs.append(obj)
                tensors.append(facts)
                declared.append(None)
                notes.append("json " + facts.note)
                continue
            name = "x" if (model == "typed" and r.random() < 0.7) else r.choice(["x", "a", "b", "text", ""])
            if i > 0 and r.random() < 0.2:
                name = tensors[0].name if isinstance(tensors[0].name, str) else name
            dt = r.choice(KNOWN_TYPES) if r.random() < 0.9 else r.choice(UNKNOWN_TYPES)
            if model == "typed" and r.random() < 0.5:
                dt = "FP32"
            if model == "typed" and r.random() < 0.4:
                shape: List[Any] = [r.choice([0, 1, 2, r.choice(HUGE_DIMS), r.choice(NEGATIVE_DIMS)]), 4]
                skind = "typed-like"
            else:
                shape, skind = gen_shape(r, grpc_range=r.random() < 0.7)
            _, exact = shape_facts(shape)
            size = ELEMENT_SIZE.get(dt)
            blob_note = ""
            if dt == "BYTES":
                n = exact if exact is not None and 0 <= exact <= 32 and r.random() < 0.7 else r.randint(0, 5)
                blob, blob_note = self._bytes_blob(r, n)
            else:
                width = size or 4
                if exact is not None and 0 <= exact <= 256 and r.random() < 0.75:
                    length = exact * width
                else:
                    length = r.choice([0, 1, 3, 4, 8, 16, 17, 64])
                if r.random() < 0.15:
                    length = max(0, length + r.choice([-4, -1, 1, 4]))
                if model == "typed" and dt == "FP32" and r.random() < 0.8:
                    blob = b"".join(struct.pack("<f", float(r.randint(0, 100))) for _ in range(length // 4)) + bytes(length % 4)
                else:
                    blob = bytes(r.randrange(256) for _ in range(length))
            size_value: Any = len(blob)
            if r.random() < 0.3:
                size_value = r.choice([len(blob) + 1, len(blob) + 1000, max(0, len(blob) - 1), -1, -2**63, 2**63 - 1, 2**64, 10**30,
                                       Raw("1e400"), str(len(blob)), None, True, float(len(blob)), len(blob) + 0.5,
                                       Raw("-0"), 99999999999, 2**62])
            params = [("binary_data_size", size_value)]
            obj = Obj([("name", name), ("shape", shape), ("datatype", dt), ("parameters", Obj(params))])
            if r.random() < 0.1:
                obj.append(("data", [1, 2, 3, 4]))  # ignored beside binary_data_size
            inputs.append(obj)
            blobs.append(blob)
            declared.append(size_value)
            tensors.append(TensorFacts(name, dt, shape, None, ""))
            notes.append(f"bin {name!r} {dt!r} {skind} shape={enc(shape)[:60]} blob={len(blob)}B size={enc(size_value)[:30]}{blob_note}")
        top: List[Tuple[str, Any]] = [("inputs", inputs)]
        outputs_ok: Optional[bool] = True
        if r.random() < 0.4:
            flag = r.choice([True, True, False, "true", 1, None])
            top.append(("parameters", Obj([("binary_data_output", flag)])))
            notes.append(f"binary_data_output={enc(flag)}")
        if r.random() < 0.3:
            names = r.sample(["doubled", "label", "x", "a", "nope"], r.randint(1, 2))
            top.append(("outputs", [Obj([("name", n), ("parameters", Obj([("binary_data", r.choice([True, False, "x", 0]))]))]) for n in names]))
            available = TYPED_OUTPUTS if model == "typed" else {t.name for t in tensors}
            outputs_ok = set(names) <= available
            notes.append(f"outputs={names}")
        head = enc(Obj(top)).encode()
        binary = b"".join(blobs)
        junk = b""
        if r.random() < 0.1:
            junk = bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
            notes.append(f"{len(junk)} trailing bytes")
        body = head + binary + junk
        header_roll = r.random()
        hl_text: Optional[str]
        hl_ok: Optional[bool] = True
        if header_roll < 0.7:
            hl_text = str(len(head))
        elif header_roll < 0.95:
            hl_text, hl_ok = r.choice([
                (str(len(head) + len(binary) + len(junk) + 1), False), (str(len(body) + 10_000), False), (str(len(head) - 1), False),
                ("-1", False), (str(-len(head)), False), ("abc", False), ("", False), ("12abc", False), ("0x10", False),
                ("1e3", False), (str(2**63 - 1), False), (str(2**63), False), ("99999999999999999999999", False),
                (str(2**64 + len(head)), False), ("0", None), (str(len(head) + 1), None), (" " + str(len(head)), None),
                (str(len(head)) + " ", None), ("+" + str(len(head)), None), (str(len(head)) + ".0", False),
                (str(-2**63), False),
            ])
        else:
            hl_text, hl_ok = None, None
        if hl_text is not None:
            headers["Inference-Header-Content-Length"] = hl_text
            notes.insert(0, f"Inference-Header-Content-Length={hl_text!r} (json {len(head)}B, body {len(body)}B)")
        else:
            notes.insert(0, "no Inference-Header-Content-Length")
        # what the server's parse of the binary section must find
        structure = self._simulate_binary(tensors, declared, blobs, junk) if hl_ok else None
        json_tensors_ok = both(*(t.valid for t, d in zip(tensors, declared) if d is None))
        valid = both(hl_ok, structure, json_tensors_ok, self._unique(tensors), self._typed_match(model, tensors), outputs_ok)
        header_ok, header_s, header_note = maybe_timeout_header(r, headers)
        if header_note:
            notes.append(header_note.strip())
        if r.random() < 0.1:
            body, note, broken = mutate_body(r, body)
            notes.append(note)
            valid = False if (broken and hl_ok and structure) else None
        reject = (not known) or (not version_ok) or valid is False or header_ok is False
        return Case(self.seed, index, "http-binary", "binary", model, "; ".join(notes)[:500], reject, header_s,
                    path=path, body=body, headers=headers, oversize=len(body) > MAX_BODY_BYTES)

    @staticmethod
    def _bytes_blob(r: random.Random, n: int) -> Tuple[bytes, str]:
        parts = []
        for _ in range(n):
            payload = r.choice([b"", b"a", "héllo".encode(), bytes(range(r.randint(0, 20)))])
            parts.append(struct.pack("<I", len(payload)) + payload)
        blob = b"".join(parts)
        roll = r.random()
        if roll < 0.55:
            return blob, ""
        if roll < 0.7:
            return blob + struct.pack("<I", r.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 5])) + b"ab", " +prefix past the end"
        if roll < 0.8:
            return blob + b"\x01\x00"[: r.randint(1, 2)], " +truncated prefix"
        if roll < 0.9 and blob:
            return struct.pack("<I", len(blob) + 1) + blob, " +outer prefix 1 past the end"
        return b"\xff\xff\xff\xff" * r.randint(1, 3), " all prefixes 0xFFFFFFFF"

    @staticmethod
    def _simulate_binary(tensors: List[TensorFacts], declared: List[Any], blobs: List[bytes], junk: bytes) -> Optional[bool]:
        """The server's split of the binary section by binary_data_size: False when it cannot succeed."""
        binary = b"".join(blobs) + junk
        offset = 0
        verdict: Optional[bool] = True
        for t, size in zip(tensors, declared):
            if size is None:
                continue
            if isinstance(size, Raw):
                if str(size) == "-0":
                    size = 0
                    verdict = both(verdict, None)
                else:
                    return False
            if isinstance(size, float):
                if size != int(size):
                    return False
                size = int(size)
            if not is_int(size) or size < 0 or size > INT64_MAX:
                return False
            if size > len(binary) - offset:
                return False
            shape_ok, exact = shape_facts(t.shape)
            if t.datatype not in ELEMENT_SIZE or shape_ok is False:
                return False
            if exact is None:
                verdict = both(verdict, None)
            elif exact < 0:
                return False
            elif ELEMENT_SIZE[t.datatype] is not None:
                if size != exact * ELEMENT_SIZE[t.datatype]:
                    return False
            else:
                elements = bytes_elements(binary[offset:offset + size])
                if elements is None or elements != exact:
                    return False
            offset += size
        if offset != len(binary):
            return False
        return verdict

    # -- KServe v1

    def _kserve(self, r: random.Random, index: int) -> Case:
        model, known = self._model(r)
        verb = ":predict"
        verb_ok = True
        if r.random() < 0.06:
            verb = r.choice([":explain", "", ":predict:predict", ":PREDICT", ":"])
            verb_ok = False
        path = f"/v1/models/{model}{verb}"
        headers = {"Content-Type": "application/json"}
        kind = r.choices(["instances", "not-a-list", "deep", "many", "odd"], [35, 20, 12, 13, 20])[0]
        v1_count: Optional[int] = None
        if kind == "instances":
            items = [self._json_item(r, 0) for _ in range(r.randint(0, 6))]
            body = enc(Obj([("instances", items)])).encode()
            valid: Optional[bool] = True
            v1_count = len(items)
            note = f"{len(items)} instances"
        elif kind == "not-a-list":
            value = r.choice([Obj(), None, "x", 5, True, Obj([("a", [1])]), Raw("1e400")])
            fields = [("instances", value)] if r.random() < 0.8 else [(r.choice(["instance", "inputs", "Instances"]), [1])]
            body = enc(Obj(fields)).encode() if r.random() < 0.85 else r.choice([b"[1,2]", b"", b"null", b"\"instances\""])
            valid = False
            note = f"instances={enc(value)[:40]}" if fields[0][0] == "instances" else f"no instances ({fields[0][0]})"
        elif kind == "deep":
            body, valid, note = self._deep(r, "instances")
        elif kind == "many":
            # typed raises for every JSON instance, and a batch that raised is bisected down to single
            # items (2n-1 handler calls for n instances) on its one worker: thousands of them are a load
            # test, not a malformed request, so typed gets few
            n = r.choice([1000, 4096, 4097, 10_000, 50_000, 150_000]) if model != "typed" else r.choice([64, 65, 200])
            body = ('{"instances":[' + ",".join(["1"] * n) + "]}").encode()
            valid, v1_count, note = True, n, f"{n} instances"
        else:
            item = r.choice([Raw("1e400"), Raw("-0"), 2**64 + 1, 10**30, -2**63 - 1, Raw("1" + "0" * 400), "\u0000", Raw('"\\ud800"'),
                             Obj([("a", 1), ("a", 2)]), Obj([("", None)]), "x" * 100_000, [[]] * 100, 1.5e308, Raw("-1e-400")])
            body = enc(Obj([("instances", [item])])).encode()
            valid = None
            note = f"instance {enc(item)[:40]}"
        header_ok, header_s, header_note = maybe_timeout_header(r, headers)
        if header_note:
            note += ";" + header_note
        if r.random() < 0.1:
            body, mnote, broken = mutate_body(r, body)
            note += "; " + mnote
            valid = False if broken else None
            v1_count = None
        reject = (not known) or (not verb_ok) or valid is False or header_ok is False
        return Case(self.seed, index, "kserve-v1", kind, model, note[:400], reject, header_s, path=path, body=body,
                    headers=headers, oversize=len(body) > MAX_BODY_BYTES, v1_count=None if reject else v1_count)

    def _json_item(self, r: random.Random, depth: int) -> Any:
        roll = r.random()
        if depth > 3 or roll < 0.5:
            return r.choice([1, -1, 0, 2.5, 2**63 - 1, "text", "日本語", True, False, None, "", 1e300])
        if roll < 0.75:
            return [self._json_item(r, depth + 1) for _ in range(r.randint(0, 4))]
        return Obj([(r.choice(["x", "a", "text", "", "numbers"]), self._json_item(r, depth + 1)) for _ in range(r.randint(0, 3))])

    # -- gRPC

    def _grpc_message(self, r: random.Random, known_model: Optional[bool] = None, request_id: Optional[str] = None
                      ) -> Tuple[Any, bool, Optional[float], str, Optional[Dict[str, List[int]]]]:
        """(ModelInferRequest, must reject, deadline seconds from its parameters, note, echo shapes)."""
        if known_model is None:
            model, known = self._model(r, grpc_names=True)
        else:
            model, known = (r.choice(KNOWN_MODELS), True) if known_model else (r.choice(UNKNOWN_MODELS_GRPC), False)
        request = service_pb2.ModelInferRequest(model_name=model)
        version_ok = True
        if r.random() < 0.08:
            request.model_version = r.choice(["1", "2", "0", "-1", "abc", "1" * 100])
            version_ok = request.model_version == "1"
        request.id = request_id if request_id is not None else r.choice(["", "id", "ü" * 20, "x" * 500])
        notes: List[str] = [f"model={model!r}"]
        mode = r.choice(["raw", "raw", "typed", "typed", "mixed"])
        count = r.choices([0, 1, 2, 3, 4], [4, 60, 22, 10, 4])[0]
        tensors: List[TensorFacts] = []
        raws: List[bytes] = []
        raw_validity: List[Optional[bool]] = []  # each input's validity if its raw entry is its data
        typed_validity: List[Optional[bool]] = []  # ... if its typed contents are
        for i in range(count):
            name = "x" if (model == "typed" and r.random() < 0.75) else r.choice(["x", "a", "b", "text", "", "ü"])
            if i > 0 and r.random() < 0.15:
                name = tensors[0].name
            dt = r.choice(KNOWN_TYPES) if r.random() < 0.88 else r.choice(UNKNOWN_TYPES)
            if model == "typed" and r.random() < 0.5:
                dt = "FP32"
            if model == "typed" and r.random() < 0.35:
                shape: List[int] = [r.choice([0, 1, 2, r.choice(HUGE_DIMS), r.choice(NEGATIVE_DIMS)]), 4]
                skind = "typed-like"
            else:
                shape, skind = gen_shape(r, grpc_range=True)
            tensor = request.inputs.add(name=name, datatype=dt, shape=shape)
            exact = product(shape)
            use_raw = mode == "raw" or (mode == "mixed" and r.random() < 0.5)
            if use_raw:
                blob, valid, tnote = self._raw_blob(r, dt, exact, model)
                raws.append(blob)
                raw_validity.append(valid)
                typed_validity.append(self._typed_valid_empty(dt, exact))
                tnote = f"raw {len(blob)}B{tnote}"
            else:
                valid, tnote = self._typed_contents(r, tensor, dt, exact, model)
                raws.append(b"")  # its entry, if raw entries are sent: no data
                raw_validity.append(self._raw_valid(dt, exact, b""))
                typed_validity.append(valid)
            tensors.append(TensorFacts(name, dt, shape, None, ""))
            notes.append(f"{name!r} {dt!r} {skind} shape={shape if len(shape) < 8 else str(shape[:8]) + '...'} {tnote}")
        raw_ok: Optional[bool] = True
        entries = list(raws) if (mode == "raw" or (mode == "mixed" and count > 0)) else []
        if entries or mode == "raw":
            if r.random() < 0.2:
                if entries and r.random() < 0.5:
                    entries.pop(r.randrange(len(entries)))
                else:
                    entries.insert(r.randint(0, len(entries)), bytes(r.randrange(256) for _ in range(r.choice([0, 4, 16]))))
                notes.append(f"{len(entries)} raw_input_contents for {count} inputs")
            request.raw_input_contents.extend(entries)
        if entries and len(entries) != count:
            raw_ok = False
        for t, from_raw, from_typed in zip(tensors, raw_validity, typed_validity):
            t.valid = from_raw if entries else from_typed
            if t.datatype not in ELEMENT_SIZE or any(d < 0 for d in t.shape):
                t.valid = False
        deadline_s: Optional[float] = None
        timeout_ok: Optional[bool] = True
        if r.random() < 0.2:
            p = request.parameters["timeout"]
            which, value, timeout_ok = r.choice([
                ("int64", -1, False), ("int64", -2**63, False), ("int64", 2**63 - 1, True), ("int64", 0, True),
                ("int64", 1000, True), ("uint64", 2**64 - 1, True), ("uint64", 0, True), ("double", 1e30, True),
                ("double", -1.0, False), ("double", float("nan"), False), ("double", float("inf"), False),
                ("double", 1e-300, True), ("double", 9.3e18, True), ("double", 5e6, True), ("string", "1000", False),
                ("bool", True, False), ("none", None, True), ("double", -0.0, True), ("double", 1.7e308, True),
            ])
            if which == "int64":
                p.int64_param = value
            elif which == "uint64":
                p.uint64_param = value
            elif which == "double":
                p.double_param = value
            elif which == "string":
                p.string_param = value
            elif which == "bool":
                p.bool_param = value
            if timeout_ok and value is not None and which != "bool":
                deadline_s = float(value) / 1e6
            notes.append(f"parameters.timeout {which}={value!r}")
        if r.random() < 0.05:
            request.parameters["binary_data_output"].bool_param = True
        outputs_ok = True
        if r.random() < 0.12:
            names = r.sample(["doubled", "label", "x", "a", "nope", ""], r.randint(1, 2))
            for n in names:
                request.outputs.add(name=n)
            available = TYPED_OUTPUTS if model == "typed" else {t.name for t in tensors}
            outputs_ok = set(names) <= available
            notes.append(f"outputs={names}")
        valid = both(*(t.valid for t in tensors), raw_ok, self._unique(tensors), self._typed_match(model, tensors), timeout_ok)
        reject = (not known) or (not version_ok) or valid is False or not outputs_ok
        echo_shapes = None
        if model == "echo" and valid is True and not reject and not request.outputs and all(t.name for t in tensors):
            echo_shapes = {t.name: list(t.shape) for t in tensors}
        return request, reject, deadline_s, "; ".join(notes)[:500], echo_shapes

    def _raw_blob(self, r: random.Random, dt: str, exact: int, model: str) -> Tuple[bytes, Optional[bool], str]:
        size = ELEMENT_SIZE.get(dt)
        note = ""
        if dt == "BYTES":
            n = exact if 0 <= exact <= 32 and r.random() < 0.7 else r.randint(0, 5)
            blob, note = self._bytes_blob(r, n)
        else:
            width = size or 4
            length = exact * width if 0 <= exact <= 256 and r.random() < 0.75 else r.choice([0, 1, 3, 4, 8, 16, 17, 64])
            if r.random() < 0.15:
                length = max(0, length + r.choice([-4, -1, 1, 4]))
            if model == "typed" and dt == "FP32" and r.random() < 0.8:
                blob = b"".join(struct.pack("<f", float(r.randint(0, 100))) for _ in range(length // 4)) + bytes(length % 4)
            else:
                blob = bytes(r.randrange(256) for _ in range(length))
        return blob, self._raw_valid(dt, exact, blob), note

    @staticmethod
    def _typed_valid_empty(dt: str, exact: int) -> Optional[bool]:
        """An input without typed contents, when no raw entries are sent."""
        if dt not in ELEMENT_SIZE or exact < 0 or dt == "FP16":
            return False
        return exact == 0

    @staticmethod
    def _raw_valid(dt: str, exact: int, blob: bytes) -> Optional[bool]:
        if dt not in ELEMENT_SIZE or exact < 0:
            return False
        size = ELEMENT_SIZE[dt]
        if size is not None:
            return len(blob) == exact * size
        elements = bytes_elements(blob)
        return elements is not None and elements == exact

    def _typed_contents(self, r: random.Random, tensor: Any, dt: str, exact: int, model: str) -> Tuple[Optional[bool], str]:
        field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                 "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                 "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
                 "FP16": None}.get(dt)
        n = exact if 0 <= exact <= 128 and r.random() < 0.7 else r.choice([0, 1, 2, 4, 5, 100])
        if r.random() < 0.1:
            n = max(0, n + r.choice([-1, 1]))
        wrong_field = field is None or r.random() < 0.15
        if wrong_field:
            use = r.choice(["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                            "fp32_contents", "fp64_contents", "bytes_contents"])
        else:
            use = field
        out_of_range = False
        limits = {"int_contents": (-2**31, 2**31 - 1), "int64_contents": (INT64_MIN, INT64_MAX), "uint_contents": (0, 2**32 - 1),
                  "uint64_contents": (0, 2**64 - 1)}
        values: List[Any] = []
        for _ in range(n):
            if use == "bool_contents":
                values.append(r.random() < 0.5)
            elif use in limits:
                lo, hi = limits[use]
                if dt in INT_RANGE and use == field and r.random() < 0.8:
                    tlo, thi = INT_RANGE[dt]
                    v = r.choice([tlo, thi, 0, r.randint(max(lo, tlo), min(hi, thi))])
                    if r.random() < 0.1:
                        v = r.choice([lo, hi])  # may not fit the narrower datatype
                else:
                    v = r.choice([lo, hi, 0, 1])
                if dt in INT_RANGE and use == field and not (INT_RANGE[dt][0] <= v <= INT_RANGE[dt][1]):
                    out_of_range = True
                values.append(v)
            elif use in ("fp32_contents", "fp64_contents"):
                values.append(r.choice([0.0, 1.0, 2.5, 1e30, float("nan"), float("inf"), -1.0]) if model != "typed" else float(r.randint(0, 50)))
            else:
                values.append(r.choice([b"", b"a", "ü".encode(), bytes(range(10))]))
        getattr(tensor.contents, use).extend(values)
        if field is None:  # FP16: the server has no typed field for it
            return False, f"typed FP16 via {use}[{n}]"
        if dt not in ELEMENT_SIZE or exact < 0:
            return False, f"{use}[{n}]"
        got = 0 if wrong_field and use != field else n
        if out_of_range:
            return False, f"{use}[{n}] out of range"
        return got == exact, f"{use}[{n}]" + (" (wrong field)" if wrong_field and use != field else "")

    def _grpc_call_options(self, r: random.Random) -> Tuple[Optional[float], Tuple[Tuple[str, Any], ...], Optional[float], str]:
        """(timeout argument, metadata, deadline seconds, note). grpc-python itself gives up at once on
        timeouts past about 1e10 s, so the huge ones stay below; past that, raw grpc-timeout values."""
        timeout: Optional[float] = None
        deadline: Optional[float] = None
        notes = []
        if r.random() < 0.25:
            timeout = r.choice([1e-3, 1e-6, 0.05, 1e9, 4e9, 3.15e9, 99999999.0, 86400.0 * 365 * 100, 2**31 + 0.5])
            deadline = timeout
            notes.append(f"timeout={timeout!r}")
        metadata: List[Tuple[str, Any]] = []
        if r.random() < 0.2:
            value = r.choice(GRPC_TIMEOUTS)
            metadata.append(("grpc-timeout", value))
            deadline = min_timeout(deadline, grpc_timeout_seconds(value))
        if r.random() < 0.1:
            metadata.append(r.choice([("sidecar-timeout-ms", r.choice(SIDECAR_TIMEOUTS) or "x"), ("timeout", "-1"),
                                      ("x-bin", bytes(range(256))), ("x-long", "v" * 4000), ("content-type", "application/grpc+json")]))
        if metadata:
            notes.append(f"metadata={metadata!r}"[:120])
        return timeout, tuple(metadata), deadline, (" " + " ".join(notes)) if notes else ""

    def _grpc_infer(self, r: random.Random, index: int) -> Case:
        request, reject, deadline_s, note, echo_shapes = self._grpc_message(r)
        timeout, metadata, call_deadline, tnote = self._grpc_call_options(r)
        return Case(self.seed, index, "grpc-infer", "ModelInfer", request.model_name, (note + tnote)[:500], reject,
                    min_timeout(deadline_s, call_deadline), grpc_requests=[request], grpc_rejects=[reject],
                    grpc_timeout=timeout, grpc_metadata=metadata, echo_shapes=echo_shapes)

    def _grpc_stream(self, r: random.Random, index: int) -> Case:
        messages, rejects, notes = [], [], []
        shortest: Optional[float] = None
        for k in range(r.randint(1, 4)):
            request, reject, deadline_s, note, _ = self._grpc_message(r, request_id=f"s{index}-{k}")
            messages.append(request)
            rejects.append(reject)
            shortest = min_timeout(shortest, deadline_s)
            notes.append(f"[{k}] {note}")
        messages.append(good_grpc_request(f"s{index}-good"))
        rejects.append(False)
        return Case(self.seed, index, "grpc-stream", "ModelStreamInfer", "(several)", " | ".join(notes)[:700], False,
                    shortest, grpc_requests=messages, grpc_rejects=rejects)


GRPC_TIMEOUTS = ["99999999H", "99999999M", "99999999S", "99999999m", "99999999u", "99999999n", "1n", "0S", "0n", "1m",
                 "999999999H", "-1S", "abc", "1", "H", "1.5S", "+5S", "1X", "00000001S", "9223372036854775807n"]
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout_seconds(value: str) -> Optional[float]:
    """A grpc-timeout header's seconds (at most 8 digits and a unit); 0 (anything goes) for others."""
    m = re.match(r"^([0-9]{1,8})([HMSmun])$", value)
    if m:
        return int(m.group(1)) * _GRPC_UNITS[m.group(2)]
    return 0.0


def bytes_elements(data: bytes) -> Optional[int]:
    """Elements of BYTES data (4-byte little-endian length prefixes), or None if malformed."""
    i, count = 0, 0
    while i < len(data):
        if len(data) - i < 4:
            return None
        (length,) = struct.unpack_from("<I", data, i)
        i += 4
        if len(data) - i < length:
            return None
        i += length
        count += 1
    return count


# ------------------------------------------------------------------------------ good requests


PROBE_X = [[1.0, 2.0, 3.0, 4.0]]


def good_grpc_request(request_id: str = "probe", x: Optional[List[float]] = None) -> Any:
    x = x if x is not None else [1.0, 2.0, 3.0, 4.0]
    request = service_pb2.ModelInferRequest(model_name="typed", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[len(x) // 4, 4]).contents.fp32_contents.extend(x)
    return request


def check_grpc_doubled(response: Any, x: List[float]) -> Optional[str]:
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.name == "doubled":
            got = list(struct.unpack(f"<{len(raw) // 4}f", raw))
            want = [2 * v for v in x]
            if got != want or list(output.shape) != [len(x) // 4, 4]:
                return f"doubled {got} shape {list(output.shape)}, expected {want}"
            return None
    return f"no 'doubled' output in {text_format.MessageToString(response, as_one_line=True)[:300]}"


def http_call(port: int, path: str, body: bytes, headers: Dict[str, str], timeout: float = CASE_TIMEOUT_S
              ) -> Tuple[int, Dict[str, str], bytes, float]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data, time.monotonic() - started
    finally:
        connection.close()


def probe_http(port: int) -> Optional[str]:
    """OIP JSON to typed, x = [[1, 2, 3, 4]]: must answer doubled = [[2, 4, 6, 8]]."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": PROBE_X}]}).encode()
    try:
        status, _, data, _ = http_call(port, "/v2/models/typed/infer", body, {"Content-Type": "application/json"})
    except Exception as error:  # noqa: BLE001 - every failure is the answer
        return f"HTTP probe: {error!r}"
    if status != 200:
        return f"HTTP probe: status {status}: {data[:300]!r}"
    try:
        outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
        doubled = outputs["doubled"]
        if [float(v) for v in doubled["data"]] != [2.0, 4.0, 6.0, 8.0] or doubled["shape"] != [1, 4]:
            return f"HTTP probe: wrong answer {doubled}"
    except Exception as error:  # noqa: BLE001
        return f"HTTP probe: unreadable answer {data[:300]!r} ({error!r})"
    return None


def probe_grpc(port: int) -> Optional[str]:
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response = stub.ModelInfer(good_grpc_request(), timeout=CASE_TIMEOUT_S)
    except grpc.RpcError as error:
        return f"gRPC probe: {error.code()} {error.details()!r}"
    except Exception as error:  # noqa: BLE001
        return f"gRPC probe: {error!r}"
    problem = check_grpc_doubled(response, [1.0, 2.0, 3.0, 4.0])
    return f"gRPC probe: {problem}" if problem else None


class GoodTraffic:
    """Good requests sent continuously on another thread (HTTP JSON, HTTP binary, KServe v1, gRPC),
    each answer checked. Any failure is recorded: pathological traffic must not disturb it."""

    def __init__(self, http_port: int, grpc_port: int, pause_s: float = 0.005):
        self.http_port, self.grpc_port, self.pause_s = http_port, grpc_port, pause_s
        self.counts: Counter = Counter()
        self.failures: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="good-traffic", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "GoodTraffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3 * CASE_TIMEOUT_S)

    def _loop(self) -> None:
        r = random.Random(12345)
        channel = grpc.insecure_channel(f"{HOST}:{self.grpc_port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        kinds = ["http-json", "http-binary", "kserve-v1", "grpc"]
        i = 0
        try:
            while not self._stop.is_set():
                kind = kinds[i % len(kinds)]
                i += 1
                try:
                    problem = getattr(self, "_" + kind.replace("-", "_"))(r, stub)
                except Exception as error:  # noqa: BLE001
                    problem = repr(error)[:300]
                with self._lock:
                    if problem:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {problem}")
                    else:
                        self.counts[kind] += 1
                self._stop.wait(self.pause_s)
        finally:
            channel.close()

    def _http_json(self, r: random.Random, stub: Any) -> Optional[str]:
        rows = r.randint(1, 3)
        x = [float(r.randint(0, 1000)) / 4 for _ in range(rows * 4)]
        body = json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x}]}).encode()
        status, _, data, _ = http_call(self.http_port, "/v2/models/typed/infer", body, {"Content-Type": "application/json"})
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        outputs = {o["name"]: o for o in json.loads(data)["outputs"]}
        if [float(v) for v in outputs["doubled"]["data"]] != [2 * v for v in x]:
            return f"wrong doubled {outputs['doubled']} for {x}"
        return None

    def _http_binary(self, r: random.Random, stub: Any) -> Optional[str]:
        x = [float(r.randint(0, 1000)) for _ in range(8)]
        blob = struct.pack("<8f", *x)
        head = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(blob)}}],
                           "outputs": [{"name": "doubled", "parameters": {"binary_data": True}}]}).encode()
        status, headers, data, _ = http_call(self.http_port, "/v2/models/typed/infer", head + blob,
                                             {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        length = int(headers["inference-header-content-length"])
        got = list(struct.unpack("<8f", data[length:]))
        if got != [2 * v for v in x]:
            return f"wrong doubled {got} for {x}"
        return None

    def _kserve_v1(self, r: random.Random, stub: Any) -> Optional[str]:
        instances = [r.randint(0, 100), "text", {"a": [1, 2]}]
        status, _, data, _ = http_call(self.http_port, "/v1/models/echo:predict", json.dumps({"instances": instances}).encode(),
                                       {"Content-Type": "application/json"})
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        if json.loads(data) != {"predictions": instances}:
            return f"wrong predictions {data[:200]!r}"
        return None

    def _grpc(self, r: random.Random, stub: Any) -> Optional[str]:
        x = [float(r.randint(0, 1000)) for _ in range(4)]
        try:
            response = stub.ModelInfer(good_grpc_request("good", x), timeout=CASE_TIMEOUT_S)
        except grpc.RpcError as error:
            return f"{error.code()} {error.details()!r}"
        return check_grpc_doubled(response, x)


# ----------------------------------------------------------------------------------------- judge


# A 500 that a Python error explains: "ValueError: negative input", "instance 0: TypeError: ...".
PY_ERROR = re.compile(r"^(instance \d+: )?([A-Za-z_][A-Za-z0-9_.]*): ")
NOT_PYTHON = {"WorkerDied", "Unanswered", "ProtocolError"}
# Raised by the worker runtime, not the handler, for a tensor it cannot decode: the front should have
# refused the request (400 / INVALID_ARGUMENT) before it reached Python.
FRONT_SHOULD_REFUSE = {"InvalidTensor"}


def python_error(message: str) -> Optional[str]:
    m = PY_ERROR.match(message or "")
    if m and m.group(2) not in NOT_PYTHON:
        return m.group(2)
    return None


@dataclasses.dataclass
class Outcome:
    cls: str  # outcome class, e.g. "400", "500 ValueError", "OK", "INVALID_ARGUMENT", "reset", "hang"
    offense: Optional[str]
    seconds: float
    detail: str


def judge_http(case: Case, port: int) -> Outcome:
    started = time.monotonic()
    try:
        status, headers, data, seconds = http_call(port, case.path, case.body, case.headers)
    except (socket.timeout, TimeoutError):
        return Outcome("hang", f"no answer within {CASE_TIMEOUT_S} s", time.monotonic() - started, "")
    except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError, BrokenPipeError,
            ConnectionRefusedError, ConnectionAbortedError) as error:
        seconds = time.monotonic() - started
        if case.oversize and isinstance(error, (BrokenPipeError, ConnectionResetError)):
            return Outcome("closed (oversize body)", None, seconds, repr(error))
        name = "refused" if isinstance(error, ConnectionRefusedError) else "reset/EOF"
        return Outcome(name, f"connection failed: {error!r}", seconds, "")
    except http.client.HTTPException as error:
        return Outcome("bad response", f"unparseable HTTP response: {error!r}", time.monotonic() - started, "")
    except (ValueError, UnicodeError, http.client.InvalidURL) as error:
        return Outcome("not sent", None, time.monotonic() - started, f"client refused: {error!r}")
    except OSError as error:
        return Outcome("reset/EOF", f"connection failed: {error!r}", time.monotonic() - started, "")
    detail = data[:300].decode("utf-8", "replace")
    if seconds > CASE_TIMEOUT_S:
        return Outcome("slow", f"answered after {seconds:.1f} s", seconds, detail)
    if 200 <= status < 300:
        if case.reject:
            return Outcome(str(status), "accepted a request that is malformed (or for an unknown model)", seconds, detail)
        problem = check_http_success(case, headers, data)
        return Outcome(str(status), problem, seconds, detail)
    if 400 <= status < 500:
        return Outcome(str(status), None, seconds, detail)
    message = ""
    try:
        payload = json.loads(data)
        message = payload.get("error", "") if isinstance(payload, dict) else ""
    except ValueError:
        pass
    if status == 500:
        error_type = python_error(message)
        if error_type in FRONT_SHOULD_REFUSE:
            return Outcome(f"500 {error_type}", "the worker refused a tensor the front let through (expected 400)", seconds, detail)
        if error_type:
            return Outcome(f"500 {error_type}", None, seconds, detail)
        return Outcome("500", "500 without a Python error: the server failed", seconds, detail)
    if status == 504 and case.timeout_s is not None and case.timeout_s < CASE_TIMEOUT_S:
        return Outcome("504 (deadline)", None, seconds, detail)
    return Outcome(str(status), f"HTTP {status}", seconds, detail)


def check_http_success(case: Case, headers: Dict[str, str], data: bytes) -> Optional[str]:
    try:
        if case.protocol == "kserve-v1":
            predictions = json.loads(data)["predictions"]
            if not isinstance(predictions, list):
                return "predictions is not a list"
            if case.v1_count is not None and len(predictions) != case.v1_count:
                return f"{len(predictions)} predictions for {case.v1_count} instances"
            return None
        if "inference-header-content-length" in headers:
            length = int(headers["inference-header-content-length"])
            payload = json.loads(data[:length])
        else:
            payload = json.loads(data)
        outputs = payload["outputs"]
        if case.echo_shapes is not None:
            got = {o["name"]: o["shape"] for o in outputs}
            if got != case.echo_shapes:
                return f"echo answered shapes {got}, sent {case.echo_shapes}"
    except Exception as error:  # noqa: BLE001
        return f"malformed success body: {error!r}"
    return None


ACCEPTABLE_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED}


def judge_rpc_error(case: Case, code: Any, details: str, seconds: float) -> Outcome:
    name = code.name if code is not None else "None"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in details:
        # the client's own status: the server's error message (grpc-message) was too long to read
        return Outcome("RESOURCE_EXHAUSTED (error trailers too large)",
                       "the server's error trailers exceed the client's metadata limit, so its status and message are lost",
                       seconds, details[:300])
    if code in ACCEPTABLE_GRPC:
        return Outcome(name, None, seconds, details[:300])
    if code == grpc.StatusCode.INTERNAL:
        error_type = python_error(details)
        if error_type in FRONT_SHOULD_REFUSE:
            return Outcome(f"INTERNAL {error_type}", "the worker refused a tensor the front let through (expected INVALID_ARGUMENT)",
                           seconds, details[:300])
        if error_type:
            return Outcome(f"INTERNAL {error_type}", None, seconds, details[:300])
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and case.timeout_s is not None and case.timeout_s < CASE_TIMEOUT_S:
        return Outcome("DEADLINE_EXCEEDED (deadline)", None, seconds, details[:300])
    return Outcome(name, f"gRPC {name}: {details[:300]!r}", seconds, details[:300])


def grpc_options() -> List[Tuple[str, int]]:
    return [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def judge_grpc(case: Case, port: int) -> Outcome:
    started = time.monotonic()
    with grpc.insecure_channel(f"{HOST}:{port}", options=grpc_options()) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        if case.protocol == "grpc-stream":
            return judge_stream(case, stub, started)
        try:
            future = stub.ModelInfer.future(case.grpc_requests[0], timeout=case.grpc_timeout, metadata=case.grpc_metadata or None)
        except Exception as error:  # noqa: BLE001 - the client refused to send it
            return Outcome("not sent", None, time.monotonic() - started, f"client refused: {error!r}")
        try:
            response = future.result(timeout=CASE_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            future.cancel()
            return Outcome("hang", f"no answer within {CASE_TIMEOUT_S} s", time.monotonic() - started, "")
        except grpc.RpcError as error:
            return judge_rpc_error(case, error.code(), error.details() or "", time.monotonic() - started)
        seconds = time.monotonic() - started
        if case.reject:
            return Outcome("OK", "accepted a request that is malformed (or for an unknown model)", seconds,
                           text_format.MessageToString(response, as_one_line=True)[:300])
        if case.echo_shapes is not None:
            got = {o.name: list(o.shape) for o in response.outputs}
            if got != case.echo_shapes:
                return Outcome("OK", f"echo answered shapes {got}, sent {case.echo_shapes}", seconds, "")
        return Outcome("OK", None, seconds, "")


def judge_stream(case: Case, stub: Any, started: float) -> Outcome:
    answers: Dict[str, Any] = {}
    problems: List[str] = []
    try:
        call = stub.ModelStreamInfer(iter(case.grpc_requests), timeout=CASE_TIMEOUT_S)
        for message in call:
            answers.setdefault(message.infer_response.id, []).append(message)
    except grpc.RpcError as error:
        seconds = time.monotonic() - started
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome("hang", f"stream not finished within {CASE_TIMEOUT_S} s ({len(answers)} answers)", seconds, "")
        return judge_rpc_error(case, error.code(), error.details() or "", seconds)
    seconds = time.monotonic() - started
    classes = []
    for request, reject in zip(case.grpc_requests, case.grpc_rejects):
        got = answers.get(request.id, [])
        if len(got) != 1:
            problems.append(f"{len(got)} answers for {request.id!r}")
            continue
        message = got[0]
        if message.error_message:
            error_type = python_error(message.error_message)
            if message.error_message.startswith(("no model", "the request was cancelled")) or error_type is None:
                classes.append("error")
            else:
                classes.append(f"error {error_type}")
            if request.id.endswith("-good"):
                problems.append(f"the good request after the bad ones failed: {message.error_message[:200]!r}")
            elif error_type in NOT_PYTHON or message.error_message.startswith(("WorkerDied", "Unanswered", "ProtocolError")):
                problems.append(f"{request.id}: {message.error_message[:200]!r}")
            elif error_type in FRONT_SHOULD_REFUSE:
                problems.append(f"{request.id}: the worker refused a tensor the front let through: {message.error_message[:200]!r}")
        else:
            classes.append("ok")
            if reject:
                problems.append(f"{request.id}: accepted a request that is malformed (or for an unknown model)")
            if request.id.endswith("-good"):
                problem = check_grpc_doubled(message.infer_response, [1.0, 2.0, 3.0, 4.0])
                if problem:
                    problems.append(f"good request on the stream: {problem}")
    return Outcome("stream " + ",".join(sorted(set(classes))), "; ".join(problems) or None, seconds, "")


# ---------------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Report:
    seed: int
    seconds: float
    cases: int = 0
    outcomes: Dict[str, Counter] = dataclasses.field(default_factory=dict)
    offenses: List[Tuple[Case, Outcome]] = dataclasses.field(default_factory=list)
    probe_failures: List[str] = dataclasses.field(default_factory=list)
    died_after: Optional[Case] = None
    elapsed: float = 0.0
    baseline_error: Optional[str] = None
    examples: Dict[Tuple[str, str], Tuple[Case, Outcome]] = dataclasses.field(default_factory=dict)  # first of each class
    generator_errors: List[str] = dataclasses.field(default_factory=list)  # bugs of this module, not of the server
    slowest: Optional[Tuple[int, float]] = None  # (case index, seconds)

    def examples_text(self) -> str:
        lines = []
        for (protocol, cls), (case, outcome) in sorted(self.examples.items()):
            lines.append(f"[{protocol} {cls}] {case.label}\n    -> {outcome.detail[:200]!r}")
        return "\n".join(lines)

    def add(self, case: Case, outcome: Outcome) -> None:
        self.cases += 1
        if self.slowest is None or outcome.seconds > self.slowest[1]:
            self.slowest = (case.index, outcome.seconds)
        self.outcomes.setdefault(case.protocol, Counter())[outcome.cls] += 1
        self.examples.setdefault((case.protocol, outcome.cls), (case, outcome))
        if outcome.offense:
            self.offenses.append((case, outcome))

    @property
    def ok(self) -> bool:
        return not (self.offenses or self.probe_failures or self.died_after or self.baseline_error)

    def summary_line(self) -> str:
        parts = []
        for protocol in sorted(self.outcomes):
            counter = self.outcomes[protocol]
            classes = " ".join(f"{k}={v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
            parts.append(f"{protocol} {sum(counter.values())} ({classes})")
        errors = f", {len(self.generator_errors)} GENERATOR ERRORS" if self.generator_errors else ""
        return (f"pathological seed={self.seed}: {self.cases} cases in {self.elapsed:.1f} s, {len(self.offenses)} offending, "
                f"{len(self.probe_failures)} probe failures{errors}"
                + (f", slowest case {self.slowest[0]} {self.slowest[1]:.2f} s" if self.slowest else "")
                + " | " + " | ".join(parts))

    def failure_text(self, limit: int = 5) -> str:
        lines = []
        if self.baseline_error:
            lines.append(f"the good probe failed before any pathological case: {self.baseline_error}")
        if self.died_after:
            lines.append(f"THE SERVER DIED after {self.died_after.label}")
        seen = set()
        shown = 0
        for case, outcome in self.offenses:
            key = (case.protocol, outcome.cls, (outcome.offense or "")[:60])
            if key in seen and shown >= 2:
                continue
            seen.add(key)
            shown += 1
            lines.append(f"- {case.label}\n    -> {outcome.cls}: {outcome.offense} ({outcome.seconds:.2f} s) {outcome.detail[:200]!r}\n"
                         f"    request: {case.request_text(600)}")
            if shown >= limit:
                break
        if len(self.offenses) > shown:
            lines.append(f"  ... and {len(self.offenses) - shown} more offending cases")
        for failure in self.probe_failures[:limit]:
            lines.append(f"- probe: {failure}")
        lines.append(f"replay one case: PATHOLOGICAL_SEED={self.seed} python Tests/e2e/pathological.py --seed {self.seed} --case N")
        return "\n".join(lines)


# Outcomes that say the connection or the process failed, not the request.
TRANSPORT_FAILURES = {"hang", "reset/EOF", "refused", "bad response", "slow", "UNAVAILABLE"}


def run_case(case: Case, http_port: int, grpc_port: int) -> Outcome:
    if case.protocol.startswith("grpc"):
        return judge_grpc(case, grpc_port)
    return judge_http(case, http_port)


def run(http_port: int, grpc_port: int, seed: int, seconds: float, alive: Optional[Callable[[], bool]] = None,
        probe_every: int = PROBE_EVERY, only: Optional[List[int]] = None, log: Optional[Callable[[str], None]] = None) -> Report:
    """Sends cases 0, 1, ... (or `only`) for `seconds`; a good probe (HTTP and gRPC) after every
    `probe_every` cases; stops when the server dies."""
    report = Report(seed=seed, seconds=seconds)
    generator = Generator(seed)
    started = time.monotonic()
    baseline = probe_http(http_port) or probe_grpc(grpc_port)
    if baseline:
        report.baseline_error = baseline
        return report
    window: List[Case] = []
    index = 0
    while True:
        if only is not None:
            if index >= len(only):
                break
            case = generator.case(only[index])
        else:
            if time.monotonic() - started >= seconds:
                break
            case = generator.case(index)
        index += 1
        if case is None:
            continue
        outcome = run_case(case, http_port, grpc_port)
        report.add(case, outcome)
        window.append(case)
        if log and (outcome.offense or only is not None):
            log(f"{case.label}\n  -> {outcome.cls} {outcome.offense or ''} {outcome.detail[:200]!r}")
        if outcome.cls in TRANSPORT_FAILURES:
            # A trapping Swift process prints its backtrace first (seconds, frozen), then exits: wait
            # for it, so the death is blamed on this case and nothing after it is sent to a corpse.
            problem = probe_http(http_port) or probe_grpc(grpc_port)
            waited = time.monotonic()
            while problem and alive is not None and alive() and time.monotonic() - waited < 20:
                time.sleep(0.5)
            if problem:
                report.probe_failures.append(f"right after case {case.index} ({outcome.cls}): {problem}")
                if alive is not None and not alive():
                    report.died_after = case
                break
            window = []
        if alive is not None and not alive():
            report.died_after = case
            if not outcome.offense:
                report.offenses.append((case, dataclasses.replace(outcome, offense="the server process exited")))
            break
        if len(window) >= probe_every:
            problem = probe_http(http_port) or probe_grpc(grpc_port)
            if problem:
                report.probe_failures.append(f"after cases {[c.index for c in window]}: {problem}")
                if alive is not None and not alive():
                    report.died_after = case
                    break
            window = []
    problem = probe_http(http_port) or probe_grpc(grpc_port)
    if problem and not report.died_after:
        report.probe_failures.append(f"at the end: {problem}")
    report.generator_errors = generator.errors
    report.elapsed = time.monotonic() - started
    return report


def default_seed() -> int:
    value = os.environ.get("PATHOLOGICAL_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


def default_seconds(fallback: float = 20.0) -> float:
    value = os.environ.get("PATHOLOGICAL_SECONDS")
    return float(value) if value else fallback


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="default: $PATHOLOGICAL_SEED or random")
    parser.add_argument("--seconds", type=float, default=None, help="default: $PATHOLOGICAL_SECONDS or 20")
    parser.add_argument("--case", type=int, action="append", help="only this case (repeatable)")
    parser.add_argument("--list", metavar="A:B", help="print the cases A..B-1, one line each")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--serve", action="store_true", help="start sidecar serve as the e2e fixture does")
    parser.add_argument("--no-traffic", action="store_true", help="no background good traffic")
    parser.add_argument("--examples", action="store_true", help="print the first case of each outcome class")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else default_seed()
    seconds = args.seconds if args.seconds is not None else default_seconds()
    generator = Generator(seed)
    if args.list:
        a, b = (int(v) for v in args.list.split(":"))
        for i in range(a, b):
            case = generator.case(i)
            if case is None:
                print(generator.errors[-1])
                continue
            print(f"{'REJECT' if case.reject else 'any   '} {case.label}")
        return 0
    if args.case and not (args.http_port or args.serve):
        for i in args.case:
            case = generator._case(i)
            print(f"{case.label}\nmust be refused: {case.reject}; deadline: {case.timeout_s}\n{case.request_text(100_000)}\n")
        return 0
    if args.serve:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import conftest  # noqa: E402 - the e2e fixture, so the server starts exactly as in the tests

        fixture = conftest.server.__wrapped__()
        server = next(fixture)
        try:
            return drive(server.http_port, server.grpc_port, seed, seconds, args, alive=lambda: server.process.poll() is None,
                         log_tail=server.log)
        finally:
            try:
                next(fixture)
            except StopIteration:
                pass
            except (AssertionError, Exception) as error:  # the fixture's own check of the exit code
                print(f"stopping the server: {error}".splitlines()[0])
    if not (args.http_port and args.grpc_port):
        parser.error("give --http-port and --grpc-port of a running server, or --serve, or --case/--list to print cases")
    return drive(args.http_port, args.grpc_port, seed, seconds, args)


def drive(http_port: int, grpc_port: int, seed: int, seconds: float, args: Any, alive: Optional[Callable[[], bool]] = None,
          log_tail: Optional[Callable[[], str]] = None) -> int:
    print(f"pathological: seed={seed} seconds={seconds} (PATHOLOGICAL_SEED={seed} replays it)", flush=True)
    traffic = None if args.no_traffic else GoodTraffic(http_port, grpc_port).start()
    try:
        report = run(http_port, grpc_port, seed, seconds, alive=alive, only=args.case,
                     log=lambda line: print(line, flush=True))
    finally:
        if traffic:
            traffic.stop()
    print(report.summary_line())
    if args.examples:
        print(report.examples_text())
    if traffic:
        print(f"good traffic: {dict(traffic.counts)}, {len(traffic.failures)} failures {traffic.failures[:5]}")
    if not report.ok:
        print(report.failure_text())
        if log_tail:
            print("--- server log tail ---\n" + log_tail()[-4000:])
    return 0 if report.ok and not (traffic and traffic.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
