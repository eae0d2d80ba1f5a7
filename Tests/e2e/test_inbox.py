"""The Redis Streams inbox/outbox (issue 17) against a real redis-server and real `sidecar serve`
processes, each test with its own broker on a free loopback port and its own nodes:

- 10,000 requests with the node SIGKILLed at ~30 % of the outbox and restarted under the same
  consumer name: every request id exactly once in the outbox with its prediction, nothing pending;
  the restarted node's /status and /metrics count what it did;
- poison messages among good ones (an item that crashes its worker, one whose handler raises, one
  that is not JSON): each is dead-lettered with its reason and delivery count and has an error
  result, every other message has its ok result, the node still serves;
- a message that kills the whole server: after max_deliveries deliveries it is dead-lettered (with
  an error result) instead of being run again;
- a slow model with a small max_in_flight and a small queue: XPENDING never exceeds max_in_flight
  while 2,000 messages wait, and all are answered;
- two nodes in one group, one SIGSTOPped while it holds messages: the other claims and answers them;
  after SIGCONT no second result appears, nothing is pending;
- a slow but alive node is not robbed: its in-flight entries stay its own, delivered once;
- a broker restart mid-stream (SIGTERM, start again on the same port and directory, append-only file)
  loses nothing and duplicates nothing;
- SIGTERM stops reading, publishes what was read, exits 0, leaves nothing pending; a restart finishes;
- bad inbox configuration is refused at start, naming the key;
- an Open Inference Protocol `request` message gets an OIP `response`, beside `item` messages;
- a model's own `inbox:` in its sidecar.yaml serves, and the server's `inboxes:` overrides it.
- a broker URL with a password and a database number, and a named consumer group, are honoured
  (and the password is shown neither in /status nor in the log).

Needs redis-server (scripts/install-broker-tools.sh) and redis-py (scripts/test.sh installs it in
the e2e venv). The helpers are in inbox_harness.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if importlib.util.find_spec("redis") is None:  # checked first, so a missing client fails with the fix
    pytest.fail("redis-py is not installed in this Python: pip install redis (scripts/test.sh installs it "
                "into .build/e2e-venv)", pytrace=False)

from inbox_harness import (  # noqa: E402 - needs the path above
    MODELS, READY_TIMEOUT_S, HarnessError, RedisServer, SidecarServer, copy_model, exactly_once,
    group_info, item_messages, metric_value, pending_by_consumer, pending_count,
    pending_entries, read_stream, redis_server_binary, sidecar_binary, wait_until, xadd_all,
)

GROUP = "sidecar"  # the default consumer group
CRASH_MARKS = re.compile(r"Fatal error|backtrace|Segmentation fault|Illegal instruction|"
                         r"Current stack trace|SIGSEGV|SIGILL|SIGABRT|SIGBUS|assertion failed|Trace/breakpoint",
                         re.IGNORECASE)
STATUS_KEYS = {"model", "stream", "group", "consumer", "connected", "in_flight", "read", "published",
               "dead_lettered", "redelivered", "lag", "pending", "last_error"}


# ------------------------------------------------------------------------------------------ fixture


class Lab:
    """What one test started: brokers and nodes, torn down at the end whatever happened, and their
    logs for the failure messages."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.brokers: list[RedisServer] = []
        self.nodes: list[SidecarServer] = []

    def redis(self, persistent: bool = False, name: str = "redis", password: str | None = None) -> RedisServer:
        broker = RedisServer(self.tmp / name, persistent=persistent, password=password)
        self.brokers.append(broker)
        return broker.start()

    def sidecar(self, name: str, models: list[Path], inboxes: dict | None = None, extra: dict | None = None) -> SidecarServer:
        node = SidecarServer(self.tmp / "nodes", name, models, inboxes=inboxes, extra=extra)
        self.nodes.append(node)
        return node

    def story(self, chars: int = 6000) -> str:
        parts = []
        for node in self.nodes:
            parts.append(f"--- {node.name} log (tail; config {node.config_path}) ---\n{node.log_tail(chars)}")
        for broker in self.brokers:
            parts.append(f"--- redis-server :{broker.port} log (tail) ---\n{broker.log_tail(1500)}")
        return "\n".join(parts)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for broker in self.brokers:
            broker.close()


@pytest.fixture
def lab(tmp_path):
    try:
        redis_server_binary()
    except HarnessError as error:
        pytest.fail(str(error), pytrace=False)
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


# ------------------------------------------------------------------------------------------ helpers


def inbox(broker: RedisServer, **settings) -> dict:
    block = {"broker": broker.url, "stream": "in", "outbox": "out"}
    block.update(settings)
    return block


def stop_cleanly(lab: Lab, node: SidecarServer) -> None:
    code = node.stop()
    log = node.log_tail(400_000)
    assert code == 0, f"{node.name}: exit code {code} after SIGTERM (expected 0)\n{lab.story()}"
    crash = CRASH_MARKS.search(log)
    assert crash is None, f"{node.name}: crash in the log: {crash.group(0)!r}\n{lab.story()}"


