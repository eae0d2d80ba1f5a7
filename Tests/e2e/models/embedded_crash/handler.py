"""embedded_crash: echo, except that an item equal to "crash" segfaults the process it runs in.

ctypes.string_at(0) reads address 0: SIGSEGV in native code, which no Python `except` can catch.
With `executor: embedded` that process is the server itself (Tests/e2e/test_embedded.py).
"""

import ctypes


def predict(batch):
    for item in batch:
        if item == "crash":
            ctypes.string_at(0)
    return batch
