"""Operating a running server, as an operator would: the `sidecar` CLI (status, scale, load,
unload) against a real `sidecar serve` with an admin token, while clients keep sending requests.

Uses the server and load generator of scripts/chaos.py; every request of the load is checked
(right answer, or counted as failed / lost).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import chaos  # noqa: E402 - needs the path above

TOKEN = "e2e-admin-token"


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    echo = chaos.copy_model(chaos.ECHO_MODEL, tmp)
    server = chaos.Sidecar([echo], tmp, extra_args=["--admin-token-file", str(token_file)])
    server.start()
    server.token_file = token_file
    yield server
    code = server.stop()
    assert code == 0, f"sidecar serve exit code {code}\n{server.log_tail()}"


def cli(server, *args, token: str | None = TOKEN, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SIDECAR_ADMIN_TOKEN", None)
    if token is not None:
        env["SIDECAR_ADMIN_TOKEN"] = token
    command = [chaos.SIDECAR_BIN, *args, "--server", f"http://127.0.0.1:{server.admin_port}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def status(server) -> dict:
    done = cli(server, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)["models"]}


def test_status_table_and_json(admin):
    table = cli(admin, "status")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:5] == ["MODEL", "STATE", "EXECUTOR", "WORKERS", "QUEUE"], table.stdout
    assert any(row.split()[:4] == ["echo", "ready", "process", "2/2"] for row in rows), table.stdout
    echo = status(admin)["echo"]
    assert echo["state"] == "ready" and echo["workers_ready"] == 2 and echo["reason"] is None
    assert echo["executor"] == "process" and echo["executor_note"] is None
    assert all(w["pid"] and w["state"] in ("ready", "busy") for w in echo["workers"])


def test_cli_in_a_pipeline_whose_reader_leaves_exits_quietly(admin):
    """`sidecar status --json | head -c0`: the reader closes the pipe before the CLI writes. A Unix
    tool then dies of SIGPIPE without a word; the CLI used to trap in FileHandle.write (a page of
    backtrace on stderr)."""
    env = dict(os.environ, SIDECAR_ADMIN_TOKEN=TOKEN)
    for args in (["status", "--json"], ["status"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the CLI has even reached the server
        process = subprocess.Popen([chaos.SIDECAR_BIN, *args, "--server", f"http://127.0.0.1:{admin.admin_port}"],
                                   stdout=write_end, stderr=subprocess.PIPE, env=env)
        os.close(write_end)
        _, stderr = process.communicate(timeout=60)
        text = stderr.decode(errors="replace")
        assert process.returncode in (-13, 141), f"{args}: exit {process.returncode}, stderr: {text[-2000:]}"
        assert "Fatal error" not in text and "backtrace" not in text.lower(), f"{args}: {text[-2000:]}"


def test_missing_or_wrong_token_is_refused(admin):
    for token in (None, "wrong"):
        done = cli(admin, "unload", "echo", token=token)
        assert done.returncode == 4, (token, done.returncode, done.stderr)
        assert "token" in done.stderr.lower() or "authorization" in done.stderr.lower(), done.stderr
    assert "echo" in status(admin), "a refused request changed nothing"


def test_scale_up_and_down_under_load_answers_every_request(admin):
    with chaos.Load(admin.http_port, 8, chaos.echo_items("echo")) as load:
        time.sleep(1.0)
        up = cli(admin, "scale", "echo", "4")
        assert up.returncode == 0, up.stderr
        assert "4/4 workers ready" in up.stdout
        time.sleep(1.0)
        down = cli(admin, "scale", "echo", "1")
        assert down.returncode == 0, down.stderr
        time.sleep(1.0)
        tally = load.stop()
    assert tally.counts["ok"] > 100, dict(tally.counts)
    assert tally.counts["failed"] == 0 and tally.counts["lost"] == 0, (dict(tally.counts), tally.samples, admin.log_tail())
    echo = status(admin)["echo"]
    assert echo["workers_target"] == 1 and echo["workers_ready"] == 1, echo
    assert sum(w["restarts"] for w in echo["workers"]) == 0, echo
    assert cli(admin, "scale", "echo", "2").returncode == 0


def test_load_and_unload_under_load(admin, tmp_path):
    typed = REPO / "Tests" / "e2e" / "models" / "typed"
    with chaos.Load(admin.http_port, 6, chaos.echo_items("echo")) as load:
        loaded = cli(admin, "load", str(typed), "--name", "typed2")
        assert loaded.returncode == 0, loaded.stderr
        assert "loaded typed2" in loaded.stdout
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{admin.http_port}/v2/models/typed2/infer", data=body)
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["model_name"] == "typed2"
        again = cli(admin, "load", str(typed), "--name", "typed2")
        assert again.returncode == 1 and "already loaded" in again.stderr, again.stderr
        unloaded = cli(admin, "unload", "typed2")
        assert unloaded.returncode == 0, unloaded.stderr
        with pytest.raises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(request, timeout=30)
        assert gone.value.code == 404
        tally = load.stop()
    assert tally.counts["failed"] == 0 and tally.counts["lost"] == 0, (dict(tally.counts), tally.samples)
    missing = cli(admin, "unload", "typed2")
    assert missing.returncode == 1 and "no model named" in missing.stderr


def _upload(server, data: bytes, sha256: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}/admin/v1/bundles?name=evil", data=data, method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Sidecar-Bundle-Sha256": sha256})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def test_malicious_bundles_are_refused_before_unpacking(admin, tmp_path):
    sentinel = tmp_path / "escaped"

    def bundle(add) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            handler = b"def predict(batch):\n    return batch\n"
            info = tarfile.TarInfo("handler.py")
            info.size = len(handler)
            tar.addfile(info, io.BytesIO(handler))
            add(tar)
        return buffer.getvalue()

    def file_entry(name: str):
        def add(tar):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        return add

    def link_entry(target: str):
        def add(tar):
            info = tarfile.TarInfo("link")
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        return add

    cases = {
        "traversal": bundle(file_entry("../" * 12 + str(sentinel).lstrip("/"))),
        "absolute": bundle(file_entry(str(sentinel))),
        "symlink": bundle(link_entry("/etc")),
    }
    for name, data in cases.items():
        code, message = _upload(admin, data, hashlib.sha256(data).hexdigest())
        assert code == 400, (name, code, message)
        assert "nothing was unpacked" in message or "escapes" in message or "absolute" in message, (name, message)
    good = bundle(lambda tar: None)
    code, message = _upload(admin, good, "0" * 64)
    assert code == 400 and "sha256" in message, message
    assert not sentinel.exists(), "a refused bundle wrote outside its staging directory"
    assert "evil" not in status(admin)


def test_admin_api_off_loopback_needs_a_token(tmp_path):
    echo = chaos.copy_model(chaos.ECHO_MODEL, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_ADMIN_TOKEN"}
    done = subprocess.run(
        [chaos.SIDECAR_BIN, "serve", str(echo), "--http-port", str(chaos.free_port()), "--grpc-port", str(chaos.free_port()),
         "--admin-host", "0.0.0.0", "--admin-port", str(chaos.free_port()), "--cache-dir", chaos.CACHE_DIR],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "without a token" in done.stderr and "admin_token_file" in done.stderr, done.stderr[-2000:]