def wait_drained(lab: Lab, r, expected: int, nodes: list[SidecarServer], timeout: float, stream: str = "in",
                 outbox: str = "out", what: str = "") -> None:
    """Until the outbox holds `expected` results and nothing is pending; fails (with the facts and
    the logs) if a node dies or the time runs out."""
    def drained():
        for node in nodes:
            if not node.alive():
                raise AssertionError(f"{node.name} exited with {node.process.returncode} while draining {what}\n{lab.story()}")
        return r.xlen(outbox) >= expected and pending_count(r, stream, GROUP) == 0
    if not wait_until(drained, timeout=timeout, interval=0.1):
        info = group_info(r, stream, GROUP)
        results = {f.get("id") for _, f in read_stream(r, outbox)}
        raise AssertionError(
            f"not drained within {timeout:.0f} s {what}: outbox {r.xlen(outbox)} entries ({len(results)} distinct ids) "
            f"of {expected} expected; pending {pending_by_consumer(r, stream, GROUP)}; group {info}\n{lab.story()}")


def check_ok_items(lab: Lab, results: dict[str, dict], messages: list[dict], entry_ids: list[str], model: str) -> None:
    """Each message's one result: ok, its prediction is its item (echo), it names its inbox entry and model."""
    wrong = []
    for message, entry_id in zip(messages, entry_ids):
        fields = results.get(message["id"])
        if fields is None:
            continue  # reported by exactly_once
        problem = None
        if fields.get("status") != "ok":
            problem = f"status {fields.get('status')!r}, error {fields.get('error')!r} ({fields.get('error_kind')!r})"
        elif "prediction" not in fields:
            problem = f"no prediction field: {fields}"
        else:
            try:
                prediction = json.loads(fields["prediction"])
            except ValueError:
                prediction = ("not JSON", fields["prediction"])
            if prediction != json.loads(message["item"]):
                problem = f"prediction {fields['prediction'][:200]!r} for item {message['item'][:200]!r}"
        if problem is None and fields.get("inbox_id") != entry_id:
            problem = f"inbox_id {fields.get('inbox_id')!r}, the entry was {entry_id!r}"
        if problem is None and fields.get("model") != model:
            problem = f"model {fields.get('model')!r}, expected {model!r}"
        if problem is None and "model_version" not in fields:
            problem = f"no model_version field: {sorted(fields)}"
        if problem:
            wrong.append((message["id"], problem))
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:5]}\n{lab.story()}"


def check_status_entry(lab: Lab, entry: dict) -> None:
    missing = STATUS_KEYS - set(entry)
    assert not missing, f"/status inbox entry lacks {sorted(missing)}: {entry}\n{lab.story(2000)}"


def inbox_metric(text: str, name: str, model: str, stream: str) -> float | None:
    return metric_value(text, name, model=model, stream=stream)


# ----------------------------------------------------------------------- 1. SIGKILL at 30 % + restart


KILL_N = 10_000


