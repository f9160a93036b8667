"""The gateway's own process and the channel to it (gateway.process, gateway.worker, gateway.channel).

The test's loop plays the daemon's side; the gateway is the real process the daemon starts
(``python -m supervisord_llm.gateway.worker``), and the engine behind it is the stand-in engine
(tests/standins/openai_engine.py). The daemon's backend here is a recording one, not the daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import structlog

from supervisord_llm.errors import UnknownEngine
from supervisord_llm.gateway.process import GatewayProcess
from supervisord_llm.gateway.proxy import EngineUnavailable, GatewayListenFailed, GatewaySettings, RequestStats, Upstream
from tests.helpers import REPO, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class RecordingBackend:
    """The daemon's side: answers the gateway and records each note in the order it arrived."""

    def __init__(self, base_url: str) -> None:
        self.upstream = Upstream(engine="tiny", base_url=base_url, kind="command", supports_messages=False)
        self.notes: list[tuple[str, Any]] = []
        self.prefills: list[tuple[str, int, float | None]] = []  # prefill_changed, apart from the notes
        self.lines: dict[str, int] = {}  # line_changed, as told
        self.acquire_entered = anyio.Event()
        self.acquire_cancelled = anyio.Event()
        self.passing = False  # whether the gateway holds a pass for tiny
        self.acquired = 0

    def models(self) -> list[dict]:
        return [{"id": "tiny", "object": "model", "state": "ready", "aliases": []}]

    def default_engine(self) -> str | None:
        return "tiny"

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        self.acquired += 1
        if model == "backoff":
            raise EngineUnavailable("backoff", "backoff", "backoff is in restart backoff; next start in 42s",
                                    retry_after_s=42.0)
        if model == "nobody":
            raise UnknownEngine("nobody", ["tiny"])
        if model == "broken":
            raise KeyError("a bug on the daemon's side")
        if model == "slow":
            self.acquire_entered.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.acquire_cancelled.set()
                raise
        return self.upstream

    def routes(self) -> dict[str, str]:
        return {"tiny": "tiny"}

    def passes(self) -> dict[str, Upstream]:
        return {"tiny": self.upstream} if self.passing else {}

    def let_through(self, engine: str) -> None:
        self.notes.append(("let_through", engine))

    def request_started(self, engine: str) -> None:
        self.notes.append(("request_started", engine))

    def token_progress(self, engine: str, at_s: float) -> None:
        self.notes.append(("token_progress", at_s))

    def engine_progress_s(self, engine: str) -> float | None:
        return None

    def request_finished(self, stats: RequestStats) -> None:
        self.notes.append(("request_finished", stats))

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        self.notes.append(("stall_detected", phase))

    def prefill_changed(self, engine: str, in_prefill: int, ended_at_s: float | None) -> None:
        self.prefills.append((engine, in_prefill, ended_at_s))

    def line_changed(self, engine: str, occupied: int) -> None:
        self.lines[engine] = occupied


