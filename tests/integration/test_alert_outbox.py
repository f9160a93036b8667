"""The alert outbox against a real HTTP receiver on 127.0.0.1 that fails, recovers, and checks signatures."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog
from structlog.testing import LogCapture

from supervisord_llm.alerts.delivery import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alert,
    AlertSettings,
    AlertTarget,
    Outbox,
    labels_fingerprint,
    verify_signature,
)
from supervisord_llm.clock import FakeClock, SystemClock
from tests.helpers import free_port

pytestmark = pytest.mark.long_wait  # mostly waits: run beside the rest

SECRET = "hmac-key-for-tests"
SECRET_PATH = "/hooks/T0001/B0002/s3cr3t-path-token"


class Receiver:
    """A real webhook receiver: answers scripted failures first, then 200; verifies every signature."""

    def __init__(self, port: int | None = None, secret: str | None = SECRET) -> None:
        self.port = port or free_port()
        self.secret = secret
        self.url = f"http://127.0.0.1:{self.port}{SECRET_PATH}"
        self.script: deque[tuple[int, dict[str, str]]] = deque()
        self.requests: list[dict[str, Any]] = []  # every request, failed or not, in arrival order
        self.bad_signatures = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def respond(self, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        for _ in range(times):
            self.script.append((status, headers or {}))

    @property
    def accepted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["status"] == 200]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status, headers = receiver.script.popleft() if receiver.script else (200, {})
                    signed_ok = receiver.secret is None or verify_signature(
                        receiver.secret, self.headers.get(TIMESTAMP_HEADER, ""),
                        self.headers.get(DELIVERY_HEADER, ""), body, self.headers.get(SIGNATURE_HEADER))
                    if not signed_ok:
                        receiver.bad_signatures += 1
                        status = 401
                    receiver.requests.append({"status": status, "path": self.path, "body": json.loads(body),
                                              "headers": dict(self.headers), "at_s": time.monotonic()})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver whose port is reserved but not listening yet: connections are refused until start()."""
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


class Harness:
    """An outbox with its log and events captured, running in a task group the test controls."""

    def __init__(self, state_dir: Path, settings: AlertSettings, clock: Any = None) -> None:
        self.log = LogCapture()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.outbox = Outbox(state_dir, settings, clock or SystemClock(),
                             structlog.wrap_logger(structlog.ReturnLogger(), processors=[self.log]),
                             on_event=lambda kind, fields: self.events.append((kind, fields)))

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [fields for k, fields in self.events if k == kind]


def settings_for(*targets: AlertTarget, **policy: Any) -> AlertSettings:
    policy.setdefault("initial_backoff_s", 0.05)
    policy.setdefault("max_backoff_s", 0.2)
    return AlertSettings(targets=targets, host="testhost", **policy)


def json_target(receiver: Receiver, name: str = "hook", fmt: str = "json") -> AlertTarget:
    return AlertTarget(name=name, url=receiver.url, format=fmt, secret=SECRET, timeout_s=2.0)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    with anyio.move_on_after(timeout_s):
        while not condition():
            await anyio.sleep(0.02)
    assert condition(), f"timed out after {timeout_s}s waiting for: {what}"


def firing(key: str, engine: str | None = "mlx") -> Alert:
    return Alert.firing(key, "critical", f"{key} happened", engine=engine, details={"restarts": 5})


def received_alert_ids(receiver: Receiver) -> Counter[str]:
    return Counter(r["body"]["alert_id"] for r in receiver.accepted)


