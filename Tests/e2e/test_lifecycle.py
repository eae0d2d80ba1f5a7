"""A model's life across operator actions that fail or race, against real `sidecar serve` processes:

- a reload whose environment cannot be built (pip cannot install a requirement) leaves the model
  listed FAILED with pip's reason, refuses its requests with 503, leaves the other models serving,
  and a reload after the fix brings it back;
- SIGTERM while a scale with `"wait": false` is still starting workers: the server exits 0 in bounded
  time and leaves no worker process behind.

Uses the server, load generator and process helpers of scripts/chaos.py, as test_admin.py does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import chaos  # noqa: E402 - needs the path above

TOKEN = "e2e-lifecycle-token"
BAD_PACKAGE = "sidecar-no-such-package-xyz"
# What a crash of the Swift process or a trap leaves in its output.
CRASH_MARKS = re.compile(r"Fatal error|backtrace|Segmentation fault|Illegal instruction|"
                         r"Current stack trace|SIGSEGV|SIGILL|SIGABRT|SIGBUS|assertion failed|Trace/breakpoint",
                         re.IGNORECASE)


# ------------------------------------------------------------------------------------------ helpers


def start_server(models: list[Path], workdir: Path, extra_args: tuple[str, ...] = ()) -> chaos.Sidecar:
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    server = chaos.Sidecar(models, workdir, extra_args=["--admin-token-file", str(token_file), *extra_args])
    server.start()
    return server


def cli(server: chaos.Sidecar, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, SIDECAR_ADMIN_TOKEN=TOKEN)
    command = [chaos.SIDECAR_BIN, *args, "--server", f"http://127.0.0.1:{server.admin_port}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def status(server: chaos.Sidecar) -> dict:
    done = cli(server, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)["models"]}


def post(port: int, path: str, body: object, timeout: float = 30) -> tuple[int, object]:
    """(status, parsed JSON body) of a POST, error statuses included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        data = error.read()
        try:
            return error.code, json.loads(data)
        except ValueError:
            return error.code, data.decode(errors="replace")


def admin_request(server: chaos.Sidecar, method: str, path: str, body: object | None = None,
                  timeout: float = 30) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.admin_port}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        data = error.read()
        try:
            return error.code, json.loads(data)
        except ValueError:
            return error.code, data.decode(errors="replace")


def assert_serves(server: chaos.Sidecar, model: str) -> None:
    """KServe v1 and OIP v2 both answer with the item (the echo handler)."""
    code, body = post(server.http_port, f"/v1/models/{model}:predict", {"instances": [7, "seven", {"a": [1, 2]}]})
    assert code == 200 and body == {"predictions": [7, "seven", {"a": [1, 2]}]}, (model, code, body, server.log_tail())
    call = chaos.v2_call(model, 4242)
    code, body = post(server.http_port, call.path, call.body)
    assert code == 200 and call.verify(body) is None, (model, code, body, server.log_tail())


def workers_of_model_dir(model_dir: Path) -> list[int]:
    """Live `python -m sidecar_worker` processes serving `model_dir` (a test's private copy, so
    nobody else's), whoever their parent is now: orphans are reparented, so the parent is no clue."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and chaos.worker_of(int(entry), model_dir):
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------- reload failing at the venv


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """A server with the echo model (the bystander that must keep serving) and an admin token."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    echo = chaos.copy_model(chaos.ECHO_MODEL, tmp)
    server = start_server([echo], tmp)
    yield server
    code = server.stop()
    assert code == 0, f"sidecar serve exit code {code}\n{server.log_tail()}"
    assert not CRASH_MARKS.search(server.log_tail(200_000)), server.log_tail()


def test_reload_failing_at_environment_build_stays_failed_then_recovers(lifecycle, tmp_path):
    server = lifecycle
    name = "echo-pip"
    model = chaos.copy_model(chaos.ECHO_MODEL, tmp_path)
    assert not (model / "requirements.txt").exists()

    # --on-server: the server loads the directory itself, so a reload reads what is there now
    # (an uploaded bundle would reload the server's unpacked copy, untouched by edits here).
    loaded = cli(server, "load", str(model), "--on-server", "--name", name)
    assert loaded.returncode == 0, (loaded.returncode, loaded.stderr, server.log_tail())
    assert f"loaded {name}" in loaded.stdout, loaded.stdout
    assert_serves(server, name)

    (model / "requirements.txt").write_text(f"{BAD_PACKAGE}==1.0\n")
    with chaos.Load(server.http_port, 4, chaos.echo_items("echo")) as load:
        failed = cli(server, "reload", name)
        # The bystander must also serve after the failure, not only while pip ran.
        time.sleep(0.5)
        tally = load.stop()
    assert failed.returncode == 1, (failed.returncode, failed.stdout, failed.stderr, server.log_tail())
    assert BAD_PACKAGE in failed.stderr and "pip" in failed.stderr, failed.stderr
    assert "Fatal error" not in failed.stderr, failed.stderr
    assert tally.counts["ok"] > 0, dict(tally.counts)
    assert tally.counts["failed"] == 0 and tally.counts["lost"] == 0, (dict(tally.counts), tally.samples)

    # Listed FAILED with the reason, by the CLI and by /status.
    listed = status(server)
    assert name in listed, listed.keys()
    entry = listed[name]
    assert entry["state"].lower() == "failed", entry
    assert entry["reason"] and BAD_PACKAGE in entry["reason"], entry
    code, report = server.get(f"/status/{name}")
    assert code == 200 and isinstance(report, dict), (code, report)
    assert report["state"].lower() == "failed" and BAD_PACKAGE in (report.get("reason") or ""), report
    table = cli(server, "status")
    assert table.returncode == 0 and any(row.split()[:2] == [name, "failed"] for row in table.stdout.splitlines()), table.stdout

    # Its requests are refused with 503 and the reason, on both HTTP protocols; readiness says no.
    code, body = post(server.http_port, f"/v1/models/{name}:predict", {"instances": [1]})
    assert code == 503 and isinstance(body, dict) and BAD_PACKAGE in body.get("error", ""), (code, body)
    call = chaos.v2_call(name, 1)
    code, body = post(server.http_port, call.path, call.body)
    assert code == 503 and isinstance(body, dict) and "FAILED" in body.get("error", ""), (code, body)
    assert server.get(f"/v2/models/{name}/ready")[0] != 200

    # The other model is untouched.
    assert_serves(server, "echo")
    assert listed["echo"]["state"] == "ready" and listed["echo"]["reason"] is None, listed["echo"]

    # Fixed: the bad line removed (an empty requirements.txt), the reload brings it back.
    (model / "requirements.txt").write_text("")
    fixed = cli(server, "reload", name)
    assert fixed.returncode == 0, (fixed.returncode, fixed.stderr, server.log_tail())
    assert f"reloaded {name}" in fixed.stdout, fixed.stdout
    assert_serves(server, name)
    entry = status(server)[name]
    assert entry["state"] == "ready" and entry["reason"] is None and entry["workers_ready"] == entry["workers_target"], entry
    assert server.get(f"/v2/models/{name}/ready")[0] == 200
    assert_serves(server, "echo")

    unloaded = cli(server, "unload", name)
    assert unloaded.returncode == 0, unloaded.stderr


