"""Degraded and hung: classification from readings.

Real failures this covers: the token rate of a model fell from 25 to 10 tok/s before a GPU hang
(degraded), and servers went silent after minutes of work while ``/health`` stayed 200 (hung).

**Degraded.** Token-rate samples (canaries, gateway streams, engine counters) are the rate of one
request's decode, each taken while the engine ran a known number of requests. An engine shares each
step among the requests it runs, so one request's rate falls as more run beside it: that is load, not
a slowdown. Samples are therefore compared only with samples taken at a like concurrency, in bands
(1, 2, 3-4, 5-8, 9-16, ...: ``concurrency_band``). Samples are grouped in windows of ``window_s``; a
window is judged at its band with the most tokens among those with a baseline of their own, and
against that baseline (a band spans up to twice as many requests at its top as at its bottom: with
more at once than its fastest windows had, against the band's rate in all shared among them, where
that is less). The engine is degraded when each of the last ``degraded_windows`` windows is
below ``degraded_share`` of it, and recovered as soon as the latest window is back at or above it. A
window with samples only in bands not yet learned is judged by a floor from the nearest learned band
below (``band_threshold``: an engine running more requests makes no fewer tokens in all). A window
without samples, or that nothing can judge, is unknown: it does not count as below, and it ends the
streak. What this cannot tell apart: a slowdown that arrives together with more requests at once, in
a band not yet learned, is judged only by that loose floor; and different kinds of work at different
concurrencies are only compared through that floor. A stream's rate is taken only over the intervals
between its tokens when no other request to its engine was in prefill (``quiet_interval``): a prompt
beside it, short or long, makes it wait, not the engine slow. A per-step counter's rate is taken only over
intervals between two readings in which the engine computed no long prompt and no long prompt sent
through the gateway was in prefill (``prefill_beside``): the engine counts a prompt it prefills among
the requests it runs while it makes no token for it, and the decode beside it waits for its chunks.

**Baseline.** ``ThroughputBaseline`` keeps the rates of recent healthy windows per band and reports
a high percentile of a band's (default p90): a high percentile follows what the model *can* do, and
a slow decline does not drag it down the way a mean would. Windows below the threshold their band is
judged by are not learned. The caller keeps the baseline per model across restarts.

**The evidence rule** (``assess_progress``, what the watchdog decides with): an engine is hung only
when *no* source shows engine-side progress for ``stall_s`` and one source shows silence. Progress
is a token read from the engine on a live stream (at the engine's pace, whatever the client does),
a successful canary, a per-step counter that advanced (or a gauge the engine sets after every step
that rose: vLLM's KV cache usage, which each prefill chunk raises while its token total cannot), or
the engine's own prefill progress; any of them newer than a piece of silence evidence voids it at
once. Silence evidence is a live stream that got nothing from the engine, a canary that got no token,
or per-step counters flat while the engine says requests run (not for an engine whose step count may
stay flat through one long step: llama.cpp, ``counter_silence=False``). Counters that grow only when
a request *finishes* are no evidence of anything while a request runs, so they never yield hung; a
lazy engine loading its model is
``loading``, not silent. A stopped (SIGSTOP) or zombie process is hung whatever else was seen:
no generation can happen in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies._format import require
from policies.actions import Noop, Restart
from probes.readings import EngineCounters, ThroughputSample


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Degraded-detection settings (the config's ``[policies.degraded]``); validated when constructed."""

    window_s: float = 30.0
    degraded_share: float = 0.5
    degraded_windows: int = 3
    # A degraded engine with no request in flight is restarted (decide_degraded_restart); off by default.
    restart_when_idle: bool = False
    baseline_percentile: float = 90.0
    baseline_min_windows: int = 5
    baseline_max_windows: int = 100

    def __post_init__(self) -> None:
        require(self.window_s > 0, f"health window_s must be > 0 seconds, got {self.window_s!r}")
        require(
            0 < self.degraded_share < 1,
            f"health degraded_share must be between 0 and 1 (0.5 = half the baseline), "
            f"got {self.degraded_share!r}",
        )
        require(
            isinstance(self.degraded_windows, int) and self.degraded_windows >= 1,
            f"health degraded_windows must be an integer >= 1, got {self.degraded_windows!r}",
        )
        require(
            0 < self.baseline_percentile <= 100,
            f"health baseline_percentile must be in (0, 100], got {self.baseline_percentile!r}",
        )
        require(
            1 <= self.baseline_min_windows <= self.baseline_max_windows,
            f"health baseline_min_windows must be >= 1 and <= baseline_max_windows "
            f"({self.baseline_max_windows!r}), got {self.baseline_min_windows!r}",
        )


MAX_BAND = 20  # about a million requests at once: bands read from a state file are capped here


def concurrency_band(concurrency: int) -> int:
    """The band of a sample's concurrency: 0 for 1 request, 1 for 2, 2 for 3-4, 3 for 5-8, 4 for 9-16, ..."""
    return min(MAX_BAND, max(0, math.ceil(math.log2(max(1, concurrency)))))


def band_low(band: int) -> int:
    """The fewest concurrent requests of a band: 1, 2, 3, 5, 9, ..."""
    return band + 1 if band <= 1 else 2 ** (band - 1) + 1


def band_label(band: int) -> str:
    """A band as a person reads it: "1", "2", "3-4", "5-8", ..."""
    if band <= 1:
        return str(band + 1)
    return f"{band_low(band)}-{2 ** band}"


def rolling_rate(samples: Sequence[ThroughputSample], start_s: float, end_s: float) -> float | None:
    """Token rate over the samples with ``start_s < at_s <= end_s``; None when there are none.

    Samples are weighted by their token counts (a 1,000-token stream says more than an
    8-token canary); samples that carry no count weigh as one token.
    """
    total_weight = 0.0
    weighted = 0.0
    for s in samples:
        if start_s < s.at_s <= end_s:
            weight = float(max(s.tokens, 1))
            total_weight += weight
            weighted += weight * s.tokens_per_s
    return None if total_weight == 0 else weighted / total_weight


