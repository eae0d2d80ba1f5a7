"""The fallback: the most popular answer, at once."""


def predict(batch):
    return ["popular"] * len(batch)
