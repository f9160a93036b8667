"""The evidence rule for `hung`: only the engine's own silence, never a client's pace or a completion counter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.health import ProgressEvidence, Silence, assess_progress, steps_advanced
from probes.readings import EngineCounters

STALL_S = 10.0


def counters(points: list[tuple[float, float, float]]) -> tuple[EngineCounters, ...]:
    # vLLM/SGLang: the token total grows per decode step, so it is the step count too
    return tuple(EngineCounters(at_s=t, generated_tokens_total=total, requests_running=running, steps_total=total)
                 for t, total, running in points)


def test_a_silent_stream_with_no_other_progress_is_hung_naming_the_stream() -> None:
    """A live stream that got nothing from the engine for the stall time, and nothing else moved: hung (stream)."""
    ev = ProgressEvidence(watch_since_s=0.0, last_token_s=5.0,
                          silences=(Silence("stream", since_s=5.0, at_s=13.0, detail="a live decode stream"),))
    verdict = assess_progress(ev, STALL_S, now_s=16.0)
    assert verdict.hung and verdict.source == "stream" and verdict.silent_s == pytest.approx(11.0)
    assert verdict.evidence() == {"source": "stream", "silent_s": 11.0, "last_progress": "stream"}


def test_a_successful_canary_after_the_silence_clears_it_at_once() -> None:
    """A canary that generated after a stream went silent voids that silence: not hung."""
    ev = ProgressEvidence(watch_since_s=0.0, last_token_s=5.0, last_canary_ok_s=17.0,
                          silences=(Silence("stream", since_s=5.0, at_s=15.0),))
    assert not assess_progress(ev, STALL_S, now_s=18.0).hung
    # ... and stays void later: the silence was seen before that progress.
    assert not assess_progress(ev, STALL_S, now_s=40.0).hung


def test_an_engine_side_token_clears_a_canary_stall() -> None:
    """Any new token read from the engine clears a stalled canary's verdict."""
    ev = ProgressEvidence(watch_since_s=0.0, silences=(Silence("canary", since_s=0.0, at_s=12.0),))
    assert assess_progress(ev, STALL_S, now_s=12.5).hung
    later = ProgressEvidence(watch_since_s=0.0, last_token_s=13.0, silences=ev.silences)
    assert not assess_progress(later, STALL_S, now_s=13.5).hung


def test_completion_only_counters_never_yield_hung() -> None:
    """oMLX/llama.cpp totals flat for minutes with a request running are no evidence of a hang."""
    flat = counters([(t, 500.0, 1.0) for t in range(0, 100, 5)])
    ev = ProgressEvidence(watch_since_s=0.0, last_canary_ok_s=0.0, counters=flat, counters_per_step=False)
    assert not assess_progress(ev, STALL_S, now_s=95.0).hung


def test_per_step_counters_flat_while_running_are_hung_and_advancing_is_progress() -> None:
    """vLLM/SGLang per-step totals: flat with requests running is hung; an advance is progress."""
    flat = counters([(t, 500.0, 1.0) for t in range(0, 30, 5)])
    ev = ProgressEvidence(watch_since_s=0.0, counters=flat, counters_per_step=True)
    verdict = assess_progress(ev, STALL_S, now_s=25.0)
    assert verdict.hung and verdict.source == "counters"
    moving = counters([(t, 500.0 + t * 10, 1.0) for t in range(0, 30, 5)])
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, counters=moving, counters_per_step=True),
                              STALL_S, now_s=25.0)
    assert not verdict.hung and verdict.last_progress_source == "counters"


def llama_cpp(points: list[tuple[float, float, float, float]]) -> tuple[EngineCounters, ...]:
    """llama-server's counters: a token total that grows only when a slot finishes, and n_decode_total."""
    return tuple(EngineCounters(at_s=t, generated_tokens_total=tokens, requests_running=running, steps_total=steps)
                 for t, tokens, steps, running in points)


def test_llama_cpp_busy_with_other_clients_is_not_hung_though_the_canary_waits() -> None:
    """Every slot of a llama-server busy with long answers: the canary waits for a slot and gets no token,
    the token total (completion-time) stays flat, but n_decode_total advances: not hung."""
    busy = llama_cpp([(t, 16.0, 100.0 + 40 * t, 4.0) for t in range(0, 60, 5)])
    waiting = (Silence("canary", since_s=20.0, at_s=50.0, detail="a canary got no token within 30s"),)
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, silences=waiting, counters=busy,
                                               counters_per_step=True), STALL_S, now_s=56.0)
    assert not verdict.hung and verdict.last_progress_source == "counters"
    # The same engine with its steps flat while it says requests run: hung, on the step count.
    stuck = llama_cpp([(t, 16.0, 900.0, 4.0) for t in range(0, 60, 5)])
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, counters=stuck, counters_per_step=True),
                              STALL_S, now_s=56.0)
    assert verdict.hung and verdict.source == "counters" and "no step for" in (verdict.reason or "")