@dataclass(frozen=True, slots=True)
class _BandWindow:
    """One concurrency band's samples in a window: their weight (tokens), and, weighted alike, their rate
    and their concurrency."""

    weight: float
    rate: float
    concurrency: float


def _window_bands(samples: Sequence[ThroughputSample], start_s: float, end_s: float) -> dict[int, _BandWindow]:
    """The samples with ``start_s < at_s <= end_s`` by concurrency band, weighted as ``rolling_rate`` weighs."""
    sums: dict[int, list[float]] = {}
    for s in samples:
        if start_s < s.at_s <= end_s:
            weight = float(max(s.tokens, 1))
            acc = sums.setdefault(concurrency_band(s.concurrency), [0.0, 0.0, 0.0])
            acc[0] += weight
            acc[1] += weight * s.tokens_per_s
            acc[2] += weight * s.concurrency
    return {band: _BandWindow(w, rate / w, conc / w) for band, (w, rate, conc) in sums.items()}


def band_threshold(baseline: ThroughputBaseline, settings: HealthSettings, band: int, concurrency: float
                   ) -> tuple[float, float, str] | None:
    """What one request's rate at ``band`` (``concurrency`` requests at once, on average) is judged against:
    (the threshold, the rate it is a share of, what that rate is), or None when it cannot be judged.

    Its own band's learned baseline; a band spans up to twice as many requests at its top as at its
    bottom, so where the window ran more at once than the band's fastest windows, the band's learned
    rate in all, shared among the window's requests, if that is less (an engine that shares its steps
    gives each of more requests less; a slowdown takes from both). For a band not yet learned, the
    nearest learned band below it: an engine running more requests at once makes no fewer tokens a
    second in all, so that band's slowest healthy window, times its fewest requests, shared among
    this band's, is a floor. (No bound
    is taken from a band above: a request beside more others is no faster only for the same kind of
    work, and short batch jobs at 8 beside long-context chats at 2 are not.)
    """
    own = baseline.tokens_per_s(settings, band)
    if own is not None:
        # only where the totals are of the same windows as the rates (both are kept to the newest alike)
        aligned = len(baseline.totals(band)) == len(baseline.rates(band))
        total = baseline.total_per_s(settings, band) if aligned else None
        if total is not None and total / max(concurrency, 1.0) < own:
            # more requests at once than its fastest windows had: each may get less, the engine no less in all
            shared = total / max(concurrency, 1.0)
            return (settings.degraded_share * shared, shared,
                    f"{shared:.1f} tok/s per request: the {total:.1f} tok/s in all learned there, shared among "
                    f"{concurrency:.1f} (its {own:.1f} tok/s per request came with fewer at once)")
        return settings.degraded_share * own, own, f"the {own:.1f} tok/s baseline there"
    below = [b for b in baseline.learned(settings) if b < band]
    if not below:
        return None
    b = max(below)
    total = min(baseline.rates(b)) * band_low(b)
    per_request = total / max(concurrency, 1.0)
    return (settings.degraded_share * per_request, per_request,
            f"{per_request:.1f} tok/s per request: the {total:.1f} tok/s in all of the slowest healthy window at "
            f"{band_label(b)} concurrent request{'s' if b else ''}, shared among {concurrency:.1f}")


@dataclass(frozen=True, slots=True)
class ThroughputTracker:
    """An immutable rolling buffer of samples, pruned to what the windows need."""

    samples: tuple[ThroughputSample, ...] = ()

    def add(self, sample: ThroughputSample, settings: HealthSettings) -> ThroughputTracker:
        horizon_s = sample.at_s - settings.window_s * (settings.degraded_windows + 1)
        kept = tuple(s for s in self.samples if s.at_s > horizon_s)
        return ThroughputTracker((*kept, sample))

    def rate(self, now_s: float, settings: HealthSettings) -> float | None:
        """The rolling rate over the last window (all bands together)."""
        return rolling_rate(self.samples, now_s - settings.window_s, now_s)


@dataclass(frozen=True, slots=True)
class ThroughputBaseline:
    """Rates of recent healthy windows for one model, as (concurrency band, rate) pairs, oldest first, and
    the same windows' rates in all (one request's rate times the requests running beside it) as
    ``window_totals``; the caller persists it across restarts."""

    window_rates: tuple[tuple[int, float], ...] = ()
    last_window_end_s: float | None = None
    window_totals: tuple[tuple[int, float], ...] = ()

    def rates(self, band: int) -> tuple[float, ...]:
        return tuple(rate for b, rate in self.window_rates if b == band)

    def totals(self, band: int) -> tuple[float, ...]:
        return tuple(total for b, total in self.window_totals if b == band)

    def total_per_s(self, settings: HealthSettings, band: int) -> float | None:
        """The learned rate in all of a band, the same percentile of its windows (None until enough)."""
        return _percentile(self.totals(band), settings)

    def bands(self) -> tuple[int, ...]:
        return tuple(sorted({b for b, _ in self.window_rates}))

    def tokens_per_s(self, settings: HealthSettings, band: int = 0) -> float | None:
        """The learned baseline of a band: a high percentile of its healthy window rates (None until enough)."""
        return _percentile(self.rates(band), settings)

    def learned(self, settings: HealthSettings) -> dict[int, float]:
        """Every band's baseline that is learned."""
        out: dict[int, float] = {}
        for band in self.bands():
            value = self.tokens_per_s(settings, band)
            if value is not None:
                out[band] = value
        return out


def _percentile(values: Sequence[float], settings: HealthSettings) -> float | None:
    if len(values) < settings.baseline_min_windows:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(settings.baseline_percentile / 100 * len(ordered)))
    return ordered[rank - 1]


