"""The swap plan: stops first, then the start; never over the budget; bounded memory wait."""

from __future__ import annotations

import itertools

import pytest

from policies.actions import Admit, Alert, Refuse, Start, Stop, WaitUntil
from policies.admission import Footprint
from policies.swap import (
    ActiveSwap,
    JoinSwap,
    SwapPlan,
    SwapSettings,
    decide_memory_wait,
    decide_swap_request,
    drained,
    memory_returned,
    plan_swap,
)

GB = 10**9
S = SwapSettings()

a = Footprint("a", 100 * GB)
b = Footprint("b", 150 * GB)
c = Footprint("c", 120 * GB)
x = Footprint("x", 300 * GB, exclusive=True)


def plan(
    resident: list[Footprint], target: Footprint, budget: int | None = 400 * GB, **kwargs: object
) -> SwapPlan:
    result = plan_swap(resident, target, budget, S, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, SwapPlan), result
    return result


def peak_bytes(resident: list[Footprint], target: Footprint, p: SwapPlan) -> int:
    """Replay the plan step by step; return the largest resident total seen."""
    sizes = {f.engine: f.bytes for f in (*resident, target)}
    now = {f.engine for f in resident}
    peak = sum(sizes[e] for e in now)
    for step in p.steps:
        if isinstance(step, Stop):
            now.discard(step.engine)
        else:
            now.add(step.engine)
        peak = max(peak, sum(sizes[e] for e in now))
    return peak


@pytest.mark.parametrize(
    ("resident", "target", "stopped"),
    [
        ([], a, []),
        ([a], b, []),  # 250 GB fits the 400 GB budget together
        ([a, b], c, []),  # 100 + 150 + 120 = 370 GB fits: nothing stops
        ([a, b], Footprint("d", 200 * GB), ["a"]),  # 450 GB: stop a, 350 GB fits
        ([b, c], Footprint("d", 200 * GB), ["b"]),  # stop the least recently used first
        ([a, b], x, ["a", "b"]),  # an exclusive target stops everyone
        ([x], a, ["x"]),  # an exclusive resident is stopped
    ],
)
def test_plan_stops_only_what_must_go(
    resident: list[Footprint], target: Footprint, stopped: list[str]
) -> None:
    """With keep_fitting the plan stops what exclusivity and the budget require, in LRU order."""
    p = plan(resident, target)
    assert [s.engine for s in p.stops] == stopped
    assert p.start == Start(target.engine)
    assert p.steps[-1] == Start(target.engine)
    assert all(s.grace_s == S.stop_grace_s for s in p.stops)


def test_switch_stops_every_other_engine() -> None:
    """`llmctl switch` (keep_fitting=False) leaves only the target resident."""
    p = plan([a, b], c, keep_fitting=False)
    assert [s.engine for s in p.stops] == ["a", "b"]
    assert p.resident_after == ("c",)


def test_target_already_resident_needs_no_start() -> None:
    """Switching to the engine that already runs starts nothing."""
    p = plan([a, b], b)
    assert p.start is None and p.stops == ()


def test_target_that_cannot_fit_alone_is_refused_before_anything_stops() -> None:
    """A model bigger than the budget is refused up front; nothing is stopped for it."""
    result = plan_swap([a], Footprint("huge", 500 * GB), 400 * GB, S)
    assert isinstance(result, Refuse) and result.reason == "budget"
    assert "500.0 GB" in result.message and "400.0 GB" in result.message


def test_stranded_memory_counts_against_the_budget() -> None:
    """With memory stranded, a target that would otherwise fit is refused as stranded."""
    result = plan_swap([], b, 400 * GB, S, stranded_bytes=300 * GB)
    assert isinstance(result, Refuse) and result.reason == "stranded"


