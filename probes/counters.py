"""Engine counters: token totals and running requests read from an engine's own endpoint.

Parsers are pure (text or JSON in, :class:`EngineCounters` out); :func:`fetch_counters` does the
one HTTP GET. The rate an engine reports itself (SGLang ``sglang:gen_throughput``, oMLX
``avg_generation_tps``, a lifetime average over all requests) is read as ``tokens_per_s`` but judges
nothing: the degraded check takes one request's decode rate from two readings of a token total that
grows per decode step (vLLM, SGLang), divided by the requests running
(``policies.health.decode_rate_sample``); a total that grows when a request finishes (llama.cpp,
oMLX) gives none. :func:`rate_between` is the plain rate between two readings.

| kind     | endpoint      | generated tokens (cumulative)     | running requests              | rate reported  | steps (cumulative) | waiting requests |
|----------|---------------|-----------------------------------|-------------------------------|----------------|--------------------|------------------|
| vllm     | /metrics      | vllm:generation_tokens_total      | vllm:num_requests_running     |                | the token total    | vllm:num_requests_waiting |
| llamacpp | /metrics      | llamacpp:tokens_predicted_total   | llamacpp:requests_processing  |                | llamacpp:n_decode_total | llamacpp:requests_deferred |
| sglang   | /metrics      | sglang:realtime_tokens_total{mode="decode"} | sglang:num_running_reqs | sglang:gen_throughput | sglang:realtime_tokens_total, every mode | sglang:num_queue_reqs |
| omlx     | /api/status   | total_completion_tokens           | active_requests               | avg_generation_tps | none         | none             |

``steps_total`` is a count that grows as the engine runs its model (see
:class:`probes.readings.EngineCounters`). llama.cpp's token total grows only when a slot finishes
(``metrics_on_prediction`` in tools/server/server-context.cpp), but its ``n_decode_total`` grows
after every ``llama_decode`` call the server loop makes for any slot (``metrics_post_decode``:
``metrics.n_decode++``, same file; "excluding speculative decoding and multimodal decoding", says
its /metrics help). The server answers /metrics even while a decode runs (``yield_to_queue``), so a
long decode (a prefill batch of a large model) shows the count flat with a request running: for
llama.cpp the count is progress, never silence (``EngineAdapter.counter_silence``).
``requests_deferred`` counts the tasks llama-server holds until a slot is free (server-task.cpp,
``to_metrics``). SGLang's step count is its ``realtime_tokens_total`` over every mode: ``decode`` each
decode iteration, and ``prefill_compute`` / ``prefill_cache`` each prefill batch, so a long chunked
prefill moves it too (``SchedulerMetricsCollector.increment_realtime_tokens`` in
python/sglang/srt/metrics/collector.py). Some SGLang releases add a prefill batch's counts when it
is scheduled rather than once it ran, so there a first prefill that never completes still moves
the count once; the decode mode moves only with tokens made. vLLM's generation token total is its
only step count and does not move during a prefill: vLLM counts prompt tokens only when a
request's first token comes out (``IterationStats.update_from_output`` in vllm/v1/metrics/stats.py).
What does move is its KV cache gauge, read as ``cache_usage``: the scheduler allocates cache blocks
for every prefill chunk it schedules (``allocate_slots`` in vllm/v1/core/sched/scheduler.py
``schedule``) and returns its stats after every step, even one with no request output
(``update_from_output``: "We must return the stats even if there are no request outputs this
step"); the front end sets ``vllm:kv_cache_usage_perc`` from them (vllm/v1/metrics/loggers.py
``PrometheusStatLogger.record``). Older releases name it ``vllm:gpu_cache_usage_perc``; where both
are written the current name is read.

Prefill work, which judges which counter intervals measure decode (``policies.health.counter_prefill``):
``prompt_tokens_total`` is the prompt tokens the engine computed and ``first_tokens_total`` the requests
that got their first token (the count of its time-to-first-token histogram). vLLM counts prompt tokens
once per request, its whole prompt, in the step that makes its first token: the output processor adds
``prompt_len`` while the request ``is_prefilling`` (``IterationStats.update_from_output`` in
vllm/v1/metrics/stats.py, fed by vllm/v1/engine/output_processor.py ``process_outputs``), and the
scheduler hands out no output for a request whose prefill chunk made no token
(``Scheduler.update_from_output`` in vllm/v1/core/sched/scheduler.py appends an ``EngineCoreOutput`` only
with new tokens, a pooler output, KV transfer parameters or a stop), so a long prompt moves
``vllm:prompt_tokens_total`` by its whole length at its end and not at all while it is prefilled; the
time-to-first-token histogram is observed in the same step. Where vLLM reports
``vllm:prompt_tokens_by_source_total``, its ``local_compute`` source (the prompt less its prefix-cache
hits, ``PromptTokenStats`` in stats.py) is read instead. SGLang adds each prefill batch's computed tokens to
``sglang:realtime_tokens_total{mode="prefill_compute"}`` as it schedules it (``log_prefill_stats``, the
``increment_realtime_tokens`` call), so each chunk of a long prompt moves it; its
``sglang:time_to_first_token_seconds`` is observed by the tokenizer manager at a request's first token.

Values with several label sets (one per model, engine or data-parallel rank) are summed.
SGLang's ``generation_tokens_total`` grows only when a request finishes, so its per-iteration
``realtime_tokens_total{mode="decode"}`` is read instead (python/sglang/srt/metrics/collector.py);
an SGLang too old to have it reports no total rather than a completion-time one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from probes.errors import ProbeError, ProbeParseError, ProbeUnavailable
from probes.readings import EngineCounters

__all__ = [
    "PROMETHEUS_KINDS",
    "COUNTER_KINDS",
    "parse_prometheus_counters",
    "parse_omlx_status",
    "ollama_rate",
    "rate_between",
    "fetch_counters",
]


@dataclass(frozen=True, slots=True)
class _MetricNames:
    generated_tokens_total: str | None
    requests_running: str
    tokens_per_s: str | None = None
    generated_labels: tuple[tuple[str, str], ...] = ()  # only samples with these labels count
    # The step count, every label set summed (vLLM: its token total, which grows per step).
    steps_total: str | None = None
    requests_waiting: str | None = None
    # A label whose non-empty values break a gauge down (its total is under the empty value): SGLang's
    # queue gauges with priority scheduling (_log_gauge_queue_count: total under priority="", then
    # one sample per priority="<int>"), which a sum would count twice.
    gauge_breakdown_label: str | None = None
    # A gauge the engine sets after every step it runs, by name, newest first: the first present is read.
    cache_usage: tuple[str, ...] = ()
    # The prompt tokens the engine computed, as (name, labels a sample must have), newest first: the first
    # present is read, its label sets summed.
    prompt_tokens: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # The count of the engine's time-to-first-token histogram: requests that got their first token.
    first_tokens: str | None = None


PROMETHEUS_KINDS: Mapping[str, _MetricNames] = {
    "vllm": _MetricNames("vllm:generation_tokens_total", "vllm:num_requests_running",
                         steps_total="vllm:generation_tokens_total", requests_waiting="vllm:num_requests_waiting",
                         cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                         prompt_tokens=(("vllm:prompt_tokens_by_source_total", (("source", "local_compute"),)),
                                        ("vllm:prompt_tokens_total", ())),
                         first_tokens="vllm:time_to_first_token_seconds_count"),
    "llamacpp": _MetricNames("llamacpp:tokens_predicted_total", "llamacpp:requests_processing",
                             steps_total="llamacpp:n_decode_total", requests_waiting="llamacpp:requests_deferred"),
    "sglang": _MetricNames("sglang:realtime_tokens_total", "sglang:num_running_reqs", "sglang:gen_throughput",
                           generated_labels=(("mode", "decode"),), steps_total="sglang:realtime_tokens_total",
                           requests_waiting="sglang:num_queue_reqs", gauge_breakdown_label="priority",
                           prompt_tokens=(("sglang:realtime_tokens_total", (("mode", "prefill_compute"),)),),
                           first_tokens="sglang:time_to_first_token_seconds_count"),
}
COUNTER_KINDS = (*PROMETHEUS_KINDS, "omlx")


def _check_kind(kind: str, valid: tuple[str, ...]) -> None:
    if kind not in valid:
        raise ValueError(f"unknown engine kind {kind!r} for counters; valid: {', '.join(valid)}")


def parse_prometheus_counters(text: str, kind: str, at_s: float = 0.0) -> EngineCounters:
    """Counters from a Prometheus text exposition (``GET /metrics``) of a vLLM, llama-server or SGLang engine.

    A metric that is absent gives None. Text that is not Prometheus exposition raises
    :class:`ProbeParseError`; so does text that has none of the engine's metrics (wrong port or kind).
    """
    _check_kind(kind, tuple(PROMETHEUS_KINDS))
    names = PROMETHEUS_KINDS[kind]
    wanted = {n for n in (names.generated_tokens_total, names.requests_running, names.tokens_per_s,
                          names.steps_total, names.requests_waiting, *names.cache_usage, names.first_tokens) if n}
    sums: dict[str, float] = {}
    steps: float | None = None  # every label set of the step metric (SGLang: all its modes)
    prompts: dict[int, float] = {}  # by its place in names.prompt_tokens
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == names.steps_total and math.isfinite(sample.value):
                    steps = (steps or 0.0) + sample.value
                for i, (name, labels) in enumerate(names.prompt_tokens):
                    if (sample.name == name and math.isfinite(sample.value)
                            and all(sample.labels.get(k) == v for k, v in labels)):
                        prompts[i] = prompts.get(i, 0.0) + sample.value
                if (names.gauge_breakdown_label and sample.name in (names.requests_running, names.requests_waiting)
                        and sample.labels.get(names.gauge_breakdown_label)):
                    continue  # one priority's share: the total is its own sample
                if sample.name == names.generated_tokens_total and any(
                    sample.labels.get(k) != v for k, v in names.generated_labels
                ):
                    continue
                if sample.name in wanted and math.isfinite(sample.value):
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        first = text.strip().splitlines()[0][:80] if text.strip() else ""
        raise ProbeParseError(
            f"{kind} /metrics is not Prometheus text exposition ({exc}); first line {first!r}; "
            "expected lines like 'name{label=\"v\"} 1.0'"
        ) from exc
    if not sums and steps is None:
        raise ProbeParseError(
            f"{kind} /metrics has none of {', '.join(sorted(wanted))}; is this the right port and engine kind?"
        )
    return EngineCounters(
        at_s=at_s,
        generated_tokens_total=sums.get(names.generated_tokens_total) if names.generated_tokens_total else None,
        requests_running=sums.get(names.requests_running),
        tokens_per_s=sums.get(names.tokens_per_s) if names.tokens_per_s else None,
        steps_total=steps,
        requests_waiting=sums.get(names.requests_waiting) if names.requests_waiting else None,
        cache_usage=next((sums[n] for n in names.cache_usage if n in sums), None),
        prompt_tokens_total=prompts[min(prompts)] if prompts else None,
        first_tokens_total=sums.get(names.first_tokens) if names.first_tokens else None,
    )


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_omlx_status(json_obj: Any, at_s: float = 0.0) -> EngineCounters:
    """Counters from oMLX's ``GET /api/status`` (or ``/api/stats``) JSON object.

    ``avg_generation_tps`` is oMLX's lifetime average over all requests; ``total_completion_tokens``
    grows when a request finishes, so neither is a current decode rate.
    """
    if not isinstance(json_obj, Mapping):
        raise ProbeParseError(
            f"oMLX /api/status answered {type(json_obj).__name__}; expected a JSON object with avg_generation_tps"
        )
    running = _number(json_obj, "active_requests")
    active_models = json_obj.get("active_models")
    if running is None and isinstance(active_models, Mapping):
        running = _number(active_models, "total_active_requests")
    counters = EngineCounters(
        at_s=at_s,
        generated_tokens_total=_number(json_obj, "total_completion_tokens"),
        requests_running=running,
        tokens_per_s=_number(json_obj, "avg_generation_tps"),
    )
    if counters.generated_tokens_total is None and counters.tokens_per_s is None:
        raise ProbeParseError(
            "oMLX /api/status has neither avg_generation_tps nor total_completion_tokens; "
            f"keys present: {', '.join(sorted(map(str, json_obj))[:20]) or '(none)'}"
        )
    return counters


def ollama_rate(eval_count: int | None, eval_duration_ns: int | None) -> float | None:
    """Ollama's decode rate: ``eval_count`` tokens over ``eval_duration`` nanoseconds; None if either is missing or zero."""
    if not eval_count or not eval_duration_ns or eval_count < 0 or eval_duration_ns <= 0:
        return None
    return eval_count / (eval_duration_ns / 1e9)


