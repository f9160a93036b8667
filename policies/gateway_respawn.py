"""Starting the gateway's process again after it died, and when that is a person's problem (pure).

The gateway runs in a process of its own; the daemon holds its listening socket, so while the process is
gone clients' connections wait in the socket's backlog rather than being refused. A process that died is
started again after ``RESPAWN_MIN_S``, doubling up to ``RESPAWN_MAX_S`` while it keeps dying within
``STABLE_S`` of its start. Unlike an engine it holds no model, so there is no 60 s floor and no giving up:
it is the door to every engine.

One death is logged, not alerted. ``DOWN_AFTER_EXITS`` deaths in a row, each within ``STABLE_S`` of its
start (a broken install after an upgrade under the running daemon, a bad setting that only the process
finds), mean no client is served: a critical ``gateway.down`` alert, resolved once a process has run for
``STABLE_S``.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.actions import Alert

RESPAWN_MIN_S = 0.5
RESPAWN_MAX_S = 30.0
STABLE_S = 60.0
DOWN_AFTER_EXITS = 3
GATEWAY_DOWN_ALERT_KEY = "gateway.down"


@dataclass(frozen=True, slots=True)
class GatewayRespawn:
    """The streak of quick deaths: the wait before the next start, and how many died in a row."""

    delay_s: float = RESPAWN_MIN_S
    quick_exits: int = 0
    down: bool = False  # the gateway.down alert is raised


def after_exit(state: GatewayRespawn, *, ran_s: float, listen: str, exit_text: str,
               reason: str) -> tuple[float, GatewayRespawn, Alert | None]:
    """A gateway process ended after running ``ran_s``: (wait before the next start, the new state, an alert
    to raise or None)."""
    if ran_s >= STABLE_S:
        state = GatewayRespawn(down=state.down)  # a run that held ends the streak
    wait_s = state.delay_s
    quick = state.quick_exits + 1
    new = GatewayRespawn(delay_s=min(RESPAWN_MAX_S, wait_s * 2), quick_exits=quick, down=state.down)
    if quick < DOWN_AFTER_EXITS or state.down:
        return wait_s, new, None
    alert = Alert(GATEWAY_DOWN_ALERT_KEY, "critical",
                  f"the gateway on {listen} died {quick} times in a row, each within {STABLE_S:.0f}s of its start "
                  f"(last: {exit_text}, {reason}); no client is served, their connections wait; it is started "
                  f"again in {wait_s:g}s, doubling up to {RESPAWN_MAX_S:.0f}s; see the daemon log",
                  details={"listen": listen, "exits": quick, "exit": exit_text, "reason": reason})
    return wait_s, GatewayRespawn(delay_s=new.delay_s, quick_exits=quick, down=True), alert


def after_stable_run(state: GatewayRespawn, *, listen: str) -> tuple[GatewayRespawn, Alert | None]:
    """A gateway process has run for ``STABLE_S``: the streak ends, and a raised ``gateway.down`` resolves."""
    alert = None
    if state.down:
        alert = Alert(GATEWAY_DOWN_ALERT_KEY, "critical", f"the gateway on {listen} serves again",
                      details={"listen": listen}, resolved=True)
    return GatewayRespawn(), alert


__all__ = ["DOWN_AFTER_EXITS", "GATEWAY_DOWN_ALERT_KEY", "RESPAWN_MAX_S", "RESPAWN_MIN_S", "STABLE_S",
           "GatewayRespawn", "after_exit", "after_stable_run"]
