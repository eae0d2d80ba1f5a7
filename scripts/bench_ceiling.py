"""The ceiling the Sidecar benchmark compares to: the same handler in a plain Python loop.

Run with the model environment's interpreter (it imports the installed sidecar_worker runtime):

    ENV/bin/python scripts/bench_ceiling.py --model-dir Examples/iris --handler handler:IrisClassifier \
        --item '[5.1, 3.5, 1.4, 0.2]' --batch-sizes 1,16,256 --seconds 2

For each batch size it prints one JSON line with two rates, in items per second, for one process
(with --serve, for each batch size read from a line of standard input, so that a benchmark can
measure the ceiling right before and right after its own run, on a host whose speed drifts):
  handler  predict(batch) over already-decoded batches: the handler alone;
  codec    decode the batch's JSON items, predict, encode the outputs: the least a JSON server must
           do per batch, without any transport.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from sidecar_worker.codec import check_results, decode_items, encode_outputs
from sidecar_worker.loading import load_handler, make_context


def rate(step: Callable[[], Any], items: int, seconds: float) -> float:
    step()
    count = 0
    start = time.perf_counter()
    while True:
        step()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * items / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--handler", default="handler:predict")
    parser.add_argument("--item", required=True, help="one JSON item, repeated to fill each batch")
    parser.add_argument("--batch-sizes", default="1,16,128,1024")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--config-json", default="{}")
    parser.add_argument("--serve", action="store_true", help="read batch sizes from stdin, one per line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_dir = Path(args.model_dir).resolve()
    context = make_context(model_dir, 0, model_dir.name, json.loads(args.config_json))
    handler = load_handler(args.handler, context)
    if handler.is_async:
        raise SystemExit("bench_ceiling.py measures sync handlers only")
    predict = handler.predict
    item = args.item.encode()

    sizes = (int(line) for line in sys.stdin if line.strip()) if args.serve else (int(s) for s in args.batch_sizes.split(","))
    for size in sizes:
        raw = [item] * size
        decoded = decode_items(raw).values

        def codec() -> bytes:
            batch = decode_items(raw)
            results = check_results(predict(batch.values), size)
            outputs, _ = encode_outputs(results, size, batch.indices)
            return outputs

        print(json.dumps({
            "batch": size,
            "handler": rate(lambda: predict(decoded), size, args.seconds),
            "codec": rate(codec, size, args.seconds),
        }), flush=True)


if __name__ == "__main__":
    main()
