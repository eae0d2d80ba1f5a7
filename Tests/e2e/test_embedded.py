"""The embedded executor end to end (`executor: embedded`: the handler runs in the server's own CPython
interpreter, one thread per model): real `sidecar serve` processes, real sockets, stock clients.

- Same answers: embedded echo and embedded iris (models/embedded_echo, models/embedded_iris: a
  sidecar.yaml with `executor: embedded` beside the handler.py of Examples/echo and Examples/iris,
  copied in at test time) answer what Examples/echo and
  Examples/iris answer with process workers, over tritonclient.http (binary and JSON tensors),
  tritonclient.grpc and KServe v1 JSON (curl, urllib); /status says "embedded" and names the
  server's own pid as the worker's; what the handler logs while loading is in the server log at
  start, as with process workers.
- A segfault takes the server down (models/embedded_crash, under a unique name): the next start finds
  the crash record, serves the model with process workers and says why (log, /status
  executor_note); `sidecar reload` runs it embedded again, and the start after that is embedded too.
  The crash's faulthandler log survives another embedded server starting on the same cache directory.
- SIGTERM drains an embedded model (models/embedded_slow, 0.5 s per batch): every request accepted
  before the signal is answered, and the server exits 0.

Every test starts its own servers (the session `server` fixture of conftest.py is not used). One server
holds one embedded interpreter, built on one environment, so embedded echo (no requirements) and
embedded iris (scikit-learn) run in different servers. Environment: SIDECAR_BIN, SIDECAR_CACHE_DIR
(as for conftest.py).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from conftest import CACHE_DIR, HERE, READY_TIMEOUT_S, REPO, SIDECAR_BIN, STOP_TIMEOUT_S, Server, _free_port, _ready

MODELS = HERE / "models"
EMBEDDED_DIR = Path(CACHE_DIR) / "embedded"  # crash records and fault logs (CrashRecord.swift)
TOKEN = "e2e-embedded-admin-token"
NON_ASCII = ["héllo wörld".encode(), "日本語 ✓ 🚀".encode(), b""]
INSTANCES = [1, 2.5, -3, "text", "日本語", True, False, None, {"a": [1, {"b": "c"}], "n": None}, [1, "x", [2.0]], "", [], {}]
FLOWERS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [6.3, 3.3, 6.0, 2.5], [4.9, 3.0, 1.4, 0.2]]
CRASH_NOTE = "the embedded executor took the server down"
LOAD_LOG = "trained on 150 flowers"  # Examples/iris/handler.py logs it with context.logger in __init__


# ------------------------------------------------------------------------------------------ servers


@dataclass
class Served(Server):
    """A `sidecar serve` child of one test (conftest's Server, plus its admin port when it has one)."""

    admin_port: int | None = None
    log_file: object = None
    log_at_ready: str = ""  # the log shortly after ready, before any test sent a request

    @property
    def pid(self) -> int:
        return self.process.pid


def launch(models: list[Path], workdir: Path, log_name: str = "sidecar.log", token_file: Path | None = None) -> Served:
    """Starts `sidecar serve MODELS` on free ports (admin API off unless `token_file`); see wait_ready."""
    if not (os.path.isfile(SIDECAR_BIN) and os.access(SIDECAR_BIN, os.X_OK)):
        pytest.fail(f"sidecar binary not found or not executable: {SIDECAR_BIN} (set SIDECAR_BIN)")
    ports: list[int] = []
    while len(ports) < 3:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    http_port, grpc_port, admin_port = ports
    command = [SIDECAR_BIN, "serve", *map(str, models), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
               "--cache-dir", CACHE_DIR, "--log-level", "info"]
    if token_file is None:
        command.append("--no-admin")
    else:
        command += ["--admin-port", str(admin_port), "--admin-token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_ADMIN_TOKEN"}
    log_path = workdir / log_name
    log_file = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    return Served(http_port, grpc_port, process, log_path, admin_port if token_file else None, log_file)


def wait_ready(*servers: Served) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = list(servers)
    while waiting:
        for srv in list(waiting):
            code = srv.process.poll()
            if code is not None:
                pytest.fail(f"sidecar serve exited with {code} before ready: {srv.process.args}\n--- log ---\n{srv.log()}")
            if _ready(srv.base):
                waiting.remove(srv)
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"sidecar serve not ready after {READY_TIMEOUT_S} s\n--- log ---\n{waiting[0].log()}")
        if waiting:
            time.sleep(0.2)