def learn_baseline(
    baseline: ThroughputBaseline,
    samples: Sequence[ThroughputSample],
    settings: HealthSettings,
    now_s: float,
    *,
    healthy: bool = True,
) -> ThroughputBaseline:
    """Learn from the window ending at ``now_s`` if a whole window passed since the last one: each band
    with samples in it adds its rate to its own history, unless it is below the threshold
    ``band_threshold`` gives it (a slow window is not learned).

    Pass ``healthy=False`` while the engine is starting, degraded or hung: nothing is learned.
    A ``last_window_end_s`` later than ``now_s`` comes from an earlier boot and is forgotten.
    """
    last = baseline.last_window_end_s
    if last is not None and last > now_s:
        last = None
    if last is not None and now_s - last < settings.window_s:
        return baseline
    rates = list(baseline.window_rates)
    totals = list(baseline.window_totals)
    start_s = now_s - settings.window_s
    for band, window in sorted(_window_bands(samples, start_s, now_s).items()):
        rate = window.rate
        judged = band_threshold(baseline, settings, band, window.concurrency)
        if healthy and rate > 0 and (judged is None or rate >= judged[0]):
            rates = _keep_newest((*rates, (band, rate)), band, settings.baseline_max_windows)
            totals = _keep_newest((*totals, (band, rate * window.concurrency)), band, settings.baseline_max_windows)
    return replace(baseline, window_rates=tuple(rates), window_totals=tuple(totals), last_window_end_s=now_s)


def _keep_newest(rates: Sequence[tuple[int, float]], band: int, keep: int) -> list[tuple[int, float]]:
    """The pairs with at most ``keep`` of ``band``'s, its newest."""
    out: list[tuple[int, float]] = []
    seen = 0
    for pair in reversed(rates):
        if pair[0] == band:
            seen += 1
            if seen > keep:
                continue
        out.append(pair)
    return out[::-1]


def mean_in_flight(changes: Sequence[tuple[float, int]], start_s: float, end_s: float) -> float | None:
    """The mean number of requests in flight over ``[start_s, end_s]``, from the points where it changed
    (``(at_s, count from then on)``, oldest first); None when the span is empty or begins before them.

    A stream's rate is judged at the mean concurrency of its own decode: with 12 streams started
    together, the last to finish ran beside the others almost all its time, though it ends alone.
    Walked from the newest change back to the span's start only (the record is long; spans are short).
    """
    if end_s <= start_s:
        return None
    area = 0.0
    next_at = math.inf
    for at_s, count in reversed(changes):
        lo, hi = max(at_s, start_s), min(next_at, end_s)
        if hi > lo:
            area += count * (hi - lo)
        if at_s <= start_s:
            return area / (end_s - start_s)
        next_at = at_s
    return None


# A stream's rate needs a real decode: a server that holds tokens back and flushes many in one chunk (or a
# very short answer) would give an absurd rate and inflate the learned baseline.
MIN_SAMPLE_TOKENS = 8
MIN_SAMPLE_DECODE_S = 0.05  # a flush of held-back tokens spans milliseconds; a real 8-token decode does not
# A stream's decode rate is measured over its first this many token events (at most about a short prompt's
# worth, PREFILL_COUNTS_TOKENS, on top of its prompt). Later its own context has grown, and an engine makes
# each token slower by nature (each step attends to every token before it): a 12,000-token answer from
# mlx_lm.server (CPU, tiny model) ran at 0.45 of the rate of 400-token answers. Judged whole against a
# baseline learned from short answers, a long answer read as a slowdown of the engine: degraded, and
# restarted once idle where restart_when_idle is on.
DECODE_SAMPLE_MAX_EVENTS = 512


# A prompt this long (its request body, in bytes: about 500 tokens and more) takes an engine many decode
# steps' worth of prefill.
PREFILL_COUNTS_BYTES = 2048


def prefill_counts(body_bytes: int) -> bool:
    """Whether a request's prompt is long: its prefill may take the engine from its other requests for a good
    part of an interval between two readings of its counters (seconds long), and the daemon's counter
    samples leave such an interval out (``prefill_beside``). A short prompt's prefill is a small part of
    one; leaving out every counter interval in which a request waited for its first token would leave no
    counter sample at all under a steady load (each new request's wait for its turn counts as its prefill).

    An interval between a stream's tokens is one decode step, and any prompt's prefill outlasts one
    (mlx_lm.server stopped a stream 0.7 s for a 180-word prompt while it decoded a token every 2 ms): every
    request's prefill, short prompt or long, leaves the stream intervals it touched out (gateway/prefills.py,
    ``quiet_interval``)."""
    return body_bytes >= PREFILL_COUNTS_BYTES


def quiet_interval(prev_token_s: float, in_prefill: int, last_prefill_end_s: float | None) -> bool:
    """Whether a stream's interval between two tokens (from ``prev_token_s`` to now) measures the engine's
    decode alone: no other request to its engine is in prefill now (``in_prefill``), and none ended its
    prefill within the interval (``last_prefill_end_s``). A request is in prefill from its send until
    its first token, or its end without one (an answer not streamed counts whole: nothing tells its
    prompt from its answer).

    An engine runs a prompt's prefill between its decode steps or inside them (mlx_lm.server's batch
    generator prefills new prompts before it decodes again; vLLM's chunked prefill fills each step's
    token budget with prompt chunks), so a stream decoding beside a long prompt gets fewer tokens or
    none meanwhile: that is the other request's prompt, not the engine's speed, and by how much depends
    on the engine and the prompt, so no share of it can be taken out; the interval is left out whole.
    """
    return in_prefill == 0 and (last_prefill_end_s is None or last_prefill_end_s <= prev_token_s)


# While an engine is hung a canary goes every this often, traffic or not: a good one is what shows it
# generating again.
HUNG_CANARY_EVERY_S = 2.0


