"""Restart backoff: when may an engine be spawned again, and when do we stop trying.

The facts behind it: after a Metal OOM, an immediate restart loads the same weights into the
same full memory and crashes again; users had to set launchd's ``ThrottleInterval`` to at least
60 s to break the loop. So:

- two automatic spawns of one engine are never less than ``min_interval_s`` (>= 60 s) apart;
- each consecutive failure doubles the wait after the exit (``initial_s * factor**(n-1)``, up to
  ``max_s``);
- a run that stayed ready for ``reset_after_ready_s`` ends the streak (the next failure counts as
  the first again, and older failures no longer count towards ``max_failures``);
- ``max_failures`` failures inside ``failure_window_s`` end in ``MarkFailed`` plus a critical
  alert, not a loop.

``BackoffState`` is an immutable record of facts (spawn and failure times, monotonic seconds);
every function returns a new one. The caller persists it (``to_record``/``from_record``) so the
floor holds across daemon restarts. Monotonic clocks restart at boot, so a record from an earlier
boot must be dropped by the caller (``from_record(..., now_s=...)`` drops times from the future).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies._format import require, secs
from policies.actions import Admit, Alert, MarkFailed, Refuse, WaitUntil
from policies.restore import saved_seconds

# The floor below which restarts crash-loop after a Metal OOM (launchd ThrottleInterval lesson).
MIN_SPAWN_INTERVAL_S = 60.0

_MAX_SPAWNS_KEPT = 16
_MAX_FAILURES_KEPT = 256


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """How restarts are spaced; validated when constructed."""

    min_interval_s: float = 60.0
    initial_s: float = 60.0
    factor: float = 2.0
    max_s: float = 900.0
    reset_after_ready_s: float = 600.0
    max_failures: int = 5
    failure_window_s: float = 1800.0

    def __post_init__(self) -> None:
        require(
            self.min_interval_s >= MIN_SPAWN_INTERVAL_S,
            f"backoff min_interval_s must be >= {MIN_SPAWN_INTERVAL_S:.0f}s, got {self.min_interval_s!r}: "
            "faster restarts crash-loop after a Metal OOM (the same weights hit the same full "
            "memory), which is why launchd users set ThrottleInterval to 60s or more",
        )
        require(
            self.initial_s > 0, f"backoff initial_s must be > 0 seconds, got {self.initial_s!r}"
        )
        require(
            self.factor >= 1,
            f"backoff factor must be >= 1 (1 = constant delay), got {self.factor!r}",
        )
        require(
            self.max_s >= self.initial_s,
            f"backoff max_s ({self.max_s!r}) must be >= initial_s ({self.initial_s!r})",
        )
        require(
            self.reset_after_ready_s > 0,
            f"backoff reset_after_ready_s must be > 0 seconds, got {self.reset_after_ready_s!r}",
        )
        require(
            isinstance(self.max_failures, int)
            and not isinstance(self.max_failures, bool)
            and self.max_failures >= 1,
            f"backoff max_failures must be an integer >= 1, got {self.max_failures!r}",
        )
        require(
            self.failure_window_s > 0,
            f"backoff failure_window_s must be > 0 seconds, got {self.failure_window_s!r}",
        )

    def delay_s(self, consecutive_failures: int) -> float:
        """The wait after the ``consecutive_failures``-th failure in a row (0 for none)."""
        if consecutive_failures <= 0:
            return 0.0
        exponent = consecutive_failures - 1
        if exponent > 64:  # factor**exponent would overflow long before; the cap applies anyway
            return self.max_s
        return min(self.max_s, self.initial_s * self.factor**exponent)


@dataclass(frozen=True, slots=True)
class BackoffState:
    """Immutable facts about one engine's spawns and failures (monotonic seconds)."""

    engine: str
    spawn_times_s: tuple[float, ...] = ()
    failure_times_s: tuple[
        float, ...
    ] = ()  # failures since the last run that stayed ready long enough
    consecutive_failures: int = 0
    last_exit_at_s: float | None = None
    last_exit_reason: str | None = None

    @property
    def last_spawn_at_s(self) -> float | None:
        return self.spawn_times_s[-1] if self.spawn_times_s else None


def record_spawn(state: BackoffState, now_s: float) -> BackoffState:
    """The engine was spawned at ``now_s`` (automatically or by hand)."""
    return replace(state, spawn_times_s=(*state.spawn_times_s, now_s)[-_MAX_SPAWNS_KEPT:])


