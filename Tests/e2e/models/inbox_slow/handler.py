"""inbox_slow: an echo that takes BATCH_SLEEP_S per batch whatever its size (a model whose cost is per
call, as a GPU's often is), or the largest {"sleep": seconds} of the batch's items if one asks for
longer. The inbox/outbox tests use it to keep messages in flight: backpressure (pending bounded by
max_in_flight), a node stopped while it holds messages, a broker restart mid-stream, SIGTERM."""

import time

BATCH_SLEEP_S = 0.05


def predict(batch):
    asked = [float(item["sleep"]) for item in batch if isinstance(item, dict) and "sleep" in item]
    time.sleep(max([BATCH_SLEEP_S, *asked]))
    return batch
