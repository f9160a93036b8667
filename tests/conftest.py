from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MlxServer, tiny_model_dir

# A daemon the tests run as a process refuses events of kinds (or fields) the registry does not know.
os.environ.setdefault("SUPERVISORD_LLM_STRICT_EVENTS", "1")


@pytest.fixture(autouse=True)
def strict_engine_transitions() -> Iterator[None]:
    """In tests an engine state change the transition table does not allow raises instead of being logged."""
    from supervisord_llm.engine.supervisor import EngineSupervisor

    EngineSupervisor.strict_transitions = True
    yield
    EngineSupervisor.strict_transitions = False


@pytest.fixture(autouse=True)
def strict_event_kinds() -> Iterator[None]:
    """In tests the daemon's event of an unregistered kind or field raises instead of being logged."""
    from supervisord_llm.events import EventLog

    EventLog.strict_kinds = True
    yield
    EventLog.strict_kinds = False


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The daemon is an asyncio application: pin the anyio plugin's backend."""
    return "asyncio"


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


@pytest.fixture
def daemon_factory():
    """Start real daemons; every one is stopped and its engines killed after the test."""
    from tests.helpers import Daemon

    made: list[Daemon] = []

    def make(config_text: str, **kwargs) -> Daemon:
        d = Daemon(config_text, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def alertmanager():
    """A real Alertmanager (the distribution's package) on a free port; skipped where it is not installed."""
    from tests.alertmanager import Alertmanager

    am = Alertmanager()
    try:
        yield am
    finally:
        am.close()
