"""Degraded and hung classification from readings."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.health import (
    HealthSettings,
    ProgressEvidence,
    Silence,
    ThroughputBaseline,
    ThroughputTracker,
    assess_degraded,
    assess_progress,
    concurrency_band,
    counter_prefill,
    decode_rate_sample,
    learn_baseline,
    mean_in_flight,
    prefill_counts,
    quiet_interval,
    rolling_rate,
    sample_concurrency,
    stream_decode_rate,
)
from probes.readings import CanaryReading, EngineCounters, ProcessTreeReading, ThroughputSample

S = HealthSettings()


def learned(rate: float, band: int = 0) -> ThroughputBaseline:
    """A baseline learned at one concurrency band: enough healthy windows of ``rate``."""
    return ThroughputBaseline(window_rates=((band, rate),) * S.baseline_min_windows)


def samples(
    rates_per_window: list[float | None],
    now_s: float = 1000.0,
    per_window: int = 3,
    window_s: float = 30.0,
    concurrency: int = 1,
) -> list[ThroughputSample]:
    """Samples for consecutive windows ending at now_s; the last rate is the newest window."""
    out = []
    n = len(rates_per_window)
    for i, rate in enumerate(rates_per_window):
        if rate is None:
            continue
        end = now_s - (n - 1 - i) * window_s
        for j in range(per_window):
            out.append(
                ThroughputSample(
                    at_s=end - 1 - j * 5, tokens_per_s=rate, source="canary", tokens=16, concurrency=concurrency
                )
            )
    return out


def test_rolling_rate_weights_by_tokens() -> None:
    """A long stream counts more than a short canary in the window's rate."""
    window = [
        ThroughputSample(10.0, 20.0, "gateway", tokens=900),
        ThroughputSample(11.0, 10.0, "canary", tokens=100),
    ]
    assert rolling_rate(window, 0.0, 30.0) == pytest.approx(19.0)
    assert rolling_rate(window, 11.0, 30.0) is None


@pytest.mark.parametrize(
    ("rates", "degraded", "windows_below"),
    [
        ([25, 25, 25], False, 0),
        ([10, 10, 10], True, 3),  # 25 -> 10 tok/s: the pre-hang slowdown
        ([25, 10, 10], False, 2),  # only two windows so far
        ([10, None, 10], False, 1),  # an empty window breaks the streak
        ([10, 10, 12.5], False, 0),  # exactly at 50 %: not below
        ([10, 10, 10, 30], False, 0),  # back above: recovered
    ],
)
def test_degraded_after_n_windows_below_half_the_baseline(
    rates: list[float | None], degraded: bool, windows_below: int
) -> None:
    """Degraded needs three consecutive 30 s windows below half the baseline."""
    result = assess_degraded(samples(rates), learned(25.0), S, 1000.0)
    assert result.degraded is degraded
    assert result.windows_below == windows_below


def test_no_baseline_means_no_verdict() -> None:
    """Without a learned baseline the engine is never called degraded."""
    result = assess_degraded(samples([1, 1, 1]), ThroughputBaseline(), S, 1000.0)
    assert not result.degraded and "no throughput baseline" in result.reason


def test_baseline_is_a_high_percentile_of_healthy_windows() -> None:
    """The baseline learns what the model can do and is not dragged down by a slow decline."""
    baseline = ThroughputBaseline()
    now = 0.0
    history: list[ThroughputSample] = []
    for rate in [20, 24, 25, 25, 26, 22, 25, 18, 15, 14]:
        now += 30
        history.append(ThroughputSample(now - 1, float(rate), "canary", tokens=16))
        baseline = learn_baseline(baseline, history, S, now)
    value = baseline.tokens_per_s(S)
    assert value is not None and 24.0 <= value <= 26.0
    # A window far below half the baseline is not learned.
    now += 30
    history.append(ThroughputSample(now - 1, 5.0, "canary", tokens=16))
    before = len(baseline.window_rates)
    baseline = learn_baseline(baseline, history, S, now)
    assert len(baseline.window_rates) == before


def test_baseline_needs_enough_windows_and_skips_unhealthy() -> None:
    """No baseline before five windows; windows while unhealthy are not learned."""
    baseline = ThroughputBaseline()
    history = [ThroughputSample(29.0, 25.0, "canary", tokens=16)]
    baseline = learn_baseline(baseline, history, S, 30.0)
    assert baseline.tokens_per_s(S) is None and baseline.window_rates == ((0, 25.0),)
    assert learn_baseline(baseline, history, S, 40.0) == baseline  # less than a window later
    history.append(ThroughputSample(59.0, 25.0, "canary", tokens=16))
    assert learn_baseline(baseline, history, S, 60.0, healthy=False).window_rates == ((0, 25.0),)


def test_baseline_from_an_earlier_boot_keeps_its_rates() -> None:
    """A persisted baseline survives a reboot: its rates stay, its stale clock mark is dropped."""
    baseline = ThroughputBaseline(window_rates=((0, 25.0),) * 6, last_window_end_s=90_000.0)
    history = [ThroughputSample(29.0, 24.0, "canary", tokens=16)]
    after = learn_baseline(baseline, history, S, 30.0)
    assert len(after.window_rates) == 7 and after.last_window_end_s == 30.0


