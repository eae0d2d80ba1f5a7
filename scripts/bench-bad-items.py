#!/usr/bin/env python3
"""Bad items cost what good ones cost (issue 20): `sidecar predict` over JSON Lines in which 0 %, 1 %,
10 % and 100 % of the items make an echo-like handler raise (it raises for the whole batch when
any item in it is marked, as a vectorized handler does), all-good first and last (the ceiling,
bracketing the others: this host drifts). Prints items/s, the ratio to the all-good mean, CPU per
item (server + workers), and checks every line: each marked item gets its own error, no other does.

    python3 scripts/bench-bad-items.py [--lines 300000] [--bin .build/release/sidecar] [--bin OTHER ...]

With several --bin, each binary runs the same files in turn (before/after a change, in one run).
`sidecar predict` is the library API (`withModel`, `Model.predict(batch:)`) plus JSON Lines in and out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDLER = '''def predict(batch):
    for item in batch:
        if isinstance(item, dict) and item.get("bad"):
            raise ValueError(f"item {item['n']} is marked bad")
    return batch
'''


def write_lines(path: Path, count: int, rate: float) -> set[int]:
    rng = random.Random(int(rate * 1000) + count)
    bad = set()
    with path.open("w") as out:
        for n in range(count):
            marked = rng.random() < rate
            if marked:
                bad.add(n + 1)
            out.write(json.dumps({"n": n + 1, "bad": marked}) + "\n")
    return bad


def run(binary: str, model: Path, lines: Path, cache: str) -> tuple[float, float, list[str]]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with lines.open("rb") as stdin:
        done = subprocess.run([binary, "predict", str(model), "--cache-dir", cache, "--log-level", "error"],
                              stdin=stdin, capture_output=True, check=False)
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        sys.exit(f"{binary} predict exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, done.stdout.decode().splitlines()


def check(output: list[str], count: int, bad: set[int]) -> None:
    assert len(output) == count, f"{len(output)} lines out for {count} in"
    for number, line in enumerate(output, start=1):
        answer = json.loads(line)
        if number in bad:
            error = answer.get("error", "")
            # Its own error; or, once a model fails for every item (fail fast), the batch's, saying so.
            assert error.endswith(f"item {number} is marked bad") or "items were not run alone" in error, (number, answer)
        else:
            assert answer == {"n": number, "bad": False}, (number, answer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--bin", action="append", default=[])
    parser.add_argument("--cache-dir", default=str(ROOT / ".build" / "test-cache"))
    args = parser.parse_args()
    binaries = args.bin or [str(ROOT / ".build" / "release" / "sidecar")]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = work / "raising"
        model.mkdir()
        (model / "handler.py").write_text(HANDLER)
        (model / "sidecar.yaml").write_text("name: raising\nworkers: 2\n")
        rates = [0.0, 0.01, 0.10, 1.0, 0.0]
        files = {}
        for rate in sorted(set(rates)):
            path = work / f"rate-{rate}.jsonl"
            files[rate] = (path, write_lines(path, args.lines, rate))
        print(f"sidecar predict over {args.lines} lines, echo-like handler raising for a batch holding a marked item, "
              f"2 workers, {os.cpu_count()} cores, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        for binary in binaries:
            run(binary, model, files[0.0][0], args.cache_dir)  # warm: the environment, the page cache
            rows = []
            for rate in rates:
                path, bad = files[rate]
                elapsed, cpu, output = run(binary, model, path, args.cache_dir)
                check(output, args.lines, bad)
                rows.append((rate, args.lines / elapsed, cpu / args.lines * 1e6, elapsed))
            good = (rows[0][1] + rows[-1][1]) / 2
            print(f"\n{binary}")
            print(f"{'raising':>8} {'items/s':>10} {'× all-good':>11} {'CPU µs/item':>12} {'seconds':>8}")
            for rate, per_second, cpu_us, elapsed in rows:
                print(f"{rate * 100:>7.0f}% {per_second:>10.0f} {per_second / good:>11.2f} {cpu_us:>12.1f} {elapsed:>8.2f}")
            print("every line checked: each marked item got its own error, every other its prediction")


if __name__ == "__main__":
    main()
