"""Fallbacks and circuit breakers, end to end (issue 18): a model's `fallback:` (another loaded
model, or a fixed `response:`, for the reasons in `on:`, with an optional `after_ms` latency
budget) and `breaker:`. One real `sidecar serve` with private copies of Tests/e2e/models/fallback_*
(a test switches a primary between echo / raise / sleep through its `mode` file, and counts the
items that reached its handler in its `calls` file); real HTTP (http.client, tritonclient.http)
and gRPC (the OIP stubs, tritonclient.grpc):

- a handler that raises -> fallback_popular's answer (42s), `Sidecar-Fallback: error`, OIP
  parameters sidecar_fallback / sidecar_fallback_source, model_name the primary's; KServe v1 per
  item; gRPC InferResponse.parameters and the `sidecar-fallback` initial metadata;
- a fixed `response:` fallback, and `on:` limiting it (a passed deadline is then still a 504);
- a request's deadline passing -> `timeout`;
- a full queue -> `queue_full` answers, never a 429 / RESOURCE_EXHAUSTED;
- `after_ms: 50` with a 500 ms primary -> answers in ~50 ms (`timeout`), p50/p99 printed;
- the breaker: opens at failure_rate over min_requests (/status, /metrics), bypasses the primary
  (`breaker_open`, nothing reaches the handler), half-opens after cool_down_s, a failing probe
  opens it again, passing probes close it; without a fallback: 503 + Retry-After, UNAVAILABLE;
- workers killed (kill -9), then the model FAILED -> `unavailable`, no request unanswered;
- `sidecar_fallback_total{model,reason}` counts exactly what the callers saw, in every test (per
  request: a KServe v1 request whose items fell back counts once);
- bad configuration refused at load, naming the key (`fallback.model` not loaded, cycles,
  unknown keys).

Environment: SIDECAR_BIN, SIDECAR_CACHE_DIR (as for conftest.py). Runs in about a minute and a half.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import CACHE_DIR, HERE, SIDECAR_BIN, Server, _free_port, running_server, wait_for  # noqa: E402

MODELS = HERE / "models"

POPULAR = "fallback_popular"            # the fallback model: answers 42s / {"popular": 42}
PRIMARY = "fallback_primary"            # fallback.model: fallback_popular, on: all four
FIXED = "fallback_fixed"                # fallback.response (OIP outputs), on: [error, unavailable]
QUEUE = "fallback_queue"                # 1 worker, 1 item per batch, max_queue 2, on: [queue_full]
BUDGET = "fallback_budget"              # after_ms: 50
BREAKER = "fallback_breaker"            # breaker + fallback.model
BREAKER_ONLY = "fallback_breaker_only"  # breaker, no fallback
KILLABLE = "fallback_killable"          # killed, then FAILED
ALL_MODELS = [POPULAR, PRIMARY, FIXED, QUEUE, BUDGET, BREAKER, BREAKER_ONLY, KILLABLE]

FIXED_RESPONSE = {"outputs": [{"name": "fixed", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]}
BREAKER_MIN_REQUESTS = 6
BREAKER_COOL_DOWN_S = 2.0
BREAKER_PROBES = 2
BUDGET_MS = 50
REQUEST_TIMEOUT_S = 15.0
REASONS = ("unavailable", "queue_full", "timeout", "error", "breaker_open")


# ------------------------------------------------------------------------------------ harness


class FallbackServer(Server):
    """conftest's server, plus the model copies' control files, /status and /metrics."""

    dirs: dict[str, Path]

    def set_mode(self, model: str, mode: str) -> None:
        path = self.dirs[model] / "mode"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(mode + "\n")
        os.replace(tmp, path)  # the handler never reads half a file

    def calls(self, model: str) -> int:
        """Items that reached the model's handler so far."""
        try:
            return sum(int(line) for line in (self.dirs[model] / "calls").read_text().split())
        except FileNotFoundError:
            return 0

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def status(self) -> dict:
        code, body = self.get("/status")
        assert code == 200, (code, body[:300])
        return json.loads(body)

    def model_status(self, name: str) -> dict:
        for model in self.status()["models"]:
            if model["name"] == name:
                return model
        raise AssertionError(f"model {name} not in /status")

    def breaker(self, name: str) -> dict:
        breaker = self.model_status(name).get("breaker")
        assert isinstance(breaker, dict), f"/status models[{name}].breaker is {breaker!r}"
        return breaker

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        assert code == 200, (code, body[:300])
        return body.decode()

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _labels(series: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', series))


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(_labels(series).get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def _fallback_totals(text: str, model: str) -> Counter:
    """sidecar_fallback_total{model=MODEL,reason=...} as a Counter by reason."""
    found: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == "sidecar_fallback_total":
            labels = _labels(series)
            if labels.get("model") == model:
                found[labels.get("reason", "?")] += float(value)
    return found


class FallbackCount:
    """The model's sidecar_fallback_total before; `check(observed)` asserts the increase by reason
    is exactly what the test's callers saw."""

    def __init__(self, server: FallbackServer, model: str):
        self.server, self.model = server, model
        self.before = _fallback_totals(server.metrics(), model)

    def check(self, observed: Counter, what: str = "") -> None:
        after = _fallback_totals(self.server.metrics(), self.model)
        delta = {r: after.get(r, 0) - self.before.get(r, 0) for r in set(after) | set(self.before) | set(observed)}
        delta = {r: v for r, v in delta.items() if v}
        expected = {r: float(v) for r, v in observed.items() if v}
        assert delta == expected, (
            f"sidecar_fallback_total{{model={self.model}}} went up by {delta}, the callers saw {expected} "
            f"fallback answers {what}; metrics now: {dict(after)}")


@pytest.fixture(scope="module")
def server():
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-fallback-models-"))
    dirs = {name: Path(shutil.copytree(MODELS / name, tmp / name)) for name in ALL_MODELS}
    # The primaries share fallback_primary's switchable handler; only their sidecar.yaml differs.
    for directory in dirs.values():
        if not (directory / "handler.py").exists():
            shutil.copy(MODELS / "fallback_primary" / "handler.py", directory / "handler.py")

    class _Server(FallbackServer):
        pass
    _Server.dirs = dirs
    _Server.admin_port = _free_port()  # `sidecar status` shows the breaker
    try:
        # info: the breaker's transitions are logged; the log is read in the breaker test.
        with running_server([dirs[n] for n in ALL_MODELS], ["--log-level", "info", "--admin-port", str(_Server.admin_port)],
                            server_class=_Server, prefix="sidecar-fallback-", admin=True) as srv:
            yield srv
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- HTTP client


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes
    seconds: float
    sent_at: float = 0.0

    def json(self):
        return json.loads(self.body)

    @property
    def marker(self) -> str | None:
        return self.headers.get("sidecar-fallback")

    def short(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r} in {self.seconds * 1000:.0f} ms"


class Client:
    """A keep-alive HTTP/1.1 client (http.client)."""

    def __init__(self, server: Server, timeout: float = REQUEST_TIMEOUT_S):
        self.port, self.timeout = server.http_port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def connect(self) -> None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.connect()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Answer:
        self.connect()
        sent = time.monotonic()
        try:
            self.conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = self.conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, payload,
                        time.monotonic() - sent, sent)
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    def infer(self, model: str, a: int, rid: str, headers: dict | None = None) -> Answer:
        body = json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                  "data": [a, a + 1, a + 2, a + 3]}]}).encode()
        return self.request("POST", f"/v2/models/{model}/infer", body, headers)

    def predict(self, model: str, instances: list, headers: dict | None = None) -> Answer:
        return self.request("POST", f"/v1/models/{model}:predict", json.dumps({"instances": instances}).encode(), headers)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _echo(a: int) -> list[float]:
    return [a, a + 1, a + 2, a + 3]


