"""The transport's floor on the worker side: a bare grpcio server speaking worker.proto on a Unix
socket, with no Sidecar code — each Batch is answered at once with a BatchResult echoing its
items as a JSON array. `--api sync` is grpcio's synchronous server (handlers on a thread pool);
`--api aio` is grpc.aio on an asyncio loop, as the real worker is. Used by scripts/bench-hop.sh.

    python hop_floor_server.py --socket /tmp/floor.sock --api sync
"""

import argparse
import asyncio
import os
import signal
import sys
from concurrent import futures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import grpc  # noqa: E402

from sidecar_worker.proto import worker_pb2 as pb  # noqa: E402
from sidecar_worker.proto import worker_pb2_grpc as rpc  # noqa: E402

MAX_MESSAGE = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def answer(batch: pb.Batch) -> pb.WorkerMessage:
    return pb.WorkerMessage(result=pb.BatchResult(id=batch.id, outputs=b"[" + b",".join(batch.items) + b"]"))


class SyncWorker(rpc.WorkerServicer):
    def Session(self, request_iterator, context):
        for message in request_iterator:
            if message.HasField("batch"):
                yield answer(message.batch)
            elif message.HasField("ping"):
                yield pb.WorkerMessage(pong=pb.Pong(nonce=message.ping.nonce))


class AsyncWorker(rpc.WorkerServicer):
    async def Session(self, request_iterator, context):
        async for message in request_iterator:
            if message.HasField("batch"):
                yield answer(message.batch)
            elif message.HasField("ping"):
                yield pb.WorkerMessage(pong=pb.Pong(nonce=message.ping.nonce))


def serve_sync(socket_path: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=OPTIONS)
    rpc.add_WorkerServicer_to_server(SyncWorker(), server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


async def serve_aio(socket_path: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    rpc.add_WorkerServicer_to_server(AsyncWorker(), server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--api", choices=["sync", "aio"], default="sync")
    args = parser.parse_args()
    if args.api == "sync":
        serve_sync(args.socket)
    else:
        asyncio.run(serve_aio(args.socket))


if __name__ == "__main__":
    main()
