"""Engines that cannot share the machine take turns, serving held requests grouped by engine.

With exclusive engines A and B and requests for both arriving mixed, answering them in arrival
order would swap A out and B in for every other request (each swap of a large model takes minutes).
Instead a request whose engine is not serving, or that arrives while a group for an engine it
cannot share with is waiting, is held in its engine's *group*; groups are served in the order
``policies.frontdoor.groups_to_serve`` decides (the group whose first request arrived first, and
any later group that conflicts with none ahead of it: budget engines do not take turns), and a
group is released whole once its engine serves: all of B's held requests, then all of A's.

One decider (:meth:`EngineTurns.run`, a task on the daemon's loop) decides for every held request
at once. It wakes when something a turn depends on changes (a request joins or leaves a group, a
request starts or finishes, an engine's state changes, a swap ends: the host calls ``changed()``),
and at the latest every ``DECIDE_FALLBACK_S`` while requests are held, in case a change was missed.

A swap for the group whose turn it is starts as any gateway swap does (memory admission, the
target's backoff and the 60 s spawn floor hold; the engines it stops drain first, up to
``swap_drain``), but only once the requests already let through to other engines have reached them
(``request_started``): a swap's drain waits for requests in flight, and a request still on its way
would otherwise be cut by the stop. A request that never starts (its client left, it was refused
after routing) stops counting after ``START_WAIT_MAX_S`` (``policies.frontdoor.swap_may_start``).
The gateway may let requests for a serving engine through on its own while no group is held (a
*pass*, ``policies.frontdoor.gateway_may_pass``): once a group forms, the passes are taken back, and
a swap starts only after the gateway has confirmed it (``TurnHost.close_passes``), so that every
request it let through is counted here before the engines it reaches can be stopped.
Each turn is logged as ``policy.decided`` (policy ``serving_order``) with the groups it was
decided on.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from policies.frontdoor import HeldGroup, ServeGroup, groups_to_serve, holds_for_groups, swap_may_start

# While requests are held the decider looks again at least this often, even if no change woke it
# (engine state changes, requests and swaps wake it at once: this is only the floor).
DECIDE_FALLBACK_S = 1.0
# A request let through to an engine that has not started there after this long is taken as lost
# (the client left, the engine's line refused it): it no longer holds back the next group's swap.
START_WAIT_MAX_S = 2.0


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

    def start_swap(self, engine: str, *, may_start: bool = True) -> bool | Exception:
        """Start swapping ``engine`` in (in the background): True when started, False when it need
        not or cannot start now (a swap runs, the engine is starting), or why it is refused (also when
        ``may_start`` is False: no request waiting for it may start it, ``gateway.swaps``)."""

    def decided(self, action: ServeGroup, **inputs: object) -> None: ...

    def close_passes(self) -> bool:
        """Take back the passes the gateway may hold (``policies.frontdoor.gateway_may_pass``); True
        once it has confirmed, so that every request it let through on its own is counted here.
        Until then no swap starts. The confirmation calls ``changed()``."""

    def groups_changed(self) -> None:
        """A group was formed or ended (the gateway's passes depend on whether any is held)."""


@dataclass
class _Group:
    engine: str
    oldest_s: float
    requests: int = 0
    released: bool = False
    refused: Exception | None = None
    swap_asked: bool = False
    permitted: int = 0  # requests in it that may have its engine started (gateway.swaps)
    done: anyio.Event = field(default_factory=anyio.Event)  # released or refused: its waiters go on


class EngineTurns:
    """The held groups and whose turn it is; one per gateway backend. :meth:`run` must be running
    (on the daemon's loop) for held requests to be released."""

    def __init__(self, host: TurnHost) -> None:
        self.host = host
        self.groups: dict[str, _Group] = {}
        self._wake = anyio.Event()
        self._last_turn: str | None = None
        # Per engine: when each request let through to it (and not started there yet) was let through.
        self._unstarted: dict[str, deque[float]] = {}

    def must_hold(self, engine: str) -> bool:
        """A new request for ``engine`` waits in a group (see ``holds_for_groups``)."""
        host = self.host
        conflicting = sum(1 for g in self.groups.values() if g.engine != engine and g.requests > 0
                          and (host.exclusive(engine) or host.exclusive(g.engine)))
        return holds_for_groups(engine, serving=host.serving(engine), conflicting_groups=conflicting)

    def held_groups(self) -> int:
        """How many groups are held (waiting for their turn)."""
        return len(self.groups)

    def changed(self) -> None:
        """Something a turn depends on changed (an engine's state, a group, a request): decide again."""
        self._wake.set()

    def let_through(self, engine: str) -> None:
        """A request goes to ``engine`` without being held: it counts as on its way until it starts."""
        self._forget_lost()  # requests that never start (refused in the engine's line) are let go here
        self._unstarted.setdefault(engine, deque()).append(self.host.now())

    def request_started(self, engine: str) -> None:
        """A request let through to ``engine`` has reached it (or will not: it was given up)."""
        pending = self._unstarted.get(engine)
        if pending:
            pending.popleft()
            if not pending:
                del self._unstarted[engine]
            self.changed()

    def refuse_waiting(self, engine: str, error: Exception) -> None:
        """The requests held for ``engine`` get ``error`` now (a person stopped it: they do not start it again)."""
        group = self.groups.get(engine)
        if group is not None and not group.released:
            self._refuse(group, error)

    def swap_failed(self, engine: str, error: Exception) -> None:
        """The swap started for ``engine``'s group failed: the group's requests get ``error``."""
        group = self.groups.get(engine)
        if group is not None and group.swap_asked and not group.released:
            self._refuse(group, error)

    async def wait_turn(self, engine: str, *, may_start: bool = True) -> None:
        """Hold until ``engine``'s group is released (it serves now); raises why it cannot be served.
        The caller bounds the wait (the gateway's hold_s). A request released here counts as on its
        way to ``engine`` until ``request_started``."""
        group = self.groups.get(engine)
        if group is None or group.released:
            group = self.groups[engine] = _Group(engine, self.host.now())
            self.host.groups_changed()
        group.requests += 1
        group.permitted += may_start
        self.changed()
        try:
            await group.done.wait()
        except BaseException:
            if group.released:
                self.request_started(engine)  # released, but its client left before it could go on
            raise
        finally:
            group.requests -= 1
            group.permitted -= may_start  # its permission leaves with it
            if group.requests == 0 and not group.done.is_set() and self.groups.get(engine) is group:
                del self.groups[engine]  # everyone left (gave up): the next group's turn
                self.host.groups_changed()
                self.changed()
        if group.refused is not None:
            raise group.refused

    async def run(self) -> None:
        """The decider: decide for every held request whenever something changed (daemon's loop)."""
        while True:
            self._wake = anyio.Event()
            wait_s = self._decide()
            with anyio.move_on_after(wait_s):
                await self._wake.wait()

    def _decide(self) -> float:
        """Release or refuse what can be, start the swap whose turn it is; how long until it must look again."""
        host = self.host
        held = [HeldGroup(g.engine, g.oldest_s, g.requests, host.exclusive(g.engine)) for g in self.groups.values()]
        resident = host.resident()
        turns = groups_to_serve(held, resident=resident)
        if not turns:
            return math.inf
        if turns[0].engine != self._last_turn:
            self._last_turn = turns[0].engine
            host.decided(turns[0], groups=[{"engine": g.engine, "requests": g.requests, "exclusive": g.exclusive,
                                            "waited_s": round(host.now() - g.oldest_s, 3)} for g in held],
                         resident=resident, unstarted=self._unstarted_counts())
        wait_s = DECIDE_FALLBACK_S
        for turn in turns:
            wait_s = min(wait_s, self._take_turn(turn))
        return wait_s

    def _take_turn(self, turn: ServeGroup) -> float:
        host = self.host
        group = self.groups.get(turn.engine)
        if group is None:
            return DECIDE_FALLBACK_S
        if host.serving(turn.engine):
            group.released = True
            del self.groups[turn.engine]
            host.groups_changed()
            self._unstarted.setdefault(turn.engine, deque()).extend([host.now()] * group.requests)
            group.done.set()
            return DECIDE_FALLBACK_S
        ages_s = [host.now() - at_s for engine, pending in self._unstarted.items() if engine != turn.engine
                  for at_s in pending]
        passes_closed = host.close_passes()
        if not swap_may_start(ages_s, max_wait_s=START_WAIT_MAX_S, passes_closed=passes_closed):
            if not passes_closed:
                # The gateway may still let requests through on its own: its confirmation wakes us.
                return DECIDE_FALLBACK_S
            # Requests let through to the engines a swap would stop have not reached them yet: look
            # again when they start (``changed``) or, at the latest, when the oldest counts as lost.
            return max(0.0, START_WAIT_MAX_S - min(ages_s))
        self._forget_lost()
        refused = host.unavailable(turn.engine)
        if refused is None and not group.swap_asked:
            started = host.start_swap(turn.engine, may_start=group.permitted > 0)
            if isinstance(started, Exception):
                refused = started
            else:
                group.swap_asked = started
        if refused is not None:
            self._refuse(group, refused)
        return DECIDE_FALLBACK_S

    def _refuse(self, group: _Group, error: Exception) -> None:
        group.refused = error
        if self.groups.get(group.engine) is group:
            del self.groups[group.engine]
            self.host.groups_changed()
        group.done.set()
        self.changed()

    def _forget_lost(self) -> None:
        """Drop the requests that never started within ``START_WAIT_MAX_S``."""
        now = self.host.now()
        for engine in list(self._unstarted):
            pending = self._unstarted[engine]
            while pending and now - pending[0] >= START_WAIT_MAX_S:
                pending.popleft()
            if not pending:
                del self._unstarted[engine]

    def _unstarted_counts(self) -> dict[str, int]:
        return {engine: len(pending) for engine, pending in self._unstarted.items()}
