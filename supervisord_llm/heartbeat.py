"""The dead-man heartbeat: a proof of life sent elsewhere, so a dead daemon or machine is noticed.

``[alerts.heartbeat]`` sends, every ``interval``, while the daemon's own loop and probes are
healthy (``policies.heartbeat``):

- to a push URL (``url``/``url_env``), the healthchecks.io / Uptime Kuma style: a ``GET`` (or a
  ``POST`` of a small JSON body) that an outside monitor expects and alarms on when it stops;
- with ``watchdog_alert = true``, an always-firing ``Watchdog`` alert (labels ``alertname=
  "Watchdog"``, ``severity="none"``, ``instance``), the Prometheus convention, to every
  ``alertmanager_api`` webhook. Each beat sets ``endsAt`` to three intervals ahead, so when the
  beats stop Alertmanager resolves it on its own; route it to a dead man's switch.

Beats are not durable alerts: none is queued or retried (a missed beat *is* the signal), none
goes through the outbox, and a failed one is logged as ``heartbeat.failed`` and forgotten.
The beat rides the event loop (an async task): a blocked or stopped loop sends nothing, and the
same loop-stall flag that gates systemd's ``WATCHDOG=1`` ping withholds it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import httpx

from policies import heartbeat as heartbeat_policy
from supervisord_llm.alerts import (
    DELIVERY_HEADER,
    USER_AGENT,
    AlertSettings,
    _check_url,
    _describe_error,
    _from_env,
    iso_utc,
    signature_headers,
)
from supervisord_llm.convert import parse_duration_s
from supervisord_llm.errors import ConfigError

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon

METHODS = ("GET", "POST")
# How many intervals a Watchdog alert outlives its last beat: one late beat must not resolve it,
# three missed ones must.
WATCHDOG_TTL_INTERVALS = 3.0


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
        env = os.environ if environ is None else environ
        if not isinstance(table, Mapping):
            raise ConfigError(f"expected a table with keys {', '.join(cls.KEYS)}", file=file, key=key)
        for name in table:
            if name not in cls.KEYS:
                raise ConfigError(f"unknown key {name!r}; valid keys: {', '.join(cls.KEYS)}",
                                  file=file, key=f"{key}.{name}")

        def duration(name: str, default: str, low_s: float, high_s: float) -> float:
            try:
                seconds = parse_duration_s(table.get(name, default))
            except ValueError as exc:
                raise ConfigError(str(exc), file=file, key=f"{key}.{name}") from None
            if not low_s <= seconds <= high_s:
                raise ConfigError(f"expected a duration from {low_s:g}s to {high_s:g}s, got {table.get(name)!r}",
                                  file=file, key=f"{key}.{name}")
            return seconds

        interval_s = duration("interval", "60s", 1.0, 3600.0)
        timeout_s = duration("timeout", f"{min(5.0, interval_s):g}s", 0.1, interval_s)
        if "url" in table and "url_env" in table:
            raise ConfigError("set either url or url_env, not both", file=file, key=f"{key}.url")
        url = None
        which = "url_env" if "url_env" in table else "url"
        try:
            if "url_env" in table:
                url = _check_url(_from_env(env, table["url_env"]))
            elif "url" in table:
                url = _check_url(table["url"])
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, key=f"{key}.{which}") from None
        method = table.get("method", "GET")
        if method not in METHODS:
            raise ConfigError(f"expected one of {', '.join(METHODS)}, got {method!r}", file=file, key=f"{key}.method")
        watchdog_alert = table.get("watchdog_alert", False)
        if not isinstance(watchdog_alert, bool):
            raise ConfigError(f"expected true or false, got {watchdog_alert!r}", file=file,
                              key=f"{key}.watchdog_alert")
        if url is None and not watchdog_alert:
            raise ConfigError("nothing to send: set url (a push URL such as https://hc-ping.com/<uuid>) "
                              "or url_env, and/or watchdog_alert = true (an always-firing Watchdog alert "
                              "to the alertmanager_api webhooks)", file=file, key=key)
        return cls(interval_s=interval_s, url=url, method=str(method), timeout_s=timeout_s,
                   watchdog_alert=watchdog_alert)


def watchdog_alert(host: str, started_at: str, now_wall_s: float, interval_s: float,
                   external_url: str = "") -> list[dict[str, Any]]:
    """The body for Alertmanager's ``POST /api/v2/alerts``: the always-firing ``Watchdog`` alert."""
    posted: dict[str, Any] = {
        "labels": {"alertname": "Watchdog", "severity": "none", "instance": host},
        "annotations": {
            "summary": f"supervisord-llm on {host} is alive",
            "description": ("An always-firing alert that proves the daemon and its machine are alive; it ends "
                            f"{WATCHDOG_TTL_INTERVALS * interval_s:g}s after the last beat. Route it to a dead "
                            "man's switch that alarms when it stops."),
        },
        "startsAt": started_at,
        "endsAt": iso_utc(now_wall_s + WATCHDOG_TTL_INTERVALS * interval_s),
    }
    if external_url:
        posted["generatorURL"] = external_url
    return [posted]


