#!/usr/bin/env python3
"""Batch scoring job throughput (issue 17) beside its ceiling, in one run.

  .build/e2e-venv/bin/python scripts/bench-batch-job.py [--lines 1000000] [--batch-size 1024] [--workers 2]

1. Writes a JSON Lines file of LINES small items (`[1.0, 2.0, 3.0, 4.0]`) in a temporary directory.
2. (a) The ceiling: `sidecar-bench` on Examples/echo with the same item, WORKERS process workers and
   BATCH-SIZE items per call (items/s through the library API: callers, batcher, workers, no files).
3. (b) `sidecar batch Examples/echo --input big.jsonl --output out.jsonl --workers WORKERS`: items/s
   over the wall time of the whole command (start-up included), and the items/s of its own summary.
4. (c) The ceiling again (this host's speed drifts within minutes; the ratio is against the mean).

Prints each figure, the ratio ours / mean ceiling (issue 17's target: ≥ 0.85) and lines to paste
into docs/benchmarks.md. Release binaries: .build/release/sidecar and .build/release/sidecar-bench
(`swift build -c release`). Environment: SIDECAR_CACHE_DIR, if set, is passed to both as --cache-dir.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ECHO = REPO / "Examples" / "echo"
ITEM = "[1.0, 2.0, 3.0, 4.0]"
DONE_LINE = re.compile(r"batch: done: (\d+) lines, (\d+) ok, (\d+) failed in ([0-9.]+) s \((.+?) items/s\)")


def parse_rate(text: str) -> float:
    """'1.72 M', '146.1 k', '53000', '53.0k' → items/s."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKM]?)\s*", text)
    if not match:
        raise ValueError(f"not a rate: {text!r}")
    return float(match.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6}[match.group(2)]


