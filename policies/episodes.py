"""Exit episodes: every engine exit the daemon did not ask for is an alert a person sees.

Someone whose 237 GB model fell over after a Metal OOM and spent 15 minutes reloading should
learn it from the alert, not from their agents failing. So an unplanned exit (a crash, a
signal, an OOM kill, an exit during start, a start that never produced a token, a hang
restart) opens a *warning* episode ``engine.exited:<engine>`` that names the exit, the
diagnosis from the engine's log (cause and remedy) and the next start time. When the failures
become a crash loop (the backoff policy gives up), the *same* episode is raised to critical:
one thread in Slack or Alertmanager, not two. The episode resolves when the engine is ready
again. ``alert_on_exit = false`` on an engine turns the exit episodes off; the crash loop then
still alerts, as ``engine.failed``.

Stops a person or a policy asked for (``llmctl stop``, a swap, an idle restart of a degraded
engine) are not exits in this sense and open nothing.

Every episode about one engine (``ENGINE_EPISODES``: its exits, hang, slowdown, refused start and
memory guard, and also a failed swap to it, ``swap.failed``, and memory that did not come back
before its start) ends when that engine is ready, however it got there (a later swap to it,
``llmctl start``, a gateway request), or when a person stops it with ``llmctl stop``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from policies._format import secs
from policies.actions import Alert, MarkFailed
from probes.readings import Diagnosis

EXIT_EPISODE = "engine.exited"
# Episodes about one engine that end when it is ready again (or a person stops it).
ENGINE_EPISODES = ("engine.exited", "engine.failed", "engine.hung", "engine.degraded", "engine.start_refused",
                   "engine.memory_exceeded", "engine.gpu_memory_exceeded",
                   # (a run over its soft watermark that the guard then restarts: its new run starts low)
                   "engine.memory_high", "engine.gpu_memory_high",
                   # A swap or start that could not bring the engine up, keyed by that engine (the swap's
                   # target). Nothing else ends them: once it is ready a later swap or start has brought
                   # it up; left open, the next failure of the same swap would join the stale episode
                   # instead of reaching anyone.
                   "swap.failed", "swap.memory_not_returned", "gpu.memory_not_returned")


@dataclass(frozen=True, slots=True)
class ExitFacts:
    """What is known about one unplanned end of a run, from the engine and the supervisor.

    ``next_start_at`` is the wall-clock time of the next automatic start as the runtime formats
    it (policies read no clock); both it and ``next_start_in_s`` are None when none will come.
    """

    engine: str
    code: int | None
    signal: str | None
    reason: str
    diagnosis: Diagnosis | None
    next_start_in_s: float | None
    next_start_at: str | None
    consecutive_failures: int


def exit_label(facts: ExitFacts) -> str:
    """A short value naming how the run ended (an Alertmanager label): ``SIGKILL``, ``code 1``, ``hang``…"""
    if facts.signal:
        return facts.signal
    if facts.code is not None:
        return f"code {facts.code}"
    if facts.reason.startswith("hang restart"):
        return "hang"
    if facts.reason.startswith("memory guard"):
        return "memory guard"
    if "start_timeout" in facts.reason or "within start_timeout" in facts.reason:
        return "start timeout"
    return "start failed"


def _details(facts: ExitFacts) -> dict[str, object]:
    details: dict[str, object] = {
        "engine": facts.engine,
        "exit": exit_label(facts),
        "code": facts.code,
        "signal": facts.signal,
        "reason": facts.reason,
        "consecutive_failures": facts.consecutive_failures,
        "next_start_at": facts.next_start_at,
        "next_start_in_s": None if facts.next_start_in_s is None else round(facts.next_start_in_s, 1),
    }
    if facts.diagnosis is not None:
        details["cause"] = facts.diagnosis.cause
        details["remedy"] = facts.diagnosis.remedy
    return details


def _sentence(facts: ExitFacts) -> str:
    text = f"{facts.engine} went down: {facts.reason}"
    if facts.diagnosis is not None:
        if facts.diagnosis.cause not in facts.reason:
            text += f"; cause: {facts.diagnosis.cause}"
        if facts.diagnosis.remedy:
            text += f"; remedy: {facts.diagnosis.remedy}"
    return text


def on_unplanned_exit(facts: ExitFacts, decided: Sequence[object], *, alert_on_exit: bool) -> tuple[Alert, ...]:
    """The alerts for one unplanned exit, given what the backoff policy ``decided`` about it.

    ``decided`` is ``backoff.decide_after_exit``'s answer: ``(WaitUntil,)`` or ``(MarkFailed,
    Alert)``. With ``alert_on_exit`` the exit opens (or, in a crash loop, raises to critical) the
    ``engine.exited`` episode, whose alert replaces the backoff's ``engine.failed`` one; without
    it only the backoff's alerts are raised.
    """
    backoff_alerts = tuple(a for a in decided if isinstance(a, Alert))
    if not alert_on_exit:
        return backoff_alerts
    details = _details(facts)
    key = f"{EXIT_EPISODE}:{facts.engine}"
    if any(isinstance(a, MarkFailed) for a in decided):
        loop = backoff_alerts[0] if backoff_alerts else None
        summary = loop.summary if loop is not None else f"{facts.engine} is failed and is not restarted"
        if facts.diagnosis is not None and facts.diagnosis.remedy and facts.diagnosis.remedy not in summary:
            summary += f" Remedy: {facts.diagnosis.remedy}"
        if loop is not None:
            details.update({k: v for k, v in loop.details.items() if k not in details})
        details["crash_loop"] = True
        return (Alert(key=key, severity="critical", summary=summary, details=details),)
    summary = _sentence(facts)
    if facts.next_start_at is not None and facts.next_start_in_s is not None:
        summary += f"; next start at {facts.next_start_at} (in {secs(facts.next_start_in_s)})"
    details["crash_loop"] = False
    return (Alert(key=key, severity="warning", summary=summary, details=details),)


def _resolve_all(engine: str, open_keys: Iterable[str], summary: str) -> tuple[Alert, ...]:
    resolved = []
    for key in open_keys:
        kind, _, name = key.partition(":")
        if name == engine and kind in ENGINE_EPISODES:
            resolved.append(Alert(key=key, severity="info", summary=summary, details={"engine": engine},
                                  resolved=True))
    return tuple(resolved)


def on_ready(engine: str, open_keys: Iterable[str]) -> tuple[Alert, ...]:
    """An engine that is ready again closes every open episode about it (``ENGINE_EPISODES``),
    also ones an earlier daemon opened (the outbox remembers open episodes across restarts)."""
    return _resolve_all(engine, open_keys, f"{engine} is ready again")


def on_stopped_by_person(engine: str, open_keys: Iterable[str]) -> tuple[Alert, ...]:
    """``llmctl stop`` closes the engine's open episodes: a person has taken it over, and an alert
    left firing (in Alertmanager too, re-posted while open) about an engine nobody wants running misleads."""
    return _resolve_all(engine, open_keys, f"{engine} was stopped with llmctl stop; it stays down until started")


def on_swap_rolled_back(engine: str, open_keys: Iterable[str]) -> tuple[Alert, ...]:
    """A swap to ``engine`` failed and was rolled back: the engine is stopped, so the next start its exit episode
    announced will not come. That episode closes saying so; ``swap.failed`` (raised with the rollback) stays
    open until the engine is ready or a person stops it, and carries the failure."""
    key = f"{EXIT_EPISODE}:{engine}"
    if key not in open_keys:
        return ()
    return (Alert(key=key, severity="info", resolved=True, details={"engine": engine},
                  summary=f"{engine} stays stopped after the failed swap to it: no restart is scheduled "
                          f"(swap.failed:{engine} stays open until it is ready or stopped with llmctl stop)"),)


__all__ = ["ENGINE_EPISODES", "EXIT_EPISODE", "ExitFacts", "exit_label", "on_ready", "on_stopped_by_person",
           "on_swap_rolled_back", "on_unplanned_exit"]
