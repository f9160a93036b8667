"""Restart backoff: the 60 s floor, exponential waits, streak reset, crash loop -> failed."""

from __future__ import annotations

import pytest

from policies.actions import Admit, Alert, MarkFailed, Refuse, WaitUntil
from policies.backoff import (
    REFUSAL_COOLDOWN_MIN_S,
    BackoffSettings,
    BackoffState,
    automatic_start_allowed,
    decide_after_exit,
    from_record,
    is_failed,
    manual_start_allowed,
    next_start_at,
    on_demand_start_at,
    record_exit,
    record_spawn,
    refusal_cooldown_s,
    to_record,
)
from supervisord_llm.clock import FakeClock

S = BackoffSettings()


def crash_after(
    state: BackoffState,
    clock: FakeClock,
    up_s: float,
    ready_for_s: float = 0.0,
    reason: str = "exit code 1",
) -> BackoffState:
    """Spawn now, crash ``up_s`` later."""
    state = record_spawn(state, clock.now())
    clock.advance(up_s)
    return record_exit(state, clock.now(), ready_for_s, reason, settings=S)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("min_interval_s", 59, "Metal OOM"),
        ("min_interval_s", 10, "ThrottleInterval"),
        ("initial_s", 0, "initial_s must be > 0"),
        ("factor", 0.5, "factor must be >= 1"),
        ("max_s", 30, "max_s"),
        ("max_failures", 0, "max_failures must be an integer >= 1"),
        ("failure_window_s", 0, "failure_window_s must be > 0"),
        ("reset_after_ready_s", -1, "reset_after_ready_s must be > 0"),
    ],
)
def test_invalid_settings_are_rejected_with_the_reason(
    field: str, value: float, needle: str
) -> None:
    """A config with a restart interval under 60 s (or other nonsense) is refused with a reason."""
    with pytest.raises(ValueError, match=needle):
        BackoffSettings(**{field: value})


def test_first_start_is_immediate() -> None:
    """An engine that never ran may start at once."""
    assert next_start_at(BackoffState("mlx"), S, 1000.0) == 1000.0


@pytest.mark.parametrize(
    ("up_s", "expected_wait_s"),
    [
        (1.0, 60.0),  # crashed after 1 s: 60 s after the exit (also >= spawn + 60)
        (50.0, 60.0),  # exit + 60 s
        (200.0, 60.0),  # long-ish run that never became ready long enough: still initial_s
    ],
)
def test_first_failure_waits_initial(up_s: float, expected_wait_s: float) -> None:
    """After one crash the next start waits initial_s after the exit, and never < 60 s after the spawn."""
    clock = FakeClock(start_s=1000.0)
    state = crash_after(BackoffState("mlx"), clock, up_s)
    at = next_start_at(state, S, clock.now())
    assert at == pytest.approx(clock.now() + expected_wait_s)
    assert at >= 1000.0 + 60.0


def test_waits_double_up_to_the_cap() -> None:
    """Consecutive crashes wait 60, 120, 240, 480, 900, 900 s after each exit."""
    settings = BackoffSettings(max_failures=100)
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    waits = []
    for _ in range(6):
        state = record_spawn(state, clock.now())
        clock.advance(5)
        state = record_exit(state, clock.now(), 0.0, "Metal OOM", settings=settings)
        at = next_start_at(state, settings, clock.now())
        waits.append(at - clock.now())
        clock.advance(at - clock.now())
    assert waits == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]


def test_spawn_floor_holds_even_without_failures() -> None:
    """Two automatic spawns are >= 60 s apart even when the first run exited cleanly at once."""
    state = record_spawn(BackoffState("mlx"), 100.0)
    assert next_start_at(state, S, 110.0) == 160.0
    assert next_start_at(state, S, 200.0) == 200.0


def test_a_long_ready_run_resets_the_streak() -> None:
    """A run that stayed ready >= 10 min starts the backoff over at initial_s."""
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    for _ in range(3):
        state = crash_after(state, clock, 5)
        clock.advance(next_start_at(state, S, clock.now()) - clock.now())
    assert state.consecutive_failures == 3
    state = crash_after(state, clock, 700, ready_for_s=650)
    assert state.consecutive_failures == 1
    assert next_start_at(state, S, clock.now()) == pytest.approx(clock.now() + 60)
    assert len(state.failure_times_s) == 1


def test_short_ready_run_does_not_reset() -> None:
    """A run ready for less than reset_after_ready_s keeps counting the streak."""
    clock = FakeClock(start_s=0.0)
    state = crash_after(BackoffState("mlx"), clock, 5)
    clock.advance(60)
    state = crash_after(state, clock, 400, ready_for_s=390)
    assert state.consecutive_failures == 2
    assert next_start_at(state, S, clock.now()) == pytest.approx(clock.now() + 120)