def record_exit(
    state: BackoffState, now_s: float, ready_for_s: float, reason: str, *, settings: BackoffSettings
) -> BackoffState:
    """An unplanned exit (crash, hang kill, failed start) at ``now_s`` after ``ready_for_s`` ready.

    Stops a person asked for are not exits in this sense; do not record them. A run that stayed
    ready for ``settings.reset_after_ready_s`` or longer ends the streak: this exit is then the
    first failure of a new one.
    """
    if ready_for_s >= settings.reset_after_ready_s:
        consecutive = 1
        failures: tuple[float, ...] = (now_s,)
    else:
        consecutive = state.consecutive_failures + 1
        horizon_s = now_s - settings.failure_window_s
        failures = tuple(t for t in (*state.failure_times_s, now_s) if t >= horizon_s)
    return replace(
        state,
        failure_times_s=failures[-_MAX_FAILURES_KEPT:],
        consecutive_failures=consecutive,
        last_exit_at_s=now_s,
        last_exit_reason=reason,
    )


def failures_in_window(state: BackoffState, settings: BackoffSettings, now_s: float) -> int:
    """How many failures of the current streak fall inside ``failure_window_s`` before ``now_s``."""
    horizon_s = now_s - settings.failure_window_s
    return sum(1 for t in state.failure_times_s if t >= horizon_s)


def is_failed(state: BackoffState, settings: BackoffSettings, now_s: float) -> bool:
    """True when the failures inside the window reached ``max_failures`` (a crash loop)."""
    return failures_in_window(state, settings, now_s) >= settings.max_failures


def next_start_at(state: BackoffState, settings: BackoffSettings, now_s: float) -> float:
    """The earliest monotonic time an automatic spawn may happen (``now_s`` if already allowed).

    Never earlier than the last spawn + ``min_interval_s``; after ``n`` consecutive failures,
    never earlier than the last exit + ``initial_s * factor**(n-1)`` (capped at ``max_s``).
    """
    at_s = now_s
    if state.last_spawn_at_s is not None:
        at_s = max(at_s, state.last_spawn_at_s + settings.min_interval_s)
    if state.consecutive_failures > 0 and state.last_exit_at_s is not None:
        at_s = max(at_s, state.last_exit_at_s + settings.delay_s(state.consecutive_failures))
    return at_s


def streak_backoff_at(state: BackoffState, settings: BackoffSettings) -> float | None:
    """When the failure streak's own wait after its last exit ends (``next_start_at`` without the floor between
    spawns); None with no streak. Before it, an engine waits because it failed; after it, only the floor holds."""
    if state.consecutive_failures <= 0 or state.last_exit_at_s is None:
        return None
    return state.last_exit_at_s + settings.delay_s(state.consecutive_failures)


def only_the_floor_holds(state: BackoffState, settings: BackoffSettings, now_s: float) -> bool:
    """Whether an engine waiting to start waits only for the floor between spawns, no failure streak's backoff:
    its start is due soon and requests may wait for it, where one a failure holds answers them at once."""
    streak_at_s = streak_backoff_at(state, settings)
    return streak_at_s is None or streak_at_s <= now_s


def on_demand_start_at(state: BackoffState, settings: BackoffSettings, now_s: float) -> float:
    """The earliest time a start that no person asked for (a request for an unloaded model, a swap
    by the gateway) may spawn: the 60 s floor holds for it as for any automatic spawn, so a client
    that keeps waking an idle-unloaded model cannot turn it into a load loop."""
    if state.last_spawn_at_s is None:
        return now_s
    return max(now_s, state.last_spawn_at_s + settings.min_interval_s)


def decide_after_exit(
    state: BackoffState, settings: BackoffSettings, now_s: float
) -> tuple[WaitUntil] | tuple[MarkFailed, Alert]:
    """After ``record_exit``: wait for the backoff, or give up when the crash loop is proven.

    Returns ``(WaitUntil(at_s),)`` or ``(MarkFailed, Alert(critical, key "engine.failed:<engine>"))``.
    """
    engine = state.engine
    reason = state.last_exit_reason or "exited"
    count = failures_in_window(state, settings, now_s)
    if count >= settings.max_failures:
        summary = (
            f"{engine} failed {count} times within {secs(settings.failure_window_s)} "
            f"(last: {reason}); it will not be restarted automatically. "
            f"Fix the cause, then run `llmctl start {engine}`"
            + (f" (`--force` within the next {secs(wait_s)}: a plain start waits out the backoff)"
               if (wait_s := next_start_at(state, settings, now_s) - now_s) > 0 else "")
        )
        return (
            MarkFailed(
                engine, f"{count} failures within {secs(settings.failure_window_s)}; last: {reason}"
            ),
            Alert(
                key=f"engine.failed:{engine}",
                severity="critical",
                summary=summary,
                details={
                    "engine": engine,
                    "failures": count,
                    "failure_window_s": settings.failure_window_s,
                    "last_exit_reason": reason,
                },
            ),
        )
    at_s = next_start_at(state, settings, now_s)
    n = state.consecutive_failures
    return (
        WaitUntil(
            at_s,
            f"{engine} backoff after {n} consecutive failure{'s' if n != 1 else ''} "
            f"(last: {reason}); next start in {secs(at_s - now_s)}",
        ),
    )


