"""Memory guard: an engine that outgrows its footprint is caught before the kernel catches it.

mlx_lm.server's KV cache once grew without a bound until the machine ran out of memory; on a Mac
that is a Metal OOM, a kernel panic or stranded wired memory, on a GPU box it starves the next
model of a swap. The guard compares what an engine's own process tree holds (physical footprint on
macOS, RSS elsewhere: the engine's evidence, never a client's) with two watermarks:

- ``soft`` (default footprint x 1.1): a warning alert, once per episode; the episode closes when
  the engine is back below ``soft x clear_share``.
- ``hard`` (default footprint x 1.3, and never above what keeps the machine's headroom): the
  engine is drained (no new requests; in-flight ones may finish for up to ``drain_grace_s``), then
  restarted gracefully through the normal backoff (so the 60 s floor holds), with a critical alert
  naming the numbers.
- the machine itself below its headroom: the largest offender (the engine most over its footprint)
  is recycled first, one at a time.

The peak an engine reached is learned (kept per run, persisted by the caller): admission uses
max(configured or estimated footprint, learned peak), so the second start of a model is admitted
on what it really took. The watermarks stay on the configured footprint, so a recycled run's peak
cannot ratchet them up.

Pure: the caller passes readings and ``now_s`` and carries out the actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies._format import require, secs
from policies.actions import Alert, Drain, Noop, Restart, WaitUntil

HIGH_ALERT = "engine.memory_high"
EXCEEDED_ALERT = "engine.memory_exceeded"


def size(n_bytes: int | float) -> str:
    """Decimal units, MB below a gigabyte (small engines and tests are tens of MB)."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.1f} MB"


@dataclass(frozen=True, slots=True)
class GuardSettings:
    soft_factor: float = 1.1
    hard_factor: float = 1.3
    drain_grace_s: float = 30.0
    clear_share: float = 0.95  # hysteresis: the soft episode closes below soft x this
    keep_runs: int = 5  # the learned peak is the largest of the last N runs' peaks

    def __post_init__(self) -> None:
        require(1.0 <= self.soft_factor <= self.hard_factor,
                f"soft_factor must be >= 1.0 and <= hard_factor ({self.hard_factor!r}), got {self.soft_factor!r}")
        require(self.drain_grace_s >= 0, f"drain_grace_s must be >= 0 seconds, got {self.drain_grace_s!r}")
        require(0 < self.clear_share <= 1, f"clear_share must be in (0, 1], got {self.clear_share!r}")
        require(self.keep_runs >= 1, f"keep_runs must be >= 1, got {self.keep_runs!r}")


@dataclass(frozen=True, slots=True)
class Watermarks:
    soft_bytes: int
    hard_bytes: int
    footprint_bytes: int | None  # what they derive from (None: both were set explicitly)
    capped_by_headroom: bool = False


def watermarks(footprint_bytes: int | None, settings: GuardSettings, *, soft_bytes: int | None = None,
               hard_bytes: int | None = None, total_bytes: int | None = None, headroom_bytes: int = 0,
               others_bytes: int = 0) -> Watermarks | None:
    """The engine's watermarks; None when neither a footprint nor explicit watermarks are known.

    ``others_bytes``: what the other resident engines are counted at. The hard watermark is capped
    at ``total - headroom - others`` (growing past it eats the machine's headroom), but never below
    the footprint the engine was admitted with: a machine short of memory for other reasons is the
    machine rule's case (:func:`decide_machine`), not a reason to recycle an engine within its size.
    """
    hard = hard_bytes
    if hard is None and footprint_bytes:
        hard = round(footprint_bytes * settings.hard_factor)
    soft = soft_bytes
    if soft is None and footprint_bytes:
        soft = round(footprint_bytes * settings.soft_factor)
    if hard is None and soft is None:
        return None
    if hard is None:
        assert soft is not None
        hard = round(soft * settings.hard_factor / settings.soft_factor)
    capped = False
    if total_bytes is not None:
        cap = max(total_bytes - headroom_bytes - others_bytes, footprint_bytes or 0)
        if cap > 0 and hard > cap:
            hard, capped = cap, True
    if soft is None or soft > hard:
        soft = hard if soft is not None else round(hard * settings.soft_factor / settings.hard_factor)
    return Watermarks(soft_bytes=soft, hard_bytes=hard, footprint_bytes=footprint_bytes, capped_by_headroom=capped)