def oip_kind(answer: Answer, model: str, rid: str, a: int, source: str = POPULAR) -> tuple[str, str]:
    """Who answered an OIP request of `Client.infer`: ("primary", ""), ("fallback", REASON), or
    ("bad", what is wrong). A fallback answer must carry the header and both parameters, keep the
    primary's model_name and the request's id, and hold fallback_popular's 42s."""
    if answer.status != 200:
        return "bad", f"HTTP {answer.short()}"
    try:
        body = answer.json()
        params = body.get("parameters") or {}
        out = body["outputs"][0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "bad", f"not an OIP response: {answer.short()}"
    marked = answer.marker is not None or "sidecar_fallback" in params
    problems = []
    if body.get("model_name") != model:
        problems.append(f"model_name {body.get('model_name')!r}, expected {model!r}")
    if body.get("id") != rid:
        problems.append(f"id {body.get('id')!r}, expected {rid!r}")
    if not marked:
        if out.get("data") != _echo(a):
            problems.append(f"unmarked answer is not the primary's echo {_echo(a)}")
        return ("bad", "; ".join(problems) + f": {answer.short()}") if problems else ("primary", "")
    reason = answer.marker
    if reason not in REASONS:
        problems.append(f"Sidecar-Fallback header {reason!r}")
    if params.get("sidecar_fallback") != reason:
        problems.append(f"parameters.sidecar_fallback {params.get('sidecar_fallback')!r} != header {reason!r}")
    if params.get("sidecar_fallback_source") != source:
        problems.append(f"parameters.sidecar_fallback_source {params.get('sidecar_fallback_source')!r}, expected {source!r}")
    if source == POPULAR and out.get("data") != [42, 42, 42, 42]:
        problems.append("fallback answer is not fallback_popular's 42s")
    return ("bad", "; ".join(problems) + f": {answer.short()}") if problems else ("fallback", reason)


# --------------------------------------------------------------------------------- gRPC client


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def grpc_request(model: str, a: int, rid: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=rid)
    x = request.inputs.add()
    x.name, x.datatype = "x", "FP32"
    x.shape.extend([1, 4])
    x.contents.fp32_contents.extend(_echo(a))
    return request


def grpc_fp32(response: service_pb2.ModelInferResponse, index: int = 0) -> list[float]:
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[index], dtype=np.float32).tolist()
    return list(response.outputs[index].contents.fp32_contents)


def grpc_params(response: service_pb2.ModelInferResponse) -> dict[str, str]:
    return {k: v.string_param for k, v in response.parameters.items()}


def grpc_kind(response, metadata: dict, model: str, rid: str, a: int, source: str = POPULAR) -> tuple[str, str]:
    """As oip_kind, for a gRPC ModelInferResponse and its initial metadata."""
    params = grpc_params(response)
    problems = []
    if response.model_name != model:
        problems.append(f"model_name {response.model_name!r}")
    if response.id != rid:
        problems.append(f"id {response.id!r}, expected {rid!r}")
    marked = "sidecar_fallback" in params or "sidecar-fallback" in metadata
    if not marked:
        if grpc_fp32(response) != _echo(a):
            problems.append(f"unmarked answer {grpc_fp32(response)} is not the primary's echo")
        return ("bad", "; ".join(problems)) if problems else ("primary", "")
    reason = params.get("sidecar_fallback")
    if reason not in REASONS:
        problems.append(f"parameters.sidecar_fallback {reason!r}")
    if metadata.get("sidecar-fallback") != reason:
        problems.append(f"initial metadata sidecar-fallback {metadata.get('sidecar-fallback')!r} != parameter {reason!r}")
    if params.get("sidecar_fallback_source") != source:
        problems.append(f"parameters.sidecar_fallback_source {params.get('sidecar_fallback_source')!r}")
    if source == POPULAR and grpc_fp32(response) != [42, 42, 42, 42]:
        problems.append(f"output {grpc_fp32(response)} is not fallback_popular's 42s")
    return ("bad", f"{'; '.join(problems)}: {response} {metadata}") if problems else ("fallback", reason)


def grpc_infer(stub, model: str, a: int, rid: str, timeout: float = REQUEST_TIMEOUT_S):
    response, call = stub.ModelInfer.with_call(grpc_request(model, a, rid), timeout=timeout)
    return response, dict(call.initial_metadata() or ())


def _report(what: str, facts: str) -> None:
    print(f"\n[{what}] {facts}", flush=True)


def _pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


_ids = itertools.count(1)


def _rid(tag: str) -> tuple[str, int]:
    n = next(_ids)
    return f"{tag}-{n}", n


# ------------------------------------------------------------------------------ healthy primary


