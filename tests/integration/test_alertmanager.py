"""Alerts against a real Alertmanager (the distribution's package): exit episodes, resolution, the
Watchdog heartbeat and an Alertmanager outage across a daemon restart. Skipped where it is not installed."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.alertmanager import alerts_toml
from tests.helpers import free_port, mlx_engine_toml
from tests.integration.test_alerts_daemon import Receiver
from tests.integration.test_stranded_reboot import _config as stranded_config
from tests.integration.test_stranded_reboot import _env as vm_stat_env

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


def test_an_open_episode_is_reposted_and_ends_in_alertmanager_a_few_intervals_after_the_daemon_dies(
        daemon_factory, alertmanager, tmp_path) -> None:
    """Open episodes are re-posted every resend interval with endsAt three intervals ahead: the alert stays active
    (one firing notification) while the daemon lives and ends within a few intervals of a SIGKILL, not a week
    later; a plain webhook beside it gets each firing once."""
    am = alertmanager.start()
    hook = Receiver()
    try:
        cfg = stranded_config() + alerts_toml(am, 'alertmanager_resend_interval = "1s"')
        cfg += f'[[alerts.webhook]]\nname = "hook"\nurl = "{hook.url}"\nformat = "json"\n'
        d = daemon_factory(cfg, env=vm_stat_env(tmp_path, ["studio-512gb-idle*5", "studio-512gb-stranded-after-hang"]))
        d.start()
        [first] = am.wait_active(30, alertname="memory.stranded")
        assert _iso(first["endsAt"]) <= datetime.now(UTC) + timedelta(seconds=3.5), first["endsAt"]
        time.sleep(5)  # past the first post's endsAt: only the re-posts keep it active
        [still] = am.active(alertname="memory.stranded")
        assert _iso(still["endsAt"]) > _iso(first["endsAt"]) and _iso(still["startsAt"]) == _iso(first["startsAt"])
        assert still["annotations"] == first["annotations"] and still["labels"] == first["labels"]
        notified = [(a["labels"]["alertname"], a["status"]) for a in am.notifications.alerts()
                    if a["labels"]["alertname"] == "memory.stranded"]
        assert set(notified) == {("memory.stranded", "firing")}, notified  # it never lapsed in between
        assert [b["status"] for b in hook.of("memory.stranded")] == ["firing"]  # no re-posts to webhooks
        d.kill()
        killed = time.monotonic()
        am.wait_inactive(10, alertname="memory.stranded")
        assert time.monotonic() - killed >= 0.5  # it ended because the re-posts stopped, not at once
    finally:
        hook.server.shutdown()
        hook.server.server_close()


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
