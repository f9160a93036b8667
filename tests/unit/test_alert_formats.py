"""Alert payload formats, signing, and the validation of [alerts] config tables."""

from __future__ import annotations

import json

import pytest

from supervisord_llm.alerts.delivery import (
    ALERTMANAGER_ZERO_TIME,
    Alert,
    AlertSettings,
    AlertTarget,
    encode_body,
    labels_fingerprint,
    render_alertmanager,
    render_alertmanager_api,
    render_discord,
    render_json,
    render_payload,
    render_slack,
    sign,
    verify_signature,
)
from supervisord_llm.clock import FakeClock
from supervisord_llm.errors import ConfigError

SECRET_URL = "https://hooks.example.com/services/T000/B000/very-secret-token"


def firing(**overrides: object) -> Alert:
    fields: dict[str, object] = {
        "key": "engine.failed:mlx", "status": "firing", "severity": "critical",
        "summary": "mlx crashed 5 times in 10 minutes; giving up", "engine": "mlx",
        "details": {"restarts": 5, "last_exit": "SIGKILL"}, "id": "a-1", "episode_id": "ep-1",
        "created_at": "2027-01-15T08:00:00.000Z", "started_at": "2027-01-15T08:00:00.000Z",
    }
    fields.update(overrides)
    return Alert(**fields)  # type: ignore[arg-type]


def resolved() -> Alert:
    return firing(status="resolved", id="a-2", summary="mlx is ready again",
                  created_at="2027-01-15T08:30:00.000Z", details={})


# ---------------------------------------------------------------------------- payloads


def test_json_payload_has_exactly_the_documented_schema() -> None:
    """The json format carries the documented version-1 fields with the alert's values."""
    payload = render_json(firing(), host="studio")
    assert payload == {
        "version": 1, "event": "engine.failed", "key": "engine.failed:mlx", "status": "firing",
        "severity": "critical", "escalated_from": None, "engine": "mlx", "message": "mlx crashed 5 times in 10 minutes; giving up",
        "details": {"restarts": 5, "last_exit": "SIGKILL"}, "episode_id": "ep-1", "alert_id": "a-1",
        "started_at": "2027-01-15T08:00:00.000Z", "at": "2027-01-15T08:00:00.000Z", "host": "studio",
    }
    json.dumps(payload)


def test_alertmanager_payload_matches_the_v4_webhook_fields() -> None:
    """The alertmanager format is an Alertmanager v4 webhook body, field by field."""
    payload = render_alertmanager(firing(), host="studio", receiver="oncall", external_url="http://studio:9464")
    labels = {"alertname": "engine.failed", "severity": "critical", "instance": "studio", "engine": "mlx"}
    annotations = {"summary": "mlx crashed 5 times in 10 minutes; giving up",
                   "description": "mlx crashed 5 times in 10 minutes; giving up\nrestarts: 5\nlast_exit: SIGKILL"}
    assert payload["version"] == "4"
    assert payload["groupKey"] == '{}:{alertname="engine.failed", engine="mlx"}'
    assert payload["truncatedAlerts"] == 0
    assert payload["status"] == "firing"
    assert payload["receiver"] == "oncall"
    assert payload["groupLabels"] == {"alertname": "engine.failed", "engine": "mlx"}
    assert payload["commonLabels"] == labels
    assert payload["commonAnnotations"] == annotations
    assert payload["externalURL"] == "http://studio:9464"
    [alert] = payload["alerts"]
    assert alert == {
        "status": "firing", "labels": labels, "annotations": annotations,
        "startsAt": "2027-01-15T08:00:00.000Z", "endsAt": ALERTMANAGER_ZERO_TIME,
        "generatorURL": "http://studio:9464", "fingerprint": labels_fingerprint(labels),
    }
    assert set(payload) == {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                            "commonLabels", "commonAnnotations", "externalURL", "alerts"}


def test_alertmanager_resolved_keeps_the_start_and_sets_the_end() -> None:
    """A resolved Alertmanager alert keeps its fingerprint and start, and ends when it was resolved."""
    fired = render_alertmanager(firing(), host="studio", receiver="oncall")["alerts"][0]
    closed = render_alertmanager(resolved(), host="studio", receiver="oncall")
    assert closed["status"] == "resolved"
    [alert] = closed["alerts"]
    assert alert["status"] == "resolved"
    assert alert["startsAt"] == "2027-01-15T08:00:00.000Z"
    assert alert["endsAt"] == "2027-01-15T08:30:00.000Z"
    assert alert["fingerprint"] == fired["fingerprint"]


