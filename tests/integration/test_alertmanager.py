"""Alerts against a real Alertmanager (the distribution's package): exit episodes, resolution, the
Watchdog heartbeat and an Alertmanager outage across a daemon restart. Skipped where it is not installed."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import pytest

from tests.alertmanager import alerts_toml
from tests.helpers import free_port, mlx_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_sigkilled_engine_is_an_active_alert_with_its_exit_then_resolved_once_ready(daemon_factory, tiny_model,
                                                                                      alertmanager) -> None:
    """A SIGKILLed mlx_lm.server shows in Alertmanager within seconds (engine, severity, exit); ready again ends it."""
    am = alertmanager.start()
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model) + alerts_toml(am, 'max_backoff = "2s"')).start()
    pid = d.wait_state("tiny", "ready", 60)["pid"]
    os.kill(pid, signal.SIGKILL)
    [alert] = am.wait_active(30, alertname="engine.exited", engine="tiny")
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["exit"] == "SIGKILL"
    assert alert["generatorURL"] == "http://127.0.0.1:1/status"
    assert "killed by SIGKILL" in alert["annotations"]["summary"] and "next start at" in alert["annotations"]["summary"]
    assert "next_start_at:" in alert["annotations"]["description"]

    # A person starts it at once (inside the 60 s floor, hence --force); ready ends the episode.
    assert d.llmctl("start", "tiny", "--force").returncode == 0
    d.wait_state("tiny", "ready", 60)
    am.wait_inactive(30, alertname="engine.exited", engine="tiny")
    deadline = time.monotonic() + 30
    def resolved_exits() -> list[dict]:
        return [a for a in am.notifications.alerts() if a["status"] == "resolved"
                and a["labels"].get("alertname") == "engine.exited"]

    while not resolved_exits():
        assert time.monotonic() < deadline, am.notifications.payloads
        time.sleep(0.1)
    resolved = resolved_exits()[0]
    assert resolved["labels"] == alert["labels"]
    assert _iso(resolved["endsAt"]) <= datetime.now(UTC)
    assert _iso(resolved["startsAt"]) == _iso(alert["startsAt"])


@pytest.mark.long_wait
def test_watchdog_alert_stays_active_while_the_daemon_runs_and_expires_after_sigkill(daemon_factory,
                                                                                      alertmanager) -> None:
    """The heartbeat's always-firing Watchdog alert is active while the daemon lives and ends when it is SIGKILLed."""
    am = alertmanager.start()
    cfg = alerts_toml(am) + '[alerts.heartbeat]\ninterval = "1s"\nwatchdog_alert = true\n'
    d = daemon_factory(cfg).start()
    [first] = am.wait_active(10, alertname="Watchdog")
    assert first["labels"]["severity"] == "none"
    time.sleep(4)  # longer than the alert's own 3 s lifetime: only fresh beats keep it active
    [still] = am.active(alertname="Watchdog")
    assert _iso(still["endsAt"]) > _iso(first["endsAt"])
    d.kill()
    killed = time.monotonic()
    am.wait_inactive(30, alertname="Watchdog")
    assert time.monotonic() - killed >= 1.0  # it ended because the beats stopped, not at once


def test_alertmanager_outage_across_a_daemon_restart_loses_nothing(daemon_factory, tiny_model, alertmanager) -> None:
    """An engine crash while Alertmanager is down, then the daemon is SIGKILLed: the next daemon delivers it."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model) + alerts_toml(alertmanager, 'max_backoff = "2s"')
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 60)["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("tiny", "backoff", 30)
    deadline = time.monotonic() + 30
    while not d.status()["alerts"]["pending"]:
        assert time.monotonic() < deadline, d.status()["alerts"]
        time.sleep(0.1)
    d.kill()  # the daemon dies with the alert undelivered
    am = alertmanager.start()
    d.start()
    [alert] = am.wait_active(40, alertname="engine.exited", engine="tiny")
    assert alert["labels"]["exit"] == "SIGKILL"
    deadline = time.monotonic() + 10  # "delivered" is recorded just after Alertmanager answered
    while d.status()["alerts"]["pending"]:
        assert time.monotonic() < deadline, d.status()["alerts"]
        time.sleep(0.1)
