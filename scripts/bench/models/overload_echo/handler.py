"""Echo: every item back unchanged."""


def predict(batch):
    return batch