def test_crash_loop_ends_in_failed_with_a_critical_alert() -> None:
    """Five failures inside 30 minutes mark the engine failed and raise one critical alert."""
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    decisions = []
    for _ in range(5):
        state = crash_after(state, clock, 5, reason="Metal OOM")
        decision = decide_after_exit(state, S, clock.now())
        decisions.append(decision)
        if isinstance(decision[0], WaitUntil):
            clock.advance(decision[0].at_s - clock.now())
    assert all(isinstance(d[0], WaitUntil) for d in decisions[:4])
    failed, alert = decisions[4]
    assert isinstance(failed, MarkFailed) and failed.engine == "mlx"
    assert isinstance(alert, Alert)
    assert alert.key == "engine.failed:mlx" and alert.severity == "critical"
    assert "Metal OOM" in alert.summary and "llmctl start mlx" in alert.summary
    assert is_failed(state, S, clock.now())


def test_failures_spread_beyond_the_window_do_not_fail() -> None:
    """Failures further apart than the window never add up to failed."""
    settings = BackoffSettings(max_failures=3, failure_window_s=1800, max_s=900)
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    for _ in range(6):
        state = record_spawn(state, clock.now())
        clock.advance(1000)  # ran 1000 s (ready only 500 s: no reset)
        state = record_exit(state, clock.now(), 500.0, "exit 1", settings=settings)
        decision = decide_after_exit(state, settings, clock.now())
        assert isinstance(decision[0], WaitUntil), decision
        clock.advance(decision[0].at_s - clock.now())


def test_wait_reason_names_the_streak_and_the_cause() -> None:
    """The backoff decision says how many failures and the last cause."""
    clock = FakeClock(start_s=0.0)
    state = crash_after(BackoffState("mlx"), clock, 3, reason="killed by SIGKILL")
    (wait,) = decide_after_exit(state, S, clock.now())
    assert isinstance(wait, WaitUntil)
    assert "1 consecutive failure" in wait.reason and "SIGKILL" in wait.reason


@pytest.mark.parametrize(
    ("failures", "elapsed_s", "force", "expected"),
    [
        (0, 1.0, False, Admit),  # a healthy engine restarts by hand at any time
        (1, 10.0, False, Refuse),  # inside the 60 s backoff
        (1, 10.0, True, Admit),  # --force overrides
        (1, 61.0, False, Admit),  # backoff over
        (3, 200.0, False, Refuse),  # third failure waits 240 s
        (3, 241.0, False, Admit),
    ],
)
def test_manual_start(failures: int, elapsed_s: float, force: bool, expected: type) -> None:
    """`llmctl start` inside a backoff is refused unless --force; outside it goes ahead."""
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    for i in range(failures):
        if i:
            clock.advance(next_start_at(state, S, clock.now()) - clock.now())
        state = crash_after(state, clock, 5)
    clock.advance(elapsed_s)  # elapsed since the last exit
    decision = manual_start_allowed(state, S, clock.now(), force)
    assert isinstance(decision, expected), decision


def test_manual_refusal_says_what_force_overrides_and_until_when() -> None:
    """The refusal names the backoff, the wait left and the --force escape."""
    clock = FakeClock(start_s=0.0)
    state = crash_after(BackoffState("mlx"), clock, 5, reason="Metal OOM")
    clock.advance(15)
    refused = manual_start_allowed(state, S, clock.now(), force=False)
    assert isinstance(refused, Refuse)
    assert refused.reason == "backoff"
    assert refused.until_s == pytest.approx(5 + 60)
    assert (
        "--force" in refused.message and "45s" in refused.message and "Metal OOM" in refused.message
    )


def test_manual_start_of_failed_engine_names_failed() -> None:
    """A failed engine's manual start is refused as 'failed' until its backoff passes."""
    clock = FakeClock(start_s=0.0)
    state = BackoffState("mlx")
    for _ in range(5):
        state = crash_after(state, clock, 5)
    refused = manual_start_allowed(state, S, clock.now(), force=False)
    assert isinstance(refused, Refuse) and refused.reason == "failed"
    assert isinstance(manual_start_allowed(state, S, clock.now(), force=True), Admit)


def test_state_round_trips_through_its_record() -> None:
    """The persisted record restores the same state, so the floor survives a daemon restart."""
    clock = FakeClock(start_s=500.0)
    state = crash_after(BackoffState("mlx"), clock, 5)
    restored = from_record(to_record(state), now_s=clock.now())
    assert restored == state
    assert next_start_at(restored, S, clock.now()) == next_start_at(state, S, clock.now())


def test_record_from_an_earlier_boot_is_dropped() -> None:
    """Times later than now come from before a reboot (monotonic reset) and are forgotten."""
    state = record_spawn(BackoffState("mlx"), 90_000.0)
    assert from_record(to_record(state), now_s=30.0) == BackoffState("mlx")


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"engine": ""}, "engine must be a non-empty string"),
        ({"engine": "mlx", "spawn_times_s": "soon"}, "spawn_times_s must be a list of finite numbers"),
        ({"engine": "mlx", "spawn_times_s": [1.0, 10**400]}, "spawn_times_s must be a list of finite numbers"),
        ({"engine": "mlx", "failure_times_s": [float("nan")]}, "failure_times_s must be a list of finite"),
        (
            {"engine": "mlx", "consecutive_failures": -1},
            "consecutive_failures must be an integer >= 0",
        ),
        ({"engine": "mlx", "last_exit_at_s": "x"}, "last_exit_at_s must be a finite number or null"),
        ({"engine": "mlx", "last_exit_at_s": 10**400}, "last_exit_at_s must be a finite number or null"),
    ],
)
def test_bad_record_names_the_key(record: dict[str, object], needle: str) -> None:
    """A corrupt persisted record fails with the key and what is valid."""
    with pytest.raises(ValueError, match=needle):
        from_record(record)


