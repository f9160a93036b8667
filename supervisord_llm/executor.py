"""The one place where the policies' actions become effects (room: decide → act).

Policies (``policies/``) are pure: they return :mod:`policies.actions` values. The runtime logs
every decision once, as a ``policy.decided`` event naming the policy, the engine, the decision,
its message and the inputs it was decided on, and hands the actions that change something outside
a supervisor's own state to :meth:`ActionExecutor.execute`:

    Stop(engine, grace_s, reason)   the engine's supervisor stops it (SIGTERM, SIGKILL after grace_s)
    Start(engine)                   the engine's supervisor starts it (admission still runs first)
    Restart(engine, reason)         the engine's supervisor restarts it (the 60 s spacing still holds)
    Alert(...)                      raised on the event log and handed to the alert outbox
    Drain(engine, grace_s, reason)  the memory guard stops routing requests to it, then restarts it
    EscalateReboot(at_s, reason)    the reboot escalation announces the reboot (``reboot.announced``)
    RunReboot(argv, reason)         the reboot escalation records the reboot in its ledger, then runs argv

``apply`` carries out the actions whose effect is immediate (alerts, drains, the reboot steps), so a
synchronous caller (a memory reading, the reboot timer) hands them over without awaiting;
``execute`` also awaits the engines' supervisors. Actions that only change one engine's own state
(``WaitUntil``, ``MarkFailed``) and the watchdogs' restarts (a ``HealthVerdict`` for one run) are
carried out by that engine's supervisor, the only writer of its state; ``Admit``/``Refuse``/``Noop``
are answers, not effects. The executor depends on a narrow host protocol, never on the daemon object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from policies.actions import (
    Admit,
    Alert,
    Drain,
    EscalateReboot,
    MarkFailed,
    Noop,
    Refuse,
    Restart,
    RunReboot,
    Start,
    Stop,
    WaitUntil,
)
from supervisord_llm.engine.supervisor import EngineSupervisor
from supervisord_llm.events import EventLog

_DECISIONS: dict[type, str] = {
    Admit: "admit", Refuse: "refuse", Start: "start", Stop: "stop", Restart: "restart", WaitUntil: "wait",
    Alert: "alert", MarkFailed: "mark_failed", EscalateReboot: "escalate_reboot", RunReboot: "run_reboot",
    Noop: "noop", Drain: "drain",
}


class ExecutorHost(Protocol):
    """**Protocol:** what the executor acts on: the event log, the engines' supervisors, alerts, the reboot path."""

    events: EventLog
    supervisors: dict[str, EngineSupervisor]

    def alert(self, alert: Alert) -> None: ...

    def drain(self, action: Drain) -> bool: ...

    def announce_reboot(self, action: EscalateReboot) -> bool: ...

    def run_reboot(self, action: RunReboot) -> bool: ...


def decision_name(action: Any) -> str:
    """The ``decision`` field of a ``policy.decided`` event for ``action``."""
    return _DECISIONS.get(type(action), type(action).__name__.lower())


def describe(action: Any) -> str:
    """The sentence an action carries (its message, reason or summary)."""
    for attr in ("message", "reason", "summary"):
        value = getattr(action, attr, None)
        if isinstance(value, str) and value:
            return value
    return ""


class ActionExecutor:
    """Logs decisions and carries out actions for its host (the daemon)."""

    def __init__(self, host: ExecutorHost) -> None:
        self.host = host

    def decided(self, policy: str, engine: str | None, action: Any, **inputs: Any) -> None:
        """Log one decision: ``policy.decided`` with the policy, engine, decision, message and inputs."""
        fields: dict[str, Any] = {"policy": policy, "decision": decision_name(action), "message": describe(action)}
        if engine is not None:
            fields["engine"] = engine
        if isinstance(action, Refuse):
            fields["reason"] = action.reason
        self.host.events.emit("policy.decided", **fields, **inputs)

    def apply(self, action: Any) -> None:
        """Carry out an action whose effect is immediate (no supervisor to await).

        Raises ValueError for an action that needs :meth:`execute` or is an answer, not an effect.
        """
        if isinstance(action, Alert):
            self.host.alert(action)
        elif isinstance(action, Drain):
            self.host.drain(action)
        elif isinstance(action, EscalateReboot):
            self.host.announce_reboot(action)
        elif isinstance(action, RunReboot):
            self.host.run_reboot(action)
        elif isinstance(action, (WaitUntil, Noop)):
            return  # "decide again at at_s" / nothing: the caller decides again on its own timer
        elif isinstance(action, (Stop, Start, Restart)):
            raise ValueError(f"{type(action).__name__} waits for the engine's supervisor: use execute()")
        else:
            raise ValueError(f"{type(action).__name__} is an answer, not an effect; nothing executes it")

    async def execute(self, action: Any, *, force: bool = False) -> None:
        """Carry out one action. Raises what the engine's supervisor raises (e.g. ``StartRefused``)."""
        supervisors: Mapping[str, EngineSupervisor] = self.host.supervisors
        if isinstance(action, Stop):
            await supervisors[action.engine].command("stop", reason=action.reason, grace_s=action.grace_s)
        elif isinstance(action, Start):
            await supervisors[action.engine].command("start", force=force)
        elif isinstance(action, Restart):
            await supervisors[action.engine].command("restart", force=force, reason=action.reason)
        else:
            self.apply(action)


__all__ = ["ActionExecutor", "ExecutorHost", "decision_name", "describe"]
