"""batchjob_record: a scoring model that keeps a record of what it scored, for the batch-job tests.

Items are {"id": ID, "x": NUMBER}; the prediction is {"id": ID, "y": 2 * x + 1}. An item with a
"raise" key makes the call raise ValueError(item["raise"]) before anything is scored (Sidecar then
isolates that item; the others are scored in a later call).

Each successful call appends the ids of its items, one per line, to a file of its own worker process
(`worker-<pid>.ids` in config.record_dir, default <model dir>/scored), with a single O_APPEND write,
so a test can count how many times each item was scored: once per call that returned it. Calls that
raise record nothing. config.item_delay_s sleeps that long per item, to make a job last.
"""

import os
import time


class Model:
    def __init__(self, context):
        config = context.config or {}
        self.delay = float(config.get("item_delay_s") or 0)
        record_dir = config.get("record_dir") or str(context.model_dir / "scored")
        os.makedirs(record_dir, exist_ok=True)
        path = os.path.join(record_dir, f"worker-{os.getpid()}.ids")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def predict(self, batch):
        for item in batch:
            if isinstance(item, dict) and "raise" in item:
                raise ValueError(str(item["raise"]))
        if self.delay:
            time.sleep(self.delay * len(batch))
        results = []
        ids = []
        for item in batch:
            if isinstance(item, dict):
                results.append({"id": item.get("id"), "y": 2 * item.get("x", 0) + 1})
                ids.append(str(item.get("id")))
            else:
                results.append(item)
                ids.append(repr(item))
        os.write(self.fd, "".join(i + "\n" for i in ids).encode())
        return results