@dataclass(frozen=True, slots=True)
class GuardState:
    """One engine's guard, for the current run."""

    high: bool = False  # the soft episode is open (its alert was sent)
    draining_since_s: float | None = None
    drain_reason: str = ""


@dataclass(frozen=True, slots=True)
class GuardDecision:
    state: GuardState
    verdict: str  # "ok" | "high" | "over" | "draining"
    actions: tuple[Alert | Drain, ...] = ()


def decide(engine: str, state: GuardState, held_bytes: int, marks: Watermarks, now_s: float,
           settings: GuardSettings, *, source: str = "rss", resource: str = "memory") -> GuardDecision:
    """One reading of an engine's memory against its watermarks.

    ``resource`` names the episode: ``memory`` (host: RSS or physical footprint) or ``gpu_memory``
    (NVML, summed over the engine's devices); each has its own alert keys and state.
    """
    high_key, exceeded_key = f"engine.{resource}_high:{engine}", f"engine.{resource}_exceeded:{engine}"
    holds = f"{engine} holds {size(held_bytes)}{' of GPU memory' if resource == 'gpu_memory' else ''} ({source})"
    if state.draining_since_s is not None:
        return GuardDecision(state, "draining")
    numbers = {"engine": engine, "held_bytes": held_bytes, "soft_bytes": marks.soft_bytes,
               "hard_bytes": marks.hard_bytes, "footprint_bytes": marks.footprint_bytes, "source": source}
    footprint_note = f", footprint {size(marks.footprint_bytes)}" if marks.footprint_bytes else ""
    if held_bytes >= marks.hard_bytes:
        reason = f"{holds}, over its hard watermark {size(marks.hard_bytes)}{footprint_note}"
        actions: list[Alert | Drain] = [
            Drain(engine, settings.drain_grace_s, reason),
            Alert(key=exceeded_key, severity="critical",
                  summary=f"{reason}; draining (in-flight requests may finish for up to "
                          f"{secs(settings.drain_grace_s)}), then a graceful restart through the backoff",
                  details=numbers),
        ]
        return GuardDecision(replace(state, draining_since_s=now_s, drain_reason=reason), "over", tuple(actions))
    if held_bytes >= marks.soft_bytes:
        if state.high:
            return GuardDecision(state, "high")
        alert = Alert(key=high_key, severity="warning",
                      summary=f"{holds}, over its soft watermark {size(marks.soft_bytes)}{footprint_note}; "
                              f"at {size(marks.hard_bytes)} it is drained and restarted",
                      details=numbers)
        return GuardDecision(replace(state, high=True), "high", (alert,))
    if state.high and held_bytes < marks.soft_bytes * settings.clear_share:
        alert = Alert(key=high_key, severity="info", resolved=True,
                      summary=f"{engine} is back to {size(held_bytes)}, below its soft watermark "
                              f"{size(marks.soft_bytes)}", details=numbers)
        return GuardDecision(replace(state, high=False), "ok", (alert,))
    return GuardDecision(state, "high" if state.high else "ok")


def drain_finished(engine: str, state: GuardState, in_flight: int, now_s: float,
                   settings: GuardSettings) -> Restart | WaitUntil | Noop:
    """While draining: restart once the in-flight requests are done, or when the grace is over."""
    if state.draining_since_s is None:
        return Noop("not draining")
    if in_flight <= 0:
        return Restart(engine, f"memory guard: {state.drain_reason}; in-flight requests finished")
    deadline_s = state.draining_since_s + settings.drain_grace_s
    if now_s >= deadline_s:
        return Restart(engine, f"memory guard: {state.drain_reason}; drain grace {secs(settings.drain_grace_s)} over, "
                               f"{in_flight} request(s) still in flight are cut")
    return WaitUntil(deadline_s, f"{in_flight} request(s) in flight")


@dataclass(frozen=True, slots=True)
class Holding:
    """One resident engine for the machine rule."""

    engine: str
    held_bytes: int
    footprint_bytes: int
    recycling: bool = False  # already draining or restarting


