"""inbox_faulty: an echo that misbehaves on marked items, for the inbox/outbox tests' poison
messages (Tests/e2e/test_inbox.py). Numbers, strings, lists and unmarked dicts are echoed. A dict item
asks for a fault:
  {"raise": "msg"}        raise ValueError(msg) for the whole batch (isolation finds this item)
  {"crash": true}         os._exit(17): the worker process dies mid-batch (crash halving, max_retries)
  {"kill_server": true}   SIGKILL the worker's parent, the `sidecar serve` process itself: the whole
                          server dies while the message is in flight (max_deliveries)
  {"sleep": seconds}      sleep, then echo
"""

import os
import signal
import time
from pathlib import Path


def _kill_server() -> None:
    parent = os.getppid()
    try:
        args = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        args = []
    # Only the server that started this worker: never init or whoever adopted an orphan.
    if parent > 1 and b"serve" in args and any(arg.endswith(b"sidecar") for arg in args):
        os.kill(parent, signal.SIGKILL)
        time.sleep(30)  # the lifeline (stdin EOF) ends this process once the server is gone
    raise RuntimeError(f"kill_server: the parent {parent} is not a sidecar server ({args[:2]!r})")


def predict(batch):
    # Faults act in item order, so a batch that holds several marked items fails the way its first
    # one asks; isolation then separates them.
    for item in batch:
        if not isinstance(item, dict):
            continue
        if "sleep" in item:
            time.sleep(float(item["sleep"]))
        if "raise" in item:
            raise ValueError(str(item["raise"]))
        if item.get("crash"):
            os._exit(17)  # skips every handler and flush: the closest Python gets to a segfault
        if item.get("kill_server"):
            _kill_server()
    return batch
