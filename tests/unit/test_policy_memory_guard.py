"""The memory guard policy: watermarks, episodes, drain and restart, the machine rule, learned peaks.

Table tests with a fake clock (``now_s`` passed in), plus a hypothesis property over arbitrary
sequences of readings.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.actions import Alert, Drain, Noop, Restart, WaitUntil
from policies.memory_guard import (
    GuardSettings,
    GuardState,
    Holding,
    PeakHistory,
    Watermarks,
    admission_bytes,
    decide,
    decide_machine,
    drain_finished,
    learned_bytes,
    new_run,
    observe_peak,
    watermarks,
)

GB = 10**9
S = GuardSettings()


@pytest.mark.parametrize(
    ("footprint", "kwargs", "expected"),
    [
        # defaults: footprint x 1.1 and x 1.3
        (100 * GB, {}, Watermarks(110 * GB, 130 * GB, 100 * GB)),
        # explicit watermarks win
        (100 * GB, {"soft_bytes": 105 * GB, "hard_bytes": 120 * GB}, Watermarks(105 * GB, 120 * GB, 100 * GB)),
        # only explicit ones, no footprint known
        (None, {"soft_bytes": 11 * GB, "hard_bytes": 13 * GB}, Watermarks(11 * GB, 13 * GB, None)),
        # only a soft one: hard follows at the factors' ratio
        (None, {"soft_bytes": 110 * GB}, Watermarks(110 * GB, 130 * GB, None)),
        # hard capped where the machine's headroom starts (512 GB machine, 16 GB headroom, 200 GB others)
        (237 * GB, {"total_bytes": 512 * GB, "headroom_bytes": 16 * GB, "others_bytes": 200 * GB},
         Watermarks(round(237 * GB * 1.1), 296 * GB, 237 * GB, capped_by_headroom=True)),
        # ... and soft never above hard
        (237 * GB, {"total_bytes": 512 * GB, "headroom_bytes": 16 * GB, "others_bytes": 250 * GB},
         Watermarks(246 * GB, 246 * GB, 237 * GB, capped_by_headroom=True)),
        # never capped below the footprint the engine was admitted with (that is the machine rule's case)
        (237 * GB, {"total_bytes": 512 * GB, "headroom_bytes": 16 * GB, "others_bytes": 400 * GB},
         Watermarks(237 * GB, 237 * GB, 237 * GB, capped_by_headroom=True)),
        # plenty of room: not capped
        (10 * GB, {"total_bytes": 512 * GB, "headroom_bytes": 16 * GB}, Watermarks(11 * GB, 13 * GB, 10 * GB)),
    ],
)
def test_watermarks(footprint, kwargs, expected) -> None:
    """Watermarks default to footprint x 1.1 / x 1.3, explicit ones win, hard keeps the machine's headroom."""
    assert watermarks(footprint, S, **kwargs) == expected


def test_no_watermarks_without_footprint_or_explicit_ones() -> None:
    """An engine of unknown size with no watermarks is not guarded (doctor warns about it)."""
    assert watermarks(None, S) is None


MARKS = Watermarks(soft_bytes=110, hard_bytes=130, footprint_bytes=100)


def _run(readings: list[int]) -> list[tuple[str, list]]:
    """Feed readings one per second; return (verdict, actions) per reading."""
    state = GuardState()
    out = []
    for t, held in enumerate(readings):
        d = decide("e", state, held, MARKS, float(t), S)
        state = d.state
        out.append((d.verdict, list(d.actions)))
    return out


def test_soft_alerts_once_per_episode_and_resolves_below_the_hysteresis() -> None:
    """Above soft: one warning; staying above: nothing more; back below soft x 0.95: resolved; again: a new one."""
    steps = _run([100, 111, 120, 112, 106, 104, 115])
    verdicts = [v for v, _ in steps]
    assert verdicts == ["ok", "high", "high", "high", "high", "ok", "high"]
    alerts = [(i, a) for i, (_, actions) in enumerate(steps) for a in actions]
    assert [(i, a.severity, a.resolved) for i, a in alerts] == [
        (1, "warning", False), (5, "info", True), (6, "warning", False)]
    first = alerts[0][1]
    assert first.key == "engine.memory_high:e"
    assert first.details["held_bytes"] == 111 and first.details["soft_bytes"] == 110


