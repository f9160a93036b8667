"""The gateway's own process: ``python -m supervisord_llm.gateway.worker`` (started by the daemon).

Room: gateway.

Traffic must never take time, memory or the interpreter lock from supervision, so the gateway runs
in a process of its own: its uvicorn server, request handling, upstream client and token meter.
The daemon owns the listening socket (it binds it, so a port in use fails the daemon's start, and a
restarted gateway process serves the same socket without a gap in which connections are refused)
and hands it over with one end of a socket pair, the channel (gateway/channel.py). Everything the
gateway asks of the daemon crosses that channel as the :class:`GatewayBackend` protocol:

    acquire(model)            a request; the daemon answers with the Upstream or the refusal. A
                              client that gives up sends ``cancel``, which cancels the wait there
    request_started, request_finished, stall_detected, prefill_changed,
                              line_changed
                              sent in order, never waited for
    token_progress            the latest token time per engine, sent at most every
                              ``TOKEN_FLUSH_S``; flushed before any other note, so a request's end
                              or stall never overtakes its tokens
    models, default_engine, engine_progress_s
                              answered here from snapshots the daemon sends (on every state change,
                              and every ``PUBLISH_S`` while requests run), with the gateway's own
                              latest tokens on top for engine_progress_s
    try_pass(model)           answered here too: each snapshot carries the model names and the
                              engines requests may go to straight on (passes,
                              ``policies.frontdoor.gateway_may_pass``). A request on a pass costs the
                              daemon no answer, only a ``let_through`` note; every snapshot is
                              acknowledged (``ack``) once applied, which is how the daemon knows the
                              passes it took back are gone before it starts a swap (gateway/turns.py)

The gateway's counters (``GatewayStats``) are sent to the daemon whenever they change, at most every
``STATS_PUSH_S``, for ``llmctl status`` and the metrics. When the daemon goes away (its end of the
channel closes) the gateway stops the way it stops on ``stop``: open requests get
``shutdown_grace_s``, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import signal
import socket
import sys
from typing import Any

import anyio
import anyio.abc

from policies.frontdoor import OPEN_FILES_RESERVE, open_files_soft_limit, open_files_wanted
from supervisord_llm.errors import SupervisordLLMError, UnknownEngine
from supervisord_llm.gateway.channel import Channel, ChannelClosed, open_channel
from supervisord_llm.gateway.protocol import EngineUnavailable, RequestStats, Upstream

# Token times reach the daemon at most this late; stall limits are seconds, so nothing is judged on it.
TOKEN_FLUSH_S = 0.05
# The gateway's counters reach the daemon at most this late.
STATS_PUSH_S = 0.02


def refusal_record(exc: BaseException) -> tuple[str, Any]:
    """A refusal from the daemon's acquire as plain data for the channel (exceptions do not pickle
    reliably: their constructors take keywords)."""
    if isinstance(exc, EngineUnavailable):
        return "unavailable", {"engine": exc.engine, "reason": exc.reason, "message": exc.detail,
                               "retry_after_s": exc.retry_after_s, "until_wall": exc.until_wall,
                               "status": exc.status}
    if isinstance(exc, UnknownEngine):
        return "unknown", {"engine": exc.engine, "message": str(exc)}
    if isinstance(exc, SupervisordLLMError):
        return "daemon", {"message": str(exc)}
    return "internal", {"message": f"{type(exc).__name__}: {exc}"}


class _DaemonRefused(SupervisordLLMError):
    """A refusal the daemon gave in words only (its acquire raised one of the project's errors)."""


def refusal_from_record(kind: str, record: dict[str, Any]) -> Exception:
    if kind == "unavailable":
        return EngineUnavailable(record["engine"], record["reason"], record["message"],
                                 retry_after_s=record["retry_after_s"], until_wall=record["until_wall"],
                                 status=record["status"])
    if kind == "unknown":
        exc = UnknownEngine(record["engine"], [])
        exc.args = (record["message"],)
        return exc
    if kind == "daemon":
        return _DaemonRefused(record["message"])
    return RuntimeError(record["message"])


class ProcessBackend:
    """The :class:`GatewayBackend` of the gateway's process: the daemon reached through the channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._models: list[dict] = []
        self._default: str | None = None
        self._progress: dict[str, float | None] = {}
        self._routes: dict[str, str] = {}
        self._passes: dict[str, Upstream] = {}
        self._latest_token_s: dict[str, float] = {}
        self._pending_tokens: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[str, Any]]] = {}

    # -- what the daemon sends ----------------------------------------------------------------------

    async def read_daemon(self, on_stop: Any) -> None:
        """Handle the daemon's messages until it says stop or goes away; then ``on_stop()``."""
        try:
            while True:
                message = await self.channel.receive()
                kind = message[0]
                if kind == "snapshot":
                    _, self._models, self._default, self._progress, self._routes, self._passes, seq = message
                    self.channel.send("ack", seq)
                elif kind in ("acquired", "refused", "result"):
                    future = self._waiting.get(message[1])
                    if future is not None and not future.done():
                        future.set_result((kind, message[2:]))
                elif kind == "stop":
                    break
        except ChannelClosed:
            pass
        self._passes = {}  # nobody counts requests let through any more: every request asks, and is refused
        for future in self._waiting.values():
            if not future.done():
                future.set_result(("refused", ("unavailable", _DAEMON_GONE)))
        on_stop()

    # -- the protocol ----------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        return self._models

    def default_engine(self) -> str | None:
        return self._default

    async def _ask(self, *message: Any) -> tuple[str, Any]:
        rid = next(self._ids)
        future: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            if not self.channel.send(message[0], rid, *message[1:]):
                return "refused", ("unavailable", _DAEMON_GONE)
            try:
                return await future
            except BaseException:
                # Cancelled here (the client gave up, the hold time ran out): asyncio cancelled the
                # future with us, so an answer is known only by a result in it.
                if future.cancelled() or not future.done():
                    self.channel.send("cancel", rid)  # the daemon stops waiting too
                raise
        finally:
            self._waiting.pop(rid, None)

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        kind, payload = await self._ask("acquire", model, may_start)
        if kind == "acquired":
            upstream = payload[0]
            assert isinstance(upstream, Upstream)
            return upstream
        refusal_kind, record = payload
        if record is _DAEMON_GONE:
            record = {**_DAEMON_GONE, "engine": model or "-"}
        raise refusal_from_record(refusal_kind, record)

    def engine_for(self, model: str | None) -> str | None:
        return self._routes.get(model) if model else self._default

    def try_pass(self, model: str | None) -> Upstream | None:
        name = self.engine_for(model)
        upstream = self._passes.get(name) if name is not None else None
        if upstream is not None:
            self.channel.send("note", "let_through", (upstream.engine,), lazy=True)
        return upstream

    async def status_page_doc(self) -> dict[str, Any]:
        kind, payload = await self._ask("call", "status_doc")
        if kind != "result":
            raise RuntimeError("the daemon is not reachable")
        doc = payload[0]
        assert isinstance(doc, dict)
        return doc

    def request_started(self, engine: str) -> None:
        self.channel.send("note", "request_started", (engine,), lazy=True)

    def token_progress(self, engine: str, at_s: float) -> None:
        self._latest_token_s[engine] = at_s
        self._pending_tokens[engine] = at_s
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(TOKEN_FLUSH_S, self._flush_tokens)

    def _flush_tokens(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._pending_tokens:
            pending, self._pending_tokens = self._pending_tokens, {}
            self.channel.send("tokens", pending, lazy=True)

    def engine_progress_s(self, engine: str) -> float | None:
        published = self._progress.get(engine)
        own = self._latest_token_s.get(engine)
        if published is None or (own is not None and own > published):
            return own
        return published

    def request_finished(self, stats: RequestStats) -> None:
        self._flush_tokens()
        self.channel.send("note", "request_finished", (stats,), lazy=True)

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        self._flush_tokens()
        self.channel.send("note", "stall_detected", (engine, phase, stalled_for_s))

    def prefill_changed(self, engine: str, in_prefill: int, ended_at_s: float | None) -> None:
        self.channel.send("note", "prefill_changed", (engine, in_prefill, ended_at_s), lazy=True)

    def line_changed(self, engine: str, occupied: int) -> None:
        self.channel.send("note", "line_changed", (engine, occupied), lazy=True)


_DAEMON_GONE: dict[str, Any] = {"engine": "-", "reason": "daemon_unreachable",
                                "message": "the supervisor daemon is not reachable (it is stopping or restarting)",
                                "retry_after_s": 5.0, "until_wall": None, "status": 503}


class _StatsPusher:
    """Sends the gateway's counters to the daemon at most every ``STATS_PUSH_S`` while they change,
    and not at all while they do not (an idle gateway wakes nobody)."""

    def __init__(self, stats: Any, channel: Channel) -> None:
        self.stats = stats
        self.channel = channel
        self._scheduled = False

    def changed(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(STATS_PUSH_S, self.push)

    def push(self) -> None:
        self._scheduled = False
        sent = self.channel.send("stats", self.stats.snapshot(), replaceable=True)
        if not sent and not self.channel.writer.transport.is_closing():
            self.changed()  # backed up: try again later, the newest counters win


async def _main(channel_fd: int, listen_fd: int) -> None:
    from supervisord_llm.gateway.proxy import build_app, serve
    from supervisord_llm.logsetup import configure_logging
    from supervisord_llm.subsystems.ui import ui_routes

    channel = await open_channel(socket.socket(fileno=channel_fd))
    listen_sock = socket.socket(fileno=listen_fd)
    message = await channel.receive()
    if message[0] != "init":
        raise SystemExit(f"supervisord-llm gateway: expected init from the daemon, got {message[0]!r}")
    _, settings, log_setup = message
    log = configure_logging(log_setup["level"], json_logs=log_setup["json_logs"]).bind(component="gateway")
    before, now, wanted = raise_open_files(settings.max_connections)
    if now != resource.RLIM_INFINITY and now < wanted:
        log.warning("gateway.open_files_limited", open_files=now, wanted=wanted,
                    max_connections=settings.max_connections,
                    note=f"about {max(1, (now - OPEN_FILES_RESERVE) // 2)} requests at once fit before connections "
                    "fail to be accepted; raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or "
                    "lower [gateway] max_connections")
    elif now != before:
        log.info("gateway.open_files_raised", open_files=now, was=before, wanted=wanted)
    backend = ProcessBackend(channel)
    app = build_app(backend, settings, log=log)
    app.router.routes.extend(ui_routes(backend.status_page_doc, settings.api_key))
    async with anyio.create_task_group() as tg:
        serving = anyio.CancelScope()

        def stop() -> None:
            serving.cancel()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        tg.start_soon(backend.read_daemon, stop)
        pusher = _StatsPusher(app.state.gateway, channel)
        app.state.gateway.on_change = pusher.changed
        pusher.push()
        with serving:
            async with anyio.create_task_group() as server:
                listen = await server.start(lambda task_status: serve(app, settings, sock=listen_sock,
                                                                      task_status=task_status))
                channel.send("started", listen)
        tg.cancel_scope.cancel()
    channel.close()


def raise_open_files(max_connections: int) -> tuple[int, int, int]:
    """Raise this process's soft limit on open files to what ``max_connections`` requests need (launchd's
    default is 256, systemd's 1024; each proxied stream holds two), within the hard limit
    (``policies.frontdoor.open_files_soft_limit``). The soft limit before, after, and the one wanted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = open_files_wanted(max_connections)
    target = open_files_soft_limit(soft=soft, hard=hard, wanted=wanted, darwin=sys.platform == "darwin",
                                   unlimited=resource.RLIM_INFINITY)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return soft, target, wanted


def loop_options() -> dict[str, Any]:
    """The gateway's loop runs on uvloop where it is installed (a dependency on Linux and macOS):
    its transports and callbacks cost a fraction of asyncio's per chunk."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supervisord-llm-gateway",
                                     description="The gateway process of supervisord-llm (started by the daemon).")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    args = parser.parse_args(argv)
    anyio.run(_main, args.channel_fd, args.listen_fd, backend="asyncio", backend_options=loop_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