# -------------------------------------------------------------- SIGTERM during a scale that waits not

# The handler's load takes SLOW_LOAD_S once the test asks for it: longer than the bound on the exit,
# well within startup_s. A worker still loading has nothing to drain, so stopping it cannot have to
# wait for its load: the exit is bounded by the server's own escalation (Shutdown, SIGTERM after 5 s,
# SIGKILL 2 s later), not by how long a handler takes to import.
SLOW_LOAD_S = 35.0
EXIT_WITHIN_S = 25.0
SLOW_HANDLER = textwrap.dedent(f'''\
    """An echo whose import takes {SLOW_LOAD_S} s once a file named SLOW is in its directory: workers
    started after the test creates it are still loading when the server is told to stop."""

    import time
    from pathlib import Path

    if (Path(__file__).resolve().parent / "SLOW").exists():
        time.sleep({SLOW_LOAD_S})


    def predict(batch):
        return batch
    ''')


def test_sigterm_during_scale_without_wait_exits_cleanly(tmp_path):
    model = tmp_path / "slowstart"
    model.mkdir()
    (model / "handler.py").write_text(SLOW_HANDLER)
    (model / "sidecar.yaml").write_text(
        "name: slowstart\nhandler: handler:predict\nworkers: 2\ntimeouts:\n  startup_s: 120\n")
    # Logged at info, so a failure shows when each worker ended its load and when the model unloaded.
    server = start_server([model], tmp_path, extra_args=("--log-level", "info"))
    try:
        assert_serves(server, "slowstart")
        before = status(server)["slowstart"]
        assert before["workers_ready"] == 2, before
        first_pids = [w["pid"] for w in before["workers"] if w.get("pid")]
        assert len(first_pids) == 2, before

        (model / "SLOW").write_text("")
        code, body = admin_request(server, "PUT", "/admin/v1/models/slowstart/workers", {"workers": 6, "wait": False})
        assert code == 202, (code, body, server.log_tail())
        assert isinstance(body, dict) and body.get("name") == "slowstart", body  # a snapshot: the target may not show 6 yet
        # The scale's workers are spawned (and now sit in their import, far past the SIGTERM).
        spawned = chaos.wait_until(lambda: len(workers_of_model_dir(model)) > 2, timeout=10, interval=0.05)
        assert spawned, ("no worker of the scale was spawned", server.log_tail())
        pids_at_term = set(workers_of_model_dir(model)) | set(first_pids)

        server.process.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        try:
            exit_code = server.process.wait(EXIT_WITHIN_S)
            in_time = True
        except subprocess.TimeoutExpired:
            # Not in time: wait for the loads to end anyway, so the failure says what it waited for.
            in_time = False
            try:
                exit_code = server.process.wait(SLOW_LOAD_S + 15 - (time.monotonic() - termed))
            except subprocess.TimeoutExpired:
                exit_code = None
        took = time.monotonic() - termed
        survivors = workers_of_model_dir(model)
        log = server.log_tail(200_000)
        facts = (f"exit code {exit_code} {took:.1f} s after SIGTERM (bound {EXIT_WITHIN_S:.0f} s, handler load "
                 f"{SLOW_LOAD_S:.0f} s); workers at SIGTERM {sorted(pids_at_term)}, alive after exit {survivors}\n"
                 f"--- log ---\n{server.log_tail()}")
        assert in_time, f"the server did not exit within {EXIT_WITHIN_S:.0f} s of SIGTERM: {facts}"
        assert exit_code == 0, facts
        assert survivors == [], f"worker processes outlived the server: {facts}"
        crash = CRASH_MARKS.search(log)
        assert crash is None, f"crash in the log: {crash.group(0)!r}: {facts}"
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
        server.stop()
        for pid in workers_of_model_dir(model):  # leave nothing behind if an assertion failed
            chaos.signal_worker(pid, signal.SIGKILL, model)
