"""typed: a model with declared inputs/outputs for the end-to-end tests of the network front.

Input x: FP32 [-1, 4]. Outputs: doubled = x * 2 (FP32), label = [b"ok"] (BYTES).
Any negative element raises ValueError("negative input").
"""

import numpy as np


def predict(batch):
    results = []
    for item in batch:
        x = item["x"]
        if (x < 0).any():
            raise ValueError("negative input")
        results.append({"doubled": x * 2, "label": np.array([b"ok"], dtype=object)})
    return results