def test_sigkill_at_30_percent_then_restart_answers_every_id_exactly_once(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_echo", lab.tmp)
    messages = item_messages(KILL_N)
    entry_ids = xadd_all(r, "in", messages)
    assert len(entry_ids) == KILL_N and r.xlen("in") == KILL_N
    node = lab.sidecar("node-a", [model], {"inbox_echo": inbox(broker, consumer="node-a")})

    # Life 1: killed once the outbox holds ~30 % of the results. The group does not exist yet: the
    # node creates it from id 0, so it reads the messages that were there before it.
    node.spawn()
    target = int(KILL_N * 0.3)

    def reached():
        if not node.alive():
            raise AssertionError(f"node-a exited with {node.process.returncode} before the kill\n{lab.story()}")
        return r.xlen("out") >= target
    assert wait_until(reached, timeout=READY_TIMEOUT_S, interval=0.002), \
        f"the outbox never reached {target} results: {r.xlen('out')}\n{lab.story()}"
    # While it holds messages (results are published a read's worth at a time, so the outbox can
    # grow just after everything read was answered): the kill must leave pending entries behind.
    assert wait_until(lambda: pending_by_consumer(r, "in", GROUP).get("node-a", 0) > 0, timeout=10, interval=0.0005), \
        f"node-a held no pending message after {r.xlen('out')} results\n{lab.story()}"
    assert node.kill() == -signal.SIGKILL
    out_after_kill = r.xlen("out")
    pending_after_kill = pending_by_consumer(r, "in", GROUP)
    assert out_after_kill < KILL_N, (
        f"the whole stream was answered before the SIGKILL landed ({out_after_kill} results): the test could "
        f"not kill mid-stream\n{lab.story()}")
    assert set(pending_after_kill) == {"node-a"} and pending_after_kill["node-a"] > 0, \
        f"the kill should leave node-a's in-flight messages pending: {pending_after_kill}"

    # Life 2: the same consumer name; it re-reads its own pending entries first.
    node.start()
    wait_drained(lab, r, KILL_N, [node], timeout=90, what="after the restart")
    time.sleep(1.0)  # a late duplicate would land here
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    facts = (f"killed at {out_after_kill} results with pending {pending_after_kill}; "
             f"outbox now {r.xlen('out')} entries")
    assert not problems, f"{facts}: " + "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_echo")
    assert pending_count(r, "in", GROUP) == 0
    assert r.xlen("in-dead") == 0, f"dead letters in a clean run: {read_stream(r, 'in-dead')[:5]}"

    # What the second life did, as /status and /metrics tell it (every deviation listed at once).
    published_by_life_2 = KILL_N - out_after_kill

    def settled():
        entry = node.inbox_status("inbox_echo", "in")
        return entry if entry.get("pending") == 0 and entry.get("lag") == 0 and entry.get("in_flight") == 0 else None
    entry = wait_until(settled, timeout=10, interval=0.2) or node.inbox_status("inbox_echo", "in")
    seen = []
    missing = STATUS_KEYS - set(entry)
    if missing:
        seen.append(f"/status inbox entry lacks {sorted(missing)}")
    if not (entry.get("pending") == 0 and entry.get("lag") == 0 and entry.get("in_flight") == 0):
        seen.append("/status after the drain: pending, lag and in_flight should be 0")
    if not (entry.get("group") == GROUP and entry.get("consumer") == "node-a" and entry.get("connected") is True):
        seen.append("/status: group, consumer or connected wrong")
    if entry.get("published") != published_by_life_2:
        seen.append(f"/status published {entry.get('published')}, but the second life added {published_by_life_2} results")
    if not (isinstance(entry.get("read"), int) and entry["read"] >= 1 and entry.get("dead_lettered") == 0):
        seen.append("/status read should be >= 1 and dead_lettered 0")
    if entry.get("redelivered") != pending_after_kill["node-a"]:
        seen.append(f"{pending_after_kill['node-a']} were pending to node-a at the kill and re-read by its second "
                    f"life, but /status counts redelivered {entry.get('redelivered')}")
    text = node.metrics()
    # Counters that never moved may be absent (created on first increment); these all moved.
    for name in ["sidecar_inbox_read_total", "sidecar_inbox_published_total", "sidecar_inbox_redelivered_total",
                 "sidecar_inbox_lag", "sidecar_inbox_pending"]:
        if inbox_metric(text, name, "inbox_echo", "in") is None:
            seen.append(f"/metrics has no {name}{{model=\"inbox_echo\",stream=\"in\"}}")
    redelivered_metric = inbox_metric(text, "sidecar_inbox_redelivered_total", "inbox_echo", "in")
    if redelivered_metric is not None and redelivered_metric != pending_after_kill["node-a"]:
        seen.append(f"sidecar_inbox_redelivered_total {redelivered_metric}, expected {pending_after_kill['node-a']}")
    published_metric = inbox_metric(text, "sidecar_inbox_published_total", "inbox_echo", "in")
    if published_metric is not None and published_metric != published_by_life_2:
        seen.append(f"sidecar_inbox_published_total {published_metric}, expected {published_by_life_2}")
    dead_metric = inbox_metric(text, "sidecar_inbox_dead_lettered_total", "inbox_echo", "in")
    if dead_metric not in (None, 0):
        seen.append(f"sidecar_inbox_dead_lettered_total {dead_metric}, expected 0")
    count = inbox_metric(text, "sidecar_inbox_read_to_publish_seconds_count", "inbox_echo", "in")
    if not (count is not None and count >= 1):
        seen.append(f"sidecar_inbox_read_to_publish_seconds_count is {count}")
    inbox_lines = "\n".join(line for line in text.splitlines() if "inbox" in line)
    assert not seen, ("; ".join(seen) + f"\n--- /status inbox entry ---\n{entry}\n--- /metrics (inbox lines) ---\n"
                      f"{inbox_lines[:4000]}\n--- facts --- killed at {out_after_kill} results, pending {pending_after_kill}")
    stop_cleanly(lab, node)


# --------------------------------------------------------------------------- 2. poison messages


def test_poison_messages_are_dead_lettered_with_an_error_result_and_the_rest_answered(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_faulty", lab.tmp)
    good = item_messages(300, prefix="good")
    poison = {
        "poison-crash": json.dumps({"crash": True}),            # kills its worker every time it runs
        "poison-raise": json.dumps({"raise": "refused by the handler"}),  # the handler raises for it
        "poison-json": '{"not": json at all',                   # not JSON
    }
    messages = list(good)
    for position, (rid, item) in zip((100, 150, 200), poison.items()):
        messages.insert(position, {"id": rid, "item": item})
    entry_ids = xadd_all(r, "in", messages)
    entry_of = {m["id"]: e for m, e in zip(messages, entry_ids)}
    # dead_letter left at its default, "<stream>-dead".
    node = lab.sidecar("node-a", [model], {"inbox_faulty": inbox(broker, consumer="node-a", max_in_flight=64)})
    node.start()
    wait_drained(lab, r, len(messages), [node], timeout=60, what="with poison messages")
    time.sleep(0.5)

    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, good, [entry_of[m["id"]] for m in good], "inbox_faulty")
    for rid in poison:
        fields = results[rid]
        assert fields.get("status") == "error", f"{rid}: expected an error result, got {fields}\n{lab.story()}"
        assert fields.get("error") and fields.get("error_kind"), f"{rid}: error result without error/error_kind: {fields}"
        assert fields.get("inbox_id") == entry_of[rid] and fields.get("model") == "inbox_faulty", (rid, fields)
        assert "prediction" not in fields, (rid, fields)
        assert "model_version" in fields, f"{rid}: a result carries model_version, errors too: {fields}"
    assert "refused by the handler" in results["poison-raise"]["error"], results["poison-raise"]

    dead = read_stream(r, "in-dead")
    by_id: dict[str, list[dict]] = {}
    for _, fields in dead:
        by_id.setdefault(fields.get("id"), []).append(fields)
    assert set(by_id) == set(poison) and all(len(v) == 1 for v in by_id.values()), (
        f"the dead-letter stream in-dead should hold each poison message once and nothing else, "
        f"holds {[(f.get('id'), f.get('reason')) for _, f in dead]}\n{lab.story()}")
    for rid, item in poison.items():
        fields = by_id[rid][0]
        assert fields.get("inbox_id") == entry_of[rid], (rid, fields)
        assert fields.get("model") == "inbox_faulty", (rid, fields)
        assert fields.get("reason"), f"{rid}: dead letter without a reason: {fields}"
        assert fields.get("item") == item, f"{rid}: dead letter does not carry the original item: {fields}"
        deliveries = fields.get("deliveries", "")
        assert deliveries.isdigit() and int(deliveries) >= 1, f"{rid}: deliveries {deliveries!r} is not a count: {fields}"

    # Still serving: over HTTP, and through the inbox.
    code, body = node.predict_v1("inbox_faulty", [1, "two", {"three": 3}])
    assert code == 200 and body == {"predictions": [1, "two", {"three": 3}]}, (code, body, lab.story())
    after = item_messages(20, prefix="after")
    xadd_all(r, "in", after)
    wait_drained(lab, r, len(messages) + len(after), [node], timeout=30, what="after the poison")
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages + after])
    assert not problems, "; ".join(problems)

    entry = node.inbox_status("inbox_faulty", "in")
    assert entry["dead_lettered"] == len(poison), entry
    assert inbox_metric(node.metrics(), "sidecar_inbox_dead_lettered_total", "inbox_faulty", "in") == len(poison)
    check_status_entry(lab, entry)
    stop_cleanly(lab, node)