REFUSAL = "big needs 104.0 GB, but only 31.6 GB is available"


@pytest.mark.parametrize(("since_s", "admitted"), [(1.0, False), (299.0, False), (300.0, True), (5000.0, True)])
def test_automatic_starts_leave_an_engine_alone_for_a_while_after_memory_admission_refused_it(
        since_s: float, admitted: bool) -> None:
    """A swap to an engine whose start was just refused would stop what runs for a start likely refused again:
    automatic starts wait out the cooldown, then try again; the refusal names it, the numbers and the way out."""
    state = BackoffState(engine="big")
    verdict = automatic_start_allowed(state, S, 1000.0 + since_s, refused_at_s=1000.0, refusal=REFUSAL,
                                      refusal_cooldown_s=refusal_cooldown_s(300.0))
    if admitted:
        assert isinstance(verdict, Admit)
    else:
        assert isinstance(verdict, Refuse) and verdict.reason == "start_refused"
        assert REFUSAL in verdict.message and "llmctl start big" in verdict.message
        assert verdict.until_s == 1300.0


def test_the_refusal_cooldown_is_the_admission_wait_and_at_least_a_minute() -> None:
    assert refusal_cooldown_s(0.0) == REFUSAL_COOLDOWN_MIN_S == 60.0
    assert refusal_cooldown_s(300.0) == 300.0


def test_without_a_standing_refusal_automatic_starts_follow_the_backoff_alone() -> None:
    assert isinstance(automatic_start_allowed(BackoffState(engine="big"), S, 1000.0, refused_at_s=None,
                                              refusal_cooldown_s=300.0), Admit)


def test_an_engine_whose_crash_backoff_has_passed_is_not_refused_a_swap_for_its_spawn_floor() -> None:
    """Crashed twice, came back (spawned at 1000 s) and swapped out soon after: its streak's backoff (120 s after
    the last exit) has passed, so a request may swap it in again; the floor between spawns only delays that
    start (on_demand_start_at), as for an engine with no crash behind it. Inside the streak's backoff it is
    refused, naming the crash."""
    clock = FakeClock(start_s=0.0)
    state = crash_after(BackoffState(engine="a"), clock, 5.0, reason="killed by SIGKILL")
    clock.advance(100.0)
    state = crash_after(state, clock, 5.0, reason="killed by SIGKILL")  # the last exit at 110 s
    inside = automatic_start_allowed(state, S, 150.0)  # 40 s after the second crash: the 120 s backoff holds
    assert isinstance(inside, Refuse) and inside.reason == "backoff" and "SIGKILL" in inside.message
    state = record_spawn(state, 1000.0)
    assert isinstance(automatic_start_allowed(state, S, 1020.0), Admit)
    assert on_demand_start_at(state, S, 1020.0) == 1060.0  # the floor still holds the start


def test_a_restart_refused_for_part_of_a_second_never_says_retry_in_0s() -> None:
    """59.6 s after a spawn the restart is still refused for 0.4 s: "Retry in 1s", not "Retry in 0s"."""
    from policies.backoff import manual_restart_allowed

    state = record_spawn(BackoffState(engine="e"), 100.0)
    refused = manual_restart_allowed(state, S, 159.6, False)
    assert isinstance(refused, Refuse) and "Retry in 1s" in refused.message, refused


def test_a_restart_of_an_engine_in_backoff_whose_starts_never_spawned_keeps_the_backoff() -> None:
    """Three starts that failed before any spawn (a host it cannot listen on): no spawn keeps the floor, but the
    streak's backoff holds a plain `llmctl restart` as it holds `llmctl start` (it was let through, failed again
    and made the backoff longer); --force overrides it, and a running engine's restart asks only the floor."""
    from policies.backoff import manual_restart_allowed, record_exit

    state = BackoffState(engine="e")
    for at_s in (0.0, 10.0, 40.0):
        state = record_exit(state, at_s, 0.0, "cannot listen on 10.255.255.1:8081", settings=S)
    assert not state.spawn_times_s and state.consecutive_failures == 3
    refused = manual_restart_allowed(state, S, 45.0, False, running=False)
    assert isinstance(refused, Refuse) and refused.reason == "backoff" and "cannot listen" in refused.message, refused
    assert "`llmctl restart e --force`" in refused.message, refused.message
    assert isinstance(manual_restart_allowed(state, S, 45.0, True, running=False), Admit)
    assert isinstance(manual_restart_allowed(state, S, 45.0, False, running=True), Admit)
    assert isinstance(manual_restart_allowed(state, S, 10_000.0, False, running=False), Admit)  # the backoff passed