def test_healthy_primary_answers_itself_without_a_marker(server, stub):
    server.set_mode(PRIMARY, "normal")
    count = FallbackCount(server, PRIMARY)
    client = Client(server)
    try:
        rid, a = _rid("ok")
        answer = client.infer(PRIMARY, a, rid)
        assert oip_kind(answer, PRIMARY, rid, a) == ("primary", ""), answer.short()
        assert "sidecar_fallback" not in (answer.json().get("parameters") or {}), answer.short()
        v1 = client.predict(PRIMARY, [1, "two", {"three": 3}])
        assert v1.status == 200 and v1.marker is None and v1.json() == {"predictions": [1, "two", {"three": 3}]}, v1.short()
    finally:
        client.close()
    rid, a = _rid("ok-grpc")
    response, metadata = grpc_infer(stub, PRIMARY, a, rid)
    assert grpc_kind(response, metadata, PRIMARY, rid, a) == ("primary", ""), (response, metadata)
    assert "sidecar-fallback" not in metadata, metadata
    count.check(Counter(), "(none)")


# ------------------------------------------------------------------------------- handler errors


def test_handler_error_falls_back_over_http_oip(server):
    server.set_mode(PRIMARY, "raise")
    count = FallbackCount(server, PRIMARY)
    seen: Counter = Counter()
    client = Client(server)
    try:
        for _ in range(3):
            rid, a = _rid("err")
            answer = client.infer(PRIMARY, a, rid)
            kind = oip_kind(answer, PRIMARY, rid, a)
            assert kind == ("fallback", "error"), kind
            assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
            seen["error"] += 1
        _report("error over HTTP OIP", answer.short())
    finally:
        client.close()

    # The stock client, binary tensors both ways: the fallback's answer decodes like the primary's.
    triton = httpclient.InferenceServerClient(server.http_url)
    try:
        x = httpclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[5, 6, 7, 8]], dtype=np.float32), binary_data=True)
        result = triton.infer(PRIMARY, [x], request_id="triton-http-err",
                              outputs=[httpclient.InferRequestedOutput("x", binary_data=True)])
        seen["error"] += 1
        response = result.get_response()
        assert response["model_name"] == PRIMARY and response.get("id") == "triton-http-err", response
        assert response.get("parameters", {}).get("sidecar_fallback") == "error", response
        assert response["parameters"].get("sidecar_fallback_source") == POPULAR, response
        assert result.as_numpy("x").tolist() == [[42, 42, 42, 42]], (result.as_numpy("x"), response)
    finally:
        triton.close()
        server.set_mode(PRIMARY, "normal")
    count.check(seen)


def test_handler_error_falls_back_over_kserve_v1_item_by_item(server):
    count = FallbackCount(server, PRIMARY)
    client = Client(server)
    try:
        # One item raises on its own: only it is answered by the fallback, the others by the primary.
        server.set_mode(PRIMARY, "normal")
        mixed = client.predict(PRIMARY, [1, {"raise": "this item only"}, 3])
        _report("error over KServe v1, one item of three", mixed.short())
        assert mixed.status == 200, mixed.short()
        assert mixed.json() == {"predictions": [1, {"popular": 42}, 3]}, mixed.short()
        assert mixed.marker == "error", mixed.short()

        server.set_mode(PRIMARY, "raise")
        whole = client.predict(PRIMARY, [10, 20])
        _report("error over KServe v1, every item", whole.short())
        assert whole.status == 200 and whole.marker == "error", whole.short()
        assert whole.json() == {"predictions": [{"popular": 42}, {"popular": 42}]}, whole.short()
    finally:
        client.close()
        server.set_mode(PRIMARY, "normal")
    count.check(Counter(error=2), "(2 requests: 1 item of the mixed one, both of the failing one)")


def test_handler_error_falls_back_over_grpc(server, stub):
    server.set_mode(PRIMARY, "raise")
    count = FallbackCount(server, PRIMARY)
    try:
        rid, a = _rid("grpc-err")
        response, metadata = grpc_infer(stub, PRIMARY, a, rid)
        _report("error over gRPC", f"parameters {grpc_params(response)} metadata {metadata} outputs {grpc_fp32(response)}")
        assert grpc_kind(response, metadata, PRIMARY, rid, a) == ("fallback", "error")

        # The streaming RPC: each InferResponse of the stream carries the marker in its parameters.
        rid, a = _rid("grpc-stream-err")
        streamed = list(stub.ModelStreamInfer(iter([grpc_request(PRIMARY, a, rid)]), timeout=REQUEST_TIMEOUT_S))
        assert len(streamed) == 1 and not streamed[0].error_message, streamed
        params = grpc_params(streamed[0].infer_response)
        assert params.get("sidecar_fallback") == "error" and params.get("sidecar_fallback_source") == POPULAR, streamed
        assert streamed[0].infer_response.model_name == PRIMARY and streamed[0].infer_response.id == rid, streamed
        assert grpc_fp32(streamed[0].infer_response) == [42, 42, 42, 42], streamed

        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.array([[5, 6, 7, 8]], dtype=np.float32))
            result = client.infer(PRIMARY, [x], request_id="triton-grpc-err")
            got = result.get_response()
            assert got.model_name == PRIMARY and got.id == "triton-grpc-err", got
            assert got.parameters["sidecar_fallback"].string_param == "error", got
            assert got.parameters["sidecar_fallback_source"].string_param == POPULAR, got
            assert result.as_numpy("x").tolist() == [[42, 42, 42, 42]], got
        finally:
            client.close()
    finally:
        server.set_mode(PRIMARY, "normal")
    count.check(Counter(error=3), "(ModelInfer twice, ModelStreamInfer once)")


# ---------------------------------------------------------------------- fixed response, `on:`