# ----------------------------------------------------------------- 2b. a message that kills the server


def test_message_that_kills_the_server_is_dead_lettered_after_max_deliveries(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_faulty", lab.tmp)
    max_deliveries = 2
    killer = json.dumps({"kill_server": True})
    [killer_entry] = xadd_all(r, "in", [{"id": "killer", "item": killer}])
    node = lab.sidecar("node-a", [model], {"inbox_faulty": inbox(broker, consumer="node-a", dead_letter="dead",
                                                                 max_deliveries=max_deliveries, claim_idle_s=2)})
    # Each life that runs the message dies of it (SIGKILL from its own worker); the next life re-reads
    # it as its own pending entry, one delivery more. Past max_deliveries it must not run it again.
    kills = 0
    for _ in range(max_deliveries + 3):
        node.spawn()
        outcome = wait_until(lambda: "dead-lettered" if r.xlen("dead") else (None if node.alive() else "exited"),
                             timeout=READY_TIMEOUT_S, interval=0.05)
        if outcome == "exited":
            assert node.process.returncode == -signal.SIGKILL, \
                f"node-a exited with {node.process.returncode}, not killed by the handler\n{lab.story()}"
            kills += 1
            continue
        assert outcome == "dead-lettered", f"neither dead-lettered nor killed\n{lab.story()}"
        break
    assert r.xlen("dead") >= 1, f"after {kills} kills the message was still not dead-lettered\n{lab.story()}"
    assert kills == max_deliveries, (
        f"the killing message ran {kills} times; with max_deliveries {max_deliveries} it should run exactly "
        f"{max_deliveries} times (deliveries 1..{max_deliveries}) and be dead-lettered at delivery {max_deliveries + 1}\n{lab.story()}")
    [(_, dead)] = read_stream(r, "dead")
    assert dead.get("id") == "killer" and dead.get("inbox_id") == killer_entry and dead.get("item") == killer, dead
    assert dead.get("model") == "inbox_faulty" and dead.get("reason"), dead
    assert dead.get("deliveries", "").isdigit() and int(dead["deliveries"]) > max_deliveries, (
        f"deliveries {dead.get('deliveries')!r} in the dead letter, expected more than {max_deliveries}: {dead}")
    node.wait_ready()
    wait_until(lambda: r.xlen("out") >= 1 and pending_count(r, "in", GROUP) == 0, timeout=15)
    [(_, result)] = read_stream(r, "out")
    assert result.get("id") == "killer" and result.get("status") == "error" and result.get("error"), result
    assert result.get("inbox_id") == killer_entry and result.get("error_kind"), result
    assert pending_count(r, "in", GROUP) == 0

    good = item_messages(20, prefix="good")
    entry_ids = xadd_all(r, "in", good)
    wait_drained(lab, r, 1 + len(good), [node], timeout=30, what="after the dead letter")
    results, problems = exactly_once(read_stream(r, "out"), ["killer"] + [m["id"] for m in good])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, good, entry_ids, "inbox_faulty")
    assert r.xlen("dead") == 1
    stop_cleanly(lab, node)
    assert result.get("model") == "inbox_faulty" and "model_version" in result, \
        f"a result carries model and model_version, a dead-lettered message's error result too: {result}"


# ---------------------------------------------------------------------------- 3. backpressure