def test_over_hard_drains_once_with_a_critical_alert_naming_the_numbers() -> None:
    """Crossing hard: Drain + a critical alert with held, hard and footprint; later readings: nothing new."""
    steps = _run([100, 140, 150, 90])
    assert [v for v, _ in steps] == ["ok", "over", "draining", "draining"]
    drain, alert = steps[1][1]
    assert isinstance(drain, Drain) and drain.engine == "e" and drain.grace_s == S.drain_grace_s
    assert isinstance(alert, Alert) and alert.severity == "critical" and alert.key == "engine.memory_exceeded:e"
    assert alert.details == {"engine": "e", "held_bytes": 140, "soft_bytes": 110, "hard_bytes": 130,
                             "footprint_bytes": 100, "source": "rss"}
    assert steps[2][1] == [] and steps[3][1] == []


def test_phys_footprint_is_named_as_the_source() -> None:
    """On macOS the alert says the number is the physical footprint, not RSS."""
    d = decide("e", GuardState(), 200, MARKS, 0.0, S, source="phys_footprint")
    assert "phys_footprint" in d.actions[0].reason and d.actions[1].details["source"] == "phys_footprint"


@pytest.mark.parametrize(
    ("in_flight", "now_s", "expected"),
    [
        (0, 10.0, Restart),  # nothing in flight: restart at once
        (2, 10.0, WaitUntil),  # in flight and within the grace: wait
        (2, 40.0, Restart),  # grace (30 s) over: restart, cutting what is left
    ],
)
def test_drain_finishes_when_in_flight_requests_end_or_the_grace_is_over(in_flight, now_s, expected) -> None:
    """The restart follows the drain: when in-flight requests are done, at the latest after the grace."""
    state = GuardState(draining_since_s=10.0, drain_reason="e holds 140 MB")
    action = drain_finished("e", state, in_flight, now_s, S)
    assert isinstance(action, expected)
    if isinstance(action, WaitUntil):
        assert action.at_s == 40.0
    if isinstance(action, Restart) and in_flight:
        assert "2 request(s) still in flight are cut" in action.reason


def test_drain_finished_is_a_noop_when_not_draining() -> None:
    """No drain, no restart."""
    assert isinstance(drain_finished("e", GuardState(), 0, 0.0, S), Noop)


@pytest.mark.parametrize(
    ("available", "engines", "expected"),
    [
        (50 * GB, [Holding("a", 150 * GB, 100 * GB), Holding("b", 300 * GB, 290 * GB)], "a"),  # most over, not largest
        (50 * GB, [Holding("a", 90 * GB, 100 * GB), Holding("b", 300 * GB, 300 * GB)], None),  # none over footprint
        (50 * GB, [Holding("a", 150 * GB, 100 * GB, recycling=True), Holding("b", 310 * GB, 300 * GB)], None),
        (150 * GB, [Holding("a", 150 * GB, 100 * GB)], None),  # headroom kept
        # a GPU engine whose host footprint is not estimated ("auto" with gpu_footprint: 0): never "over" it
        (50 * GB, [Holding("gpu", 12 * GB, 0), Holding("b", 300 * GB, 300 * GB)], None),
        (50 * GB, [Holding("gpu", 12 * GB, 0), Holding("b", 310 * GB, 300 * GB)], "b"),
    ],
)
def test_machine_rule_recycles_the_largest_offender_first(available, engines, expected) -> None:
    """Below the headroom: the engine most over its footprint, one at a time; within footprint never."""
    action = decide_machine(available, 100 * GB, engines, S)
    if expected is None:
        assert isinstance(action, Noop)
    else:
        assert isinstance(action, Drain) and action.engine == expected
        assert "50.0 GB available" in action.reason and "largest offender" in action.reason


