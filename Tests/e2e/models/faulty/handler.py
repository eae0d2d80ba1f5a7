"""faulty: an echo model that misbehaves on request, for the fault-injection tests (scripts/chaos.py,
Tests/e2e/test_faults.py).

A number or string item is echoed back. A dict item asks for a fault:
  {"sleep": seconds}  sleep, then echo the item (slow batches: overload, deadlines)
  {"raise": "msg"}    raise ValueError(msg) for the whole batch (Sidecar bisects it, only this item fails)
  {"crash": true}     os._exit(17): the worker process dies mid-batch (crash bisection, max_retries)
  {"hang": true}      sleep for ~11 days: the batch never finishes (batch_timeout_s detection)
Any other item is echoed.

A file named BROKEN in the model directory makes the import fail, so a test can make restarts fail
(create it, kill the workers, watch the model go FAILED). Tests copy this directory before touching it.
"""

import os
import time
from pathlib import Path

# Checked at import, not per batch: the point is a worker that cannot start, not one that errors.
if (Path(__file__).resolve().parent / "BROKEN").exists():
    raise ImportError("BROKEN flag present")


def predict(batch):
    # Faults act in item order, so a batch that holds several faulty items fails the way its first
    # one asks; bisection then separates them.
    for item in batch:
        if not isinstance(item, dict):
            continue
        if "sleep" in item:
            time.sleep(float(item["sleep"]))
        if item.get("hang"):
            time.sleep(10**6)
        if "raise" in item:
            raise ValueError(str(item["raise"]))
        if item.get("crash"):
            # os._exit skips every handler and flush: the closest Python gets to a segfault.
            os._exit(17)
    return batch