def test_slow_model_keeps_pending_within_max_in_flight(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_slow", lab.tmp)  # 50 ms per batch, batches of 8, queue of 8
    max_in_flight = 16
    count = 2000
    messages = item_messages(count)
    entry_ids = xadd_all(r, "in", messages)
    node = lab.sidecar("node-a", [model], {"inbox_slow": inbox(broker, consumer="node-a", max_in_flight=max_in_flight)})
    node.spawn()

    samples, highest, over = 0, 0, []
    status_highest, status_samples = 0, 0
    started = time.monotonic()
    while True:
        if not node.alive():
            raise AssertionError(f"node-a exited with {node.process.returncode}\n{lab.story()}")
        pending = pending_count(r, "in", GROUP)
        samples += 1
        highest = max(highest, pending)
        if pending > max_in_flight:
            over.append((round(time.monotonic() - started, 2), pending))
        if samples % 25 == 0:
            code, body = node.get("/status", timeout=2)
            if code == 200 and isinstance(body, dict):
                for entry in body.get("inboxes") or []:
                    if entry.get("model") == "inbox_slow" and isinstance(entry.get("in_flight"), int):
                        status_samples += 1
                        status_highest = max(status_highest, entry["in_flight"])
            if r.xlen("out") >= count and pending == 0:
                break
        if time.monotonic() - started > 90:
            raise AssertionError(f"not drained in 90 s: outbox {r.xlen('out')} of {count}, pending {pending}\n{lab.story()}")
        time.sleep(0.01)

    assert not over, (f"XPENDING exceeded max_in_flight {max_in_flight} in {len(over)} of {samples} samples, "
                      f"e.g. (s, pending) {over[:10]}; highest {highest}\n{lab.story()}")
    assert samples >= 200 and highest >= 1, (samples, highest)
    assert status_samples >= 5 and status_highest <= max_in_flight, (
        f"/status in_flight: highest {status_highest} over {status_samples} samples (max_in_flight {max_in_flight})")
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_slow")
    stop_cleanly(lab, node)


# ----------------------------------------------------------------- 4. two nodes, one SIGSTOPped


def test_two_nodes_one_stopped_the_other_claims_and_no_duplicate_after_it_resumes(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_slow", lab.tmp, overrides={"batching": {"max_batch_size": 8, "max_queue": 32}})
    claim_idle_s = 2
    count = 1000
    settings = dict(claim_idle_s=claim_idle_s, max_in_flight=32)
    node_a = lab.sidecar("node-a", [model], {"inbox_slow": inbox(broker, consumer="a", **settings)})
    node_b = lab.sidecar("node-b", [model], {"inbox_slow": inbox(broker, consumer="b", **settings)})
    node_a.spawn()
    node_b.spawn()
    node_a.wait_ready()
    node_b.wait_ready()
    messages = item_messages(count)
    entry_ids = xadd_all(r, "in", messages)

    # Both read; stop a while it holds messages (looked at after the stop, so the list is exact).
    assert wait_until(lambda: all(pending_by_consumer(r, "in", GROUP).get(c, 0) > 0 for c in ("a", "b")),
                      timeout=30, interval=0.01), \
        f"both nodes never held messages at once: {pending_by_consumer(r, 'in', GROUP)}\n{lab.story()}"
    held: list[str] = []
    for _ in range(50):
        node_a.signal(signal.SIGSTOP)
        time.sleep(0.1)
        held = [e["message_id"] for e in pending_entries(r, "in", GROUP, "a")]
        if held:
            break
        node_a.signal(signal.SIGCONT)
        time.sleep(0.05)
    assert held, f"node a never held a message when stopped\n{lab.story()}"
    stopped_at = time.monotonic()
    out_at_stop = r.xlen("out")

    # b answers everything, a's messages included, while a stays stopped.
    wait_drained(lab, r, count, [node_b], timeout=60, what=f"by b while a is stopped holding {len(held)}")
    stopped_for = time.monotonic() - stopped_at
    answered = {f.get("inbox_id") for _, f in read_stream(r, "out")}
    assert set(held) <= answered, f"a's held entries not answered: {sorted(set(held) - answered)[:10]}"
    assert pending_entries(r, "in", GROUP, "a") == []
    entry_b = node_b.inbox_status("inbox_slow", "in")
    assert entry_b["redelivered"] >= len(held), (
        f"b claimed a's {len(held)} held entries but /status counts redelivered {entry_b['redelivered']}: {entry_b}")
    assert inbox_metric(node_b.metrics(), "sidecar_inbox_redelivered_total", "inbox_slow", "in") == entry_b["redelivered"]

    # a resumes: whatever it finishes for its lost entries must not reach the outbox.
    node_a.signal(signal.SIGCONT)
    time.sleep(2 * claim_idle_s + 3)
    assert node_a.alive(), f"a died after SIGCONT\n{lab.story()}"
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    facts = f"a stopped for {stopped_for:.1f} s holding {len(held)} entries, outbox at the stop {out_at_stop}"
    assert not problems, f"{facts}: " + "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_slow")
    assert pending_count(r, "in", GROUP) == 0, pending_by_consumer(r, "in", GROUP)

    # Both serve on.
    more = item_messages(100, prefix="more")
    more_ids = xadd_all(r, "in", more)
    wait_drained(lab, r, count + len(more), [node_a, node_b], timeout=30, what="after a resumed")
    time.sleep(1.0)
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages + more])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, more, more_ids, "inbox_slow")
    entry_a = node_a.inbox_status("inbox_slow", "in")
    assert entry_a["connected"] is True and entry_a["consumer"] == "a", entry_a
    check_status_entry(lab, entry_b)
    stop_cleanly(lab, node_a)
    stop_cleanly(lab, node_b)


# ------------------------------------------------------------------ 4b. slow but alive: not robbed