def test_learned_peak_keeps_the_largest_of_the_last_runs() -> None:
    """Each run's peak is kept; the learned peak is the largest of the last keep_runs runs."""
    s = GuardSettings(keep_runs=3)
    h = PeakHistory()
    for run_peaks in ([10, 50, 40], [30], [20], [25]):
        h = new_run(h, s)
        for held in run_peaks:
            h = observe_peak(h, held, s)
    assert h.run_peaks_bytes == (30, 20, 25)  # the 50 of the first run has aged out
    assert learned_bytes(h) == 30


def test_admission_counts_max_of_configured_and_learned() -> None:
    """Admission uses max(configured or estimated footprint, learned peak)."""
    assert admission_bytes(100, PeakHistory((80, 140))) == 140
    assert admission_bytes(100, PeakHistory((80,))) == 100
    assert admission_bytes(None, PeakHistory((80,))) == 80
    assert admission_bytes(None, PeakHistory()) is None


def test_settings_are_validated() -> None:
    """soft above hard or a negative grace is refused with the value named."""
    with pytest.raises(ValueError, match="soft_factor"):
        GuardSettings(soft_factor=1.5, hard_factor=1.3)
    with pytest.raises(ValueError, match="drain_grace_s"):
        GuardSettings(drain_grace_s=-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=40))
def test_any_reading_sequence_warns_once_per_episode_and_drains_only_over_hard(readings) -> None:
    """Whatever the readings: at most one open warning at a time, a drain only at or over hard, and one at most."""
    state, open_episode, drains = GuardState(), False, 0
    for t, held in enumerate(readings):
        d = decide("e", state, held, MARKS, float(t), S)
        for action in d.actions:
            if isinstance(action, Drain):
                assert held >= MARKS.hard_bytes
                drains += 1
            elif isinstance(action, Alert) and action.severity == "warning":
                assert not open_episode and held >= MARKS.soft_bytes
                open_episode = True
            elif isinstance(action, Alert) and action.resolved:
                assert open_episode
                open_episode = False
        state = d.state
    assert drains <= 1


def test_gpu_memory_has_its_own_episode_keys() -> None:
    """GPU memory alerts are keyed engine.gpu_memory_*, so a host episode and a GPU one never merge."""
    high = decide("e", GuardState(), 115, MARKS, 0.0, S, source="nvml", resource="gpu_memory")
    assert high.actions[0].key == "engine.gpu_memory_high:e" and "of GPU memory (nvml)" in high.actions[0].summary
    over = decide("e", GuardState(), 140, MARKS, 0.0, S, source="nvml", resource="gpu_memory")
    assert over.actions[1].key == "engine.gpu_memory_exceeded:e"


def test_the_machine_rules_drain_drains_from_now_keeps_the_soft_episode_and_raises_the_critical_alert() -> None:
    from policies.memory_guard import EXCEEDED_ALERT, GuardState, machine_drain

    drain = Drain("big", 30.0, "the machine has 1 GB available, below its 8 GB headroom; big holds 90 GB")
    decision = machine_drain(drain, GuardState(high=True), 100.0, available_bytes=1 * GB, headroom_bytes=8 * GB,
                             held_bytes=90 * GB)
    assert decision.state == GuardState(high=True, draining_since_s=100.0, drain_reason=drain.reason)
    assert decision.verdict == "draining"
    alert, then = decision.actions
    assert isinstance(alert, Alert) and alert.key == f"{EXCEEDED_ALERT}:big" and alert.severity == "critical"
    assert drain.reason in alert.summary and alert.details["available_bytes"] == 1 * GB
    assert then is drain


def test_a_gpu_drain_is_carried_by_the_host_guard_so_one_drain_runs_per_run() -> None:
    from policies.memory_guard import GuardState, Watermarks, decide, gpu_drain

    marks = Watermarks(soft_bytes=8 * GB, hard_bytes=10 * GB, footprint_bytes=8 * GB)
    over = decide("big", GuardState(), 11 * GB, marks, 50.0, S, source="nvml", resource="gpu_memory")
    assert over.verdict == "over"
    host = gpu_drain(GuardState(high=True), over, 50.0)
    assert host == GuardState(high=True, draining_since_s=50.0, drain_reason=over.state.drain_reason)
    assert decide("big", host, 1 * GB, marks, 51.0, S).verdict == "draining"  # the host reading starts none
