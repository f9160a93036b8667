"""The swap plan: which engines stop, in which order, before the target starts.

Switching models once ran the old and the new process together (435 GB on a 512 GB Mac) and the
kernel panicked. A swap is therefore strictly *stop first, then start*:

1. ``plan_swap`` returns the ordered steps: every ``Stop`` comes before the single ``Start``, and
   the engines it keeps together with the target fit in the budget and respect exclusivity, so
   no point of the plan is over the budget.
2. The runtime carries out each ``Stop`` (whole process tree gone), then measures memory until
   ``memory_returned`` says enough came back; ``decide_memory_wait`` bounds that wait: it answers
   ``WaitUntil`` (poll again), ``Start`` (enough is back; admission still runs before the spawn),
   or, at the bound, ``Refuse`` + a critical ``Alert`` (the memory never came back, so starting
   would risk the very overcommit the swap exists to prevent).

One swap at a time. ``decide_swap_request`` answers a request that arrives while a swap is
running: a request for the *same* target joins it (``JoinSwap``: the caller waits for the running
swap's outcome); a request for a *different* target is refused with ``Refuse(reason=
"swap_in_progress")`` whose message names the swap in progress (the runtime raises its
``SwapInProgress`` error from it). It is never queued: a queued swap could start a model the
person no longer wants, minutes later.

Pure decisions: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies._format import gb, require, secs
from policies.actions import Admit, Alert, Refuse, Start, Stop, WaitUntil
from policies.admission import Footprint


@dataclass(frozen=True, slots=True)
class SwapSettings:
    """How a swap stops engines and how long it waits for memory to come back."""

    stop_grace_s: float = 120.0
    memory_wait_s: float = 180.0
    poll_interval_s: float = 2.0

    def __post_init__(self) -> None:
        require(
            self.stop_grace_s >= 10,
            f"swap stop_grace_s must be >= 10s, got {self.stop_grace_s!r}: SIGKILL of an engine "
            "that is still unloading can strand wired memory until reboot",
        )
        require(
            self.memory_wait_s > 0,
            f"swap memory_wait_s must be > 0 seconds, got {self.memory_wait_s!r}",
        )
        require(
            0 < self.poll_interval_s <= self.memory_wait_s,
            f"swap poll_interval_s must be > 0 and <= memory_wait_s ({self.memory_wait_s!r}), "
            f"got {self.poll_interval_s!r}",
        )


@dataclass(frozen=True, slots=True)
class SwapPlan:
    """The ordered steps of one swap: all ``stops`` (in order), then ``start`` (None if resident)."""

    target: str
    stops: tuple[Stop, ...]
    start: Start | None
    resident_after: tuple[str, ...]

    @property
    def steps(self) -> tuple[Stop | Start, ...]:
        return (*self.stops, self.start) if self.start is not None else self.stops


def plan_swap(
    resident: Sequence[Footprint],
    target: Footprint,
    budget_bytes: int | None,
    settings: SwapSettings,
    *,
    keep_fitting: bool = True,
    stranded_bytes: int = 0,
    grace_s: Mapping[str, float] | None = None,
) -> SwapPlan | Refuse:
    """Plan a swap to ``target``.

    ``resident`` is ordered by preference to stop first (least recently used first). With
    ``keep_fitting=True`` only the engines that must go are stopped (exclusivity, then the budget,
    in that order); with ``keep_fitting=False`` every other engine is stopped (``llmctl switch``).
    Stranded wired memory counts against the budget. A target that cannot fit even alone is
    refused before anything is stopped. ``grace_s`` gives an engine's own stop grace (its config);
    engines not in it are stopped with ``settings.stop_grace_s``.
    """
    name = target.engine
    if budget_bytes is not None and target.bytes + stranded_bytes > budget_bytes:
        stranded_note = (
            f" with {gb(stranded_bytes)} of wired memory stranded" if stranded_bytes else ""
        )
        return Refuse(
            name,
            "stranded" if stranded_bytes and target.bytes <= budget_bytes else "budget",
            f"{name} needs {gb(target.bytes)}, which cannot fit in the memory budget of "
            f"{gb(budget_bytes)}{stranded_note} even with every other engine stopped",
        )
    target_resident = any(f.engine == name for f in resident)
    others = [f for f in resident if f.engine != name]
    stop: list[Footprint] = []
    keep: list[Footprint] = []
    for f in others:
        if not keep_fitting or target.exclusive or f.exclusive:
            stop.append(f)
        else:
            keep.append(f)
    if budget_bytes is not None:
        # Stop in the caller's order until what stays plus the target fits.
        while keep and sum(f.bytes for f in keep) + target.bytes + stranded_bytes > budget_bytes:
            stop.append(keep.pop(0))
    # Keep the stop order the caller asked for.
    order = {f.engine: i for i, f in enumerate(others)}
    stop.sort(key=lambda f: order[f.engine])
    graces = grace_s or {}
    stops = tuple(
        Stop(f.engine, graces.get(f.engine, settings.stop_grace_s), f"swap to {name}") for f in stop
    )
    return SwapPlan(
        target=name,
        stops=stops,
        start=None if target_resident else Start(name),
        resident_after=tuple(f.engine for f in keep) + (name,),
    )


def drained(*, in_flight: int, in_line: int) -> bool:
    """Whether an engine a swap stops has no request left to finish first (up to ``swap_drain``).

    ``in_flight``: requests the engine is answering. ``in_line``: requests in its line in the gateway,
    with a slot (one handed the slot another just gave back reaches the engine a moment later) or
    waiting for one (``max_concurrent``). They were let through to this engine before the swap's group
    formed, so they are served first (all of A, then all of B): stopping the engine under them would
    hold them for the engine's next start, a swap back (with two exclusive 200 GB models, two loads of
    many minutes each) instead of the answer a moment away. Requests for it that arrive after the swap
    began wait behind the swap's group and are not counted here.
    """
    require(in_flight >= 0 and in_line >= 0, f"counts must be >= 0, got {in_flight!r} and {in_line!r}")
    return in_flight == 0 and in_line == 0


@dataclass(frozen=True, slots=True)
class MemoryReturn:
    """How much memory came back after a stop, and whether it is enough for the target."""

    returned_bytes: int  # available now minus available before the stop (never negative)
    enough: bool
    short_bytes: int  # how much is still missing (0 when enough)


def memory_returned(before_bytes: int, now_bytes: int, needed_bytes: int) -> MemoryReturn:
    """Has enough memory come back? ``before``/``now`` are available bytes; ``needed`` = footprint + headroom."""
    require(needed_bytes >= 0, f"needed_bytes must be >= 0, got {needed_bytes!r}")
    short = max(0, needed_bytes - now_bytes)
    return MemoryReturn(
        returned_bytes=max(0, now_bytes - before_bytes), enough=short == 0, short_bytes=short
    )


def decide_memory_wait(
    target: str,
    stopped_at_s: float,
    now_s: float,
    returned: MemoryReturn,
    settings: SwapSettings,
    *,
    stopped: Sequence[str] = (),
) -> tuple[Start] | tuple[WaitUntil] | tuple[Refuse, Alert]:
    """After the stops finished at ``stopped_at_s``: start, poll again, or give up at the bound."""
    if returned.enough:
        return (Start(target),)
    deadline_s = stopped_at_s + settings.memory_wait_s
    if now_s < deadline_s:
        return (
            WaitUntil(
                min(now_s + settings.poll_interval_s, deadline_s),
                f"waiting for memory before starting {target}: {gb(returned.short_bytes)} still missing",
            ),
        )
    who = ", ".join(stopped) if stopped else "the previous engine"
    message = (
        f"after stopping {who}, memory did not come back within {secs(settings.memory_wait_s)}: "
        f"{gb(returned.returned_bytes)} returned, {gb(returned.short_bytes)} still missing for {target}. "
        "Not starting it; if wired memory stayed high it may be stranded (a reboot frees it)"
    )
    return (
        Refuse(target, "memory_not_returned", message),
        Alert(
            key=f"swap.memory_not_returned:{target}",
            severity="critical",
            summary=message,
            details={
                "target": target,
                "stopped": list(stopped),
                "returned_bytes": returned.returned_bytes,
                "short_bytes": returned.short_bytes,
                "memory_wait_s": settings.memory_wait_s,
            },
        ),
    )


@dataclass(frozen=True, slots=True)
class ActiveSwap:
    """The swap that is running: its target and when it began (monotonic seconds)."""

    target: str
    started_at_s: float


@dataclass(frozen=True, slots=True)
class JoinSwap:
    """The request is for the swap already running: wait for its outcome instead of starting another."""

    target: str


def decide_swap_request(
    active: ActiveSwap | None, requested: str, now_s: float
) -> Admit | JoinSwap | Refuse:
    """A swap to ``requested`` was asked for while ``active`` (or nothing) runs."""
    if active is None:
        return Admit(requested, "no swap in progress")
    if active.target == requested:
        return JoinSwap(requested)
    return Refuse(
        requested,
        "swap_in_progress",
        f"a swap to {active.target} is in progress (started {secs(now_s - active.started_at_s)} ago); "
        f"the swap to {requested} was refused, ask again when it has finished",
    )


__all__ = [
    "ActiveSwap",
    "JoinSwap",
    "MemoryReturn",
    "SwapPlan",
    "SwapSettings",
    "decide_memory_wait",
    "decide_swap_request",
    "memory_returned",
    "plan_swap",
]