@pytest.fixture
def engine_url() -> Any:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "standins" / "openai_engine.py"), "--port", str(port),
                             "--tps", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            anyio_sleep_sync(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def anyio_sleep_sync(seconds: float) -> None:
    import time

    time.sleep(seconds)


@asynccontextmanager
async def gateway(inner: RecordingBackend, on_passes_closed: Any = lambda: None,
                  **settings: Any) -> AsyncIterator[tuple[GatewayProcess, str, list[dict]]]:
    exits: list[dict] = []

    async def status_doc() -> dict[str, Any]:
        return {"engines": []}

    process = GatewayProcess(inner, GatewaySettings(port=free_port(), **settings), status_doc=status_doc,
                             log_setup={"level": "warning", "json_logs": False}, on_exit=exits.append,
                             log=structlog.get_logger("test"), on_passes_closed=on_passes_closed)
    async with anyio.create_task_group() as tg:
        await tg.start(process.run)
        tg.start_soon(process.run_publisher)
        with anyio.fail_after(30):
            while not process.stats:  # the gateway process sends its counters once it runs
                await anyio.sleep(0.02)
        yield process, f"http://{process.listen}", exits
        tg.cancel_scope.cancel()


async def test_a_request_is_routed_by_the_daemons_answer_and_its_notes_arrive_in_order(engine_url: str) -> None:
    """A streamed chat goes through the gateway process to the engine the daemon named; the daemon hears
    the start, the tokens, then the end, in that order, and the counters reach llmctl status."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (process, url, _), httpx.AsyncClient(timeout=30) as client:
        response = await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 200 and "data:" in response.text
        with anyio.fail_after(10):
            while not any(kind == "request_finished" for kind, _ in inner.notes):
                await anyio.sleep(0.02)
            while process.stats.get("requests_total") != 1:
                await anyio.sleep(0.02)
        kinds = [kind for kind, _ in inner.notes]
        assert kinds[0] == "request_started" and kinds[-1] == "request_finished"
        assert "token_progress" in kinds
        finished = inner.notes[-1][1]
        assert finished.ended == "complete" and finished.tokens >= 5
        models = await client.get(url + "/v1/models")
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]  # from the daemon's snapshot


async def test_a_request_on_a_pass_is_routed_without_asking_the_daemon_until_the_pass_is_taken_back(
        engine_url: str) -> None:
    """With a pass for tiny, a request goes straight to the engine: the daemon is told (let through,
    then started, in that order) but never asked. Once the daemon takes the pass back, it knows the
    gateway holds none only after the gateway confirmed, and requests ask the daemon again."""
    inner = RecordingBackend(engine_url)
    inner.passing = True
    confirmed = anyio.Event()
    async with gateway(inner, on_passes_closed=confirmed.set) as (process, url, _), \
            httpx.AsyncClient(timeout=30) as client:
        for body in ({**CHAT, "stream": True}, CHAT, {**CHAT, "model": None, "stream": True}):
            response = await client.post(url + "/v1/chat/completions", json=body)
            assert response.status_code == 200
        with anyio.fail_after(10):
            while sum(kind == "request_finished" for kind, _ in inner.notes) < 3:
                await anyio.sleep(0.02)
        assert inner.acquired == 0
        kinds = [kind for kind, _ in inner.notes if kind in ("let_through", "request_started")]
        assert kinds == ["let_through", "request_started"] * 3
        assert not process.close_passes()  # the daemon still gives tiny a pass: nothing is taken back
        inner.passing = False
        assert not process.close_passes()  # a snapshot without it is sent; not confirmed yet
        assert not process.close_passes()  # (and not sent again while it is on its way)
        with anyio.fail_after(10):
            await confirmed.wait()
        assert process.close_passes()
        response = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert response.status_code == 200 and inner.acquired == 1


async def test_refusals_reach_the_client_as_the_daemon_gave_them(engine_url: str) -> None:
    """A backoff keeps its 503, reason and Retry-After across the process boundary; an unknown model
    is a 404; a bug on the daemon's side is a 500 in the API shape and the gateway keeps serving."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (_, url, _), httpx.AsyncClient(timeout=30) as client:
        backoff = await client.post(url + "/v1/chat/completions", json={**CHAT, "model": "backoff"})
        assert backoff.status_code == 503 and backoff.headers["retry-after"] == "42"
        assert "next start in 42s" in backoff.json()["error"]["message"]
        unknown = await client.post(url + "/v1/chat/completions", json={**CHAT, "model": "nobody"})
        assert unknown.status_code == 404 and "configured engines: tiny" in unknown.json()["error"]["message"]
        broken = await client.post(url + "/v1/messages", json={**CHAT, "model": "broken"})
        assert broken.status_code == 500 and broken.json()["type"] == "error"
        ok = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200


async def test_a_request_that_stops_waiting_cancels_the_daemons_wait(engine_url: str) -> None:
    """When the gateway's hold time runs out for a request waiting for its engine, the client gets a
    503 in the API shape and the daemon's wait for it is cancelled too (nothing waits on for nobody)."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner, hold_s=1.0) as (_, url, _), httpx.AsyncClient(timeout=30) as client:
        response = await client.post(url + "/v1/chat/completions", json={**CHAT, "model": "slow"})
        assert response.status_code == 503 and "hold time" in response.json()["error"]["message"]
        with anyio.fail_after(10):
            await inner.acquire_cancelled.wait()


async def test_a_port_in_use_fails_the_start_with_its_reason(engine_url: str) -> None:
    """The daemon binds the gateway's port itself: one that is taken fails the start, naming the address."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    process = GatewayProcess(RecordingBackend(engine_url), GatewaySettings(port=port),
                             status_doc=lambda: None,  # type: ignore[arg-type, return-value]
                             log_setup={"level": "warning", "json_logs": False}, on_exit=lambda _: None,
                             log=structlog.get_logger("test"))
    try:
        with pytest.raises(GatewayListenFailed, match=f"127.0.0.1:{port}"):
            await process.run()
    finally:
        holder.close()