def stop(srv: Served) -> int:
    """SIGTERM (SIGKILL past STOP_TIMEOUT_S, then the test fails); the exit code."""
    try:
        if srv.process.poll() is None:
            srv.process.send_signal(signal.SIGTERM)
            try:
                srv.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                srv.process.kill()
                srv.process.wait()
                pytest.fail(f"sidecar serve did not stop within {STOP_TIMEOUT_S} s of SIGTERM\n--- log ---\n{srv.log()}")
        return srv.process.returncode
    finally:
        if srv.process.poll() is not None:
            # A server that ran an embedded model leaves an empty faults-<pid>.log (one with a crash in
            # it is evidence: the crash tests read it, then remove it themselves).
            fault_log = EMBEDDED_DIR / f"faults-{srv.pid}.log"
            try:
                if fault_log.stat().st_size == 0:
                    fault_log.unlink()
            except OSError:
                pass
        if srv.log_file is not None:
            srv.log_file.close()
            srv.log_file = None


def stop_cleanly(srv: Served) -> None:
    code = stop(srv)
    assert code == 0, f"sidecar serve exit code {code} after SIGTERM (expected 0)\n--- log ---\n{srv.log()}"


def get_json(srv: Served, path: str, timeout: float = 10.0):
    with urllib.request.urlopen(srv.base + path, timeout=timeout) as response:
        return json.loads(response.read())


def model_status(srv: Served, name: str) -> dict:
    models = {m["name"]: m for m in get_json(srv, "/status")["models"]}
    assert name in models, (name, models)
    return models[name]


