"""`sidecar_worker.embedded`: what the server's embedded executor calls, bytes in and bytes out."""

from __future__ import annotations

import json
import logging
import sys

from sidecar_worker import embedded
from sidecar_worker.proto import worker_pb2 as pb


def written(write_model, source: str):
    """The model directory after writing handler.py with `source`."""
    return write_model(source).parent


def run(runner: embedded.Runner, *items: bytes) -> pb.BatchResult:
    data = pb.Batch(id=5, items=list(items)).SerializeToString()
    return pb.BatchResult.FromString(runner.run(data))


def test_load_and_run_is_the_worker_batch_code(write_model):
    directory = written(write_model, "def predict(items):\n    return [i * 2 for i in items]\n")
    runner, failed = embedded.load(str(directory), "handler:predict", "m", "{}")
    assert failed == b"" and runner is not None
    result = run(runner, b"1", b"{bad", b"3")
    assert result.id == 5
    assert json.loads(result.outputs) == [2, None, 6]
    assert [e.index for e in result.item_errors] == [1]
    assert result.item_errors[0].error.kind == pb.INVALID_INPUT
    runner.close()


def test_a_raise_is_a_batch_error_of_kind_handler_raised(write_model):
    directory = written(write_model, "def predict(items):\n    raise KeyError('nope')\n")
    runner, _ = embedded.load(str(directory), "handler:predict", "m", "{}")
    assert runner is not None
    result = run(runner, b"1")
    assert result.batch_error.kind == pb.HANDLER_RAISED
    assert result.batch_error.type == "KeyError"
    runner.close()


def test_load_failure_comes_back_as_load_failed_bytes(write_model):
    directory = written(write_model, "import not_a_module_anywhere\n")
    runner, failed = embedded.load(str(directory), "handler:predict", "broken", "{}")
    assert runner is None
    error = pb.LoadFailed.FromString(failed).error
    assert error.type == "ModuleNotFoundError"
    assert "not_a_module_anywhere" in error.message
    assert str(directory) not in sys.path


def test_async_handler_runs_on_its_own_loop(write_model):
    directory = written(write_model, "import asyncio\nasync def predict(items):\n    await asyncio.sleep(0)\n    return items\n")
    runner, _ = embedded.load(str(directory), "handler:predict", "m", "{}")
    assert runner is not None
    assert json.loads(run(runner, b'"a"').outputs) == ["a"]
    runner.close()


def test_close_forgets_the_model_so_a_reload_imports_it_again(write_model):
    directory = written(write_model, "import helper\ndef predict(items):\n    return items\n")
    (directory / "helper.py").write_text("VALUE = 1\n")
    runner, _ = embedded.load(str(directory), "handler:predict", "m", "{}")
    assert runner is not None and "helper" in sys.modules and "handler" in sys.modules
    runner.close()
    assert "helper" not in sys.modules and "handler" not in sys.modules
    assert str(directory) not in sys.path


def test_model_logger_records_are_drained_as_log_records(write_model):
    directory = written(write_model, "import logging\nclass H:\n    def __init__(self, context):\n        self.log = context.logger\n"
        "    def predict(self, items):\n        self.log.warning('saw %d', len(items))\n        return items\n",
    )
    runner, _ = embedded.load(str(directory), "handler:H", "logged", "{}")
    assert runner is not None
    assert runner.drain_logs() == ()
    run(runner, b"1", b"2")
    records = [pb.LogRecord.FromString(r) for r in runner.drain_logs()]
    assert [(r.level, r.logger, r.message) for r in records] == [(logging.WARNING, "sidecar.model.logged", "saw 2")]
    assert runner.drain_logs() == ()
    runner.close()
