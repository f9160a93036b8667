"""History for the status page and sparklines; counters and histograms from finished requests and verdicts."""

from __future__ import annotations

from prometheus_client import generate_latest

from supervisord_llm.cli import sparkline
from supervisord_llm.gateway.proxy import RequestStats
from supervisord_llm.subsystems.observe import History, Telemetry


def _status(state: str, tps: float | None) -> dict:
    return {"engines": [{"name": "tiny", "state": state, "tokens_per_s": tps, "baseline_tokens_per_s": 500.0,
                         "memory": {"rss_bytes": 1000}}]}


def test_history_keeps_only_the_last_span() -> None:
    """An hour at one sample per 10 s is 360 samples; older ones fall off."""
    history = History(span_s=3600, interval_s=10)
    for i in range(400):
        history.record(_status("ready", float(i)), at_wall=1000.0 + 10 * i)
    tiny = history.export()["engines"]["tiny"]
    assert len(tiny["at"]) == 360
    assert tiny["tokens_per_s"][0] == 40.0 and tiny["tokens_per_s"][-1] == 399.0


def test_sparkline_scales_to_the_top_rate_and_marks_states_without_generation() -> None:
    """Bars rise with tokens/s; a hung sample is '!' and a backoff sample '~', whatever the rate."""
    line = sparkline([100.0, 500.0, None, 250.0, 0.0], ["ready", "ready", "hung", "degraded", "backoff"])
    assert line.startswith("▂█!▅~")
    assert line.endswith("0 tok/s")


def test_telemetry_counts_requests_tokens_and_stalls() -> None:
    """Requests by ending, tokens, TTFT and duration histograms, and hung/degraded verdicts become counters."""
    t = Telemetry()
    t.request_finished(RequestStats(engine="tiny", ttft_s=0.2, tokens=30, decode_s=0.5, max_gap_s=0.05,
                                    ended="complete", duration_s=0.7))
    t.request_finished(RequestStats(engine="tiny", ttft_s=None, tokens=0, decode_s=None, max_gap_s=None,
                                    ended="client_disconnected", duration_s=None))
    t.on_event({"kind": "engine.state_changed", "engine": "tiny", "from": "ready", "to": "hung"})
    t.on_event({"kind": "engine.state_changed", "engine": "tiny", "from": "hung", "to": "hung"})
    text = generate_latest(t.registry).decode()
    assert 'supervisord_llm_gateway_requests_total{ended="complete",engine="tiny"} 1.0' in text
    assert 'supervisord_llm_gateway_requests_total{ended="client_disconnected",engine="tiny"} 1.0' in text
    assert 'supervisord_llm_gateway_generated_tokens_total{engine="tiny"} 30.0' in text
    assert 'supervisord_llm_gateway_time_to_first_token_seconds_bucket{engine="tiny",le="0.25"} 1.0' in text
    assert 'supervisord_llm_gateway_request_duration_seconds_count{engine="tiny"} 1.0' in text
    assert 'supervisord_llm_engine_stalls_total{engine="tiny",verdict="hung"} 1.0' in text