def canary_due(now_s: float, last_canary_s: float, interval_s: float, *, running: bool, hung: bool,
               unloaded: bool, in_flight: int, last_traffic_s: float | None) -> bool:
    """Whether the watchdog sends a canary now.

    One at a time (``running``); never to a lazy engine that reports its model unloaded (a canary would
    load it, and keep it resident against its own keep-alive). Otherwise one every ``interval_s`` (since
    the last ended, ``last_canary_s``) while no real traffic proves generation: no request in flight and
    none began or made a token within the interval (``last_traffic_s``); and every
    ``HUNG_CANARY_EVERY_S`` while hung, whatever the traffic."""
    if running or unloaded:
        return False
    if hung:
        return now_s - last_canary_s >= HUNG_CANARY_EVERY_S
    traffic = in_flight > 0 or (last_traffic_s is not None and now_s - last_traffic_s < interval_s)
    return now_s - last_canary_s >= interval_s and not traffic


def requests_beside(changes: Sequence[tuple[float, int]], start_s: float, end_s: float) -> int:
    """How many requests ran beside one over ``[start_s, end_s]`` (a canary, which the gateway does not count):
    those in flight at its start and those that began during it, from the points where the number in flight
    changed (``(at_s, count from then on)``, oldest first; none in flight before the oldest). Walked from the
    newest change back only."""
    began = 0
    newer: tuple[float, int] | None = None
    for at_s, count in reversed(changes):
        if newer is not None and start_s < newer[0] <= end_s and newer[1] > count:
            began += newer[1] - count
        if at_s <= start_s:
            return count + began
        newer = (at_s, count)
    if newer is not None and start_s < newer[0] <= end_s:
        began += newer[1]
    return began


def canary_sample_rate(tokens_per_s: float | None, decode_s: float | None, others: int = 0) -> float | None:
    """A canary's decode rate as a throughput sample, or None. A rate the engine reported itself, or one over
    the whole request (``decode_s`` None), stands; one timed from the canary's chunks needs a real decode
    (``MIN_SAMPLE_DECODE_S``) like a stream's: chunks read in one burst (held back by the engine, or by a busy
    reader) give rates a hundred times the engine's, which would inflate the learned baseline until every
    healthy reading looks degraded.

    ``others``: requests that ran beside the canary (``requests_beside``: it runs alone unless one began
    during it, or the engine is hung). A request's prefill may have run beside the canary's decode, between
    its steps or inside them (``quiet_interval``), so its rate is not the engine's decode alone: no sample.
    On an engine that stops its decode for a prefill chunk, as mlx_lm.server does, a 2 s canary beside a
    1 s prefill read 10 tok/s against its 19.8 (test_a_canary_that_a_request_began_beside_gives_no_rate)."""
    if not tokens_per_s or others:
        return None
    if decode_s is not None and decode_s < MIN_SAMPLE_DECODE_S:
        return None
    return tokens_per_s


def stream_decode_rate(tokens: int, decode_s: float | None, quiet: tuple[int, float, int] | None = None,
                       *, held_back: bool = False) -> tuple[float, float] | None:
    """A completed stream's decode rate, and the tokens it rests on; None when that is no real decode.

    ``tokens`` over ``decode_s`` (from its first token to its last) is the whole decode: the tokens after
    the first over that time. ``quiet``: the arrivals whose interval no other request's prefill touched
    (``quiet_interval``), as (their tokens, the intervals' total time, every token event the stream
    counted); where given, only they count. An engine that sends several tokens per event (its usage
    says more tokens than there were events) has its quiet tokens scaled by that ratio. A real decode
    is at least ``MIN_SAMPLE_TOKENS - 1`` tokens over at least ``MIN_SAMPLE_DECODE_S``.

    ``held_back``: its client held it back at some point (the gateway stopped reading the engine while the
    client's buffer was full), so its tokens came at the client's pace: no sample (a slow reader must not
    read as a slow engine).
    """
    if held_back:
        return None
    seconds: float | None
    if quiet is not None:
        counted, seconds, events = quiet
        intervals = counted * (tokens - 1) / (events - 1) if events > 1 and tokens > events else float(counted)
    else:
        intervals, seconds = float(tokens - 1), decode_s
    if intervals < MIN_SAMPLE_TOKENS - 1 or seconds is None or seconds < MIN_SAMPLE_DECODE_S:
        return None
    return intervals / seconds, intervals + 1


# A prompt this long in tokens (about PREFILL_COUNTS_BYTES of text) takes an engine many decode steps' worth
# of prefill.
PREFILL_COUNTS_TOKENS = 512


def counter_prefill(before: EngineCounters, after: EngineCounters) -> str | None:
    """What an engine's own counters show of a long prompt's prefill between two readings, or None.

    The prompt tokens it computed (``prompt_tokens_total``) grew by at least ``PREFILL_COUNTS_TOKENS`` for
    each request that got its first token meanwhile (``first_tokens_total``; at least that much where none
    did): a long prompt was prefilled in the interval, or its prefill ended there. Short prompts of a steady
    load of requests (each about one decode step's prefill) grow it by less than that for each first token,
    so they leave their intervals measured, as ``prefill_counts`` does for the gateway's streams.

    What an engine counts decides what this sees (probes/counters.py): SGLang counts every prefill batch,
    each chunk of a long prompt as it runs; vLLM counts a request's whole prompt only in the step that makes
    its first token, so its counters show the interval where a long prefill ended and none of the intervals
    before it, while the prompt was read chunk by chunk (``prefill_beside`` takes those from the gateway).
    """
    if before.prompt_tokens_total is None or after.prompt_tokens_total is None:
        return None
    computed = after.prompt_tokens_total - before.prompt_tokens_total
    firsts = 0.0
    if before.first_tokens_total is not None and after.first_tokens_total is not None:
        firsts = max(0.0, after.first_tokens_total - before.first_tokens_total)
    if computed < PREFILL_COUNTS_TOKENS * max(1.0, firsts):
        return None  # none, a new process (the count went down), or short prompts only
    return (f"it computed {computed:.0f} prompt tokens in {after.at_s - before.at_s:.1f}s "
            f"for {firsts:.0f} first token{'s' if firsts != 1 else ''}")


