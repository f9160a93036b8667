"""The heartbeat's decision (send only while the daemon is healthy) and its config errors, as tables."""

from __future__ import annotations

import pytest

from policies.heartbeat import LOOP_STALL_S, SelfHealth, decide, loop_stalled, max_loop_lag_s
from supervisord_llm.alerts.delivery import AlertSettings
from supervisord_llm.alerts.heartbeat import HeartbeatSettings, watchdog_alert
from supervisord_llm.errors import ConfigError


@pytest.mark.parametrize(
    ("health", "send", "reason"),
    [
        (SelfHealth(loop_lag_s=0.01, loop_stalled=False), True, "loop on time"),
        (SelfHealth(loop_lag_s=0.01, loop_stalled=True), False, "event loop stalled"),
        (SelfHealth(loop_lag_s=7.5, loop_stalled=False), False, "7.5s late"),
        (SelfHealth(loop_lag_s=0.01, loop_stalled=False, failing_probes=("memory",)), False, "probes failing: memory"),
    ],
    ids=["healthy", "loop-stalled", "loop-late", "probe-failing"],
)
def test_a_beat_is_sent_only_while_loop_and_probes_are_healthy(health: SelfHealth, send: bool, reason: str) -> None:
    """A stalled or late loop, or a failing probe, withholds the beat and says why."""
    decision = decide(health, max_loop_lag_s=2.0)
    assert decision.send is send and reason in decision.reason


def test_the_loop_is_stalled_from_ten_seconds_late_and_a_beat_may_be_one_interval_late() -> None:
    assert not loop_stalled(0.0) and not loop_stalled(9.9) and loop_stalled(LOOP_STALL_S) and loop_stalled(60.0)
    assert max_loop_lag_s(60.0) == 60.0 and max_loop_lag_s(0.5) == 2.0


def test_heartbeat_settings_read_every_key() -> None:
    """[alerts.heartbeat] gives interval, push URL, method, timeout and the Watchdog switch."""
    settings = HeartbeatSettings.from_toml({"interval": "30s", "url": "https://hc-ping.com/abc", "method": "POST",
                                            "timeout": "3s", "watchdog_alert": False}, file="c.toml",
                                           key="alerts.heartbeat")
    assert (settings.interval_s, settings.url, settings.method, settings.timeout_s) == \
        (30.0, "https://hc-ping.com/abc", "POST", 3.0)
    assert "hc-ping" not in repr(settings)


@pytest.mark.parametrize(
    ("table", "bad_key", "message"),
    [
        ({"interval": "60s"}, "alerts.heartbeat", "nothing to send"),
        ({"url": "https://x/y", "interval": "0.5s"}, "alerts.heartbeat.interval", "from 1s to 3600s"),
        ({"url": "https://x/y", "method": "PUT"}, "alerts.heartbeat.method", "GET, POST"),
        ({"url": "ftp://x/y"}, "alerts.heartbeat.url", "http:// or https://"),
        ({"url_env": "NO_SUCH_HEARTBEAT_VARIABLE"}, "alerts.heartbeat.url_env", "is not set"),
        ({"url": "https://x/y", "timeout": "2m", "interval": "1m"}, "alerts.heartbeat.timeout", "from 0.1s to 60s"),
        ({"url": "https://x/y", "watchdog_alert": "yes"}, "alerts.heartbeat.watchdog_alert", "true or false"),
        ({"url": "https://x/y", "every": "1m"}, "alerts.heartbeat.every", "valid keys here: interval"),
    ],
)
def test_heartbeat_config_errors_name_the_key_and_what_is_valid(table: dict, bad_key: str, message: str) -> None:
    """Each invalid heartbeat setting names the file, the key and the valid values."""
    with pytest.raises(ConfigError, match=message) as caught:
        HeartbeatSettings.from_toml(table, file="c.toml", key="alerts.heartbeat", environ={})
    assert (caught.value.file, caught.value.key) == ("c.toml", bad_key)


def test_watchdog_alert_needs_an_alertmanager_api_webhook() -> None:
    """watchdog_alert without an alertmanager_api webhook is an error that says which format is needed."""
    table = {"webhook": [{"name": "chat", "url": "https://x/y", "format": "slack"}],
             "heartbeat": {"watchdog_alert": True}}
    with pytest.raises(ConfigError, match="alertmanager_api") as caught:
        AlertSettings.from_toml(table, file="c.toml")
    assert caught.value.key == "alerts.heartbeat.watchdog_alert"


def test_watchdog_alert_follows_the_prometheus_convention_and_expires_after_three_intervals() -> None:
    """The Watchdog alert is alertname=Watchdog, severity=none, and ends three intervals after the beat."""
    [posted] = watchdog_alert("studio", "2027-01-15T08:00:00.000Z", 1800000000.0, 60.0, "http://studio:9464/")
    assert posted["labels"] == {"alertname": "Watchdog", "severity": "none", "instance": "studio"}
    assert posted["endsAt"] == "2027-01-15T08:03:00.000Z"
    assert posted["generatorURL"] == "http://studio:9464/"
