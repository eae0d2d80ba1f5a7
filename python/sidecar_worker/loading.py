"""Loading the model's handler from a ``module:attribute`` spec.

The attribute (which may be dotted, e.g. ``models.Classifier``) is either a function / coroutine
function used directly as ``predict``, or a class that is instantiated once (with a `Context` when its
``__init__`` takes an argument) and whose ``predict`` method is used.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List


@dataclass(frozen=True)
class Context:
    """What a handler class receives in ``__init__`` if it accepts an argument."""

    model_dir: Path
    worker_index: int
    model_name: str
    config: Dict[str, Any]
    logger: logging.Logger


def make_context(
    model_dir: Path, worker_index: int, model_name: str, config: Dict[str, Any]
) -> Context:
    return Context(
        model_dir=model_dir,
        worker_index=worker_index,
        model_name=model_name,
        config=config,
        logger=logging.getLogger(f"sidecar.model.{model_name}"),
    )


@dataclass(frozen=True)
class Handler:
    """A loaded handler: ``predict(items) -> results``, sync or ``async``."""

    predict: Callable[[List[Any]], Any]
    is_async: bool
    spec: str


class HandlerLoadError(Exception):
    """The handler could not be loaded; carries what goes into ``LoadFailed.error``."""

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _import_module(module_name: str, model_dir: Path) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            hint = module_name.replace(".", "/") + ".py"
            raise HandlerLoadError(
                type(exc).__name__,
                f"cannot import module {module_name!r} from {model_dir}: {exc}"
                f" — is there a {hint} in the model directory?",
                _format(exc),
            ) from None
        raise HandlerLoadError(
            type(exc).__name__,
            f"importing module {module_name!r} raised {type(exc).__name__}: {exc}",
            _format(exc),
        ) from None
    except Exception as exc:  # anything the module raises at import time, SyntaxError included
        raise HandlerLoadError(
            type(exc).__name__,
            f"importing module {module_name!r} raised {type(exc).__name__}: {exc}",
            _format(exc),
        ) from None


def _resolve(module: Any, module_name: str, attribute: str) -> Any:
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            location = getattr(module, "__file__", None) or "?"
            raise HandlerLoadError(
                "AttributeError",
                f"module {module_name!r} ({location}) has no attribute {attribute!r};"
                " define it or set handler: in sidecar.yaml",
            ) from None
    return target


def _init_takes_argument(cls: type) -> bool:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # e.g. builtins without a signature
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in signature.parameters.values())


def _instantiate(cls: type, spec: str, context: Context) -> Any:
    try:
        return cls(context) if _init_takes_argument(cls) else cls()
    except Exception as exc:
        raise HandlerLoadError(
            type(exc).__name__,
            f"creating {cls.__name__} ({spec}) raised {type(exc).__name__}: {exc}",
            _format(exc),
        ) from None


def is_async_callable(fn: Any) -> bool:
    """True for ``async def`` functions and bound methods, and objects with ``async def __call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


def load_handler(spec: str, context: Context) -> Handler:
    """Import ``module:attribute`` from ``context.model_dir``; raise `HandlerLoadError` on failure."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerLoadError(
            "ValueError", f"handler must look like 'module:attribute' (e.g. handler:predict), got {spec!r}"
        )
    model_dir = str(context.model_dir)
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    importlib.invalidate_caches()

    module = _import_module(module_name, context.model_dir)
    target = _resolve(module, module_name, attribute)

    if inspect.isclass(target):
        instance = _instantiate(target, spec, context)
        predict = getattr(instance, "predict", None)
        if predict is None:
            raise HandlerLoadError(
                "AttributeError",
                f"class {target.__name__} ({spec}) has no predict method;"
                " define def predict(self, items) returning one result per item",
            )
        if not callable(predict):
            raise HandlerLoadError(
                "TypeError",
                f"{target.__name__}.predict ({spec}) is not callable"
                f" (it is {type(predict).__name__})",
            )
    elif callable(target):
        predict = target
    else:
        raise HandlerLoadError(
            "TypeError",
            f"{spec} is not callable (it is {type(target).__name__}); it must be a function"
            " predict(items) or a class with a predict method",
        )
    return Handler(predict=predict, is_async=is_async_callable(predict), spec=spec)