def prefill_beside(before: EngineCounters, after: EngineCounters, in_prefill: int = 0,
                   last_prefill_end_s: float | None = None, *, prompt_counted_per_chunk: bool = False) -> str | None:
    """Why the interval between two counter readings measures no decode, or None when it does.

    A long prompt's prefill ran in it: the engine's counters show one (``counter_prefill``), or a prompt of
    ``PREFILL_COUNTS_BYTES`` and more sent through the gateway was in prefill at some time in it
    (``in_prefill`` such requests at the later reading, the last such prefill ended at
    ``last_prefill_end_s``: ``quiet_interval``). The gateway's word is not taken for an engine that counts
    prompt tokens per chunk as it runs (``prompt_counted_per_chunk``: SGLang) where both readings have
    them: its own count sees every client's long prompts, and only the tokens it computed (the gateway
    counts a prompt's whole wait for its first token, a queue or a prefix-cache hit too).

    Engines count a request in prefill among those running while it makes no token (vLLM's scheduler
    keeps it in its running list through every chunk, and ``vllm:num_requests_running`` is that list's
    length), and its chunks take the steps' time from the decode beside it: vLLM's ``schedule`` spends one
    token budget a step over its running list, a chunk of the prompt for the request in prefill and a token
    for each decoding one (vllm/v1/core/sched/scheduler.py); SGLang keeps a request in chunked prefill out
    of the running batch its gauge counts, but runs a prefill batch, when it has one, in place of a decode
    step (python/sglang/srt/managers/scheduler.py ``get_next_batch_to_run``). So the tokens over the
    interval, divided by the requests reported running, read low whatever the engine's speed; by how much
    depends on the engine and the prompt, so no share can be taken out, and dividing by the decoding
    requests alone would still read the chunks' time as the engine's: the interval is left out whole, as
    a stream's are.
    """
    own = counter_prefill(before, after)
    if own is not None:
        return f"a long prompt was prefilled: {own}"
    counted = before.prompt_tokens_total is not None and after.prompt_tokens_total is not None
    if (prompt_counted_per_chunk and counted) or quiet_interval(before.at_s, in_prefill, last_prefill_end_s):
        return None
    waiting = f"{in_prefill} request{'s' if in_prefill != 1 else ''}" if in_prefill else "one that ended"
    return f"a long prompt sent through the gateway was in prefill ({waiting})"


def mean_reported_running(counters: Sequence[EngineCounters], start_s: float, end_s: float) -> float | None:
    """The running-request count the engine reported, as a step function, averaged over
    ``[start_s, end_s]``: each reading holds until the next (the first also before it: readings come
    every few seconds, a canary is shorter). None without a reading up to ``end_s``."""
    readings = sorted((c.at_s, c.requests_running) for c in counters if c.requests_running is not None)
    changes = [(at_s, int(running)) for at_s, running in readings if at_s <= end_s]
    if not changes:
        return None
    if end_s <= start_s:
        return float(changes[-1][1])
    if changes[0][0] > start_s:
        changes.insert(0, (start_s, changes[0][1]))  # the first reading stands for the time before it
    return mean_in_flight(changes, start_s, end_s)


def sample_concurrency(changes: Sequence[tuple[float, int]], counters: Sequence[EngineCounters], start_s: float,
                       end_s: float, *, in_flight_now: int, beside_gateway: bool = False,
                       through_gateway: float | None = None) -> int:
    """How many requests the engine ran while one request decoded over ``[start_s, end_s]`` (at least 1).

    The mean through the gateway over that span (``mean_in_flight``, or ``through_gateway``: the gateway's
    own mean over the part of the span a rate was taken from; plus the request itself when it did not
    come through the gateway, ``beside_gateway``: a canary), or the mean the engine itself
    reported running over it (clients of its own port count there), whichever is more. A span the
    gateway's record no longer covers takes the count now.
    """
    own = 1 if beside_gateway else 0
    through = through_gateway if through_gateway is not None else mean_in_flight(changes, start_s, end_s)
    gateway = (through if through is not None else float(in_flight_now)) + own
    reported = mean_reported_running(counters, start_s, end_s)
    return max(1, int(max(gateway, reported or 0.0) + 0.5))


def decode_rate_sample(before: EngineCounters, after: EngineCounters, decode_token_total: bool, *,
                       in_prefill: int = 0, last_prefill_end_s: float | None = None,
                       prompt_counted_per_chunk: bool = False) -> ThroughputSample | None:
    """One request's decode rate from two readings of an engine's counters, or None.

    Only a token total that grows with each decode step (``decode_token_total``: vLLM, SGLang's decode
    mode) gives one; a total that grows when a request finishes (llama.cpp, oMLX) tells when answers
    ended, not how fast their tokens came. The total's growth is every running request's together, so
    it is divided by the requests the engine reported running, and the sample carries that
    concurrency; only when both readings report about as many (within a quarter), since a batch that
    started or ended between them would make the quotient far off. A total that went down (a new
    process) or did not move gives none, and so does an interval in which a long prompt was prefilled
    (``prefill_beside``, with the gateway's requests in prefill: ``in_prefill``, ``last_prefill_end_s``,
    and whether the engine counts prompt tokens per chunk: ``prompt_counted_per_chunk``).
    """
    if not decode_token_total or before.generated_tokens_total is None or after.generated_tokens_total is None:
        return None
    if prefill_beside(before, after, in_prefill, last_prefill_end_s,
                      prompt_counted_per_chunk=prompt_counted_per_chunk) is not None:
        return None
    elapsed_s = after.at_s - before.at_s
    delta = after.generated_tokens_total - before.generated_tokens_total
    if elapsed_s <= 0 or delta <= 0:
        return None
    a, b = before.requests_running, after.requests_running
    if a is None or b is None or abs(a - b) > 0.25 * max(a, b):
        return None
    running = max(1.0, (a + b) / 2)
    return ThroughputSample(at_s=after.at_s, tokens_per_s=delta / elapsed_s / running, source="metrics",
                            tokens=int(delta), concurrency=max(1, int(running + 0.5)))


