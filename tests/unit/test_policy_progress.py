"""The evidence rule for `hung`: only the engine's own silence, never a client's pace or a completion counter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.health import ProgressEvidence, Silence, assess_progress, decide_start_check, steps_advanced
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
                                               counters_per_step=True, counter_silence=False), STALL_S, now_s=56.0)
    assert not verdict.hung and verdict.last_progress_source == "counters"


def test_llama_cpp_steps_flat_in_one_long_decode_are_not_silence() -> None:
    """llama-server answers /metrics during a decode: one prefill batch of a large model keeps
    n_decode_total flat for longer than the stall time with a request running. For llama.cpp the
    step count is progress only, so that is no hang; a canary that gets nothing still is."""
    one_long_decode = llama_cpp([(t, 16.0, 7.0, 1.0) for t in range(0, 60, 5)])
    quiet = ProgressEvidence(watch_since_s=0.0, counters=one_long_decode, counters_per_step=True, counter_silence=False)
    assert not assess_progress(quiet, STALL_S, now_s=56.0).hung
    # The same counters from an engine whose step count is silence evidence (vLLM, SGLang): hung.
    as_vllm = ProgressEvidence(watch_since_s=0.0, counters=one_long_decode, counters_per_step=True)
    verdict = assess_progress(as_vllm, STALL_S, now_s=56.0)
    assert verdict.hung and verdict.source == "counters" and "no step for" in (verdict.reason or "")
    # A wedged llama-server: the canary gets nothing and no step moves: hung, on the canary.
    silent = (Silence("canary", since_s=20.0, at_s=50.0),)
    wedged = ProgressEvidence(watch_since_s=0.0, silences=silent, counters=one_long_decode, counters_per_step=True,
                              counter_silence=False)
    verdict = assess_progress(wedged, STALL_S, now_s=56.0)
    assert verdict.hung and verdict.source == "canary"


def vllm_prefill(points: list[tuple[float, float, float]]) -> tuple[EngineCounters, ...]:
    """vLLM's counters through one long chunked prefill: the token total (its step count) flat, one request
    running, and its KV cache usage gauge as the engine reported it after its last step."""
    return tuple(EngineCounters(at_s=t, generated_tokens_total=500.0, requests_running=1.0, steps_total=500.0,
                                cache_usage=usage) for t, usage, _ in points)


def test_a_vllm_prefill_that_outlasts_the_stall_time_is_not_hung_while_its_cache_fills() -> None:
    """vLLM counts no token until a request's first one comes out, so a long prompt keeps its step count
    flat for minutes; each prefill chunk takes KV cache blocks, and vLLM reports its cache usage after every
    step: that gauge moving is the engine's own progress. The same prefill with the gauge frozen is hung."""
    filling = vllm_prefill([(t, 0.01 + 0.002 * t, 0) for t in range(0, 60, 5)])
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, counters=filling, counters_per_step=True),
                              STALL_S, now_s=56.0)
    assert not verdict.hung and verdict.last_progress_source == "counters"
    frozen = vllm_prefill([(t, 0.01 + 0.002 * min(t, 20), 0) for t in range(0, 60, 5)])
    verdict = assess_progress(ProgressEvidence(watch_since_s=0.0, counters=frozen, counters_per_step=True),
                              STALL_S, now_s=56.0)
    assert verdict.hung and verdict.source == "counters"
    assert "no step for 36s" in (verdict.reason or "")


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
         "its step count advanced by 1200 in 30.0s"),
        (EngineCounters(1.0, 16.0, 4.0, steps_total=100.0), EngineCounters(31.0, 16.0, 4.0, steps_total=100.0),
         None),  # flat: the engine did nothing
        (EngineCounters(1.0, 16.0, 0.0, steps_total=100.0), EngineCounters(31.0, 40.0, 0.0, steps_total=90.0),
         None),  # went down: a new engine process
        (EngineCounters(1.0, 16.0, 4.0), EngineCounters(31.0, 99.0, 4.0), None),  # no step count
        (None, EngineCounters(31.0, 16.0, 4.0, steps_total=1300.0), None),  # no reading before
        (EngineCounters(31.0, 16.0, 4.0, steps_total=100.0), EngineCounters(31.0, 16.0, 4.0, steps_total=200.0),
         None),  # not later in time
        # vLLM in a prefill: its token total flat, its KV cache usage (reported after every step) moved
        (EngineCounters(1.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0125),
         EngineCounters(6.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0375), "its KV cache usage went from 1.25% to 3.75% in 5.0s"),
        (EngineCounters(1.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0125),
         EngineCounters(6.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0125), None),  # both flat
        (EngineCounters(1.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0375),
         EngineCounters(6.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0125), None),  # freed blocks: no step
        (EngineCounters(1.0, 16.0, 1.0, steps_total=16.0, cache_usage=0.0125),
         EngineCounters(6.0, 16.0, 1.0, steps_total=16.0), None),  # the gauge gone: nothing to compare
    ],
)
def test_steps_advanced(before: EngineCounters | None, after: EngineCounters | None, expected: str | None) -> None:
    """What the engine did between two readings of its counters."""
    assert steps_advanced(before, after) == expected