def test_fingerprint_is_prometheus_label_signature() -> None:
    """The fingerprint equals Prometheus' own label signature (test vectors of prometheus/common)."""
    assert labels_fingerprint({}) == f"{14695981039346656037:016x}"
    assert labels_fingerprint({"name": "garland, briggs", "fear": "love is not enough"}) == \
        f"{5799056148416392346:016x}"


def test_alertmanager_api_body_opens_then_closes_one_alert() -> None:
    """The alertmanager_api body posts one alert that ends where the poster says (by default three 1-minute
    resend intervals ahead), then is closed by the resolve."""
    [opened] = render_alertmanager_api(firing(), host="studio")
    [reposted] = render_alertmanager_api(firing(), host="studio", firing_ends_at="2027-01-15T08:13:00.000Z")
    [closed] = render_alertmanager_api(resolved(), host="studio", firing_ends_at="2027-01-15T09:00:00.000Z")
    assert opened["labels"] == closed["labels"] == {
        "alertname": "engine.failed", "severity": "critical", "instance": "studio", "engine": "mlx"}
    assert opened["startsAt"] == reposted["startsAt"] == "2027-01-15T08:00:00.000Z"
    assert opened["endsAt"] == "2027-01-15T08:03:00.000Z"
    assert reposted["endsAt"] == "2027-01-15T08:13:00.000Z"
    assert closed["endsAt"] == "2027-01-15T08:30:00.000Z"
    assert "generatorURL" not in opened


def test_slack_message_escapes_markup_and_keeps_fallback_text() -> None:
    """Slack gets notification text and blocks; <, > and & in messages cannot inject links."""
    payload = render_slack(firing(summary="port <http://evil|click> & more"), host="studio")
    assert payload["text"].startswith(":rotating_light: [FIRING] engine.failed on mlx: port &lt;http://evil|click&gt; &amp;")
    assert "<http://evil" not in json.dumps(payload)
    types = [block["type"] for block in payload["blocks"]]
    assert types == ["section", "section", "context"]
    assert {"type": "mrkdwn", "text": "*restarts*\n5"} in payload["blocks"][1]["fields"]
    assert render_slack(resolved(), host="studio")["text"].startswith(":white_check_mark: [RESOLVED]")


def test_discord_message_has_an_embed_and_never_pings() -> None:
    """Discord gets content plus a coloured embed, within Discord's limits, with mentions disabled."""
    long = firing(summary="@everyone " + "x" * 5000)
    payload = render_discord(long, host="studio")
    assert payload["allowed_mentions"] == {"parse": []}
    assert len(payload["content"]) <= 2000
    [embed] = payload["embeds"]
    assert len(embed["description"]) <= 4096
    assert embed["color"] == 0xE01E5A
    assert embed["timestamp"] == "2027-01-15T08:00:00.000Z"
    assert {"name": "restarts", "value": "5", "inline": True} in embed["fields"]
    assert render_discord(resolved(), host="studio")["embeds"][0]["color"] == 0x2EB67D


def test_render_payload_refuses_an_unknown_format() -> None:
    """An unknown format name is an error that lists the valid ones."""
    with pytest.raises(ValueError, match="json, slack, discord, alertmanager, alertmanager_api"):
        render_payload(firing(), "teams", host="studio")


# ---------------------------------------------------------------------------- signing


