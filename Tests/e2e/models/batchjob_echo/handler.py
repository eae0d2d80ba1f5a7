"""batchjob_echo: returns every item unchanged (what the batch job handed the handler)."""


def predict(batch):
    return batch