@pytest.mark.parametrize(("concurrency", "band"), [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3),
                                                   (9, 4), (16, 4), (17, 5), (64, 6), (65, 7)])
def test_concurrency_bands(concurrency: int, band: int) -> None:
    """Samples are compared at a like concurrency: 1, 2, 3-4, 5-8, 9-16, ..."""
    assert concurrency_band(concurrency) == band


def test_load_is_not_a_slowdown() -> None:
    """Learned from lone requests at 25 tok/s; then 12 requests at once decode at 10 tok/s each for three
    windows: that is the engine sharing its steps (120 tok/s in all), not a slowdown. Judged at its own
    band once that is learned, a real fall at that concurrency is degraded; and so is a fall of lone requests."""
    lone = learned(25.0)
    busy = samples([10, 10, 10], concurrency=12)
    result = assess_degraded(busy, lone, S, 1000.0)
    assert not result.degraded and result.windows_below == 0 and result.recovered
    assert "the 25.0 tok/s in all of the slowest healthy window at 1 concurrent request, shared among 12.0" \
        in result.reason
    both = ThroughputBaseline(window_rates=lone.window_rates + learned(10.0, band=4).window_rates)
    assert not assess_degraded(busy, both, S, 1000.0).degraded
    slow_under_load = assess_degraded(samples([4, 4, 4], concurrency=12), both, S, 1000.0)
    assert slow_under_load.degraded and "at 9-16 concurrent requests" in slow_under_load.reason
    assert assess_degraded(samples([10, 10, 10]), both, S, 1000.0).degraded  # lone requests at 10: slow


def test_a_band_not_yet_learned_is_judged_by_the_floor_below_it() -> None:
    """Lone requests learned at 25 tok/s: 12 at once making 12 tok/s in all (1 each) is below half of
    what one request alone made, so it is slow whatever the load, and that window is not learned. No
    floor comes from a band above: short batch jobs at 5-8 (60 tok/s each) beside long-context chats at 2
    (25 each) are different work, not a slowdown."""
    lone = learned(25.0)
    crawling = samples([1, 1, 1], concurrency=12)
    result = assess_degraded(crawling, lone, S, 1000.0)
    assert result.degraded and "shared among 12.0" in result.reason
    assert learn_baseline(lone, crawling, S, 1000.0).rates(4) == ()
    # and such a band recovers as soon as it is back above the floor
    back = assess_degraded(samples([1, 1, 3], concurrency=12), lone, S, 1000.0)
    assert back.recovered and not back.degraded
    mixed = ThroughputBaseline(window_rates=learned(70.0).window_rates + learned(60.0, band=3).window_rates)
    chats = samples([25, 25, 25], concurrency=2)
    assert not assess_degraded(chats, mixed, S, 1000.0).degraded
    assert learn_baseline(mixed, chats, S, 1000.0).rates(1) == (25.0,)
    batch_only = learned(10.0, band=4)
    assert not assess_degraded(samples([4, 4, 4]), batch_only, S, 1000.0).degraded  # nothing below to bound it


def test_a_window_is_judged_at_a_band_with_its_own_baseline_when_it_has_one() -> None:
    """5-8 learned at 50 tok/s; the engine slows to 20 with concurrency hovering at 8 and 9: each window
    has more tokens at 9 (not learned) than at 8, but is judged at 5-8 against its own baseline, so the
    slowdown is seen rather than passed by the loose floor below 9-16."""
    base = ThroughputBaseline(window_rates=learned(25.0).window_rates + learned(50.0, band=3).window_rates)
    window = []
    for end in (940.0, 970.0, 1000.0):
        window += [ThroughputSample(end - 2, 20.0, "gateway", tokens=1000, concurrency=8),
                   ThroughputSample(end - 1, 20.0, "gateway", tokens=3000, concurrency=9)]
    result = assess_degraded(window, base, S, 1000.0)
    assert result.degraded and result.band == "5-8" and result.windows_below == 3


def test_more_requests_within_a_band_share_its_rate_in_all() -> None:
    """5-8 learned at 5 requests: 100 tok/s each, 500 in all. A window at 8 requests makes 45 tok/s each,
    360 in all: each request gets less because more share the steps, not a slowdown. At 8 requests and
    25 tok/s each (200 in all) both fell: degraded."""
    base = ThroughputBaseline(window_rates=((3, 100.0),) * 5, window_totals=((3, 500.0),) * 5)
    assert not assess_degraded(samples([45, 45, 45], concurrency=8), base, S, 1000.0).degraded
    slow = assess_degraded(samples([25, 25, 25], concurrency=8), base, S, 1000.0)
    assert slow.degraded and "the 500.0 tok/s in all learned there, shared among 8.0" in slow.reason
    # without the totals (per request only) the first window would have read as a slowdown
    per_request_only = ThroughputBaseline(window_rates=base.window_rates)
    assert assess_degraded(samples([45, 45, 45], concurrency=8), per_request_only, S, 1000.0).degraded
    learned_here = learn_baseline(ThroughputBaseline(), samples([45], concurrency=8), S, 1000.0)
    assert learned_here.totals(3) == (360.0,)


