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
from typing import Any, Protocol

import anyio
import anyio.abc
import httpx

from policies import heartbeat as heartbeat_policy
from supervisord_llm.alerts.delivery import (
    DELIVERY_HEADER,
    USER_AGENT,
    AlertSettings,
    HeartbeatSettings,
    _describe_error,
    iso_utc,
    signature_headers,
)
from supervisord_llm.clock import Clock
from supervisord_llm.events import EventLog
from supervisord_llm.extension import Extension


class _Engine(Protocol):
    name: str

    @property
    def state(self) -> Any: ...


class HeartbeatHost(Protocol):
    """**Protocol:** what the heartbeat reads of the daemon (its own health and its engines' states)."""

    log: Any
    memory_error: str | None
    healthy_loop: bool
    clock: Clock
    events: EventLog
    started_s: float

    @property
    def supervisors(self) -> Mapping[str, _Engine]: ...

# How many intervals a Watchdog alert outlives its last beat: one late beat must not resolve it,
# three missed ones must.
WATCHDOG_TTL_INTERVALS = 3.0


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


class HeartbeatExtension(Extension):
    """Sends the beats from the daemon's event loop (see the module docstring)."""

    name = "heartbeat"

    def __init__(self, daemon: HeartbeatHost, settings: HeartbeatSettings, alerts: AlertSettings) -> None:
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
                decision = heartbeat_policy.decide(self.self_health(lag_s),
                                                  max_loop_lag_s=heartbeat_policy.max_loop_lag_s(interval_s))
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
