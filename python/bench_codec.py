"""Time the per-batch hot path: decode 1024 small JSON items, echo predict, encode.

    python bench_codec.py [--items 1024] [--seconds 3]

Prints items/s for the codec alone and for the full `process_sync` path (which adds building the
BatchResult protobuf), using orjson when it is installed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, List

from sidecar_worker.batch import process_sync
from sidecar_worker.codec import JSON_BACKEND, check_results, decode_items, encode_outputs
from sidecar_worker.handler import Handler
from sidecar_worker.proto import worker_pb2 as pb


def echo(items: List[Any]) -> List[Any]:
    return items


def rate(step: Callable[[], Any], items: int, seconds: float) -> float:
    step()  # warm up
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
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    items = [b'{"x": %d.5, "id": %d}' % (i % 10, i) for i in range(args.items)]
    batch = pb.Batch(id=1, items=items)
    handler = Handler(predict=echo, is_async=False, spec="bench:echo")

    def codec_only() -> bytes:
        decoded = decode_items(items)
        results = check_results(echo(decoded.values), len(items))
        outputs, _ = encode_outputs(results, len(items), decoded.indices)
        return outputs

    def full_path() -> pb.BatchResult:
        return process_sync(handler, batch)

    assert full_path().outputs == codec_only()
    print(f"json backend: {JSON_BACKEND}, batch of {args.items} items")
    print(f"codec (decode+echo+encode): {rate(codec_only, args.items, args.seconds):,.0f} items/s")
    print(f"process_sync (+BatchResult): {rate(full_path, args.items, args.seconds):,.0f} items/s")


if __name__ == "__main__":
    main()
