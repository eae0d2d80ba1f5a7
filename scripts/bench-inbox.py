#!/usr/bin/env python3
"""Inbox → outbox throughput on Redis Streams (issue 17), beside the broker's own ceiling, in one run.

    .build/e2e-venv/bin/python scripts/bench-inbox.py [--messages 200000] [--batch 1024]
                                                      [--bin .build/release/sidecar] [--consumers 1]

It starts its own redis-server (no persistence) on a free loopback port and measures, in order:

  (a) the ceiling: a plain consumer in Python (redis-py, pipelined) doing the server's broker work
      with no model: XREADGROUP COUNT B, then for each message one EVALSHA of a Lua script that
      checks the message is still pending for this consumer, XADDs its result to the outbox and
      XACKs it (the server's publish step), the calls of one read pipelined together;
  (b) Sidecar: `sidecar serve` (the release binary) with Examples/echo (2 workers) and an inbox on
      the same stream, the same N messages pre-loaded before it starts;
  (c) the ceiling again (the host drifts; the two ceilings bracket Sidecar's run).

Each run starts from an empty broker with the N messages pre-loaded by pipelined XADDs before any
timing. Items/s are measured the same way for all three, from the outbox itself: N over the time
between its first and its last entry (stream entry ids are the broker's clock in ms), so start-up
(model load, the first read) is not counted and nothing on the client side is. The ceiling's own
wall clock and CPU, and the broker's CPU over each run (from /proc), tell which side was the limit:
a ceiling whose consumer used a whole core is the Python client's ceiling, not the broker's
(--consumers K runs K such consumers in parallel processes, in the same group).

Prints a table, the ratio Sidecar / mean ceiling (issue 17's target: ≥ 0.8), and the lines to paste
into docs/benchmarks.md. Needs redis-server (scripts/install-broker-tools.sh) and redis-py (in the
e2e venv: scripts/test.sh installs it). Environment: SIDECAR_BIN (default .build/release/sidecar),
SIDECAR_CACHE_DIR (default .build/test-cache).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Tests" / "e2e"))

try:
    import redis
except ImportError:
    sys.exit("redis-py is missing: run this with .build/e2e-venv/bin/python (scripts/test.sh installs redis into it), "
             "or pip install redis")

import inbox_harness as H  # noqa: E402 - needs the path above

INBOX, OUTBOX, GROUP = "in", "out", "sidecar"
MODEL = "echo"

# The server's publish step: the result and the acknowledgement in one script, only while the
# message is still pending for this consumer. KEYS: inbox, outbox. ARGV: group, consumer, inbox
# entry id, then the result's field/value pairs.
PUBLISH_SCRIPT = """
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #mine == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


# ----------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench-inbox {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants (the server and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += cpu_seconds(current)
        except (OSError, ValueError, IndexError):
            pass
        stack += children.get(current, [])
    return total


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


def outbox_span(client: redis.Redis) -> tuple[int, float]:
    """(entries, seconds from the first outbox entry to the last) by the entries' ids."""
    first = client.xrange(OUTBOX, count=1)
    last = client.xrevrange(OUTBOX, count=1)
    if not first:
        return 0, 0.0
    return client.xlen(OUTBOX), (entry_ms(last[0][0]) - entry_ms(first[0][0])) / 1000.0


def preload(client: redis.Redis, count: int, chunk: int = 10_000) -> None:
    """N messages {id, item} into the inbox, pipelined; the item is sidecar-bench's echo item."""
    for start in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(count, start + chunk)):
            pipe.xadd(INBOX, {b"id": f"b-{n}".encode(), b"item": json.dumps({"x": 1.5, "id": n}).encode()})
        pipe.execute()
    length = client.xlen(INBOX)
    if length != count:
        sys.exit(f"preload: the inbox holds {length} entries, expected {count}")


def check_outbox(client: redis.Redis, count: int, what: str) -> None:
    """Every message exactly once in the outbox, ok, and nothing pending."""
    seen: set[bytes] = set()
    duplicates = errors = 0
    start = "-"
    while True:
        batch = client.xrange(OUTBOX, min=start, max="+", count=20_000)
        for _, fields in batch:
            rid = fields.get(b"id")
            if rid in seen:
                duplicates += 1
            seen.add(rid)
            if fields.get(b"status") != b"ok":
                errors += 1
        if len(batch) < 20_000:
            break
        start = "(" + batch[-1][0].decode()
    pending = int(client.xpending(INBOX, GROUP)["pending"])
    if len(seen) != count or duplicates or errors or pending:
        sys.exit(f"{what}: {len(seen)} distinct ids of {count}, {duplicates} duplicates, {errors} errors, "
                 f"{pending} pending: the run is not valid")


# ----------------------------------------------------------------------------------------- ceiling


