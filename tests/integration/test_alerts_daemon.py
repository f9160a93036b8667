"""Alerts from the real daemon reach a real webhook receiver: a hang fires, recovery resolves, and an
episode left open by a killed daemon is closed by the next one once the engine is ready."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import JsonWebhookReceiver, free_port, standin_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest


class Receiver(JsonWebhookReceiver):
    def of(self, key_prefix: str) -> list[dict]:
        return [b for b in self.bodies if b.get("event", "").startswith(key_prefix)]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_hang_fires_and_recovery_resolves_once_also_across_a_daemon_restart(daemon_factory) -> None:
    """SIGSTOP fires engine.hung; the daemon is killed meanwhile; after SIGCONT the next daemon resolves it."""
    receiver = Receiver()
    try:
        cfg = standin_engine_toml("s", free_port(), stall="2s", canary_interval="1s")
        cfg += '[policies.restart]\nhang_restart_after = "10m"\n'
        cfg += f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "{receiver.url}"\nformat = "json"\n'
        d = daemon_factory(cfg).start()
        pid = d.wait_state("s", "ready", 30)["pid"]
        os.kill(pid, signal.SIGSTOP)
        d.wait_state("s", "hung", 20)
        _wait(lambda: receiver.of("engine.hung"), 20, "hung alert delivered")
        firing = receiver.of("engine.hung")
        assert firing[0]["status"] == "firing" and firing[0]["engine"] == "s"
        d.kill()
        os.kill(pid, signal.SIGCONT)
        d.start()
        assert d.wait_state("s", "ready", 30)["pid"] == pid  # adopted, not restarted
        _wait(lambda: [b for b in receiver.of("engine.hung") if b["status"] == "resolved"], 20, "resolved delivered")
        # Delivery is at least once: a daemon SIGKILLed between the receiver's 200 and the fsync of
        # "delivered" sends that alert again, with the same alert_id, which receivers drop.
        unique = list({b["alert_id"]: b for b in receiver.of("engine.hung")}.values())
        assert [b["status"] for b in unique] == ["firing", "resolved"], receiver.of("engine.hung")
        assert firing[0]["episode_id"] == unique[1]["episode_id"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_llmctl_alerts_test_delivers_a_signed_test_alert(daemon_factory) -> None:
    """`llmctl alerts test` queues an alert that reaches the webhook, signed with the configured secret, also one
    that takes only warnings and worse (min_severity: a pager, the README's Slack example), and resolves it at
    once (no test alert left firing for a week in Alertmanager)."""
    from supervisord_llm.alerts.delivery import verify_signature

    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = standin_engine_toml("s", free_port())
        cfg += (f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:{server.server_port}/x"\n'
                'format = "json"\nsecret = "s3cret"\nmin_severity = "warning"\n')
        d = daemon_factory(cfg).start()
        out = d.llmctl("alerts", "test")
        assert out.returncode == 0 and "test alert queued" in out.stdout
        _wait(lambda: len(received) >= 2, 20, "test alert delivered and resolved")
        assert [json.loads(body)["status"] for _, body in received] == ["firing", "resolved"]
        headers, body = received[0]
        headers = {k.lower(): v for k, v in headers.items()}
        assert verify_signature("s3cret", headers["x-supervisord-llm-timestamp"],
                                headers["x-supervisord-llm-delivery"], body,
                                headers["x-supervisord-llm-signature"])
        assert json.loads(body)["message"] == "test alert from llmctl alerts test"
        assert "s3cret" not in (d.state_dir / "events.jsonl").read_text()
    finally:
        server.shutdown()
        server.server_close()


def test_an_engine_exit_alerts_with_its_diagnosis_unless_alert_on_exit_is_off(daemon_factory) -> None:
    """A Metal OOM abort at start sends one engine.exited warning naming code, cause, remedy, next start; opt-out sends none."""
    receiver = Receiver()
    oom = ("libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] Command buffer "
           "execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")
    try:
        cfg = standin_engine_toml("oom", free_port(), "--print-line", oom, "--exit-code", "134")
        cfg += standin_engine_toml("quiet", free_port(), "--print-line", oom, alert_on_exit=False)
        cfg += f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "{receiver.url}"\nformat = "json"\n'
        d = daemon_factory(cfg).start()
        d.wait_state("oom", "backoff", 30)
        d.wait_state("quiet", "backoff", 30)
        _wait(lambda: receiver.of("engine.exited"), 20, "exit alert delivered")
        time.sleep(1.0)  # time for a (wrong) alert about the opted-out engine to arrive too
        [alert] = receiver.of("engine.exited")
        assert (alert["status"], alert["severity"], alert["engine"]) == ("firing", "warning", "oom")
        assert alert["details"]["code"] == 134 and alert["details"]["exit"] == "code 134"
        assert "Metal" in alert["details"]["cause"] and "memory" in alert["details"]["cause"] and alert["details"]["remedy"]
        assert alert["details"]["remedy"] in alert["message"] and "next start at" in alert["message"]
        assert alert["details"]["next_start_at"].endswith("UTC") and alert["details"]["next_start_in_s"] > 30
        decided = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "episodes"]
        assert {(e["engine"], e["decision"]) for e in decided} == {("oom", "engine.exited:oom:warning"),
                                                                   ("quiet", "none")}
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_llmctl_stop_of_a_crashed_engine_resolves_its_exit_episode(daemon_factory) -> None:
    """A person stopping an engine in backoff after a crash closes the open exit alert instead of leaving it firing."""
    receiver = Receiver()
    try:
        cfg = standin_engine_toml("e", free_port(), "--print-line", "boom", "--exit-code", "2")
        cfg += f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "{receiver.url}"\nformat = "json"\n'
        d = daemon_factory(cfg).start()
        d.wait_state("e", "backoff", 30)
        _wait(lambda: receiver.of("engine.exited"), 20, "exit alert delivered")
        assert d.llmctl("stop", "e").returncode == 0
        _wait(lambda: len(receiver.of("engine.exited")) == 2, 20, "resolve delivered")
        fired, resolved = receiver.of("engine.exited")
        assert (fired["status"], resolved["status"]) == ("firing", "resolved")
        assert resolved["episode_id"] == fired["episode_id"] and "llmctl stop" in resolved["message"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
