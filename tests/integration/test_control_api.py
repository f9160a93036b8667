"""The control API: owner-only socket, peer uid checked, malformed requests answered 4xx, metrics parseable."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import PYTHON, free_port, standin_engine_toml

RAW_GET = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
    "try:\n    s.sendall(b'GET /v1/status HTTP/1.1\\r\\nhost: d\\r\\n\\r\\n')\n"
    "except BrokenPipeError:\n    pass  # refused before the request was sent: the answer is already waiting\n"
    "print(s.recv(4096).decode(errors='replace'))\n"
)


SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a venv under /root


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_socket_is_owner_only_in_an_owner_only_dir(daemon_factory) -> None:
    """control.sock is 0600 inside a 0700 state dir."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.state_dir).st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="switching to user nobody needs root and a system python3")
def test_another_user_is_refused_even_when_the_socket_is_reachable(daemon_factory) -> None:
    """With permissions opened up on purpose, the peer-uid check still refuses user nobody with 403."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    denied = subprocess.run([SYSTEM_PYTHON, "-c", RAW_GET, str(d.socket)], capture_output=True, text=True, timeout=30,
                            preexec_fn=_as_nobody)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr  # the 0700 dir keeps it out
    os.chmod(d.state_dir, 0o711)
    os.chmod(d.socket, 0o666)
    refused = subprocess.run([SYSTEM_PYTHON, "-c", RAW_GET, str(d.socket)], capture_output=True, text=True, timeout=30,
                             preexec_fn=_as_nobody)
    assert "403 Forbidden" in refused.stdout and "only the daemon's own user" in refused.stdout
    assert '"engines"' not in refused.stdout
    ok = subprocess.run([PYTHON, "-c", RAW_GET, str(d.socket)], capture_output=True, text=True, timeout=30)
    assert "200 OK" in ok.stdout  # the owner still gets in


def test_malformed_control_requests_get_4xx_and_the_daemon_stays_healthy(daemon_factory) -> None:
    """Garbage, bad JSON, wrong types, unknown routes, oversized bodies: 4xx each; status still works."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    with d.client() as c:
        cases = [
            c.post("/v1/engines/a/start", content=b"{not json"),
            c.post("/v1/engines/a/start", json=[1, 2]),
            c.post("/v1/engines/a/start", json={"force": "yes"}),
            c.post("/v1/engines/nope/start", json={}),
            c.post("/v1/engines/a/explode", json={}),
            c.post("/v1/switch", json={}),
            c.post("/v1/switch", json={"name": 7}),
            c.get("/v1/engines/a/logs", params={"lines": "many"}),
            c.get("/v1/../../etc/passwd"),
            c.delete("/v1/status"),
            c.post("/v1/switch", content=b"x" * 200_000),
        ]
        for response in cases:
            assert 400 <= response.status_code < 500, (response.request.url, response.status_code, response.text)
            assert "error" in response.json()
    for _ in range(50):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.socket))
            s.sendall(os.urandom(512) + b"\r\n\r\n")
            s.settimeout(5)
            try:
                s.recv(1024)
            except (TimeoutError, ConnectionResetError):
                pass
    assert d.status()["daemon"]["pid"] == d.proc.pid


