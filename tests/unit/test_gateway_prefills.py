"""The gateway's record of which requests each engine has in prefill."""

from __future__ import annotations

import pytest

from policies.health import quiet_interval
from supervisord_llm.gateway.prefills import PrefillSpans, QuietTally


def quiet(p: PrefillSpans, engine: str, since_s: float) -> bool:
    """What QuietTally.settle asks of the spans: the policy's verdict on an interval from ``since_s``."""
    return quiet_interval(since_s, p.in_prefill(engine), p.last_end_s(engine))


def test_an_interval_is_quiet_while_no_request_is_in_prefill() -> None:
    p = PrefillSpans()
    assert quiet(p, "a", 0.0)
    stream = p.begin("a")
    p.end("a", stream, 0.1)  # its own first token
    assert quiet(p, "a", 0.1)


def test_a_request_in_prefill_touches_every_interval_until_its_first_token() -> None:
    p = PrefillSpans()
    prompt = p.begin("a")
    assert not quiet(p, "a", 0.5)
    assert not quiet(p, "a", 1.5)
    p.end("a", prompt, 2.0)
    assert not quiet(p, "a", 1.9)  # the interval from 1.9 saw it end
    assert quiet(p, "a", 2.0)


def test_other_engines_do_not_count() -> None:
    p = PrefillSpans()
    p.begin("b")
    other = p.begin("b")
    p.end("b", other, 5.0)
    assert quiet(p, "a", 1.0)


def test_end_is_once_only_and_unknown_keys_are_ignored() -> None:
    p = PrefillSpans()
    k1, k2 = p.begin("a"), p.begin("a")
    p.end("a", k1, 3.0)
    assert not quiet(p, "a", 3.0)  # k2 still in prefill
    p.end("a", k2, 2.0)  # the later end stands
    assert not quiet(p, "a", 2.5) and quiet(p, "a", 3.0)
    p.end("a", k1, 9.0)  # a second end (the request's end after its first token) changes nothing
    p.end("a", 12345, 9.0)
    p.end("nope", k1, 9.0)
    assert quiet(p, "a", 3.0)


def test_every_change_is_told_with_the_count_and_the_end() -> None:
    """Each begin and each end is told (for the daemon's counter samples): the engine, its requests in
    prefill now, and the end's time (None for a begin); a second end of the same request is not."""
    told: list[tuple[str, int, float | None]] = []
    p = PrefillSpans(lambda engine, count, ended_s: told.append((engine, count, ended_s)))
    k1, k2 = p.begin("a"), p.begin("a")
    p.end("a", k1, 3.0)
    p.end("a", k1, 4.0)
    p.end("a", k2, 5.0)
    assert told == [("a", 1, None), ("a", 2, None), ("a", 1, 3.0), ("a", 0, 5.0)]


def test_a_non_streamed_answers_prefill_counts_here_but_is_not_told() -> None:
    """A request whose first token the gateway never sees (a non-streamed answer) is in prefill until its end:
    it still leaves the streams' intervals beside it out, but telling the daemon would leave out every counter
    sample of the engine for as long as the answer takes."""
    told: list[tuple[str, int, float | None]] = []
    p = PrefillSpans(lambda engine, count, ended_s: told.append((engine, count, ended_s)))
    plain = p.begin("a", tell=False)
    assert not quiet(p, "a", 0.0) and told == []
    stream = p.begin("a")
    p.end("a", plain, 3.0)
    p.end("a", stream, 4.0)
    assert told == [("a", 1, None), ("a", 0, 4.0)]


def _tally(p: PrefillSpans, in_flight: int = 1) -> QuietTally:
    return QuietTally(p, "a", lambda: in_flight)


def test_a_lone_stream_counts_every_token_after_the_first() -> None:
    p = PrefillSpans()
    tally = _tally(p)
    for i in range(11):
        tally.token(i * 0.01)
    tally.settle()
    assert tally.tokens == 10 and tally.seconds == pytest.approx(0.1) and tally.in_flight_s == pytest.approx(0.1)


def test_an_arrival_is_judged_when_the_next_comes_or_the_stream_settles() -> None:
    tally = _tally(PrefillSpans())
    tally.token(0.0)
    tally.token(0.01)
    assert tally.tokens == 0  # pending: the next arrival may show a prefill that ended in it
    tally.token(0.02)
    assert tally.tokens == 1
    tally.settle()
    assert tally.tokens == 2 and tally.seconds == pytest.approx(0.02)


