"""Engines that cannot share the machine take turns, serving held requests grouped by engine.

With exclusive engines A and B and requests for both arriving mixed, answering them in arrival
order would swap A out and B in for every other request (each swap of a large model takes minutes).
Instead a request whose engine is not serving, or that arrives while a group for an engine it
cannot share with is waiting, is held in its engine's *group*; groups are served in the order
``policies.frontdoor.groups_to_serve`` decides (the group whose first request arrived first, and
any later group that conflicts with none ahead of it: budget engines do not take turns), and a
group is released whole once its engine serves: all of B's held requests, then all of A's.

A swap for the group whose turn it is starts as any gateway swap does (memory admission, the
target's backoff and the 60 s spawn floor hold; the engines it stops drain first, up to
``swap_drain``). Each turn is logged as ``policy.decided`` (policy ``serving_order``) with the
groups it was decided on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import anyio

from policies.frontdoor import HeldGroup, ServeGroup, groups_to_serve, holds_for_groups

# A held request re-checks its turn at least this often (engine state changes also wake it at once
# when the host tells ``changed()``; this is the floor if none does).
TURN_POLL_S = 0.25
# After a group is released its requests take a few loop turns to reach their engine (and count as in
# flight, which a swap's drain waits for); the next group's swap waits this long so it does not stop
# the engine under them.
SETTLE_S = 0.25


class TurnHost(Protocol):
    """**Protocol:** what turn-taking needs from the daemon."""

    def now(self) -> float: ...

    def engine_names(self) -> list[str]: ...

    def serving(self, engine: str) -> bool: ...

    def exclusive(self, engine: str) -> bool: ...

    def resident(self) -> str | None:
        """The engine serving now that a swap would stop (an exclusive one), if any."""

    def unavailable(self, engine: str) -> Exception | None:
        """Why ``engine`` cannot be served (backoff, failed), or None while it may yet serve."""

    def start_swap(self, engine: str) -> bool | Exception:
        """Start swapping ``engine`` in (in the background): True when started, False when it need
        not or cannot start now (a swap runs, the engine is starting), or why it is refused."""

    def decided(self, action: ServeGroup, **inputs: object) -> None: ...


@dataclass
class _Group:
    engine: str
    oldest_s: float
    requests: int = 0
    released: bool = False
    refused: Exception | None = None
    swap_asked: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


class EngineTurns:
    """The held groups and whose turn it is; one per gateway backend."""

    def __init__(self, host: TurnHost) -> None:
        self.host = host
        self.groups: dict[str, _Group] = {}
        self._changed = anyio.Event()
        self._last_turn: str | None = None
        self._released_at_s = float("-inf")

    def must_hold(self, engine: str) -> bool:
        """A new request for ``engine`` waits in a group (see ``holds_for_groups``)."""
        host = self.host
        conflicting = sum(1 for g in self.groups.values() if g.engine != engine and g.requests > 0
                          and (host.exclusive(engine) or host.exclusive(g.engine)))
        return holds_for_groups(engine, serving=host.serving(engine), conflicting_groups=conflicting)

    def changed(self) -> None:
        """Something a turn depends on changed (an engine's state, a group): decide again."""
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def swap_failed(self, engine: str, error: Exception) -> None:
        """The swap started for ``engine``'s group failed: the group's requests get ``error``."""
        group = self.groups.get(engine)
        if group is not None and group.swap_asked and not group.released:
            group.refused = error
            del self.groups[engine]
            self.changed()

    async def wait_turn(self, engine: str) -> None:
        """Hold until ``engine``'s group is released (it serves now); raises why it cannot be served.
        The caller bounds the wait (the gateway's hold_s)."""
        group = self.groups.get(engine)
        if group is None or group.released:
            group = self.groups[engine] = _Group(engine, self.host.now())
        group.requests += 1
        try:
            while True:
                self._decide()
                if group.released:
                    return
                if group.refused is not None:
                    raise group.refused
                with anyio.move_on_after(TURN_POLL_S):
                    await self._changed.wait()
        finally:
            group.requests -= 1
            if group.requests == 0 and self.groups.get(engine) is group:
                del self.groups[engine]  # everyone left (gave up): the next group's turn
                self.changed()

    def _decide(self) -> None:
        host = self.host
        held = [HeldGroup(g.engine, g.oldest_s, g.requests, host.exclusive(g.engine)) for g in self.groups.values()]
        resident = host.resident()
        turns = groups_to_serve(held, resident=resident)
        if not turns:
            return
        inputs = {"groups": [{"engine": g.engine, "requests": g.requests, "exclusive": g.exclusive,
                              "waited_s": round(host.now() - g.oldest_s, 3)} for g in held], "resident": resident}
        if turns[0].engine != self._last_turn:
            self._last_turn = turns[0].engine
            host.decided(turns[0], **inputs)
        for turn in turns:
            self._take_turn(turn)

    def _take_turn(self, turn: ServeGroup) -> None:
        host = self.host
        group = self.groups.get(turn.engine)
        if group is None:
            return
        if host.serving(turn.engine):
            group.released = True
            del self.groups[turn.engine]
            self._released_at_s = host.now()
            self.changed()
            return
        if host.now() - self._released_at_s < SETTLE_S:
            return  # the group just released has not reached its engine yet: a swap now would cut it
        refused = host.unavailable(turn.engine)
        if refused is None and not group.swap_asked:
            started = host.start_swap(turn.engine)
            if isinstance(started, Exception):
                refused = started
            else:
                group.swap_asked = started
        if refused is not None:
            group.refused = refused
            del self.groups[turn.engine]
            self.changed()
