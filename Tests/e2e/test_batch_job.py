"""Batch scoring jobs (issue 17, part 3) end to end: real `sidecar batch` processes over real files,
and jobs through the admin API of a real `sidecar serve`.

- 200,000 JSON Lines with malformed lines, items the handler raises for and blank lines, SIGKILLed at
  ~50 % and resumed: one output line per good input, in order, with the right prediction; the errors
  file holds exactly the bad lines; the handler's own record (Tests/e2e/models/batchjob_record) shows
  that the items of spans finished before the kill were not scored again;
- CSV, quote-aware (commas, doubled quotes and newlines inside quotes), numbers, empty fields, rows
  with the wrong field count and an unterminated quote; `--format`, `--id-field`, `--errors`;
- JSON Lines items handed to the handler as they are, ids taken only from objects;
- Ctrl-C (SIGINT) mid-job: exit code 130, no output yet, `--resume` completes it;
- an existing job directory without --resume, a resume with a changed input (also one of the same
  size and mtime: only a hash tells) or span size: refused; the original input back, it completes;
- a model directory or input that cannot be used: exit 1;
- the admin API: POST a job, GET its progress until completed, list, cancel (DELETE) and resume;
  unknown model 404, a body without `input` 400 naming it;
- stderr that is not a terminal: periodic `batch:` lines and the `batch: done:` summary.

Environment: SIDECAR_BIN (default .build/debug/sidecar), SIDECAR_CACHE_DIR (default
.build/test-cache). Every `sidecar batch` here runs with `--workers 2` and the shared cache, so the
models' environment (no requirements, the same as Examples/echo's) is built once.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import chaos  # noqa: E402 - needs the path above

SIDECAR_BIN = os.environ.get("SIDECAR_BIN", str(REPO / ".build" / "debug" / "sidecar"))
CACHE_DIR = os.environ.get("SIDECAR_CACHE_DIR", str(REPO / ".build" / "test-cache"))
RECORD_MODEL = HERE / "models" / "batchjob_record"
ECHO_MODEL = HERE / "models" / "batchjob_echo"
TOKEN = "e2e-batch-job-token"

# A job that should take seconds gets this long before the test gives up on it.
JOB_TIMEOUT_S = 80.0
# How many spans may be in flight (read, being scored, not yet in a part file) when a job is killed:
# their items may be scored again by --resume, nothing else may.
SPANS_IN_FLIGHT_BOUND = 3

PROGRESS_LINE = re.compile(r"^batch: (\d+)/(\S+) lines, (\d+) ok, (\d+) failed, .*items/s")
# What may follow the rate before "; output" (e.g. ", 95000 resumed from an earlier run") is not checked.
DONE_LINE = re.compile(r"^batch: done: (\d+) lines, (\d+) ok, (\d+) failed in ([0-9.]+) s \((.+?) items/s\)(?:,[^;]*)?; "
                       r"output (.+), errors (.+)$")
CRASH_MARKS = re.compile(r"Fatal error|backtrace|Segmentation fault|Illegal instruction|"
                         r"Current stack trace|SIGSEGV|SIGILL|SIGABRT|SIGBUS|assertion failed|Trace/breakpoint",
                         re.IGNORECASE)


@pytest.fixture(autouse=True, scope="module")
def _binary():
    if not (os.path.isfile(SIDECAR_BIN) and os.access(SIDECAR_BIN, os.X_OK)):
        pytest.fail(f"sidecar binary not found or not executable: {SIDECAR_BIN} (set SIDECAR_BIN)")


# ------------------------------------------------------------------------------------------ inputs


def item_id(line: int) -> str:
    """Fixed width (11 characters), so a record file's size says how many ids it holds."""
    return f"item-{line:06d}"


RECORD_LINE_BYTES = len(item_id(1)) + 1

# Lines no JSON parser accepts (and none a lenient one would read as something else).
MALFORMED = [
    '{{"id": "{id}", "x": {n}',            # truncated
    '{{"id": "{id}" "x": {n}}}',           # missing comma
    "not json at all {n}",
    "{{'id': '{id}', 'x': {n}}}",          # single quotes
    '[1, 2, {n}',                          # unterminated array
    '{{"id": "{id}", "x": }}',             # missing value
    '{{"unterminated": "string {n}}}',     # unterminated string
    '}}{n}{{',
]


class JobInput:
    """A JSON Lines input for batchjob_record and everything a test expects of its job."""

    def __init__(self, path: Path, lines: int, malformed: int = 0, raising: int = 0, blank: int = 0, seed: int = 17):
        rng = random.Random(seed)
        special = rng.sample(range(2, lines), malformed + raising + blank)
        self.malformed = set(special[:malformed])
        if malformed >= 2:  # the first and the last line too
            self.malformed = set(special[:malformed - 2]) | {1, lines}
        self.raising = set(special[malformed:malformed + raising])
        self.blank = set(special[malformed + raising:])
        self.lines = lines
        self.good: list[int] = []
        with open(path, "w") as out:
            for n in range(1, lines + 1):
                if n in self.malformed:
                    out.write(MALFORMED[n % len(MALFORMED)].format(id=item_id(n), n=n) + "\n")
                elif n in self.raising:
                    out.write(json.dumps({"id": item_id(n), "x": n, "raise": f"boom-{n:06d}"}) + "\n")
                elif n in self.blank:
                    out.write("\n")
                else:
                    out.write(json.dumps({"id": item_id(n), "x": n}) + "\n")
                    self.good.append(n)
        self.path = path

    @property
    def bad(self) -> list[int]:
        return sorted(self.malformed | self.raising)

    @staticmethod
    def expected_output(n: int) -> dict:
        return {"line": n, "id": item_id(n), "prediction": {"id": item_id(n), "y": 2 * n + 1}}