def test_totals_of_other_windows_than_the_rates_are_not_used() -> None:
    """A band whose totals do not cover the same windows as its rates (a state file from before totals,
    then a few new windows): per request only, so the share is not applied twice."""
    misaligned = ThroughputBaseline(window_rates=((3, 100.0),) * 100 + ((3, 55.0),) * 5,
                                    window_totals=((3, 275.0),) * 5)
    result = assess_degraded(samples([40, 40, 40], concurrency=5), misaligned, S, 1000.0)
    assert result.degraded and "the 100.0 tok/s baseline there" in result.reason


def test_a_window_is_judged_by_its_band_with_the_most_tokens() -> None:
    """A window with a lone canary (16 tokens, slow while the engine was busy with direct clients) and
    thousands of tokens of streams at 9-16 concurrent is judged at 9-16."""
    both = ThroughputBaseline(window_rates=learned(25.0).window_rates + learned(10.0, band=4).window_rates)
    window = [ThroughputSample(999.0, 5.0, "canary", tokens=16, concurrency=1),
              ThroughputSample(998.0, 9.5, "gateway", tokens=4000, concurrency=12)]
    result = assess_degraded(window, both, HealthSettings(degraded_windows=1), 1000.0)
    assert not result.degraded and result.rate_tokens_per_s == pytest.approx(9.5)


def test_each_band_learns_on_its_own() -> None:
    """A window with samples at two concurrencies adds one rate to each band; a band below half its own
    baseline is not learned while the other is; each band keeps its newest rates."""
    baseline = ThroughputBaseline(window_rates=learned(25.0).window_rates)
    window = [ThroughputSample(29.0, 24.0, "canary", tokens=16, concurrency=1),
              ThroughputSample(28.0, 9.0, "gateway", tokens=900, concurrency=10)]
    after = learn_baseline(baseline, window, S, 30.0)
    assert after.rates(0) == (25.0,) * 5 + (24.0,) and after.rates(4) == (9.0,)
    slow = [ThroughputSample(59.0, 5.0, "canary", tokens=16, concurrency=1),
            ThroughputSample(58.0, 9.5, "gateway", tokens=900, concurrency=10)]
    again = learn_baseline(after, slow, S, 60.0)
    assert again.rates(0) == after.rates(0) and again.rates(4) == (9.0, 9.5)
    capped = HealthSettings(baseline_min_windows=1, baseline_max_windows=2)
    newer = [ThroughputSample(89.0, 9.8, "gateway", tokens=900, concurrency=10)]
    kept = learn_baseline(again, newer, capped, 90.0)
    assert kept.rates(4) == (9.5, 9.8) and kept.rates(0) == again.rates(0)


def test_mean_in_flight_over_a_decode() -> None:
    """The mean concurrency a stream decoded at, from where the in-flight count changed."""
    changes = [(0.0, 0), (10.0, 12), (20.0, 6), (21.0, 1), (22.0, 0)]
    assert mean_in_flight(changes, 10.0, 21.0) == pytest.approx((12 * 10 + 6 * 1) / 11)
    assert mean_in_flight(changes, 21.0, 22.0) == pytest.approx(1.0)
    assert mean_in_flight(changes, 5.0, 5.0) is None  # empty span
    assert mean_in_flight(changes[1:], 5.0, 12.0) is None  # begins before what is known


def test_a_sample_counts_the_clients_of_the_engines_own_port() -> None:
    """A gateway stream alone through the gateway while the engine reported 20 running (clients of its own
    port): it decoded at 20, not 1. A canary beside 3 gateway streams ran at 4. A span the gateway's record
    no longer covers takes the count now."""
    changes = [(0.0, 0), (10.0, 1), (30.0, 0)]
    running = [EngineCounters(at_s=t, requests_running=20.0) for t in (12.0, 17.0, 22.0)]
    assert sample_concurrency(changes, running, 11.0, 29.0, in_flight_now=1) == 20
    assert sample_concurrency(changes, (), 11.0, 29.0, in_flight_now=1) == 1
    three = [(0.0, 0), (10.0, 3)]
    assert sample_concurrency(three, (), 11.0, 12.0, in_flight_now=3, beside_gateway=True) == 4
    assert sample_concurrency(three[1:], (), 5.0, 12.0, in_flight_now=2) == 2


