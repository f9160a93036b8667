"""The dead-man heartbeat: send a proof of life only while the daemon itself is healthy.

An outside monitor (healthchecks.io, Uptime Kuma, Alertmanager's ``Watchdog`` convention) raises
the alarm when the beats stop. They must stop when the daemon can no longer do its job, not
only when its process is gone: a daemon whose event loop is stalled cannot notice a crash, and one
whose memory probe fails cannot protect the machine. So a beat is sent only when the loop kept
time and every probe answered; anything else withholds it, which is the point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SelfHealth:
    """The daemon's own health, as its runtime measured it just now.

    ``loop_lag_s``: how late the heartbeat task woke up (the event loop's delay);
    ``loop_stalled``: the daemon's loop watchdog (the one behind sd_notify ``WATCHDOG=1``) saw a
    stall; ``failing_probes``: names of probes whose last reading failed.
    """

    loop_lag_s: float
    loop_stalled: bool
    failing_probes: Sequence[str] = ()


# The daemon's loop watchdog: a wake-up this late (past its one-second beat) means the loop could not have
# noticed an engine's crash, answered /healthz or pinged systemd in time; a loaded machine's scheduling delay
# stays far below it.
LOOP_STALL_S = 10.0


def loop_stalled(lag_s: float) -> bool:
    """Whether the daemon's loop is stalled, from how late its one-second beat woke (``lag_s``): the sd_notify
    watchdog pings, ``/healthz`` and ``loop_stalled`` below follow it."""
    return lag_s >= LOOP_STALL_S


def max_loop_lag_s(interval_s: float) -> float:
    """How late the heartbeat task may wake and still send its beat: one beat interval, and at least 2 s."""
    return max(2.0, interval_s)


@dataclass(frozen=True, slots=True)
class HeartbeatDecision:
    send: bool
    reason: str


def decide(health: SelfHealth, *, max_loop_lag_s: float) -> HeartbeatDecision:
    """Send the beat, or withhold it and say why."""
    if health.loop_stalled:
        return HeartbeatDecision(False, "the daemon's event loop stalled (its sd_notify watchdog stopped too)")
    if health.loop_lag_s > max_loop_lag_s:
        return HeartbeatDecision(False, f"the daemon's event loop is {health.loop_lag_s:.1f}s late "
                                        f"(limit {max_loop_lag_s:.1f}s)")
    if health.failing_probes:
        return HeartbeatDecision(False, f"probes failing: {', '.join(sorted(health.failing_probes))}")
    return HeartbeatDecision(True, "loop on time and probes answering")


__all__ = ["LOOP_STALL_S", "HeartbeatDecision", "SelfHealth", "decide", "loop_stalled", "max_loop_lag_s"]
