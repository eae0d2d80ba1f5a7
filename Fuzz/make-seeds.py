#!/usr/bin/env python3
"""Writes the seed corpora of the Swift fuzz targets (Fuzz/corpus/<target>/) from the shapes the tests
use: valid requests, configuration files and worker answers, so libFuzzer starts from inputs that
reach deep into each decoder. Run with the e2e venv (tritonclient for the OIP gRPC messages):

    .build/e2e-venv/bin/python Fuzz/make-seeds.py

The layouts (flag bytes, length prefixes) are the ones Fuzz/Sources/SidecarFuzz/FuzzTargets.swift reads.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "python"))

from sidecar_worker.proto import worker_pb2 as wpb  # noqa: E402
from tritonclient.grpc import service_pb2 as spb  # noqa: E402


def bytes_layout(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def write(target: str, name: str, data: bytes) -> None:
    directory = HERE / "corpus" / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def oip_http() -> None:
    bodies = {
        "fp32": {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]},
        "every-type": {"inputs": [
            {"name": "f", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [-3, 4]]},
            {"name": "d", "shape": [1], "datatype": "FP64", "data": [0.1]},
            {"name": "i", "shape": [3], "datatype": "INT64", "data": [1, -2, 9007199254740993]},
            {"name": "u", "shape": [2], "datatype": "UINT8", "data": [0, 255]},
            {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
            {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["h\u00e9", ""]},
            {"name": "h", "shape": [1], "datatype": "FP16", "data": [1.5]},
            {"name": "q", "shape": [1], "datatype": "UINT64", "data": [18446744073709551615]},
        ]},
        "params": {"id": "r1", "parameters": {"timeout": 5000, "binary_data_output": True},
                   "inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}],
                   "outputs": [{"name": "x", "parameters": {"binary_data": False}}]},
    }
    for name, body in bodies.items():
        write("oip-http", name, b"\x00" + struct.pack("<i", 0) + json.dumps(body).encode())
    # The binary extension: a JSON header, then raw tensors.
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 10}},
    ]}).encode()
    binary = struct.pack("<2f", 1.0, 2.0) + bytes_layout(b"ab", b"")
    write("oip-http", "binary", b"\x01" + struct.pack("<i", len(header)) + header + binary)


def headers() -> None:
    for name, text in {"plain": "12\n250\n100m", "float": "0\n1.5\n5S", "units": "100\n0\n3H", "micro": "5000\n\n250u"}.items():
        write("headers", name, text.encode())


def kserve() -> None:
    for name, body in {
        "iris": {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]},
        "objects": {"instances": [{"text": "hi"}, {"numbers": [1, 2, 3]}, None, True, "s"]},
        "nested": {"instances": [[[1, [2, [3]]]], {"a": {"b": [1e10, -0.5]}}]},
    }.items():
        write("kserve-v1", name, json.dumps(body).encode())


def grpc_infer() -> None:
    raw = spb.ModelInferRequest(model_name="typed", id="1")
    tensor = raw.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    raw.raw_input_contents.append(struct.pack("<4f", 1, 2, 3, 4))
    raw.parameters["timeout"].int64_param = 5000
    write("grpc-infer", "raw", raw.SerializeToString())
    typed = spb.ModelInferRequest(model_name="echo")
    for dtype, field, values in [("INT32", "int_contents", [1, -2]), ("INT64", "int64_contents", [3]), ("UINT8", "uint_contents", [255]),
                                 ("UINT64", "uint64_contents", [7]), ("FP64", "fp64_contents", [0.5]), ("BOOL", "bool_contents", [True]),
                                 ("BYTES", "bytes_contents", [b"ab", b""])]:
        tensor = typed.inputs.add(name=dtype.lower(), datatype=dtype, shape=[len(values)])
        getattr(tensor.contents, field).extend(values)
    typed.parameters["timeout"].double_param = 1.5
    write("grpc-infer", "typed", typed.SerializeToString())
    strings = spb.ModelInferRequest(model_name="echo")
    strings.inputs.add(name="s", datatype="BYTES", shape=[2])
    strings.raw_input_contents.append(bytes_layout(b"h\xc3\xa9", b""))
    write("grpc-infer", "bytes", strings.SerializeToString())


def bytes_target() -> None:
    write("bytes", "two", struct.pack("<q", 2) + bytes_layout(b"ab", b""))
    write("bytes", "one", struct.pack("<q", 1) + bytes_layout("日本".encode()))
    write("bytes", "empty", struct.pack("<q", 0))


def worker_result() -> None:
    json_result = wpb.BatchResult(id=7, outputs=b'[1, "two", {"three": [3]}, null]', compute_seconds=0.001)
    json_result.item_errors.add(index=3, error=wpb.Error(type="ValueError", message="bad item"))
    write("worker-result", "json", bytes([4]) + json_result.SerializeToString())
    tensors = wpb.BatchResult(id=8)
    item = tensors.tensor_outputs.add()
    item.tensors.add(name="y", datatype="FP32", shape=[1, 2], data=struct.pack("<2f", 1, 2))
    item.tensors.add(name="label", datatype="BYTES", shape=[1], data=bytes_layout(b"ok"))
    write("worker-result", "tensors", bytes([0x80 | 1]) + tensors.SerializeToString())
    failed = wpb.BatchResult(id=9, batch_error=wpb.Error(type="ValueError", message="boom", traceback="Traceback ..."))
    write("worker-result", "batch-error", bytes([2]) + failed.SerializeToString())
    write("worker-result", "splitter", bytes([3]) + b' [ "a,]}\\"" , [1,[2]] ,{"k":"}"} ] ')


def bundle_tar() -> None:
    def tar(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
            for info, data in entries:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()

    def file(name, data=b"x", mode=0o644):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        return info, data

    def link(name, target, kind=tarfile.SYMTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info, None

    directory = tarfile.TarInfo("lib")
    directory.type = tarfile.DIRTYPE
    model = [file("handler.py", b"def predict(batch):\n    return batch\n"), file("sidecar.yaml", b"name: m\n"), (directory, None),
             file("lib/run.sh", b"#!/bin/sh\n", 0o755), link("lib/alias.py", "../handler.py"), link("hard.py", "handler.py", tarfile.LNKTYPE)]
    write("bundle-tar", "gnu", b"\x02" + tar(model))
    write("bundle-tar", "pax", b"\x03" + tar(model + [file("d/" + "n" * 150 + ".txt")], tarfile.PAX_FORMAT))
    write("bundle-tar", "ustar", b"\x01" + tar(model, tarfile.USTAR_FORMAT))


def configs() -> None:
    write("model-config", "reference", (REPO / "Config" / "model-sidecar.yaml").read_bytes())
    write("model-config", "typed", (REPO / "Tests" / "e2e" / "models" / "typed" / "sidecar.yaml").read_bytes())
    write("model-config", "autoscale", b"workers: {min: 1, max: 4, target_queue_ms: 50, scale_down_after_s: 30}\n"
                                       b"batching: {max_batch_size: 8, max_delay_ms: 2, max_queue: 64}\n"
                                       b"config: {threshold: 0.5, labels: [a, b], nested: {x: null}}\n")
    write("server-config", "reference", (REPO / "Config" / "sidecar.yaml").read_bytes())
    write("server-config", "small", b"models: [a, /srv/b]\nworkers: 2\nhttp_port: 8000\nadmin_port: off\nmax_body_bytes: 1048576\npip_args: [--no-index]\n")


def admin() -> None:
    write("admin-body", "load", b"\x00" + json.dumps({"directory": "/srv/models/iris", "name": "iris2", "workers": 2}).encode())
    write("admin-body", "scale", b"\x01" + json.dumps({"workers": 3, "timeout_s": 120, "wait": False}).encode())


if __name__ == "__main__":
    for make in (oip_http, headers, kserve, grpc_infer, bytes_target, worker_result, bundle_tar, configs, admin):
        make()
    print("seeds:", sorted(str(p.relative_to(HERE)) for p in (HERE / "corpus").glob("*/*")))