def test_signature_verifies_and_detects_tampering() -> None:
    """A receiver accepts the signed body and rejects a changed body, secret, timestamp or delivery id."""
    body = encode_body(render_json(firing(), host="studio"))
    signature = sign("s3cret", 1800000000, "d-1", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify_signature("s3cret", "1800000000", "d-1", body, signature)
    assert verify_signature("s3cret", 1800000000, "d-1", body.decode(), signature)
    assert not verify_signature("s3cret", "1800000000", "d-1", body + b" ", signature)
    assert not verify_signature("other", "1800000000", "d-1", body, signature)
    assert not verify_signature("s3cret", "1800000001", "d-1", body, signature)
    assert not verify_signature("s3cret", "1800000000", "d-2", body, signature)
    assert not verify_signature("s3cret", "1800000000", "d-1", body, None)


def test_signature_refuses_replayed_old_requests() -> None:
    """With max_age_s, a correctly signed but old request is refused."""
    body = b"{}"
    signature = sign("k", 1000, "d", body)
    assert verify_signature("k", 1000, "d", body, signature, max_age_s=300, now_s=1200)
    assert not verify_signature("k", 1000, "d", body, signature, max_age_s=300, now_s=1400)


# ---------------------------------------------------------------------------- records


def test_alert_refuses_an_unknown_severity_naming_the_valid_ones() -> None:
    """An alert with a made-up severity fails and says which severities exist."""
    with pytest.raises(ValueError, match="info, warning, critical"):
        firing(severity="fatal")


def test_alert_refuses_details_that_are_not_json() -> None:
    """Details must be JSON values; anything else fails when the alert is made, not when it is sent."""
    with pytest.raises(ValueError, match="JSON"):
        firing(details={"when": object()})


def test_firing_helper_stamps_the_injected_wall_clock() -> None:
    """Alert.firing takes its timestamp from the injected clock, in UTC with a Z."""
    alert = Alert.firing("memory.stranded", "warning", "245 GB wired after a hang", clock=FakeClock(wall_s=1.8e9))
    assert alert.created_at == "2027-01-15T08:00:00.000Z"
    assert alert.event == "memory.stranded" and alert.engine is None


# ---------------------------------------------------------------------------- config


def target_table(**overrides: object) -> dict[str, object]:
    table: dict[str, object] = {"name": "oncall", "url": SECRET_URL, "format": "slack", "secret": "k",
                                "timeout": "3s", "headers": {"Authorization": "Bearer t"}}
    table.update(overrides)
    return {k: v for k, v in table.items() if v is not None}


def test_target_from_toml_reads_every_field() -> None:
    """A full [[alerts.webhook]] table becomes a target with the durations converted."""
    target = AlertTarget.from_toml(target_table(), file="c.toml", key="alerts.webhook[0]")
    assert (target.name, target.url, target.format, target.secret, target.timeout_s) == \
        ("oncall", SECRET_URL, "slack", "k", 3.0)
    assert target.headers == {"Authorization": "Bearer t"}


def test_target_defaults_to_json_and_five_seconds() -> None:
    """Only name and url are required; format json and a 5 s timeout are the defaults."""
    target = AlertTarget.from_toml({"name": "x", "url": "http://127.0.0.1:9/hook"}, file="c.toml", key="w")
    assert (target.format, target.timeout_s, target.secret, dict(target.headers)) == ("json", 5.0, None, {})


@pytest.mark.parametrize(
    ("overrides", "bad_key", "message"),
    [
        ({"format": "teams"}, "alerts.webhook[0].format", "json, slack, discord, alertmanager, alertmanager_api"),
        ({"url": None}, "alerts.webhook[0].url", "set url"),
        ({"url": "ftp://example.com/x"}, "alerts.webhook[0].url", "http:// or https://"),
        ({"timeout": "soon"}, "alerts.webhook[0].timeout", '"90s"'),
        ({"timeout": "10m"}, "alerts.webhook[0].timeout", "between 0 and 5m"),
        ({"name": "has space"}, "alerts.webhook[0].name", "letters, digits"),
        ({"retries": 3}, "alerts.webhook[0].retries", "valid keys here: name, url"),
        ({"headers": {"Content-Type": "text/plain"}}, "alerts.webhook[0].headers", "reserved"),
        ({"headers": {"X-A": "one\ntwo"}}, "alerts.webhook[0].headers", "one-line"),
        ({"secret": ""}, "alerts.webhook[0].secret", "non-empty"),
    ],
)
def test_target_errors_name_the_key_and_what_is_valid(overrides: dict[str, object], bad_key: str,
                                                      message: str) -> None:
    """Each invalid webhook field is reported with the file, the exact key, and what would be valid."""
    with pytest.raises(ConfigError, match=message) as caught:
        AlertTarget.from_toml(target_table(**overrides), file="c.toml", key="alerts.webhook[0]")
    assert caught.value.file == "c.toml"
    assert caught.value.key == bad_key


def test_url_errors_never_echo_the_url() -> None:
    """A malformed webhook URL is reported without printing it (it is a secret)."""
    with pytest.raises(ConfigError) as caught:
        AlertTarget.from_toml(target_table(url="ftp://hooks.example.com/very-secret-token"), file="c", key="w")
    assert "very-secret-token" not in str(caught.value)


def test_secrets_can_come_from_the_environment() -> None:
    """url_env and secret_env read the secrets from environment variables; a missing one is named."""
    env = {"HOOK_URL": SECRET_URL, "HOOK_KEY": "abc"}
    target = AlertTarget.from_toml({"name": "x", "url_env": "HOOK_URL", "secret_env": "HOOK_KEY"},
                                   file="c", key="w", environ=env)
    assert (target.url, target.secret) == (SECRET_URL, "abc")
    with pytest.raises(ConfigError, match="HOOK_MISSING is not set") as caught:
        AlertTarget.from_toml({"name": "x", "url_env": "HOOK_MISSING"}, file="c", key="w", environ=env)
    assert caught.value.key == "w.url_env"


def test_target_repr_hides_url_secret_and_headers() -> None:
    """Printing or logging a target shows its name, never the URL, secret or headers."""
    text = repr(AlertTarget.from_toml(target_table(), file="c", key="w"))
    assert "oncall" in text
    for secret in ("very-secret-token", "Bearer t", "'k'"):
        assert secret not in text


def test_settings_from_toml_reads_policy_and_targets() -> None:
    """The [alerts] table gives targets and delivery policy, durations as strings."""
    settings = AlertSettings.from_toml(
        {"rate_limit_per_min": 10, "max_attempts": 8, "initial_backoff": "2s", "max_backoff": "10m",
         "alertmanager_resend_interval": "30s",
         "webhook": [target_table(), target_table(name="backup", format="json")]},
        file="c.toml")
    assert [t.name for t in settings.targets] == ["oncall", "backup"]
    assert (settings.rate_limit_per_min, settings.max_attempts, settings.initial_backoff_s,
            settings.max_backoff_s, settings.alertmanager_resend_interval_s) == (10, 8, 2.0, 600.0, 30.0)


def test_settings_defaults_retry_forever() -> None:
    """Without settings, retryable failures are retried forever at up to 30 requests a minute."""
    settings = AlertSettings.from_toml({}, file="c.toml")
    assert (settings.targets, settings.rate_limit_per_min, settings.max_attempts, settings.initial_backoff_s,
            settings.max_backoff_s, settings.alertmanager_resend_interval_s) == ((), 30, None, 1.0, 300.0, 60.0)


@pytest.mark.parametrize(
    ("table", "bad_key", "message"),
    [
        ({"webhook": [target_table(), target_table()]}, "alerts.webhook[1].name", "already named 'oncall'"),
        ({"max_attempts": 0}, "alerts.max_attempts", "leave it out to retry"),
        ({"rate_limit_per_min": 0}, "alerts.rate_limit_per_min", "≥ 1"),
        ({"initial_backoff": "10m"}, "alerts.initial_backoff", "must not exceed max_backoff"),
        ({"max_backoff": "0s"}, "alerts.max_backoff", "must be greater than 0, got '0s'"),
        ({"webhook": {"name": "x"}}, "alerts.webhook", r"\[\[alerts.webhook\]\]"),
        ({"webhooks": []}, "alerts.webhooks", "valid keys here: webhook"),
        ({"alertmanager_resend_interval": "500ms"}, "alerts.alertmanager_resend_interval", "from 1s to 1h"),
        ({"alertmanager_resend_interval": "2h"}, "alerts.alertmanager_resend_interval", "from 1s to 1h"),
        ({"alertmanager_resend_interval": "0s"}, "alerts.alertmanager_resend_interval", "from 1s to 1h, got '0s'"),
    ],
)
def test_settings_errors_name_the_key(table: dict[str, object], bad_key: str, message: str) -> None:
    """Each invalid [alerts] setting is reported with its key and what would be valid."""
    with pytest.raises(ConfigError, match=message) as caught:
        AlertSettings.from_toml(table, file="c.toml")
    assert caught.value.key == bad_key