# ----------------------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list:
    rows = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            try:
                rows.append(json.loads(text))
            except ValueError as error:
                raise AssertionError(f"{path}: line {number} is not JSON ({error}): {text[:200]!r}") from None
    return rows


def job_dir(output: Path) -> Path:
    return output.parent / (output.name + ".job")


def default_errors(output: Path) -> Path:
    return output.parent / (output.name + ".errors.jsonl")


def listing(directory: Path) -> str:
    try:
        return ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in sorted(directory.iterdir())) or "(empty)"
    except OSError as error:
        return f"({error})"


def record_model(into: Path, item_delay_s: float = 0.0, name: str | None = None, workers: int | None = None) -> tuple[Path, Path]:
    """A private copy of batchjob_record and the directory where its workers record what they scored."""
    record = into / "record"
    overrides: dict = {"config": {"record_dir": str(record), "item_delay_s": item_delay_s}}
    if name:
        overrides["name"] = name
    if workers:
        overrides["workers"] = workers
    into.mkdir(parents=True, exist_ok=True)
    return chaos.copy_model(RECORD_MODEL, into, overrides), record


def recorded(record: Path) -> Counter:
    """How many times each id was scored, over every worker's record file."""
    counts: Counter = Counter()
    if record.is_dir():
        for path in record.iterdir():
            counts.update(line for line in path.read_text().splitlines() if line)
    return counts


def recorded_total(record: Path) -> int:
    """Cheap count of ids recorded so far (ids are fixed width)."""
    total = 0
    try:
        for path in record.iterdir():
            total += path.stat().st_size
    except OSError:
        return 0
    return total // RECORD_LINE_BYTES


def wait_record_still(record: Path, quiet: float = 1.5, timeout: float = 30.0) -> bool:
    """Waits until nothing was recorded for `quiet` seconds; False if that never happened."""
    deadline = time.monotonic() + timeout
    last, since = recorded_total(record), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = recorded_total(record)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


def workers_of(model_dir: Path) -> list[int]:
    """Live worker processes serving `model_dir` (a test's private copy, so no one else's)."""
    wanted = {str(model_dir), os.path.realpath(model_dir)}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "sidecar_worker" not in args or "--model-dir" not in args:
            continue
        if args[args.index("--model-dir") + 1] in wanted and chaos.alive(int(entry)):
            found.append(int(entry))
    return found


def wait_workers_gone(model_dir: Path, timeout: float = 20.0) -> list[int]:
    """Waits for the workers of a killed job to notice (their lifeline) and exit; the survivors."""
    chaos.wait_until(lambda: not workers_of(model_dir), timeout=timeout, interval=0.05)
    return workers_of(model_dir)


def kill_leftovers(model_dir: Path) -> None:
    for pid in workers_of(model_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Batch:
    """One `sidecar batch` process, its stderr in a file (or read line by line with timestamps)."""

    def __init__(self, model: Path, input: Path, output: Path, *extra: str, workdir: Path, tag: str,
                 timed_stderr: bool = False, workers: int = 2):
        self.output = output
        self.command = [SIDECAR_BIN, "batch", str(model), "--input", str(input), "--output", str(output),
                        "--workers", str(workers), "--cache-dir", CACHE_DIR, *extra]
        self.stderr_path = workdir / f"{tag}.stderr"
        self.stdout_path = workdir / f"{tag}.stdout"
        self._stdout = open(self.stdout_path, "wb")
        self.timed_lines: list[tuple[float, str]] = []
        self._reader = None
        self.started = time.monotonic()
        if timed_stderr:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                            stderr=subprocess.PIPE, cwd=str(REPO))
            self._stderr = open(self.stderr_path, "wb")
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        else:
            self._stderr = open(self.stderr_path, "wb")
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                            stderr=self._stderr, cwd=str(REPO))

    def _read(self) -> None:
        for raw in self.process.stderr:
            self._stderr.write(raw)
            self._stderr.flush()
            self.timed_lines.append((time.monotonic() - self.started, raw.decode(errors="replace")))

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.close()
            raise AssertionError(f"sidecar batch did not finish within {timeout:.0f} s\n{self.describe()}") from None
        self.close()
        return code

    def close(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None
        for f in (self._stdout, self._stderr):
            if not f.closed:
                f.close()

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self) -> str:
        try:
            stdout = self.stdout_path.read_text(errors="replace")[-3000:]
        except OSError:
            stdout = ""
        return (f"command: {' '.join(self.command)}\nexit code: {self.process.returncode}\n"
                f"job dir {job_dir(self.output)}: {listing(job_dir(self.output))}\n"
                f"--- stderr (tail) ---\n{self.stderr[-6000:]}\n--- stdout (tail) ---\n{stdout}")