@dataclass(frozen=True, slots=True)
class DegradedAssessment:
    degraded: bool
    recovered: bool  # the latest window is at or above the threshold
    rate_tokens_per_s: float | None  # the latest window's rate
    baseline_tokens_per_s: float | None
    windows_below: int  # consecutive windows below the threshold, newest first
    reason: str
    band: str | None = None  # the concurrency band the latest window was judged at ("1", "9-16", ...)


def _judge_window(samples: Sequence[ThroughputSample], baseline: ThroughputBaseline, settings: HealthSettings,
                  start_s: float, end_s: float) -> tuple[int, float, tuple[float, float, str]] | None:
    """The window's (band, rate, threshold) to judge, or None if it cannot be: the band with the most
    tokens among those with a learned baseline of their own; only when none has samples here, the band
    with the most tokens, judged by the bound ``band_threshold`` gives it."""
    bands = _window_bands(samples, start_s, end_s)
    if not bands:
        return None
    learned = baseline.learned(settings)
    pool = {b: w for b, w in bands.items() if b in learned} or bands
    band = max(pool, key=lambda b: (pool[b].weight, -b))
    judged = band_threshold(baseline, settings, band, pool[band].concurrency)
    return None if judged is None else (band, pool[band].rate, judged)


def assess_degraded(
    samples: Sequence[ThroughputSample],
    baseline: ThroughputBaseline,
    settings: HealthSettings,
    now_s: float,
) -> DegradedAssessment:
    """Degraded when the last ``degraded_windows`` windows are all below share x the baseline of the
    concurrency band each was judged at (or, for a band not yet learned, the bound ``band_threshold``
    gives it)."""
    if not baseline.learned(settings):
        return DegradedAssessment(False, False, None, None, 0, "no throughput baseline learned yet")
    judged = [
        _judge_window(samples, baseline, settings, now_s - (k + 1) * settings.window_s, now_s - k * settings.window_s)
        for k in range(settings.degraded_windows)
    ]
    below = 0
    for window in judged:
        if window is None or window[1] >= window[2][0]:
            break
        below += 1
    degraded = below >= settings.degraded_windows
    latest = judged[0]
    share_pct = f"{settings.degraded_share * 100:.0f}%"
    if latest is None:
        reason = f"no throughput samples in the last {settings.window_s:.0f}s"
        return DegradedAssessment(False, False, None, None, 0, reason)
    band, rate, (threshold, base, what) = latest
    recovered = rate >= threshold
    at = f"at {band_label(band)} concurrent request{'s' if band else ''}"
    if degraded:
        reason = (f"{rate:.1f} tok/s per request {at}, below {share_pct} of {what} "
                  f"for {below} windows of {settings.window_s:.0f}s")
    else:
        reason = f"{rate:.1f} tok/s per request {at} against {what}"
    return DegradedAssessment(degraded, recovered, rate, base, below, reason, band_label(band))


def _counters_stall(history: Sequence[EngineCounters], stall_s: float, now_s: float) -> str | None:
    """Requests running, and neither the step count nor the per-step cache gauge moved since a sample at
    least ``stall_s`` old."""
    usable = sorted(
        (c for c in history if c.steps_total is not None and c.requests_running is not None),
        key=lambda c: c.at_s,
    )
    if not usable or not usable[-1].requests_running or usable[-1].requests_running <= 0:
        return None
    latest = usable[-1]
    since = latest
    for before, after in zip(reversed(usable[:-1]), reversed(usable[1:]), strict=True):
        if not before.requests_running or before.requests_running <= 0:
            break
        if before.steps_total != after.steps_total or steps_advanced(before, after) is not None:
            break  # a step ran (vLLM: a prefill chunk raises the cache gauge, not the step count), or a new process
        since = before
    flat_s = now_s - since.at_s
    if flat_s < stall_s:
        return None  # tokens moved recently, or the history does not yet cover the stall time
    running = int(latest.requests_running or 0)
    return (
        f"engine reports {running} running request{'s' if running != 1 else ''} "
        f"but no step for {flat_s:.0f}s"
    )


# ---- restart timing (separate from the verdicts above) ------------------------------------------


def hang_cleared(hung_since_s: float, verdict: ProgressVerdict, hung_source: str | None = None) -> bool:
    """Whether an engine called hung at ``hung_since_s`` (on evidence from ``hung_source``) is over it.

    A hang on its process (stopped, a zombie) is over once the process runs again: nothing else was wrong,
    and an idle engine (an Ollama whose model its keep-alive unloaded gets no canary) would show no
    progress to clear it. Any other hang only on the engine's own progress after it (a token, a good
    canary, an advancing per-step counter): a verdict that is merely not hung clears nothing, since
    ``loading`` (a canary that may be loading the model, for an engine that cannot say whether its model
    is in memory: oMLX) would otherwise clear it every time a canary starts, and the engine would never
    be restarted."""
    if verdict.hung:
        return False
    if hung_source == "process":
        return True
    return verdict.last_progress_s is not None and verdict.last_progress_s > hung_since_s


# A hang that comes back this soon after it cleared (at least; twice the stall time where that is longer) is
# the same hang: a request an engine holds without stepping, its canaries answered between (vLLM-style
# counters with a request running and no step). Each clearing began a new episode, so hang_restart_after
# (counted from the episode's start) was never reached, and the engine flapped hung and ready every 20 s.
HANG_RELAPSE_MIN_S = 30.0


def hang_relapse_may_follow(cleared_by: str | None) -> bool:
    """Whether a hang cleared by progress from ``cleared_by`` may come back as the same episode: one a canary
    or a counter cleared (what the engine does for new work, while the hang's request may still be held). One
    a stream's tokens or a prefill cleared is over: the engine worked on real requests."""
    return cleared_by in ("canary", "counters")


def hang_episode_since(now_s: float, *, last_since_s: float | None, cleared_at_s: float | None,
                       stall_s: float) -> float:
    """When a hang called now began: now; or, a relapse within ``max(2 x stall_s, HANG_RELAPSE_MIN_S)`` of the
    last hang's clearing, when that hang began (its restart is counted from there)."""
    window_s = max(2 * stall_s, HANG_RELAPSE_MIN_S)
    if last_since_s is not None and cleared_at_s is not None and now_s - cleared_at_s < window_s:
        return last_since_s
    return now_s


