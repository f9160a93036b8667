"""Engine counters: Prometheus /metrics of vLLM, llama-server and SGLang, oMLX /api/status, Ollama's rate, and rates between readings."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from probes.counters import (
    fetch_counters,
    ollama_rate,
    parse_omlx_status,
    parse_prometheus_counters,
    rate_between,
)
from probes.errors import ProbeError, ProbeParseError, ProbeUnavailable
from probes.readings import EngineCounters
from tests.helpers import FIXTURES

METRICS = FIXTURES / "metrics"


def test_vllm_counters_are_summed_over_engines() -> None:
    """vLLM's generation token counter and running requests are summed over its data-parallel engines."""
    counters = parse_prometheus_counters((METRICS / "vllm.txt").read_text(), "vllm", at_s=4.0)
    assert counters == EngineCounters(
        at_s=4.0, generated_tokens_total=120345.0 + 118655.0, requests_running=5.0, tokens_per_s=None,
        steps_total=120345.0 + 118655.0,  # vLLM's token total grows per decode step: it is the step count
        requests_waiting=0.0 + 1.0,  # vllm:num_requests_waiting, summed the same way
        cache_usage=0.1834 + 0.1201,  # vllm:kv_cache_usage_perc, set after every engine step
        prompt_tokens_total=482113.0 + 470022.0,  # vllm:prompt_tokens_total, counted at each first token
        first_tokens_total=1410.0,  # the count of vllm:time_to_first_token_seconds
    )


def test_vllm_prompt_tokens_computed_are_read_by_source_where_it_reports_them() -> None:
    """Where vLLM reports prompt tokens by source, the ones it computed (``local_compute``) are read, not the
    prefix-cache hits nor the whole prompts of vllm:prompt_tokens_total; its first tokens are the count of
    its time-to-first-token histogram, summed over its engines."""
    text = (METRICS / "vllm.txt").read_text() + (
        '# TYPE vllm:prompt_tokens_by_source_total counter\n'
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 300000.0\n'
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 182113.0\n'
        'vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="local_compute"} 270022.0\n'
        'vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="external_kv_transfer"} 0.0\n'
        '# TYPE vllm:time_to_first_token_seconds histogram\n'
        'vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 1390.0\n'
        'vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 700.5\n'
    )
    counters = parse_prometheus_counters(text, "vllm")
    assert counters.prompt_tokens_total == 300000.0 + 270022.0
    assert counters.first_tokens_total == 1410.0 + 1390.0


def test_sglang_prompt_tokens_computed_are_its_prefill_compute_tokens() -> None:
    """SGLang's prompt tokens computed are realtime_tokens_total{mode="prefill_compute"}, which grows with
    each prefill batch (every chunk of a long prompt): not its cache hits, its decode, nor
    sglang:prompt_tokens_total (counted when a request finishes); its first tokens are the count of its
    time-to-first-token histogram."""
    text = (METRICS / "sglang.txt").read_text()
    counters = parse_prometheus_counters(text, "sglang")
    assert (counters.prompt_tokens_total, counters.first_tokens_total) == (402311.0, None)
    chunk = text.replace('mode="prefill_compute",model_name="meta-llama/Llama-3.1-8B-Instruct"} 402311.0',
                         'mode="prefill_compute",model_name="meta-llama/Llama-3.1-8B-Instruct"} 410503.0')
    chunk += ('# TYPE sglang:time_to_first_token_seconds histogram\n'
              'sglang:time_to_first_token_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 812.0\n')
    after = parse_prometheus_counters(chunk, "sglang")
    assert (after.prompt_tokens_total, after.first_tokens_total) == (410503.0, 812.0)


def test_vllm_cache_usage_under_its_older_name() -> None:
    """vLLM releases before kv_cache_usage_perc called the gauge gpu_cache_usage_perc; where both are
    written (the old one as a hidden deprecated metric) the current one is read, not their sum."""
    text = (METRICS / "vllm.txt").read_text()
    older = text.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert parse_prometheus_counters(older, "vllm").cache_usage == pytest.approx(0.1834 + 0.1201)
    both = text + 'vllm:gpu_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-30B-A3B"} 0.5\n'
    assert parse_prometheus_counters(both, "vllm").cache_usage == pytest.approx(0.1834 + 0.1201)
    # llama.cpp and SGLang have a step count of their own: no cache gauge is read there
    assert parse_prometheus_counters((METRICS / "llamacpp.txt").read_text(), "llamacpp").cache_usage is None


def test_llamacpp_counters() -> None:
    """llama-server's tokens_predicted_total and requests_processing are read; its lifetime average is not taken as a rate."""
    counters = parse_prometheus_counters((METRICS / "llamacpp.txt").read_text(), "llamacpp")
    assert (counters.generated_tokens_total, counters.requests_running, counters.tokens_per_s) == (20.0, 0.0, None)