def run_batch(model: Path, input: Path, output: Path, *extra: str, workdir: Path, tag: str,
              timeout: float = JOB_TIMEOUT_S) -> Batch:
    batch = Batch(model, input, output, *extra, workdir=workdir, tag=tag)
    batch.wait(timeout)
    return batch


def interrupt_when(batch: Batch, predicate, sig: int, timeout: float = JOB_TIMEOUT_S) -> list[str]:
    """Sends `sig` to the batch process once `predicate()` holds; fails if the job ended first.
    Returns what went wrong meanwhile (an output file that appeared before the job completed)."""
    problems = []
    deadline = time.monotonic() + timeout
    while True:
        if batch.process.poll() is not None:
            batch.close()
            raise AssertionError(f"the job ended before the test could stop it (the test needs it to run longer)\n"
                                 f"{batch.describe()}")
        if batch.output.exists() or default_errors(batch.output).exists():
            problems.append(f"output or errors file present while the job ran: {listing(batch.output.parent)}")
        if predicate():
            batch.process.send_signal(sig)
            return problems
        if time.monotonic() > deadline:
            batch.process.kill()
            batch.wait()
            raise AssertionError(f"the job never reached the point to stop it within {timeout:.0f} s\n{batch.describe()}")
        time.sleep(0.005)


def check_output(output: Path, job: JobInput, context: str) -> None:
    rows = read_jsonl(output)
    lines = [row.get("line") if isinstance(row, dict) else row for row in rows]
    if lines != job.good:
        duplicates = [n for n, c in Counter(lines).items() if c > 1]
        missing = sorted(set(job.good) - set(lines))
        extra = sorted(set(lines) - set(job.good))
        disorder = next((i for i in range(1, len(lines)) if lines[i] <= lines[i - 1]), None)
        raise AssertionError(
            f"output lines are not exactly the good input lines in order: {len(rows)} rows for {len(job.good)} good lines; "
            f"duplicates {duplicates[:20]} ({len(duplicates)}), missing {missing[:20]} ({len(missing)}), "
            f"unexpected {extra[:20]} ({len(extra)}), first out of order at row {disorder}\n{context}")
    for row, n in zip(rows, job.good):
        expected = JobInput.expected_output(n)
        if row != expected:
            raise AssertionError(f"output row for line {n}: {row!r}, expected {expected!r}\n{context}")


def check_errors(errors: Path, job: JobInput, context: str) -> None:
    rows = read_jsonl(errors)
    lines = [row.get("line") for row in rows]
    assert lines == job.bad, (f"errors file lines {lines[:60]} ({len(lines)}), expected exactly the bad lines "
                              f"{job.bad[:60]} ({len(job.bad)}), in order; rows: {rows[:10]}\n{context}")
    for row in rows:
        n = row["line"]
        assert set(row) >= {"line", "id", "reason"}, f"errors row without line/id/reason: {row!r}"
        assert isinstance(row["reason"], str) and row["reason"].strip(), f"errors row with an empty reason: {row!r}"
        if n in job.malformed:
            # Not JSON, so no object: null, or what a scan of the line found (the spec allows "ID or null").
            assert row["id"] in (None, item_id(n)), f"line {n} is not JSON: {row!r}"
            assert "json" in row["reason"].lower(), f"the reason for line {n} should say it is not valid JSON: {row!r}"
        else:
            assert row["id"] == item_id(n), f"line {n} is the item {item_id(n)} that the handler raised for: {row!r}"
            assert f"boom-{n:06d}" in row["reason"], f"the reason for line {n} should carry the handler's message: {row!r}"


def done_line(stderr: str) -> re.Match:
    for line in stderr.splitlines():
        match = DONE_LINE.match(line.strip())
        if match:
            return match
    raise AssertionError(f"no 'batch: done: ...' summary on stderr:\n{stderr[-4000:]}")


