"""Exit at once when the supervisor dies.

The supervisor holds the worker's stdin open as a pipe: EOF on stdin means it is gone. As a second
signal, the parent pid changing (re-parenting to init or a subreaper) means the same.
"""

from __future__ import annotations

import os
import sys
import threading
import time

PARENT_POLL_SECONDS = 0.5


def _die(reason: str) -> None:
    try:
        sys.stderr.write(f"sidecar worker {os.getpid()}: {reason}; exiting\n")
        sys.stderr.flush()
    finally:
        os._exit(0)


def _watch_stdin() -> None:
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            break
        if not chunk:
            break
    _die("stdin closed (supervisor went away)")


def _watch_parent(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _die(f"parent process {parent} is gone")


def start(interval: float = PARENT_POLL_SECONDS) -> None:
    """Start both watchers as daemon threads."""
    parent = os.getppid()
    threading.Thread(target=_watch_stdin, name="sidecar-lifeline-stdin", daemon=True).start()
    threading.Thread(
        target=_watch_parent, args=(parent, interval), name="sidecar-lifeline-parent", daemon=True
    ).start()