def test_decode_rate_from_counters_is_per_request() -> None:
    """vLLM's token total grew by 3000 in 2 s with 6 requests running: each decoded at 250 tok/s, at 6."""
    before = EngineCounters(at_s=10.0, generated_tokens_total=1000.0, requests_running=6.0)
    after = EngineCounters(at_s=12.0, generated_tokens_total=4000.0, requests_running=6.0)
    sample = decode_rate_sample(before, after, decode_token_total=True)
    assert sample is not None and sample.tokens_per_s == pytest.approx(250.0) and sample.concurrency == 6
    # a total that grows when a request ends (llama.cpp, oMLX) gives no rate; nor does a flat or reset one
    assert decode_rate_sample(before, after, decode_token_total=False) is None
    assert decode_rate_sample(after, before, decode_token_total=True) is None
    assert decode_rate_sample(before, EngineCounters(at_s=12.0, generated_tokens_total=1000.0), True) is None
    # a batch of 8 that started between the readings: the quotient would be far off, so no sample
    started = EngineCounters(at_s=12.0, generated_tokens_total=4000.0, requests_running=14.0)
    assert decode_rate_sample(before, started, decode_token_total=True) is None


def _judged_by_counters(readings: list[EngineCounters], baseline: ThroughputBaseline,
                        gateway: dict[float, tuple[int, float | None]] | None = None) -> tuple[bool, int]:
    """Each pair of consecutive readings through ``decode_rate_sample`` as the watchdog takes them, with the
    gateway's long prompts in prefill at each reading (``gateway``: at_s -> (requests in prefill, the last
    such prefill's end)); (whether the engine is judged degraded at the last reading, samples taken)."""
    tracker = ThroughputTracker()
    for before, after in zip(readings, readings[1:], strict=False):
        in_prefill, ended_s = (gateway or {}).get(after.at_s, (0, None))
        sample = decode_rate_sample(before, after, True, in_prefill=in_prefill, last_prefill_end_s=ended_s)
        if sample is not None:
            tracker = tracker.add(sample, S)
    return assess_degraded(tracker.samples, baseline, S, readings[-1].at_s).degraded, len(tracker.samples)


def _readings(decode_tokens_per_s: float, running: float, *, prompt_per_s: float = 0.0,
              firsts_per_s: float = 0.0, start_s: float = 1000.0, seconds: float = 120.0,
              prompt_at_end: float = 0.0) -> list[EngineCounters]:
    """Counter readings every 5 s: the engine's tokens made, the requests it reports running, the prompt
    tokens it computed (``prompt_at_end`` more in the last reading: vLLM counting a whole prompt at its first
    token) and its first tokens."""
    out = []
    for k in range(int(seconds / 5) + 1):
        t = 5.0 * k
        last = k == int(seconds / 5)
        out.append(EngineCounters(at_s=start_s + t, generated_tokens_total=10_000 + decode_tokens_per_s * t,
                                  requests_running=running, steps_total=10_000 + decode_tokens_per_s * t,
                                  prompt_tokens_total=50_000 + prompt_per_s * t + (prompt_at_end if last else 0.0),
                                  first_tokens_total=100 + firsts_per_s * t + (1 if last and prompt_at_end else 0)))
    return out


# An engine that learned its rate with 4 requests decoding at once: 20 tok/s each (80 in all).
AT_FOUR = ThroughputBaseline(window_rates=((2, 20.0),) * S.baseline_min_windows,
                             window_totals=((2, 80.0),) * S.baseline_min_windows)


def test_a_long_prefill_beside_decodes_at_the_baseline_rate_is_no_slowdown() -> None:
    """An engine that learned 20 tok/s per request at 4 at once; then one client decodes at that very rate
    while three others' long prompts are prefilled: the engine reports 4 running (vLLM keeps a request in
    prefill in its running list) and makes 20 tok/s in all, which divided by 4 reads 5 tok/s per request, a
    quarter of the baseline, for four windows. That is the other clients' prompts, not the engine: it is
    not degraded. SGLang counts each prefill chunk as it runs: its own counters leave those intervals out.
    vLLM counts a prompt only at its first token: the intervals before it are left out on the gateway's
    word (its long prompts in prefill), the one where the prompt's count arrived on the engine's own."""
    sglang = _readings(20.0, 4.0, prompt_per_s=8192 / 5)  # a chunk of 8192 prompt tokens each reading
    assert _judged_by_counters(sglang, AT_FOUR) == (False, 0)
    vllm = _readings(20.0, 4.0, prompt_at_end=3 * 100_000)  # nothing until the prompts' first tokens
    gateway = {r.at_s: (3, None) for r in vllm[:-1]} | {vllm[-1].at_s: (0, vllm[-1].at_s - 1.0)}
    assert _judged_by_counters(vllm, AT_FOUR, gateway) == (False, 0)
    # The interval where vLLM's prompt count arrived is left out on the engine's own word, gateway or not.
    before, after = vllm[-2], vllm[-1]
    assert counter_prefill(before, after) == "it computed 300000 prompt tokens in 5.0s for 1 first token"
    assert decode_rate_sample(before, after, True) is None
    # What the watchdog took before: a quarter of the baseline, every interval, so degraded.
    blind = [replace(r, prompt_tokens_total=None, first_tokens_total=None) for r in vllm]
    assert _judged_by_counters(blind, AT_FOUR) == (True, len(blind) - 1)


