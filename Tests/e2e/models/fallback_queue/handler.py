"""A primary of Tests/e2e/test_fallback.py whose behaviour the test switches at run time through
files in the model directory (the test's private copy of it):

  mode       read at every call: `normal` (or no file) echoes every item; `raise` raises
             RuntimeError for the whole batch (so every item fails); `sleep MS` sleeps MS
             milliseconds, then echoes.
  calls      every call appends one line, the batch's size: the test counts the items that
             reached the handler (an item of a batch that raised may be counted more than once).
  BROKEN     checked at import: the import fails, so restarts fail and the model goes FAILED.
  slowstart  seconds, read at import: a new worker takes that long to load (a worker being
             replaced stays away that long).

A JSON item {"raise": "msg"} raises on its own (bisection then fails only that item); any other
item, tensor items included, is echoed.
"""

import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

if (HERE / "BROKEN").exists():
    raise ImportError("BROKEN flag present")
try:
    time.sleep(float((HERE / "slowstart").read_text()))
except (OSError, ValueError):
    pass


def _mode() -> list[str]:
    try:
        return (HERE / "mode").read_text().split() or ["normal"]
    except OSError:
        return ["normal"]


def predict(batch):
    with open(HERE / "calls", "a") as calls:
        calls.write(f"{len(batch)}\n")
    mode = _mode()
    if mode[0] == "raise":
        raise RuntimeError("fallback e2e: the primary raises (mode file says raise)")
    if mode[0] == "sleep":
        time.sleep(float(mode[1]) / 1000)
    for item in batch:
        if isinstance(item, dict) and isinstance(item.get("raise"), str):
            raise ValueError(item["raise"])
    return batch