class HeartbeatExtension:
    """Sends the beats from the daemon's event loop (see the module docstring)."""

    name = "heartbeat"

    def __init__(self, daemon: Daemon, settings: HeartbeatSettings, alerts: AlertSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.alerts = alerts
        self.log = daemon.log.bind(component="heartbeat")
        self.sent = 0
        self.withheld = 0
        self.last_decision: heartbeat_policy.HeartbeatDecision | None = None
        self._targets = [t for t in alerts.targets if t.format == "alertmanager_api"] \
            if settings.watchdog_alert else []

    def self_health(self, lag_s: float) -> heartbeat_policy.SelfHealth:
        daemon = self.daemon
        failing = ("memory",) if daemon.memory_error else ()
        return heartbeat_policy.SelfHealth(loop_lag_s=lag_s, loop_stalled=not daemon.healthy_loop,
                                           failing_probes=failing)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        clock = self.daemon.clock
        interval_s = self.settings.interval_s
        started_at = iso_utc(clock.wall())
        async with httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": USER_AGENT}) as client:
            task_status.started()
            due_s = clock.now()
            while True:
                lag_s = max(0.0, clock.now() - due_s)
                decision = heartbeat_policy.decide(self.self_health(lag_s), max_loop_lag_s=max(2.0, interval_s))
                if decision != self.last_decision:
                    # Logged when it changes, not every beat: a beat a minute would bury the event log.
                    self.daemon.events.emit("policy.decided", policy="heartbeat",
                                            decision="send" if decision.send else "withhold",
                                            reason=decision.reason, loop_lag_s=round(lag_s, 3),
                                            loop_stalled=not self.daemon.healthy_loop,
                                            memory_probe_error=self.daemon.memory_error)
                    self.last_decision = decision
                if decision.send:
                    with anyio.move_on_after(interval_s):
                        await self._beat(client, started_at)
                    self.sent += 1
                else:
                    self.withheld += 1
                due_s = max(due_s + interval_s, clock.now())
                await anyio.sleep(max(0.0, due_s - clock.now()))

    async def _beat(self, client: httpx.AsyncClient, started_at: str) -> None:
        async with anyio.create_task_group() as tg:
            if self.settings.url:
                tg.start_soon(self._push, client)
            for target in self._targets:
                tg.start_soon(self._watchdog, client, target, started_at)

    async def _push(self, client: httpx.AsyncClient) -> None:
        url = self.settings.url
        assert url is not None
        timeout = httpx.Timeout(self.settings.timeout_s)
        try:
            if self.settings.method == "POST":
                body = {"host": self.alerts.hostname, "pid": os.getpid(),
                        "uptime_s": round(self.daemon.clock.now() - self.daemon.started_s, 1),
                        "engines": {n: str(s.state) for n, s in self.daemon.supervisors.items()}}
                response = await client.post(url, json=body, timeout=timeout)
            else:
                response = await client.get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            self.log.warning("heartbeat.failed", to="url", error=_describe_error(exc))
            return
        if response.status_code >= 300:
            self.log.warning("heartbeat.failed", to="url", http_status=response.status_code)

    async def _watchdog(self, client: httpx.AsyncClient, target: Any, started_at: str) -> None:
        body = json.dumps(watchdog_alert(self.alerts.hostname, started_at, self.daemon.clock.wall(),
                                         self.settings.interval_s, self.alerts.external_url),
                          separators=(",", ":")).encode()
        delivery_id = str(uuid.uuid4())
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id, **target.headers}
        if target.secret:
            headers.update(signature_headers(target.secret, body, int(self.daemon.clock.wall()), delivery_id))
        try:
            response = await client.post(target.url, content=body, headers=headers,
                                         timeout=httpx.Timeout(min(target.timeout_s, self.settings.interval_s)))
        except httpx.HTTPError as exc:
            self.log.warning("heartbeat.failed", to=target.name, error=_describe_error(exc))
            return
        if response.status_code >= 300:
            self.log.warning("heartbeat.failed", to=target.name, http_status=response.status_code)

    def contribute_status(self, doc: dict[str, Any]) -> None:
        decision = self.last_decision
        doc["heartbeat"] = {"interval_s": self.settings.interval_s, "sent": self.sent, "withheld": self.withheld,
                            "sending": decision.send if decision else None,
                            "reason": decision.reason if decision else None}
