"""The runtime side of exit episodes: gather an engine's exit facts, ask the policy, log the decision.

Room: engine.

The decision itself (open a warning episode, raise it to critical in a crash loop, resolve it
when the engine is ready) is ``policies.episodes``; this module only reads the supervisor's
facts (exit code or signal, the log diagnosis, the next start time) and records what was decided.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from policies import episodes
from policies.actions import Alert, WaitUntil
from policies.backoff import BackoffState
from probes.readings import Diagnosis
from supervisord_llm.clock import Clock
from supervisord_llm.config import EngineConfig
from supervisord_llm.events import EventLog


class ExitedEngine(Protocol):
    """**Protocol:** what an exit episode reads of an engine's supervisor (no import of the supervisor)."""

    name: str
    last_exit: dict[str, Any] | None
    backoff: BackoffState
    diagnosis: Diagnosis | None
    clock: Clock
    config: EngineConfig


def _wall_text(wall_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall_s))


def exit_facts(sup: ExitedEngine, decided: Sequence[object], now_s: float) -> episodes.ExitFacts:
    """The facts of the run that just ended unplanned, read after the backoff policy ``decided``."""
    last_exit: dict[str, Any] = sup.last_exit or {}
    wait = next((a for a in decided if isinstance(a, WaitUntil)), None)
    in_s = max(0.0, wait.at_s - now_s) if wait is not None else None
    return episodes.ExitFacts(
        engine=sup.name,
        code=last_exit.get("code"),
        signal=last_exit.get("signal"),
        reason=str(last_exit.get("reason") or sup.backoff.last_exit_reason or "exited"),
        diagnosis=sup.diagnosis,
        next_start_in_s=in_s,
        next_start_at=_wall_text(sup.clock.wall() + in_s) if in_s is not None else None,
        consecutive_failures=sup.backoff.consecutive_failures,
    )


def exit_alerts(sup: ExitedEngine, decided: Sequence[object], now_s: float, events: EventLog) -> tuple[Alert, ...]:
    """The alerts to raise for an unplanned exit (see ``policies.episodes.on_unplanned_exit``)."""
    facts = exit_facts(sup, decided, now_s)
    alerts = episodes.on_unplanned_exit(facts, decided, alert_on_exit=sup.config.alert_on_exit)
    events.emit(
        "policy.decided", policy="episodes", engine=sup.name,
        decision=",".join(f"{a.key}:{a.severity}" for a in alerts) or "none",
        alert_on_exit=sup.config.alert_on_exit, exit=episodes.exit_label(facts), code=facts.code,
        signal=facts.signal, reason=facts.reason, consecutive_failures=facts.consecutive_failures,
        next_start_at=facts.next_start_at, diagnosis=facts.diagnosis.signature if facts.diagnosis else None)
    return alerts

