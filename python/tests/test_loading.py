from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar_worker.loading import Context, HandlerLoadError, load_handler, make_context


def context(model_dir: Path, config: dict | None = None) -> Context:
    return make_context(model_dir, 3, "iris", config or {"k": 1})


def load_error(spec: str, model_dir: Path) -> HandlerLoadError:
    with pytest.raises(HandlerLoadError) as info:
        load_handler(spec, context(model_dir))
    return info.value


def test_function(model_dir, write_model):
    write_model("def predict(items):\n    return [x * 2 for x in items]\n")
    handler = load_handler("handler:predict", context(model_dir))
    assert not handler.is_async
    assert handler.predict([1, 2]) == [2, 4]


def test_class_with_context(model_dir, write_model):
    write_model(
        """
        class Model:
            def __init__(self, ctx):
                self.ctx = ctx
            def predict(self, items):
                c = self.ctx
                return [[c.model_name, c.worker_index, c.config["k"], c.model_dir.name, c.logger.name]
                        for _ in items]
        """
    )
    handler = load_handler("handler:Model", context(model_dir))
    assert handler.predict([None]) == [["iris", 3, 1, "model", "sidecar.model.iris"]]


def test_class_without_context(model_dir, write_model):
    write_model(
        """
        class Model:
            def __init__(self):
                self.offset = 10
            def predict(self, items):
                return [x + self.offset for x in items]
        """
    )
    assert load_handler("handler:Model", context(model_dir)).predict([1]) == [11]


def test_class_without_init(model_dir, write_model):
    write_model("class Model:\n    def predict(self, items):\n        return items\n")
    assert load_handler("handler:Model", context(model_dir)).predict([5]) == [5]


def test_async_function(model_dir, write_model):
    write_model("async def predict(items):\n    return list(items)\n")
    handler = load_handler("handler:predict", context(model_dir))
    assert handler.is_async
    assert asyncio.run(handler.predict([1])) == [1]


def test_async_method(model_dir, write_model):
    write_model(
        """
        class Model:
            async def predict(self, items):
                return [-x for x in items]
        """
    )
    handler = load_handler("handler:Model", context(model_dir))
    assert handler.is_async
    assert asyncio.run(handler.predict([1])) == [-1]


def test_dotted_attribute_and_package_module(model_dir, write_model):
    (model_dir / "pkg").mkdir()
    (model_dir / "pkg" / "__init__.py").write_text("")
    (model_dir / "pkg" / "serving.py").write_text(
        "class Models:\n    class Classifier:\n        def predict(self, items):\n            return ['c'] * len(items)\n"
    )
    handler = load_handler("pkg.serving:Models.Classifier", context(model_dir))
    assert handler.predict([1, 2]) == ["c", "c"]


def test_missing_module(model_dir):
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "ModuleNotFoundError"
    assert error.message == (
        f"cannot import module 'handler' from {model_dir}: No module named 'handler'"
        " — is there a handler.py in the model directory?"
    )


def test_missing_dependency_is_not_reported_as_missing_handler(model_dir, write_model):
    write_model("import sidecar_no_such_dependency_xyz\n")
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "ModuleNotFoundError"
    assert "sidecar_no_such_dependency_xyz" in error.message
    assert "is there a handler.py" not in error.message
    assert "handler.py" in error.traceback_text


def test_missing_attribute(model_dir, write_model):
    path = write_model("def predikt(items):\n    return items\n")
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "AttributeError"
    assert error.message == (
        f"module 'handler' ({path}) has no attribute 'predict'; define it or set handler: in sidecar.yaml"
    )


def test_not_callable(model_dir, write_model):
    write_model("predict = 42\n")
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "TypeError"
    assert "handler:predict is not callable (it is int)" in error.message


def test_class_without_predict(model_dir, write_model):
    write_model("class Model:\n    def run(self, items):\n        return items\n")
    error = load_error("handler:Model", model_dir)
    assert "class Model (handler:Model) has no predict method" in error.message


def test_import_time_exception_has_file_and_line(model_dir, write_model):
    path = write_model("import os\n\nx = 1 / 0\n")
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "ZeroDivisionError"
    assert error.message == "importing module 'handler' raised ZeroDivisionError: division by zero"
    assert f'File "{path}", line 3' in error.traceback_text
    assert "\n" not in error.message


def test_syntax_error(model_dir, write_model):
    path = write_model("def predict(items:\n")
    error = load_error("handler:predict", model_dir)
    assert error.type_name == "SyntaxError"
    assert str(path) in error.traceback_text


def test_init_exception(model_dir, write_model):
    path = write_model(
        """
        class Model:
            def __init__(self, ctx):
                raise RuntimeError("weights not found in " + str(ctx.model_dir))
            def predict(self, items):
                return items
        """
    )
    error = load_error("handler:Model", model_dir)
    assert error.type_name == "RuntimeError"
    assert error.message == f"creating Model (handler:Model) raised RuntimeError: weights not found in {model_dir}"
    assert f'File "{path}", line 4, in __init__' in error.traceback_text


def test_bad_spec(model_dir):
    assert "module:attribute" in load_error("handler", model_dir).message
