from __future__ import annotations

import asyncio
import logging
import threading

from sidecar_worker.logs import LogForwarder


def make_logger(forwarder: LogForwarder, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [forwarder]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_buffers_until_attached_then_forwards_from_threads():
    forwarder = LogForwarder(capacity=3)
    logger = make_logger(forwarder, "sidecar.model.test_logs")
    for i in range(5):
        logger.info("early %d", i)

    async def scenario():
        received = []
        queue = asyncio.Queue()
        forwarder.attach(asyncio.get_running_loop(), queue.put_nowait)
        thread = threading.Thread(target=lambda: logger.warning("from a thread"))
        thread.start()
        thread.join()
        for _ in range(4):
            received.append(await asyncio.wait_for(queue.get(), 5))
        forwarder.detach()
        return received

    received = asyncio.run(scenario())
    assert [m.log.message for m in received] == ["early 2", "early 3", "early 4", "from a thread"]
    assert received[-1].log.level == logging.WARNING
    assert received[-1].log.logger == "sidecar.model.test_logs"

    logger.info("after detach")  # buffered again, not sent to a dead loop
    assert [m.log.message for m in forwarder._buffer] == ["after detach"]


def test_exception_text_is_included():
    forwarder = LogForwarder()
    logger = make_logger(forwarder, "sidecar.model.test_logs_exc")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    message = forwarder._buffer[-1].log.message
    assert message.startswith("failed\nTraceback")
    assert "ValueError: boom" in message