def test_llamacpp_step_count_is_n_decode_total_not_the_completion_time_token_total() -> None:
    """llama-server's step count is n_decode_total (every llama_decode call), never tokens_predicted_total,
    which grows only when a slot finishes; a llama-server without n_decode_total has no step count."""
    text = (METRICS / "llamacpp.txt").read_text().replace("llamacpp:n_decode_total 20", "llamacpp:n_decode_total 57")
    assert parse_prometheus_counters(text, "llamacpp").steps_total == 57.0
    # requests_deferred: the tasks llama-server holds until a slot is free
    deferred = text.replace("llamacpp:requests_deferred 0", "llamacpp:requests_deferred 3")
    assert parse_prometheus_counters(deferred, "llamacpp").requests_waiting == 3.0
    older = "\n".join(line for line in text.splitlines() if "n_decode_total" not in line)
    counters = parse_prometheus_counters(older, "llamacpp")
    assert (counters.generated_tokens_total, counters.steps_total) == (20.0, None)


def test_sglang_step_count_moves_with_a_long_prefill_too() -> None:
    """SGLang's tokens are its decode-mode realtime tokens; its step count adds the prefill modes, which
    grow each prefill batch, so a long chunked prefill with no decode is progress."""
    text = (METRICS / "sglang.txt").read_text()
    before = parse_prometheus_counters(text, "sglang")
    assert before.generated_tokens_total == 93518.0 and before.steps_total == 402311.0 + 120007.0 + 93518.0
    chunk = text.replace('mode="prefill_compute",model_name="meta-llama/Llama-3.1-8B-Instruct"} 402311.0',
                         'mode="prefill_compute",model_name="meta-llama/Llama-3.1-8B-Instruct"} 410503.0')
    after = parse_prometheus_counters(chunk, "sglang")
    assert after.generated_tokens_total == before.generated_tokens_total
    assert after.steps_total == before.steps_total + 8192.0


def test_sglang_priority_breakdown_of_its_queue_gauges_is_not_counted_twice() -> None:
    """With priority scheduling SGLang writes each queue gauge's total under priority="" and then one sample
    per priority (_log_gauge_queue_count): the totals are read, the breakdown is not added to them."""
    text = (
        '# TYPE sglang:num_running_reqs gauge\n'
        'sglang:num_running_reqs{model_name="m",priority=""} 3.0\n'
        'sglang:num_running_reqs{model_name="m",priority="0"} 2.0\n'
        'sglang:num_running_reqs{model_name="m",priority="1"} 1.0\n'
        '# TYPE sglang:num_queue_reqs gauge\n'
        'sglang:num_queue_reqs{model_name="m",priority=""} 4.0\n'
        'sglang:num_queue_reqs{model_name="m",priority="1"} 4.0\n'
        '# TYPE sglang:realtime_tokens_total counter\n'
        'sglang:realtime_tokens_total{mode="decode",model_name="m"} 50.0\n'
    )
    counters = parse_prometheus_counters(text, "sglang")
    assert (counters.requests_running, counters.requests_waiting) == (3.0, 4.0)
    # Without priority scheduling there is no priority label: the gauges read as they are.
    plain = parse_prometheus_counters((METRICS / "sglang.txt").read_text(), "sglang")
    assert plain.requests_running == 4.0


def test_omlx_completion_total_is_no_step_count() -> None:
    """oMLX's total_completion_tokens grows when a request finishes: no step count."""
    counters = parse_omlx_status(json.loads((METRICS / "omlx-status.json").read_text()), at_s=2.0)
    assert counters.generated_tokens_total is not None and counters.steps_total is None


def test_sglang_reports_its_own_rate() -> None:
    """SGLang's gen_throughput is the engine's own tokens/s; num_running_reqs is the running requests."""
    counters = parse_prometheus_counters((METRICS / "sglang.txt").read_text(), "sglang")
    assert counters.tokens_per_s == pytest.approx(187.46)
    assert counters.requests_running == 4.0
    assert counters.generated_tokens_total == 93518.0  # realtime decode tokens, not the completion-time total


def test_sglang_total_is_the_per_step_decode_counter_not_the_completion_total() -> None:
    """SGLang's token total comes from realtime_tokens_total{mode="decode"}; without it there is none."""
    text = (METRICS / "sglang.txt").read_text()
    without = "\n".join(line for line in text.splitlines() if "realtime_tokens_total" not in line) + "\n"
    counters = parse_prometheus_counters(without, "sglang")
    assert counters.generated_tokens_total is None and counters.requests_running == 4.0


def test_wrong_kind_for_the_text_is_refused() -> None:
    """Reading vLLM metrics as llama-server's says none of llama-server's metrics are there (wrong port or kind)."""
    with pytest.raises(ProbeParseError, match="llamacpp:tokens_predicted_total"):
        parse_prometheus_counters((METRICS / "vllm.txt").read_text(), "llamacpp")


def test_html_is_not_prometheus() -> None:
    """An HTML error page on /metrics is refused, quoting its first line."""
    with pytest.raises(ProbeParseError, match="not Prometheus text.*<html>"):
        parse_prometheus_counters("<html><body>Bad Gateway</body></html>\n", "vllm")


def test_unknown_kind_lists_the_valid_ones() -> None:
    """An unknown engine kind is a ValueError listing the kinds that have counters."""
    with pytest.raises(ValueError, match="valid: vllm, llamacpp, sglang"):
        parse_prometheus_counters("", "ollama")