def test_slow_alive_node_keeps_its_messages(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_slow", lab.tmp)
    claim_idle_s = 1
    settings = dict(claim_idle_s=claim_idle_s, max_in_flight=8)
    node_a = lab.sidecar("node-a", [model], {"inbox_slow": inbox(broker, consumer="a", **settings)})
    node_b = lab.sidecar("node-b", [model], {"inbox_slow": inbox(broker, consumer="b", **settings)})
    node_a.spawn()
    node_b.spawn()
    node_a.wait_ready()
    node_b.wait_ready()
    # Each batch takes 4 s, four times claim_idle_s; whoever reads a message holds it that long (or
    # longer, queued behind another). Its owner must keep it: never claimed, delivered once.
    messages = [{"id": f"slow-{n}", "item": json.dumps({"sleep": 4, "n": n})} for n in range(4)]
    entry_ids = xadd_all(r, "in", messages)
    owners: dict[str, set[str]] = {}
    deliveries: dict[str, int] = {}
    started = time.monotonic()
    while time.monotonic() - started < 40:
        for entry in pending_entries(r, "in", GROUP):
            owners.setdefault(entry["message_id"], set()).add(entry["consumer"])
            deliveries[entry["message_id"]] = max(deliveries.get(entry["message_id"], 0), entry["times_delivered"])
        if r.xlen("out") >= len(messages) and pending_count(r, "in", GROUP) == 0:
            break
        time.sleep(0.1)
    assert r.xlen("out") >= len(messages), f"not answered in 40 s\n{lab.story()}"
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_slow")
    robbed = {m: o for m, o in owners.items() if len(o) > 1}
    redelivered = {m: d for m, d in deliveries.items() if d > 1}
    assert not robbed and not redelivered, (
        f"messages held by a live node (4 s batches, claim_idle_s {claim_idle_s}) changed owner {robbed} or were "
        f"delivered again {redelivered}; owners seen {owners}\n{lab.story()}")
    for node in (node_a, node_b):
        entry = node.inbox_status("inbox_slow", "in")
        assert entry["redelivered"] == 0, f"{node.name}: {entry}"
    stop_cleanly(lab, node_a)
    stop_cleanly(lab, node_b)


# ----------------------------------------------------------------------- 5. broker restart


def test_broker_restart_mid_stream_loses_nothing(lab):
    broker = lab.redis(persistent=True)
    r = broker.client()
    model = copy_model(MODELS / "inbox_slow", lab.tmp, overrides={"batching": {"max_batch_size": 16, "max_queue": 64}})
    count = 2000
    messages = item_messages(count)
    entry_ids = xadd_all(r, "in", messages)
    node = lab.sidecar("node-a", [model], {"inbox_slow": inbox(broker, consumer="node-a", max_in_flight=64)})
    node.start()
    assert wait_until(lambda: r.xlen("out") >= count * 0.3, timeout=60, interval=0.01), \
        f"the outbox never reached 30 %: {r.xlen('out')}\n{lab.story()}"
    out_before = r.xlen("out")
    pending_before = pending_count(r, "in", GROUP)
    r.close()
    code = broker.stop(signal.SIGTERM)
    assert code == 0, f"redis-server exit code {code} on SIGTERM\n{broker.log_tail()}"
    down_status = []
    down_until = time.monotonic() + 2.0
    while time.monotonic() < down_until:
        code, body = node.get("/status", timeout=1)
        if code == 200 and isinstance(body, dict):
            down_status += [e.get("connected") for e in body.get("inboxes") or []]
        time.sleep(0.2)
    assert node.alive(), f"node-a died while the broker was down\n{lab.story()}"
    broker.start()
    r = broker.client()
    assert r.xlen("in") == count, f"the inbox lost entries over the broker restart: {r.xlen('in')}"
    assert out_before < count, f"drained before the broker stopped ({out_before}): not mid-stream"
    wait_drained(lab, r, count, [node], timeout=60, what="after the broker restart")
    time.sleep(1.0)
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    facts = (f"broker stopped at {out_before} results, {pending_before} pending; /status connected while down: "
             f"{down_status}")
    assert not problems, f"{facts}: " + "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_slow")
    entry = wait_until(lambda: (e := node.inbox_status("inbox_slow", "in")).get("connected") is True and e, timeout=10)
    assert entry, f"not connected after the broker came back: {node.inbox_status('inbox_slow', 'in')}"
    stop_cleanly(lab, node)


# ----------------------------------------------------------------------------------- SIGTERM


def test_sigterm_publishes_what_was_read_and_leaves_nothing_pending(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_slow", lab.tmp, overrides={"batching": {"max_batch_size": 8, "max_queue": 64}})
    count = 2000
    messages = item_messages(count)
    entry_ids = xadd_all(r, "in", messages)
    node = lab.sidecar("node-a", [model], {"inbox_slow": inbox(broker, consumer="node-a", max_in_flight=64)})
    node.start()
    assert wait_until(lambda: r.xlen("out") >= 200, timeout=60, interval=0.01), f"{r.xlen('out')}\n{lab.story()}"
    pending_at_term = pending_count(r, "in", GROUP)
    node.signal(signal.SIGTERM)
    try:
        code = node.process.wait(45)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within 45 s of SIGTERM\n{lab.story()}") from None
    assert code == 0, f"exit code {code} after SIGTERM\n{lab.story()}"
    info = group_info(r, "in", GROUP)
    out = r.xlen("out")
    assert pending_count(r, "in", GROUP) == 0, (
        f"SIGTERM must publish what was read: {pending_by_consumer(r, 'in', GROUP)} still pending "
        f"({pending_at_term} at SIGTERM); group {info}\n{lab.story()}")
    assert info["entries-read"] == out, f"read {info['entries-read']} but published {out}: {info}"
    assert info["lag"] and info["lag"] > 0, f"the node read the whole stream instead of stopping: {info}"
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages[:out]])
    assert not problems, "; ".join(problems)

    node.start()
    wait_drained(lab, r, count, [node], timeout=60, what="after the restart")
    results, problems = exactly_once(read_stream(r, "out"), [m["id"] for m in messages])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_slow")
    stop_cleanly(lab, node)


