"""Echo: returns every item unchanged (the fast model beside the overloaded ones)."""


def predict(batch):
    return batch