def v1_predict(srv: Served, model: str, instances: list, timeout: float = 30.0) -> tuple[int, object]:
    """(status, parsed body) of POST /v1/models/MODEL:predict via urllib."""
    request = urllib.request.Request(f"{srv.base}/v1/models/{model}:predict", data=json.dumps({"instances": instances}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def curl_predict(srv: Served, model: str, instances: list) -> tuple[str, str]:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed")
    proc = subprocess.run([path, "-sS", "--max-time", "20", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                           "-d", json.dumps({"instances": instances}), f"{srv.base}/v1/models/{model}:predict"],
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.decode().rpartition("\n")
    return code, body


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                found.add(int(entry))
    return found


def assert_embedded(srv: Served, name: str) -> dict:
    status = model_status(srv, name)
    assert status["state"] == "ready", status
    assert status["executor"] == "embedded", status
    assert CRASH_NOTE not in (status["executor_note"] or ""), status
    assert len(status["workers"]) == 1, status
    assert status["workers"][0]["pid"] == srv.pid, (f"server pid {srv.pid}", status)
    return status


def assert_process_workers(srv: Served, name: str) -> dict:
    status = model_status(srv, name)
    assert status["state"] == "ready", status
    assert status["executor"] == "process", status
    pids = [w["pid"] for w in status["workers"]]
    assert pids and all(pids), status
    assert srv.pid not in pids, (f"server pid {srv.pid}", status)
    assert set(pids) <= children_of(srv.pid), (f"workers {pids} are not children of the server {srv.pid}", status)
    return status


def embedded_example(example: str, into: Path) -> Path:
    """models/embedded_<example> holds only a sidecar.yaml (executor: embedded); the handler and its
    requirements are Examples/<example>'s own, copied here, so the two cannot drift apart."""
    target = into / f"embedded_{example}"
    shutil.copytree(MODELS / f"embedded_{example}", target)
    for name in ("handler.py", "requirements.txt"):
        source = REPO / "Examples" / example / name
        if source.exists():
            shutil.copy(source, target / name)
    return target


def copy_model(source: Path, into: Path, name: str) -> Path:
    target = into / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / "sidecar.yaml"
    config = yaml.safe_load(path.read_text())
    config["name"] = name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


# ----------------------------------------------------------------------------- same answers as process


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three servers, started at once: process echo + iris, embedded echo, embedded iris."""
    tmp = tmp_path_factory.mktemp("embedded-same")
    started = {
        "process": launch([REPO / "Examples" / "echo", REPO / "Examples" / "iris"], tmp, "process.log"),
        "echo": launch([embedded_example("echo", tmp)], tmp, "embedded-echo.log"),
        "iris": launch([embedded_example("iris", tmp)], tmp, "embedded-iris.log"),
    }
    try:
        wait_ready(*started.values())
        # No request yet: what the handlers logged while loading (iris logs "worker N trained on 150
        # flowers" from its __init__) should be in the server's log by now; a second to flush.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not all(LOAD_LOG in s.log() for s in (started["process"], started["iris"])):
            time.sleep(0.05)
        for srv in started.values():
            srv.log_at_ready = srv.log()
        yield started
    finally:
        codes = {kind: stop(srv) for kind, srv in started.items()}
    bad = {kind: code for kind, code in codes.items() if code != 0}
    assert not bad, f"exit codes after SIGTERM (expected 0): {bad}\n" + "\n".join(
        f"--- {kind} log ---\n{started[kind].log()}" for kind in bad)


# The model each embedded server serves, and its process-worker twin on the "process" server.
PAIRS = {"echo": ("embedded_echo", "echo"), "iris": ("embedded_iris", "iris")}


def test_status_says_embedded_with_the_server_pid(servers):
    for kind, (embedded, process) in PAIRS.items():
        status = assert_embedded(servers[kind], embedded)
        assert status["workers"][0]["python_version"], status
        assert_process_workers(servers["process"], process)


def test_handler_logs_from_loading_reach_the_log_at_start(servers):
    """Examples/iris logs with context.logger while it loads. With process workers the record is in
    the server's log before the model is ready; embedded, it must not wait for a first batch (a model
    that gets no traffic, or whose first batch crashes the server, would never show it)."""
    assert LOAD_LOG in servers["process"].log_at_ready, servers["process"].log_at_ready
    assert LOAD_LOG in servers["iris"].log_at_ready, (
        "the embedded handler's load-time log record is not in the server log after ready (no request sent yet)\n"
        + servers["iris"].log_at_ready)


def _http_echo(srv: Served, model: str, binary: bool) -> dict:
    client = httpclient.InferenceServerClient(srv.http_url, network_timeout=30.0)
    try:
        text = httpclient.InferInput("text", [3], "BYTES")
        text.set_data_from_numpy(np.array(NON_ASCII, dtype=np.object_), binary_data=binary)
        num = httpclient.InferInput("num", [2, 4], "FP32")
        num.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4) * np.float32(0.5), binary_data=binary)
        ints = httpclient.InferInput("ints", [3], "INT64")
        ints.set_data_from_numpy(np.array([-(2**40), 0, 7], dtype=np.int64), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("text", "num", "ints")]
        result = client.infer(model, [text, num, ints], outputs=outputs, request_id="same-1")
        response = result.get_response()
        arrays = {n: result.as_numpy(n) for n in ("text", "num", "ints")}
    finally:
        client.close()
    header = {k: v for k, v in response.items() if k != "model_name"}
    header["outputs"] = sorted(header["outputs"], key=lambda o: o["name"])
    return {"header": header, "arrays": arrays, "model_name": response["model_name"]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_echo_tritonclient_http_same_answers(servers, binary):
    embedded = _http_echo(servers["echo"], "embedded_echo", binary)
    process = _http_echo(servers["process"], "echo", binary)
    assert embedded["model_name"] == "embedded_echo" and process["model_name"] == "echo"
    assert embedded["header"] == process["header"], (embedded["header"], process["header"])
    for name in ("text", "num", "ints"):
        e, p = embedded["arrays"][name], process["arrays"][name]
        assert e is not None and p is not None, (name, embedded, process)
        assert e.dtype == p.dtype and e.shape == p.shape, (name, e, p)
        assert e.tolist() == p.tolist(), (name, e, p)
    text = [v if isinstance(v, bytes) else v.encode() for v in embedded["arrays"]["text"].tolist()]
    assert text == NON_ASCII
    np.testing.assert_array_equal(embedded["arrays"]["num"], np.arange(8, dtype=np.float32).reshape(2, 4) * np.float32(0.5))
    assert embedded["arrays"]["ints"].tolist() == [-(2**40), 0, 7]


def _grpc_echo(srv: Served, model: str):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        text = grpcclient.InferInput("text", [3], "BYTES")
        text.set_data_from_numpy(np.array(NON_ASCII, dtype=np.object_))
        num = grpcclient.InferInput("num", [1, 4], "FP32")
        num.set_data_from_numpy(np.array([[1.5, -2.0, 0.0, 3.25]], dtype=np.float32))
        result = client.infer(model, [text, num], request_id="g-same", client_timeout=30)
        response = result.get_response()
        outputs = sorted((o.name, o.datatype, list(o.shape)) for o in response.outputs)
        return response.id, outputs, result.as_numpy("text"), result.as_numpy("num")
    finally:
        client.close()


def test_echo_tritonclient_grpc_same_answers(servers):
    e_id, e_outputs, e_text, e_num = _grpc_echo(servers["echo"], "embedded_echo")
    p_id, p_outputs, p_text, p_num = _grpc_echo(servers["process"], "echo")
    assert e_id == p_id == "g-same"
    assert e_outputs == p_outputs == [("num", "FP32", [1, 4]), ("text", "BYTES", [3])], (e_outputs, p_outputs)
    assert e_text.tolist() == p_text.tolist() == NON_ASCII
    assert e_num.dtype == p_num.dtype == np.float32
    np.testing.assert_array_equal(e_num, p_num)


def test_echo_kserve_v1_curl_same_answers(servers):
    e_code, e_body = curl_predict(servers["echo"], "embedded_echo", INSTANCES)
    p_code, p_body = curl_predict(servers["process"], "echo", INSTANCES)
    assert e_code == p_code == "200", (e_code, e_body, p_code, p_body)
    assert json.loads(e_body) == json.loads(p_body) == {"predictions": INSTANCES}


def _iris_http(srv: Served, model: str, flower: list[float], binary: bool):
    client = httpclient.InferenceServerClient(srv.http_url, network_timeout=30.0)
    try:
        features = httpclient.InferInput("features", [4], "FP32")
        features.set_data_from_numpy(np.array(flower, dtype=np.float32), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probability")]
        result = client.infer(model, [features], outputs=outputs)
        label, probability = result.as_numpy("label"), result.as_numpy("probability")
        assert label is not None and probability is not None, result.get_response()
        label = label.tolist()
        return (label if isinstance(label, bytes) else str(label).encode()), probability.dtype, float(probability)
    finally:
        client.close()


def _iris_grpc(srv: Served, model: str, flower: list[float]):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        features = grpcclient.InferInput("features", [4], "FP32")
        features.set_data_from_numpy(np.array(flower, dtype=np.float32))
        result = client.infer(model, [features], client_timeout=30)
        label, probability = result.as_numpy("label"), result.as_numpy("probability")
        assert label is not None and probability is not None, result.get_response()
        return label.tolist(), probability.dtype, float(probability)
    finally:
        client.close()


def test_iris_tritonclient_same_answers(servers):
    labels = []
    for flower in FLOWERS:
        for binary in (True, False):
            embedded = _iris_http(servers["iris"], "embedded_iris", flower, binary)
            process = _iris_http(servers["process"], "iris", flower, binary)
            assert embedded == process, (flower, binary, embedded, process)
        embedded = _iris_grpc(servers["iris"], "embedded_iris", flower)
        process = _iris_grpc(servers["process"], "iris", flower)
        assert embedded == process, (flower, "grpc", embedded, process)
        assert embedded[1] == np.float64 and 0.0 < embedded[2] <= 1.0, embedded
        labels.append(embedded[0])
    assert labels == [b"setosa", b"virginica", b"versicolor", b"virginica", b"setosa"], labels


def test_iris_metadata_same(servers):
    embedded = httpclient.InferenceServerClient(servers["iris"].http_url).get_model_metadata("embedded_iris")
    process = httpclient.InferenceServerClient(servers["process"].http_url).get_model_metadata("iris")
    assert embedded.pop("name") == "embedded_iris" and process.pop("name") == "iris"
    assert embedded == process, (embedded, process)


def test_iris_kserve_v1_same_answers(servers):
    instances = [*FLOWERS, {"features": [6.7, 3.0, 5.2, 2.3]}]
    e_status, e_body = v1_predict(servers["iris"], "embedded_iris", instances)
    p_status, p_body = v1_predict(servers["process"], "iris", instances)
    assert e_status == p_status == 200, (e_status, e_body, p_status, p_body)
    assert e_body == p_body, (e_body, p_body)
    assert [p["label"] for p in e_body["predictions"]] == ["setosa", "virginica", "versicolor", "virginica", "setosa", "virginica"]
    e_code, e_text = curl_predict(servers["iris"], "embedded_iris", FLOWERS[:2])
    assert e_code == "200" and json.loads(e_text) == {"predictions": e_body["predictions"][:2]}, (e_code, e_text)


def test_iris_handler_error_same(servers):
    """A flower of three numbers: the handler raises ValueError; same status and message both ways."""
    e_status, e_body = v1_predict(servers["iris"], "embedded_iris", [[1.0, 2.0, 3.0]])
    p_status, p_body = v1_predict(servers["process"], "iris", [[1.0, 2.0, 3.0]])
    assert e_status == p_status == 500, (e_status, e_body, p_status, p_body)
    assert "4 numbers" in e_body["error"] and "4 numbers" in p_body["error"], (e_body, p_body)
    # the embedded model still serves
    status, body = v1_predict(servers["iris"], "embedded_iris", FLOWERS[:1])
    assert status == 200 and body["predictions"][0]["label"] == "setosa", (status, body)
    assert_embedded(servers["iris"], "embedded_iris")


# ------------------------------------------------------------------------------------- the crash record


def _send_crash(srv: Served, model: str) -> str:
    """POSTs ["crash"]; what came back (the server dying mid-request answers nothing)."""
    connection = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        connection.request("POST", f"/v1/models/{model}:predict", body=json.dumps({"instances": ["crash"]}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return f"HTTP {response.status}: {response.read()[:500]!r}"
    except (OSError, http.client.HTTPException) as error:
        return f"no response: {error!r}"
    finally:
        connection.close()


def _admin_cli(srv: Served, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_ADMIN_TOKEN"}
    env["SIDECAR_ADMIN_TOKEN"] = TOKEN
    return subprocess.run([SIDECAR_BIN, *args, "--server", f"http://127.0.0.1:{srv.admin_port}"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))


def test_segfault_takes_the_server_down_and_the_next_start_uses_process_workers(tmp_path):
    name = f"embedded_crash_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    model = copy_model(MODELS / "embedded_crash", tmp_path, name)
    record = EMBEDDED_DIR / f"{name}.state"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    fault_logs: list[Path] = []
    running: list[Served] = []
    try:
        # 1. embedded, serving; then the item that segfaults takes the whole server down
        first = launch([model], tmp_path, "first.log")
        running.append(first)
        fault_logs.append(EMBEDDED_DIR / f"faults-{first.pid}.log")
        wait_ready(first)
        assert_embedded(first, name)
        assert v1_predict(first, name, ["a", 1]) == (200, {"predictions": ["a", 1]})
        answer = _send_crash(first, name)
        try:
            code = first.process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs 60 s after its embedded handler segfaulted ({answer})\n{first.log()}")
        stop(first)
        assert code != 0, f"exit code {code} after a segfault ({answer})\n{first.log()}"
        assert answer.startswith("no response"), f"{answer}; exit code {code}"
        assert record.is_file(), f"no crash record at {record}; {sorted(p.name for p in EMBEDDED_DIR.iterdir())}"
        faults = fault_logs[0].read_text(errors="replace") if fault_logs[0].is_file() else ""
        assert "Segmentation fault" in faults and "in predict" in faults, f"fault log {fault_logs[0]}: {faults!r}"

        # 2. the next start on the same directory and cache: ready, with process workers, and says why
        second = launch([model], tmp_path, "second.log", token_file=token_file)
        running.append(second)
        fault_logs.append(EMBEDDED_DIR / f"faults-{second.pid}.log")
        wait_ready(second)
        status = assert_process_workers(second, name)
        note = status["executor_note"] or ""
        assert CRASH_NOTE in note, status
        assert re.search(r"\bbatch \d+\b", note), status
        assert f"pid {first.pid}" in note, (f"the dead server was pid {first.pid}", status)
        assert CRASH_NOTE in second.log(), second.log()
        assert v1_predict(second, name, ["b", 2, {"k": [3]}]) == (200, {"predictions": ["b", 2, {"k": [3]}]})
        # with process workers the same item kills a worker, not the server
        status_code, body = v1_predict(second, name, ["crash"], timeout=120)
        assert status_code >= 500 and "error" in body, (status_code, body)
        assert second.process.poll() is None, f"exit {second.process.returncode}\n{second.log()}"
        assert v1_predict(second, name, ["after"]) == (200, {"predictions": ["after"]})

        # 3. an operator reloads it: embedded again, in this server
        reloaded = _admin_cli(second, "reload", name)
        assert reloaded.returncode == 0, (reloaded.returncode, reloaded.stdout, reloaded.stderr, second.log())
        assert_embedded(second, name)
        assert v1_predict(second, name, ["c", 3]) == (200, {"predictions": ["c", 3]})
        shown = _admin_cli(second, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        admin_model = {m["name"]: m for m in json.loads(shown.stdout)["models"]}[name]
        assert admin_model["executor"] == "embedded", admin_model
        stop_cleanly(second)

        # 4. the reload forgot the crash: the next start is embedded from the outset
        third = launch([model], tmp_path, "third.log")
        running.append(third)
        fault_logs.append(EMBEDDED_DIR / f"faults-{third.pid}.log")
        wait_ready(third)
        assert_embedded(third, name)
        assert CRASH_NOTE not in third.log(), third.log()
        assert v1_predict(third, name, ["d"]) == (200, {"predictions": ["d"]})
        stop_cleanly(third)
    finally:
        for srv in running:
            stop(srv)
        for path in (record, *fault_logs):
            path.unlink(missing_ok=True)


def test_fault_log_survives_another_embedded_server_on_the_same_cache(tmp_path):
    """Two servers share a cache directory (as every test here does). The second one's embedded start
    must not take the first one's fault log away: when the first then segfaults, faulthandler's
    stacks must be in its faults-<pid>.log."""
    name = f"embedded_crash_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    model = copy_model(MODELS / "embedded_crash", tmp_path, name)
    record = EMBEDDED_DIR / f"{name}.state"
    running: list[Served] = []
    fault_logs: list[Path] = []
    try:
        crashing = launch([model], tmp_path, "crashing.log")
        running.append(crashing)
        fault_logs.append(EMBEDDED_DIR / f"faults-{crashing.pid}.log")
        wait_ready(crashing)
        assert_embedded(crashing, name)
        assert fault_logs[0].is_file(), f"{fault_logs[0]} missing while its server runs"
        neighbour = launch([embedded_example("echo", tmp_path)], tmp_path, "neighbour.log")
        running.append(neighbour)
        fault_logs.append(EMBEDDED_DIR / f"faults-{neighbour.pid}.log")
        wait_ready(neighbour)
        assert_embedded(neighbour, "embedded_echo")
        present_before_crash = fault_logs[0].is_file()
        answer = _send_crash(crashing, name)
        try:
            code = crashing.process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs 60 s after its embedded handler segfaulted ({answer})")
        assert code != 0, (code, answer)
        stop_cleanly(neighbour)
        faults = fault_logs[0].read_text(errors="replace") if fault_logs[0].is_file() else None
        assert present_before_crash and faults is not None, (
            f"{fault_logs[0]} (server pid {crashing.pid}) was deleted when server {neighbour.pid} started its embedded "
            f"interpreter on the same cache directory; the crash's Python stacks are lost "
            f"(left in {EMBEDDED_DIR}: {sorted(p.name for p in EMBEDDED_DIR.glob('faults-*.log'))})")
        assert "Segmentation fault" in faults and "in predict" in faults, faults
    finally:
        for srv in running:
            stop(srv)
        for path in (record, *fault_logs):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- draining


def test_sigterm_drains_an_embedded_model(tmp_path):
    srv = launch([MODELS / "embedded_slow"], tmp_path)
    clients = 6  # 3 s of batches: one item each (max_batch_size 1), 0.5 s each
    try:
        wait_ready(srv)
        assert_embedded(srv, "embedded_slow")
        served_before = model_status(srv, "embedded_slow")["workers"][0]["items_served"]
        answers: dict[int, tuple] = {}
        lock = threading.Lock()

        def call(i: int) -> None:
            item = {"client": i, "text": f"request {i}"}
            try:
                got = v1_predict(srv, "embedded_slow", [item], timeout=60)
            except Exception as error:  # noqa: BLE001 - every outcome is recorded
                got = ("no response", repr(error))
            with lock:
                answers[i] = (got, item, time.monotonic())

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(call, i) for i in range(clients)]
            # SIGTERM once the model holds every request and some are still queued or running (one item
            # per batch: in_flight, a count of batches, is a count of items too)
            deadline = time.monotonic() + 10
            while True:
                status = model_status(srv, "embedded_slow")
                worker = status["workers"][0]
                pending = status["queued"] + worker["in_flight"]
                if worker["items_served"] - served_before + pending >= clients and pending > 0:
                    break
                assert time.monotonic() < deadline, (
                    f"the {clients} requests never all reached the model: served before {served_before}, "
                    f"status {json.dumps(status)}, answers {answers}\n{srv.log()}")
                time.sleep(0.02)
            signalled = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            for f in futures:
                f.result()
        try:
            code = srv.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        bad = {i: a[0] for i, a in answers.items() if a[0] != (200, {"predictions": [a[1]]})}
        after = sum(1 for a in answers.values() if a[2] > signalled)
        assert len(answers) == clients and not bad, (f"{len(bad)} of {clients} requests not answered right: {bad}", srv.log())
        assert after >= 1, f"no request was still in flight at SIGTERM ({pending} pending then)"
        assert code == 0, f"exit code {code} after SIGTERM (expected 0)\n{srv.log()}"
    finally:
        stop(srv)