def check_rescoring(before: Counter, after: Counter, job: JobInput, span_lines: int, context: str) -> None:
    """`before`: the record when the job was stopped (its workers gone); `after`: at the end of the
    resume. Every good item scored, none scored twice within one run, and only items of spans in
    flight at the stop scored again."""
    good = {item_id(n) for n in job.good}
    second = after - before
    facts = (f"scored before the stop {sum(before.values())}, by the resume {sum(second.values())}, "
             f"good items {len(good)}, span {span_lines} lines")
    assert set(after) == good, (f"scored ids differ from the good items: missing {sorted(good - set(after))[:10]}, "
                                f"unexpected {sorted(set(after) - good)[:10]}; {facts}\n{context}")
    for label, counts in (("before the stop", before), ("by the resume", second)):
        twice = [i for i, c in counts.items() if c > 1]
        assert not twice, f"items scored more than once {label} within one run: {twice[:10]} ({len(twice)}); {facts}\n{context}"
    again = sorted(set(before) & set(second))
    spans = sorted({(int(i[5:]) - 1) // span_lines for i in again})
    bound = SPANS_IN_FLIGHT_BOUND * span_lines
    assert len(again) <= bound, (
        f"{len(again)} items scored before the stop were scored again by the resume (bound: "
        f"{SPANS_IN_FLIGHT_BOUND} spans in flight = {bound}); they lie in spans {spans[:40]} "
        f"({len(spans)} spans, numbered from 0 by line); {facts}\n{context}")
    assert sum(after.values()) <= len(good) + bound, f"items scored in total {sum(after.values())}; {facts}\n{context}"


# ------------------------------------------------------------------------- 1. SIGKILL at ~50 %, resume


def test_sigkill_mid_job_then_resume_scores_only_unfinished_spans(tmp_path):
    span = 5_000
    job = JobInput(tmp_path / "input.jsonl", 200_000, malformed=37, raising=5, blank=3)
    # 20 µs per item: at least 2 s of scoring with 2 workers, so the kill lands in the middle.
    model, record = record_model(tmp_path / "model", item_delay_s=0.00002)
    output = tmp_path / "out" / "scores.jsonl"
    output.parent.mkdir()
    args = ("--span-lines", str(span))
    try:
        first = Batch(model, job.path, output, *args, workdir=tmp_path, tag="first")
        half = len(job.good) // 2
        problems = interrupt_when(first, lambda: recorded_total(record) >= half, signal.SIGKILL)
        killed_at = recorded_total(record)
        parts_at_kill = listing(job_dir(output))
        code = first.wait(30)
        assert code == -signal.SIGKILL, f"exit {code} (expected death by SIGKILL)\n{first.describe()}"
        survivors = wait_workers_gone(model)
        assert not survivors, f"workers {survivors} outlived the killed sidecar batch by 20 s\n{first.describe()}"
        assert not problems, problems
        assert not output.exists() and not default_errors(output).exists(), (
            f"a killed job left output or errors files (they must appear only when the job completes): "
            f"{listing(output.parent)}")
        assert job_dir(output).is_dir(), f"no job directory {job_dir(output)} after the kill: {listing(output.parent)}"
        before = recorded(record)

        second = run_batch(model, job.path, output, *args, "--resume", workdir=tmp_path, tag="resume")
        context = (f"killed when {killed_at} items were recorded; job dir at the kill: {parts_at_kill}\n"
                   f"--- first run ---\n{first.describe()}\n--- resume ---\n{second.describe()}")
        assert second.process.returncode == 0, context
        check_output(output, job, context)
        check_errors(default_errors(output), job, context)
        check_rescoring(before, recorded(record), job, span, context)
        summary = done_line(second.stderr)
        assert int(summary.group(2)) == len(job.good) and int(summary.group(3)) == len(job.bad), (
            f"summary {summary.group(0)!r}: expected {len(job.good)} ok, {len(job.bad)} failed over the whole job")
        assert not CRASH_MARKS.search(first.stderr + second.stderr), context
    finally:
        kill_leftovers(model)


# ------------------------------------------------------------------------------------------ 2. CSV

CSV_TEXT = (
    'id,name,score,note\n'                                  # 1: header
    '1,plain,3.5,héllo wörld\n'                             # 2
    '2,"with, comma",-7,"she said ""hi"""\n'                # 3
    '3,"two\nlines",1e3,\n'                                 # 4-5: newline inside quotes; empty last field
    '4,,0,""\n'                                             # 6: empty unquoted (null), empty quoted ("")
    '5,bad,row\n'                                           # 7: 3 fields
    '6,"42",-0.25,"a ""quoted"", multi\nline, field"\n'     # 8-9: a quoted number stays a string
    '7,x,y,z,extra\n'                                       # 10: 5 fields
    'abc,"three\nline\nname",12,tail\n'                     # 11-13
    '9,last good,100,ok\n'                                  # 14
    '10,"unterminated,5,never closed\n'                     # 15: the quote never ends
)
CSV_GOOD = [
    (2, {"id": 1, "name": "plain", "score": 3.5, "note": "héllo wörld"}),
    (3, {"id": 2, "name": "with, comma", "score": -7, "note": 'she said "hi"'}),
    (4, {"id": 3, "name": "two\nlines", "score": 1000, "note": None}),
    (6, {"id": 4, "name": None, "score": 0, "note": ""}),
    (8, {"id": 6, "name": "42", "score": -0.25, "note": 'a "quoted", multi\nline, field'}),
    (11, {"id": "abc", "name": "three\nline\nname", "score": 12, "note": "tail"}),
    (14, {"id": 9, "name": "last good", "score": 100, "note": "ok"}),
]
CSV_BAD = {7: 5, 10: 7, 15: 10}  # line → the id the row would have had (a malformed row's id may be null)


def test_csv_quote_aware_rows_numbers_nulls_and_malformed_rows(tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text(CSV_TEXT)
    output = tmp_path / "csv-out.jsonl"
    done = run_batch(ECHO_MODEL, source, output, workdir=tmp_path, tag="csv")
    context = done.describe()
    assert done.process.returncode == 0, context
    rows = read_jsonl(output)
    assert [r["line"] for r in rows] == [n for n, _ in CSV_GOOD], f"output lines {[r['line'] for r in rows]}\n{rows}\n{context}"
    for row, (n, parsed) in zip(rows, CSV_GOOD):
        assert row == {"line": n, "id": parsed["id"], "prediction": parsed}, (
            f"line {n}: got {row!r}, expected the row parsed as {parsed!r}")
        for key, value in parsed.items():  # 3 is not 3.0 and "42" is not 42: types matter, not only ==
            got = row["prediction"][key]
            if isinstance(value, str) or value is None:
                assert got == value and type(got) is type(value), f"line {n} {key}: {got!r}, expected {value!r}"
            else:
                assert isinstance(got, (int, float)) and not isinstance(got, bool), f"line {n} {key}: {got!r} is no number"
    errors = read_jsonl(default_errors(output))
    assert [e["line"] for e in errors] == sorted(CSV_BAD), f"errors {errors}, expected lines {sorted(CSV_BAD)}\n{context}"
    for error in errors:
        assert error["id"] in (None, CSV_BAD[error["line"]]), error
        assert isinstance(error["reason"], str) and error["reason"].strip(), error
    summary = done_line(done.stderr)
    assert (int(summary.group(2)), int(summary.group(3))) == (len(CSV_GOOD), len(CSV_BAD)), summary.group(0)

    # --format csv on a name that does not say csv, another id field, the errors file elsewhere.
    other = tmp_path / "table.dat"
    other.write_text('name,value\nalpha,1\n"beta, b",2.5\n"",\n')
    output2 = tmp_path / "dat-out.jsonl"
    errors2 = tmp_path / "elsewhere" / "errs.jsonl"
    errors2.parent.mkdir()
    done = run_batch(ECHO_MODEL, other, output2, "--format", "csv", "--id-field", "name", "--errors", str(errors2),
                     workdir=tmp_path, tag="dat")
    assert done.process.returncode == 0, done.describe()
    assert read_jsonl(output2) == [
        {"line": 2, "id": "alpha", "prediction": {"name": "alpha", "value": 1}},
        {"line": 3, "id": "beta, b", "prediction": {"name": "beta, b", "value": 2.5}},
        {"line": 4, "id": "", "prediction": {"name": "", "value": None}},
    ], done.describe()
    assert errors2.exists() and read_jsonl(errors2) == [], f"--errors {errors2}: {listing(errors2.parent)}"
    assert not default_errors(output2).exists(), "with --errors, no errors file at the default place"


def test_jsonl_items_reach_the_handler_as_they_are(tmp_path):
    items = [
        {"id": 7, "a": [1, 2]},
        {"no_id": True},
        [1, 2, 3],
        "a string",
        42,
        None,
        {"id": "x", "nested": {"id": "inner"}},
        {"id": {"k": 1}, "v": 2},
        {"id": "ü", "ünï": "çødé ✓"},
        {"id": 1.5},
    ]
    text = "\n".join(json.dumps(item, ensure_ascii=False) for item in items[:5]) + "\n\n" + \
           "\n".join(json.dumps(item, ensure_ascii=False) for item in items[5:]) + "\n"
    source = tmp_path / "items.jsonl"
    source.write_text(text)
    output = tmp_path / "items-out.jsonl"
    done = run_batch(ECHO_MODEL, source, output, workdir=tmp_path, tag="items")
    assert done.process.returncode == 0, done.describe()
    lines = [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # line 6 is blank
    expected = [{"line": n, "id": item.get("id") if isinstance(item, dict) else None, "prediction": item}
                for n, item in zip(lines, items)]
    assert read_jsonl(output) == expected, done.describe()
    assert read_jsonl(default_errors(output)) == [], done.describe()


def test_cannot_run_exits_1(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1}\n')
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    for label, model, input in (("model dir without handler.py", not_a_model, source),
                                ("model dir that does not exist", tmp_path / "nowhere", source),
                                ("input that does not exist", ECHO_MODEL, tmp_path / "missing.jsonl")):
        output = tmp_path / f"{label.replace(' ', '-')}.jsonl"
        done = run_batch(model, input, output, workdir=tmp_path, tag=label.replace(" ", "-"), timeout=60)
        assert done.process.returncode == 1, f"{label}: expected exit 1\n{done.describe()}"
        assert done.stderr.strip(), f"{label}: no message on stderr"
        assert not CRASH_MARKS.search(done.stderr), done.describe()
        assert not output.exists(), f"{label}: an output file appeared"


# ------------------------------------------------------------------------------------ 3. Ctrl-C


def test_sigint_mid_job_exits_130_and_resume_completes(tmp_path):
    span = 5_000
    job = JobInput(tmp_path / "input.jsonl", 100_000, malformed=11, raising=3, seed=3)
    model, record = record_model(tmp_path / "model", item_delay_s=0.0001)  # ~5 s with 2 workers
    output = tmp_path / "scores.jsonl"
    args = ("--span-lines", str(span))
    try:
        first = Batch(model, job.path, output, *args, workdir=tmp_path, tag="first")
        problems = interrupt_when(first, lambda: recorded_total(record) >= len(job.good) * 0.4, signal.SIGINT)
        interrupted = time.monotonic()
        code = first.wait(45)
        took = time.monotonic() - interrupted
        assert code == 130, f"exit {code} {took:.1f} s after SIGINT (expected 130)\n{first.describe()}"
        assert took < 30, f"exited {took:.1f} s after SIGINT\n{first.describe()}"
        assert not problems, problems
        assert not output.exists() and not default_errors(output).exists(), (
            f"output files after Ctrl-C (they appear only when the job completes): {listing(tmp_path)}")
        assert job_dir(output).is_dir(), f"Ctrl-C kept no progress: {listing(tmp_path)}"
        survivors = wait_workers_gone(model)
        assert not survivors, f"workers {survivors} outlived the interrupted job\n{first.describe()}"
        before = recorded(record)
        assert 0 < sum(before.values()) < len(job.good), f"{sum(before.values())} scored before the stop"

        second = run_batch(model, job.path, output, *args, "--resume", workdir=tmp_path, tag="resume")
        context = f"--- first run ---\n{first.describe()}\n--- resume ---\n{second.describe()}"
        assert second.process.returncode == 0, context
        check_output(output, job, context)
        check_errors(default_errors(output), job, context)
        check_rescoring(before, recorded(record), job, span, context)
        assert not CRASH_MARKS.search(first.stderr + second.stderr), context
    finally:
        kill_leftovers(model)


# --------------------------------------------------------------------- 4. refusals of the job dir


class KilledJob:
    """A 50,000-line job of batchjob_record SIGKILLed a quarter of the way: its job dir is left."""

    SPAN = 2_000

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.job = JobInput(tmp_path / "input.jsonl", 50_000, malformed=4, raising=2, seed=4)
        self.model, self.record = record_model(tmp_path / "model", item_delay_s=0.0001)  # ~2.5 s with 2 workers
        self.output = tmp_path / "scores.jsonl"
        self.args = ("--span-lines", str(self.SPAN))
        self.first = Batch(self.model, self.job.path, self.output, *self.args, workdir=tmp_path, tag="first")
        interrupt_when(self.first, lambda: recorded_total(self.record) >= len(self.job.good) * 0.25, signal.SIGKILL)
        self.first.wait(30)
        assert not wait_workers_gone(self.model), "workers outlived the killed job"
        assert job_dir(self.output).is_dir(), f"no job dir after the kill\n{self.first.describe()}"
        self.scored = sum(recorded(self.record).values())
        self.stat = self.job.path.stat()
        self.original = self.job.path.read_bytes()

    def run(self, *args: str, tag: str, timeout: float = 60) -> Batch:
        return run_batch(self.model, self.job.path, self.output, *args, workdir=self.tmp_path, tag=tag, timeout=timeout)

    def refused(self, done: Batch, label: str, words: list[str]) -> None:
        """The run could not run (exit 1), said why in `words`, wrote and scored nothing, kept the job dir."""
        text = done.stderr
        assert done.process.returncode == 1, f"{label}: expected exit 1 (the job could not run)\n{done.describe()}"
        assert all(w.lower() in text.lower() for w in words), f"{label}: the message should name {words}\n{done.describe()}"
        assert not CRASH_MARKS.search(text), done.describe()
        assert not self.output.exists(), f"{label}: an output file appeared"
        assert job_dir(self.output).is_dir(), f"{label}: the job dir is gone: {listing(self.tmp_path)}"
        assert sum(recorded(self.record).values()) == self.scored, f"{label}: the refused run scored items"

    def write_input(self, data: bytes) -> None:
        """Rewrites the input in place (same inode) with the original modification time."""
        with open(self.job.path, "r+b") as f:
            f.truncate(0)
            f.write(data)
        os.utime(self.job.path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))


def test_existing_job_dir_and_changed_input_or_span_are_refused(tmp_path):
    killed = KilledJob(tmp_path)
    try:
        jobdir_before = listing(job_dir(killed.output))
        # Without --resume: the job dir is there, the message says what to do.
        killed.refused(killed.run(*killed.args, tag="no-resume"), "rerun without --resume", ["--resume"])
        assert listing(job_dir(killed.output)) == jobdir_before, "the refused run changed the job dir"

        # A different span size.
        other_span = killed.run("--span-lines", str(KilledJob.SPAN * 2), "--resume", tag="span")
        killed.refused(other_span, "resume with another --span-lines", ["span"])

        # A changed input: one more line (size and mtime change).
        with open(killed.job.path, "ab") as f:
            f.write(b'{"id": "item-999999", "x": 1}\n')
        grown = killed.run(*killed.args, "--resume", tag="grown")
        killed.refused(grown, "resume with a grown input", ["input"])

        # The original input back (content and mtime): the resume goes on and completes the job.
        killed.write_input(killed.original)
        resumed = killed.run(*killed.args, "--resume", tag="resume", timeout=JOB_TIMEOUT_S)
        context = f"--- first ---\n{killed.first.describe()}\n--- resume ---\n{resumed.describe()}"
        assert resumed.process.returncode == 0, context
        check_output(killed.output, killed.job, context)
        check_errors(default_errors(killed.output), killed.job, context)
    finally:
        kill_leftovers(killed.model)


def test_resume_with_same_size_and_mtime_but_other_content_is_refused(tmp_path):
    """Only a hash of the input can tell: the spec refuses a resume whose input's size, mtime or hash changed."""
    killed = KilledJob(tmp_path)
    try:
        changed = bytearray(killed.original)
        at = changed.index(b"item-")
        changed[at:at + 4] = b"ITEM"
        killed.write_input(bytes(changed))
        assert killed.job.path.stat().st_size == killed.stat.st_size
        assert killed.job.path.stat().st_mtime_ns == killed.stat.st_mtime_ns
        edited = killed.run(*killed.args, "--resume", tag="edited", timeout=JOB_TIMEOUT_S)
        killed.refused(edited, "resume with an input of the same size and mtime but other content", ["input"])
    finally:
        kill_leftovers(killed.model)


# --------------------------------------------------------------------------------- 5. admin API


def admin_request(port: int, method: str, path: str, body: object | None = None, raw: bytes | None = None,
                  timeout: float = 30) -> tuple[int, object]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
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


def wait_job(port: int, job_id: str, states: tuple[str, ...], timeout: float = JOB_TIMEOUT_S) -> tuple[dict, list[dict]]:
    """Polls GET /admin/v1/jobs/ID until its state is one of `states`; (last body, every body seen)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        code, body = admin_request(port, "GET", f"/admin/v1/jobs/{job_id}")
        assert code == 200 and isinstance(body, dict), (code, body)
        seen.append(body)
        if body.get("state") in states:
            return body, seen
        assert body.get("state") in ("running", *states), f"unexpected job state: {body}"
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not {states} after {timeout:.0f} s: {body}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch-admin")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    fast, fast_record = record_model(tmp / "fast")
    slow, slow_record = record_model(tmp / "slow", item_delay_s=0.0004, name="batchjob_slow", workers=1)
    server = chaos.Sidecar([fast, slow], tmp, extra_args=["--admin-token-file", str(token_file)])
    server.start()
    server.records = {"batchjob_record": fast_record, "batchjob_slow": slow_record}
    yield server
    code = server.stop()
    assert code == 0, f"sidecar serve exit code {code}\n{server.log_tail()}"
    assert not CRASH_MARKS.search(server.log_tail(200_000)), server.log_tail()


def test_admin_api_job_runs_to_completion(job_server, tmp_path):
    port = job_server.admin_port
    job = JobInput(tmp_path / "input.jsonl", 20_000, malformed=6, raising=3, seed=5)
    output = tmp_path / "api-out.jsonl"
    code, body = admin_request(port, "POST", "/admin/v1/jobs", {
        "model": "batchjob_record", "input": str(job.path), "output": str(output), "span_lines": 2_000})
    assert code == 202 and isinstance(body, dict) and body.get("id"), (code, body, job_server.log_tail())
    job_id = str(body["id"])
    final, seen = wait_job(port, job_id, ("completed", "failed", "cancelled"))
    context = f"job {final}\n--- server log ---\n{job_server.log_tail()}"
    assert final["state"] == "completed" and not final.get("error"), context
    assert final["model"] == "batchjob_record" and final["input"] == str(job.path) and final["output"] == str(output), final
    assert final["lines"] == job.lines and final["done"] == job.lines, f"lines/done: {final}"
    assert final["ok"] == len(job.good) and final["failed"] == len(job.bad), final
    assert isinstance(final["items_per_second"], (int, float)) and final["items_per_second"] > 0, final
    done_values = [b.get("done") or 0 for b in seen]
    assert done_values == sorted(done_values), f"progress went backwards: {done_values}"
    check_output(output, job, context)
    check_errors(default_errors(output), job, context)

    code, listed = admin_request(port, "GET", "/admin/v1/jobs")
    jobs = listed.get("jobs") if isinstance(listed, dict) else listed
    assert code == 200 and isinstance(jobs, list), (code, listed)
    assert any(isinstance(j, dict) and str(j.get("id")) == job_id and j.get("state") == "completed" for j in jobs), listed

    code, body = admin_request(port, "GET", "/admin/v1/jobs/no-such-job")
    assert code == 404, (code, body)

    # Every field of the spec, "error" included (null when there is none), last so that the checks
    # above run even when one is missing.
    missing = [key for key in ("id", "model", "input", "output", "state", "lines", "done", "ok", "failed",
                               "items_per_second", "error") if key not in final]
    assert not missing, f"GET /admin/v1/jobs/{job_id} lacks {missing}: {final}"


def test_admin_api_refuses_unknown_model_and_bad_bodies(job_server, tmp_path):
    port = job_server.admin_port
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "item-000001", "x": 1}\n')
    output = str(tmp_path / "out.jsonl")
    code, body = admin_request(port, "POST", "/admin/v1/jobs", {"model": "no-such-model", "input": str(source), "output": output})
    assert code == 404, (code, body)
    assert isinstance(body, dict) and "no-such-model" in body.get("error", ""), body

    code, body = admin_request(port, "POST", "/admin/v1/jobs", {"model": "batchjob_record", "output": output})
    assert code == 400 and isinstance(body, dict) and "input" in body.get("error", ""), (code, body)

    code, body = admin_request(port, "POST", "/admin/v1/jobs", {"model": "batchjob_record", "input": str(source)})
    assert code == 400 and isinstance(body, dict) and "output" in body.get("error", ""), (code, body)

    code, body = admin_request(port, "POST", "/admin/v1/jobs",
                               {"model": "batchjob_record", "input": str(source), "output": output, "span_lines": "many"})
    assert code == 400 and isinstance(body, dict) and "span_lines" in body.get("error", ""), (code, body)

    code, body = admin_request(port, "POST", "/admin/v1/jobs", raw=b'{"model": "batchjob_record", ')
    assert code == 400, (code, body)
    assert not Path(output).exists()


def test_admin_api_cancel_keeps_progress_and_resume_completes(job_server, tmp_path):
    port = job_server.admin_port
    record = job_server.records["batchjob_slow"]
    job = JobInput(tmp_path / "input.jsonl", 30_000, malformed=3, raising=2, seed=6)  # ~12 s on one worker
    output = tmp_path / "cancelled.jsonl"
    request = {"model": "batchjob_slow", "input": str(job.path), "output": str(output), "span_lines": 1_000}
    code, body = admin_request(port, "POST", "/admin/v1/jobs", request)
    assert code == 202 and isinstance(body, dict) and body.get("id"), (code, body)
    job_id = str(body["id"])
    base = recorded_total(record)
    assert chaos.wait_until(lambda: recorded_total(record) - base >= 5_000, timeout=60, interval=0.02), \
        f"the job scored nothing in 60 s: {admin_request(port, 'GET', f'/admin/v1/jobs/{job_id}')}"
    code, body = admin_request(port, "DELETE", f"/admin/v1/jobs/{job_id}")
    assert 200 <= code < 300, (code, body)
    final, _ = wait_job(port, job_id, ("cancelled", "completed", "failed"), timeout=30)
    assert final["state"] == "cancelled", f"{final}\n{job_server.log_tail()}"
    assert final["done"] < job.lines, final
    assert not output.exists() and not default_errors(output).exists(), f"a cancelled job wrote its output: {listing(tmp_path)}"
    assert job_dir(output).is_dir(), f"the cancelled job kept no progress: {listing(tmp_path)}"
    # Batches already with the worker at the cancel may still finish: wait until the record is still.
    assert wait_record_still(record), "the model kept scoring for 30 s after the job was cancelled"
    before = recorded(record)

    code, body = admin_request(port, "POST", "/admin/v1/jobs", dict(request, resume=True))
    assert code == 202 and isinstance(body, dict) and body.get("id"), (code, body)
    final, _ = wait_job(port, str(body["id"]), ("completed", "failed", "cancelled"))
    context = f"job {final}\n--- server log ---\n{job_server.log_tail()}"
    assert final["state"] == "completed", context
    assert final["ok"] == len(job.good) and final["failed"] == len(job.bad), final
    check_output(output, job, context)
    check_errors(default_errors(output), job, context)
    # The same model served the other tests: count only this job's ids.
    mine = {item_id(n) for n in range(1, job.lines + 1)}
    after = Counter({k: v for k, v in recorded(record).items() if k in mine})
    before = Counter({k: v for k, v in before.items() if k in mine})
    check_rescoring(before, after, job, 1_000, context)


# ------------------------------------------------------------------------------ 6. plain progress


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    job = JobInput(tmp_path / "input.jsonl", 80_000, malformed=5, raising=2, seed=8)
    model, record = record_model(tmp_path / "model", item_delay_s=0.00015)  # ~6 s with 2 workers
    output = tmp_path / "progress.jsonl"
    try:
        batch = Batch(model, job.path, output, "--span-lines", "4000", workdir=tmp_path, tag="progress", timed_stderr=True)
        code = batch.wait()
        context = batch.describe()
        assert code == 0, context
        text = batch.stderr
        assert "\r" not in text and "\x1b" not in text, f"terminal control characters on a non-terminal stderr\n{context}"
        progress = [(t, PROGRESS_LINE.match(line.strip())) for t, line in batch.timed_lines]
        progress = [(t, m) for t, m in progress if m]
        assert len(progress) >= 2, f"expected periodic 'batch: N/M lines, ...' lines over a ~6 s job, got {len(progress)}\n{context}"
        gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:])]
        assert all(0.5 <= g <= 5.0 for g in gaps), f"progress lines {gaps} s apart (expected about 2 s)\n{context}"
        done = [int(m.group(1)) for _, m in progress]
        assert done == sorted(done) and all(d <= job.lines for d in done), f"done counts {done}\n{context}"
        for _, m in progress:
            assert m.group(2) in (str(job.lines), "?") or m.group(2).isdigit(), m.group(0)
            assert int(m.group(3)) + int(m.group(4)) <= job.lines, m.group(0)
        summary = done_line(text)
        assert int(summary.group(1)) == job.lines, f"{summary.group(0)!r}: the input has {job.lines} lines"
        assert int(summary.group(2)) == len(job.good) and int(summary.group(3)) == len(job.bad), summary.group(0)
        assert output.name in summary.group(6) and default_errors(output).name in summary.group(7), summary.group(0)
        order = [i for i, (_, line) in enumerate(batch.timed_lines) if PROGRESS_LINE.match(line.strip())]
        at = next(i for i, (_, line) in enumerate(batch.timed_lines) if DONE_LINE.match(line.strip()))
        assert max(order) < at, f"a progress line after the summary\n{context}"
        check_output(output, job, context)
        check_errors(default_errors(output), job, context)
    finally:
        kill_leftovers(model)