@pytest.mark.anyio
async def test_outage_then_recovery_delivers_every_alert_exactly_once(tmp_path: Path, receiver: Receiver) -> None:
    """Alerts raised while the webhook refuses connections, then answers 503, all arrive once, signed."""
    h = Harness(tmp_path, settings_for(json_target(receiver)))
    alerts = [firing("engine.failed:a"), firing("engine.hung:b"), firing("memory.stranded", engine=None)]
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        assert all(h.outbox.submit(a) for a in alerts)
        await wait_until(lambda: all(p.attempts >= 2 for p in h.outbox.pending()[:1]),
                         "the first delivery to fail twice with connection refused")
        assert h.outbox.counts() == {"pending": 3, "delivered": 0, "failed": 0}
        assert "ConnectError" in (h.outbox.pending()[0].last_error or "")
        receiver.respond(503, times=2)
        receiver.start()
        await wait_until(lambda: h.outbox.counts()["delivered"] == 3, "all three delivered")
        tg.cancel_scope.cancel()
    h.outbox.close()
    assert received_alert_ids(receiver) == Counter({a.id: 1 for a in alerts})
    assert [r["status"] for r in receiver.requests][:2] == [503, 503]
    assert receiver.bad_signatures == 0
    assert [r["body"]["alert_id"] for r in receiver.accepted] == [a.id for a in alerts]  # in order
    assert all(r["path"] == SECRET_PATH for r in receiver.requests)
    assert h.outbox.counts() == {"pending": 0, "delivered": 3, "failed": 0}
    assert [f["alert_id"] for f in h.kinds("alert.delivered")] == [a.id for a in alerts]
    assert h.kinds("alert.dropped") == []


@pytest.mark.anyio
async def test_daemon_restart_during_outage_loses_and_repeats_nothing(tmp_path: Path, receiver: Receiver) -> None:
    """Alerts pending when the daemon restarts mid-outage are sent by the next daemon; delivered ones are not resent."""
    target = json_target(receiver)
    receiver.start()
    first = Harness(tmp_path, settings_for(target))
    a_fired, b_fired = firing("engine.failed:a"), firing("engine.failed:b")
    async with anyio.create_task_group() as tg:
        await tg.start(first.outbox.run)
        first.outbox.submit(a_fired)
        await wait_until(lambda: first.outbox.counts()["delivered"] == 1, "the first alert delivered")
        receiver.stop()  # the outage begins
        first.outbox.submit(b_fired)
        first.outbox.submit(Alert.resolved("engine.failed:a", "a is ready again"))
        await wait_until(lambda: first.outbox.pending()[0].attempts >= 2, "the head of the queue failed twice")
        tg.cancel_scope.cancel()  # the daemon stops during the outage
    first.outbox.close()

    second = Harness(tmp_path, settings_for(target))
    assert [(p.key, p.status) for p in second.outbox.pending()] == [("engine.failed:b", "firing"),
                                                                   ("engine.failed:a", "resolved")]
    assert second.outbox.counts() == {"pending": 2, "delivered": 1, "failed": 0}
    assert second.outbox.pending()[0].attempts >= 1  # the attempt count survived too
    receiver.respond(503)
    receiver.start()  # the webhook recovers while the new daemon runs
    async with anyio.create_task_group() as tg:
        await tg.start(second.outbox.run)
        await wait_until(lambda: second.outbox.counts()["delivered"] == 3, "the pending two delivered")
        tg.cancel_scope.cancel()
    second.outbox.close()

    third = Harness(tmp_path, settings_for(target))
    assert third.outbox.pending() == []
    assert third.outbox.counts() == {"pending": 0, "delivered": 3, "failed": 0}
    before = len(receiver.requests)
    async with anyio.create_task_group() as tg:
        await tg.start(third.outbox.run)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert len(receiver.requests) == before
    # The episodes outlive the restarts: b is still open, a is closed.
    assert not third.outbox.submit(firing("engine.failed:b"))
    assert not third.outbox.submit(Alert.resolved("engine.failed:a", "again"))
    third.outbox.close()

    bodies = [r["body"] for r in receiver.accepted]
    assert [(b["key"], b["status"]) for b in bodies] == [
        ("engine.failed:a", "firing"), ("engine.failed:b", "firing"), ("engine.failed:a", "resolved")]
    assert Counter(b["alert_id"] for b in bodies).most_common(1)[0][1] == 1
    assert bodies[2]["episode_id"] == bodies[0]["episode_id"]
    assert receiver.bad_signatures == 0