BEFORE = EngineCounters(1.0, 16.0, 2.0, steps_total=100.0, requests_waiting=2.0)
BUSY_AFTER = EngineCounters(4.0, 16.0, 2.0, steps_total=1300.0, requests_waiting=3.0)


@pytest.mark.parametrize(
    ("ok", "stalled", "before", "after", "ready"),
    [
        (True, False, None, None, "generation ok"),
        # queued behind other clients, the engine working and saying the check waits: ready
        (False, True, BEFORE, BUSY_AFTER, "generating for other clients (its step count advanced by 1200 in 3.0s, "
                                         "3 requests waiting for a slot) while the start check's own generation "
                                         "waited its turn"),
        (False, False, BEFORE, BUSY_AFTER, None),  # an HTTP error or a broken stream: never made good by others
        (False, True, None, BUSY_AFTER, None),  # no reading before the check
        (False, True, BEFORE, None, None),  # no reading after it (no counters, /metrics failed)
        (False, True, BEFORE, EngineCounters(4.0, 16.0, 2.0, steps_total=100.0, requests_waiting=3.0), None),  # flat
        (False, True, BEFORE, EngineCounters(4.0, 16.0, 2.0, steps_total=40.0, requests_waiting=3.0), None),  # reset
        # steps advanced but nothing waits: the check was not queued (its own slow decode, say)
        (False, True, BEFORE, EngineCounters(4.0, 16.0, 1.0, steps_total=1300.0, requests_waiting=0.0), None),
        (False, True, BEFORE, EngineCounters(4.0, 16.0, 1.0, steps_total=1300.0), None),  # no queue gauge
    ],
)
def test_decide_start_check(ok: bool, stalled: bool, before: EngineCounters | None, after: EngineCounters | None,
                            ready: str | None) -> None:
    """Ready on the check's own generation, or on the engine's word that the check is queued while it works."""
    assert decide_start_check(ok, stalled, before, after) == ready


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


def test_counters_that_stop_answering_with_a_request_running_are_silence() -> None:
    """A request running and no step over the last readings, then /metrics answers no more (a wedged vLLM or SGLang
    API process answers nothing): the time since counts, and the engine is hung once it passes the stall time.
    Under steady non-streamed traffic no canary runs and no stream carries tokens: this is the only evidence."""
    last = counters([(t, 500.0, 1.0) for t in range(0, 10, 5)])
    ev = ProgressEvidence(watch_since_s=0.0, counters=last, counters_per_step=True)
    assert not assess_progress(ev, STALL_S, now_s=5.0).hung
    verdict = assess_progress(ev, STALL_S, now_s=120.0)
    assert verdict.hung and verdict.source == "counters", verdict
