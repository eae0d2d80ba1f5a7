"""embedded_slow: echo that takes 0.5 s per batch (time.sleep), so requests are still in flight when
a test sends SIGTERM to the server (Tests/e2e/test_embedded.py: draining an embedded model)."""

import time


def predict(batch):
    time.sleep(0.5)
    return batch