def test_no_step_of_any_plan_is_over_the_budget() -> None:
    """For every combination of residents and targets, no point of the plan exceeds the budget."""
    engines = [a, b, c, Footprint("d", 200 * GB), Footprint("e", 50 * GB, exclusive=True)]
    budget = 400 * GB
    for n in range(0, 4):
        for resident in itertools.permutations(engines, n):
            resident_list = list(resident)
            if sum(f.bytes for f in resident_list) > budget:
                continue
            if any(f.exclusive for f in resident_list) and len(resident_list) > 1:
                continue
            for target in engines:
                for keep in (True, False):
                    p = plan(resident_list, target, budget, keep_fitting=keep)
                    assert peak_bytes(resident_list, target, p) <= budget
                    after = [f for f in engines if f.engine in p.resident_after]
                    if any(f.exclusive for f in after):
                        assert len(after) == 1, (resident_list, target, p)


@pytest.mark.parametrize(
    ("before", "now", "needed", "returned", "enough", "short"),
    [
        (10 * GB, 260 * GB, 250 * GB, 250 * GB, True, 0),
        (10 * GB, 200 * GB, 250 * GB, 190 * GB, False, 50 * GB),
        (10 * GB, 5 * GB, 250 * GB, 0, False, 245 * GB),
    ],
)
def test_memory_returned(
    before: int, now: int, needed: int, returned: int, enough: bool, short: int
) -> None:
    """Enough memory is back only when what is available covers what the target needs."""
    r = memory_returned(before, now, needed)
    assert (r.returned_bytes, r.enough, r.short_bytes) == (returned, enough, short)


def test_memory_wait_polls_then_gives_up_at_the_bound() -> None:
    """While memory is missing the swap polls; at the bound it refuses and raises a critical alert."""
    missing = memory_returned(10 * GB, 200 * GB, 250 * GB)
    (wait,) = decide_memory_wait("b", 1000.0, 1010.0, missing, S, stopped=["a"])
    assert isinstance(wait, WaitUntil) and wait.at_s == 1012.0
    (last,) = decide_memory_wait("b", 1000.0, 1179.5, missing, S, stopped=["a"])
    assert isinstance(last, WaitUntil) and last.at_s == 1180.0  # never past the bound
    refused, alert = decide_memory_wait("b", 1000.0, 1180.0, missing, S, stopped=["a"])
    assert isinstance(refused, Refuse) and refused.reason == "memory_not_returned"
    assert isinstance(alert, Alert) and alert.severity == "critical"
    assert alert.key == "swap.memory_not_returned:b"
    assert "a" in refused.message and "50.0 GB" in refused.message


def test_memory_back_starts_the_target() -> None:
    """Once enough memory is back the target starts."""
    back = memory_returned(10 * GB, 300 * GB, 250 * GB)
    assert decide_memory_wait("b", 1000.0, 1003.0, back, S) == (Start("b"),)


def test_second_swap_request() -> None:
    """During a swap, the same target joins it and another target is refused naming the running swap."""
    active = ActiveSwap("b", started_at_s=100.0)
    assert decide_swap_request(None, "c", 130.0) == Admit("c", "no swap in progress")
    assert decide_swap_request(active, "b", 130.0) == JoinSwap("b")
    refused = decide_swap_request(active, "c", 130.0)
    assert isinstance(refused, Refuse) and refused.reason == "swap_in_progress"
    assert "swap to b is in progress" in refused.message and "30s" in refused.message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"stop_grace_s": 1}, "strand wired memory"),
        ({"memory_wait_s": 0}, "memory_wait_s must be > 0"),
        ({"poll_interval_s": 0}, "poll_interval_s must be > 0"),
        (
            {"memory_wait_s": 5, "poll_interval_s": 10},
            "poll_interval_s must be > 0 and <= memory_wait_s",
        ),
    ],
)
def test_invalid_swap_settings(kwargs: dict[str, float], needle: str) -> None:
    """Swap settings that would SIGKILL too soon or never poll are rejected with the reason."""
    with pytest.raises(ValueError, match=needle):
        SwapSettings(**kwargs)


@pytest.mark.parametrize(("in_flight", "in_line", "done"), [(0, 0, True), (1, 0, False), (0, 1, False), (2, 5, False)])
def test_a_swap_drains_the_requests_in_the_engines_line_too(in_flight: int, in_line: int, done: bool) -> None:
    assert drained(in_flight=in_flight, in_line=in_line) is done


def test_drained_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts must be >= 0"):
        drained(in_flight=-1, in_line=0)
