"""Idle unload waits for the gateway's notes before it stops an engine (subsystems/idle.py).

The gateway tells the daemon of a request's start lazily (at most channel.LAZY_S late): the idle
check asks for the notes on their way (``requests_settled``) and decides again on what they say.
The daemon here is a small double; the decision is the real ``idle_unload_due``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from supervisord_llm.subsystems.idle import IdleUnloadExtension

pytestmark = pytest.mark.anyio


class Engine:
    def __init__(self) -> None:
        self.name = "tiny"
        self.config = SimpleNamespace(idle_unload_s=60.0)
        self.state = "ready"
        self.ready_since_s = 0.0
        self.ready_here_since_s = 0.0  # when this daemon saw it ready
        self.commands: list[str] = []
        self.drained: list[bool] = []

    async def command(self, op: str, *, drain: bool = False, **_: Any) -> str:
        self.commands.append(op)
        self.drained.append(drain)
        return op


class Daemon:
    """Idle for 100 s; ``late_start`` is a request start the gateway sent a moment ago."""

    def __init__(self, late_start: bool) -> None:
        self.engine = Engine()
        self.supervisors = {"tiny": self.engine}
        self.clock = SimpleNamespace(now=lambda: 100.0)
        self.events = SimpleNamespace(emit=lambda *a, **k: None)
        self.late_start = late_start
        self.unloader: IdleUnloadExtension | None = None

    async def requests_settled(self) -> None:
        if self.late_start and self.unloader is not None:
            self.unloader.request_started("tiny")  # the note arrives while the check waits for it


@pytest.mark.parametrize("late_start", [False, True])
async def test_a_request_whose_start_was_on_its_way_keeps_the_engine_loaded(late_start: bool) -> None:
    daemon = Daemon(late_start)
    unloader = daemon.unloader = IdleUnloadExtension(daemon)
    await unloader.check()
    assert daemon.engine.commands == ([] if late_start else ["stop"])


async def test_an_idle_unload_drains_the_engine_before_it_stops() -> None:
    """A request let through on the gateway's pass in the moment the unload began is answered, not cut: the
    stop drains the engine (up to swap_drain) as a swap's does."""
    daemon = Daemon(late_start=False)
    unloader = daemon.unloader = IdleUnloadExtension(daemon)
    await unloader.check()
    assert daemon.engine.commands == ["stop"] and daemon.engine.drained == [True]


async def test_an_engine_adopted_by_a_restarted_daemon_gets_the_whole_idle_time_again() -> None:
    """Ready for hours under the last daemon (``ready_since_s``), adopted and checked 5 s ago by this one: it knows
    of no request before that, so the 60 s idle time counts from its own check, and nothing is unloaded."""
    daemon = Daemon(late_start=False)
    daemon.engine.ready_since_s = -7200.0
    daemon.engine.ready_here_since_s = 95.0
    unloader = daemon.unloader = IdleUnloadExtension(daemon)
    await unloader.check()
    assert daemon.engine.commands == []