def test_a_real_slowdown_is_still_caught_from_the_counters() -> None:
    """The same engine with its 4 clients decoding at 8 tok/s each (40% of the baseline) is degraded, while
    short prompts of a steady load arrive beside them (300 prompt tokens per first token: each about one
    decode step of prefill, which leaves an interval measured), and so it is with no prompt at all."""
    churn = _readings(32.0, 4.0, prompt_per_s=300 * 0.4, firsts_per_s=0.4)
    assert _judged_by_counters(churn, AT_FOUR) == (True, len(churn) - 1)
    assert _judged_by_counters(_readings(32.0, 4.0), AT_FOUR) == (True, 24)
    # and at the baseline rate, the same short prompts leave it ready
    assert _judged_by_counters(_readings(80.0, 4.0, prompt_per_s=120.0, firsts_per_s=0.4), AT_FOUR)[0] is False


def test_counter_prefill_needs_a_long_prompt_per_first_token() -> None:
    """Prompt tokens computed in an interval count as a long prefill when they are at least 512 for each
    request that got its first token in it (at least 512 when none did); a count that went down (a new
    process) or an engine without the counts shows none."""
    before = EngineCounters(at_s=10.0, prompt_tokens_total=1000.0, first_tokens_total=5.0)

    def after(prompt: float, firsts: float | None = 5.0) -> EngineCounters:
        return EngineCounters(at_s=15.0, prompt_tokens_total=prompt, first_tokens_total=firsts)

    assert counter_prefill(before, after(1000.0 + 8192)) is not None  # a chunk, no first token yet
    assert counter_prefill(before, after(1000.0 + 511)) is None  # one short prompt's batch
    assert counter_prefill(before, after(1000.0 + 6 * 300, 11.0)) is None  # six short prompts
    assert counter_prefill(before, after(1000.0 + 5 * 300 + 4000, 11.0)) is not None  # one long among them
    assert counter_prefill(before, after(1000.0 + 600, None)) is not None  # first tokens not reported
    assert counter_prefill(before, after(10.0)) is None
    assert counter_prefill(before, EngineCounters(at_s=15.0)) is None


def test_a_gateway_prefill_leaves_out_the_counter_interval_it_touched() -> None:
    """A long prompt the gateway has in prefill at the later reading, or one whose prefill ended after the
    earlier reading, leaves the interval out; one that ended at or before it does not."""
    before = EngineCounters(at_s=10.0, generated_tokens_total=1000.0, requests_running=2.0)
    after = EngineCounters(at_s=15.0, generated_tokens_total=1200.0, requests_running=2.0)
    assert decode_rate_sample(before, after, True) is not None
    assert decode_rate_sample(before, after, True, in_prefill=1) is None
    assert decode_rate_sample(before, after, True, last_prefill_end_s=12.0) is None
    assert decode_rate_sample(before, after, True, last_prefill_end_s=10.0) is not None


def test_sglang_counts_prefill_itself_so_the_gateways_word_is_not_taken() -> None:
    """SGLang counts each prefill batch as it runs: where both readings have its prompt count, a gateway
    prompt in prefill that computed little (a prefix-cache hit, a wait in its queue) leaves the interval
    measured, and a long one shows in the count itself. An engine that counts prompts only at their first
    token (vLLM), or readings without the count, take the gateway's word."""
    before = EngineCounters(at_s=10.0, generated_tokens_total=1000.0, requests_running=2.0,
                            prompt_tokens_total=5000.0, first_tokens_total=7.0)
    cached = replace(before, at_s=15.0, generated_tokens_total=1200.0, prompt_tokens_total=5040.0)
    assert decode_rate_sample(before, cached, True, in_prefill=1, prompt_counted_per_chunk=True) is not None
    assert decode_rate_sample(before, cached, True, in_prefill=1) is None
    chunk = replace(cached, prompt_tokens_total=5000.0 + 8192)
    assert decode_rate_sample(before, chunk, True, prompt_counted_per_chunk=True) is None
    blind = replace(before, prompt_tokens_total=None)
    assert decode_rate_sample(blind, cached, True, in_prefill=1, prompt_counted_per_chunk=True) is None


def test_tracker_keeps_only_what_the_windows_need() -> None:
    """The tracker prunes samples older than the degraded windows need."""
    tracker = ThroughputTracker()
    for t in range(0, 400, 10):
        tracker = tracker.add(ThroughputSample(float(t), 20.0, "metrics"), S)
    assert min(s.at_s for s in tracker.samples) > 390 - 30 * 4
    assert tracker.rate(395.0, S) == pytest.approx(20.0)


TREE = ProcessTreeReading(at_s=100.0, root_pid=42, pids=(42, 43), rss_bytes=10**9)


def counters(points: list[tuple[float, float, float]]) -> list[EngineCounters]:
    return [
        # vLLM/SGLang: the token total grows per decode step, so it is the step count too
        EngineCounters(at_s=t, generated_tokens_total=total, requests_running=running, steps_total=total)
        for t, total, running in points
    ]


