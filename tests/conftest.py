from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MlxServer, tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The embedded default model (deterministic random weights, real tokenizer)."""
    return tiny_model_dir()


@pytest.fixture
def mlx_server(tiny_model: Path) -> Iterator[MlxServer]:
    """A real mlx_lm.server serving the tiny model, stopped after the test."""
    server = MlxServer(tiny_model)
    try:
        yield server
    finally:
        server.close()
