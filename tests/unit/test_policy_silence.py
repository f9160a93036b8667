"""policies.silence: when a stream is stalled, and when a request its engine sends nothing is waited for.

The gateway's runtime calls these for every decision (gateway/proxy.py's stall watch, gateway/upstream.py's
read clock); the integration tests in tests/integration/test_gateway.py and tests/unit/test_gateway_upstream.py
drive the same decisions through real sockets.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.silence import (
    QUIET_EXTENSIONS_MAX,
    StallLimits,
    quiet_request_verdict,
    stall_limits,
    stream_stall_check,
)

LIMITS = StallLimits(prefill_s=30.0, decode_s=10.0)
times = st.floats(min_value=0.0, max_value=1e5, allow_nan=False)


def test_a_stream_with_no_token_within_the_prefill_limit_is_stalled_in_prefill() -> None:
    check = stream_stall_check(now_s=131.0, sent_at_s=100.0, last_token_s=None, resumed_at_s=0.0, limits=LIMITS,
                               not_judged=False, engine_progress_s=None)
    assert (check.stalled, check.phase, check.stalled_for_s) == (True, "prefill", 31.0)


def test_a_stream_silent_after_a_token_is_judged_on_the_decode_limit() -> None:
    waiting = stream_stall_check(now_s=105.0, sent_at_s=50.0, last_token_s=100.0, resumed_at_s=0.0, limits=LIMITS,
                                 not_judged=False, engine_progress_s=None)
    assert (waiting.stalled, waiting.phase, waiting.wait_s) == (False, "decode", 5.0)
    stalled = stream_stall_check(now_s=110.5, sent_at_s=50.0, last_token_s=100.0, resumed_at_s=0.0, limits=LIMITS,
                                 not_judged=False, engine_progress_s=None)
    assert (stalled.stalled, stalled.phase) == (True, "decode")


def test_progress_the_engine_shows_elsewhere_keeps_a_stream_from_being_called_stalled() -> None:
    """A long prompt of another client, or another stream's tokens: the engine is working."""
    check = stream_stall_check(now_s=131.0, sent_at_s=100.0, last_token_s=None, resumed_at_s=0.0, limits=LIMITS,
                               not_judged=False, engine_progress_s=129.0)
    assert not check.stalled and check.wait_s == 10.0  # never beyond the decode limit


@given(now=times, sent=times, last=st.none() | times, resumed=times, progress=st.none() | times)
def test_a_stream_its_client_holds_back_is_never_stalled(now: float, sent: float, last: float | None,
                                                         resumed: float, progress: float | None) -> None:
    """A client that stopped reading is not the engine's silence, however long it lasts."""
    check = stream_stall_check(now_s=now, sent_at_s=sent, last_token_s=last, resumed_at_s=resumed, limits=LIMITS,
                               not_judged=True, engine_progress_s=progress)
    assert not check.stalled and 0 < check.wait_s <= 1.0


@given(now=times, sent=times, last=st.none() | times, resumed=times, progress=st.none() | times)
def test_a_stall_is_exactly_a_phase_limit_without_evidence_of_work(now: float, sent: float, last: float | None,
                                                                   resumed: float, progress: float | None) -> None:
    """Stalled when, and only when, the latest sign of the engine's work (this stream's send or token, the
    client letting the gateway read again, progress elsewhere) is at least the phase's limit ago; otherwise
    the next look comes no later than the deadline and no later than the decode limit."""
    check = stream_stall_check(now_s=now, sent_at_s=sent, last_token_s=last, resumed_at_s=resumed, limits=LIMITS,
                               not_judged=False, engine_progress_s=progress)
    latest = max(sent if last is None else last, resumed, progress if progress is not None else -1.0)
    limit = LIMITS.prefill_s if last is None else LIMITS.decode_s
    assert check.phase == ("prefill" if last is None else "decode")
    assert check.stalled == (now - latest >= limit)
    if check.stalled:
        assert check.stalled_for_s == now - latest
    else:
        assert 0 < check.wait_s <= min(latest + limit - now, LIMITS.decode_s) + 1e-9


