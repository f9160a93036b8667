"""The bridge between the gateway's own thread and loop and the daemon's loop (gateway.bridge).

The test's own loop plays the daemon's; the gateway side runs on a real second thread with its own
loop, as in the daemon. The daemon side here is a recording backend, not the daemon.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from supervisord_llm.gateway.bridge import TOKEN_FLUSH_S, GatewayThread, LoopBridge, ThreadedBackend
from supervisord_llm.gateway.proxy import EngineUnavailable, GatewayListenFailed, GatewaySettings, RequestStats, Upstream
from tests.helpers import free_port

pytestmark = pytest.mark.anyio

UPSTREAM = Upstream(engine="tiny", base_url="http://127.0.0.1:1", kind="mlx_lm", supports_messages=False)


class RecordingBackend:
    """The daemon's side: records each call with the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], int]] = []
        self.acquire_cancelled = anyio.Event()
        self.acquire_entered = anyio.Event()
        self.block_acquire = False
        self.progress_s: float | None = None

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, args, threading.get_ident()))

    def models(self) -> list[dict]:
        return [{"id": "tiny", "state": "ready", "aliases": []}]

    def default_engine(self) -> str | None:
        return "tiny"

    async def acquire(self, model: str | None) -> Upstream:
        self._note("acquire", model)
        self.acquire_entered.set()
        if model == "missing":
            raise EngineUnavailable("missing", "unknown_model", "no engine serves model 'missing'", status=404)
        if self.block_acquire:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.acquire_cancelled.set()
                raise
        return UPSTREAM

    def request_started(self, engine: str) -> None:
        self._note("request_started", engine)

    def token_progress(self, engine: str, at_s: float) -> None:
        self._note("token_progress", engine, at_s)

    def engine_progress_s(self, engine: str) -> float | None:
        return self.progress_s

    def request_finished(self, stats: RequestStats) -> None:
        self._note("request_finished", stats.engine)

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        self._note("stall_detected", engine, phase)


