"""End-to-end tests of Sidecar's network front, as a user would run them: a real `sidecar serve`,
real sockets, stock clients (tritonclient from PyPI, grpc health stubs, curl, raw http.client).

Models: Examples/echo (returns every input tensor under its own name) and models/typed (declares
x FP32 [-1, 4]; returns doubled = 2x and label = [b"ok"]; raises ValueError("negative input")).
"""

from __future__ import annotations

import http.client
import json
import queue
import shutil
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

NON_ASCII = ["héllo wörld".encode(), "日本語 ✓ 🚀".encode(), b""]


# --------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def hc(server):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def x_values(rows: int = 2, start: float = 0.0) -> np.ndarray:
    return (np.arange(rows * 4, dtype=np.float32) + start).reshape(rows, 4) * np.float32(0.5)


def raw_request(server, method, path, body=b"", headers=None, timeout=10.0):
    """(status, headers, body bytes, seconds) via http.client, no client library smoothing."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data, time.monotonic() - started
    finally:
        connection.close()


def error_of(body: bytes) -> str:
    payload = json.loads(body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"], payload
    return payload["error"]


def binary_body(header: dict, *blobs: bytes, header_length: int | None = None):
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(length),
    }


def bytes_tensor(values) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


# ------------------------------------------------------------------------------ tritonclient.http


def test_http_fp32_binary_default(hc):
    x = x_values()
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True (the client's default)
    result = hc.infer("typed", [inp])
    doubled = result.as_numpy("doubled")
    assert doubled is not None, result.get_response()
    assert doubled.dtype == np.float32
    np.testing.assert_array_equal(doubled, x * 2)
    label = result.as_numpy("label")
    assert label is not None, result.get_response()
    assert label.tolist() == [b"ok"]
    response = result.get_response()
    assert response["model_name"] == "typed"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["doubled"]["datatype"] == "FP32" and outputs["doubled"]["shape"] == [2, 4]
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [1]


def test_http_fp32_json(hc):
    x = x_values(3, start=1.0)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("doubled", binary_data=False),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    result = hc.infer("typed", [inp], outputs=outputs, request_id="json-1")
    response = result.get_response()
    assert response.get("id") == "json-1"
    by_name = {o["name"]: o for o in response["outputs"]}
    for out in by_name.values():
        assert "parameters" not in out or "binary_data_size" not in out["parameters"], out
    np.testing.assert_array_equal(result.as_numpy("doubled"), x * 2)
    assert by_name["doubled"]["data"] == (x * 2).flatten().tolist()
    assert by_name["label"]["data"] == ["ok"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_bytes_echo(hc, binary):
    values = np.array(NON_ASCII, dtype=np.object_)
    text = httpclient.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(values, binary_data=binary)
    x = x_values(1)
    num = httpclient.InferInput("num", [1, 4], "FP32")
    num.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("text", binary_data=binary),
        httpclient.InferRequestedOutput("num", binary_data=binary),
    ]
    result = hc.infer("echo", [text, num], outputs=outputs)
    got = result.as_numpy("text")
    assert got is not None, result.get_response()
    assert got.shape == (3,)
    assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.tolist()] == NON_ASCII
    np.testing.assert_array_equal(result.as_numpy("num"), x)


def test_http_requested_output_subset(hc):
    x = x_values()
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = hc.infer("typed", [inp], outputs=[httpclient.InferRequestedOutput("doubled")])
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["doubled"]
    np.testing.assert_array_equal(result.as_numpy("doubled"), x * 2)
    assert result.as_numpy("label") is None


def test_http_metadata_and_health(hc):
    assert hc.is_server_live()
    assert hc.is_server_ready()
    assert hc.is_model_ready("typed")
    assert hc.is_model_ready("echo")
    assert not hc.is_model_ready("no-such-model")
    server_meta = hc.get_server_metadata()
    assert server_meta["name"] and server_meta["version"]
    assert "binary_tensor_data" in server_meta["extensions"]
    meta = hc.get_model_metadata("typed")
    assert meta["name"] == "typed"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "doubled": ("FP32", [-1, 4]),
        "label": ("BYTES", [1]),
    }
    assert hc.get_model_metadata("typed", model_version="1")["name"] == "typed"


def test_http_unknown_model(hc):
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x_values(1))
    with pytest.raises(InferenceServerException) as info:
        hc.infer("no-such-model", [inp])
    assert info.value.status() == "404", (info.value.status(), info.value.message())
    assert "no-such-model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        hc.get_model_metadata("no-such-model")
    assert info.value.status() == "404"


@pytest.mark.parametrize(
    "shape,datatype,data",
    [
        ([2, 3], "FP32", np.zeros((2, 3), np.float32)),
        ([2, 4], "INT32", np.zeros((2, 4), np.int32)),
        ([8], "FP32", np.zeros(8, np.float32)),
    ],
    ids=["shape", "datatype", "rank"],
)
def test_http_mismatched_input(hc, shape, datatype, data):
    inp = httpclient.InferInput("x", shape, datatype)
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as info:
        hc.infer("typed", [inp])
    assert info.value.status() == "400", (info.value.status(), info.value.message())
    assert "'x'" in info.value.message() or '"x"' in info.value.message() or " x " in info.value.message() \
        or "x:" in info.value.message(), info.value.message()


def test_http_handler_error(hc):
    x = x_values()
    x[1, 2] = -1
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        hc.infer("typed", [inp])
    assert info.value.status() == "500", (info.value.status(), info.value.message())
    assert "negative input" in info.value.message()
    # the worker survives
    good = httpclient.InferInput("x", [1, 4], "FP32")
    good.set_data_from_numpy(x_values(1))
    np.testing.assert_array_equal(hc.infer("typed", [good]).as_numpy("doubled"), x_values(1) * 2)


def test_http_v2_endpoints_raw(server):
    for path in ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/typed",
                 "/v2/models/typed/versions/1", "/v2/models/typed/ready", "/v2/models/echo/ready"]:
        status, _, body, _ = raw_request(server, "GET", path)
        assert status == 200, (path, status, body)
        json.loads(body)
    status, _, body, _ = raw_request(server, "GET", "/v2/models/typed/versions/2")
    assert status == 404, (status, body)
    status, _, body, _ = raw_request(server, "GET", "/v2/models/nope/ready")
    assert status in (400, 404), (status, body)


# ------------------------------------------------------------------------------ tritonclient.grpc


def test_grpc_fp32(grpc_client):
    x = x_values(3)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = grpc_client.infer("typed", [inp], request_id="g-1")
    assert result.get_response().id == "g-1"
    assert result.get_response().model_name == "typed"
    doubled = result.as_numpy("doubled")
    assert doubled is not None and doubled.dtype == np.float32
    np.testing.assert_array_equal(doubled, x * 2)
    assert result.as_numpy("label").tolist() == [b"ok"]
    sub = grpc_client.infer("typed", [inp], outputs=[grpcclient.InferRequestedOutput("label")])
    assert [o.name for o in sub.get_response().outputs] == ["label"]
    assert sub.as_numpy("doubled") is None


def test_grpc_bytes(grpc_client):
    values = np.array(NON_ASCII, dtype=np.object_)
    inp = grpcclient.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(values)
    result = grpc_client.infer("echo", [inp])
    got = result.as_numpy("text")
    assert got is not None
    assert got.tolist() == NON_ASCII
    out = result.get_response().outputs[0]
    assert out.datatype == "BYTES" and list(out.shape) == [3]


def test_grpc_metadata_config_health(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("typed")
    assert grpc_client.is_model_ready("echo")
    meta = grpc_client.get_server_metadata()
    assert meta.name and meta.version
    model = grpc_client.get_model_metadata("typed")
    assert model.name == "typed"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1, 4])]
    assert sorted((t.name, t.datatype, list(t.shape)) for t in model.outputs) == [
        ("doubled", "FP32", [-1, 4]), ("label", "BYTES", [1])]
    config = grpc_client.get_model_config("typed").config
    assert config.name == "typed"
    assert [i.name for i in config.input] == ["x"]
    assert sorted(o.name for o in config.output) == ["doubled", "label"]
    echo_config = grpc_client.get_model_config("echo").config
    assert echo_config.name == "echo"


def _grpc_status(error: InferenceServerException) -> str:
    return str(error.status())


def test_grpc_errors(grpc_client):
    good = grpcclient.InferInput("x", [1, 4], "FP32")
    good.set_data_from_numpy(x_values(1))
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("no-such-model", [good])
    assert _grpc_status(info.value) == "StatusCode.NOT_FOUND", (info.value.status(), info.value.message())
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_metadata("no-such-model")
    assert _grpc_status(info.value) == "StatusCode.NOT_FOUND"

    bad = grpcclient.InferInput("x", [2, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("typed", [bad])
    assert _grpc_status(info.value) == "StatusCode.INVALID_ARGUMENT", (info.value.status(), info.value.message())
    assert "x" in info.value.message()

    wrong_type = grpcclient.InferInput("x", [1, 4], "INT64")
    wrong_type.set_data_from_numpy(np.zeros((1, 4), np.int64))
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("typed", [wrong_type])
    assert _grpc_status(info.value) == "StatusCode.INVALID_ARGUMENT", (info.value.status(), info.value.message())

    negative = grpcclient.InferInput("x", [1, 4], "FP32")
    negative.set_data_from_numpy(-x_values(1) - 1)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("typed", [negative])
    assert _grpc_status(info.value) == "StatusCode.INTERNAL", (info.value.status(), info.value.message())
    assert "negative input" in info.value.message()


def test_grpc_stream_20(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent = {}
        for i in range(20):
            x = x_values(1, start=float(i * 10))
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            sent[f"req-{i}"] = x
            client.async_stream_infer("typed", [inp], request_id=f"req-{i}")
        got = {}
        deadline = time.monotonic() + 30
        while len(got) < 20:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(got)} of 20 stream responses arrived"
            result, error = results.get(timeout=remaining)
            assert error is None, error
            rid = result.get_response().id
            assert rid in sent and rid not in got, rid
            got[rid] = result.as_numpy("doubled")
        for rid, x in sent.items():
            np.testing.assert_array_equal(got[rid], x * 2)
    finally:
        client.stop_stream()
        client.close()


def test_grpc_stream_error_does_not_end_stream(server):
    # One request at a time (each answered before the next is sent), so the failing request is never
    # batched with the good ones (a raising handler fails its whole batch, by contract).
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, sign in enumerate([1, -1, 1]):
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(sign * (x_values(1) + 1))
            client.async_stream_infer("typed", [inp], request_id=f"s-{i}")
            result, error = results.get(timeout=30)
            if sign < 0:
                assert result is None and error is not None, (result, error)
                assert "negative input" in error.message(), error.message()
            else:
                assert error is None, error
                assert result.get_response().id == f"s-{i}"
                np.testing.assert_array_equal(result.as_numpy("doubled"), (x_values(1) + 1) * 2)
    finally:
        client.stop_stream()
        client.close()


# ------------------------------------------------------------------------------- grpc.health.v1


def test_grpc_health_check(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ["", "echo", "typed"]:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value


def test_grpc_health_watch(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service="echo"), timeout=10)
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


# -------------------------------------------------------------------------------------------- curl


def curl(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed")
    return subprocess.run([path, "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)


def test_curl_kserve_v1_predict(server):
    instances = [1, 2.5, -3, "text", "日本語", True, False, None, {"a": [1, {"b": "c"}], "n": None}, [1, "x", [2.0]], "", [], {}]
    proc = curl("-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                "-d", json.dumps({"instances": instances}), f"{server.base}/v1/models/echo:predict")
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "200", (code, body)
    assert json.loads(body) == {"predictions": instances}


def test_curl_kserve_v1_errors(server):
    proc = curl("-w", "\n%{http_code}", "-d", '{"instances": [1]}', f"{server.base}/v1/models/nope:predict")
    body, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "404", (code, body)
    assert "nope" in error_of(body.encode())
    proc = curl("-w", "\n%{http_code}", "-d", '{"not_instances": [1]}', f"{server.base}/v1/models/echo:predict")
    body, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "400", (code, body)
    assert "instances" in error_of(body.encode())


def test_curl_metrics(server, hc):
    # traffic on both protocols first, so the counters exist
    proc = curl("-d", '{"instances": [1, 2]}', f"{server.base}/v1/models/echo:predict")
    assert proc.returncode == 0
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x_values(1))
    hc.infer("typed", [inp])
    gclient = grpcclient.InferenceServerClient(server.grpc_url)
    ginp = grpcclient.InferInput("x", [1, 4], "FP32")
    ginp.set_data_from_numpy(x_values(1))
    gclient.infer("typed", [ginp])
    gclient.close()

    proc = curl("-w", "\n%{http_code}", f"{server.base}/metrics")
    text, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "200", (code, text)
    lines = text.splitlines()
    requests = [l for l in lines if l.startswith("sidecar_requests_total{")]
    assert requests, text
    assert any('model="typed"' in l and "protocol=" in l for l in requests), requests
    assert any('model="echo"' in l for l in requests), requests
    protocols = {p for l in requests for p in ("http", "grpc", "v1", "v2", "kserve") if f'protocol="{p}' in l}
    assert len(protocols) >= 2, requests  # traffic on more than one protocol was sent
    assert any(l.startswith("# TYPE sidecar_batch_size histogram") for l in lines), text
    assert any(l.startswith("sidecar_batch_size_bucket{") and 'le="+Inf"' in l for l in lines), text
    assert any(l.startswith("sidecar_batch_size_count") for l in lines), text
    assert any(l.startswith("sidecar_batch_size_sum") for l in lines), text
    for l in requests:
        float(l.rsplit(" ", 1)[1])


# ------------------------------------------------------------- bad-input corpus under good traffic


def _corpus(max_body: int):
    good_x = x_values(1).tobytes()
    corpus = []

    def add(name, status, must_mention, path, body, headers=None):
        corpus.append((name, status, must_mention, path, body, headers or {"Content-Type": "application/json"}))

    infer = "/v2/models/typed/infer"
    add("malformed json", 400, ["json"], infer, b'{"inputs": [{"name": "x", ')
    add("not an object", 400, [], infer, b"[1, 2, 3]")
    add("missing inputs", 400, ["inputs"], infer, b'{"outputs": []}')
    add("wrong shape for data", 400, ["x"], infer, json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}).encode())
    add("unknown datatype", 400, ["FP33"], "/v2/models/echo/infer", json.dumps(
        {"inputs": [{"name": "a", "shape": [1], "datatype": "FP33", "data": [1]}]}).encode())
    add("datatype vs declared", 400, ["x"], infer, json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}).encode())
    add("string data for FP32", 400, ["x"], infer, json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}).encode())
    add("negative dimension", 400, ["x"], "/v2/models/echo/infer", json.dumps(
        {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}).encode())
    add("missing declared input", 400, ["x"], infer, json.dumps(
        {"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode())
    add("unknown model", 404, ["no-such-model"], "/v2/models/no-such-model/infer", json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode())
    body, headers = binary_body(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}]},
        good_x)  # 16 bytes follow, 32 announced
    add("binary_data_size larger than body", 400, ["binary_data_size"], infer, body, headers)
    body, headers = binary_body(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
        good_x)  # 8 announced, 16 follow, and 8 bytes is not 4 FP32s
    add("binary_data_size smaller than tensor", 400, ["binary"], infer, body, headers)
    body, headers = binary_body(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
        good_x, header_length=10_000)
    add("Inference-Header-Content-Length larger than body", 400, ["inference-header-content-length"], infer, body, headers)
    body, headers = binary_body({"inputs": []}, b"")
    headers["Inference-Header-Content-Length"] = "abc"
    add("Inference-Header-Content-Length not a number", 400, ["inference-header-content-length"], infer, body, headers)
    add("body over the limit", 413, [], infer, b'{"inputs": [' + b" " * (2 * max_body) + b"]}")
    add("v1 malformed", 400, ["json"], "/v1/models/echo:predict", b'{"instances": [1,')
    return corpus


def _good_http(server) -> None:
    x = x_values(2, start=3.0)
    body, headers = binary_body(
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
         "outputs": [{"name": "doubled", "parameters": {"binary_data": True}}]},
        x.tobytes())
    status, response_headers, data, _ = raw_request(server, "POST", "/v2/models/typed/infer", body, headers, timeout=10)
    assert status == 200, (status, data[:500])
    length = int({k.lower(): v for k, v in response_headers.items()}["inference-header-content-length"])
    header = json.loads(data[:length])
    assert header["outputs"][0]["name"] == "doubled"
    np.testing.assert_array_equal(np.frombuffer(data[length:], dtype="<f4").reshape(2, 4), x * 2)


def _good_grpc(client) -> None:
    x = x_values(1, start=7.0)
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("typed", [inp], client_timeout=10).as_numpy("doubled"), x * 2)


def test_bad_input_corpus_under_good_traffic(server):
    from conftest import MAX_BODY_BYTES

    stop = threading.Event()
    counts = {"http": 0, "grpc": 0}
    failures: list = []
    lock = threading.Lock()

    def pump(kind):
        client = grpcclient.InferenceServerClient(server.grpc_url) if kind == "grpc" else None
        try:
            while not stop.is_set():
                try:
                    _good_http(server) if kind == "http" else _good_grpc(client)
                    with lock:
                        counts[kind] += 1
                except Exception as error:  # noqa: BLE001 - every failure is recorded
                    with lock:
                        failures.append((kind, repr(error)[:500]))
        finally:
            if client is not None:
                client.close()

    kinds = ["http", "http", "grpc", "grpc"]
    with ThreadPoolExecutor(len(kinds)) as pool:
        futures = [pool.submit(pump, k) for k in kinds]
        time.sleep(0.5)
        problems = []
        try:
            for _round in range(3):
                for name, status, mentions, path, body, headers in _corpus(MAX_BODY_BYTES):
                    try:
                        got, _, data, seconds = raw_request(server, "POST", path, body, headers, timeout=10)
                    except Exception as error:  # noqa: BLE001
                        problems.append(f"{name}: request failed: {error!r}")
                        continue
                    if got != status:
                        problems.append(f"{name}: status {got}, expected {status}: {data[:300]!r}")
                        continue
                    if seconds >= 2.0:
                        problems.append(f"{name}: took {seconds:.2f} s")
                    try:
                        message = error_of(data)
                    except Exception as error:  # noqa: BLE001
                        problems.append(f"{name}: body is not {{\"error\": ...}}: {data[:300]!r} ({error!r})")
                        continue
                    for word in mentions:
                        if word.lower() not in message.lower():
                            problems.append(f"{name}: error does not mention {word!r}: {message!r}")
            time.sleep(0.5)
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert not problems, "\n".join(sorted(set(problems)))
    assert not failures, f"{len(failures)} good requests failed, e.g. {failures[:5]}; succeeded {counts}"
    assert counts["http"] > 10 and counts["grpc"] > 10, counts