def test_a_token_total_without_a_step_count_is_no_evidence() -> None:
    """Counters with no step count (an older llama-server, oMLX) neither prove progress nor silence."""
    moving_tokens = tuple(EngineCounters(at_s=t, generated_tokens_total=10.0 * t, requests_running=2.0)
                          for t in range(0, 60, 5))
    waiting = (Silence("canary", since_s=20.0, at_s=50.0),)
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, silences=waiting, counters=moving_tokens,
                                               counters_per_step=True), STALL_S, now_s=56.0)
    assert verdict.hung and verdict.source == "canary"


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (EngineCounters(1.0, 16.0, 4.0, steps_total=100.0), EngineCounters(31.0, 16.0, 4.0, steps_total=1300.0),
         "the engine ran 1200 steps in 30.0s with 4 requests running"),
        (EngineCounters(1.0, 16.0, 4.0, steps_total=100.0), EngineCounters(31.0, 16.0, 4.0, steps_total=100.0),
         None),  # flat: the engine did nothing
        (EngineCounters(1.0, 16.0, 0.0, steps_total=100.0), EngineCounters(31.0, 40.0, 0.0, steps_total=90.0),
         None),  # went down: a new engine process
        (EngineCounters(1.0, 16.0, 4.0), EngineCounters(31.0, 99.0, 4.0), None),  # no step count
        (None, EngineCounters(31.0, 16.0, 4.0, steps_total=1300.0), None),  # no reading before
        (EngineCounters(31.0, 16.0, 4.0, steps_total=100.0), EngineCounters(31.0, 16.0, 4.0, steps_total=200.0),
         None),  # not later in time
    ],
)
def test_steps_advanced(before: EngineCounters | None, after: EngineCounters | None, expected: str | None) -> None:
    """The start check's evidence that an engine it could not get a token from is generating for others."""
    assert steps_advanced(before, after) == expected


def test_a_stale_running_gauge_must_be_outlasted() -> None:
    """SGLang's running gauge can lag 30 s after traffic ends: flat counters are hung only after that too."""
    flat = counters([(t, 500.0, 1.0) for t in range(0, 45, 5)])
    ev = ProgressEvidence(watch_since_s=0.0, counters=flat, counters_per_step=True, gauge_stale_s=30.0)
    assert not assess_progress(ev, STALL_S, now_s=25.0).hung
    assert assess_progress(ev, STALL_S, now_s=40.0).hung


def test_loading_is_not_silence_but_a_stopped_process_is_hung() -> None:
    """A lazy engine loading its model is `loading`; a SIGSTOPped process is hung whatever else."""
    silent = (Silence("canary", since_s=0.0, at_s=30.0),)
    loading = ProgressEvidence(watch_since_s=0.0, silences=silent, loading=True)
    verdict = assess_progress(loading, STALL_S, now_s=31.0)
    assert not verdict.hung and verdict.phase == "loading"
    stopped = ProgressEvidence(watch_since_s=0.0, last_token_s=30.5, process_stopped=True)
    verdict = assess_progress(stopped, STALL_S, now_s=31.0)
    assert verdict.hung and verdict.source == "process"


def test_prefill_progress_keeps_a_long_prompt_from_being_hung() -> None:
    """The engine's own prefill progress lines are progress: a stream waiting on a long prompt is not hung."""
    ev = ProgressEvidence(watch_since_s=0.0, last_prefill_s=58.0,
                          silences=(Silence("stream", since_s=0.0, at_s=50.0),))
    assert not assess_progress(ev, STALL_S, now_s=60.0).hung


# A sequence of what the watchdog can observe, one second apart at most.
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["token", "canary_ok", "stream_silence", "canary_silence", "counter_flat",
                         "counter_up", "tick"]),
        st.floats(min_value=0.05, max_value=3.0),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.floats(min_value=0.0, max_value=20.0))
def test_no_restart_of_an_engine_that_produced_a_token_within_the_stall_time(events, hang_restart_after_s) -> None:
    """Whatever the silence evidence, an engine with an engine-side token in the last stall_s is never
    hung, so the hang restart (hung for hang_restart_after in a row) never hits it."""
    now = 0.0
    last_token: float | None = None
    last_canary: float | None = None
    silences: list[Silence] = []
    history: list[EngineCounters] = []
    total = 0.0
    hung_since: float | None = None
    for kind, dt in events:
        now += dt
        if kind == "token":
            last_token = now
        elif kind == "canary_ok":
            last_canary = now
        elif kind == "stream_silence":
            silences.append(Silence("stream", since_s=max(0.0, now - STALL_S), at_s=now))
        elif kind == "canary_silence":
            silences.append(Silence("canary", since_s=max(0.0, now - STALL_S), at_s=now))
        elif kind == "counter_up":
            total += 10
        history.append(EngineCounters(at_s=now, generated_tokens_total=total, requests_running=1.0))
        ev = ProgressEvidence(watch_since_s=0.0, last_token_s=last_token, last_canary_ok_s=last_canary,
                              silences=tuple(silences), counters=tuple(history[-60:]), counters_per_step=True)
        verdict = assess_progress(ev, STALL_S, now)
        if verdict.hung:
            hung_since = now if hung_since is None else hung_since
        else:
            hung_since = None
        restart = hung_since is not None and now - hung_since >= hang_restart_after_s
        if last_token is not None and now - last_token < STALL_S:
            assert not verdict.hung and not restart