@pytest.mark.anyio
async def test_firing_then_resolved_once_per_episode(tmp_path: Path, receiver: Receiver) -> None:
    """Repeated firings of an open episode and stray resolves are not sent; each target sees firing then resolved."""
    receiver.start()
    am = Receiver(secret=None)
    am.start()
    try:
        h = Harness(tmp_path, settings_for(json_target(receiver),
                                           AlertTarget(name="am", url=am.url, format="alertmanager")))
        key = "engine.failed:mlx"
        assert h.outbox.submit(firing(key)) is True
        assert h.outbox.submit(firing(key)) is False  # still open
        assert h.outbox.submit(Alert.resolved("engine.hung:mlx", "never fired")) is False
        assert h.outbox.submit(Alert.resolved(key, "mlx is ready again")) is True
        assert h.outbox.submit(Alert.resolved(key, "again")) is False  # already closed
        assert h.outbox.submit(firing(key)) is True  # a new episode
        async with anyio.create_task_group() as tg:
            await tg.start(h.outbox.run)
            await wait_until(lambda: h.outbox.counts()["delivered"] == 6, "3 alerts × 2 targets delivered")
            tg.cancel_scope.cancel()
        h.outbox.close()
    finally:
        am.stop()

    own = [r["body"] for r in receiver.accepted]
    assert [b["status"] for b in own] == ["firing", "resolved", "firing"]
    assert own[0]["episode_id"] == own[1]["episode_id"] != own[2]["episode_id"]
    assert own[1]["severity"] == "critical"  # a resolve carries its firing's severity
    assert own[1]["started_at"] == own[0]["at"]

    bodies = [r["body"] for r in am.accepted]
    assert [b["status"] for b in bodies] == ["firing", "resolved", "firing"]
    fired, closed = bodies[0], bodies[1]
    labels = {"alertname": "engine.failed", "severity": "critical", "instance": "testhost", "engine": "mlx"}
    assert fired["version"] == "4"
    assert fired["receiver"] == "am"
    assert fired["groupKey"] == '{}:{alertname="engine.failed", engine="mlx"}'
    assert fired["truncatedAlerts"] == 0
    assert fired["groupLabels"] == {"alertname": "engine.failed", "engine": "mlx"}
    assert fired["commonLabels"] == labels
    assert fired["commonAnnotations"]["summary"] == "engine.failed:mlx happened"
    assert fired["externalURL"] == ""
    [fired_alert], [closed_alert] = fired["alerts"], closed["alerts"]
    assert fired_alert["labels"] == closed_alert["labels"] == labels
    assert fired_alert["fingerprint"] == closed_alert["fingerprint"] == labels_fingerprint(labels)
    assert fired_alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert closed_alert["startsAt"] == fired_alert["startsAt"] == own[0]["at"]
    assert closed_alert["endsAt"] == own[1]["at"]
    assert closed["status"] == closed_alert["status"] == "resolved"


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.anyio
async def test_alertmanager_api_targets_get_open_episodes_again_until_resolved_also_after_a_restart(
        tmp_path: Path, receiver: Receiver) -> None:
    """Open episodes are re-posted to alertmanager_api targets every interval (endsAt three intervals ahead), never
    after their resolve, and by the next daemon from the journal; other formats get each alert once."""
    receiver.start()
    am = Receiver()
    am.start()
    try:
        targets = (json_target(receiver), AlertTarget(name="am", url=am.url, format="alertmanager_api", secret=SECRET))
        settings = settings_for(*targets, alertmanager_resend_interval_s=1.0)
        first = Harness(tmp_path, settings)
        a = firing("engine.failed:a", engine="a")
        b = Alert.firing("engine.exited:b", "warning", "b was killed", engine="b", details={"exit": "SIGKILL"})

        def posts() -> list[list[dict[str, Any]]]:
            return [r["body"] for r in am.accepted]

        async with anyio.create_task_group() as tg:
            await tg.start(first.outbox.run)
            first.outbox.submit(a)
            first.outbox.submit(b)
            await wait_until(lambda: len(posts()) >= 4, "two deliveries, then two re-posts")
            reposted = posts()[2]
            assert sorted(x["labels"]["alertname"] for x in reposted) == ["engine.exited", "engine.failed"]
            by_name = {x["labels"]["alertname"]: x for x in reposted}
            assert by_name["engine.exited"]["labels"]["exit"] == "SIGKILL"
            assert by_name["engine.exited"]["annotations"]["summary"] == "b was killed"
            assert by_name["engine.failed"]["startsAt"] == posts()[0][0]["startsAt"]
            ahead_s = (_parse_iso(posts()[-1][0]["endsAt"]) - datetime.now(UTC)).total_seconds()
            assert 0 < ahead_s <= 3.0, ahead_s
            first.outbox.submit(Alert.resolved("engine.failed:a", "a is ready again"))
            resolved_at = len(am.requests)
            await wait_until(lambda: len(posts()) >= resolved_at + 2, "the resolve, then a re-post")
            tg.cancel_scope.cancel()
        first.outbox.close()
        after = posts()[resolved_at:]
        assert after[0][0]["labels"]["alertname"] == "engine.failed"
        assert _parse_iso(after[0][0]["endsAt"]) <= datetime.now(UTC)  # the resolve
        assert [[x["labels"]["alertname"] for x in body] for body in after[1:]] == [["engine.exited"]] * len(after[1:])
        assert first.outbox.counts()["delivered"] == 6  # 3 alerts × 2 targets: re-posts are not deliveries

        second = Harness(tmp_path, settings)
        before = len(posts())
        async with anyio.create_task_group() as tg:
            await tg.start(second.outbox.run)
            await wait_until(lambda: len(posts()) > before, "the next daemon re-posts what is still open")
            tg.cancel_scope.cancel()
        second.outbox.close()
        [again] = posts()[before]
        assert again["labels"] == by_name["engine.exited"]["labels"]
        assert again["annotations"] == by_name["engine.exited"]["annotations"]
        assert again["startsAt"] == by_name["engine.exited"]["startsAt"]
    finally:
        am.stop()
    assert [(r["body"]["key"], r["body"]["status"]) for r in receiver.accepted] == [
        ("engine.failed:a", "firing"), ("engine.exited:b", "firing"), ("engine.failed:a", "resolved")]
    assert am.bad_signatures == 0


