"""Idle unload (room: engine runtime): an engine with ``idle_unload`` set is stopped gracefully after
that long without a real request, and the next request for it starts it again (the gateway's
start-on-demand, with memory admission and the 60 s spawn floor as for any start).

Only requests through the gateway count: the daemon's own canaries never keep a model loaded
(llama-swap's ``ttl``, Ollama's ``keep_alive`` and LM Studio's idle TTL behave the same way). The
decision is ``policies.frontdoor.idle_unload_due``; this module only keeps the times and acts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio

from policies.frontdoor import idle_unload_due
from supervisord_llm.extension import Extension

CHECK_INTERVAL_S = 5.0
IDLE_REASON = "idle"


class IdleUnloadExtension(Extension):
    """Stops engines idle for longer than their ``idle_unload``; the gateway notes each real request."""

    name = "idle_unload"

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.last_request_s: dict[str, float] = {}
        self.in_flight: dict[str, int] = {}

    def request_started(self, engine: str) -> None:
        self.last_request_s[engine] = self.daemon.clock.now()
        self.in_flight[engine] = self.in_flight.get(engine, 0) + 1

    def request_finished(self, engine: str) -> None:
        self.last_request_s[engine] = self.daemon.clock.now()
        self.in_flight[engine] = max(0, self.in_flight.get(engine, 0) - 1)

    async def check(self) -> None:
        now = self.daemon.clock.now()
        for sup in list(self.daemon.supervisors.values()):
            idle_s = sup.config.idle_unload_s
            if not idle_s or not self._due(sup, idle_s, now):
                continue
            # A request the gateway sent a moment ago (its note on the way) is a request: look again.
            await self.daemon.requests_settled()
            now = self.daemon.clock.now()
            if not self._due(sup, idle_s, now):
                continue
            last = self.last_request_s.get(sup.name)
            in_flight = self.in_flight.get(sup.name, 0)
            idle_for_s = round(now - max(sup.ready_here_since_s, last or sup.ready_here_since_s), 1)
            self.daemon.events.emit("policy.decided", engine=sup.name, policy="idle_unload", decision="stop",
                                    idle_for_s=idle_for_s, idle_unload_s=idle_s, in_flight=in_flight)
            try:
                # Drained like a swap: a request let through on the gateway's pass the moment the unload
                # began (its note on the way) reaches the engine and is answered before it stops.
                await sup.command("stop", reason=IDLE_REASON, drain=True)
            except Exception as exc:  # a stop refused now (a swap in progress) is tried again at the next check
                self.daemon.events.emit("engine.idle_unload_failed", engine=sup.name, error=str(exc))

    def _due(self, sup: Any, idle_s: float, now: float) -> bool:
        # From when this daemon saw it ready (an adopted run's requests before that are unknown here: it gets the
        # whole idle time again, not the last daemon's ready time as if nothing had asked for it since).
        if str(sup.state) not in ("ready", "degraded") or sup.ready_here_since_s is None:
            return False
        return idle_unload_due(idle_unload_s=idle_s, last_request_s=self.last_request_s.get(sup.name),
                               ready_since_s=sup.ready_here_since_s, now_s=now,
                               in_flight=self.in_flight.get(sup.name, 0))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await anyio.sleep(CHECK_INTERVAL_S)
            await self.check()


def find(extensions: Iterable[object]) -> IdleUnloadExtension | None:
    return next((e for e in extensions if isinstance(e, IdleUnloadExtension)), None)
