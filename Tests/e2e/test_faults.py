"""Fault injection, end to end: the scenarios of scripts/chaos.py ("Supervision that loses
nothing"), each against its own `sidecar serve` with a private copy of models/faulty.

The scenarios measure and judge (Result.problems lists every broken expectation of the contract);
these tests assert the headline counts first, so a failure reads as "3 requests lost" before the
details, and every message carries the scenario's facts and the server's log tail.

Environment: SIDECAR_BIN, SIDECAR_CACHE_DIR (as for conftest.py). Runs in about two minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import chaos  # noqa: E402 - needs the path above


def test_kill9_loses_nothing():
    r = chaos.scenario_kill9()
    assert r.facts.get("kills", 0) >= 20, r.describe()
    assert r.lost == 0, r.describe()
    assert r.failed == 0, r.describe()
    assert r.ok > 0, r.describe()
    assert r.passed, r.describe()


def test_sigstop_worker_is_replaced():
    r = chaos.scenario_sigstop()
    assert r.facts.get("detected_s") is not None, r.describe()
    assert r.lost == 0 and r.failed == 0, r.describe()
    assert r.passed, r.describe()


def test_poison_fails_only_the_poison():
    r = chaos.scenario_poison()
    assert r.lost == 0, r.describe()
    assert r.failed == 0, r.describe()  # good items only: the poison items are checked separately
    assert r.ok == r.sent, r.describe()
    assert r.passed, r.describe()


def test_import_failure_marks_failed_and_spares_the_other_model():
    r = chaos.scenario_import_failure()
    assert r.facts.get("ready_status") == 503, r.describe()
    assert r.ok > 0 and r.ok == r.sent, r.describe()  # echo answered everything
    assert r.passed, r.describe()


def test_supervisor_sigkill_takes_the_workers_along():
    r = chaos.scenario_supervisor_sigkill()
    assert r.facts.get("seconds_to_exit") is not None, r.describe()
    assert r.passed, r.describe()


def test_sigterm_under_load_answers_what_it_accepted():
    r = chaos.scenario_sigterm_under_load()
    assert r.facts.get("exit_code") == 0, r.describe()
    assert r.lost == 0, r.describe()
    assert r.failed == 0, r.describe()
    assert r.passed, r.describe()


def test_overload_refuses_fast_with_bounded_memory():
    r = chaos.scenario_overload()
    assert r.rejected > 0, r.describe()
    assert r.lost == 0 and r.failed == 0, r.describe()
    assert r.passed, r.describe()


def _serve_once(behaviour) -> int:
    """A bare listener on a free port whose one connection `behaviour(listener)` handles in a thread."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    threading.Thread(target=behaviour, args=(listener,), daemon=True).start()
    return listener.getsockname()[1]


def test_chaos_tells_a_request_never_read_from_one_read_and_dropped():
    """The scenarios' classifier, against bare sockets: a reset with the request unread (a connection
    left in a closed listener's backlog) is "unread" — never accepted — while a request the server
    read and then dropped without an answer is "lost"."""
    import time

    def close_backlog(listener):
        time.sleep(0.3)
        listener.close()

    def read_and_drop(listener):
        connection, _ = listener.accept()
        time.sleep(0.1)
        connection.recv(65536)
        connection.close()
        listener.close()

    unread, _ = chaos.send(_serve_once(close_backlog), chaos.v1_call("m", 1), timeout=5)
    assert unread.kind == "unread", unread
    lost, _ = chaos.send(_serve_once(read_and_drop), chaos.v1_call("m", 1), timeout=5)
    assert lost.kind == "lost", lost