@pytest.mark.parametrize(
    ("canary", "tree", "history", "reason"),
    [
        (None, TREE, [], None),
        (CanaryReading(at_s=95.0, ok=True, ttft_s=0.2), TREE, [], None),
        (
            CanaryReading(at_s=95.0, ok=False, stalled=True, duration_s=40.0, error="no token"),
            TREE,
            [],
            "canary waiting for the first token",
        ),
        (
            None,
            ProcessTreeReading(100.0, 42, (42,), 10**9, stopped=True),
            [],
            "process stopped (SIGSTOP)",
        ),
        (None, ProcessTreeReading(100.0, 42, (42,), 0, zombie=True), [], "zombie"),
        (
            None,
            TREE,
            counters([(60, 500, 2), (70, 500, 2), (90, 500, 2), (100, 500, 2)]),
            "engine reports 2 running requests but no step for 40s",
        ),
        (None, TREE, counters([(60, 500, 2), (80, 510, 2), (100, 510, 2)]), None),  # tokens moved
        (
            None,
            TREE,
            counters([(60, 500, 2), (80, 500, 0), (100, 500, 2)]),
            None,
        ),  # idle in between
        (None, TREE, counters([(60, 500, 0), (100, 500, 0)]), None),  # idle, no requests
        (None, TREE, counters([(80, 500, 2), (100, 500, 2)]), None),  # history shorter than stall_s
    ],
)
def test_hung_classification(
    canary: CanaryReading | None,
    tree: ProcessTreeReading,
    history: list[EngineCounters],
    reason: str | None,
) -> None:
    """A hang is named by its evidence: stalled canary, SIGSTOP, zombie, or stuck per-step counters."""
    silences = ()
    if canary is not None and canary.stalled:
        silences = (Silence("canary", since_s=canary.at_s - (canary.duration_s or 0.0), at_s=canary.at_s,
                            detail="canary waiting for the first token"),)
    evidence = ProgressEvidence(
        watch_since_s=0.0 if canary is not None and canary.stalled else 70.0,
        last_canary_ok_s=canary.at_s if canary is not None and canary.ok else None,
        silences=silences, counters=tuple(history), counters_per_step=True,
        process_stopped=tree.stopped, zombie=tree.zombie, root_pid=tree.root_pid)
    result = assess_progress(evidence, stall_s=30.0, now_s=100.0)
    if reason is None:
        assert not result.hung, result.reason
    else:
        assert result.hung and result.reason is not None and reason in result.reason


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"window_s": 0}, "window_s must be > 0"),
        ({"degraded_share": 1.5}, "degraded_share must be between 0 and 1"),
        ({"degraded_windows": 0}, "degraded_windows must be an integer >= 1"),
        ({"baseline_percentile": 0}, "baseline_percentile must be in"),
        ({"baseline_min_windows": 500}, "baseline_min_windows must be >= 1"),
    ],
)
def test_invalid_health_settings(kwargs: dict[str, float], needle: str) -> None:
    """Nonsense detection settings are rejected with what is valid."""
    with pytest.raises(ValueError, match=needle):
        HealthSettings(**kwargs)  # type: ignore[arg-type]


def test_persisted_baselines_keep_their_bands_and_older_state_files_still_load() -> None:
    """The state file keeps each band's rates; a state file written before bands (a list of bare rates that
    mixed lone requests with engine-wide totals) is learned again, as is anything else."""
    from supervisord_llm.engine.health import baseline_from_record, baseline_record

    both = ThroughputBaseline(window_rates=learned(25.0).window_rates + learned(10.0, band=4).window_rates,
                              window_totals=((4, 120.0),) * 5)
    again = baseline_from_record(json.loads(json.dumps(baseline_record(both))))
    assert again.learned(S) == {0: 25.0, 4: 10.0} and again.total_per_s(S, 4) == 120.0
    assert baseline_from_record({"window_rates": [2000.0] * 5}) == ThroughputBaseline()
    # totals missing or malformed: the rates stay, judged by themselves
    for totals in ({}, {"window_totals": None}, {"window_totals": [[0, -1.0]]}):
        kept = baseline_from_record({"window_rates": [[0, 25.0]] * 5, **totals})
        assert kept.learned(S) == {0: 25.0} and kept.window_totals == ()
    for broken in ({"window_rates": [[1.5, 2.0]]}, {"window_rates": [["a", 2.0]]}, {"window_rates": "x"}, [], None,
                   {"window_rates": [[-1, 2.0]]}, {"window_rates": [True]}, {"window_rates": [[True, 2.0]]},
                   {"window_rates": [[10**6, 2.0]]}, {"window_rates": [[0, -5.0]]}, {"window_rates": [[0, 0.0]]},
                   {"window_rates": [[0, float("nan")]]}, {"window_rates": [[0, float("inf")]]}):
        assert baseline_from_record(broken) == ThroughputBaseline()



