"""The control API: HTTP+JSON on a Unix socket, for llmctl (room: daemon interfaces; runs as an extension).

Security: the socket is created 0600 inside the 0700 state dir, and every connection's peer uid is
checked (SO_PEERCRED on Linux, getpeereid/LOCAL_PEERCRED on macOS) before a byte of HTTP is read:
a peer of another user is disconnected. Operations are an explicit allowlist of routes (no
reflection-style dispatch). Malformed or oversized requests get a 4xx JSON error; the daemon keeps
running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from supervisord_llm.doctor import restart_refusal
from supervisord_llm.engine.process import read_log_lines
from supervisord_llm.errors import (
    ConfigError,
    ControlError,
    EngineError,
    StartRefused,
    SupervisordLLMError,
    SwapError,
    SwapInProgress,
    UnknownEngine,
)
from supervisord_llm.extension import Extension
from supervisord_llm.httpserver import DaemonServer

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon

MAX_BODY_BYTES = 64 * 1024
# The most lines ``llmctl logs`` and ``llmctl events`` get at once (``-n``); the daemon keeps 1000 events in memory.
MAX_LOG_LINES = 10_000
MAX_EVENT_LINES = 1000


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if it cannot be known."""
    try:
        if sys.platform.startswith("linux"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return uid
        if sys.platform == "darwin":
            # LOCAL_PEERCRED (0x001) at SOL_LOCAL (0): struct xucred {u_int version; uid_t uid; ...}
            creds = sock.getsockopt(0, 0x001, struct.calcsize("2I"))
            _version, uid = struct.unpack("2I", creds[:8])
            return uid
    except OSError:
        return None
    return None


class PeerCheckedProtocol(H11Protocol):
    """uvicorn's h11 protocol, refusing connections from other users before reading anything."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is None or uid != os.getuid():
            body = b'{"error": "control socket: only the daemon\'s own user may connect"}'
            transport.write(b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nconnection: close\r\n"
                            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            transport.close()
            self._refused = True
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_refused", False):
            return
        super().connection_lost(exc)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > MAX_BODY_BYTES:
                raise ControlError(f"request body too large ({length} bytes; at most {MAX_BODY_BYTES})", 413)
        except ValueError as exc:
            raise ControlError("invalid Content-Length header", 400) from exc
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ControlError(f"request body too large (over {MAX_BODY_BYTES} bytes)", 413)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"request body is not valid JSON: {exc}", 400) from exc
    if not isinstance(data, dict):
        raise ControlError("request body must be a JSON object", 400)
    return data


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ControlError(f"{key!r} must be true or false, got {value!r}", 400)
    return value


def build_control_app(daemon: Daemon) -> Starlette:
    async def status(request: Request) -> Response:
        doc = daemon.status()
        if request.query_params.get("history") in ("1", "true"):
            from supervisord_llm.subsystems import observe

            watching = observe.find(daemon.extensions)
            doc["history"] = watching.history.export() if watching is not None else None
        return JSONResponse(doc)

    async def engine_op(request: Request) -> Response:
        name = request.path_params["name"]
        op = request.path_params["op"]
        data = await _json_body(request)
        force = _bool(data, "force")
        if op == "start":
            message = await daemon.start(name, force=force)
        elif op == "stop":
            message = await daemon.stop(name)
        elif op == "restart":
            message = await daemon.restart(name, force=force)
        else:
            return _error(404, f"unknown operation {op!r}; valid: start, stop, restart")
        return JSONResponse({"ok": True, "message": message, "engine": daemon.supervisor(name).status()})

    async def switch(request: Request) -> Response:
        data = await _json_body(request)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ControlError("'name' (the engine to switch to) is required", 400)
        daemon.supervisor(name)  # 404 before anything else
        result = await daemon.switch(name)
        return JSONResponse({"ok": True, **result})

    async def logs(request: Request) -> Response:
        name = request.path_params["name"]
        sup = daemon.supervisor(name)
        try:
            lines = int(request.query_params.get("lines", "100"))
        except ValueError as exc:
            raise ControlError("'lines' must be an integer", 400) from exc
        lines = max(0, min(lines, MAX_LOG_LINES))  # 0: only what comes next (with follow)
        follow = request.query_params.get("follow") in ("1", "true")
        existing = await anyio.to_thread.run_sync(read_log_lines, sup.log_path, lines)
        if not follow:
            return PlainTextResponse("\n".join(existing) + ("\n" if existing else ""))

        async def stream() -> AsyncIterator[bytes]:
            for line in existing:
                yield (line + "\n").encode()
            offset = sup.log_path.stat().st_size if sup.log_path.exists() else 0
            while True:
                await anyio.sleep(0.5)
                try:
                    size = sup.log_path.stat().st_size
                except FileNotFoundError:
                    continue
                if size < offset:
                    offset = 0
                if size > offset:
                    def read(start: int = offset, end: int = size) -> bytes:
                        with open(sup.log_path, "rb") as f:
                            f.seek(start)
                            return f.read(end - start)
                    yield await anyio.to_thread.run_sync(read)
                    offset = size

        return StreamingResponse(stream(), media_type="text/plain")

    async def events(request: Request) -> Response:
        follow = request.query_params.get("follow") in ("1", "true")
        try:
            n = int(request.query_params.get("lines", "50"))
        except ValueError as exc:
            raise ControlError("'lines' must be an integer", 400) from exc
        kept = list(daemon.events.recent)
        n = max(0, min(n, MAX_EVENT_LINES))
        recent = kept[max(0, len(kept) - n):] if n else []  # 0: only what comes next (with follow)
        if not follow:
            return JSONResponse({"events": recent})
        receive = daemon.events.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                for event in recent:
                    yield (json.dumps(event) + "\n").encode()
                async with receive:
                    async for event in receive:
                        yield (json.dumps(event) + "\n").encode()
            finally:
                daemon.events.unsubscribe(receive)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def reboot_cancel(request: Request) -> Response:
        await _json_body(request)
        return JSONResponse(daemon.cancel_reboot())

    async def daemon_restart(request: Request) -> Response:
        """Restart the daemon in place, keeping every engine (the same path as SIGHUP).

        The signal goes out after the answer is written, so the caller learns the old pid first.
        """
        await _json_body(request)
        problem = await anyio.to_thread.run_sync(restart_refusal, daemon.config)
        if problem is not None:
            return _error(409, problem)
        pid = os.getpid()
        return JSONResponse({"ok": True, "pid": pid, "message": "daemon restarting; engines keep running"},
                            background=BackgroundTask(os.kill, pid, signal.SIGHUP))

    async def alerts_test(request: Request) -> Response:
        await _json_body(request)
        if daemon.alerts_outbox is None:
            return _error(409, "no alert webhooks are configured ([[alerts.webhook]] in the config)")
        import uuid

        from policies.actions import Alert
        from supervisord_llm.alerts.delivery import TEST_ALERT_PREFIX

        key = f"{TEST_ALERT_PREFIX}{uuid.uuid4().hex[:12]}"
        daemon.alert(Alert(key=key, severity="info", summary="test alert from llmctl alerts test",
                           details={"test": True, "engine": None}))
        # Resolved at once: a test left firing would stay open (re-posted to Alertmanager) and fill the outbox.
        daemon.alert(Alert(key=key, severity="info", summary="test alert from llmctl alerts test, resolved",
                           details={"test": True, "engine": None}, resolved=True))
        return JSONResponse({"ok": True, "message": "test alert queued", "alerts": daemon.alerts_outbox.counts()})

    async def metrics(request: Request) -> Response:
        from supervisord_llm.subsystems.metrics import render_metrics

        body, content_type = render_metrics(daemon)
        return Response(body, media_type=content_type)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": daemon.healthy_loop})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no such control operation: {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, f"method {request.method} not allowed for {request.url.path}")

    async def handle_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ControlError):
            return _error(exc.status, str(exc))
        if isinstance(exc, UnknownEngine):
            return _error(404, str(exc), engine=exc.engine)
        if isinstance(exc, StartRefused):
            return _error(409, str(exc), engine=exc.engine, reason=exc.reason,
                          retry_in_s=None if exc.until_s is None else max(0.0, exc.until_s - daemon.clock.now()))
        if isinstance(exc, SwapInProgress):
            return _error(409, str(exc), reason="swap_in_progress", current=exc.current)
        if isinstance(exc, (SwapError, EngineError, SupervisordLLMError)):
            return _error(409, str(exc))
        daemon.log.exception("control.error", path=request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/engines/{name:path}/{op}", engine_op, methods=["POST"]),
        Route("/v1/switch", switch, methods=["POST"]),
        Route("/v1/engines/{name:path}/logs", logs, methods=["GET"]),
        Route("/v1/events", events, methods=["GET"]),
        Route("/v1/reboot/cancel", reboot_cancel, methods=["POST"]),
        Route("/v1/alerts/test", alerts_test, methods=["POST"]),
        Route("/v1/daemon/restart", daemon_restart, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed,
                                                        Exception: handle_error,
                                                        SupervisordLLMError: handle_error})


def _clear_stale_socket(path: str) -> None:
    """Remove what a dead daemon left at ``path``: only a socket nobody listens on. Any other file there (a
    mistyped path naming the config, say) is kept and refused, and so is a socket another daemon (one with
    another state dir) still serves."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; the daemon will not replace it: set control_socket "
                          "to a path of its own (default <state_dir>/control.sock)", key="daemon.control_socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listens there any more
    except FileNotFoundError:
        return
    except OSError as exc:  # a full backlog (timeout) is a live daemon too
        raise ConfigError(f"cannot tell whether another daemon uses the socket {path}: {exc.strerror or exc}",
                          key="daemon.control_socket") from exc
    else:
        raise ConfigError(f"another daemon listens on {path} (its state dir is not this one's); set control_socket "
                          "to a path of its own", key="daemon.control_socket")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_control_socket(path: os.PathLike[str] | str) -> socket.socket:
    path = os.fspath(path)
    _clear_stale_socket(path)
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the directory {parent} for the socket {path}: {exc.strerror or exc}",
                          key="daemon.control_socket") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}", key="daemon.control_socket") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def serve_control(daemon: Daemon, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    sock = bind_control_socket(daemon.config.daemon.control_socket)
    app = build_control_app(daemon)
    config = uvicorn.Config(app, http=PeerCheckedProtocol, lifespan="off", log_config=None, access_log=False,
                            timeout_graceful_shutdown=1, limit_concurrency=2048, backlog=256)
    server = DaemonServer(config)
    path = os.fspath(daemon.config.daemon.control_socket)
    bound_inode = os.stat(path).st_ino
    # uvicorn closes the listening socket only when it shuts down by itself; a cancelled daemon
    # would otherwise leave the socket to the garbage collector.
    try:
        with sock:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [sock])
                while not server.started:
                    await anyio.sleep(0.01)
                task_status.started()
    finally:
        # A clean exit takes its socket file away (llmctl then says at once that no daemon runs); a file some
        # other daemon bound meanwhile at that path is not this one's to remove.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == bound_inode:
                os.unlink(path)


class ControlExtension(Extension):
    """The control socket as one of the daemon's subsystems; installed first, so llmctl answers
    before the other subsystems have started."""

    name = "control"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await serve_control(self.daemon, task_status=task_status)