def fmt(rate: float) -> str:
    return f"{rate / 1e6:.2f} M" if rate >= 1e6 else f"{rate / 1e3:.1f} k" if rate >= 1e3 else f"{rate:.0f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_input(path: Path, lines: int) -> None:
    line = (ITEM + "\n").encode()
    chunk = line * 10_000
    with open(path, "wb") as out:
        for _ in range(lines // 10_000):
            out.write(chunk)
        out.write(line * (lines % 10_000))


def count_lines(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            total += block.count(b"\n")
    return total


def ceiling(bench: Path, args: argparse.Namespace, cache: list[str], label: str) -> dict:
    command = [str(bench), "--models", f"echo={ECHO}={ITEM}", "--workers", str(args.workers), "--executors", "process",
               "--batch-sizes", str(args.batch_size), "--seconds", str(args.seconds), *cache]
    print(f"[{label}] {' '.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO))
    if done.returncode != 0:
        sys.exit(f"sidecar-bench exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] == f"{args.workers} process" and cells[1] == str(args.batch_size):
            row = {"items_per_second": parse_rate(cells[4]), "callers": cells[2], "mean_batch": cells[3], "row": line.strip()}
            print(f"[{label}] {fmt(row['items_per_second'])} items/s ({args.batch_size} items/call, {row['callers']} callers, "
                  f"mean batch {row['mean_batch']})", flush=True)
            return row
    sys.exit(f"no row for '{args.workers} process' at {args.batch_size} items/call in sidecar-bench's output:\n{done.stdout}")


def batch_job(sidecar: Path, workdir: Path, source: Path, args: argparse.Namespace, cache: list[str]) -> dict:
    output = workdir / "out.jsonl"
    command = [str(sidecar), "batch", str(ECHO), "--input", str(source), "--output", str(output),
               "--workers", str(args.workers), *cache]
    if args.span_lines:
        command += ["--span-lines", str(args.span_lines)]
    print(f"[batch] {' '.join(command)}", flush=True)
    stderr_path = workdir / "batch.stderr"
    with open(stderr_path, "wb") as stderr:
        start = time.monotonic()
        code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=str(REPO)).returncode
        wall = time.monotonic() - start
    text = stderr_path.read_text(errors="replace")
    if code != 0:
        sys.exit(f"sidecar batch exited {code}\n{text[-3000:]}")
    written = count_lines(output)
    if written != args.lines:
        sys.exit(f"sidecar batch wrote {written} output lines for {args.lines} input lines\n{text[-3000:]}")
    summary = DONE_LINE.search(text)
    result = {"wall_s": wall, "items_per_second": args.lines / wall, "summary": summary.group(0) if summary else None,
              "own_items_per_second": parse_rate(summary.group(5)) if summary else None,
              "own_seconds": float(summary.group(4)) if summary else None}
    own = f"; its own summary: {fmt(result['own_items_per_second'])} items/s in {result['own_seconds']:.2f} s" if summary else \
        "; no 'batch: done:' summary on stderr"
    print(f"[batch] {args.lines:,} lines in {wall:.2f} s wall: {fmt(result['items_per_second'])} items/s{own}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024, help="items per call of the sidecar-bench ceiling")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5, help="seconds measured per sidecar-bench row")
    parser.add_argument("--span-lines", type=int, default=None, help="passed to sidecar batch (default: its own)")
    parser.add_argument("--bin-dir", type=Path, default=REPO / ".build" / "release")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    sidecar, bench = args.bin_dir / "sidecar", args.bin_dir / "sidecar-bench"
    for binary in (sidecar, bench):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} not found: swift build -c release (or --bin-dir)")
    cache = ["--cache-dir", os.environ["SIDECAR_CACHE_DIR"]] if os.environ.get("SIDECAR_CACHE_DIR") else []
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-batch-"))
    try:
        source = workdir / "big.jsonl"
        write_input(source, args.lines)
        print(f"input: {source} ({args.lines:,} lines of {ITEM}, {source.stat().st_size / 1e6:.1f} MB)", flush=True)
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        before = ceiling(bench, args, cache, "ceiling before")
        ours = batch_job(sidecar, workdir, source, args, cache)
        after = ceiling(bench, args, cache, "ceiling after")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    mean = (before["items_per_second"] + after["items_per_second"]) / 2
    ratio = ours["items_per_second"] / mean
    verdict = "met" if ratio >= 0.85 else "not met"
    print()
    print(f"ratio (wall time) ours / mean ceiling: {ratio:.2f} (target ≥ 0.85: {verdict})")
    own_ratio = None
    if ours["own_items_per_second"]:
        own_ratio = ours["own_items_per_second"] / mean
        print(f"ratio (the job's own summary) / mean ceiling: {own_ratio:.2f}")
    print()
    print("--- for docs/benchmarks.md ---")
    print(f"`scripts/bench-batch-job.py`, release, {os.cpu_count()} cores ({cpu_model()}), {when}: "
          f"{args.lines:,} JSON Lines of `{ITEM}`, Examples/echo, {args.workers} workers.")
    print()
    print("| run | items/s |")
    print("| --- | --- |")
    print(f"| ceiling before: sidecar-bench, {args.workers} process, {args.batch_size} items/call "
          f"({before['callers']} callers, mean batch {before['mean_batch']}) | {fmt(before['items_per_second'])} |")
    print(f"| `sidecar batch` ({args.lines:,} lines, wall time {ours['wall_s']:.2f} s, start-up included) | "
          f"{fmt(ours['items_per_second'])} |")
    if ours["own_items_per_second"]:
        print(f"| `sidecar batch`, its own summary ({ours['own_seconds']:.2f} s) | {fmt(ours['own_items_per_second'])} |")
    print(f"| ceiling after | {fmt(after['items_per_second'])} |")
    print()
    own_text = f" ({own_ratio:.2f} × by the job's own timing)" if own_ratio is not None else ""
    print(f"Batch job / mean ceiling: **{ratio:.2f} ×** (wall time){own_text}; target ≥ 0.85 × — {verdict}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