def manual_start_allowed(
    state: BackoffState, settings: BackoffSettings, now_s: float, force: bool, *, verb: str = "start"
) -> Admit | Refuse:
    """May a person's ``llmctl start`` go ahead now?

    With no failure streak, yes (a person may restart a healthy engine at any time). Inside a
    backoff, or after the engine was marked failed, it is refused until the backoff ends, and the
    message says what ``--force`` would override; ``force=True`` admits it.
    """
    engine = state.engine
    if state.consecutive_failures == 0:
        return Admit(engine, "no failure streak")
    until_s = next_start_at(state, settings, now_s)
    failed = is_failed(state, settings, now_s)
    reason = state.last_exit_reason or "exited"
    n = state.consecutive_failures
    if failed:
        what = (
            f"{engine} is failed after {failures_in_window(state, settings, now_s)} failures within "
            f"{secs(settings.failure_window_s)} (last: {reason})"
        )
    else:
        what = f"{engine} is in backoff after {n} consecutive failure{'s' if n != 1 else ''} (last: {reason})"
    if force:
        return Admit(engine, f"--force: {what}; started anyway")
    if until_s <= now_s:
        return Admit(engine, f"{what}; the backoff has passed")
    return Refuse(
        engine,
        "failed" if failed else "backoff",
        f"{what}; a start is allowed in {secs(until_s - now_s)}. "
        f"`llmctl {verb} {engine} --force` starts it now, overriding the backoff "
        "(a restart right after an out-of-memory crash usually crashes again)",
        until_s=until_s,
    )


def start_allowed(
    state: BackoffState, settings: BackoffSettings, now_s: float, *, force: bool, manual: bool
) -> Admit | Refuse:
    """May a start command go ahead now? A person's (``manual``) as ``manual_start_allowed`` says. One on a
    request's or the daemon's behalf (a swap, an on-demand start after an idle unload) waits out the floor
    between spawns before it spawns (``on_demand_start_at``), so the floor alone does not refuse it: only the
    failure streak's own backoff does."""
    if not manual:
        state = replace(state, spawn_times_s=())
    return manual_start_allowed(state, settings, now_s, force)


def manual_restart_allowed(
    state: BackoffState, settings: BackoffSettings, now_s: float, force: bool, *, running: bool = True
) -> Admit | Refuse:
    """May a person's ``llmctl restart`` spawn the engine again now?

    A restart is a spawn, so the floor between two spawns holds for it too (a restart right after
    an out-of-memory crash crashes again); ``force=True`` overrides it. Of an engine that is not
    ``running`` (in backoff or failed after its streak, or stopped) a restart is a start: the failure
    streak's backoff holds as for ``llmctl start`` (``manual_start_allowed``). It did not, where the
    failed starts never spawned (a port it could not listen on): no spawn to keep the floor from.
    """
    if not running:
        streak = manual_start_allowed(state, settings, now_s, force, verb="restart")
        if isinstance(streak, Refuse):
            return streak
    engine = state.engine
    last_s = state.last_spawn_at_s
    min_s = settings.min_interval_s
    if force or last_s is None or now_s - last_s >= min_s:
        return Admit(engine, "--force" if force and last_s is not None and now_s - last_s < min_s else "spacing ok")
    return Refuse(
        engine,
        "min_interval",
        f"{engine} was spawned {now_s - last_s:.0f}s ago; two spawns are kept at least {min_s:.0f}s apart "
        f"(a restart right after an out-of-memory crash crashes again). Retry in {secs(min_s - (now_s - last_s))}, "
        "or use `llmctl restart --force` to override the 60s spacing",
        until_s=last_s + min_s,
    )


# An automatic start after a start memory admission refused waits at least this long (see refusal_cooldown_s).
REFUSAL_COOLDOWN_MIN_S = 60.0


def refusal_cooldown_s(admission_wait_s: float) -> float:
    """How long automatic starts leave an engine alone after memory admission refused its start: as long as
    that start already waited for memory (``admission_wait``), and at least a minute. A swap to it would
    stop the resident engine (minutes of loading for a large model) for a start likely to be refused again."""
    return max(REFUSAL_COOLDOWN_MIN_S, admission_wait_s)