class FlakyAlertmanager:
    """A real HTTP front for a real Alertmanager's ``/api/v2/alerts`` that answers 503 on purpose while ``down``
    (an outage that does not wipe Alertmanager's memory); it keeps every request it was sent."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.down = False
        self.requests: list[dict[str, Any]] = []  # {"status", "body", "at_s"} in arrival order
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 503 if front.down else httpx.post(
                    front.api_url, content=body, headers={"Content-Type": "application/json"}, timeout=5).status_code
                with front._lock:
                    front.requests.append({"status": status, "body": json.loads(body), "at_s": time.monotonic()})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/v2/alerts"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def posted(self, since_s: float = 0.0) -> list[list[str]]:
        """The keys ("alertname:engine") of each accepted request since ``since_s``, in order."""
        with self._lock:
            return [[f"{x['labels']['alertname']}:{x['labels'].get('engine')}" for x in r["body"]]
                    for r in self.requests if r["status"] == 200 and r["at_s"] >= since_s]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def _active(am: Any) -> set[str]:
    """The alerts Alertmanager holds active now, as "alertname:engine"."""
    alerts = await anyio.to_thread.run_sync(am.active)
    return {f"{a['labels']['alertname']}:{a['labels'].get('engine')}" for a in alerts}


async def _wait_active(am: Any, keys: set[str], timeout_s: float) -> None:
    """Until Alertmanager holds exactly ``keys`` active (fails after ``timeout_s``)."""
    with anyio.fail_after(timeout_s):
        while await _active(am) != keys:
            await anyio.sleep(0.1)


def _resolved_notices(am: Any) -> list[str]:
    return [f"{a['labels']['alertname']}:{a['labels'].get('engine')}" for a in am.notifications.alerts()
            if a["status"] == "resolved"]


@pytest.mark.anyio
async def test_reposts_keep_alerts_active_in_alertmanager_while_a_queued_delivery_waits_out_its_backoff(
        tmp_path: Path, alertmanager: Any) -> None:
    """A short outage leaves a firing and a resolve queued behind a long backoff: the other open episode is still
    re-posted every interval (the queued keys left out, nothing queued twice), so it never lapses in Alertmanager
    and on-call gets no false resolved notice; the queued messages then go out in order."""
    am = alertmanager.start()
    front = FlakyAlertmanager(am.api_url)
    try:
        target = AlertTarget(name="am", url=front.url, format="alertmanager_api", timeout_s=2.0)
        h = Harness(tmp_path, settings_for(target, alertmanager_resend_interval_s=1.0,
                                           initial_backoff_s=12.0, max_backoff_s=12.0))
        async with anyio.create_task_group() as tg:
            await tg.start(h.outbox.run)
            h.outbox.submit(firing("engine.failed:a", engine="a"))
            h.outbox.submit(firing("engine.hung:c", engine="c"))
            await _wait_active(am, {"engine.failed:a", "engine.hung:c"}, 20)
            front.down = True  # the outage: b fires, c ends, both wait 12 s after their failure
            h.outbox.submit(firing("engine.failed:b", engine="b"))
            h.outbox.submit(Alert.resolved("engine.hung:c", "c answers again"))
            await wait_until(lambda: h.outbox.pending()[0].attempts >= 1, "b's first delivery to fail")
            with anyio.move_on_after(3.0):  # a re-post fails too (it is tried again within the interval)
                while not any(r["status"] == 503 and r["body"][0]["labels"].get("engine") == "a"
                              for r in front.requests):
                    await anyio.sleep(0.02)
            front.down = False
            up_s = time.monotonic()
            await anyio.sleep(6.0)  # twice the 3 s endsAt: only re-posts made during the backoff keep a active
            assert "engine.failed:a" in await _active(am), front.posted()
            assert "engine.failed:a" not in _resolved_notices(am)
            assert [(p.key, p.status) for p in h.outbox.pending()] == [("engine.failed:b", "firing"),
                                                                      ("engine.hung:c", "resolved")]
            during = front.posted(up_s)
            assert len(during) >= 4 and all(keys == ["engine.failed:a"] for keys in during), during
            await wait_until(lambda: h.outbox.counts()["pending"] == 0, "b and c's resolve delivered", 30)
            await _wait_active(am, {"engine.failed:a", "engine.failed:b"}, 10)
            tg.cancel_scope.cancel()
        h.outbox.close()
    finally:
        front.close()
    accepted = [r["body"] for r in front.requests if r["status"] == 200]
    with_c = [i for i, body in enumerate(accepted) if any(x["labels"].get("engine") == "c" for x in body)]
    assert accepted[with_c[-1]] == [x for x in accepted[with_c[-1]] if _parse_iso(x["endsAt"]) <= datetime.now(UTC)]
    b_first = next(i for i, body in enumerate(accepted) if any(x["labels"].get("engine") == "b" for x in body))
    assert b_first < with_c[-1]  # in queue order: b's firing, then c's resolve, the last word on c
    assert "engine.failed:a" not in _resolved_notices(am) and "engine.failed:b" not in _resolved_notices(am)
    assert h.outbox.counts() == {"pending": 0, "delivered": 4, "failed": 0}


@pytest.mark.anyio
async def test_reposts_neither_wait_for_nor_use_up_the_rate_limit(tmp_path: Path, alertmanager: Any) -> None:
    """With rate_limit_per_min = 2 and a 1 s resend interval (endsAt 3 s ahead) the open episode is still re-posted
    every second and stays active, and the minute's second request is left for the next alert."""
    am = alertmanager.start()
    front = FlakyAlertmanager(am.api_url)
    try:
        target = AlertTarget(name="am", url=front.url, format="alertmanager_api", timeout_s=2.0)
        h = Harness(tmp_path, settings_for(target, rate_limit_per_min=2, alertmanager_resend_interval_s=1.0))
        async with anyio.create_task_group() as tg:
            await tg.start(h.outbox.run)
            h.outbox.submit(firing("engine.failed:a", engine="a"))
            await wait_until(lambda: h.outbox.counts()["delivered"] == 1, "a delivered")
            await anyio.sleep(6.0)  # twice a post's 3 s lifetime
            assert await _active(am) == {"engine.failed:a"}, front.posted()
            assert len(front.posted()) >= 5, front.posted()
            h.outbox.submit(firing("engine.failed:b", engine="b"))
            # The minute's second request, not a minute later.
            await _wait_active(am, {"engine.failed:a", "engine.failed:b"}, 5)
            tg.cancel_scope.cancel()
        h.outbox.close()
    finally:
        front.close()
    assert _resolved_notices(am) == []
    assert not any(e["event"] == "alert.rate_limited" for e in h.log.entries)