# ------------------------------------------------------------------------------ 6. bad configuration


def _case(inboxes, expect, model_inbox=None):
    return {"inboxes": inboxes, "expect": expect, "model_inbox": model_inbox}


BAD_CONFIGURATIONS = {
    "unknown model": _case(lambda url: {"nosuchmodel": {"broker": url, "stream": "in", "outbox": "out"}}, ["nosuchmodel"]),
    "outbox missing": _case(lambda url: {"inbox_echo": {"broker": url, "stream": "in"}}, ["outbox"]),
    "stream missing": _case(lambda url: {"inbox_echo": {"broker": url, "outbox": "out"}}, ["stream"]),
    "broker not redis": _case(lambda url: {"inbox_echo": {"broker": url.replace("redis://", "http://"), "stream": "in",
                                                          "outbox": "out"}}, ["broker"]),
    "unknown key": _case(lambda url: {"inbox_echo": {"broker": url, "stream": "in", "outbox": "out",
                                                     "max_inflight": 16}}, ["max_inflight"]),
    "max_in_flight zero": _case(lambda url: {"inbox_echo": {"broker": url, "stream": "in", "outbox": "out",
                                                            "max_in_flight": 0}}, ["max_in_flight"]),
    "model inbox without outbox": _case(None, ["outbox"], model_inbox=lambda url: {"broker": url, "stream": "in"}),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGURATIONS))
def test_bad_inbox_configuration_is_refused_naming_the_key(lab, case):
    spec = BAD_CONFIGURATIONS[case]
    broker = lab.redis()  # a live broker: the refusal must come from the configuration
    overrides = {"inbox": spec["model_inbox"](broker.url)} if spec["model_inbox"] else None
    model = copy_model(MODELS / "inbox_echo", lab.tmp, overrides=overrides)
    inboxes = spec["inboxes"](broker.url) if spec["inboxes"] else None
    node = lab.sidecar("node-a", [model], inboxes)
    node.write_config()
    command = [sidecar_binary(), "serve", "--config", str(node.config_path), "--log-level", "info"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{case}: the server did not refuse within 120 s; config:\n{node.config_path.read_text()}\n"
                             f"stderr so far: {expired.stderr!r}") from None
    shown = (f"{case}: exit code {done.returncode}\n--- config ---\n{node.config_path.read_text()}"
             f"--- stderr ---\n{done.stderr[-4000:]}\n--- stdout ---\n{done.stdout[-2000:]}")
    assert done.returncode > 0, f"expected a refusal (exit code > 0): {shown}"
    for key in spec["expect"]:
        assert key in done.stderr, f"stderr does not name {key!r}: {shown}"
    assert not CRASH_MARKS.search(done.stderr + done.stdout), f"a crash, not a refusal: {shown}"


# ---------------------------------------------------------------------------- 7. OIP request messages


def _flat(value):
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


def test_oip_request_message_gets_an_oip_response(lab):
    broker = lab.redis()
    r = broker.client()
    model = copy_model(MODELS / "inbox_echo", lab.tmp)
    requests = {
        "int64": {"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [41, -7]}]},
        "fp32": {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [0.5, 1.5, 2.5]}]},
        "two": {"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [3]},
                           {"name": "b", "shape": [2], "datatype": "FP64", "data": [0.25, -1.0]}]},
    }
    messages = [{"id": f"req-{name}", "request": json.dumps(body)} for name, body in requests.items()]
    messages.append({"id": "item-1", "item": json.dumps({"text": "an item beside the tensors"})})
    messages.append({"request": json.dumps(requests["int64"])})  # no id: the entry id stands in
    messages.append({"id": "req-bad", "request": json.dumps(
        {"inputs": [{"name": "x", "shape": [3], "datatype": "INT64", "data": [1]}]})})  # shape does not match data
    entry_ids = xadd_all(r, "in", messages)
    node = lab.sidecar("node-a", [model], {"inbox_echo": inbox(broker)})  # consumer: the host name
    node.start()
    wait_drained(lab, r, len(messages), [node], timeout=30, what="OIP requests")
    consumers = {c["name"] for c in r.xinfo_consumers("in", GROUP)}
    assert consumers == {socket.gethostname()}, f"the default consumer name is the host name {socket.gethostname()!r}: {consumers}"
    expected_ids = [m["id"] for m in messages[:4]] + [entry_ids[4], "req-bad"]
    results, problems = exactly_once(read_stream(r, "out"), expected_ids)
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"

    def check_response(rid, body):
        fields = results[rid]
        assert fields.get("status") == "ok", f"{rid}: {fields}\n{lab.story()}"
        assert "response" in fields and "prediction" not in fields, f"{rid}: a request gets `response`: {fields}"
        response = json.loads(fields["response"])
        assert response.get("model_name") == "inbox_echo", f"{rid}: {response}"
        outputs = {o["name"]: o for o in response.get("outputs") or []}
        for tensor in body["inputs"]:
            out = outputs.get(tensor["name"])
            assert out is not None, f"{rid}: no output {tensor['name']!r} in {response}"
            assert out["datatype"] == tensor["datatype"] and list(out["shape"]) == tensor["shape"], (rid, out, tensor)
            assert _flat(out["data"]) == tensor["data"], (rid, out, tensor)
        assert set(outputs) == {t["name"] for t in body["inputs"]}, (rid, response)

    for name, body in requests.items():
        check_response(f"req-{name}", body)
    check_response(entry_ids[4], requests["int64"])
    assert results[entry_ids[4]].get("inbox_id") == entry_ids[4]
    item = results["item-1"]
    assert item.get("status") == "ok" and json.loads(item["prediction"]) == {"text": "an item beside the tensors"}, item
    assert "response" not in item, item
    bad = results["req-bad"]
    assert bad.get("status") == "error" and bad.get("error") and bad.get("error_kind"), bad
    assert "response" not in bad and "prediction" not in bad, bad
    stop_cleanly(lab, node)