def automatic_start_allowed(
    state: BackoffState, settings: BackoffSettings, now_s: float, *, waiting: str | None = None,
    refused_at_s: float | None = None, refusal: str = "", refusal_cooldown_s: float = 0.0,
) -> Admit | Refuse:
    """May an automatic swap (a gateway request for a model not resident) start this engine now?

    Never while it waits in backoff or is failed (``waiting`` names that state and why), nor while
    its failure streak's backoff has not passed: an automatic swap never trades a working engine
    for one its backoff would refuse. Nor within ``refusal_cooldown_s`` of a start memory admission
    refused (``refused_at_s``, ``refusal`` its message): memory short a moment ago is likely short still,
    and the swap would stop what runs for nothing. A person's ``llmctl switch`` or ``llmctl start``
    does not ask this.
    """
    # The floor between two spawns holds an on-demand start as a wait (``on_demand_start_at``), not a refusal:
    # only the failure streak's own backoff refuses (an engine that crashed twice, came back and was swapped
    # out a minute later is not refused for its last spawn's floor, as one with no crash behind it is not).
    verdict = start_allowed(state, settings, now_s, force=False, manual=False)
    if isinstance(verdict, Admit) and waiting is not None:
        return Refuse(state.engine, "waiting", waiting)
    if isinstance(verdict, Admit) and refused_at_s is not None and now_s - refused_at_s < refusal_cooldown_s:
        until_s = refused_at_s + refusal_cooldown_s
        return Refuse(state.engine, "start_refused",
                      f"{state.engine}'s last start was refused {now_s - refused_at_s:.0f}s ago ({refusal}); "
                      f"requests start it again in {until_s - now_s:.0f}s at the earliest, a person can try "
                      f"now with `llmctl start {state.engine}`", until_s=until_s)
    return verdict


def to_record(state: BackoffState) -> dict[str, object]:
    """A JSON-ready dict of the state, for the caller to persist."""
    return {
        "engine": state.engine,
        "spawn_times_s": list(state.spawn_times_s),
        "failure_times_s": list(state.failure_times_s),
        "consecutive_failures": state.consecutive_failures,
        "last_exit_at_s": state.last_exit_at_s,
        "last_exit_reason": state.last_exit_reason,
    }


def from_record(record: dict[str, object], *, now_s: float | None = None) -> BackoffState:
    """Rebuild a state from ``to_record``'s dict; ValueError names the bad key.

    With ``now_s``, a record holding times later than ``now_s`` comes from an earlier boot (the
    monotonic clock restarted) and is replaced by a fresh state: its times mean nothing now.
    """

    def floats(key: str) -> tuple[float, ...]:
        value = record.get(key, [])
        seconds = [saved_seconds(v) for v in value] if isinstance(value, (list, tuple)) else [None]
        if any(s is None for s in seconds):
            raise ValueError(
                f"backoff record: {key} must be a list of finite numbers (seconds), got {value!r}"
            )
        return tuple(s for s in seconds if s is not None)

    engine = record.get("engine")
    if not isinstance(engine, str) or not engine:
        raise ValueError(f"backoff record: engine must be a non-empty string, got {engine!r}")
    consecutive = record.get("consecutive_failures", 0)
    if not isinstance(consecutive, int) or isinstance(consecutive, bool) or consecutive < 0:
        raise ValueError(
            f"backoff record: consecutive_failures must be an integer >= 0, got {consecutive!r}"
        )
    last_exit = record.get("last_exit_at_s")
    last_exit_s = None if last_exit is None else saved_seconds(last_exit)
    if last_exit is not None and last_exit_s is None:
        raise ValueError(
            f"backoff record: last_exit_at_s must be a finite number or null, got {last_exit!r}"
        )
    last_reason = record.get("last_exit_reason")
    if last_reason is not None and not isinstance(last_reason, str):
        raise ValueError(
            f"backoff record: last_exit_reason must be a string or null, got {last_reason!r}"
        )
    state = BackoffState(
        engine=engine,
        spawn_times_s=floats("spawn_times_s"),
        failure_times_s=floats("failure_times_s"),
        consecutive_failures=consecutive,
        last_exit_at_s=last_exit_s,
        last_exit_reason=last_reason,
    )
    if now_s is not None:
        times = (*state.spawn_times_s, *state.failure_times_s)
        if state.last_exit_at_s is not None:
            times = (*times, state.last_exit_at_s)
        if any(t > now_s for t in times):
            return BackoffState(engine=engine)
    return state


__all__ = [
    "MIN_SPAWN_INTERVAL_S",
    "BackoffSettings",
    "BackoffState",
    "automatic_start_allowed",
    "decide_after_exit",
    "failures_in_window",
    "from_record",
    "is_failed",
    "manual_restart_allowed",
    "manual_start_allowed",
    "next_start_at",
    "only_the_floor_holds",
    "record_exit",
    "record_spawn",
    "start_allowed",
    "streak_backoff_at",
    "to_record",
]
