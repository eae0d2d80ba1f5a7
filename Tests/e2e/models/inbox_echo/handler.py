"""inbox_echo: returns every item unchanged (Examples/echo's handler), for the inbox/outbox tests'
throughput runs (Tests/e2e/test_inbox.py): an `item` message's prediction is its item, a `request`
message's response has one output per input, of the same name, datatype, shape and data."""


def predict(batch):
    return batch
