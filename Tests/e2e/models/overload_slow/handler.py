"""80 ms per batch whatever its size: a model whose capacity is its batch size over its latency."""

import time


def predict(batch):
    time.sleep(0.08)
    return batch
