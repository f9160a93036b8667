"""What a daemon starts when it starts (pure), from what the last daemon left in its state file.

A daemon restart undoes nothing a person did: an engine the last daemon left running (or starting, or in
its restart backoff: that daemon crashed, or re-executed itself) runs again, whatever its ``autostart``,
since a person may have started it by hand. One stopped only by that daemon's own clean exit (SIGTERM,
``systemctl restart``, the daemon's own reboot) starts as ``autostart`` says, as on a fresh state. One a
person or its idle unload stopped, or that failed, stays so, unless what stopped it was a refused preload
(memory admission said no): nobody stopped that one, so it is started as configured, asking admission
again. A swap that was under way decides itself which engine runs.

Exclusive engines never share the machine (``policies.admission``), so the engines that would start are
taken in this order, each only where nothing exclusive stands between it and those taken before: those that
ran, then those stopped by the daemon's exit, then the default engine, then the others, each in config
order. Of the others, an exclusive one never starts with the daemon: with a group of exclusive engines
(one model at a time) only the default loads on a first start. Engines that are not exclusive all start
next to each other, whichever other engines of the config are exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The reason an engine's record carries when the daemon's own clean exit stopped it.
SHUTDOWN_REASON = "daemon shutdown"
# The states of an engine that ran, or was meant to, when the last daemon ended without stopping it.
RUNNING_STATES = frozenset({"starting", "ready", "degraded", "hung", "backoff"})


@dataclass(frozen=True, slots=True)
class SavedEngine:
    """The last daemon's record of an engine, as far as the start decision reads it."""

    state: str
    reason: str = ""
    preload_refused: bool = False  # stopped because memory admission refused its preload

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> SavedEngine | None:
        """From the state file's ``engines.<name>`` record (None, or not a mapping: no record)."""
        if not isinstance(record, Mapping):
            return None
        refused = record.get("start_refused")
        return cls(state=str(record.get("state", "")), reason=str(record.get("reason") or ""),
                   preload_refused=isinstance(refused, Mapping) and bool(refused.get("preload")))


@dataclass(frozen=True, slots=True)
class EngineAtStart:
    name: str
    autostart: bool
    exclusive: bool = False
    saved: SavedEngine | None = None


def saved_seconds(value: object) -> float | None:
    """A time (or count of seconds) read back from the state file as a finite float; None for anything else: a
    bool, text, NaN, infinity or an int beyond a float's range (JSON allows ``10**400``; ``float()`` of it
    raises OverflowError), so a damaged or hand-edited record never stops a daemon from starting."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def was_running(saved: SavedEngine | None) -> bool:
    """The record says the engine ran (or was starting, or waited out its restart backoff)."""
    return saved is not None and saved.state in RUNNING_STATES


def stopped_by_exit(saved: SavedEngine | None) -> bool:
    """Stopped by nothing but the last daemon's own clean exit."""
    return saved is not None and saved.state == "stopped" and saved.reason == SHUTDOWN_REASON


def wanted_at_start(engine: EngineAtStart) -> bool:
    """Whether the engine would start, exclusivity aside."""
    saved = engine.saved
    if was_running(saved):
        return True
    if saved is not None and saved.state in ("stopped", "failed") and not stopped_by_exit(saved):
        if not (saved.state == "stopped" and saved.preload_refused):
            return False  # a person stopped it, its idle unload did, or it failed
    return engine.autostart


def engines_to_start(engines: Sequence[EngineAtStart], *, default: str | None,
                     swap_pending: bool = False) -> tuple[str, ...]:
    """The engines a starting daemon starts, in the order it prefers them (see the module's text)."""
    if swap_pending:
        return ()
    wanted = [e for e in engines if wanted_at_start(e)]

    def rank(engine: EngineAtStart) -> int:
        if was_running(engine.saved):
            return 0
        if stopped_by_exit(engine.saved):
            return 1
        return 2 if engine.name == default else 3

    chosen: list[EngineAtStart] = []
    for engine in sorted(wanted, key=rank):  # sorted() is stable: config order within a rank
        if engine.exclusive and rank(engine) == 3:
            continue  # an exclusive engine that did not run and is not the default waits for a request or a swap
        if all(not (engine.exclusive or other.exclusive) for other in chosen):
            chosen.append(engine)
    return tuple(e.name for e in chosen)


def recorded_listen(listen: object, argv: object, host: str) -> str | None:
    """Where a recorded run listens (``host:port``): its record's ``listen``; for a record written before that
    was kept, the ``--port N`` (or ``--port=N``) of its argv on the configured ``host``. None: unknown."""
    if isinstance(listen, str):
        return listen
    if not isinstance(argv, list):
        return None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--port" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if isinstance(arg, str) and arg.startswith("--port=") else None)
        if isinstance(value, str) and value.isdigit():
            return f"{host}:{int(value)}"
    return None


def run_moved(listen_was: str | None, listen: str) -> bool:
    """An adopted run listens elsewhere than the config now says (its port or host changed): probed at the new
    address it would never answer, so it is restarted there instead of kept."""
    return listen_was is not None and listen_was != listen


__all__ = ["RUNNING_STATES", "SHUTDOWN_REASON", "EngineAtStart", "SavedEngine", "engines_to_start", "recorded_listen",
           "run_moved",
           "saved_seconds", "stopped_by_exit", "wanted_at_start", "was_running"]
