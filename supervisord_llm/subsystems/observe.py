"""What the daemon remembers for people watching it (room: operate): an hour of history per engine
and the counters and histograms Prometheus scrapes.

- ``History`` keeps, per engine, one sample every ``interval_s`` for the last ``span_s`` (an hour
  by default): state, tokens/s and its baseline, RSS. The status page's charts and
  ``llmctl status --watch``'s sparklines draw from it. It lives in memory: a restarted daemon
  starts a new hour.
- ``Telemetry`` holds the monotonic series a fleet dashboard needs, which a snapshot of the
  status cannot give: requests, tokens and stalls as counters, time to first token and request
  duration as histograms. Engine restarts are a counter too, read from the persisted restart
  count. They reset when the daemon restarts, which Prometheus's ``rate()`` handles.

Both are fed from what the daemon already sees: the gateway's finished requests and the event
stream (``engine.state_changed`` into ``hung``/``degraded`` counts a stall). Nothing here
decides anything.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily, Metric

from supervisord_llm.extension import Extension

if TYPE_CHECKING:
    from supervisord_llm.gateway.protocol import RequestStats


class Observed(Protocol):
    """**Protocol:** what watching needs of the daemon: its status, its event stream and its log."""

    @property
    def events(self) -> Any: ...

    @property
    def log(self) -> Any: ...

    def status(self) -> dict[str, Any]: ...

PREFIX = "supervisord_llm"

# ``*_created`` timestamps per series double the scrape for no use on a dashboard.
disable_created_metrics()

# Buckets for a local model: a token in milliseconds when warm, tens of seconds for a long prompt
# on a Mac, minutes for a long answer.
TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass(frozen=True, slots=True)
class Sample:
    at_wall: float
    state: str
    tokens_per_s: float | None
    baseline_tokens_per_s: float | None
    rss_bytes: int | None


class History:
    """The last ``span_s`` of each engine, one ``Sample`` per ``interval_s``."""

    def __init__(self, span_s: float = 3600.0, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._keep = max(2, int(span_s / interval_s))
        self._engines: dict[str, deque[Sample]] = {}

    def record(self, status: dict[str, Any], at_wall: float) -> None:
        for engine in status.get("engines", []):
            memory = engine.get("memory") or {}
            samples = self._engines.setdefault(engine["name"], deque(maxlen=self._keep))
            samples.append(Sample(at_wall, engine["state"], engine.get("tokens_per_s"),
                                  engine.get("baseline_tokens_per_s"), memory.get("rss_bytes")))

    def export(self) -> dict[str, Any]:
        """``{"interval_s", "engines": {name: {"at": [...], "state": [...], "tokens_per_s": [...], ...}}}``."""
        engines = {}
        for name, samples in self._engines.items():
            engines[name] = {
                "at": [round(s.at_wall, 1) for s in samples],
                "state": [s.state for s in samples],
                "tokens_per_s": [s.tokens_per_s for s in samples],
                "baseline_tokens_per_s": [s.baseline_tokens_per_s for s in samples],
                "rss_bytes": [s.rss_bytes for s in samples],
            }
        return {"interval_s": self.interval_s, "engines": engines}


class Telemetry:
    """Counters and histograms that only grow (until the daemon restarts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("engine",)
        self.requests = Counter(f"{PREFIX}_gateway_requests", "requests the gateway finished, by how they ended",
                                ("engine", "ended"), registry=self.registry)
        self.tokens = Counter(f"{PREFIX}_gateway_generated_tokens", "tokens generated through the gateway",
                              labels, registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_gateway_time_to_first_token_seconds",
                              "time from sending a request to the engine to its first token", labels,
                              buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.duration = Histogram(f"{PREFIX}_gateway_request_duration_seconds",
                                  "time from sending a request to the engine to its last byte", labels,
                                  buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.stalls = Counter(f"{PREFIX}_engine_stalls", "verdicts against the engine: hung or degraded",
                              ("engine", "verdict"), registry=self.registry)

    def request_finished(self, stats: RequestStats) -> None:
        self.requests.labels(stats.engine, stats.ended).inc()
        if stats.tokens:
            self.tokens.labels(stats.engine).inc(stats.tokens)
        if stats.ttft_s is not None:
            self.ttft.labels(stats.engine).observe(max(0.0, stats.ttft_s))
        if stats.duration_s is not None:
            self.duration.labels(stats.engine).observe(max(0.0, stats.duration_s))

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "engine.state_changed" and event.get("to") in ("hung", "degraded") \
                and event.get("from") != event.get("to"):
            self.stalls.labels(str(event.get("engine")), str(event["to"])).inc()


class StatusCollector:
    """Series derived from one status document at scrape time that are counters by nature."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(f"{PREFIX}_engine_restarts",
                                       "automatic and manual restarts of the engine (persisted across daemon restarts)",
                                       labels=("engine",))
        for engine in self.status.get("engines", []):
            restarts.add_metric((engine["name"],), float(engine.get("restarts") or 0))
        yield restarts
        refused = CounterMetricFamily(f"{PREFIX}_gateway_refused", "requests the gateway refused, by why "
                                      "(path, method, key, invalid_json, invalid_model, origin, host, body_timeout, body_too_large, header_timeout, swap, queue_full, queue_timeout, connections)", labels=("reason",))
        for reason, count in ((self.status.get("gateway") or {}).get("refused") or {}).items():
            refused.add_metric((reason,), float(count))
        yield refused
        # Lifetime counts that were only gauges (supervisord_llm_alerts_delivered, ..., kept for existing
        # dashboards): the same counts as counters (``*_total``), for rate() and increase().
        alerts = self.status.get("alerts") or {}
        for key, what in (("delivered", "alert deliveries a webhook accepted"),
                          ("failed", "alert deliveries dropped undelivered (a 4xx answer, or out of attempts)")):
            family = CounterMetricFamily(f"{PREFIX}_alerts_{key}",
                                         f"{what}, over the outbox's lifetime (persisted across daemon restarts)")
            family.add_metric((), float(alerts.get(key) or 0))
            yield family
        gateway = self.status.get("gateway")
        if gateway:
            cut = CounterMetricFamily(f"{PREFIX}_gateway_clients_cut",
                                      "clients cut for not reading their stream within client_timeout_s "
                                      "(starts again at 0 when the gateway process restarts)")
            cut.add_metric((), float(gateway.get("clients_cut") or 0))
            yield cut
        daemon = self.status.get("daemon", {})
        info = InfoMetricFamily(f"{PREFIX}_daemon", "the daemon: version and host (join on instance)")
        info.add_metric((), {"version": str(daemon.get("version", "")), "hostname": socket.gethostname()})
        yield info


class ObserveExtension(Extension):
    """Feeds ``History`` every ``interval_s`` and ``Telemetry`` from the event stream."""

    name = "observe"

    def __init__(self, daemon: Observed, *, interval_s: float = 10.0, span_s: float = 3600.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.daemon = daemon
        self.history = History(span_s=span_s, interval_s=interval_s)
        self.telemetry = Telemetry()
        self._wall = wall

    def sample(self) -> None:
        self.history.record(self.daemon.status(), self._wall())

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Every engine's verdict counters exist from the start, at 0: an increase() over the first hang then
        # sees it (a series that appears at 1 has no increase to show).
        for engine in self.daemon.status().get("engines", []):
            for verdict in ("hung", "degraded"):
                self.telemetry.stalls.labels(str(engine.get("name")), verdict)
        self.daemon.events.listeners.append(self.telemetry.on_event)
        task_status.started()
        while True:
            try:
                self.sample()
            except Exception as exc:  # a status that cannot be built now is a gap in a chart, not a crash
                self.daemon.log.warning("observe.sample_failed", error=str(exc))
            await anyio.sleep(self.history.interval_s)


def find(extensions: Iterable[object]) -> ObserveExtension | None:
    return next((e for e in extensions if isinstance(e, ObserveExtension)), None)
