"""The dead-man heartbeat from a real daemon to a real HTTP receiver: on time while healthy, silent when not."""

from __future__ import annotations

import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import free_port, standin_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest


class PushReceiver:
    """A healthchecks-style push endpoint: records when each GET or POST arrived."""

    def __init__(self, port: int = 0) -> None:
        self.beats: list[tuple[float, str, str]] = []
        beats = self.beats

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("content-length", "0") or 0)
                body = self.rfile.read(length).decode() if length else ""
                beats.append((time.monotonic(), self.command, body))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = _record  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/ping/3f1e"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count_during(self, seconds: float) -> int:
        before = len(self.beats)
        time.sleep(seconds)
        return len(self.beats) - before

    def wait_for(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        start = len(self.beats)
        while len(self.beats) - start < n:
            assert time.monotonic() < deadline, f"fewer than {n} heartbeats within {timeout_s}s"
            time.sleep(0.05)


@pytest.fixture
def push():
    receiver = PushReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def heartbeat_config(url: str, *extra: str) -> str:
    cfg = standin_engine_toml("s", free_port(), autostart=False)
    return cfg + "\n".join(["[alerts.heartbeat]", 'interval = "1s"', f'url = "{url}"', *extra]) + "\n"


def test_heartbeat_arrives_every_interval_and_stops_when_the_daemon_is_stopped_or_killed(daemon_factory,
                                                                                          push) -> None:
    """A monitor sees a beat about every second; none while the daemon is SIGSTOPped; beats resume; none after SIGKILL."""
    d = daemon_factory(heartbeat_config(push.url)).start()
    push.wait_for(4, 15)
    times = [t for t, _, _ in push.beats[-4:]]
    assert all(0.3 < b - a < 2.5 for a, b in zip(times, times[1:], strict=False)), times
    assert {method for _, method, _ in push.beats} == {"GET"}

    os.kill(d.proc.pid, signal.SIGSTOP)  # the daemon's loop is blocked: nothing runs
    try:
        time.sleep(0.5)  # a beat already on the wire may still land
        assert push.count_during(3.0) == 0
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    push.wait_for(2, 10)
    heartbeat = d.status()["heartbeat"]
    assert heartbeat["sending"] is True and heartbeat["sent"] >= 5
    assert "heartbeat: every 1s, sending" in d.llmctl("status").stdout

    d.kill()
    time.sleep(0.5)
    assert push.count_during(3.0) == 0


def test_heartbeat_is_withheld_while_a_probe_fails_and_says_why(daemon_factory, push) -> None:
    """A daemon whose memory probe fails cannot protect the machine: no beat, and the decision names the probe."""
    cfg = heartbeat_config(push.url, 'method = "POST"')
    cfg += '[probes]\nplatform = "darwin"\nvm_stat = "/nonexistent/vm_stat"\ninterval = "1s"\n'
    d = daemon_factory(cfg).start()
    deadline = time.monotonic() + 15
    while not [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "heartbeat"
               and e.get("decision") == "withhold"]:
        assert time.monotonic() < deadline, d.events()[-5:]
        time.sleep(0.1)
    assert push.count_during(3.0) == 0
    decided = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "heartbeat"]
    assert "probes failing: memory" in decided[-1]["reason"]
    assert d.status()["heartbeat"]["sending"] is False
    assert "heartbeat: every 1s, withheld: probes failing: memory" in d.llmctl("status").stdout


def test_heartbeat_survives_an_unreachable_monitor_and_resumes_when_it_answers(daemon_factory) -> None:
    """While the push URL refuses connections the daemon logs the failure and keeps beating; beats land once it is back."""
    port = free_port()
    d = daemon_factory(heartbeat_config(f"http://127.0.0.1:{port}/ping/3f1e", 'method = "POST"')).start()
    deadline = time.monotonic() + 15
    while "heartbeat.failed" not in d.stderr():
        assert time.monotonic() < deadline, d.stderr()
        time.sleep(0.1)
    push = PushReceiver(port)  # the monitor comes back on its address
    try:
        push.wait_for(2, 10)
        _, method, body = push.beats[-1]
        assert method == "POST" and '"engines":{"s":"stopped"}' in body.replace(" ", "")
        assert d.status()["heartbeat"]["sending"] is True
    finally:
        push.server.shutdown()
        push.server.server_close()