def test_a_stream_interval_is_quiet_only_when_no_other_prefill_touched_it() -> None:
    assert quiet_interval(10.0, in_prefill=0, last_prefill_end_s=None)
    assert quiet_interval(10.0, in_prefill=0, last_prefill_end_s=9.0)
    assert quiet_interval(10.0, in_prefill=0, last_prefill_end_s=10.0)  # the stream's own first token
    assert not quiet_interval(10.0, in_prefill=1, last_prefill_end_s=None)  # a prompt being read now
    assert not quiet_interval(10.0, in_prefill=0, last_prefill_end_s=10.5)  # one ended within the interval


def test_a_stream_rate_is_its_decode_or_only_its_quiet_intervals() -> None:
    """mlx_lm.server prefills a 2 s prompt among its decode steps: a 300-token stream beside it took 2.3 s
    for its decode; the 250 tokens that arrived in intervals no prefill touched took 0.25 s."""
    assert stream_decode_rate(300, 2.3) == (pytest.approx(130.0), 300)  # the engine read as ~9x slower
    assert stream_decode_rate(300, 2.3, quiet=(250, 0.25, 300)) == (pytest.approx(1000.0), 251)


def test_quiet_tokens_are_scaled_where_events_carry_several_tokens() -> None:
    """An engine that sends two tokens per event (vLLM's stream_interval 2): 150 events, usage 300 tokens."""
    rate = stream_decode_rate(300, 2.0, quiet=(100, 1.0, 150))
    assert rate is not None and rate[0] == pytest.approx(100 * 299 / 149)
    assert stream_decode_rate(300, 2.0, quiet=(100, 1.0, 300)) == (pytest.approx(100.0), 101)  # one per event


def test_a_stream_with_no_real_decode_gives_no_rate() -> None:
    assert stream_decode_rate(300, 2.3, quiet=(6, 0.2, 300)) is None  # too few quiet tokens
    assert stream_decode_rate(300, 2.3, quiet=(100, 0.02, 300)) is None  # too short
    assert stream_decode_rate(300, 2.3, quiet=(0, 0.0, 300)) is None  # a prefill beside it all along
    assert stream_decode_rate(7, 1.0) is None  # too few tokens
    assert stream_decode_rate(100, 0.01) is None  # a flush of held-back tokens
    assert stream_decode_rate(100, None) is None


def test_a_sample_is_labelled_with_the_gateway_concurrency_of_the_time_its_rate_came_from() -> None:
    """A stream whose rate comes only from the second half of its decode, where it ran alone, is a
    lone request's rate though another request was in flight over the first half."""
    changes = [(0.0, 2), (5.0, 1)]
    assert sample_concurrency(changes, [], 0.0, 10.0, in_flight_now=1) == 2  # 1.5 over the whole decode
    assert sample_concurrency(changes, [], 0.0, 10.0, in_flight_now=1, through_gateway=1.0) == 1


def test_only_a_long_prompt_prefill_leaves_the_streams_beside_it_out() -> None:
    """A chat turn of a few words costs the engine about one decode step; an agent's 700-word prompt many."""
    assert not prefill_counts(len(b'{"model":"tiny","messages":[{"role":"user","content":"count"}],"stream":true}'))
    assert prefill_counts(len(" ".join(f"w{i}" for i in range(700)).encode()))


def test_only_progress_after_the_hang_clears_it() -> None:
    """A hung engine is generating again only on its own progress after it was called hung: a verdict that is
    merely not hung (a canary that may be loading the model of an engine that cannot say whether it is in
    memory: oMLX) clears nothing, so the hang restart still comes."""
    from policies.health import ProgressVerdict, hang_cleared

    loading = ProgressVerdict(False, "loading", None, None, "loading the model", "canary", 90.0)
    assert not hang_cleared(100.0, loading)  # its last progress is from before the hang
    assert not hang_cleared(100.0, ProgressVerdict(True, "hung", "stream", 12.0, "silent", "canary", 90.0))
    assert not hang_cleared(100.0, ProgressVerdict(False, "idle", None, 5.0, None, None, None))
    assert hang_cleared(100.0, ProgressVerdict(False, "generating", None, 0.5, None, "canary", 101.0))


def test_a_hang_on_the_process_is_over_once_it_runs_again() -> None:
    """SIGSTOP, then SIGCONT: a hang whose evidence was the stopped process is over as soon as the verdict is
    not hung, without new progress (an idle engine whose model its keep-alive unloaded gets no canary to
    show any); a hang on silence still needs the engine's own progress."""
    from policies.health import ProgressVerdict, hang_cleared

    idle = ProgressVerdict(False, "idle", None, 40.0, None, "canary", 60.0)
    assert hang_cleared(100.0, idle, "process")
    assert not hang_cleared(100.0, idle, "stream")
    assert not hang_cleared(100.0, ProgressVerdict(True, "hung", "process", None, "process stopped (SIGSTOP)"), "process")


