"""A real Prometheus Alertmanager for tests: the distribution's package, started on a free port.

Debian/Ubuntu ship it as ``prometheus-alertmanager`` (``apt-get install prometheus-alertmanager``;
``.ci/run`` installs it where apt works). Each instance gets its own storage dir and config and
no cluster port; its notifications go to a real HTTP receiver on 127.0.0.1, so a test sees what
Alertmanager itself would send on (``send_resolved`` on, grouped by alertname and engine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, short_tmpdir

BINARIES = ("prometheus-alertmanager", "alertmanager")


def alertmanager_binary() -> str:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("needs a real Alertmanager: the distribution's prometheus-alertmanager package is not installed "
                "(apt-get install prometheus-alertmanager; .ci/run installs it where apt is available)")


class Notifications:
    """Alertmanager's own webhook notifications (version 4 payloads), as they arrive."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        payloads = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                payloads.append(json.loads(self.rfile.read(int(self.headers.get("content-length", "0")))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/am-notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        return [alert for payload in self.payloads for alert in payload["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    def __init__(self) -> None:
        self.binary = alertmanager_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir: Path = short_tmpdir("am-")
        self.notifications = Notifications()
        (self.dir / "alertmanager.yml").write_text(f"""\
route:
  receiver: hook
  group_by: [alertname, engine]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {self.notifications.url}
        send_resolved: true
""")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v2/alerts"

    def start(self) -> Alertmanager:
        log = open(self.dir / "alertmanager.log", "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'alertmanager.yml'}", f"--storage.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Alertmanager did not start: " + (self.dir / "alertmanager.log").read_text()[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def active(self, **labels: str) -> list[dict]:
        """Alerts Alertmanager holds as active now (resolved ones are not listed), matching ``labels``."""
        alerts = httpx.get(self.api_url, timeout=5).json()
        return [a for a in alerts if all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_active(self, timeout_s: float, **labels: str) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.active(**labels)
            if found:
                return found
            assert time.monotonic() < deadline, f"no active alert with {labels} within {timeout_s}s: {self.active()}"
            time.sleep(0.1)

    def wait_inactive(self, timeout_s: float, **labels: str) -> None:
        deadline = time.monotonic() + timeout_s
        while self.active(**labels):
            assert time.monotonic() < deadline, f"alert {labels} still active after {timeout_s}s"
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        self.notifications.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def alerts_toml(am: Alertmanager, *extra: str) -> str:
    """An [alerts] table sending to ``am``'s /api/v2/alerts."""
    return "\n".join(["[alerts]", 'external_url = "http://127.0.0.1:1/status"', *extra,
                      "[[alerts.webhook]]", 'name = "am"', f'url = "{am.api_url}"', 'format = "alertmanager_api"',
                      'timeout = "2s"']) + "\n"