def test_metrics_text_parses_with_prometheus_clients_own_parser(daemon_factory) -> None:
    """`llmctl metrics` is valid Prometheus text with engine state, memory and alert families."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    d.wait_state("a", "ready", 30)
    out = d.llmctl("metrics")
    assert out.returncode == 0
    families = {f.name: f for f in text_string_to_metric_families(out.stdout)}
    for name in ("supervisord_llm_engine_state", "supervisord_llm_engine_restarts", "supervisord_llm_engine_up",
                 "supervisord_llm_memory_available_bytes", "supervisord_llm_alerts_pending",
                 "supervisord_llm_daemon_uptime_seconds"):
        assert name in families, sorted(families)
    ready = [s for s in families["supervisord_llm_engine_state"].samples
             if s.labels == {"engine": "a", "state": "ready"}]
    assert ready and ready[0].value == 1.0


def _metrics_port(daemon_factory, host: str) -> tuple[int, Any]:
    """A daemon whose metrics listen on ``host``, its engine ready: the port and a /metrics scrape of it
    (through 127.0.0.1), which must parse."""
    import httpx

    port = free_port()
    d = daemon_factory(f'[daemon]\nmetrics_listen = "{host}:{port}"\n' + standin_engine_toml("a", free_port()))
    d.start()
    d.wait_state("a", "ready", 30)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert metrics.status_code == 200 and list(text_string_to_metric_families(metrics.text))
    return port, metrics


def test_metrics_on_every_address_serve_prometheus_without_a_gateway_key(daemon_factory) -> None:
    """`metrics_listen = "0.0.0.0:9464"` (the shipped DaemonSet's, for a Prometheus on another machine) starts
    the daemon and serves /metrics: the metrics port is read-only, so the gateway's rule that a port reachable
    from other machines needs an API key is not its rule."""
    import httpx

    port, metrics = _metrics_port(daemon_factory, "0.0.0.0")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json() == {"ok": True}
    # The status page (no key; the events, the state directory) is not served where other machines reach it.
    assert httpx.get(f"http://127.0.0.1:{port}/ui/status.json", timeout=10).status_code == 404


def test_metrics_and_health_on_the_loopback_tcp_port(daemon_factory) -> None:
    """With metrics_listen set, /metrics, /healthz and /readyz answer over TCP (for Kubernetes probes)."""
    import httpx

    port, metrics = _metrics_port(daemon_factory, "127.0.0.1")
    # The hang count is there at 0 before any hang: the hung alert's increase() sees the first one.
    stalls = {s.labels["verdict"]: s.value for f in text_string_to_metric_families(metrics.text)
              if f.name == "supervisord_llm_engine_stalls" for s in f.samples if s.name.endswith("_total")}
    assert stalls == {"hung": 0.0, "degraded": 0.0}, stalls
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json() == {"ok": True}
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200


def test_readyz_is_not_ready_while_an_engine_waits_out_its_restart_backoff(daemon_factory) -> None:
    """An engine that crashed answers every request with a 503 until its backoff ends (60 s at least): a readiness
    probe must not send traffic meanwhile. Ready again once the engine is."""
    import os
    import signal

    import httpx

    port = free_port()
    d = daemon_factory(f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n' + standin_engine_toml("a", free_port())).start()
    pid = d.wait_state("a", "ready", 30)["pid"]
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    os.kill(pid, signal.SIGKILL)
    d.wait_state("a", "backoff", 30)
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json() == {"ready": False, "engines_not_ok": ["a"]}, ready.text


def test_lifetime_counts_are_counters_named_total_beside_the_old_gauges(daemon_factory) -> None:
    """After a delivery and a drop, a scrape of the metrics port has alerts_delivered_total, alerts_failed_total
    and gateway_clients_cut_total as counters (rate() and increase() work on them) with the outbox's counts;
    the gauges of the same counts stay for existing dashboards."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(204 if self.path == "/ok" else 404)  # a 4xx drops the delivery at once
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = free_port()
        cfg = (f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n' + standin_engine_toml("a", free_port(), autostart=False)
               + f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\n'
               + f'[alerts]\n[[alerts.webhook]]\nname = "ok"\nurl = "http://127.0.0.1:{server.server_port}/ok"\n'
               + f'[[alerts.webhook]]\nname = "gone"\nurl = "http://127.0.0.1:{server.server_port}/gone"\n')
        d = daemon_factory(cfg).start()
        assert d.llmctl("alerts", "test").returncode == 0  # a firing and its resolve, to both webhooks
        deadline = time.monotonic() + 20
        while (counts := d.status()["alerts"])["pending"] or not counts["delivered"] or not counts["failed"]:
            assert time.monotonic() < deadline, counts
            time.sleep(0.1)
        assert (counts["delivered"], counts["failed"]) == (2, 2), counts
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for name, value in (("alerts_delivered", 2), ("alerts_failed", 2), ("gateway_clients_cut", 0)):
            assert f"# TYPE supervisord_llm_{name}_total counter\n" in scrape, scrape
            assert f"\nsupervisord_llm_{name}_total {float(value)}\n" in scrape, scrape
            assert f"# TYPE supervisord_llm_{name} gauge\n" in scrape  # kept for existing dashboards
            assert f"\nsupervisord_llm_{name} {float(value)}\n" in scrape
        assert list(text_string_to_metric_families(scrape))
    finally:
        server.shutdown()
        server.server_close()


def test_a_stopped_engine_shows_no_memory_or_rate_of_its_last_run(daemon_factory) -> None:
    """Once its process is gone, the status (and so the table, the page and the metrics) shows no memory held
    and no tokens/s for the engine: a dead engine does not keep using memory and making tokens there."""
    import time

    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    d.wait_state("a", "ready", 30)
    deadline = time.monotonic() + 20
    while d.engine("a")["memory"]["rss_bytes"] is None:
        assert time.monotonic() < deadline, "no memory reading of the running engine"
        time.sleep(0.2)
    assert d.llmctl("stop", "a").returncode == 0
    stopped = d.engine("a")
    assert stopped["state"] == "stopped" and stopped["pid"] is None
    assert stopped["memory"]["rss_bytes"] is None and stopped["memory"]["gpu_bytes"] is None, stopped["memory"]
    assert stopped["tokens_per_s"] is None
    assert {"gpu_soft_bytes", "gpu_hard_bytes", "gpu_guard"} <= set(stopped["memory"])  # null, not absent


def test_a_clean_exit_takes_its_control_socket_away_and_llmctl_says_no_daemon_runs(daemon_factory) -> None:
    d = daemon_factory(standin_engine_toml("a", free_port(), autostart=False)).start()
    assert d.socket.exists()
    d.stop()
    assert not d.socket.exists()
    status = d.llmctl("status")
    assert status.returncode == 3 and "no supervisord-llm daemon is running" in status.stderr, status