async def on_gateway_thread(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` on a second thread with its own event loop, as the gateway runs; return its result."""
    return await anyio.to_thread.run_sync(lambda: anyio.run(fn, backend="asyncio"))


def make() -> tuple[RecordingBackend, ThreadedBackend]:
    import asyncio

    inner = RecordingBackend()
    bridge = LoopBridge()
    bridge.bind(asyncio.get_running_loop())
    backend = ThreadedBackend(inner, bridge)
    backend.publish()
    return inner, backend


async def test_acquire_runs_on_the_daemons_loop_and_answers_the_gateway() -> None:
    """A request's engine is picked on the daemon's loop, and the gateway's thread gets the answer."""
    inner, backend = make()
    daemon_thread = threading.get_ident()

    async def gateway() -> tuple[Upstream, int]:
        return await backend.acquire("tiny"), threading.get_ident()

    upstream, gateway_thread = await on_gateway_thread(gateway)
    assert upstream == UPSTREAM
    assert gateway_thread != daemon_thread
    assert inner.calls == [("acquire", ("tiny",), daemon_thread)]


async def test_a_refusal_on_the_daemons_loop_reaches_the_client_as_itself() -> None:
    """An unknown model refused by the daemon reaches the gateway as the same EngineUnavailable (a 404)."""
    _, backend = make()

    async def gateway() -> EngineUnavailable | None:
        try:
            await backend.acquire("missing")
        except EngineUnavailable as exc:
            return exc
        return None

    exc = await on_gateway_thread(gateway)
    assert exc is not None and exc.status == 404 and exc.reason == "unknown_model"


async def test_a_client_giving_up_cancels_the_wait_on_the_daemons_loop() -> None:
    """A client that leaves (or a hold time that ends) while the daemon holds its request cancels that hold."""
    inner, backend = make()
    inner.block_acquire = True

    async def gateway() -> bool:
        with anyio.move_on_after(0.3) as scope:
            await backend.acquire("tiny")
        return scope.cancelled_caught

    assert await on_gateway_thread(gateway)
    with anyio.fail_after(5):
        await inner.acquire_cancelled.wait()


async def test_notes_reach_the_daemon_in_order_with_the_tokens_before_the_end() -> None:
    """A request's start, its tokens and its end reach the daemon's loop in that order, and the newest
    token keeps the time it arrived from the engine."""
    inner, backend = make()
    daemon_thread = threading.get_ident()

    async def gateway() -> None:
        backend.request_started("tiny")
        for i in range(200):
            backend.token_progress("tiny", 100.0 + i)
        backend.request_finished(RequestStats("tiny", 0.01, 200, 1.0, 0.01, "complete"))

    await on_gateway_thread(gateway)
    await anyio.sleep(TOKEN_FLUSH_S * 3)
    names = [name for name, _, _ in inner.calls]
    assert names[0] == "request_started" and names[-1] == "request_finished"
    tokens = [args for name, args, _ in inner.calls if name == "token_progress"]
    assert tokens and tokens[-1] == ("tiny", 299.0)
    assert len(tokens) < 200  # coalesced: the daemon is not woken once per token
    assert {thread for _, _, thread in inner.calls} == {daemon_thread}


async def test_engine_progress_is_the_daemons_word_or_the_gateways_own_newer_token() -> None:
    """A stream's stall check sees the engine's progress from any source: the daemon's published
    reading, or a token the gateway itself read later."""
    inner, backend = make()
    inner.progress_s = 50.0
    backend.publish()

    async def gateway() -> tuple[float | None, float | None]:
        before = backend.engine_progress_s("tiny")
        backend.token_progress("tiny", 60.0)
        return before, backend.engine_progress_s("tiny")

    assert await on_gateway_thread(gateway) == (50.0, 60.0)


def _app() -> Starlette:
    async def where(request: Request) -> JSONResponse:
        return JSONResponse({"thread": threading.current_thread().name})

    return Starlette(routes=[Route("/where", where)])


async def test_the_gateway_serves_on_its_own_thread_and_stops_cleanly() -> None:
    """The gateway's requests are handled on its own thread, never the daemon's; cancelling stops it."""
    port = free_port()
    gateway = GatewayThread(_app(), GatewaySettings(port=port, shutdown_grace_s=1))
    async with anyio.create_task_group() as tg:
        listen = await tg.start(gateway.run)
        async with httpx.AsyncClient() as client:
            answer = (await client.get(f"http://{listen}/where")).json()
        tg.cancel_scope.cancel()
    assert answer["thread"] == "gateway"
    assert gateway.thread is not None and not gateway.thread.is_alive()


async def test_a_gateway_port_in_use_fails_the_start_with_its_reason() -> None:
    """A gateway port someone else holds fails the daemon's start with the reason, and no thread is left."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        gateway = GatewayThread(_app(), GatewaySettings(port=port))
        with pytest.raises(GatewayListenFailed, match=f"127.0.0.1:{port}"):
            await gateway.run()
    assert gateway.thread is not None and not gateway.thread.is_alive()


class FailingBackend(RecordingBackend):
    """A daemon side whose bookkeeping raises."""

    def models(self) -> list[dict]:
        raise RuntimeError("models broke")

    def request_finished(self, stats: RequestStats) -> None:
        raise RuntimeError("request_finished broke")


class ListLog:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def exception(self, event: str, **fields: Any) -> None:
        self.failed.append(f"{event}:{fields.get('method')}")


async def test_a_failing_daemon_side_is_logged_and_the_last_snapshot_kept() -> None:
    """A bug in the daemon's bookkeeping for the gateway is logged as gateway.backend_failed; the
    daemon's loop goes on and the gateway keeps the models it last had."""
    import asyncio

    inner, log = RecordingBackend(), ListLog()
    bridge = LoopBridge()
    bridge.bind(asyncio.get_running_loop())
    backend = ThreadedBackend(inner, bridge, log=log)
    backend.publish()
    backend.inner = FailingBackend()
    backend.publish()

    async def gateway() -> None:
        backend.request_finished(RequestStats("tiny", 0.01, 3, 0.1, 0.01, "complete"))

    await on_gateway_thread(gateway)
    await anyio.sleep(0.05)
    assert backend.models() == inner.models()
    assert log.failed == ["gateway.backend_failed:publish", "gateway.backend_failed:request_finished"]


async def test_a_gateway_whose_app_fails_to_start_fails_the_daemons_start() -> None:
    """A gateway app that fails while starting (its lifespan raises) fails the start with a clear error
    instead of leaving a daemon without its front port, and leaves no thread behind."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def broken(app: Starlette):  # type: ignore[no-untyped-def]
        raise RuntimeError("the upstream client could not be made")
        yield

    gateway = GatewayThread(Starlette(lifespan=broken), GatewaySettings(port=free_port(), shutdown_grace_s=1))
    with pytest.raises(GatewayListenFailed, match="stopped during startup"):
        await gateway.run()
    assert gateway.thread is not None and not gateway.thread.is_alive()


def test_notes_after_the_daemons_loop_closed_are_dropped_quietly() -> None:
    """A request that ends after the daemon's loop has closed (the last moments of a shutdown) is not an error."""
    import asyncio

    loop = asyncio.new_event_loop()
    loop.close()
    bridge = LoopBridge(loop)
    assert bridge.notify(print, "never") is False
    backend = ThreadedBackend(RecordingBackend(), bridge)
    backend.token_progress("tiny", 1.0)
    backend.request_finished(RequestStats("tiny", None, 0, None, None, "client_disconnected"))


async def test_a_wedged_gateway_thread_does_not_hold_the_daemons_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway whose loop a handler blocks (time.sleep) is left behind after its grace, logged as
    gateway.stop_timeout with where it is stuck, and the daemon's side returns."""
    import time

    from supervisord_llm.gateway import bridge
    from tests.recording import RecordingLogger

    monkeypatch.setattr(bridge, "STOP_MARGIN_S", 0.5)
    entered, release = threading.Event(), threading.Event()

    async def wedge(request: Request) -> JSONResponse:
        entered.set()
        while not release.is_set():
            time.sleep(0.05)  # noqa: ASYNC251 - a blocking call on the gateway's loop: the fault under test
        return JSONResponse({})

    log = RecordingLogger()
    gateway = GatewayThread(Starlette(routes=[Route("/wedge", wedge)]), GatewaySettings(port=free_port(),
                                                                                        shutdown_grace_s=0.5), log=log)
    # Unbounded before: the daemon's side waited until the handler let go, which this timer forces.
    unwedge = threading.Timer(20, release.set)
    unwedge.start()
    try:
        async with anyio.create_task_group() as tg:
            listen = await tg.start(gateway.run)
            client = threading.Thread(target=lambda: httpx.get(f"http://{listen}/wedge", timeout=30), daemon=True)
            client.start()
            assert await anyio.to_thread.run_sync(entered.wait, 10)
            tg.cancel_scope.cancel()  # the daemon stops: its task group waits for gateway.run's cleanup
        assert not release.is_set(), "the daemon's side waited for the wedged gateway to let go"
        [stopped] = log.named("gateway.stop_timeout")
        assert stopped["listen"] == listen and stopped["waited_s"] == 1.0
        assert any("in wedge" in frame for frame in stopped["stuck_at"]), stopped
        assert gateway.thread is not None and gateway.thread.is_alive()
    finally:
        release.set()
        unwedge.cancel()
    assert gateway.thread is not None
    gateway.thread.join(10)
    assert not gateway.thread.is_alive()