def test_omlx_status() -> None:
    """oMLX's status gives its lifetime average rate, the cumulative completion tokens and active requests."""
    counters = parse_omlx_status(json.loads((METRICS / "omlx-status.json").read_text()), at_s=2.0)
    assert counters == EngineCounters(at_s=2.0, generated_tokens_total=92500.0, requests_running=1.0, tokens_per_s=22.1)


def test_omlx_stats_shape_with_nested_active_requests() -> None:
    """The /api/stats shape (active requests under active_models) is understood too."""
    counters = parse_omlx_status({"avg_generation_tps": 35.5, "active_models": {"total_active_requests": 2}})
    assert (counters.tokens_per_s, counters.requests_running, counters.generated_tokens_total) == (35.5, 2.0, None)


@pytest.mark.parametrize("payload", [[], "ok", {"status": "ok"}, {"avg_generation_tps": "fast"}])
def test_omlx_status_without_numbers_is_refused(payload: object) -> None:
    """An oMLX answer without a rate or token total is refused, naming the fields that were expected."""
    with pytest.raises(ProbeParseError, match="avg_generation_tps"):
        parse_omlx_status(payload)


def test_ollama_rate_from_the_final_stream_line() -> None:
    """Ollama's eval_count over eval_duration (ns) gives tokens/s: 16 tokens in 0.25 s is 64 tok/s."""
    final = json.loads((METRICS / "ollama-generate-final.json").read_text())
    assert ollama_rate(final["eval_count"], final["eval_duration"]) == pytest.approx(16 / 0.250012)
    assert ollama_rate(16, 0) is None
    assert ollama_rate(None, 10) is None
    assert ollama_rate(0, 10) is None


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (EngineCounters(10.0, 1000.0), EngineCounters(12.0, 1100.0), 50.0),
        (EngineCounters(10.0, 1000.0), EngineCounters(12.0, 1000.0), 0.0),  # idle engine: 0 tok/s
        (EngineCounters(10.0, 1000.0), EngineCounters(12.0, 40.0), None),  # engine restarted: counter reset
        (EngineCounters(10.0, 1000.0), EngineCounters(10.0, 1100.0), None),  # no time passed
        (EngineCounters(12.0, 1000.0), EngineCounters(10.0, 1100.0), None),  # out of order
        (EngineCounters(10.0, None), EngineCounters(12.0, 1100.0), None),
    ],
)
def test_rate_between_two_cumulative_readings(a: EngineCounters, b: EngineCounters, expected: float | None) -> None:
    """The rate is the counter's growth over the time between readings; a reset or bad order gives no rate."""
    assert rate_between(a, b) == expected


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, str]] = {}

    def do_GET(self) -> None:  # noqa: N802
        status, content_type, body = self.routes.get(self.path, (404, "text/plain", "Not Found"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict]]:
    """A real HTTP server on 127.0.0.1 answering the routes a test sets."""
    routes: dict[str, tuple[int, str, str]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_fetch_counters_over_http(endpoint) -> None:
    """Counters are fetched from /metrics (vLLM) and /api/status (oMLX) over real HTTP."""
    base_url, routes = endpoint
    routes["/metrics"] = (200, "text/plain; version=0.0.4", (METRICS / "vllm.txt").read_text())
    routes["/api/status"] = (200, "application/json", (METRICS / "omlx-status.json").read_text())
    async with httpx.AsyncClient() as client:
        vllm = await fetch_counters(client, base_url + "/", "vllm", at_s=1.5)
        omlx = await fetch_counters(client, base_url, "omlx", at_s=2.5)
    assert (vllm.at_s, vllm.generated_tokens_total) == (1.5, 239000.0)
    assert (omlx.at_s, omlx.tokens_per_s) == (2.5, 22.1)


@pytest.mark.anyio
async def test_llamacpp_without_metrics_flag_says_how_to_enable_it(endpoint) -> None:
    """A llama-server started without --metrics answers 404/501; the probe says it is unavailable and how to fix it."""
    base_url, routes = endpoint
    routes["/metrics"] = (501, "application/json", '{"error":{"code":501,"message":"This server does not support metrics endpoint."}}')
    async with httpx.AsyncClient() as client:
        with pytest.raises(ProbeUnavailable, match="--metrics"):
            await fetch_counters(client, base_url, "llamacpp", at_s=0.0)


@pytest.mark.anyio
async def test_fetch_errors_are_probe_errors(endpoint) -> None:
    """A server error or a refused connection becomes a ProbeError naming the URL."""
    base_url, routes = endpoint
    routes["/metrics"] = (503, "text/plain", "engine dead")
    async with httpx.AsyncClient() as client:
        with pytest.raises(ProbeError, match="HTTP 503: engine dead"):
            await fetch_counters(client, base_url, "sglang", at_s=0.0)
        with pytest.raises(ProbeError, match="127.0.0.1:1/metrics"):
            await fetch_counters(client, "http://127.0.0.1:1", "vllm", at_s=0.0)
