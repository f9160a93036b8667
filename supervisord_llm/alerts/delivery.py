"""Durable alerts: webhook targets, payload formats, signing, and an outbox that never loses one.

Room: alerts.

An :class:`Alert` belongs to an *episode* named by its key (``"engine.failed:mlx"``): one
``firing`` opens the episode, one ``resolved`` closes it. The :class:`Outbox` turns each alert
into one *delivery* per configured target, persists the deliveries before anything is sent,
and sends them in order, one target at a time, until each is delivered or dropped.

Formats (``format`` of an ``[[alerts.webhook]]`` table)
-------------------------------------------------------

``json`` — the project's own schema (version 1)::

    {
      "version": 1,
      "event": "engine.failed",            # the episode key before the first ":"
      "key": "engine.failed:mlx",          # the episode key
      "status": "firing",                  # "firing" | "resolved"
      "severity": "critical",              # "info" | "warning" | "critical"
      "escalated_from": "warning",         # on the firing that raised an open episode's severity, else null
      "engine": "mlx",                     # or null for daemon-wide alerts
      "message": "mlx crashed 5 times in 10 minutes; giving up",
      "details": {"restarts": 5},          # free-form JSON object
      "episode_id": "6f1c…",               # the same for the firing and the resolved of one episode
      "alert_id": "0b2e…",                 # unique per alert: receivers deduplicate on it
      "started_at": "2025-03-01T12:00:00.000Z",  # when the episode began (UTC)
      "at": "2025-03-01T12:04:10.250Z",    # when this alert was raised (UTC, ISO 8601)
      "host": "studio.local"
    }

An episode is one thread: when a firing of higher severity arrives for an open episode (a crash
that became a crash loop), it is sent as an *escalation* of the same episode (same
``episode_id``, ``escalated_from`` set), and its resolve closes it at the raised severity.

Routing: each webhook's ``min_severity`` (default ``info``) drops alerts below it; an episode's
resolve is routed by the episode's severity, so it goes where the firing went.

Every format is clipped to its receiver's documented limits instead of being rejected (the
``SLACK_*``, ``DISCORD_*`` and ``ALERTMANAGER_*`` constants below).

``slack`` — an incoming-webhook message: ``{"text": ..., "blocks": [...]}``.
``discord`` — a webhook message: ``{"content": ..., "embeds": [...], "allowed_mentions": ...}``.
``alertmanager`` — the Alertmanager webhook payload, version "4" (what Alertmanager itself sends
to its receivers), so tools that accept Alertmanager webhooks accept these alerts.
``alertmanager_api`` — a list of postable alerts for Alertmanager's own ``POST /api/v2/alerts``
(point the URL at ``http://alertmanager:9093/api/v2/alerts``). As Alertmanager asks of its
clients, every open episode is posted again, firing, every ``alertmanager_resend_interval``
(default 1 minute; all of a target's open episodes in one request), and each post sets ``endsAt``
:data:`ALERTMANAGER_API_TTL_INTERVALS` intervals ahead. So the alert stays active while the
daemon runs, and when the daemon, or its machine, is gone for longer Alertmanager resolves it by
itself within those three intervals; a daemon that starts again posts what is still open at once.
The resolved alert ends it at once. A re-post goes out on time even while deliveries wait in the
target's queue (out a backoff, a ``Retry-After`` or the rate limit), between two of them; it
leaves out every key with something queued for that target (a resolve, an escalation, a new
episode), so it never overtakes or contradicts a queued message. Re-posts are not deliveries:
none is journaled, queued or counted, and ``rate_limit_per_min`` neither holds them back nor
counts them (one request per interval whatever is open; the interval is their limit). A failed one
is logged (``alert.resend_failed``) and tried again within the interval (after at most
:data:`ALERTMANAGER_RESEND_RETRY_S`), and at once when a delivery to the target works again.
Other formats, Alertmanager's own webhook body (``alertmanager``) included, get each firing and
each resolve once.

Config (``[alerts]``; every key optional)::

    [alerts]
    rate_limit_per_min = 30      # deliveries per target per minute; over it they wait (re-posts are not counted)
    max_attempts = 20            # leave out to retry timeouts, refused connections, 5xx, 408, 429 forever
    initial_backoff = "1s"       # doubles per failed attempt (with jitter) ...
    max_backoff = "5m"           # ... up to this; a Retry-After header wins
    host = "studio"              # "host"/"instance" in payloads (default: this machine's hostname)
    external_url = ""            # a link back to this daemon, for Alertmanager
    alertmanager_resend_interval = "1m"  # open episodes re-posted to alertmanager_api webhooks (1s to 1h)

    [[alerts.webhook]]
    name = "oncall"              # what logs and events call it (the URL never appears)
    url_env = "ONCALL_WEBHOOK"   # or url = "https://..."
    format = "slack"             # json | slack | discord | alertmanager | alertmanager_api
    secret_env = "ONCALL_SECRET" # or secret = "..."; signs every request (below)
    timeout = "5s"
    headers = { Authorization = "Bearer ..." }
    min_severity = "info"        # info | warning | critical: alerts below it are not sent here

Other 4xx answers are not retried: the delivery is dropped with an ``alert.dropped`` event.

Every request carries ``Content-Type: application/json``, a ``User-Agent``, and
``X-Supervisord-LLM-Delivery: <delivery id>`` (the same on every retry of one delivery). With a
``secret`` it is signed::

    X-Supervisord-LLM-Timestamp: 1740830650
    X-Supervisord-LLM-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{delivery_id}.{body}")>

where ``delivery_id`` is the ``X-Supervisord-LLM-Delivery`` header and ``body`` the raw request
bytes. Receivers check it with :func:`verify_signature`; to reject replays they also refuse a
timestamp older than a few minutes and a delivery id they have already accepted.

The outbox journal
------------------

``<state_dir>/alerts/outbox.jsonl`` is an append-only journal, one JSON record per line, each
append flushed and ``fsync``-ed before the call returns: ``queued`` (the alert and its
deliveries, written before any send), ``attempt`` (a failed, retryable try), ``delivered``,
``dropped``. On open the journal is replayed and then compacted: rewritten to a temporary
file, fsync-ed, renamed over the old one (and the directory fsync-ed), holding a ``snapshot``
(counters and open episodes) and one ``carried`` record per alert that still has pending
deliveries. It is compacted again every :data:`COMPACT_AFTER_RECORDS` appends.

Why a journal rather than one file per pending delivery: the outbox must also remember which
episodes are open (so that a daemon restart does not fire an episode twice or resolve one it
never fired) and the delivered/failed counters; one journal keeps all of it consistent with a
single fsync per change, where per-delivery files would need a second store for the rest.
A torn last line (power loss mid-append) is ignored on replay: that append never returned.

Delivery is at least once: a crash after the receiver answered 2xx but before ``delivered``
reached the disk re-sends that delivery after the restart, with the same ``alert_id`` and
``X-Supervisord-LLM-Delivery`` so receivers can drop the duplicate.

Webhook URLs (and custom headers) are secrets: they are never logged, never written to the
journal and never put into events; targets are named by ``name``.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

import anyio
import anyio.abc
import anyio.to_thread
import httpx

from supervisord_llm import __version__
from supervisord_llm.clock import Clock
from supervisord_llm.configtable import Table
from supervisord_llm.convert import parse_duration_s
from supervisord_llm.errors import ConfigError

FORMATS = ("json", "slack", "discord", "alertmanager", "alertmanager_api")
SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
# The keys of `llmctl alerts test`'s alerts: sent to every target, whatever its min_severity.
TEST_ALERT_PREFIX = "alerts.test."
# Details that become Alertmanager labels. They identify the episode there, so an episode keeps the
# values of the alert that opened it (a resolve or an escalation must name the same label set).
LABEL_DETAILS = ("exit",)
STATUSES = ("firing", "resolved")

SIGNATURE_HEADER = "X-Supervisord-LLM-Signature"
TIMESTAMP_HEADER = "X-Supervisord-LLM-Timestamp"
DELIVERY_HEADER = "X-Supervisord-LLM-Delivery"
USER_AGENT = f"supervisord-llm/{__version__}"

JSON_SCHEMA_VERSION = 1
COMPACT_AFTER_RECORDS = 512
# A server may ask for a long pause with Retry-After; beyond an hour it is more likely wrong.
RETRY_AFTER_CAP_S = 3600.0
# How long a sender with nothing to do sleeps before looking again (submissions from the event
# loop's own thread wake it at once; from other threads within this bound).
IDLE_POLL_S = 1.0
ALERTMANAGER_ZERO_TIME = "0001-01-01T00:00:00Z"
# How many resend intervals a firing alert posted to Alertmanager outlives its post: one late or
# failed re-post must not end it, a daemon gone for three intervals must (Prometheus' own margin is 4).
ALERTMANAGER_API_TTL_INTERVALS = 3.0
ALERTMANAGER_RESEND_DEFAULT_S = 60.0
# A re-post that failed is tried again after this long (or the interval, if shorter): the alert
# would end after three intervals without one.
ALERTMANAGER_RESEND_RETRY_S = 10.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RESERVED_HEADERS = {
    "content-type", "content-length", "host", "user-agent",
    SIGNATURE_HEADER.lower(), TIMESTAMP_HEADER.lower(), DELIVERY_HEADER.lower(),
}
_URL_IN_TEXT_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


# --------------------------------------------------------------------------- configuration


def _check_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            "expected a name of 1-64 characters from letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


def _check_url(value: object) -> str:
    # The value itself is never echoed: webhook URLs carry their secret in the path.
    if not isinstance(value, str):
        # ValueError, not TypeError: every field check's ValueError becomes the key's ConfigError.
        raise ValueError(f"expected an http:// or https:// URL as a string, got {type(value).__name__}")  # noqa: TRY004
    try:
        parts = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError("expected an http:// or https:// URL; the value does not parse as one "
                         "(not shown: webhook URLs are secrets)") from exc
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError("expected an http:// or https:// URL with a host "
                         f"(got scheme {parts.scheme or '(none)'!r}; the value is not shown: "
                         "webhook URLs are secrets)")
    return value


def _check_format(value: object) -> str:
    if value not in FORMATS:
        raise ValueError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return str(value)


def _check_secret(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string (the HMAC-SHA256 signing key)")
    return value


def _check_min_severity(value: object) -> str:
    if value not in SEVERITIES:
        raise ValueError(f"expected one of {', '.join(SEVERITIES)}, got {value!r}")
    return str(value)


def _check_timeout_s(value: object) -> float:
    seconds = parse_duration_s(value)
    if not 0 < seconds <= 300:
        raise ValueError(f"expected a timeout between 0 and 5m, got {value!r}")
    return seconds


def _check_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004 - becomes the key's ConfigError, like every field check
            'expected a table of header names to string values, e.g. {Authorization = "Bearer …"}')
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by the daemon itself; reserved: "
                             f"{', '.join(sorted(_RESERVED_HEADERS))}")
        if not isinstance(header_value, str) or "\r" in header_value or "\n" in header_value:
            raise ValueError(f"header {name!r}: expected a one-line string value")
        headers[name] = header_value
    return headers


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """One webhook. ``url``, ``secret`` and ``headers`` are secrets and stay out of ``repr``."""

    name: str
    url: str = field(repr=False)
    format: str = "json"
    secret: str | None = field(default=None, repr=False)
    timeout_s: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Alerts below this severity are not sent here (a pager gets "critical", a chat channel "info").
    # An episode is routed by its severity: its resolve goes where its firing went.
    min_severity: str = "info"

    def __post_init__(self) -> None:
        for attr, check in (("name", _check_name), ("url", _check_url), ("format", _check_format),
                            ("secret", _check_secret), ("timeout_s", _check_timeout_s),
                            ("headers", _check_headers), ("min_severity", _check_min_severity)):
            try:
                object.__setattr__(self, attr, check(getattr(self, attr)))
            except ValueError as exc:
                raise ValueError(f"alert target {attr}: {exc}") from None

    KEYS = ("name", "url", "url_env", "format", "secret", "secret_env", "timeout", "headers", "min_severity")

    @classmethod
    def from_toml(cls, table: object, *, file: str, key: str,
                  environ: Mapping[str, str] | None = None) -> AlertTarget:
        """Build a target from one ``[[alerts.webhook]]`` table; ConfigError names the bad key.

        ``url_env`` / ``secret_env`` name environment variables to read the URL / secret from,
        so that the secrets need not be in the config file.
        """
        t = Table(table, file, key)
        t.check_unknown(cls.KEYS)
        env = os.environ if environ is None else environ
        name = t.checked("name", _check_name)
        url_raw, url_key = t.secret("url", env, required_help="an http:// or https:// URL")
        url = t.checked(url_key, lambda _: _check_url(url_raw))
        secret_raw, secret_key = t.secret("secret", env)
        secret = t.checked(secret_key, lambda _: _check_secret(secret_raw))
        return cls(
            name=name,
            url=url,
            format=t.checked("format", _check_format, "json"),
            secret=secret,
            timeout_s=t.checked("timeout", _check_timeout_s, "5s"),
            headers=t.checked("headers", _check_headers, None),
            min_severity=t.checked("min_severity", _check_min_severity, "info"),
        )

    def wants(self, severity: str) -> bool:
        """Whether alerts of ``severity`` are sent to this target (its ``min_severity``)."""
        return SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """The ``[alerts]`` table: targets and delivery policy.

    ``max_attempts`` None retries retryable failures (timeouts, connection errors, 5xx, 408,
    429) forever; a number drops the delivery after that many failed attempts.
    ``rate_limit_per_min`` bounds the deliveries per target per minute; over it they wait.
    Alertmanager re-posts are outside it: ``alertmanager_resend_interval`` is their own bound.
    """

    targets: tuple[AlertTarget, ...] = ()
    rate_limit_per_min: int = 30
    max_attempts: int | None = None
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    host: str | None = None  # "instance"/"host" in payloads; None = this machine's hostname
    external_url: str = ""  # a link back to this daemon (Alertmanager externalURL/generatorURL)
    heartbeat: Any = None  # supervisord_llm.alerts.heartbeat.HeartbeatSettings, or None: no heartbeat
    # How often open episodes are posted again to alertmanager_api targets (their endsAt is
    # ALERTMANAGER_API_TTL_INTERVALS of these ahead).
    alertmanager_resend_interval_s: float = ALERTMANAGER_RESEND_DEFAULT_S

    KEYS = ("webhook", "rate_limit_per_min", "max_attempts", "initial_backoff", "max_backoff",
            "host", "external_url", "heartbeat", "alertmanager_resend_interval")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        names = [t.name for t in self.targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"alert target names must be unique; repeated: {', '.join(duplicates)}")
        if isinstance(self.rate_limit_per_min, bool) or not isinstance(self.rate_limit_per_min, int) \
                or self.rate_limit_per_min < 1:
            raise ValueError(f"rate_limit_per_min: expected a whole number ≥ 1, got {self.rate_limit_per_min!r}")
        if self.max_attempts is not None and (isinstance(self.max_attempts, bool)
                                              or not isinstance(self.max_attempts, int)
                                              or self.max_attempts < 1):
            raise ValueError(f"max_attempts: expected a whole number ≥ 1 (or unset: retry forever), "
                             f"got {self.max_attempts!r}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"expected 0 < initial_backoff_s ≤ max_backoff_s, got "
                             f"{self.initial_backoff_s} and {self.max_backoff_s}")
        if not 1.0 <= self.alertmanager_resend_interval_s <= 3600.0:
            raise ValueError("alertmanager_resend_interval_s: expected 1 to 3600 seconds, got "
                             f"{self.alertmanager_resend_interval_s!r}")

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname()

    def target(self, name: str) -> AlertTarget | None:
        return next((t for t in self.targets if t.name == name), None)

    @classmethod
    def from_toml(cls, table: object, *, file: str, key: str = "alerts",
                  environ: Mapping[str, str] | None = None) -> AlertSettings:
        """Build the settings from the ``[alerts]`` table (targets under ``webhook``)."""
        if table is None:
            return cls()
        t = Table(table, file, key)
        t.check_unknown(cls.KEYS)
        webhooks = t.data.get("webhook", [])
        if not isinstance(webhooks, list):
            raise t.error("webhook", "expected an array of tables: [[alerts.webhook]] with name, url, format, …")
        targets = tuple(AlertTarget.from_toml(w, file=file, key=f"{key}.webhook[{i}]", environ=environ)
                        for i, w in enumerate(webhooks))
        seen: set[str] = set()
        for i, target in enumerate(targets):
            if target.name in seen:
                raise ConfigError(f"another webhook is already named {target.name!r}; names must be unique",
                                  file=file, key=f"{key}.webhook[{i}].name")
            seen.add(target.name)

        def whole(name: str, default: int | None, minimum: int, help_text: str) -> int | None:
            value = t.data.get(name, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise t.error(name, f"expected {help_text}, got {value!r}")
            return value

        def duration(name: str, default: str) -> float:
            return t.duration_s(name, default, positive=True)

        heartbeat = None
        if t.has("heartbeat"):
            heartbeat = HeartbeatSettings.from_toml(t.data["heartbeat"], file=file, key=t.key("heartbeat"),
                                                    environ=environ)
            if heartbeat.watchdog_alert and not any(w.format == "alertmanager_api" for w in targets):
                raise t.sub("heartbeat").error(
                    "watchdog_alert", "watchdog_alert = true needs an [[alerts.webhook]] with format = "
                    '"alertmanager_api" (Alertmanager\'s /api/v2/alerts) to send the Watchdog alert to')
        initial = duration("initial_backoff", "1s")
        maximum = duration("max_backoff", "5m")
        resend_s = t.duration_s("alertmanager_resend_interval", "1m")
        if not 1.0 <= resend_s <= 3600.0:
            raise t.error("alertmanager_resend_interval",
                          f"expected a duration from 1s to 1h, got {t.data.get('alertmanager_resend_interval')!r}")
        if initial > maximum:
            raise t.error("initial_backoff", f"must not exceed max_backoff ({maximum:g}s), got {initial:g}s")
        rate_limit_per_min = whole("rate_limit_per_min", 30, 1, "a whole number of requests per minute ≥ 1")
        assert rate_limit_per_min is not None  # it has a default
        return cls(
            targets=targets,
            rate_limit_per_min=rate_limit_per_min,
            max_attempts=whole("max_attempts", None, 1,
                               "a whole number ≥ 1 (leave it out to retry retryable failures forever)"),
            initial_backoff_s=initial,
            max_backoff_s=maximum,
            host=t.str("host"),
            external_url=t.str("external_url", "") or "",
            heartbeat=heartbeat,
            alertmanager_resend_interval_s=resend_s,
        )


# --------------------------------------------------------------------------- the alert record


def iso_utc(wall_s: float) -> str:
    """Unix time as ISO 8601 UTC with milliseconds and a ``Z`` (RFC 3339)."""
    moment = datetime.fromtimestamp(wall_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _parse_iso_utc(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of an episode. Build with :meth:`firing` / :meth:`resolved`.

    ``episode_id`` and ``started_at`` are filled by :meth:`Outbox.submit` (a resolved alert
    takes them, the severity and, when it names none, the engine from the firing that opened
    its episode).
    """

    key: str
    status: str
    severity: str
    summary: str
    engine: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    episode_id: str | None = None
    created_at: str = field(default_factory=lambda: iso_utc(time.time()))
    started_at: str | None = None
    # Set on a firing that raised its open episode's severity (a crash loop after a crash): the
    # severity the episode had, so that Alertmanager formats can end the alert of that severity.
    previous_severity: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"alert key: expected a non-empty episode key such as 'engine.failed:mlx', got {self.key!r}")
        if self.status not in STATUSES:
            raise ValueError(f"alert status: expected one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert severity: expected one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        if self.previous_severity is not None and self.previous_severity not in SEVERITIES:
            raise ValueError(f"alert previous_severity: expected one of {', '.join(SEVERITIES)} or None, "
                             f"got {self.previous_severity!r}")
        try:
            json.dumps(dict(self.details))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"alert details must be a JSON object of JSON values: {exc}") from None

    @classmethod
    def firing(cls, key: str, severity: str, summary: str, *, engine: str | None = None,
               details: Mapping[str, Any] | None = None, clock: Clock | None = None) -> Alert:
        wall_s = clock.wall() if clock is not None else time.time()
        return cls(key=key, status="firing", severity=severity, summary=summary, engine=engine,
                   details=dict(details or {}), created_at=iso_utc(wall_s))

    @classmethod
    def resolved(cls, key: str, summary: str, *, engine: str | None = None,
                 details: Mapping[str, Any] | None = None, clock: Clock | None = None) -> Alert:
        wall_s = clock.wall() if clock is not None else time.time()
        return cls(key=key, status="resolved", severity="info", summary=summary, engine=engine,
                   details=dict(details or {}), created_at=iso_utc(wall_s))

    @property
    def event(self) -> str:
        """The kind of alert: the episode key before the first ``:``."""
        return self.key.split(":", 1)[0]

    @property
    def escalated(self) -> bool:
        """A firing that raised its open episode's severity."""
        return self.status == "firing" and self.previous_severity is not None

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "status": self.status, "severity": self.severity,
                "summary": self.summary, "engine": self.engine, "details": dict(self.details),
                "episode_id": self.episode_id, "created_at": self.created_at, "started_at": self.started_at,
                "previous_severity": self.previous_severity}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Alert:
        fields: dict[str, Any] = {name: record.get(name) for name in (
            "id", "key", "status", "severity", "summary", "engine", "episode_id", "created_at", "started_at",
            "previous_severity")}
        return cls(**fields, details=record.get("details") or {})