def decide_machine(available_bytes: int, headroom_bytes: int, engines: Sequence[Holding],
                   settings: GuardSettings) -> Drain | Noop:
    """The machine below its headroom: recycle the engine most over its footprint, one at a time.

    An engine within its footprint is never recycled by this rule (it would come back at the same
    size); if none is over, the shortage is someone else's and nothing is done here. Nor is one whose host
    footprint is 0: not estimated (``footprint = "auto"`` with a ``gpu_footprint``, its weights in GPU
    memory), so all it holds would count as over, and another program's use of the machine would recycle it.
    """
    if available_bytes >= headroom_bytes:
        return Noop("the machine has its headroom")
    busy = [e.engine for e in engines if e.recycling]
    if busy:
        return Noop(f"waiting for {', '.join(busy)} to be recycled")
    over = [e for e in engines if e.footprint_bytes > 0 and e.held_bytes > e.footprint_bytes]
    if not over:
        return Noop(f"{size(available_bytes)} available, below the {size(headroom_bytes)} headroom, but no engine "
                    "holds more than its footprint")
    worst = max(over, key=lambda e: (e.held_bytes - e.footprint_bytes, e.held_bytes))
    return Drain(worst.engine, settings.drain_grace_s,
                 f"the machine has {size(available_bytes)} available, below its {size(headroom_bytes)} headroom; "
                 f"{worst.engine} holds {size(worst.held_bytes)}, {size(worst.held_bytes - worst.footprint_bytes)} "
                 f"over its footprint {size(worst.footprint_bytes)} (the largest offender)")


def gpu_drain(host: GuardState, gpu: GuardDecision, now_s: float) -> GuardState:
    """The engine's GPU memory went over its hard watermark (``gpu`` decided "over"): the host guard's state
    carries the drain from now, so one drain runs per run whichever memory crossed, and the host reading
    starts no second one."""
    return replace(host, draining_since_s=now_s, drain_reason=gpu.state.drain_reason)


def machine_drain(drain: Drain, state: GuardState, now_s: float, *, available_bytes: int, headroom_bytes: int,
                  held_bytes: int | None) -> GuardDecision:
    """The machine rule chose this engine (``decide_machine``): its guard drains it from now, and a critical
    alert says why (the engine's own memory episode, as an engine over its hard watermark raises)."""
    alert = Alert(key=f"{EXCEEDED_ALERT}:{drain.engine}", severity="critical",
                  summary=f"{drain.reason}; draining, then a graceful restart through the backoff",
                  details={"engine": drain.engine, "available_bytes": available_bytes,
                           "headroom_bytes": headroom_bytes, "held_bytes": held_bytes})
    return GuardDecision(replace(state, draining_since_s=now_s, drain_reason=drain.reason), "draining",
                         (alert, drain))


# ---- learned peak ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeakHistory:
    """The peak of each of the last runs, most recent last (the current run's is the last one)."""

    run_peaks_bytes: tuple[int, ...] = ()


def new_run(history: PeakHistory, settings: GuardSettings) -> PeakHistory:
    return PeakHistory(run_peaks_bytes=(*history.run_peaks_bytes, 0)[-settings.keep_runs:])


def observe_peak(history: PeakHistory, held_bytes: int, settings: GuardSettings) -> PeakHistory:
    peaks = history.run_peaks_bytes or (0,)
    if held_bytes <= peaks[-1]:
        return history if history.run_peaks_bytes else PeakHistory(peaks)
    return PeakHistory(run_peaks_bytes=(*peaks[:-1], held_bytes)[-settings.keep_runs:])


def learned_bytes(history: PeakHistory) -> int:
    return max(history.run_peaks_bytes, default=0)


def admission_bytes(configured_bytes: int | None, history: PeakHistory) -> int | None:
    """What admission counts an engine at: max(configured or estimated footprint, learned peak)."""
    learned = learned_bytes(history)
    if configured_bytes is None:
        return learned or None
    return max(configured_bytes, learned)


__all__ = [
    "EXCEEDED_ALERT", "HIGH_ALERT", "GuardDecision", "GuardSettings", "GuardState", "Holding", "PeakHistory",
    "Watermarks", "admission_bytes", "decide", "decide_machine", "drain_finished", "gpu_drain", "learned_bytes", "machine_drain", "new_run",
    "observe_peak", "size", "watermarks",
]
