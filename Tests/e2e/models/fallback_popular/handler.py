"""fallback_popular: the fallback model of Tests/e2e/test_fallback.py's primaries.

It answers a value no primary ever returns, so a test can tell who answered: a tensor item (a dict
of numpy arrays, an Open Inference Protocol request) gets each of its inputs back filled with 42
(same name, shape and datatype); any other item (JSON: KServe v1, library predict) gets
{"popular": 42}.
"""

import numpy as np


def predict(batch):
    answers = []
    for item in batch:
        if isinstance(item, dict) and item and all(isinstance(v, np.ndarray) for v in item.values()):
            answers.append({name: np.full(v.shape, 42, dtype=v.dtype) for name, v in item.items()})
        else:
            answers.append({"popular": 42})
    return answers