def test_fixed_response_fallback_and_on_limits_it(server, stub):
    server.set_mode(FIXED, "raise")
    count = FallbackCount(server, FIXED)
    client = Client(server)
    try:
        rid, a = _rid("fixed")
        answer = client.infer(FIXED, a, rid)
        _report("fixed response over HTTP OIP", answer.short())
        assert answer.status == 200 and answer.marker == "error", answer.short()
        body = answer.json()
        assert body["model_name"] == FIXED and body.get("id") == rid, body
        assert body.get("parameters", {}).get("sidecar_fallback") == "error", body
        assert body["parameters"].get("sidecar_fallback_source") == "response", body
        assert [{k: o[k] for k in ("name", "datatype", "shape", "data")} for o in body["outputs"]] == \
            FIXED_RESPONSE["outputs"], body

        rid, a = _rid("fixed-grpc")
        response, metadata = grpc_infer(stub, FIXED, a, rid)
        assert grpc_params(response).get("sidecar_fallback") == "error", (response, metadata)
        assert grpc_params(response).get("sidecar_fallback_source") == "response", response
        assert metadata.get("sidecar-fallback") == "error", metadata
        assert response.model_name == FIXED and response.id == rid, response
        out = response.outputs[0]
        assert (out.name, out.datatype, list(out.shape)) == ("fixed", "INT64", [3]), response
        data = (np.frombuffer(response.raw_output_contents[0], dtype=np.int64).tolist() if response.raw_output_contents
                else list(out.contents.int64_contents))
        assert data == [1, 2, 3], response

        # KServe v1 (JSON items): the configured value itself, per item.
        v1 = client.predict(FIXED, [1, 2])
        _report("fixed response over KServe v1", v1.short())
        assert v1.status == 200 and v1.marker == "error", v1.short()
        assert v1.json() == {"predictions": [FIXED_RESPONSE, FIXED_RESPONSE]}, v1.short()

        # `on: [error, unavailable]`: a deadline that passes is not covered, the caller gets its 504.
        server.set_mode(FIXED, "sleep 400")
        rid, a = _rid("fixed-deadline")
        late = client.infer(FIXED, a, rid, {"Sidecar-Timeout-Ms": "100"})
        _report("fixed, deadline not in `on`", late.short())
        assert late.status == 504 and late.marker is None, late.short()
    finally:
        client.close()
        server.set_mode(FIXED, "normal")
    count.check(Counter(error=3), "(HTTP OIP, gRPC, one v1 request of 2 items)")


def test_request_deadline_falls_back_with_timeout(server):
    server.set_mode(PRIMARY, "sleep 600")
    count = FallbackCount(server, PRIMARY)
    client = Client(server)
    try:
        rid, a = _rid("deadline")
        answer = client.infer(PRIMARY, a, rid, {"Sidecar-Timeout-Ms": "150"})
        _report("request deadline 150 ms, primary 600 ms", answer.short())
        assert oip_kind(answer, PRIMARY, rid, a) == ("fallback", "timeout")
        assert answer.seconds < 0.5, f"the fallback came after {answer.seconds:.3f} s (deadline 150 ms, primary 600 ms)"
    finally:
        client.close()
        server.set_mode(PRIMARY, "normal")
    count.check(Counter(timeout=1))
    time.sleep(0.7)  # the slow batch finishes before another test uses the primary


# ---------------------------------------------------------------------------------- queue full