@pytest.mark.anyio
async def test_client_error_drops_the_delivery_with_an_event(tmp_path: Path, receiver: Receiver) -> None:
    """A 400 is not retried: the delivery is dropped with an alert.dropped event and the queue moves on."""
    receiver.respond(400)
    receiver.start()
    h = Harness(tmp_path, settings_for(json_target(receiver)))
    bad, good = firing("engine.failed:a"), firing("engine.failed:b")
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        h.outbox.submit(bad)
        h.outbox.submit(good)
        await wait_until(lambda: h.outbox.counts()["delivered"] == 1, "the second alert delivered")
        tg.cancel_scope.cancel()
    h.outbox.close()
    assert h.outbox.counts() == {"pending": 0, "delivered": 1, "failed": 1}
    [dropped] = h.kinds("alert.dropped")
    assert dropped["alert_id"] == bad.id and dropped["http_status"] == 400 and dropped["target"] == "hook"
    assert dropped["reason"].startswith("HTTP 400") and dropped["attempts"] == 1
    assert [r["status"] for r in receiver.requests] == [400, 200]  # one try each: no retry of the 400
    assert Harness(tmp_path, settings_for(json_target(receiver))).outbox.counts()["failed"] == 1  # durable too


@pytest.mark.anyio
async def test_too_many_requests_waits_for_retry_after(tmp_path: Path, receiver: Receiver) -> None:
    """A 429 with Retry-After is retried, and not before the receiver asked."""
    receiver.respond(429, headers={"Retry-After": "1"})
    receiver.start()
    h = Harness(tmp_path, settings_for(json_target(receiver)))  # its own backoff would be 0.05 s
    alert = firing("engine.failed:a")
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        h.outbox.submit(alert)
        await wait_until(lambda: h.outbox.counts()["delivered"] == 1, "delivered after the 429")
        tg.cancel_scope.cancel()
    h.outbox.close()
    limited, ok = receiver.requests
    assert (limited["status"], ok["status"]) == (429, 200)
    assert ok["at_s"] - limited["at_s"] >= 0.9
    assert limited["headers"][DELIVERY_HEADER] == ok["headers"][DELIVERY_HEADER]  # same delivery, for dedup
    assert h.kinds("alert.dropped") == []


