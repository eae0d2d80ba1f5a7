"""200 ms per batch: a primary slowed past any sensible latency budget."""

import time


def predict(batch):
    time.sleep(0.2)
    return batch