def _http_burst(server: Server, n: int, send) -> list:
    """n keep-alive connections opened first, then one request each, all at once."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        client = Client(server)
        try:
            client.connect()
            barrier.wait(10)
            results[i] = send(client, i)
        except Exception as error:  # noqa: BLE001 - reported as the request's outcome
            results[i] = error
        finally:
            client.close()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_queue_full_is_answered_by_the_fallback_not_429(server, stub):
    server.set_mode(QUEUE, "sleep 400")
    count = FallbackCount(server, QUEUE)
    seen: Counter = Counter()
    facts = []
    try:
        # HTTP OIP: 12 at once for 1 worker slot and 2 places in the queue.
        n = 12
        sent = [_rid("burst") for _ in range(n)]
        answers = _http_burst(server, n, lambda client, i: client.infer(QUEUE, sent[i][1], sent[i][0]))
        kinds = [oip_kind(a, QUEUE, *sent[i]) if isinstance(a, Answer) else ("bad", repr(a)) for i, a in enumerate(answers)]
        by = Counter(k if k != "fallback" else f"fallback:{r}" for k, r in kinds)
        fallback_s = [a.seconds for a, (k, _) in zip(answers, kinds) if k == "fallback"]
        primary_s = [a.seconds for a, (k, _) in zip(answers, kinds) if k == "primary"]
        facts.append(f"HTTP OIP burst of {n}: {dict(by)}; fallback answers in "
                     f"{[round(s * 1000) for s in sorted(fallback_s)]} ms, primary in {[round(s * 1000) for s in sorted(primary_s)]} ms")
        assert [d for k, d in kinds if k == "bad"] == [], facts
        assert by["primary"] >= 1 and by["fallback:queue_full"] >= n - 6 and set(by) <= {"primary", "fallback:queue_full"}, facts
        assert max(fallback_s) < 1.0, f"queue_full fallbacks waited: {facts}"
        seen["queue_full"] += by["fallback:queue_full"]
        time.sleep(0.4 * by["primary"] + 0.5)  # what was accepted drains

        # KServe v1: the same, JSON items.
        n = 8
        answers = _http_burst(server, n, lambda client, i: client.predict(QUEUE, [1000 + i]))
        v1 = Counter()
        for i, a in enumerate(answers):
            if not isinstance(a, Answer) or a.status != 200:
                v1[f"bad {a.short() if isinstance(a, Answer) else repr(a)}"] += 1
            elif a.marker is None and a.json() == {"predictions": [1000 + i]}:
                v1["primary"] += 1
            elif a.marker == "queue_full" and a.json() == {"predictions": [{"popular": 42}]}:
                v1["fallback:queue_full"] += 1
            else:
                v1[f"bad {a.short()}"] += 1
        facts.append(f"KServe v1 burst of {n}: {dict(v1)}")
        assert set(v1) <= {"primary", "fallback:queue_full"} and v1["fallback:queue_full"] >= n - 6, facts
        seen["queue_full"] += v1["fallback:queue_full"]
        time.sleep(0.4 * v1["primary"] + 0.5)

        # gRPC: 10 calls in flight at once.
        n = 10
        sent = [_rid("gburst") for _ in range(n)]
        futures = [stub.ModelInfer.future(grpc_request(QUEUE, a, rid), timeout=REQUEST_TIMEOUT_S) for rid, a in sent]
        g = Counter()
        for future, (rid, a) in zip(futures, sent):
            try:
                response = future.result()
                kind, reason = grpc_kind(response, dict(future.initial_metadata() or ()), QUEUE, rid, a)
                g[kind if kind != "fallback" else f"fallback:{reason}"] += 1
                if kind == "bad":
                    facts.append(f"bad gRPC answer: {reason}")
            except grpc.RpcError as error:
                g[f"{error.code()} {error.details()}"] += 1
        facts.append(f"gRPC burst of {n}: {dict(g)}")
        assert set(g) <= {"primary", "fallback:queue_full"} and g["fallback:queue_full"] >= n - 6, facts
        seen["queue_full"] += g["fallback:queue_full"]
    finally:
        _report("queue_full", "; ".join(facts))
        server.set_mode(QUEUE, "normal")
    count.check(seen)


# ------------------------------------------------------------------------------ latency budget


def test_latency_budget_answers_from_the_fallback_after_ms(server, stub):
    count = FallbackCount(server, BUDGET)
    client = Client(server)
    seen: Counter = Counter()
    try:
        server.set_mode(BUDGET, "normal")
        # A primary that answers within its budget answers itself. (A debug build on two busy cores
        # may miss 50 ms now and then: the budget then fires, never sooner than 50 ms.)
        quick = []
        for _ in range(20):
            rid, a = _rid("budget-ok")
            answer = client.infer(BUDGET, a, rid)
            kind = oip_kind(answer, BUDGET, rid, a)
            assert kind in (("primary", ""), ("fallback", "timeout")), kind
            if kind[0] == "fallback":
                seen["timeout"] += 1
                assert answer.seconds >= BUDGET_MS / 1000 * 0.9, f"the budget fired early: {answer.short()}"
            quick.append((kind[0], answer.seconds))
            if sum(1 for k, _ in quick if k == "primary") >= 5:
                break
        assert any(k == "primary" for k, _ in quick), f"the fast primary never answered within its budget: {quick}"

        server.set_mode(BUDGET, "sleep 500")
        seconds = []
        for _ in range(30):
            rid, a = _rid("budget")
            answer = client.infer(BUDGET, a, rid)
            assert oip_kind(answer, BUDGET, rid, a) == ("fallback", "timeout"), answer.short()
            seconds.append(answer.seconds)
            seen["timeout"] += 1
        rid, a = _rid("budget-grpc")
        started = time.monotonic()
        response, metadata = grpc_infer(stub, BUDGET, a, rid)
        grpc_s = time.monotonic() - started
        assert grpc_kind(response, metadata, BUDGET, rid, a) == ("fallback", "timeout"), (response, metadata)
        seen["timeout"] += 1
        facts = (f"after_ms {BUDGET_MS}, primary 500 ms: the caller saw p50 {_pctl(seconds, .5) * 1000:.1f} ms, "
                 f"p99 {_pctl(seconds, .99) * 1000:.1f} ms, min {min(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms "
                 f"over {len(seconds)} requests (HTTP); gRPC {grpc_s * 1000:.1f} ms; the primary alone, "
                 f"unslowed: p50 {_pctl([s for _, s in quick], .5) * 1000:.1f} ms")
        _report("latency budget", facts)
        assert min(seconds) >= BUDGET_MS / 1000 * 0.9, f"answered before the budget ran out: {facts}"
        assert _pctl(seconds, .5) < 0.15, facts
        assert _pctl(seconds, .99) < 0.45, facts  # the primary alone would take >= 500 ms
        assert grpc_s < 0.45, facts

        # The primary recovered: its own answers again, once its slow backlog is through.
        server.set_mode(BUDGET, "normal")
        time.sleep(1.2)
        back = []
        for _ in range(20):
            rid, a = _rid("budget-back")
            answer = client.infer(BUDGET, a, rid)
            kind = oip_kind(answer, BUDGET, rid, a)
            assert kind in (("primary", ""), ("fallback", "timeout")), kind
            back.append(kind[0])
            if kind[0] == "primary":
                break
            seen["timeout"] += 1
            time.sleep(0.1)
        assert back[-1] == "primary", f"the primary did not answer again once fast: {back}"
    finally:
        client.close()
        server.set_mode(BUDGET, "normal")
    count.check(seen)


# ------------------------------------------------------------------------------------ breaker


def _breaker_state_metric(server: FallbackServer, model: str) -> float | None:
    return _metric(server.metrics(), "sidecar_breaker_state", model=model)


def _wait_state(server: FallbackServer, model: str, state: str, timeout: float) -> dict:
    return wait_for(lambda: (lambda b: b if b.get("state") == state else None)(server.breaker(model)), timeout, 0.05)


def _cool_down(server: FallbackServer, model: str, opened_at: float, facts: list[str], deviations: list[str]) -> None:
    """Waits out cool_down_s after the breaker opened at `opened_at`: /status must show half_open
    (and the metric 1) by then, without a request needed to notice. If it does not, that is noted
    as a deviation from the spec and the test goes on (the next request is then the probe)."""
    half = _wait_state(server, model, "half_open", BREAKER_COOL_DOWN_S + 3)
    waited = time.monotonic() - opened_at
    if half:
        facts.append(f"half_open {waited:.2f} s after it opened: {half}")
        if waited < BREAKER_COOL_DOWN_S - 0.3:
            deviations.append(f"{model}: half_open {waited:.2f} s after opening, before cool_down_s {BREAKER_COOL_DOWN_S}")
        state = _breaker_state_metric(server, model)
        if state != 1:
            deviations.append(f"{model}: sidecar_breaker_state {state} while /status says half_open (expected 1)")
    else:
        now = server.breaker(model)
        deviations.append(f"{model}: /status breaker still {now} {waited:.1f} s after it opened (cool_down_s "
                          f"{BREAKER_COOL_DOWN_S}): expected state half_open once the cool-down is over; "
                          f"sidecar_breaker_state {_breaker_state_metric(server, model)} (expected 1)")
        facts.append(f"no half_open in /status after {waited:.1f} s: {now}")


def test_breaker_opens_bypasses_the_primary_half_opens_and_closes(server):
    log_start = len(server.full_log())
    count = FallbackCount(server, BREAKER)
    seen: Counter = Counter()
    client = Client(server)
    facts: list[str] = []
    deviations: list[str] = []  # broken expectations that do not stop the scenario; asserted at the end
    try:
        breaker = server.breaker(BREAKER)
        assert breaker.get("state") == "closed", breaker
        assert _breaker_state_metric(server, BREAKER) == 0, server.metrics()[-2000:]

        # Every request fails: the breaker opens once min_requests have been seen.
        server.set_mode(BREAKER, "raise")
        failures = 0
        opened_at = None
        for _ in range(3 * BREAKER_MIN_REQUESTS):
            rid, a = _rid("brk")
            answer = client.infer(BREAKER, a, rid)
            kind = oip_kind(answer, BREAKER, rid, a)
            assert kind in (("fallback", "error"), ("fallback", "breaker_open")), kind
            seen[kind[1]] += 1
            if kind[1] == "breaker_open":
                opened_at = time.monotonic()
                break
            failures += 1
        facts.append(f"{failures} errors before the first breaker_open")
        assert opened_at is not None, f"the breaker never opened: {facts}; /status {server.breaker(BREAKER)}"
        assert failures == BREAKER_MIN_REQUESTS, (
            f"with every request failing, the breaker should open after exactly min_requests "
            f"({BREAKER_MIN_REQUESTS}) of them: {facts}")
        breaker = server.breaker(BREAKER)
        facts.append(f"open: /status breaker {breaker}")
        assert breaker.get("state") == "open", facts
        assert breaker.get("failures") == BREAKER_MIN_REQUESTS and breaker.get("requests") == BREAKER_MIN_REQUESTS, facts
        if "opened_at" not in breaker:
            deviations.append(f"/status models[].breaker has no opened_at (the spec lists state, failures, "
                              f"requests, opened_at): {breaker}")
        assert _breaker_state_metric(server, BREAKER) == 2, facts

        # Open: straight to the fallback, nothing reaches the handler.
        calls = server.calls(BREAKER)
        bypass = []
        for _ in range(5):
            rid, a = _rid("brk-open")
            answer = client.infer(BREAKER, a, rid)
            assert oip_kind(answer, BREAKER, rid, a) == ("fallback", "breaker_open"), answer.short()
            bypass.append(answer.seconds)
            seen["breaker_open"] += 1
        v1 = client.predict(BREAKER, [7])
        assert v1.status == 200 and v1.marker == "breaker_open" and v1.json() == {"predictions": [{"popular": 42}]}, v1.short()
        seen["breaker_open"] += 1
        time.sleep(0.2)
        assert server.calls(BREAKER) == calls, f"{server.calls(BREAKER) - calls} item(s) reached the primary while open"
        facts.append(f"open bypass answers in {[round(s * 1000) for s in bypass]} ms")

        # After cool_down_s: half-open.
        _cool_down(server, BREAKER, opened_at, facts, deviations)

        # A probe that fails reaches the primary, is answered by the fallback, and opens it again.
        calls = server.calls(BREAKER)
        rid, a = _rid("brk-probe-fail")
        answer = client.infer(BREAKER, a, rid)
        assert oip_kind(answer, BREAKER, rid, a) == ("fallback", "error"), answer.short()
        seen["error"] += 1
        assert server.calls(BREAKER) == calls + 1, "the probe did not reach the primary"
        reopened = server.breaker(BREAKER)
        facts.append(f"after a failed probe: {reopened}")
        assert reopened.get("state") == "open", facts
        reopened_at = time.monotonic()
        rid, a = _rid("brk-reopened")
        answer = client.infer(BREAKER, a, rid)
        assert oip_kind(answer, BREAKER, rid, a) == ("fallback", "breaker_open"), answer.short()
        seen["breaker_open"] += 1

        # Half-open again; the primary has recovered: `probes` successes close it.
        _cool_down(server, BREAKER, reopened_at, facts, deviations)
        server.set_mode(BREAKER, "normal")
        calls = server.calls(BREAKER)
        for i in range(BREAKER_PROBES):
            rid, a = _rid("brk-probe-ok")
            answer = client.infer(BREAKER, a, rid)
            assert oip_kind(answer, BREAKER, rid, a) == ("primary", ""), answer.short()
            state = server.breaker(BREAKER).get("state")
            expected = "closed" if i == BREAKER_PROBES - 1 else "half_open"
            assert state == expected, f"after {i + 1} successful probe(s) of {BREAKER_PROBES}: {state}, expected {expected}"
        assert server.calls(BREAKER) == calls + BREAKER_PROBES
        assert _breaker_state_metric(server, BREAKER) == 0, facts
        for _ in range(3):
            rid, a = _rid("brk-closed")
            assert oip_kind(client.infer(BREAKER, a, rid), BREAKER, rid, a) == ("primary", "")
    finally:
        _report("breaker", "; ".join(facts))
        client.close()
        server.set_mode(BREAKER, "normal")
    count.check(seen)

    # A log line on each transition: closed->open, open->half_open, half_open->open, open->half_open,
    # half_open->closed.
    lines = [line for line in server.full_log()[log_start:].splitlines()
             if BREAKER in line and "breaker" in line.replace(BREAKER, "")]
    _report("breaker log", "\n".join(lines))
    if len(lines) < 5:
        deviations.append(f"expected a log line per transition (5), found {len(lines)}: {lines}")
    assert deviations == [], "\n".join(deviations)


def _status_column(server, model: str, column: str) -> str:
    """`sidecar status` against the server's admin API: the model's cell in `column`."""
    done = subprocess.run([SIDECAR_BIN, "status", "--server", f"http://127.0.0.1:{server.admin_port}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    row = next((re.split(r"\s{2,}", line.strip()) for line in lines[1:] if line.split()[0] == model), None)
    assert row is not None, done.stdout
    return row[header.index(column)]


def test_breaker_without_fallback_refuses_503_and_unavailable(server, stub):
    count = FallbackCount(server, BREAKER_ONLY)
    client = Client(server)
    deviations: list[str] = []
    facts: list[str] = []
    try:
        server.set_mode(BREAKER_ONLY, "raise")
        errors = []
        refusal = None
        for _ in range(3 * BREAKER_MIN_REQUESTS):
            rid, a = _rid("only")
            answer = client.infer(BREAKER_ONLY, a, rid)
            if answer.status == 503:
                refusal = answer
                break
            assert answer.status == 500 and answer.marker is None, answer.short()
            errors.append(answer)
        opened_at = time.monotonic()
        _report("breaker without fallback",
                f"{len(errors)} x 500 then {refusal.short() if refusal else None}; /status {server.breaker(BREAKER_ONLY)}")
        assert refusal is not None, f"never refused: {len(errors)} errors; /status {server.breaker(BREAKER_ONLY)}"
        assert len(errors) == BREAKER_MIN_REQUESTS, len(errors)
        retry_after = refusal.headers.get("retry-after", "")
        assert retry_after.isdigit() and 1 <= int(retry_after) <= BREAKER_COOL_DOWN_S + 1, refusal.short()
        assert refusal.marker is None, refusal.short()
        assert refusal.headers.get("content-type", "").startswith("application/json"), refusal.short()
        message = refusal.json().get("error", "")
        assert "breaker" in message.lower() and BREAKER_ONLY in message, refusal.short()
        assert server.breaker(BREAKER_ONLY).get("state") == "open"
        assert _breaker_state_metric(server, BREAKER_ONLY) == 2
        column = _status_column(server, BREAKER_ONLY, "BREAKER")
        assert column.startswith("open"), f"sidecar status BREAKER for {BREAKER_ONLY}: {column!r}"

        calls = server.calls(BREAKER_ONLY)
        v1 = client.predict(BREAKER_ONLY, [1])
        assert v1.status == 503 and v1.headers.get("retry-after", "").isdigit(), v1.short()
        rid, a = _rid("only-grpc")
        with pytest.raises(grpc.RpcError) as caught:
            grpc_infer(stub, BREAKER_ONLY, a, rid)
        error = caught.value
        _report("breaker without fallback, gRPC", f"{error.code()} {error.details()!r}")
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        assert "breaker" in (error.details() or "").lower(), error.details()
        time.sleep(0.2)
        assert server.calls(BREAKER_ONLY) == calls, "requests reached the primary while the breaker was open"

        # It recovers like the other: half-open after cool_down_s, probes close it.
        _cool_down(server, BREAKER_ONLY, opened_at, facts, deviations)
        server.set_mode(BREAKER_ONLY, "normal")
        for _ in range(BREAKER_PROBES + 1):
            rid, a = _rid("only-back")
            answer = client.infer(BREAKER_ONLY, a, rid)
            assert answer.status == 200 and answer.json()["outputs"][0]["data"] == _echo(a), answer.short()
        assert server.breaker(BREAKER_ONLY).get("state") == "closed", server.breaker(BREAKER_ONLY)
    finally:
        _report("breaker without fallback, recovery", "; ".join(facts))
        client.close()
        server.set_mode(BREAKER_ONLY, "normal")
    count.check(Counter(), "(a model without a fallback counts none)")
    assert deviations == [], "\n".join(deviations)


# ------------------------------------------------------------------ killed workers, FAILED model


def _live_workers(server: FallbackServer, model: str) -> list[int]:
    """pids of the model's workers that /status shows up, checked against the process table: a
    live `sidecar_worker` child of this server serving this model (pids are recycled)."""
    pids = []
    for worker in server.model_status(model).get("workers", []):
        pid = worker.get("pid")
        if not pid or worker.get("state") not in ("ready", "busy"):
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == server.process.pid and "sidecar_worker" in args and "--model-name" in args \
                and args[args.index("--model-name") + 1] == model:
            pids.append(pid)
    return pids


@dataclass
class Outcome:
    sent_at: float
    seconds: float
    kind: str
    detail: str


@dataclass
class KillLoad:
    """`threads` sequential keep-alive clients on one model until stopped; every answer classified."""
    server: FallbackServer
    model: str
    threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._run, args=(i,)) for i in range(self.threads)]

    def _run(self, index: int) -> None:
        client = Client(self.server)
        while not self.stop.is_set():
            rid, a = _rid(f"kill{index}")
            try:
                answer = client.infer(self.model, a, rid)
                kind, detail = oip_kind(answer, self.model, rid, a)
                outcome = Outcome(answer.sent_at, answer.seconds, kind, detail)
            except (OSError, http.client.HTTPException) as error:
                outcome = Outcome(time.monotonic(), 0, "bad", f"no answer: {error!r}")
            with self.lock:
                self.outcomes.append(outcome)
            time.sleep(0.01)
        client.close()

    def __enter__(self):
        for t in self.workers:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.workers:
            t.join(REQUEST_TIMEOUT_S + 5)


def test_killed_workers_and_a_failed_model_fall_back_unavailable(server, stub):
    model = KILLABLE
    server.set_mode(model, "sleep 20")
    count = FallbackCount(server, model)
    facts: list[str] = []
    extra: Counter = Counter()
    with KillLoad(server, model) as load:
        time.sleep(1.0)
        # Phase A: both workers killed; their replacements take 2 s to load.
        (server.dirs[model] / "slowstart").write_text("2\n")
        pids = _live_workers(server, model)
        assert len(pids) == 2, server.model_status(model)
        killed_at = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        back = wait_for(lambda: len(_live_workers(server, model)) == 2, 30, 0.1)
        back_at = time.monotonic()
        (server.dirs[model] / "slowstart").unlink()
        facts.append(f"phase A: killed {pids}, both replaced after {back_at - killed_at:.1f} s ({back})")
        assert back, f"workers not back: {server.model_status(model)}"
        time.sleep(1.0)

        # Phase B: restarts fail to import; the crash-loop breaker marks the model FAILED.
        (server.dirs[model] / "BROKEN").write_text("restarts fail\n")
        broken_at = time.monotonic()
        for pid in _live_workers(server, model):
            os.kill(pid, signal.SIGKILL)
        failed = wait_for(lambda: server.model_status(model).get("state") == "failed", 30, 0.1)
        failed_at = time.monotonic()
        facts.append(f"phase B: FAILED {failed_at - broken_at:.1f} s after BROKEN + kills ({failed}): "
                     f"{server.model_status(model).get('reason')!r}")
        assert failed, f"not FAILED: {server.model_status(model)}"
        time.sleep(1.5)
    outcomes = sorted(load.outcomes, key=lambda o: o.sent_at)

    ready_code, _ = server.get(f"/v2/models/{model}/ready")
    client = Client(server)
    try:
        rid, a = _rid("failed")
        answer = client.infer(model, a, rid)
        after_kind = oip_kind(answer, model, rid, a)
        extra[after_kind[1]] += after_kind[0] == "fallback"
        v1 = client.predict(model, [1, 2])
        extra["unavailable"] += v1.marker == "unavailable"
    finally:
        client.close()
    rid, a = _rid("failed-grpc")
    response, metadata = grpc_infer(stub, model, a, rid)
    grpc_after = grpc_kind(response, metadata, model, rid, a)
    extra[grpc_after[1]] += grpc_after[0] == "fallback"

    def tally(selected: list[Outcome]) -> dict:
        return dict(Counter(o.kind if o.kind != "fallback" else f"fallback:{o.detail}" for o in selected))
    # In flight at some point while no worker was up (sent before the replacements were ready,
    # answered after the kill).
    phase_a = [o for o in outcomes if o.sent_at < back_at and o.sent_at + o.seconds > killed_at]
    during_failed = [o for o in outcomes if o.sent_at >= failed_at + 0.1]
    a_fallback = [o.seconds for o in phase_a if o.kind == "fallback"]
    a_primary = [o.seconds for o in phase_a if o.kind == "primary"]
    facts += [f"{len(outcomes)} requests under load: {tally(outcomes)}",
              f"in flight while no worker was up (phase A, {back_at - killed_at:.1f} s): {tally(phase_a)}, fallback answers "
              f"p50 {_pctl(a_fallback, .5) * 1000 if a_fallback else float('nan'):.0f} ms, primary answers max "
              f"{max(a_primary) * 1000 if a_primary else float('nan'):.0f} ms",
              f"sent once FAILED: {tally(during_failed)}",
              f"after: ready {ready_code}, HTTP OIP {after_kind}, v1 {v1.short()}, gRPC {grpc_after}"]
    _report("killed workers / FAILED", "\n  ".join(facts))
    bad = [o for o in outcomes if o.kind == "bad"]
    assert bad == [], f"{len(bad)} requests not answered by the primary or the fallback: {bad[:5]}\n" + "\n".join(facts) \
        + f"\n--- log ---\n{server.log()[-4000:]}"
    assert {o.detail for o in outcomes if o.kind == "fallback"} <= {"unavailable"}, facts
    assert len(during_failed) >= 5 and all(o.kind == "fallback" and o.detail == "unavailable" for o in during_failed), facts
    assert ready_code == 503, facts
    assert after_kind == ("fallback", "unavailable"), facts
    assert v1.status == 200 and v1.marker == "unavailable" and v1.json() == {"predictions": [{"popular": 42}] * 2}, facts
    assert grpc_after == ("fallback", "unavailable"), facts
    count.check(Counter(o.detail for o in outcomes if o.kind == "fallback") + extra)


# ------------------------------------------------------------------------- bad configuration


POPULAR_HANDLER = (MODELS / POPULAR / "handler.py").read_text()

# name -> ({directory: sidecar.yaml text}, what the output must name, expected exit code or None for any non-zero)
BAD_CONFIGS = {
    "fallback_model_not_loaded": ({"cfg_a": "name: cfg_a\nfallback:\n  model: cfg_nowhere\n"},
                                  ["fallback.model", "cfg_nowhere"], None),
    "fallback_cycle": ({"cfg_a": "name: cfg_a\nfallback:\n  model: cfg_b\n",
                        "cfg_b": "name: cfg_b\nfallback:\n  model: cfg_a\n"}, ["fallback.model"], None),
    "fallback_to_itself": ({"cfg_a": "name: cfg_a\nfallback:\n  model: cfg_a\n"}, ["fallback.model"], None),
    "fallback_unknown_key": ({"cfg_a": "name: cfg_a\nfallback:\n  model: cfg_b\n  colour: red\n",
                              "cfg_b": "name: cfg_b\n"}, ["fallback", "colour"], 2),
    "fallback_bad_on": ({"cfg_a": "name: cfg_a\nfallback:\n  model: cfg_b\n  on: [sometimes]\n",
                         "cfg_b": "name: cfg_b\n"}, ["fallback.on", "sometimes"], 2),
    "breaker_unknown_key": ({"cfg_a": "name: cfg_a\nbreaker:\n  failure_rate: 0.5\n  colour: red\n"},
                            ["breaker", "colour"], 2),
}


@pytest.fixture(scope="module")
def refusals():
    """Every BAD_CONFIGS case served at once, each by its own `sidecar serve`: name -> (exit code or
    None if it kept running, output, whether it ever answered ready)."""
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-fallback-config-"))
    started = {}
    for case, (models, _, _) in BAD_CONFIGS.items():
        dirs = []
        for name, yaml in models.items():
            d = tmp / case / name
            d.mkdir(parents=True)
            (d / "handler.py").write_text(POPULAR_HANDLER)
            (d / "sidecar.yaml").write_text(yaml)
            dirs.append(d)
        port, grpc_port = _free_port(), _free_port()
        log = open(tmp / case / "out.log", "wb")
        process = subprocess.Popen([SIDECAR_BIN, "serve", *map(str, dirs), "--http-port", str(port), "--grpc-port",
                                    str(grpc_port), "--no-admin", "--cache-dir", CACHE_DIR, "--log-level", "warning"],
                                   stdout=log, stderr=subprocess.STDOUT)
        started[case] = (process, log, port)
    results = {}
    deadline = time.monotonic() + 120
    for case, (process, log, port) in started.items():
        was_ready = False
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                    was_ready = was_ready or r.status == 200
            except (urllib.error.URLError, OSError):
                pass
            if was_ready:  # served: give it a moment to refuse late, then it has accepted the configuration
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                break
            time.sleep(0.2)
        code = process.poll()
        if code is None:
            process.kill()
            process.wait()
        log.close()
        results[case] = (code, (tmp / case / "out.log").read_text(errors="replace"), was_ready)
    yield results
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_is_refused_at_load_naming_the_key(refusals, case):
    code, output, was_ready = refusals[case]
    _, names, expected_code = BAD_CONFIGS[case]
    _report(f"refused: {case}", f"exit {code}, ready {was_ready}; output:\n{output[-1500:]}")
    assert code is not None, f"{case}: `sidecar serve` kept serving (ready {was_ready}) instead of refusing:\n{output[-2000:]}"
    assert code != 0, f"{case}: exit 0:\n{output[-2000:]}"
    if expected_code is not None:
        assert code == expected_code, f"{case}: exit {code}, expected {expected_code} (a bad sidecar.yaml):\n{output[-2000:]}"
    for name in names:
        assert name in output, f"{case}: the output does not name {name!r}:\n{output[-2000:]}"
