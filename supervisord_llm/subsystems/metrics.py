"""Prometheus metrics, on the control socket (``GET /metrics``) and optionally on a loopback TCP port.

Room: subsystems.

The TCP listener (``[daemon] metrics_listen = "127.0.0.1:9464"``) also serves ``/healthz`` (the
daemon's loop is alive) and ``/readyz`` (no engine is failed, hung, in its restart backoff or refused a start,
and the gateway is not dying again and again: ``gateway.down``), for Kubernetes probes.
Each scrape builds a fresh registry from the daemon's status: no counters drift from the truth.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from supervisord_llm.engine.supervisor import EngineState
from supervisord_llm.extension import Extension

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon

PREFIX = "supervisord_llm"


class _Registered:
    """Another registry's series, served inside this scrape's registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


def render_metrics(daemon: Daemon) -> tuple[bytes, str]:
    from supervisord_llm.subsystems import observe

    doc = daemon.status()
    registry = CollectorRegistry()
    registry.register(observe.StatusCollector(doc))
    extension = observe.find(daemon.extensions)
    if extension is not None:
        registry.register(_Registered(extension.telemetry.registry))

    def gauge(name: str, doc_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc_text, labels, registry=registry)

    state = gauge("engine_state", "1 for the engine's current state, 0 for the others", ("engine", "state"))
    tps = gauge("engine_tokens_per_second",
                "one request's decode rate in the last window, at the concurrency the degraded check judged",
                ("engine",))
    base = gauge("engine_baseline_tokens_per_second",
                 "what that rate was judged against: the baseline learned at that concurrency", ("engine",))
    ttft = gauge("engine_canary_ttft_seconds", "time to first token of the last canary", ("engine",))
    canary_ok = gauge("engine_canary_ok", "1 if the last canary generated, else 0", ("engine",))
    rss = gauge("engine_rss_bytes", "resident memory of the engine's process tree", ("engine",))
    gpu = gauge("engine_gpu_bytes", "GPU memory held by the engine's process tree", ("engine",))
    up = gauge("engine_up", "1 if the engine is ready or degraded", ("engine",))
    refused = gauge("engine_start_refused", "1 while the engine's last start was refused (reason: memory, budget, "
                    "stranded, gpu, exclusive), also while a start tries again, until it is ready or a person stops it",
                    ("engine", "reason"))
    for e in doc["engines"]:
        name = e["name"]
        for s in EngineState:
            state.labels(name, str(s)).set(1 if e["state"] == str(s) else 0)
        up.labels(name).set(1 if e["state"] in ("ready", "degraded") else 0)
        if e.get("start_refused"):
            refused.labels(name, e["start_refused"]["reason"]).set(1)
        if e.get("tokens_per_s") is not None:
            tps.labels(name).set(e["tokens_per_s"])
        if e.get("baseline_tokens_per_s") is not None:
            base.labels(name).set(e["baseline_tokens_per_s"])
        canary = e.get("last_canary") or {}
        if canary.get("ttft_s") is not None:
            ttft.labels(name).set(canary["ttft_s"])
        if canary:
            canary_ok.labels(name).set(1 if canary.get("ok") else 0)
        mem = e.get("memory") or {}
        if mem.get("rss_bytes") is not None:
            rss.labels(name).set(mem["rss_bytes"])
        if mem.get("gpu_bytes") is not None:
            gpu.labels(name).set(mem["gpu_bytes"])
    mem = doc["system"]["memory"]
    for key in ("total_bytes", "available_bytes", "wired_bytes", "baseline_wired_bytes", "stranded_bytes"):
        if mem.get(key) is not None:
            gauge(f"memory_{key}", f"system memory: {key.replace('_', ' ')}").set(mem[key])
    gpus = doc["system"].get("gpus") or []
    if gpus:
        used = gauge("gpu_memory_used_bytes", "GPU memory used", ("gpu", "name"))
        total = gauge("gpu_memory_total_bytes", "GPU memory total", ("gpu", "name"))
        for g in gpus:
            used.labels(str(g.get("index")), g.get("name") or "").set(g.get("used_bytes") or 0)
            total.labels(str(g.get("index")), g.get("name") or "").set(g.get("total_bytes") or 0)
    alerts = doc.get("alerts") or {}
    gauge("alerts_pending", "alerts pending").set(alerts.get("pending", 0))
    # Lifetime counts exported as gauges before they were counters: kept for existing dashboards. The
    # counters (``observe.StatusCollector``) are supervisord_llm_alerts_delivered_total, ..._failed_total and
    # supervisord_llm_gateway_clients_cut_total.
    for key in ("delivered", "failed"):
        gauge(f"alerts_{key}", f"alerts {key} over the outbox's lifetime; a gauge kept for existing dashboards, "
              f"use the counter supervisord_llm_alerts_{key}_total").set(alerts.get(key, 0))
    if doc.get("gateway"):
        gauge("gateway_in_flight", "requests in flight through the gateway").set(doc["gateway"].get("in_flight", 0))
        gauge("gateway_clients_cut", "clients cut for not reading their stream within client_timeout_s "
              "(since the gateway process started); a gauge kept for existing dashboards, use the counter "
              "supervisord_llm_gateway_clients_cut_total").set(doc["gateway"].get("clients_cut", 0))
    gauge("daemon_uptime_seconds", "seconds since the daemon started").set(doc["daemon"]["uptime_s"])
    reboot = doc.get("reboot") or {}
    gauge("reboot_pending", "1 while a reboot is announced").set(1 if reboot.get("state") == "announced" else 0)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsExtension(Extension):
    """The loopback TCP listener for metrics and health probes."""

    name = "metrics"

    def __init__(self, daemon: Daemon, listen: str) -> None:
        from supervisord_llm.gateway.settings import parse_listen

        self.daemon = daemon
        self.listen = listen  # kept as written: an IPv6 host needs its brackets back in "[::1]:9464"
        self.host, self.port = parse_listen(listen)

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        daemon = self.daemon

        async def metrics(request: Request) -> Response:
            body, content_type = render_metrics(daemon)
            return Response(body, media_type=content_type)

        async def healthz(request: Request) -> Response:
            return JSONResponse({"ok": daemon.healthy_loop}, status_code=200 if daemon.healthy_loop else 503)

        async def readyz(request: Request) -> Response:
            # A start memory admission refused leaves the engine stopped, not failed, and counts as failed did. An
            # engine in its restart backoff answers requests with a 503 until the backoff ends. A start (a load) is
            # not counted: the gateway holds requests through it.
            bad = [s.name for s in daemon.supervisors.values()
                   if s.state in (EngineState.FAILED, EngineState.HUNG, EngineState.BACKOFF)
                   or (s.state == EngineState.STOPPED and s.start_refused)]
            # A gateway that keeps dying (``gateway.down``) serves no client, whatever the engines do.
            gateway = next((e for e in daemon.extensions if e.name == "gateway"), None)
            gateway_ok = not bool(getattr(getattr(gateway, "process", None), "down", False))
            ready = not bad and gateway_ok
            doc: dict[str, object] = {"ready": ready, "engines_not_ok": bad}
            if gateway is not None:
                doc["gateway_ok"] = gateway_ok
            return JSONResponse(doc, status_code=200 if ready else 503)

        routes = [Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)]
        from supervisord_llm.gateway.settings import is_loopback, parse_listen

        if daemon.config.gateway is None and is_loopback(parse_listen(self.listen)[0]):
            # Without a gateway, the status page lives here, on loopback only: it has no key, and shows the
            # events, the state directory and the config's path. A metrics port other machines reach (a
            # Prometheus elsewhere scrapes it) serves the metrics and the probes alone.
            from supervisord_llm.subsystems.ui import daemon_snapshot, ui_routes

            routes.extend(ui_routes(daemon_snapshot(daemon), None))
        return Starlette(routes=routes)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from supervisord_llm.gateway.proxy import GatewaySettings, serve
        from supervisord_llm.gateway.settings import parse_listen

        # The names it answers under are the gateway's (a tunnel's name listed there reaches both). Not read
        # as a [gateway] table: the rule that an address other machines reach needs an API key is the
        # gateway's (its requests use and swap models); this port only reads (a Prometheus elsewhere scrapes
        # it, as the shipped DaemonSet's "0.0.0.0:9464").
        gateway = self.daemon.config.gateway
        host, port = parse_listen(self.listen)  # checked with the config
        settings = GatewaySettings(host=host, port=port,
                                   allowed_hosts=gateway.allowed_hosts if gateway is not None else ())
        from supervisord_llm.gateway.protocol import bind_listen

        sock = bind_listen(host, port, setting="[daemon] metrics_listen")
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(serve, sock=sock), self.app(), settings)
            task_status.started()
