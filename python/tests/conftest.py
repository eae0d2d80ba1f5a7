from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest

WriteModel = Callable[..., Path]


@pytest.fixture
def model_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty model directory; modules imported from it are forgotten after the test."""
    directory = tmp_path / "model"
    directory.mkdir()
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    yield directory
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None) or ""
        if file.startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def write_model(model_dir: Path) -> WriteModel:
    """write_model(source, name="handler") writes <model_dir>/<name>.py (dedented)."""

    def write(source: str, name: str = "handler") -> Path:
        path = model_dir / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write