def decide_hang_restart(
    engine: str,
    hung_since_s: float | None,
    now_s: float,
    hang_restart_after_s: float,
    *,
    already_requested: bool,
    reason: str,
) -> Restart | Noop:
    """A hung engine is restarted once it has stayed hung for ``hang_restart_after_s``.

    The hang itself is alerted at once; the restart waits, because a person may want to look at
    the wedged process first, and a hang that clears by itself needs no restart. One restart per
    hang episode (``already_requested``); the restart still goes through the 60 s floor.
    """
    if hung_since_s is None or already_requested:
        return Noop("not hung" if hung_since_s is None else "restart already requested")
    hung_for_s = now_s - hung_since_s
    if hung_for_s < hang_restart_after_s:
        return Noop(f"hung for {hung_for_s:.0f}s of {hang_restart_after_s:.0f}s before a restart")
    return Restart(engine, reason)


def decide_degraded_restart(
    engine: str,
    degraded: bool,
    restart_when_idle: bool,
    in_flight: int,
    *,
    already_requested: bool,
    reason: str,
) -> Restart | Noop:
    """A degraded engine is restarted only when configured to, and only while no request runs on it."""
    if not degraded or not restart_when_idle or already_requested:
        return Noop("no degraded restart")
    if in_flight > 0:
        return Noop(f"degraded, but {in_flight} request{'s' if in_flight != 1 else ''} in flight")
    return Restart(engine, reason)
# ---- the evidence rule -------------------------------------------------------------------------

PROGRESS_SOURCES = ("stream", "canary", "counters", "prefill")
SILENCE_SOURCES = ("process", "stream", "canary", "counters")


@dataclass(frozen=True, slots=True)
class Silence:
    """One piece of silence evidence: ``source`` saw nothing from the engine since ``since_s``.

    ``detail`` is what a person can check ("a live decode stream", "canary waiting for the first
    token"); ``at_s`` is when it was observed (evidence older than the latest progress is void).
    """

    source: str  # "stream" | "canary"
    since_s: float
    at_s: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProgressEvidence:
    """What the watchdog saw of one engine's own progress. Times are monotonic seconds.

    ``last_*_s``: when each progress source last showed progress (None: never in this run).
    ``counters`` is the engine's counter history; it counts (as progress and as silence) only when
    ``counters_per_step`` says the engine has a step count (``EngineCounters.steps_total``). ``gauge_stale_s`` is how
    stale the engine's running-requests gauge may be (SGLang refreshes it every 30 s when idle),
    so flat counters must outlast it too.
    """

    watch_since_s: float
    last_token_s: float | None = None
    last_canary_ok_s: float | None = None
    last_prefill_s: float | None = None
    silences: tuple[Silence, ...] = ()
    counters: tuple[EngineCounters, ...] = ()
    counters_per_step: bool = False
    gauge_stale_s: float = 0.0
    # Whether a flat step count with requests running is silence (False: progress only; llama.cpp
    # answers /metrics during one long decode, its count flat meanwhile).
    counter_silence: bool = True
    process_stopped: bool = False
    zombie: bool = False
    root_pid: int | None = None
    loading: bool = False  # a lazy engine is loading its model (the engine said so, or a load deadline runs)


@dataclass(frozen=True, slots=True)
class ProgressVerdict:
    """The watchdog's verdict with its evidence: ``source`` of the silence and how long it lasted."""

    hung: bool
    phase: str  # "hung" | "loading" | "generating" | "idle"
    source: str | None = None  # the silence source behind a hung verdict
    silent_s: float | None = None  # seconds without engine-side progress from any source
    reason: str | None = None
    last_progress_source: str | None = None
    last_progress_s: float | None = None

    def evidence(self) -> dict[str, object]:
        """The evidence as plain values, for the state-change event and status."""
        return {
            "source": self.source,
            "silent_s": None if self.silent_s is None else round(self.silent_s, 1),
            "last_progress": self.last_progress_source,
        }


def _counter_advances(history: Sequence[EngineCounters]) -> float | None:
    """When the engine's counters last showed a step (the later reading of the pair), or None."""
    usable = sorted((c for c in history if c.steps_total is not None), key=lambda c: c.at_s)
    last: float | None = None
    for a, b in zip(usable, usable[1:], strict=False):
        if steps_advanced(a, b) is not None:
            last = b.at_s
    return last


def steps_advanced(before: EngineCounters | None, after: EngineCounters | None) -> str | None:
    """The engine ran its model between two readings of its counters: what it did, or None.

    Its step count went up, or the gauge it sets after every step it runs rose (vLLM's KV cache usage:
    each prefill chunk takes cache blocks while vLLM's step count, its token total, stays flat until the
    first token; a fall is blocks freed, by an abort say, not the model running). A total that grows only when a request finishes is no step count
    (``steps_total`` is None there) and proves nothing either way; a count that went down is a new
    engine process.
    """
    if before is None or after is None or after.at_s <= before.at_s:
        return None
    elapsed_s = after.at_s - before.at_s
    if before.steps_total is not None and after.steps_total is not None:
        if after.steps_total > before.steps_total:
            return f"its step count advanced by {after.steps_total - before.steps_total:.0f} in {elapsed_s:.1f}s"
        if after.steps_total < before.steps_total:
            return None
    if before.cache_usage is not None and after.cache_usage is not None and after.cache_usage > before.cache_usage:
        return (f"its KV cache usage went from {before.cache_usage * 100:.4g}% to {after.cache_usage * 100:.4g}% "
                f"in {elapsed_s:.1f}s")
    return None


GENERATION_OK = "generation ok"