# --------------------------------------------------------------------------- payloads (pure)


# Receivers' documented limits. A payload over one is rejected whole (Slack answers
# ``invalid_blocks``, Discord 400), so every field is clipped to fit instead.
# Slack: https://api.slack.com/reference/block-kit/blocks (section text 3,000, 10 fields of 2,000,
# 50 blocks; context text 3,000 in at most 10 elements) and chat.postMessage (``text`` should stay
# under 4,000; it is cut at 40,000).
SLACK_TEXT_MAX = 3000
SLACK_SECTION_TEXT_MAX = 3000
SLACK_FIELDS_MAX = 10
SLACK_FIELD_TEXT_MAX = 2000
SLACK_BLOCKS_MAX = 50
# Discord: https://discord.com/developers/docs/resources/message#embed-object-embed-limits
DISCORD_CONTENT_MAX = 2000
DISCORD_TITLE_MAX = 256
DISCORD_DESCRIPTION_MAX = 4096
DISCORD_FIELDS_MAX = 25
DISCORD_FIELD_NAME_MAX = 256
DISCORD_FIELD_VALUE_MAX = 1024
DISCORD_FOOTER_MAX = 2048
DISCORD_EMBED_TOTAL_MAX = 6000  # title + description + field names and values + footer + author
# Alertmanager sets no limit of its own, but every label value is part of the alert's identity
# and is shown in every notification: long values are clipped; annotations carry the rest.
ALERTMANAGER_LABEL_VALUE_MAX = 256
ALERTMANAGER_ANNOTATION_MAX = 8192