def _consume(port: int, consumer: str, batch: int, sha: str, stop_when_empty: bool = True) -> tuple[int, float, float]:
    """One plain consumer: read a batch, one EVALSHA per message, pipelined; until the stream is
    drained for the group. (messages, wall seconds, CPU seconds of this process)."""
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=False)
    done = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    consumer_b = consumer.encode()
    while True:
        reply = client.xreadgroup(GROUP, consumer, {INBOX: ">"}, count=batch)
        if not reply or not reply[0][1]:
            if stop_when_empty:
                break
            continue
        entries = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for entry_id, fields in entries:
            pipe.evalsha(sha, 2, INBOX, OUTBOX, GROUP, consumer_b, entry_id,
                         b"id", fields[b"id"], b"inbox_id", entry_id, b"model", MODEL.encode(), b"model_version", b"1",
                         b"status", b"ok", b"prediction", fields[b"item"])
        acked = pipe.execute()
        done += sum(1 for a in acked if a == 1)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    client.close()
    return done, wall, cpu


def _consume_in_process(results, *args) -> None:
    results.put(_consume(*args))


def _consume_in_parallel(port: int, consumers: int, batch: int, sha: str) -> list[tuple[int, float, float]]:
    """`consumers` forked processes, each a plain consumer under its own name in the group."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_consume_in_process, args=(results, port, f"ceiling-{k}", batch, sha))
                 for k in range(consumers)]
    for process in processes:
        process.start()
    parts = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            sys.exit(f"a ceiling consumer exited with {process.exitcode}")
    return parts


def run_ceiling(broker: H.RedisServer, count: int, batch: int, consumers: int, label: str) -> dict:
    client = broker.client(decode=False)
    client.flushall()
    preload(client, count)
    client.xgroup_create(INBOX, GROUP, id="0")
    sha = client.script_load(PUBLISH_SCRIPT)
    log(f"{label}: {count} messages pre-loaded; {consumers} Python consumer(s), XREADGROUP COUNT {batch}")
    broker_cpu0 = cpu_seconds(broker.process.pid)
    wall0 = time.perf_counter()
    if consumers == 1:
        parts = [_consume(broker.port, "ceiling-0", batch, sha)]
    else:
        parts = _consume_in_parallel(broker.port, consumers, batch, sha)
    wall = time.perf_counter() - wall0
    broker_cpu = cpu_seconds(broker.process.pid) - broker_cpu0
    published, span = outbox_span(client)
    if published != count or sum(p[0] for p in parts) != count:
        sys.exit(f"{label}: published {published} of {count} (consumers counted {[p[0] for p in parts]})")
    check_outbox(client, count, label)
    client.flushall()
    result = {"label": label, "items_s": count / span if span > 0 else float("inf"), "seconds": span, "wall": wall,
              "client_cpu": sum(p[2] for p in parts), "broker_cpu": broker_cpu}
    log(f"{label}: {result['items_s']:,.0f} items/s over {span:.2f} s (wall {wall:.2f} s); consumer CPU "
        f"{result['client_cpu']:.2f} s, broker CPU {broker_cpu:.2f} s")
    return result


# ----------------------------------------------------------------------------------------- sidecar


def run_sidecar(broker: H.RedisServer, count: int, binary: str, workers: int, max_in_flight: int | None,
                workdir: Path, timeout_s: float) -> dict:
    client = broker.client(decode=False)
    client.flushall()
    preload(client, count)
    model = H.copy_model(ROOT / "Examples" / "echo", workdir, overrides={"workers": workers})
    block = {"broker": broker.url, "stream": INBOX, "outbox": OUTBOX, "consumer": "bench"}
    if max_in_flight:
        block["max_in_flight"] = max_in_flight
    node = H.SidecarServer(workdir / "node", "bench", [model], inboxes={MODEL: block}, binary=binary, log_level="warning")
    log(f"sidecar: {count} messages pre-loaded; starting {binary} with {MODEL} ({workers} workers)")
    try:
        node.spawn()
        broker_cpu0 = cpu_seconds(broker.process.pid)
        node_cpu0 = None
        started = time.monotonic()
        last_len, last_growth, last_report = -1, time.monotonic(), time.monotonic()
        while True:
            if not node.alive():
                sys.exit(f"sidecar exited with {node.process.returncode}\n{node.log_tail()}")
            length = client.xlen(OUTBOX)
            now = time.monotonic()
            if node_cpu0 is None and length > 0:
                node_cpu0 = tree_cpu_seconds(node.pid)  # from the first result (the load's CPU left out)
                broker_cpu0 = cpu_seconds(broker.process.pid)
            if length >= count:
                break
            if length != last_len:
                last_len, last_growth = length, now
            elif now - last_growth > 60:
                sys.exit(f"sidecar: the outbox stopped at {length} of {count} for 60 s\n{node.log_tail()}")
            if now - started > timeout_s:
                sys.exit(f"sidecar: {length} of {count} after {timeout_s:.0f} s\n{node.log_tail()}")
            if now - last_report > 5:
                last_report = now
                log(f"sidecar: {length} of {count} results")
            time.sleep(0.05)
        node_cpu = tree_cpu_seconds(node.pid) - (node_cpu0 or 0.0)
        broker_cpu = cpu_seconds(broker.process.pid) - broker_cpu0
        assert H.wait_until(lambda: int(client.xpending(INBOX, GROUP)["pending"]) == 0, timeout=30), "pending after the drain"
        code = node.stop()
        if code != 0:
            sys.exit(f"sidecar exit code {code} after SIGTERM\n{node.log_tail()}")
    finally:
        node.close()
    published, span = outbox_span(client)
    check_outbox(client, count, "sidecar")
    client.flushall()
    result = {"label": "sidecar", "items_s": count / span if span > 0 else float("inf"), "seconds": span,
              "node_cpu": node_cpu, "broker_cpu": broker_cpu}
    log(f"sidecar: {result['items_s']:,.0f} items/s over {span:.2f} s; server+workers CPU {node_cpu:.2f} s, "
        f"broker CPU {broker_cpu:.2f} s")
    return result


# -------------------------------------------------------------------------------------------- main


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB"
    except OSError:
        pass
    version = subprocess.run([H.redis_server_binary(), "--version"], capture_output=True, text=True).stdout.split()
    redis_version = next((v.split("=")[1] for v in version if v.startswith("v=")), "?")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "pure Python"
    return (f"{os.cpu_count()} cores ({cpu}), {memory}, redis-server {redis_version}, Python {platform.python_version()}, "
            f"redis-py {redis.__version__} ({parser} parser), commit {commit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run (default 200,000)")
    parser.add_argument("--batch", type=int, default=1024,
                        help="the ceiling's XREADGROUP COUNT (default 1024: the server's default max_in_flight "
                             "for a model whose max_queue is 1024 or more)")
    parser.add_argument("--consumers", type=int, default=1, help="parallel ceiling consumers (default 1)")
    parser.add_argument("--bin", default=os.environ.get("SIDECAR_BIN", str(ROOT / ".build" / "release" / "sidecar")))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=None, help="the inbox's max_in_flight (default: the server's)")
    parser.add_argument("--timeout", type=float, default=900, help="most seconds for Sidecar's run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    binary = H.sidecar_binary(args.bin)
    H.redis_server_binary()

    workdir = Path(tempfile.mkdtemp(prefix="bench-inbox-"))
    broker = H.RedisServer(workdir / "redis", persistent=False)
    broker.start()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        first = run_ceiling(broker, args.messages, args.batch, args.consumers, "ceiling 1")
        ours = run_sidecar(broker, args.messages, binary, args.workers, args.max_in_flight, workdir, args.timeout)
        second = run_ceiling(broker, args.messages, args.batch, args.consumers, "ceiling 2")
    finally:
        broker.close()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    ceiling = (first["items_s"] + second["items_s"]) / 2
    ratio = ours["items_s"] / ceiling
    in_flight = args.max_in_flight or "default (4096)"
    consumer_note = f"{args.consumers} consumer{'s' if args.consumers > 1 else ''}"
    rows = [
        f"| ceiling 1: Python consumer ({consumer_note}), XREADGROUP COUNT {args.batch} + 1 EVALSHA/message, pipelined "
        f"| {first['items_s']:,.0f} | {first['seconds']:.2f} | {first['broker_cpu']:.2f} | consumer CPU {first['client_cpu']:.2f} s (wall {first['wall']:.2f} s) |",
        f"| Sidecar: echo, {args.workers} workers, max_in_flight {in_flight} "
        f"| {ours['items_s']:,.0f} | {ours['seconds']:.2f} | {ours['broker_cpu']:.2f} | server + workers CPU {ours['node_cpu']:.2f} s |",
        f"| ceiling 2 | {second['items_s']:,.0f} | {second['seconds']:.2f} | {second['broker_cpu']:.2f} | consumer CPU {second['client_cpu']:.2f} s (wall {second['wall']:.2f} s) |",
    ]
    table = "\n".join([
        f"## inbox → outbox on Redis Streams, {args.messages:,} messages, item {{\"x\": 1.5, \"id\": n}}",
        "| run | items/s | seconds (first → last result) | broker CPU s | notes |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])
    summary = (f"Sidecar / mean ceiling ({ceiling:,.0f} items/s) = {ratio:.2f} (target ≥ 0.8: "
               f"{'met' if ratio >= 0.8 else 'not met'})")
    print()
    print(table)
    print()
    print(summary)
    print()
    print("---- paste into docs/benchmarks.md ----")
    print("Command: `.build/e2e-venv/bin/python scripts/bench-inbox.py"
          + (f" --messages {args.messages}" if args.messages != 200_000 else "")
          + (f" --batch {args.batch}" if args.batch != 1024 else "")
          + (f" --consumers {args.consumers}" if args.consumers != 1 else "")
          + (f" --max-in-flight {args.max_in_flight}" if args.max_in_flight else "") + "` (release build).")
    print()
    print(f"Machine: {machine()}. Run {when}.")
    print()
    print("```")
    print(table)
    print("```")
    print()
    print(summary + ".")


if __name__ == "__main__":
    main()
