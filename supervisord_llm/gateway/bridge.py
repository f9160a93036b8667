"""The gateway on its own thread and event loop, and the one bridge between it and the daemon's loop.

Room: gateway.

Supervision must not wait on traffic: a crash must reach the event log and ``llmctl status`` must
answer while hundreds of streams pass through the gateway, and while the gateway itself is stuck.
So the gateway's uvicorn server, its request handling, its upstream client and the token meter
run in a thread of their own with their own event loop (:class:`GatewayThread`), and the daemon's
loop runs only supervision.

Everything the gateway asks of the daemon crosses the loop boundary in one place,
:class:`LoopBridge`; gateway code never touches supervisor state itself:

    acquire(model)            awaited on the daemon's loop (``run_coroutine_threadsafe``); the
                              gateway's cancellation (a client gone, the hold time over) cancels it there
    request_started, request_finished, stall_detected
                              handed over in order (``call_soon_threadsafe``), never waited for
    token_progress            the latest token time per engine, handed over at most every
                              ``TOKEN_FLUSH_S`` (the hot path: one wake-up of the daemon per flush,
                              not per token); each token keeps the time it arrived from the engine
    models, default_engine, engine_progress_s
                              answered on the gateway's thread from snapshots the daemon publishes
                              (on every state change, and every ``PUBLISH_S`` while requests run),
                              with the gateway's own latest tokens on top for engine_progress_s

A snapshot is a new object each time, swapped in by one assignment, so the gateway reads a
consistent one without a lock. The gateway's own counters (``GatewayStats``) are written only on
its thread; the daemon reads them for ``llmctl status`` as copies (ints and a dict copied whole).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc

from supervisord_llm.gateway.proxy import GatewayBackend, GatewayListenFailed, GatewaySettings, RequestStats, Upstream

__all__ = ["GatewayThread", "LoopBridge", "ThreadedBackend"]

T = TypeVar("T")

# Token times reach the daemon at most this late; stall limits are seconds, so nothing is judged on it.
TOKEN_FLUSH_S = 0.05
# While requests run, the daemon refreshes what the gateway reads (engine progress, models) this often.
PUBLISH_S = 0.25
# A stopping gateway gets its shutdown grace and this much more to end its thread; a thread still
# running then is wedged (a blocking call on its loop) and is left behind (a daemon thread: it does
# not hold the process), so that the daemon's own shutdown and the engines' stop still happen.
STOP_MARGIN_S = 5.0


class LoopBridge:
    """Calls from the gateway's loop into the daemon's loop; the only way gateway code reaches it."""

    def __init__(self, daemon_loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._daemon_loop = daemon_loop

    def bind(self, daemon_loop: asyncio.AbstractEventLoop) -> None:
        """The daemon's loop, known once the daemon runs (the gateway's app is built before)."""
        self._daemon_loop = daemon_loop

    @property
    def daemon_loop(self) -> asyncio.AbstractEventLoop:
        if self._daemon_loop is None:
            raise RuntimeError("LoopBridge used before bind(): the daemon's loop is not running yet")
        return self._daemon_loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the daemon's loop and wait for it here; cancelling here cancels it there."""
        future = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.daemon_loop)
        return await asyncio.wrap_future(future)

    def notify(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the daemon's loop soon, in call order; False once that loop is closed."""
        try:
            self.daemon_loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the daemon's loop is closed: the daemon is gone, nobody to tell
            return False
        return True


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


class ThreadedBackend:
    """The :class:`GatewayBackend` the gateway's thread uses: ``inner`` (the daemon's backend, which
    lives on the daemon's loop) reached only through the bridge.

    The daemon side calls :meth:`publish` (and runs :meth:`run_publisher`); the gateway side calls
    the protocol's methods.
    """

    def __init__(self, inner: GatewayBackend, bridge: LoopBridge, *, log: Any = None) -> None:
        self.inner = inner
        self.bridge = bridge
        self.log = log
        self._models: list[dict] = []
        self._default: str | None = None
        self._progress: dict[str, float | None] = {}
        # Gateway side: the newest token time per engine (read on the daemon side under the lock).
        self._tokens_lock = threading.Lock()
        self._latest_token_s: dict[str, float] = {}
        self._pending_tokens: dict[str, float] = {}
        self._flush_scheduled = False
        # Daemon side: requests the gateway reported started and not yet finished.
        self._running = 0
        self._busy: anyio.Event | None = None

    # -- the daemon's side (its loop) ---------------------------------------------------------------

    def publish(self) -> None:
        """Take fresh snapshots of what the gateway reads without asking (daemon's loop only).

        Called from the event log's listeners too: a failure is logged, never raised into an emit.
        """
        inner = self.inner
        try:
            models = inner.models()
            self._progress = {m["id"]: inner.engine_progress_s(m["id"]) for m in models}
            self._models = models
            self._default = inner.default_engine()
        except Exception:
            self._failed("publish")

    def _failed(self, method: str) -> None:
        # The gateway's own notes must never take the daemon's loop down; the old snapshot stays.
        if self.log is not None:
            self.log.exception("gateway.backend_failed", method=method)

    async def run_publisher(self) -> None:
        """While requests run, refresh the snapshots every ``PUBLISH_S``; idle, it sleeps (daemon's loop)."""
        while True:
            self._busy = anyio.Event()
            if self._running <= 0:
                await self._busy.wait()
            self.publish()
            await anyio.sleep(PUBLISH_S)

    def _deliver(self, method: str, *args: Any) -> None:
        if method != "request_started":
            self._flush_tokens()  # token times first: a request's end or stall never overtakes its tokens
        if method == "request_started":
            self._running += 1
            if self._busy is not None:
                self._busy.set()
        elif method == "request_finished":
            self._running = max(0, self._running - 1)
        try:
            getattr(self.inner, method)(*args)
        except Exception:
            self._failed(method)

    def _flush_tokens(self) -> None:
        with self._tokens_lock:
            pending, self._pending_tokens = self._pending_tokens, {}
            self._flush_scheduled = False
        for engine, at_s in pending.items():
            try:
                self.inner.token_progress(engine, at_s)
            except Exception:
                self._failed("token_progress")

    def _flush_later(self) -> None:
        self.bridge.daemon_loop.call_later(TOKEN_FLUSH_S, self._flush_tokens)

    # -- the gateway's side (its thread) ------------------------------------------------------------

    def models(self) -> list[dict]:
        return self._models

    def default_engine(self) -> str | None:
        return self._default

    async def acquire(self, model: str | None) -> Upstream:
        return await self.bridge.call(self.inner.acquire, model)

    def request_started(self, engine: str) -> None:
        self.bridge.notify(self._deliver, "request_started", engine)

    def token_progress(self, engine: str, at_s: float) -> None:
        with self._tokens_lock:
            self._latest_token_s[engine] = at_s
            self._pending_tokens[engine] = at_s
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        if not self.bridge.notify(self._flush_later):
            self._flush_scheduled = False

    def engine_progress_s(self, engine: str) -> float | None:
        published = self._progress.get(engine)
        own = self._latest_token_s.get(engine)
        if published is None or (own is not None and own > published):
            return own
        return published

    def request_finished(self, stats: RequestStats) -> None:
        self.bridge.notify(self._deliver, "request_finished", stats)

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        self.bridge.notify(self._deliver, "stall_detected", engine, phase, stalled_for_s)


def _loop_options() -> dict[str, Any]:
    """The gateway's own loop runs on uvloop where it is installed (a dependency on Linux and macOS):
    its transports and callbacks cost a fraction of asyncio's per chunk. The daemon's loop is untouched."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


class GatewayThread:
    """Runs ``serve(app, settings)`` in a thread of its own with its own event loop.

    :meth:`run` is awaited on the daemon's loop like any subsystem: it reports the bound address
    once the gateway accepts, and when cancelled it stops the gateway the way ``serve`` always did
    (open requests get up to ``shutdown_grace_s``) and returns once the thread has ended, so nothing
    of the gateway outlives the daemon's task group; or, when the thread's loop is wedged, after
    ``shutdown_grace_s`` + ``STOP_MARGIN_S`` with ``gateway.stop_timeout`` logged, so a stuck gateway
    never keeps the daemon from exiting.
    """

    def __init__(self, app: Any, settings: GatewaySettings, *, name: str = "gateway", log: Any = None) -> None:
        self.app = app
        self.settings = settings
        self.name = name
        self.log = log
        self.listen: str | None = None
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._started: concurrent.futures.Future[str] = concurrent.futures.Future()

    async def run(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        daemon_loop = asyncio.get_running_loop()
        ended = anyio.Event()

        def main() -> None:
            try:
                anyio.run(self._serve, backend="asyncio", backend_options=_loop_options())
            except BaseException as exc:  # the daemon's side raises it (startup) or reports it
                while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]  # one task group's wrapping: the cause is what the operator needs
                if isinstance(exc, SystemExit):
                    # uvicorn exits the interpreter when the app's startup fails; here that must be the
                    # gateway's failure, reported as such, not a silent exit of the whole daemon.
                    exc = GatewayListenFailed(f"the gateway stopped during startup: its app failed to start "
                                              f"(uvicorn exit status {exc.code}; the reason is logged above)")
                if not self._started.done():
                    self._started.set_exception(exc)
                elif not self._stopping:
                    self._failure = exc
            finally:
                try:
                    daemon_loop.call_soon_threadsafe(ended.set)
                except RuntimeError:
                    pass  # the daemon's loop is already closed: nobody waits

        self.thread = threading.Thread(target=main, name=self.name, daemon=True)
        self.thread.start()
        try:
            listen = self.listen = await asyncio.wrap_future(self._started)
            task_status.started(listen)
            await ended.wait()
            if not self._stopping:
                raise GatewayListenFailed(f"the gateway on {listen} stopped unexpectedly: {self._failure!r}")
        finally:
            with anyio.CancelScope(shield=True):
                self.stop()
                bound_s = self.settings.shutdown_grace_s + STOP_MARGIN_S
                with anyio.move_on_after(bound_s):
                    await ended.wait()
                    # main() has returned: the thread ends at once; the bound holds even if it did not.
                    await anyio.to_thread.run_sync(self.thread.join, STOP_MARGIN_S)
                if self.thread.is_alive():
                    self._stop_timed_out(bound_s)

    def _stop_timed_out(self, waited_s: float) -> None:
        """Say what is known of a gateway thread that did not end in time: where it is stuck, and what
        it was serving. Nothing here may block: the thread's loop does not answer."""
        thread = self.thread
        where = None
        frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident is not None else None
        if frame is not None:
            where = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack(frame)[-3:]]
        stats = getattr(getattr(self.app, "state", None), "gateway", None)
        if self.log is not None:
            self.log.error("gateway.stop_timeout", waited_s=round(waited_s, 3), thread=self.name,
                           listen=self.listen,
                           in_flight=getattr(stats, "in_flight", None), stuck_at=where,
                           message="the gateway's thread did not end within its shutdown grace; it is left "
                                   "behind (its loop is blocked) and the daemon goes on with its shutdown")

    def stop(self) -> None:
        """Ask the gateway to stop (from any thread); open requests get their grace period."""
        self._stopping = True
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:
                pass  # its loop has already closed

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _serve(self) -> None:
        from supervisord_llm.gateway.proxy import serve

        self.loop = asyncio.get_running_loop()
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._stopping:
                scope.cancel()
            async with anyio.create_task_group() as tg:
                listen = await tg.start(serve, self.app, self.settings)
                self._started.set_result(listen)
        if not self._started.done():
            self._started.set_exception(GatewayListenFailed("the gateway was stopped before it listened"))
