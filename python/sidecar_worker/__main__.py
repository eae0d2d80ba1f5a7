"""``python -m sidecar_worker --socket ... --model-dir ... --handler module:attr ...``"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .server import DEFAULT_MAX_MESSAGE_BYTES, Options, run


def parse_args(argv: Optional[List[str]] = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m sidecar_worker", description="Sidecar Python worker")
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket path to serve on")
    parser.add_argument("--model-dir", required=True, type=Path, help="model directory (put on sys.path)")
    parser.add_argument("--handler", required=True, help="module:attribute, e.g. handler:predict")
    parser.add_argument("--model-name", default=None, help="model name (default: model dir name)")
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument("--config-json", default="{}", help="JSON object passed as Context.config")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument(
        "--no-lifeline",
        action="store_true",
        help="do not exit on stdin EOF / parent change (for running without a supervisor)",
    )
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config_json)
    except ValueError as exc:
        parser.error(f"--config-json is not valid JSON: {exc}")
    if not isinstance(config, dict):
        parser.error("--config-json must be a JSON object")
    model_dir = args.model_dir.resolve()
    return Options(
        socket=args.socket,
        model_dir=model_dir,
        handler=args.handler,
        model_name=args.model_name or model_dir.name,
        worker_index=args.worker_index,
        config=config,
        max_message_bytes=args.max_message_bytes,
        lifeline=not args.no_lifeline,
    )


def main(argv: Optional[List[str]] = None) -> None:
    code = run(parse_args(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a predict thread that outlived the grace period must not block exit.
    os._exit(code)


if __name__ == "__main__":
    main()