def rate_between(a: EngineCounters, b: EngineCounters) -> float | None:
    """Tokens/s between two cumulative readings (``a`` earlier); None when it cannot be told.

    None when a total is missing, the readings are not in time order, or the counter went down
    (the engine restarted and its counters began again).
    """
    if a.generated_tokens_total is None or b.generated_tokens_total is None:
        return None
    elapsed_s = b.at_s - a.at_s
    delta = b.generated_tokens_total - a.generated_tokens_total
    if elapsed_s <= 0 or delta < 0:
        return None
    return delta / elapsed_s


async def fetch_counters(
    client: httpx.AsyncClient, base_url: str, kind: str, at_s: float, *, timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> EngineCounters:
    """GET the engine's counters endpoint and parse it (``headers``: the API key oMLX's /api/status needs when set).

    Raises :class:`ProbeUnavailable` when the endpoint does not exist (llama-server serves
    /metrics only with ``--metrics``), :class:`ProbeError` for other HTTP failures and
    :class:`ProbeParseError` for an answer of the wrong shape.
    """
    _check_kind(kind, COUNTER_KINDS)
    path = "/api/status" if kind == "omlx" else "/metrics"
    url = base_url.rstrip("/") + path
    try:
        response = await client.get(url, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        raise ProbeError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code in (404, 501):
        hint = " (start llama-server with --metrics)" if kind == "llamacpp" else ""
        raise ProbeUnavailable(f"{url} answered {response.status_code}: this engine does not serve counters there{hint}")
    if response.status_code != 200:
        raise ProbeError(f"GET {url} answered HTTP {response.status_code}: {response.text.strip()[:200]}")
    if kind == "omlx":
        try:
            payload = response.json()
        except ValueError as exc:
            raise ProbeParseError(f"{url} did not answer JSON: {response.text.strip()[:120]!r}") from exc
        return parse_omlx_status(payload, at_s)
    return parse_prometheus_counters(response.text, kind, at_s)