async def test_a_dead_gateway_process_is_started_again_on_the_same_port(engine_url: str) -> None:
    """A gateway process killed with SIGKILL is reported once and replaced on the same address; requests
    that were open in it no longer count as in flight on the engine."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (process, url, exits), httpx.AsyncClient(timeout=30) as client:
        first_pid = process.pid
        assert first_pid is not None
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json={**CHAT, "max_tokens": 100000, "stream": True}) as response:
            lines = response.aiter_lines()
            while not (await lines.__anext__()).startswith("data:"):
                pass
            with anyio.fail_after(5):  # notes travel lazily (at most channel.LAZY_S late)
                while ("request_started", "tiny") not in inner.notes:
                    await anyio.sleep(0.01)
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                async for _ in lines:
                    pass
        with anyio.fail_after(20):
            while not exits or process.pid == first_pid:
                await anyio.sleep(0.02)
        assert exits[0]["pid"] == first_pid and exits[0]["exit"] == "killed by SIGKILL"
        ended = [stats for kind, stats in inner.notes if kind == "request_finished"]
        assert [stats.ended for stats in ended] == ["gateway_exited"]
        ok = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200


LONG = {**CHAT, "messages": [{"role": "user", "content": "word " * 600}], "stream": True}  # 3 KiB: a long prompt


async def test_a_long_prompts_prefill_reaches_the_daemon_and_ends_with_a_dead_gateway(engine_url: str) -> None:
    """A long prompt's prefill is told to the daemon's side: begun when it is sent, ended at its first token
    (a time on the gateway's clock). One that never gets a token ends there when the gateway process dies
    (the engine's counter samples would otherwise stay left out for good); a short prompt tells nothing."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (_, url, _), httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(url + "/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
        response = await client.post(url + "/v1/chat/completions", json=LONG)
        assert response.status_code == 200 and "data:" in response.text
        with anyio.fail_after(5):  # notes travel lazily
            while len(inner.prefills) < 2:
                await anyio.sleep(0.01)
        (engine, began, no_end), (_, ended, at_s) = inner.prefills
        assert (engine, began, no_end, ended) == ("tiny", 1, None, 0) and isinstance(at_s, float)
    # An engine that takes the request and never answers: in prefill for good, until the gateway dies.
    inner = await _killed_with_a_request_open(LONG, lambda inner: bool(inner.prefills))
    assert inner.prefills == [("tiny", 1, None), ("tiny", 0, None)]


async def _killed_with_a_request_open(body: dict, sent: Callable[[RecordingBackend], bool]) -> RecordingBackend:
    """A gateway in front of an engine that takes the request and never answers: ``body`` is sent, and once
    ``sent(inner)`` the gateway's process is SIGKILLed; its daemon side (``inner``) once the exit is seen."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    inner = RecordingBackend(f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        async with gateway(inner) as (process, url, exits), httpx.AsyncClient(timeout=30) as client, \
                anyio.create_task_group() as tg:

            async def send() -> None:
                with pytest.raises(httpx.HTTPError):
                    await client.post(url + "/v1/chat/completions", json=body)

            tg.start_soon(send)
            with anyio.fail_after(5):
                while not sent(inner):
                    await anyio.sleep(0.01)
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            with anyio.fail_after(20):
                while not exits:
                    await anyio.sleep(0.02)
    finally:
        silent.close()
    return inner


async def test_a_requests_place_in_its_engines_line_reaches_the_daemon_and_ends_with_a_dead_gateway() -> None:
    """A swap's drain waits for the requests in the engine's line in the gateway: the daemon's side is told
    what each line holds, and a gateway process that dies takes its lines with it (told 0, or a swap would
    wait its whole swap_drain for requests that are gone)."""
    inner = await _killed_with_a_request_open(CHAT, lambda inner: inner.lines.get("tiny") == 1)
    assert inner.lines == {"tiny": 0}


async def test_the_daemons_stop_ends_the_gateway_process(engine_url: str) -> None:
    """Cancelling the daemon's side stops the gateway process before it returns: nothing outlives it."""
    import psutil

    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (process, _, _):
        pid = process.pid
    assert pid is not None and not psutil.pid_exists(pid)


async def test_requests_waiting_in_the_backlog_are_served_by_the_restarted_gateway(engine_url: str) -> None:
    """Requests that arrive while a dead gateway is being replaced wait in the socket's backlog and
    are answered by the new gateway, which is not mistaken for a failed start because of them."""
    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (process, url, exits), httpx.AsyncClient(timeout=30) as client:
        first_pid = process.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        with anyio.fail_after(10):
            while not exits:
                await anyio.sleep(0.005)
        codes: list[int] = []

        async def one() -> None:
            codes.append((await client.post(url + "/v1/chat/completions", json=CHAT)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        assert codes == [200] * 5
        await anyio.sleep(1.0)
        assert len(exits) == 1, exits  # the new gateway kept running


async def test_a_wait_cancelled_in_the_same_breath_as_it_was_asked_is_cancelled(engine_url: str) -> None:
    """An acquire and its cancel read by the daemon together (its loop was busy) still cancel the wait."""
    from supervisord_llm.gateway.process import GatewayProcess as _Process

    inner = RecordingBackend(engine_url)
    process = _Process(inner, GatewaySettings(port=free_port()), status_doc=lambda: None,  # type: ignore[arg-type, return-value]
                       log_setup={"level": "warning", "json_logs": False}, on_exit=lambda _: None,
                       log=structlog.get_logger("test"))

    class Sink:
        closed = False

        def send(self, *message: Any, replaceable: bool = False) -> bool:
            return True

    async with anyio.create_task_group() as tg:
        process._dispatch(tg, Sink(), ("acquire", 1, "slow"))  # type: ignore[arg-type]
        process._dispatch(tg, Sink(), ("cancel", 1))  # type: ignore[arg-type]
    assert not process._waits  # the wait ended: cancelled before it ever blocked
    assert not inner.acquire_entered.is_set() or inner.acquire_cancelled.is_set()


async def test_a_message_the_daemon_cannot_read_is_logged_and_the_gateway_keeps_serving(engine_url: str) -> None:
    """A malformed message from the gateway (a note without its arguments, as another version of the
    program might send) does not take the daemon's side down: requests are still answered."""
    import pickle
    import struct

    inner = RecordingBackend(engine_url)
    async with gateway(inner) as (process, url, exits), httpx.AsyncClient(timeout=30) as client:
        assert process._channel is not None
        data = pickle.dumps(("note", "request_started"))
        process._channel.reader.feed_data(struct.pack("!I", len(data)) + data)  # as if it came from the gateway
        await anyio.sleep(0.2)
        ok = await client.post(url + "/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200 and not exits