def test_a_canary_rate_is_a_sample_only_over_a_real_decode() -> None:
    from policies.health import MIN_SAMPLE_DECODE_S, canary_sample_rate

    assert canary_sample_rate(75913.0, 0.0002) is None  # 16 tokens read in one burst
    assert canary_sample_rate(900.0, MIN_SAMPLE_DECODE_S) == 900.0
    assert canary_sample_rate(25.0, None) == 25.0  # the engine's own rate, or one over the whole request
    assert canary_sample_rate(None, 0.5) is None and canary_sample_rate(0.0, 0.5) is None


def test_a_canary_beside_other_requests_is_no_sample() -> None:
    """A request that began while the canary ran had its prefill beside the canary's decode (mlx_lm.server
    stops every decode for a prefill chunk): the canary's rate is not the engine's decode alone."""
    from policies.health import canary_sample_rate

    assert canary_sample_rate(600.0, 0.4, others=0) == 600.0
    assert canary_sample_rate(30.0, 6.5, others=1) is None


def test_requests_beside_counts_those_in_flight_at_the_start_and_the_rises_inside_the_span() -> None:
    from policies.health import requests_beside

    changes = [(0.0, 0), (1.0, 1), (2.0, 0), (5.0, 1), (5.5, 2), (6.0, 1), (9.0, 0)]
    assert requests_beside(changes, 4.0, 8.0) == 2  # began at 5.0 and 5.5; the end at 6.0 is no start
    assert requests_beside(changes, 5.0, 8.0) == 2  # one in flight at the start (noted at it), one began
    assert requests_beside(changes, 5.2, 5.4) == 1  # in flight all along, though none began
    assert requests_beside(changes, 2.5, 4.9) == 0
    assert requests_beside(changes, 0.5, 3.0) == 1
    assert requests_beside([(0.0, 0), (1.0, 3)], 0.5, 1.0) == 3  # three at once
    assert requests_beside([(3.0, 1)], 1.0, 4.0) == 1  # none in flight before the oldest change


@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 5)), max_size=30), st.floats(0, 100), st.floats(0, 100))
def test_requests_beside_is_those_in_flight_at_the_start_and_the_rises_after(raw, start_s, end_s) -> None:
    from policies.health import requests_beside

    changes = sorted(raw, key=lambda c: c[0])
    known = [(-math.inf, 0), *changes]
    at_start = [c for c in known if c[0] <= start_s][-1][1]
    rises = sum(max(0, b[1] - a[1]) for a, b in itertools.pairwise(known) if start_s < b[0] <= end_s)
    assert requests_beside(changes, start_s, end_s) == at_start + rises


@given(now_s=st.floats(0, 1000), last_canary_s=st.floats(0, 1000), interval_s=st.floats(0.5, 600),
       running=st.booleans(), hung=st.booleans(), unloaded=st.booleans(), in_flight=st.integers(0, 4),
       last_traffic_s=st.none() | st.floats(0, 1000))
def test_a_canary_goes_alone_never_to_an_unloaded_model_and_never_beside_traffic_unless_hung(
        now_s, last_canary_s, interval_s, running, hung, unloaded, in_flight, last_traffic_s) -> None:
    """One canary at a time; none that would load a lazy engine's model; none while a request is in flight
    or made traffic within the interval (it proves generation itself), except while hung, every 2 s."""
    from policies.health import HUNG_CANARY_EVERY_S, canary_due

    due = canary_due(now_s, last_canary_s, interval_s, running=running, hung=hung, unloaded=unloaded,
                     in_flight=in_flight, last_traffic_s=last_traffic_s)
    if running or unloaded:
        assert not due
    elif hung:
        assert due == (now_s - last_canary_s >= HUNG_CANARY_EVERY_S)
    else:
        quiet = in_flight == 0 and (last_traffic_s is None or now_s - last_traffic_s >= interval_s)
        assert due == (quiet and now_s - last_canary_s >= interval_s)


def test_a_hang_back_soon_after_it_cleared_continues_its_episode() -> None:
    """A hang called again within max(2 x stall, 30 s) of its clearing began when the first did (its restart is
    counted from there); later, or with no hang before, it begins now."""
    from policies.health import hang_episode_since

    assert hang_episode_since(100.0, last_since_s=50.0, cleared_at_s=80.0, stall_s=15.0) == 50.0
    assert hang_episode_since(100.0, last_since_s=50.0, cleared_at_s=60.0, stall_s=15.0) == 100.0  # 40 s later
    assert hang_episode_since(100.0, last_since_s=10.0, cleared_at_s=60.0, stall_s=30.0) == 10.0  # 2 x stall: 60 s
    assert hang_episode_since(100.0, last_since_s=None, cleared_at_s=None, stall_s=15.0) == 100.0


def test_only_a_hang_a_canary_or_counter_cleared_may_come_back_as_the_same() -> None:
    from policies.health import hang_relapse_may_follow

    assert hang_relapse_may_follow("canary") and hang_relapse_may_follow("counters")
    assert not hang_relapse_may_follow("stream") and not hang_relapse_may_follow("prefill")
    assert not hang_relapse_may_follow(None)
