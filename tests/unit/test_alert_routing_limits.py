"""Severity routing, escalation of one episode, and payloads clipped to each receiver's limits (tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from supervisord_llm.alerts.delivery import (
    DISCORD_EMBED_TOTAL_MAX,
    Alert,
    AlertSettings,
    AlertTarget,
    Outbox,
    render_alertmanager,
    render_alertmanager_api,
    render_discord,
    render_json,
    render_slack,
)
from supervisord_llm.clock import FakeClock
from supervisord_llm.errors import ConfigError


def huge_alert(**overrides: object) -> Alert:
    fields: dict[str, object] = {
        "key": "engine.exited:" + "e" * 400, "status": "firing", "severity": "warning",
        "summary": "<@everyone> " + "x" * 100_000, "engine": "e" * 400,
        "details": {f"detail_{i:02d}_" + "k" * 300: "v" * 5000 for i in range(60)} | {"exit": "S" * 1000},
        "id": "a-1", "episode_id": "ep-1", "created_at": "2027-01-15T08:00:00.000Z",
        "started_at": "2027-01-15T08:00:00.000Z",
    }
    fields.update(overrides)
    return Alert(**fields)  # type: ignore[arg-type]


def _discord_total(embed: dict) -> int:
    return (len(embed["title"]) + len(embed["description"]) + len(embed["footer"]["text"])
            + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"]))


def _slack_ok(payload: dict) -> None:
    assert len(payload["text"]) <= 3000
    assert len(payload["blocks"]) <= 50
    for block in payload["blocks"]:
        if "text" in block:
            assert len(block["text"]["text"]) <= 3000
        assert len(block.get("fields", [])) <= 10
        for item in block.get("fields", []) + block.get("elements", []):
            assert len(item["text"]) <= 2000 or block["type"] == "context" and len(item["text"]) <= 3000


def _discord_ok(payload: dict) -> None:
    assert len(payload["content"]) <= 2000
    [embed] = payload["embeds"]
    assert len(embed["title"]) <= 256 and len(embed["description"]) <= 4096
    assert len(embed["fields"]) <= 25
    assert all(len(f["name"]) <= 256 and 0 < len(f["value"]) <= 1024 for f in embed["fields"])
    assert len(embed["footer"]["text"]) <= 2048
    assert _discord_total(embed) <= DISCORD_EMBED_TOTAL_MAX
    assert {f["name"] for f in embed["fields"]} >= {"severity", "host"}  # kept when details are dropped
    assert payload["allowed_mentions"] == {"parse": []}


def _alertmanager_ok(posted: list[dict]) -> None:
    for alert in posted:
        assert all(len(v) <= 256 for v in alert["labels"].values())
        assert all(len(v) <= 8192 for v in alert["annotations"].values())
        assert alert["labels"]["alertname"] == "engine.exited"


@pytest.mark.parametrize(
    ("fmt", "check"),
    [
        ("slack", lambda a: _slack_ok(render_slack(a, host="h" * 3000))),
        ("discord", lambda a: _discord_ok(render_discord(a, host="h" * 3000))),
        ("alertmanager", lambda a: _alertmanager_ok(render_alertmanager(a, host="h" * 3000, receiver="r")["alerts"])),
        ("alertmanager_api", lambda a: _alertmanager_ok(render_alertmanager_api(a, host="h" * 3000))),
    ],
)
@pytest.mark.parametrize("status", ["firing", "resolved"])
def test_oversized_alerts_are_clipped_to_each_receivers_limits(fmt: str, check, status: str) -> None:
    """An alert with a 100 kB message and 60 long details still fits Slack, Discord and Alertmanager."""
    check(huge_alert(status=status))
    check(huge_alert(previous_severity="warning", severity="critical"))


def test_clipped_text_ends_with_an_ellipsis_not_mid_json() -> None:
    """Clipping cuts text with a visible '…'; the payload stays valid JSON."""
    payload = render_discord(huge_alert(), host="h")
    assert payload["content"].endswith("…")
    json.loads(json.dumps(payload))


@pytest.mark.parametrize(
    ("min_severity", "info", "warning", "critical"),
    [
        ("info", True, True, True),
        ("warning", False, True, True),
        ("critical", False, False, True),
    ],
)
def test_min_severity_decides_which_alerts_a_target_gets(min_severity: str, info: bool, warning: bool,
                                                          critical: bool) -> None:
    """A pager with min_severity critical gets only critical alerts; a chat channel with info gets all."""
    target = AlertTarget.from_toml({"name": "t", "url": "http://127.0.0.1:9/x", "min_severity": min_severity},
                                   file="c.toml", key="alerts.webhook[0]")
    assert (target.wants("info"), target.wants("warning"), target.wants("critical")) == (info, warning, critical)


def test_min_severity_error_names_the_key_and_the_valid_values() -> None:
    """A bad min_severity names the file, the key and info/warning/critical."""
    with pytest.raises(ConfigError, match="info, warning, critical") as caught:
        AlertTarget.from_toml({"name": "t", "url": "http://127.0.0.1:9/x", "min_severity": "page"},
                              file="c.toml", key="alerts.webhook[0]")
    assert (caught.value.file, caught.value.key) == ("c.toml", "alerts.webhook[0].min_severity")


def _outbox(tmp_path: Path) -> Outbox:
    targets = (AlertTarget(name="chat", url="http://127.0.0.1:9/chat", format="slack"),
               AlertTarget(name="pager", url="http://127.0.0.1:9/pager", format="alertmanager_api",
                           min_severity="critical"))
    return Outbox(tmp_path, AlertSettings(targets=targets, host="h"), FakeClock(),
                  structlog.wrap_logger(structlog.ReturnLogger()))


@pytest.mark.parametrize(
    ("steps", "sent"),
    [
        # (alert, expected outcome of submit, targets it is queued for)
        ([("firing", "warning", True, ["chat"])], "a crash: chat only"),
        ([("firing", "warning", True, ["chat"]), ("firing", "warning", False, [])], "a repeat is deduplicated"),
        ([("firing", "warning", True, ["chat"]), ("firing", "critical", True, ["chat", "pager"])],
         "a crash loop escalates the same episode and now pages"),
        ([("firing", "warning", True, ["chat"]), ("firing", "critical", True, ["chat", "pager"]),
          ("firing", "warning", False, [])], "no step back down"),
        ([("firing", "warning", True, ["chat"]), ("resolved", "info", True, ["chat"])],
         "the resolve goes where the firing went"),
        ([("firing", "warning", True, ["chat"]), ("firing", "critical", True, ["chat", "pager"]),
          ("resolved", "info", True, ["chat", "pager"])], "an escalated episode resolves everywhere"),
        ([("firing", "critical", True, ["chat", "pager"])], "straight to critical"),
    ],
)
def test_episode_routing_and_escalation(tmp_path: Path, steps: list[tuple], sent: str) -> None:
    """One exit episode: escalation keeps its id, routing follows severity, resolves follow the firing."""
    outbox = _outbox(tmp_path)
    episode_ids = set()
    for status, severity, accepted, targets in steps:
        before = {p.delivery_id for p in outbox.pending()}
        if status == "firing":
            alert = Alert.firing("engine.exited:qwen", severity, "qwen went down", engine="qwen",
                                 details={"exit": "SIGKILL"})
        else:
            alert = Alert.resolved("engine.exited:qwen", "qwen is ready again", engine="qwen")
        assert outbox.submit(alert) is accepted, sent
        new = [p for p in outbox.pending() if p.delivery_id not in before]
        assert [p.target for p in new] == targets, sent
        episode_ids.update(outbox._alerts[p.alert_id].episode_id for p in new)
    assert len(episode_ids) <= 1, "one thread per episode"
    outbox.close()


def test_escalation_ends_the_warning_alert_and_opens_the_critical_one_in_alertmanager(tmp_path: Path) -> None:
    """Alertmanager tells alerts apart by labels: the escalation ends the warning one and fires the critical one."""
    outbox = _outbox(tmp_path)
    outbox.submit(Alert.firing("engine.exited:qwen", "warning", "qwen killed by SIGKILL", engine="qwen",
                               details={"exit": "SIGKILL"}))
    outbox.submit(Alert.firing("engine.exited:qwen", "critical", "qwen crash loop", engine="qwen",
                               details={"exit": "code 1"}))
    escalated = outbox._alerts[outbox.pending()[-1].alert_id]
    assert escalated.previous_severity == "warning" and escalated.escalated
    ended, fired = render_alertmanager_api(escalated, host="h")
    assert ended["labels"] == {**fired["labels"], "severity": "warning"}
    assert fired["labels"]["exit"] == "SIGKILL"  # the episode keeps the labels it opened with
    assert escalated.details["last_exit"] == "code 1"
    assert ended["endsAt"] == escalated.created_at < fired["endsAt"]
    assert render_json(escalated, host="h")["escalated_from"] == "warning"
    assert render_slack(escalated, host="h")["text"].startswith(":rotating_light: [CRITICAL (was warning)]")
    webhook = render_alertmanager(escalated, host="h", receiver="r")
    assert [a["status"] for a in webhook["alerts"]] == ["firing", "resolved"]
    outbox.close()


def test_escalation_survives_a_restart_of_the_outbox(tmp_path: Path) -> None:
    """After a daemon restart, the open episode remembers its raised severity and labels."""
    first = _outbox(tmp_path)
    first.submit(Alert.firing("engine.exited:qwen", "warning", "down", engine="qwen", details={"exit": "SIGKILL"}))
    first.submit(Alert.firing("engine.exited:qwen", "critical", "loop", engine="qwen"))
    first.close()
    second = _outbox(tmp_path)
    assert not second.submit(Alert.firing("engine.exited:qwen", "critical", "loop again", engine="qwen"))
    assert second.submit(Alert.resolved("engine.exited:qwen", "ready", engine="qwen"))
    resolve = second._alerts[second.pending()[-1].alert_id]
    assert (resolve.severity, resolve.details["exit"]) == ("critical", "SIGKILL")
    second.close()
