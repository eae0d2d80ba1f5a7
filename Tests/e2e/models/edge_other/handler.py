"""Echo: returns every item unchanged (Tests/e2e/test_edge.py: TLS, API keys, rate limits, slow clients)."""


def predict(batch):
    return batch