def decide_start_check(canary_ok: bool, canary_stalled: bool, before: EngineCounters | None,
                       after: EngineCounters | None) -> str | None:
    """Whether a starting engine is ready after one start check: the reason, or None (not yet).

    Ready when the check's own generation succeeded. Ready too when it stalled (with the check's
    time limits, before any token) because it was queued behind other clients' requests: the engine says
    so itself, with requests waiting for a slot (``requests_waiting``) at the end of the check
    while its step count advanced during it. A check that failed otherwise (an HTTP error, a
    wrong model name, a stream broken off) is never made good by other clients' traffic.
    """
    if canary_ok:
        return GENERATION_OK
    if not canary_stalled or after is None or not after.requests_waiting or after.requests_waiting < 1:
        return None
    ran = steps_advanced(before, after)
    if ran is None:
        return None
    waiting = int(after.requests_waiting)
    return (f"generating for other clients ({ran}, {waiting} request{'s' if waiting != 1 else ''} waiting "
            "for a slot) while the start check's own generation waited its turn")


def newest_progress(token_s: float | None, canary_ok_s: float | None, prefill_s: float | None,
                    counters_s: float | None) -> tuple[str | None, float | None]:
    """The newest engine-side progress from each source's latest: (source, at_s), or (None, None)."""
    candidates = [(at_s, source) for at_s, source in ((token_s, "stream"), (canary_ok_s, "canary"),
                                                      (prefill_s, "prefill"), (counters_s, "counters"))
                  if at_s is not None]
    if not candidates:
        return None, None
    at_s, source = max(candidates)
    return source, at_s


def latest_progress(evidence: ProgressEvidence) -> tuple[str | None, float | None]:
    """The newest engine-side progress: (source, at_s), or (None, None) if none in this run."""
    counters_s = _counter_advances(evidence.counters) if evidence.counters_per_step else None
    return newest_progress(evidence.last_token_s, evidence.last_canary_ok_s, evidence.last_prefill_s, counters_s)


def progress_or_busy_s(token_s: float | None, canary_ok_s: float | None, prefill_s: float | None,
                       counters_s: float | None, *, loading: bool, now_s: float) -> float | None:
    """When the engine last showed progress, for a stream waiting on it (the gateway asks per stream tick):
    the newest of its sources' latest (``newest_progress``), or now while it loads its model: busy, not silent,
    as ``assess_progress`` calls it ``loading``, not hung."""
    if loading:
        return now_s
    return newest_progress(token_s, canary_ok_s, prefill_s, counters_s)[1]


def assess_progress(evidence: ProgressEvidence, stall_s: float, now_s: float) -> ProgressVerdict:
    """Hung only when no source shows engine-side progress for ``stall_s`` and one shows silence.

    The verdict's ``source`` and ``silent_s`` name the evidence; ``phase`` is what status shows.
    """
    require(stall_s > 0, f"stall_s must be > 0 seconds, got {stall_s!r}")
    progress_source, progress_s = latest_progress(evidence)
    if evidence.zombie:
        return ProgressVerdict(True, "hung", "process", None,
                               f"zombie: pid {evidence.root_pid} exited but was not reaped",
                               progress_source, progress_s)
    if evidence.process_stopped:
        return ProgressVerdict(True, "hung", "process", None, "process stopped (SIGSTOP)",
                               progress_source, progress_s)
    if evidence.loading:
        return ProgressVerdict(False, "loading", None, None, "loading the model",
                               progress_source, progress_s)
    # Silence counts from the latest progress (or from when watching began): a token, a good
    # canary or an advancing per-step counter in the last stall_s voids every silence.
    quiet_since_s = progress_s if progress_s is not None else evidence.watch_since_s
    silent_s = now_s - quiet_since_s
    recent = progress_s is not None and silent_s < stall_s
    phase = "generating" if recent else "idle"
    if recent:
        return ProgressVerdict(False, phase, None, silent_s, None, progress_source, progress_s)
    for silence in evidence.silences:
        if progress_s is not None and silence.at_s < progress_s:
            continue  # progress came after this silence was seen: it is void
        quiet_s = now_s - max(silence.since_s, progress_s if progress_s is not None else silence.since_s)
        if quiet_s < stall_s:
            continue
        detail = silence.detail or f"{silence.source} silent"
        return ProgressVerdict(True, "hung", silence.source, quiet_s,
                               f"{detail}: no engine-side progress from any source for {quiet_s:.1f}s",
                               progress_source, progress_s)
    if evidence.counters_per_step and evidence.counter_silence:
        stalled = _counters_stall(evidence.counters, max(stall_s, evidence.gauge_stale_s), now_s)
        if stalled is not None:
            return ProgressVerdict(True, "hung", "counters", silent_s,
                                   f"{stalled} (per-step counter), and no token or canary either",
                                   progress_source, progress_s)
    return ProgressVerdict(False, phase, None, silent_s, None, progress_source, progress_s)


__all__ = [
    "PROGRESS_SOURCES",
    "SILENCE_SOURCES",
    "ProgressEvidence",
    "ProgressVerdict",
    "Silence",
    "assess_progress",
    "latest_progress",
    "newest_progress",
    "progress_or_busy_s",
    "DegradedAssessment",
    "HealthSettings",
    "ThroughputBaseline",
    "ThroughputTracker",
    "assess_degraded",
    "band_label",
    "band_low",
    "band_threshold",
    "concurrency_band",
    "counter_prefill",
    "decide_degraded_restart",
    "decide_hang_restart",
    "hang_cleared",
    "hang_episode_since",
    "hang_relapse_may_follow",
    "decide_start_check",
    "decode_rate_sample",
    "learn_baseline",
    "mean_in_flight",
    "mean_reported_running",
    "prefill_beside",
    "sample_concurrency",
    "rolling_rate",
    "steps_advanced",
    "GENERATION_OK",
    "HUNG_CANARY_EVERY_S",
    "MAX_BAND",
    "MIN_SAMPLE_DECODE_S",
    "MIN_SAMPLE_TOKENS",
    "PREFILL_COUNTS_BYTES",
    "PREFILL_COUNTS_TOKENS",
    "canary_due",
    "canary_sample_rate",
    "prefill_counts",
    "quiet_interval",
    "requests_beside",
    "stream_decode_rate",
]