@pytest.mark.anyio
async def test_rate_limit_makes_deliveries_wait_not_vanish(tmp_path: Path, receiver: Receiver) -> None:
    """Over the per-target rate limit deliveries stay pending and go out when the minute has passed."""
    receiver.start()
    clock = FakeClock()
    h = Harness(tmp_path, settings_for(json_target(receiver), rate_limit_per_min=2), clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        for key in ("engine.failed:a", "engine.failed:b", "engine.failed:c"):
            h.outbox.submit(firing(key))
        await wait_until(lambda: h.outbox.counts()["delivered"] == 2, "two delivered within the limit")
        await anyio.sleep(0.5)
        assert h.outbox.counts() == {"pending": 1, "delivered": 2, "failed": 0}
        assert len(receiver.requests) == 2
        assert any(e["event"] == "alert.rate_limited" for e in h.log.entries)
        clock.advance(61.0)
        await wait_until(lambda: h.outbox.counts()["delivered"] == 3, "the third delivered after a minute")
        tg.cancel_scope.cancel()
    h.outbox.close()


@pytest.mark.anyio
async def test_max_attempts_gives_up_with_an_event(tmp_path: Path, receiver: Receiver) -> None:
    """With max_attempts set, a webhook that never answers gets that many tries, then an alert.dropped event."""
    h = Harness(tmp_path, settings_for(json_target(receiver), max_attempts=3))  # the receiver never starts
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        h.outbox.submit(firing("engine.failed:a"))
        await wait_until(lambda: h.outbox.counts()["failed"] == 1, "given up")
        tg.cancel_scope.cancel()
    h.outbox.close()
    [dropped] = h.kinds("alert.dropped")
    assert dropped["reason"].startswith("gave up after 3 attempts; last error: ConnectError")


@pytest.mark.anyio
async def test_webhook_urls_and_secrets_never_reach_logs_events_or_disk(
        tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the webhook URL nor its secret appears in any log line, event, or state file."""
    caplog.set_level(logging.DEBUG)
    target = AlertTarget(name="hook", url=receiver.url, secret=SECRET, headers={"Authorization": "Bearer tok-123"})
    h = Harness(tmp_path, settings_for(target))
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        h.outbox.submit(firing("engine.failed:a"))  # refused first
        await wait_until(lambda: any(p.attempts >= 1 for p in h.outbox.pending()), "a failed attempt")
        receiver.respond(400)
        receiver.start()
        await wait_until(lambda: h.outbox.counts()["failed"] == 1, "dropped on the 400")
        h.outbox.submit(firing("engine.failed:b"))
        await wait_until(lambda: h.outbox.counts()["delivered"] == 1, "delivered")
        tg.cancel_scope.cancel()
    h.outbox.close()
    assert "HTTP Request: POST <webhook url>" in caplog.text  # httpx logged the request, redacted
    everything = "\n".join([caplog.text, repr(h.log.entries), repr(h.events)] +
                           [p.read_text() for p in (tmp_path / "alerts").iterdir()])
    for secret in ("s3cr3t-path-token", SECRET, "tok-123", f"127.0.0.1:{receiver.port}"):
        assert secret not in everything


def test_torn_last_journal_line_is_ignored(tmp_path: Path) -> None:
    """A half-written journal line from a power cut does not lose the alerts recorded before it."""
    settings = settings_for(AlertTarget(name="hook", url="http://127.0.0.1:9/x"))
    h = Harness(tmp_path, settings)
    alert = firing("engine.failed:a")
    assert h.outbox.submit(alert)
    h.outbox.close()
    with open(tmp_path / "alerts" / "outbox.jsonl", "ab") as journal:
        journal.write(b'{"op":"delivered","id":"')
    reopened = Harness(tmp_path, settings)
    assert [p.alert_id for p in reopened.outbox.pending()] == [alert.id]
    assert reopened.outbox.open_episodes().keys() == {"engine.failed:a"}
    reopened.outbox.close()


def test_deliveries_to_a_removed_target_are_dropped_with_an_event(tmp_path: Path) -> None:
    """After a webhook is removed from the config, its pending deliveries are dropped visibly, not kept forever."""
    old = settings_for(AlertTarget(name="old", url="http://127.0.0.1:9/x"),
                       AlertTarget(name="kept", url="http://127.0.0.1:9/y"))
    h = Harness(tmp_path, old)
    h.outbox.submit(firing("engine.failed:a"))
    h.outbox.close()
    new = Harness(tmp_path, settings_for(AlertTarget(name="kept", url="http://127.0.0.1:9/y")))
    assert [p.target for p in new.outbox.pending()] == ["kept"]
    [dropped] = new.kinds("alert.dropped")
    assert dropped["target"] == "old" and "no longer configured" in dropped["reason"]
    assert new.outbox.counts() == {"pending": 1, "delivered": 0, "failed": 1}
    new.outbox.close()


@pytest.mark.anyio
async def test_journal_stays_small_after_many_alerts(tmp_path: Path, receiver: Receiver) -> None:
    """The journal is compacted as it goes: hundreds of delivered alerts leave a short file, counts kept."""
    receiver.start()
    settings = settings_for(json_target(receiver), rate_limit_per_min=10_000)
    h = Harness(tmp_path, settings)
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        for i in range(150):
            h.outbox.submit(firing(f"engine.failed:e{i}"))
            h.outbox.submit(Alert.resolved(f"engine.failed:e{i}", "ok"))
        await wait_until(lambda: h.outbox.counts()["delivered"] == 300, "all 300 delivered", timeout_s=60)
        tg.cancel_scope.cancel()
    journal = tmp_path / "alerts" / "outbox.jsonl"
    assert len(journal.read_text().splitlines()) < 600 - 100  # 600 records appended, compacted on the way
    h.outbox.close()
    reopened = Harness(tmp_path, settings)
    assert len(journal.read_text().splitlines()) == 1  # only the snapshot is left
    assert reopened.outbox.counts() == {"pending": 0, "delivered": 300, "failed": 0}
    assert reopened.outbox.open_episodes() == {}
    reopened.outbox.close()
    assert len(receiver.accepted) == 300


def test_policy_alert_actions_are_accepted(tmp_path: Path) -> None:
    """The daemon's Alert actions (key, severity, summary, details, resolved) are queued as alerts with their engine."""
    from policies.actions import Alert as AlertAction

    h = Harness(tmp_path, settings_for(AlertTarget(name="hook", url="http://127.0.0.1:9/x")))
    assert h.outbox.submit_action(AlertAction(key="engine.failed:mlx", severity="critical", summary="down"))
    assert h.outbox.submit_action(AlertAction(key="engine.failed:mlx", severity="info", summary="up",
                                              resolved=True))
    assert [(p.key, p.status) for p in h.outbox.pending()] == [("engine.failed:mlx", "firing"),
                                                              ("engine.failed:mlx", "resolved")]
    h.outbox.close()


@pytest.mark.anyio
async def test_signature_covers_the_delivery_id_so_a_receiver_can_reject_replays(tmp_path: Path,
                                                                                 receiver: Receiver) -> None:
    """The HMAC signs timestamp.delivery_id.body: a captured request replayed under another delivery id fails."""
    import hashlib
    import hmac

    receiver.secret = None  # checked below, by hand, against the documented recipe
    receiver.start()
    h = Harness(tmp_path, settings_for(json_target(receiver)))
    async with anyio.create_task_group() as tg:
        await tg.start(h.outbox.run)
        h.outbox.submit(firing("engine.exited:a"))
        await wait_until(lambda: h.outbox.counts()["delivered"] == 1, "the alert delivered")
        tg.cancel_scope.cancel()
    h.outbox.close()
    request = receiver.accepted[0]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    timestamp, delivery_id = headers[TIMESTAMP_HEADER.lower()], headers[DELIVERY_HEADER.lower()]
    body = json.dumps(request["body"], ensure_ascii=False, separators=(",", ":")).encode()
    expected = hmac.new(SECRET.encode(), f"{timestamp}.{delivery_id}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER.lower()] == f"sha256={expected}"
    assert verify_signature(SECRET, timestamp, delivery_id, body, headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(SECRET, timestamp, "another-delivery", body, headers[SIGNATURE_HEADER.lower()])
