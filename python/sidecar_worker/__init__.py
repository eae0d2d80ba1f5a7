"""Sidecar's Python worker runtime.

One worker process loads one model handler and serves `sidecar.worker.v1.Worker/Session` on a Unix
socket for the Swift supervisor. Start it with ``python -m sidecar_worker --help``.

This package is copied into each model's site-packages as-is, so it must stay importable without
being built: no generated version files, no entry points.
"""

__version__ = "0.1.0"

# Bump together with the Swift side when worker.proto changes incompatibly.
PROTOCOL_VERSION = 1