# ------------------------------------------------------ a model's own inbox:, and the server's override


def test_model_inbox_in_sidecar_yaml_and_server_override(lab):
    broker = lab.redis()
    r = broker.client()
    # Model A: its inbox only in its sidecar.yaml. Model B: an inbox in its sidecar.yaml AND one in
    # the server's configuration, which wins.
    model_a = copy_model(MODELS / "inbox_echo", lab.tmp, name="inbox_echo_a", overrides={
        "inbox": {"broker": broker.url, "stream": "a-in", "outbox": "a-out", "consumer": "n1"}})
    model_b = copy_model(MODELS / "inbox_echo", lab.tmp, name="inbox_echo_b", overrides={
        "inbox": {"broker": broker.url, "stream": "b-model-in", "outbox": "b-model-out", "consumer": "n1"}})
    node = lab.sidecar("node-a", [model_a, model_b], {
        "inbox_echo_b": {"broker": broker.url, "stream": "b-in", "outbox": "b-out", "consumer": "n1"}})
    a_messages = item_messages(50, prefix="a")
    b_messages = item_messages(50, prefix="b")
    a_ids = xadd_all(r, "a-in", a_messages)
    b_ids = xadd_all(r, "b-in", b_messages)
    node.start()
    wait_drained(lab, r, 50, [node], timeout=30, stream="a-in", outbox="a-out", what="model A (sidecar.yaml inbox)")
    wait_drained(lab, r, 50, [node], timeout=30, stream="b-in", outbox="b-out", what="model B (server override)")
    results, problems = exactly_once(read_stream(r, "a-out"), [m["id"] for m in a_messages])
    assert not problems, problems
    check_ok_items(lab, results, a_messages, a_ids, "inbox_echo_a")
    results, problems = exactly_once(read_stream(r, "b-out"), [m["id"] for m in b_messages])
    assert not problems, problems
    check_ok_items(lab, results, b_messages, b_ids, "inbox_echo_b")
    assert r.xlen("b-model-out") == 0, "the server's inboxes: must override the model's inbox:"
    assert group_info(r, "b-model-in", GROUP) is None, "the overridden inbox stream must not be read"
    stop_cleanly(lab, node)


# ------------------------------------------------------- broker URL with a password and a database


def test_broker_url_with_password_database_and_named_group(lab):
    broker = lab.redis(password="s3cret-pass")
    r0 = broker.client()
    r2 = broker.client(db=2)
    model = copy_model(MODELS / "inbox_echo", lab.tmp)
    messages = item_messages(100)
    entry_ids = xadd_all(r2, "in", messages)
    block = inbox(broker, consumer="node-a", group="scorers", dead_letter="in-dlq")
    block["broker"] = broker.url + "/2"  # redis://:s3cret-pass@127.0.0.1:PORT/2
    node = lab.sidecar("node-a", [model], {"inbox_echo": block})
    node.start()

    def drained():
        if not node.alive():
            raise AssertionError(f"node-a exited with {node.process.returncode}\n{lab.story()}")
        return r2.xlen("out") >= len(messages) and pending_count(r2, "in", "scorers") == 0
    assert wait_until(drained, timeout=30, interval=0.1), (
        f"not drained in db 2 with group 'scorers': outbox {r2.xlen('out')}, pending "
        f"{pending_by_consumer(r2, 'in', 'scorers')}\n{lab.story()}")
    results, problems = exactly_once(read_stream(r2, "out"), [m["id"] for m in messages])
    assert not problems, "; ".join(problems) + f"\n{lab.story()}"
    check_ok_items(lab, results, messages, entry_ids, "inbox_echo")
    assert [g["name"] for g in r2.xinfo_groups("in")] == ["scorers"], r2.xinfo_groups("in")
    assert r0.exists("in", "out") == 0, "database 0 was written although the URL names database 2"
    entry = node.inbox_status("inbox_echo", "in")
    assert entry["group"] == "scorers" and entry["connected"] is True, entry
    assert "s3cret-pass" not in json.dumps(node.status()), "/status shows the broker password"
    assert "s3cret-pass" not in node.log_tail(400_000), "the log shows the broker password"
    stop_cleanly(lab, node)