def _title(alert: Alert) -> str:
    where = f" on {alert.engine}" if alert.engine else ""
    status = f"{alert.severity.upper()} (was {alert.previous_severity})" if alert.escalated else alert.status.upper()
    return f"[{status}] {alert.event}{where}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _detail_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def render_json(alert: Alert, *, host: str) -> dict[str, Any]:
    """The project's own schema, version 1 (see the module docstring)."""
    return {
        "version": JSON_SCHEMA_VERSION,
        "event": alert.event,
        "key": alert.key,
        "status": alert.status,
        "severity": alert.severity,
        "escalated_from": alert.previous_severity if alert.escalated else None,
        "engine": alert.engine,
        "message": alert.summary,
        "details": dict(alert.details),
        "episode_id": alert.episode_id,
        "alert_id": alert.id,
        "started_at": alert.started_at or alert.created_at,
        "at": alert.created_at,
        "host": host,
    }


_SLACK_EMOJI = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_slack(alert: Alert, *, host: str) -> dict[str, Any]:
    """A Slack incoming-webhook message: plain ``text`` for notifications, ``blocks`` for display."""
    emoji = ":white_check_mark:" if alert.status == "resolved" else _SLACK_EMOJI[alert.severity]
    title = _slack_escape(_title(alert))
    summary = _slack_escape(alert.summary)
    blocks: list[dict[str, Any]] = [
        {"type": "section",
         "text": {"type": "mrkdwn", "text": _clip(f"{emoji} *{title}*\n{summary}", SLACK_SECTION_TEXT_MAX)}},
    ]
    if alert.details:
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn",
             "text": _clip(f"*{_slack_escape(str(k))}*\n{_slack_escape(_detail_text(v))}", SLACK_FIELD_TEXT_MAX)}
            for k, v in list(alert.details.items())[:SLACK_FIELDS_MAX]
        ]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(_slack_escape(
        f"{alert.severity} · host {host} · episode {(alert.episode_id or '')[:8]} · {alert.created_at}"),
        SLACK_SECTION_TEXT_MAX)}]})
    return {"text": _clip(f"{emoji} {title}: {summary}", SLACK_TEXT_MAX), "blocks": blocks[:SLACK_BLOCKS_MAX]}