def test_a_burst_shares_the_fate_of_its_wait() -> None:
    """Four tokens arrive together after a wait that another request's prefill touched: none of them counts
    (counting the three after the first would read the engine faster than it is). The arrival before that
    wait is left out too: its token may have reached the gateway before the other request's first token of
    the same engine step."""
    p = PrefillSpans()
    tally = _tally(p)
    tally.token(0.0)
    tally.token(0.01)  # 1 token over 10 ms: left out, the next interval saw a prefill end
    prompt = p.begin("a")
    p.end("a", prompt, 0.05)  # another request's prefill inside the next wait
    for _ in range(4):
        tally.token(0.06)  # a burst of 4
    tally.token(0.07)  # quiet again: 1 token over 10 ms
    for _ in range(3):
        tally.token(0.08)  # a quiet burst of 3: all count
    tally.settle()
    assert tally.tokens == 1 + 3 and tally.seconds == pytest.approx(0.02)


def test_a_prefill_whose_end_reached_the_gateway_after_the_streams_token_still_leaves_its_wait_out() -> None:
    """The engine prefilled another prompt in a stream's wait (mlx_lm.server stopped a stream 0.7 s for a
    180-word prompt) and made the stream's token and the other's first token in one step; the stream's
    reached the gateway first. Judged one arrival late, the wait is still left out."""
    p = PrefillSpans()
    tally = _tally(p)
    tally.token(0.0)
    tally.token(0.002)
    prompt = p.begin("a")  # sent at 0.0021: the engine prefills it ...
    tally.token(0.702)  # ... in this wait, while the span was still open when the token came ...
    p.end("a", prompt, 0.703)  # ... and its first token came just after
    tally.token(0.704)
    tally.token(0.706)
    tally.settle()
    # Out: the wait, and the interval its end came in. In: (0, 0.002] (judged at 0.702, no end yet: the
    # begin at 0.0021 is after it) and (0.704, 0.706].
    assert tally.tokens == 2 and tally.seconds == pytest.approx(0.004)


def test_a_requests_own_span_does_not_leave_out_its_own_decode() -> None:
    """A non-streamed request fetched as a stream keeps its span to its end: its own tokens still count."""
    p = PrefillSpans()
    own = p.begin("a", tell=False)
    tally = _tally(p)
    tally.own = own
    for i in range(5):
        tally.token(i * 0.01)
    tally.settle()
    p.end("a", own, 0.05)
    assert tally.tokens == 4
    other = _tally(p)  # a stream beside it had every interval left out while it ran
    assert not quiet(p, "a", 0.04) and other.spans.in_prefill("a", own) == 0 and p.in_prefill("a") == 0


def test_the_requests_in_flight_are_integrated_over_the_quiet_time() -> None:
    p = PrefillSpans()
    tally = _tally(p, in_flight=3)
    tally.token(0.0)
    tally.token(0.5)
    tally.settle()
    assert tally.in_flight_s == pytest.approx(1.5)


def test_the_first_arrivals_other_tokens_waited_as_long_as_the_first() -> None:
    """Five tokens in the first chunk, then one every 10 ms: the four beside the first are its time to first
    token, not a decode in no time."""
    tally = _tally(PrefillSpans())
    for _ in range(5):
        tally.token(0.0)
    for i in range(1, 9):
        tally.token(i * 0.01)
    tally.settle()
    assert tally.tokens == 8 and tally.seconds == pytest.approx(0.08)


def test_a_long_answers_rate_is_its_first_tokens_not_its_grown_context() -> None:
    """A 12,000-token answer whose steps slow as its context grows (each 1 ms slower per 1,000 tokens): its
    sample is the rate of its first DECODE_SAMPLE_MAX_EVENTS tokens, as a short answer's is, not the whole
    answer's average (0.45 of it on mlx_lm.server: a long answer read as a degraded engine)."""
    from policies.health import DECODE_SAMPLE_MAX_EVENTS, stream_decode_rate

    tally = _tally(PrefillSpans())
    at_s = 0.0
    for i in range(12_000):
        tally.token(at_s)
        at_s += 0.001 * (1 + i / 1000)
    tally.settle()
    assert tally.tokens == DECODE_SAMPLE_MAX_EVENTS - 1
    rate = stream_decode_rate(12_000, at_s, (tally.tokens, tally.seconds, 12_000))
    assert rate is not None and rate[0] > 1000 / 1.3, rate  # the first 512 steps: 1.0 to 1.5 ms each
    whole = 11_999 / at_s
    assert whole < 0.3 * rate[0]  # what the old whole-stream sample said