def test_the_prefill_limit_grows_with_the_prompt_and_silent_tool_calls_get_it_between_tokens() -> None:
    """Ollama, mlx_lm.server and oMLX send nothing while the model writes a tool call: a request with tools waits the
    prefill's limit between tokens there; other engines stream a call's arguments as they come."""
    plain = stall_limits(prefill_stall_s=60.0, prefill_per_mib_s=30.0, decode_stall_s=20.0, body_bytes=2 * 2**20,
                         engine_kind="ollama", tools=False)
    assert plain == StallLimits(prefill_s=120.0, decode_s=20.0)
    tools = stall_limits(prefill_stall_s=60.0, prefill_per_mib_s=30.0, decode_stall_s=20.0, body_bytes=2 * 2**20,
                         engine_kind="ollama", tools=True)
    assert tools == StallLimits(prefill_s=120.0, decode_s=120.0)
    mlx = stall_limits(prefill_stall_s=60.0, prefill_per_mib_s=30.0, decode_stall_s=20.0, body_bytes=0,
                       engine_kind="mlx_lm", tools=True)
    assert mlx == StallLimits(prefill_s=60.0, decode_s=60.0)
    omlx = stall_limits(prefill_stall_s=60.0, prefill_per_mib_s=30.0, decode_stall_s=20.0, body_bytes=0,
                        engine_kind="omlx", tools=True)
    assert omlx == StallLimits(prefill_s=60.0, decode_s=60.0)
    other = stall_limits(prefill_stall_s=60.0, prefill_per_mib_s=30.0, decode_stall_s=20.0, body_bytes=0,
                         engine_kind="llama_cpp", tools=True)
    assert other == StallLimits(prefill_s=60.0, decode_s=20.0)


def test_a_quiet_request_waits_while_the_engine_shows_progress_within_its_quiet_time() -> None:
    assert quiet_request_verdict(quiet_s=600.0, timeout_s=600.0, progress_age_s=3.0, extensions_in_a_row=0,
                                 watched=True).extend


def test_a_quiet_request_times_out_when_the_engine_showed_no_progress_meanwhile() -> None:
    stale = quiet_request_verdict(quiet_s=600.0, timeout_s=600.0, progress_age_s=601.0, extensions_in_a_row=0,
                                  watched=True)
    never = quiet_request_verdict(quiet_s=600.0, timeout_s=600.0, progress_age_s=None, extensions_in_a_row=0,
                                  watched=True)
    for verdict in (stale, never):
        assert not verdict.extend
        assert "upstream_read_timeout_s" in verdict.reason and "no progress meanwhile" in verdict.reason


def test_a_request_with_no_progress_known_for_its_engine_gets_the_plain_read_timeout() -> None:
    verdict = quiet_request_verdict(quiet_s=5.0, timeout_s=5.0, progress_age_s=0.0, extensions_in_a_row=0,
                                    watched=False)
    assert not verdict.extend and verdict.reason == "the engine sent nothing for 5s (the gateway's upstream_read_timeout_s)"


@given(extensions=st.integers(min_value=0, max_value=50), age=st.none() | times)
def test_a_request_the_engine_ignores_while_busy_elsewhere_is_given_up_after_the_last_extension(
        extensions: int, age: float | None) -> None:
    """An engine that dropped one request while it serves others shows progress all along: never more than
    ``QUIET_EXTENSIONS_MAX`` extensions in a row, and the reason then says how long it waited in all."""
    verdict = quiet_request_verdict(quiet_s=10.0, timeout_s=10.0, progress_age_s=age, extensions_in_a_row=extensions,
                                    watched=True)
    if extensions >= QUIET_EXTENSIONS_MAX:
        assert not verdict.extend
        assert f"{(QUIET_EXTENSIONS_MAX + 1) * 10:g}s" in verdict.reason and "progress elsewhere" in verdict.reason
    else:
        assert verdict.extend == (age is not None and age < 10.0)