_DISCORD_COLOURS = {"critical": 0xE01E5A, "warning": 0xECB22E, "info": 0x36C5F0}
_DISCORD_RESOLVED_COLOUR = 0x2EB67D


def _discord_embed_chars(embed: Mapping[str, Any]) -> int:
    return (len(embed["title"]) + len(embed["description"]) + len(embed["footer"]["text"])
            + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"]))


def render_discord(alert: Alert, *, host: str) -> dict[str, Any]:
    """A Discord webhook message with one embed; mentions in summaries never ping anyone."""
    colour = _DISCORD_RESOLVED_COLOUR if alert.status == "resolved" else _DISCORD_COLOURS[alert.severity]
    fields = [{"name": _clip(str(k), DISCORD_FIELD_NAME_MAX), "value": _clip(_detail_text(v), DISCORD_FIELD_VALUE_MAX)
               or "-", "inline": True} for k, v in alert.details.items()][: DISCORD_FIELDS_MAX - 2]
    fields += [{"name": "severity", "value": alert.severity, "inline": True},
               {"name": "host", "value": _clip(host, DISCORD_FIELD_VALUE_MAX), "inline": True}]
    embed: dict[str, Any] = {
        "title": _clip(_title(alert), DISCORD_TITLE_MAX),
        "description": _clip(alert.summary, DISCORD_DESCRIPTION_MAX),
        "color": colour,
        "fields": fields,
        "timestamp": alert.created_at,
        "footer": {"text": _clip(f"supervisord-llm · {alert.key} · episode {alert.episode_id or '-'}",
                                 DISCORD_FOOTER_MAX)},
    }
    # Over the 6,000-character total Discord refuses the whole message: drop detail fields from
    # the end (severity and host stay), then shorten the description.
    while _discord_embed_chars(embed) > DISCORD_EMBED_TOTAL_MAX and len(embed["fields"]) > 2:
        del embed["fields"][-3]
    excess = _discord_embed_chars(embed) - DISCORD_EMBED_TOTAL_MAX
    if excess > 0:
        embed["description"] = _clip(embed["description"], max(1, len(embed["description"]) - excess))
    return {
        "content": _clip(f"{_title(alert)}: {alert.summary}", DISCORD_CONTENT_MAX),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def labels_fingerprint(labels: Mapping[str, str]) -> str:
    """Prometheus' label-set fingerprint (FNV-1a 64 over sorted name, 0xff, value, 0xff), as 16 hex digits."""
    digest = 14695981039346656037
    for name in sorted(labels):
        for byte in name.encode() + b"\xff" + labels[name].encode() + b"\xff":
            digest ^= byte
            digest = (digest * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def _alertmanager_labels(alert: Alert, host: str, severity: str | None = None) -> dict[str, str]:
    labels = {"alertname": alert.event, "severity": severity or alert.severity,
              "instance": _clip(host, ALERTMANAGER_LABEL_VALUE_MAX)}
    if alert.engine:
        labels["engine"] = _clip(alert.engine, ALERTMANAGER_LABEL_VALUE_MAX)
    for name in LABEL_DETAILS:
        value = alert.details.get(name)
        if isinstance(value, str) and value:
            labels[name] = _clip(value, ALERTMANAGER_LABEL_VALUE_MAX)
    return labels


def _alertmanager_annotations(alert: Alert) -> dict[str, str]:
    lines = [alert.summary] + [f"{k}: {_detail_text(v)}" for k, v in alert.details.items()]
    return {"summary": _clip(alert.summary, ALERTMANAGER_ANNOTATION_MAX),
            "description": _clip("\n".join(lines), ALERTMANAGER_ANNOTATION_MAX)}


def render_alertmanager(alert: Alert, *, host: str, receiver: str, external_url: str = "") -> dict[str, Any]:
    """The Alertmanager webhook payload, version "4", with this one alert.

    Labels: ``alertname`` (the event), ``severity``, ``instance`` (the host), ``engine`` when
    the alert is about one engine, and ``exit`` for an engine's exit episode. Grouped by
    alertname and engine. An escalation also carries the alert of the episode's previous
    severity, resolved (Alertmanager tells alerts apart by their labels).
    """
    labels = _alertmanager_labels(alert, host)
    annotations = _alertmanager_annotations(alert)
    group_labels = {k: labels[k] for k in ("alertname", "engine") if k in labels}
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
    alerts = [{
        "status": alert.status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": alert.started_at or alert.created_at,
        "endsAt": alert.created_at if alert.status == "resolved" else ALERTMANAGER_ZERO_TIME,
        "generatorURL": external_url,
        "fingerprint": labels_fingerprint(labels),
    }]
    if alert.escalated:
        previous = _alertmanager_labels(alert, host, alert.previous_severity)
        alerts.append({**alerts[0], "status": "resolved", "labels": previous, "endsAt": alert.created_at,
                       "fingerprint": labels_fingerprint(previous)})
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": alert.status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": alerts,
    }


def render_alertmanager_api(alert: Alert, *, host: str, external_url: str = "",
                            firing_ends_at: str | None = None) -> list[dict[str, Any]]:
    """The body for Alertmanager's ``POST /api/v2/alerts``: one postable alert (two for an escalation).

    The resolved alert carries the same labels as its firing (the outbox copies the firing's
    severity and label details), so Alertmanager closes the same alert. An escalation ends the
    alert of the previous severity in the same request. A firing alert ends at ``firing_ends_at``
    (the outbox sets it from the time of each post), by default three default resend intervals
    after it was raised.
    """
    starts_at = alert.started_at or alert.created_at
    if alert.status == "resolved":
        ends_at = alert.created_at
    elif firing_ends_at is not None:
        ends_at = firing_ends_at
    else:
        ends_at = iso_utc(_parse_iso_utc(alert.created_at)
                          + ALERTMANAGER_API_TTL_INTERVALS * ALERTMANAGER_RESEND_DEFAULT_S)
    posted: dict[str, Any] = {
        "labels": _alertmanager_labels(alert, host),
        "annotations": _alertmanager_annotations(alert),
        "startsAt": starts_at,
        "endsAt": ends_at,
    }
    if external_url:
        posted["generatorURL"] = external_url
    if alert.escalated:
        ended = {**posted, "labels": _alertmanager_labels(alert, host, alert.previous_severity),
                 "endsAt": alert.created_at}
        return [ended, posted]
    return [posted]


def render_payload(alert: Alert, fmt: str, *, host: str, receiver: str = "", external_url: str = "",
                   firing_ends_at: str | None = None) -> Any:
    """The JSON value to send for ``fmt`` (one of :data:`FORMATS`); ``firing_ends_at`` is for ``alertmanager_api``."""
    if fmt == "json":
        return render_json(alert, host=host)
    if fmt == "slack":
        return render_slack(alert, host=host)
    if fmt == "discord":
        return render_discord(alert, host=host)
    if fmt == "alertmanager":
        return render_alertmanager(alert, host=host, receiver=receiver, external_url=external_url)
    if fmt == "alertmanager_api":
        return render_alertmanager_api(alert, host=host, external_url=external_url, firing_ends_at=firing_ends_at)
    raise ValueError(f"unknown alert format {fmt!r}; expected one of {', '.join(FORMATS)}")


def encode_body(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- signing


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def sign(secret: str, timestamp: str | int, delivery_id: str, body: str | bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{delivery_id}.{body}")>``.

    The timestamp and the delivery id are signed with the body (as Stripe and Slack sign theirs):
    a receiver that refuses old timestamps and delivery ids it has already seen cannot be fed a
    captured request again, nor the same body under a fresh delivery id.
    """
    message = str(timestamp).encode() + b"." + delivery_id.encode() + b"." + _as_bytes(body)
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_headers(secret: str, body: bytes, timestamp_s: int, delivery_id: str) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp_s), SIGNATURE_HEADER: sign(secret, timestamp_s, delivery_id, body)}


def verify_signature(secret: str, timestamp: str | int, delivery_id: str, body: str | bytes,
                     signature: str | None, *, max_age_s: float | None = None,
                     now_s: float | None = None) -> bool:
    """True when ``signature`` signs this timestamp, delivery id and body under ``secret`` (constant time).

    With ``max_age_s`` a timestamp further than that from ``now_s`` (Unix seconds, default
    now) is refused. Together with remembering the delivery ids seen within ``max_age_s``, that
    rejects every replay (a retry of one delivery carries the same id and a new timestamp).
    """
    if not signature or not isinstance(delivery_id, str):
        return False
    if max_age_s is not None:
        try:
            age_s = abs((time.time() if now_s is None else now_s) - float(timestamp))
        except ValueError:
            return False
        if age_s > max_age_s:
            return False
    return hmac.compare_digest(sign(secret, timestamp, delivery_id, body), signature)


# --------------------------------------------------------------------------- keeping URLs out of logs


class _UrlRedactor(logging.Filter):
    """Rewrites records of the HTTP libraries that would print a webhook URL.

    httpx logs every request with its full URL at INFO; webhook URLs carry their secret.
    """

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.urls:
            return True
        message = record.getMessage()
        redacted = message
        for url in self.urls:
            if url in redacted:
                redacted = redacted.replace(url, "<webhook url>")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACTOR = _UrlRedactor()
# httpx logs "HTTP Request: POST <url> ..." on its own logger; httpcore logs host and port only.
logging.getLogger("httpx").addFilter(_REDACTOR)


def _describe_error(exc: BaseException) -> str:
    text = _URL_IN_TEXT_RE.sub("<url>", str(exc)) or "(no message)"
    return _clip(f"{type(exc).__name__}: {text}", 300)


# --------------------------------------------------------------------------- the outbox


@dataclass(slots=True)
class _Delivery:
    id: str
    alert_id: str
    target: str
    queued_at: str
    attempts: int = 0
    last_error: str | None = None
    not_before_s: float = 0.0  # monotonic; kept in memory only: after a restart, try at once

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "target": self.target, "queued_at": self.queued_at,
                "attempts": self.attempts, "last_error": self.last_error}


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    """A delivery not yet delivered nor dropped, as :meth:`Outbox.pending` reports it."""

    delivery_id: str
    alert_id: str
    key: str
    status: str
    target: str
    queued_at: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class _Episode:
    episode_id: str
    started_at: str
    severity: str
    engine: str | None = None
    exit: str | None = None  # the label detail of the alert that opened it (see LABEL_DETAILS)
    firing: Alert | None = None  # its last firing (the opening one, or the escalation): what a re-post sends

    def to_record(self) -> dict[str, Any]:
        return {"episode_id": self.episode_id, "started_at": self.started_at, "severity": self.severity,
                "engine": self.engine, "exit": self.exit,
                "alert": None if self.firing is None else self.firing.to_record()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> _Episode:
        alert = record.get("alert")  # absent from journals written before re-posts
        return cls(record["episode_id"], record["started_at"], record["severity"], record.get("engine"),
                   record.get("exit"), Alert.from_record(alert) if isinstance(alert, Mapping) else None)

    def reposted(self, key: str) -> Alert:
        """The firing alert a re-post sends (without an escalation's end of the previous severity)."""
        if self.firing is not None:
            return replace(self.firing, previous_severity=None)
        return Alert(key=key, status="firing", severity=self.severity, summary=key, engine=self.engine,
                     details={"exit": self.exit} if self.exit else {}, episode_id=self.episode_id,
                     created_at=self.started_at, started_at=self.started_at)


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # "delivered" | "retry" | "drop"
    http_status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


class _Journal:
    """The append-only JSONL file: every append is flushed and fsync-ed before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self.appended = 0

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """All complete records, and how many lines could not be read."""
        if not self.path.exists():
            return [], 0
        lines = self.path.read_bytes().split(b"\n")
        records, bad = [], 0
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if index == len(lines) - 1:
                    continue  # a torn last append: it never returned, so nothing relied on it
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
        return records, bad

    def append(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open between appends
        self._file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.appended += 1

    def rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.close()
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "wb") as out:
            out.writelines(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.appended = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keep_copy(self) -> str | None:
        """Copy the journal to ``<name>.corrupt-<n>`` (the first free n); the copy's name, or None."""
        n = 0
        while (target := self.path.with_name(f"{self.path.name}.corrupt-{n}")).exists():
            n += 1
        try:
            shutil.copy2(self.path, target)
        except OSError:
            return None
        return target.name


EventCallback = Callable[[str, dict[str, Any]], None]


class Outbox:
    """Durable, deduplicated, rate-limited delivery of alerts to every configured webhook.

    ``submit()`` may be called from any thread (it does one fsync-ed append); ``run()`` is the
    delivery loop, an anyio task. One sender per target delivers that target's queue in order,
    so a resolved alert never overtakes its firing. ``on_event(kind, fields)`` is called on the
    event loop with ``alert.delivered`` and ``alert.dropped``; fields name the target, never its URL.
    """

    def __init__(self, state_dir: str | os.PathLike[str], settings: AlertSettings, clock: Clock, logger: Any,
                 http_client_factory: Callable[[], httpx.AsyncClient] | None = None, *,
                 on_event: EventCallback | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._log = logger
        self._client_factory = http_client_factory or self._default_client
        self._on_event = on_event
        self._host = settings.hostname
        self._lock = threading.Lock()
        self._alerts: dict[str, Alert] = {}
        self._pending: dict[str, _Delivery] = {}
        self._open: dict[str, _Episode] = {}
        self._delivered = 0
        self._failed = 0
        self._sent_at_s: dict[str, deque[float]] = {t.name: deque() for t in settings.targets}
        self._resend_failing: set[str] = set()  # alertmanager_api targets whose last re-post failed
        self._wake: dict[str, anyio.Event] = {}
        self._loop_thread: int | None = None
        for target in settings.targets:
            _REDACTOR.urls.add(target.url)

        self.directory = Path(state_dir) / "alerts"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._journal = _Journal(self.directory / "outbox.jsonl")
        records, bad = self._journal.read()
        for record in records:
            try:
                self._apply(record)
            except (KeyError, TypeError, ValueError, AttributeError):
                bad += 1  # valid JSON of the wrong shape: skipped like a damaged line, never fatal
        if bad:
            # Compaction below rewrites the journal: keep the damaged original for inspection first.
            kept = self._journal.keep_copy()
            self._log.warning("alert.journal_damaged", path=str(self._journal.path), unreadable_lines=bad,
                              kept_copy=kept)
        removed = [d for d in self._pending.values() if settings.target(d.target) is None]
        events = []
        for delivery in removed:
            reason = f"target {delivery.target!r} is no longer configured"
            self._apply({"op": "dropped", "id": delivery.id, "reason": reason})
            events.append(self._event_fields(delivery, reason=reason))
        self._compact()
        for fields in events:
            self._log.error("alert.dropped", **fields)
            self._emit("alert.dropped", fields)
        if self._pending:
            self._log.info("alert.resumed", pending=len(self._pending))

    # ---- public API

    def submit(self, alert: Alert) -> bool:
        """Queue ``alert`` for every target that wants its severity; False when it was deduplicated.

        A firing is queued once per open episode, unless it raises the episode's severity (an
        escalation: same episode id, ``previous_severity`` set); a resolved only closes an open
        episode. The record is on disk before this returns. An alert below every target's
        ``min_severity`` still opens or closes its episode, with no delivery.
        """
        with self._lock:
            if not self.settings.targets:
                self._log.debug("alert.not_queued", key=alert.key, reason="no webhook targets configured")
                return False
            episode = self._open.get(alert.key)
            if alert.status == "firing":
                if episode is not None:
                    if SEVERITY_RANK[alert.severity] <= SEVERITY_RANK[episode.severity]:
                        self._log.debug("alert.deduplicated", key=alert.key, status=alert.status,
                                        episode_id=episode.episode_id)
                        return False
                    alert = replace(alert, episode_id=episode.episode_id, started_at=episode.started_at,
                                    previous_severity=episode.severity, engine=alert.engine or episode.engine,
                                    details=self._episode_labels(alert.details, episode))
                else:
                    alert = replace(alert, episode_id=alert.episode_id or str(uuid.uuid4()),
                                    started_at=alert.started_at or alert.created_at)
            else:
                if episode is None:
                    self._log.debug("alert.deduplicated", key=alert.key, status=alert.status,
                                    reason="no open episode to resolve")
                    return False
                # The resolve carries its firing's labels, so that Alertmanager closes the same alert.
                alert = replace(alert, episode_id=episode.episode_id, started_at=episode.started_at,
                                severity=episode.severity, engine=alert.engine or episode.engine,
                                details=self._episode_labels(alert.details, episode))
            now_iso = iso_utc(self._clock.wall())
            # A test alert (`llmctl alerts test`) goes through every target, whatever its min_severity.
            test = alert.key.startswith(TEST_ALERT_PREFIX)
            deliveries = [_Delivery(id=str(uuid.uuid4()), alert_id=alert.id, target=t.name, queued_at=now_iso)
                          for t in self.settings.targets if test or t.wants(alert.severity)]
            record = {"op": "queued", "alert": alert.to_record(),
                      "deliveries": [d.to_record() for d in deliveries]}
            self._persist(record)
            self._apply(record)
            self._maybe_compact()
        self._log.info("alert.queued", key=alert.key, status=alert.status, severity=alert.severity,
                       alert_id=alert.id, targets=[d.target for d in deliveries])
        for delivery in deliveries:
            self._wake_sender(delivery.target)
        return True

    @staticmethod
    def _episode_labels(details: Mapping[str, Any], episode: _Episode) -> dict[str, Any]:
        """``details`` with the label details of the alert that opened ``episode``."""
        merged = dict(details)
        if episode.exit is not None:
            if "exit" in merged and merged["exit"] != episode.exit:
                merged["last_exit"] = merged["exit"]
            merged["exit"] = episode.exit
        return merged

    def submit_action(self, action: Any) -> bool:
        """Submit a policy's ``Alert`` action (``key``, ``severity``, ``summary``, ``details``, ``resolved``).

        The engine is ``details["engine"]`` when present, else the episode key's part after the
        first ``:`` (the convention ``"engine.failed:mlx"``).
        """
        details = dict(getattr(action, "details", None) or {})
        if "engine" in details:
            engine = details["engine"] if isinstance(details["engine"], str) else None
        else:
            engine = action.key.split(":", 1)[1] if ":" in action.key else None
        if getattr(action, "resolved", False):
            alert = Alert.resolved(action.key, action.summary, engine=engine, details=details, clock=self._clock)
        else:
            alert = Alert.firing(action.key, action.severity, action.summary, engine=engine, details=details,
                                 clock=self._clock)
        return self.submit(alert)

    def counts(self) -> dict[str, int]:
        """``{"pending", "delivered", "failed"}`` (failed = dropped), over the outbox's lifetime."""
        with self._lock:
            return {"pending": len(self._pending), "delivered": self._delivered, "failed": self._failed}

    def pending(self) -> list[PendingDelivery]:
        """Deliveries still to be made, in queue order."""
        with self._lock:
            return [PendingDelivery(delivery_id=d.id, alert_id=d.alert_id, key=self._alerts[d.alert_id].key,
                                    status=self._alerts[d.alert_id].status, target=d.target,
                                    queued_at=d.queued_at, attempts=d.attempts, last_error=d.last_error)
                    for d in self._pending.values()]

    def open_episodes(self) -> dict[str, str]:
        """Episode key -> episode id of every episode that fired and has not been resolved."""
        with self._lock:
            return {key: episode.episode_id for key, episode in self._open.items()}

    def open_episode_details(self) -> dict[str, dict[str, Any]]:
        """Episode key -> the details of its last firing, of every open episode ({} for an episode journaled
        before firings were kept): what a policy that ends episodes on evidence needs to know of them."""
        with self._lock:
            return {key: dict(episode.firing.details) if episode.firing is not None else {}
                    for key, episode in self._open.items()}

    async def run(self, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Cancelling loses nothing: an interrupted send stays pending."""
        if not self.settings.targets:
            task_status.started()
            await anyio.sleep_forever()
        self._loop_thread = threading.get_ident()
        self._wake = {t.name: anyio.Event() for t in self.settings.targets}
        try:
            async with self._client_factory() as client, anyio.create_task_group() as group:
                for target in self.settings.targets:
                    group.start_soon(self._send_forever, client, target, name=f"alerts:{target.name}")
                task_status.started()
        finally:
            self._loop_thread = None

    def close(self) -> None:
        """Close the journal file. Call after ``run()`` has ended."""
        with self._lock:
            self._journal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- state (callers hold the lock, or are __init__)

    def _apply(self, record: Mapping[str, Any]) -> None:
        """Apply one journal record to memory. Idempotent, so replaying a record twice is harmless."""
        op = record.get("op")
        if op == "snapshot":
            self._delivered = int(record.get("delivered", 0))
            self._failed = int(record.get("failed", 0))
            self._open = {key: _Episode.from_record(value) for key, value in record.get("episodes", {}).items()}
        elif op in ("queued", "carried"):
            alert = Alert.from_record(record["alert"])
            if op == "queued":  # "carried" copies a queued alert during compaction: episodes are in the snapshot
                if alert.status == "firing":
                    exit_label = alert.details.get("exit")
                    self._open[alert.key] = _Episode(alert.episode_id or alert.id,
                                                     alert.started_at or alert.created_at, alert.severity,
                                                     alert.engine,
                                                     exit_label if isinstance(exit_label, str) else None,
                                                     alert)
                else:
                    self._open.pop(alert.key, None)
            added = False
            for item in record.get("deliveries", []):
                if item["id"] in self._pending:
                    continue
                self._pending[item["id"]] = _Delivery(
                    id=item["id"], alert_id=alert.id, target=item["target"], queued_at=item.get("queued_at", ""),
                    attempts=int(item.get("attempts", 0)), last_error=item.get("last_error"))
                added = True
            if added:
                self._alerts[alert.id] = alert
        elif op == "attempt":
            delivery = self._pending.get(record.get("id", ""))
            if delivery is not None:
                delivery.attempts = max(delivery.attempts, int(record.get("attempts", 0)))
                delivery.last_error = record.get("error")
        elif op in ("delivered", "dropped"):
            delivery = self._pending.pop(record.get("id", ""), None)
            if delivery is None:
                return
            if op == "delivered":
                self._delivered += 1
            else:
                self._failed += 1
            if not any(d.alert_id == delivery.alert_id for d in self._pending.values()):
                self._alerts.pop(delivery.alert_id, None)

    def _persist(self, record: Mapping[str, Any]) -> None:
        try:
            self._journal.append(record)
        except OSError as exc:
            # Keep delivering from memory: losing the disk must not also silence the alerts.
            self._log.error("alert.journal_failed", path=str(self._journal.path), error=_describe_error(exc))

    def _snapshot_records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [{
            "op": "snapshot", "version": 1, "delivered": self._delivered, "failed": self._failed,
            "episodes": {key: e.to_record() for key, e in self._open.items()},
        }]
        by_alert: dict[str, list[_Delivery]] = {}
        for delivery in self._pending.values():
            by_alert.setdefault(delivery.alert_id, []).append(delivery)
        for alert_id, deliveries in by_alert.items():
            records.append({"op": "carried", "alert": self._alerts[alert_id].to_record(),
                            "deliveries": [d.to_record() for d in deliveries]})
        return records

    def _compact(self) -> None:
        try:
            self._journal.rewrite(self._snapshot_records())
        except OSError as exc:
            self._log.error("alert.journal_failed", path=str(self._journal.path), error=_describe_error(exc))

    def _maybe_compact(self) -> None:
        if self._journal.appended >= COMPACT_AFTER_RECORDS:
            self._compact()

    def _event_fields(self, delivery: _Delivery, **extra: Any) -> dict[str, Any]:
        alert = self._alerts.get(delivery.alert_id)
        fields: dict[str, Any] = {"alert_id": delivery.alert_id, "delivery_id": delivery.id,
                                  "target": delivery.target, "attempts": delivery.attempts}
        if alert is not None:
            fields.update(key=alert.key, status=alert.status, severity=alert.severity, engine=alert.engine,
                          episode_id=alert.episode_id)
        fields.update(extra)
        return fields

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, dict(fields))

    # ---- delivery

    @staticmethod
    def _default_client() -> httpx.AsyncClient:
        # Redirects are not followed: a webhook that moved should be reconfigured, and following
        # one would send a signed alert to a host nobody configured.
        return httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": USER_AGENT})

    def wake(self) -> None:
        """Wake every target's sender (on the event loop): alerts submitted from another thread."""
        for target in list(self._wake):
            self._wake_sender(target)

    def _wake_sender(self, target: str) -> None:
        event = self._wake.get(target)
        if event is not None and threading.get_ident() == self._loop_thread:
            event.set()

    async def _sleep_or_wake(self, target: str, seconds: float) -> None:
        event = self._wake[target]
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()
        if event.is_set():
            self._wake[target] = anyio.Event()

    def _head(self, target: str) -> tuple[_Delivery, Alert] | None:
        with self._lock:
            for delivery in self._pending.values():
                if delivery.target == target:
                    return delivery, self._alerts[delivery.alert_id]
            return None

    def _rate_wait_s(self, target: str, now_s: float) -> float:
        window = self._sent_at_s.setdefault(target, deque())
        while window and now_s - window[0] >= 60.0:
            window.popleft()
        if len(window) < self.settings.rate_limit_per_min:
            return 0.0
        return 60.0 - (now_s - window[0])

    async def _send_forever(self, client: httpx.AsyncClient, target: AlertTarget) -> None:
        rate_limited_logged = False
        # Alertmanager's API: open episodes are posted again while they last, the first time at once
        # (after a restart, what was open may have ended there meanwhile).
        resend_at_s = self._clock.now() if target.format == "alertmanager_api" else None
        while True:
            now_s = self._clock.now()
            if resend_at_s is not None and now_s >= resend_at_s:
                # Due even with deliveries queued here (one waiting out a backoff, or the rate limit,
                # must not let the other alerts lapse); this sender posts one thing at a time and the
                # re-post leaves out every key with a message queued here, so it never overtakes one.
                resend_at_s = now_s + await self._resend_open(client, target)
                continue
            until_resend_s = math.inf if resend_at_s is None else resend_at_s - now_s
            head = self._head(target.name)
            if head is None:
                await self._sleep_or_wake(target.name, min(until_resend_s, IDLE_POLL_S))
                continue
            delivery, alert = head
            rate_wait_s = self._rate_wait_s(target.name, now_s)
            if rate_wait_s > 0 and not rate_limited_logged:
                with self._lock:
                    waiting = sum(1 for d in self._pending.values() if d.target == target.name)
                self._log.warning("alert.rate_limited", target=target.name,
                                  rate_limit_per_min=self.settings.rate_limit_per_min, pending=waiting)
                rate_limited_logged = True
            wait_s = max(delivery.not_before_s - now_s, rate_wait_s)
            if wait_s > 0:
                await self._sleep_or_wake(target.name, min(wait_s, until_resend_s, IDLE_POLL_S))
                continue
            rate_limited_logged = False
            self._sent_at_s[target.name].append(now_s)
            outcome = await self._post_once(client, target, alert, delivery)
            kind, fields = await anyio.to_thread.run_sync(self._record_outcome, target, delivery, outcome)
            if kind == "alert.delivered" and target.name in self._resend_failing:
                resend_at_s = self._clock.now()  # it answers again: refresh what failed to be re-posted
            if kind == "alert.delivered":
                self._log.info(kind, **fields)
            elif kind == "alert.dropped":
                self._log.error(kind, **fields)
            else:
                self._log.warning(kind, **fields)
            if kind != "alert.retrying":
                self._emit(kind, fields)

    def _firing_ends_at(self) -> str:
        """``endsAt`` of a firing alert posted to Alertmanager now: a few resend intervals ahead."""
        return iso_utc(self._clock.wall() + ALERTMANAGER_API_TTL_INTERVALS * self.settings.alertmanager_resend_interval_s)

    async def _resend_open(self, client: httpx.AsyncClient, target: AlertTarget) -> float:
        """Post every open episode routed to ``target`` again, firing, with a fresh ``endsAt``, in one
        request; the seconds until the next re-post. Not a delivery: nothing is journaled, queued or
        retried beyond the next re-post, which comes sooner after a failure. Neither held back by nor
        counted in ``rate_limit_per_min``: one request per interval, whatever is open.

        A key with anything queued for ``target`` (a resolve, an escalation, a new episode's firing)
        is left out: its queued message comes next for it, and a re-post must not overtake it."""
        interval_s = self.settings.alertmanager_resend_interval_s
        with self._lock:
            queued = {self._alerts[d.alert_id].key for d in self._pending.values() if d.target == target.name}
            alerts = [episode.reposted(key) for key, episode in self._open.items()
                      if key not in queued and (key.startswith(TEST_ALERT_PREFIX) or target.wants(episode.severity))]
        if not alerts:
            return interval_s
        ends_at = self._firing_ends_at()
        body = encode_body([posted for alert in alerts for posted in render_alertmanager_api(
            alert, host=self._host, external_url=self.settings.external_url, firing_ends_at=ends_at)])
        retry_s = min(interval_s, ALERTMANAGER_RESEND_RETRY_S)
        failure: dict[str, Any] = {}
        try:
            response = await client.post(target.url, content=body, headers=self._headers(target, body, str(uuid.uuid4())),
                                         timeout=httpx.Timeout(target.timeout_s))
            if not 200 <= response.status_code < 300:
                failure = {"http_status": response.status_code}
        except httpx.HTTPError as exc:
            failure = {"error": _describe_error(exc)}
        failing = target.name in self._resend_failing
        if failure:
            # Logged when re-posts start failing and when they work again, not every try of an outage.
            (self._log.debug if failing else self._log.warning)(
                "alert.resend_failed", target=target.name, episodes=len(alerts), retry_in_s=retry_s, **failure)
            self._resend_failing.add(target.name)
            return retry_s
        if failing:
            self._resend_failing.discard(target.name)
            self._log.info("alert.resend_recovered", target=target.name, episodes=len(alerts))
        self._log.debug("alert.resent", target=target.name, episodes=len(alerts), ends_at=ends_at)
        return interval_s

    async def _post_once(self, client: httpx.AsyncClient, target: AlertTarget, alert: Alert,
                         delivery: _Delivery) -> _Outcome:
        """One POST; the outbox, not this function, decides about retries."""
        body = encode_body(render_payload(alert, target.format, host=self._host, receiver=target.name,
                                          external_url=self.settings.external_url,
                                          firing_ends_at=self._firing_ends_at()))
        try:
            response = await client.post(target.url, content=body, headers=self._headers(target, body, delivery.id),
                                         timeout=httpx.Timeout(target.timeout_s))
        except httpx.HTTPError as exc:  # timeouts, refused connections, resets, protocol errors
            return _Outcome("retry", error=_describe_error(exc))
        status = response.status_code
        if 200 <= status < 300:
            return _Outcome("delivered", http_status=status)
        reason = f"HTTP {status}"
        text = response.text.strip()
        if text:
            reason += f": {_clip(_URL_IN_TEXT_RE.sub('<url>', text), 200)}"
        if status in (408, 429) or status >= 500:
            return _Outcome("retry", http_status=status, error=reason,
                            retry_after_s=self._retry_after_s(response.headers.get("Retry-After")))
        if 300 <= status < 400:
            reason += " (redirects are not followed; configure the final URL)"
        return _Outcome("drop", http_status=status, error=reason)

    def _headers(self, target: AlertTarget, body: bytes, delivery_id: str) -> dict[str, str]:
        """The request headers of one POST of ``body`` to ``target`` (signed when it has a secret)."""
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, DELIVERY_HEADER: delivery_id,
                   **target.headers}
        if target.secret:
            headers.update(signature_headers(target.secret, body, int(self._clock.wall()), delivery_id))
        return headers

    def _retry_after_s(self, value: str | None) -> float | None:
        if not value:
            return None
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - self._clock.wall()
            except (TypeError, ValueError, IndexError):
                return None
        if math.isnan(seconds):
            return None
        return min(max(0.0, seconds), RETRY_AFTER_CAP_S)

    def _backoff_s(self, attempts: int) -> float:
        base = min(self.settings.max_backoff_s, self.settings.initial_backoff_s * 2 ** min(attempts - 1, 30))
        # Jitter keeps many daemons behind one receiver from retrying in lockstep.
        return base * (0.8 + 0.2 * random.random())

    def _record_outcome(self, target: AlertTarget, delivery: _Delivery,
                        outcome: _Outcome) -> tuple[str, dict[str, Any]]:
        """Persist the outcome of one attempt (runs in a worker thread: it fsyncs)."""
        with self._lock:
            if delivery.id not in self._pending:
                return "alert.retrying", {}  # cannot happen with one sender per target; stay safe
            if outcome.kind == "delivered":
                delivery.attempts += 1
                fields = self._event_fields(delivery, http_status=outcome.http_status)
                record = {"op": "delivered", "id": delivery.id}
                self._persist(record)
                self._apply(record)
                self._maybe_compact()
                return "alert.delivered", fields
            delivery.attempts += 1
            delivery.last_error = outcome.error
            gave_up = (outcome.kind == "retry" and self.settings.max_attempts is not None
                       and delivery.attempts >= self.settings.max_attempts)
            if outcome.kind == "drop" or gave_up:
                reason = outcome.error or "unknown error"
                if gave_up:
                    reason = f"gave up after {delivery.attempts} attempts; last error: {reason}"
                fields = self._event_fields(delivery, http_status=outcome.http_status, reason=reason)
                record = {"op": "dropped", "id": delivery.id, "reason": reason}
                self._persist(record)
                self._apply(record)
                self._maybe_compact()
                return "alert.dropped", fields
            delay_s = self._backoff_s(delivery.attempts)
            if outcome.retry_after_s is not None:
                delay_s = outcome.retry_after_s
            delivery.not_before_s = self._clock.now() + delay_s
            self._persist({"op": "attempt", "id": delivery.id, "attempts": delivery.attempts,
                           "error": outcome.error})
            self._maybe_compact()
            return "alert.retrying", self._event_fields(delivery, http_status=outcome.http_status,
                                                        error=outcome.error, retry_in_s=round(delay_s, 3))


# --------------------------------------------------------------------------- [alerts.heartbeat]

METHODS = ("GET", "POST")


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """``[alerts.heartbeat]``; ``url`` is a secret (push URLs carry their token) and stays out of repr."""

    interval_s: float = 60.0
    url: str | None = field(default=None, repr=False)
    method: str = "GET"
    timeout_s: float = 5.0
    watchdog_alert: bool = False

    KEYS = ("interval", "url", "url_env", "method", "timeout", "watchdog_alert")

    @classmethod
    def from_toml(cls, table: object, *, file: str, key: str,
                  environ: Mapping[str, str] | None = None) -> HeartbeatSettings:
        t = Table(table, file, key)
        t.check_unknown(cls.KEYS)
        env = os.environ if environ is None else environ

        def duration(name: str, default: str, low_s: float, high_s: float) -> float:
            seconds = t.duration_s(name, default)
            if not low_s <= seconds <= high_s:
                raise t.error(name, f"expected a duration from {low_s:g}s to {high_s:g}s, got {t.data.get(name)!r}")
            return seconds

        interval_s = duration("interval", "60s", 1.0, 3600.0)
        timeout_s = duration("timeout", f"{min(5.0, interval_s):g}s", 0.1, interval_s)
        url_raw, url_key = t.secret("url", env)
        url = None if url_raw is None else t.checked(url_key, lambda _: _check_url(url_raw))
        method = t.str("method", "GET", choices=METHODS)
        watchdog_alert = t.bool("watchdog_alert", False)
        if url is None and not watchdog_alert:
            raise ConfigError("nothing to send: set url (a push URL such as https://hc-ping.com/<uuid>) "
                              "or url_env, and/or watchdog_alert = true (an always-firing Watchdog alert "
                              "to the alertmanager_api webhooks)", file=file, key=key)
        return cls(interval_s=interval_s, url=url, method=str(method), timeout_s=timeout_s,
                   watchdog_alert=watchdog_alert)
