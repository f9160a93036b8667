"""The daemon's side of the gateway process: starts it, answers it, restarts it when it dies.

Room: gateway.

Supervision must not wait on traffic: a crash must reach the event log and ``llmctl status`` must
answer while hundreds of streams pass through the gateway, and while the gateway itself is stuck.
So the gateway runs in a process of its own (gateway/worker.py) and the daemon's loop runs only
supervision; what crosses between them is the :class:`GatewayBackend` protocol on one channel
(gateway/channel.py). This side:

- binds the listening socket itself, so a port in use fails the daemon's start with its reason, and
  keeps it for the daemon's lifetime: a gateway process that dies (a crash, an out-of-memory kill)
  is started again on the same socket and connections that arrive meanwhile wait in its backlog;
- answers the gateway's ``acquire`` on the daemon's loop with the daemon's backend (``inner``), and
  cancels that wait when the gateway says the client gave up;
- hands the gateway's notes to ``inner`` in the order they were sent, and publishes what the
  gateway reads without asking (models, the default engine, each engine's progress, the model names
  it may route by itself and the engines it holds a pass for) on every state change and every
  ``PUBLISH_S`` while requests run;
- takes the passes back when turn-taking asks (``close_passes``): every snapshot is numbered and the
  gateway acknowledges each once applied. The channel keeps order, so once the gateway acknowledges
  a snapshot without passes, every request it let through on an older pass has been counted here;
- keeps the gateway's latest counters for ``llmctl status``;
- on the daemon's stop, tells the gateway to stop (open requests get ``shutdown_grace_s``) and
  kills it if it has not ended a few seconds after that.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import psutil

from policies import gateway_respawn
from policies.actions import Alert
from supervisord_llm.errors import SupervisordLLMError, UnknownEngine
from supervisord_llm.gateway.channel import Channel, ChannelClosed, open_channel
from supervisord_llm.gateway.protocol import (
    EngineUnavailable,
    PassingBackend,
    RequestStats,
    bind_listen,
    listen_text,
)
from supervisord_llm.gateway.settings import GatewaySettings
from supervisord_llm.gateway.worker import refusal_record

__all__ = ["GatewayProcess"]

# While requests run, the daemon refreshes what the gateway reads (engine progress, models) this often.
PUBLISH_S = 0.25
WORKER_MODULE = "supervisord_llm.gateway.worker"
# How long a gateway that was told to stop may take beyond its own shutdown grace before it is killed.
STOP_MARGIN_S = 5.0
# A stop that drains waits at most this long for the gateway to confirm a snapshot (``settle``).
SETTLE_MAX_S = 1.0


class GatewayProcess:
    """The gateway's process, run and restarted by the daemon; :meth:`run` is awaited on its loop."""

    def __init__(
        self,
        inner: PassingBackend,
        settings: GatewaySettings,
        *,
        status_doc: Callable[[], Awaitable[dict[str, Any]]],
        log_setup: dict[str, Any],
        on_exit: Callable[[dict[str, Any]], None],
        on_spawn: Callable[[], object] = lambda: None,
        on_alert: Callable[[Alert], None] = lambda alert: None,
        down_open: Callable[[], bool] = lambda: False,
        log: Any,
        on_passes_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.status_doc = status_doc
        self.log_setup = log_setup
        self.on_exit = on_exit
        self.on_spawn = on_spawn
        self.on_alert = on_alert
        self.down_open = down_open  # a gateway.down episode is open (an earlier daemon may have raised it)
        self.on_passes_closed = on_passes_closed
        self.respawn = gateway_respawn.GatewayRespawn()  # the streak of quick deaths (policies.gateway_respawn)
        self.log = log
        # The previous daemon's gateway process ({"pid", "create_time"}, from the state file).
        self.previous: dict[str, Any] | None = None
        self.listen = settings.listen
        self.pid: int | None = None
        self.restarts = 0
        self.stats: dict[str, Any] = {}  # the gateway's latest counters (GatewayStats.snapshot())
        self._channel: Channel | None = None
        self._waits: dict[int, anyio.CancelScope] = {}
        # Requests the gateway reported started and not yet finished, per engine: if the gateway
        # dies, they are finished for it (the engine's in-flight count must not stay up forever).
        self._open: Counter[str] = Counter()
        # Requests with a long prompt the gateway reported in prefill, per engine: if the gateway dies,
        # their prefill ends for it (an engine's counter samples must not stay left out forever).
        self._in_prefill: Counter[str] = Counter()
        self._in_line: Counter[str] = Counter()  # per engine: what its line in the gateway holds (line_changed)
        self._busy = anyio.Event()
        self._accepting = False  # the current gateway process reported that it accepts
        # Snapshots are numbered; the current gateway process acknowledges each once applied.
        self._seq = 0
        self._passes: frozenset[str] = frozenset()  # the engines the latest snapshot gave passes for
        self._granting_seq = -1  # the latest snapshot that gave any pass (-1: none to this process)
        self._acked_seq = 0
        self._acked = anyio.Event()  # set (and replaced) on every acknowledgement

    # -- what the gateway reads without asking ------------------------------------------------------

    def publish(self) -> None:
        """Send fresh snapshots to the gateway (daemon's loop). Called from the event log's listeners
        too: a failure is logged, never raised into an emit."""
        channel = self._channel
        if channel is None:
            return
        inner = self.inner
        try:
            models = inner.models()
            progress = {m["id"]: inner.engine_progress_s(m["id"]) for m in models}
            passes = inner.passes()
            seq = self._seq + 1
            # Never dropped (a stale engine state would misroute the gateway until the next change).
            if not channel.send("snapshot", models, inner.default_engine(), progress, inner.routes(), passes, seq):
                return  # the channel is closing: the process and its passes are going away
            self._seq = seq
            self._passes = frozenset(passes)
            if passes:
                self._granting_seq = seq
        except Exception:
            self.log.exception("gateway.backend_failed", method="publish")

    def publish_passes(self) -> None:
        """Publish now if the engines the gateway may pass requests to are no longer those it was
        last told (turn-taking formed or ended a group)."""
        try:
            changed = frozenset(self.inner.passes()) != self._passes
        except Exception:
            self.log.exception("gateway.backend_failed", method="passes")
            return
        if changed:
            self.publish()

    def close_passes(self) -> bool:
        """Whether the gateway holds no pass that the daemon has not seen it give up: no gateway
        process is connected, or it acknowledged a snapshot newer than the last one that gave
        passes. Otherwise a snapshot with the current passes (none, while a group is held) is sent,
        unless one newer than the last granting one is on its way; ``on_passes_closed`` is called
        when the acknowledgement arrives."""
        if self._channel is None or self._acked_seq > self._granting_seq:
            return True
        if self._seq == self._granting_seq and not self.inner.passes():
            self.publish()
        return False

    async def settle(self, timeout_s: float = SETTLE_MAX_S) -> None:
        """Return once the gateway has applied a snapshot published now, so that every note it sent
        before (a request it let through on a pass, a request's start) has been read here and every
        pass the daemon's state no longer gives is gone; or after ``timeout_s`` (a gateway that is
        stuck or gone holds nobody up for longer). Stops that drain call this before they count the
        requests in flight."""
        if self._channel is None:
            return
        self.publish()
        target = self._seq
        with anyio.move_on_after(timeout_s):
            while self._channel is not None and self._acked_seq < target:
                await self._acked.wait()

    async def run_publisher(self) -> None:
        """While requests run, refresh the snapshots every ``PUBLISH_S``; idle, it sleeps."""
        while True:
            if sum(self._open.values()) <= 0:
                self._busy = anyio.Event()
                await self._busy.wait()
            self.publish()
            await anyio.sleep(PUBLISH_S)

    # -- running the process ------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the address, run the gateway process; start it again whenever it dies.

        The address is reported once bound, before the process accepts: connections wait in the
        socket's backlog meanwhile, and the daemon's engines do not wait for the gateway to start.
        A port that cannot be had raises GatewayListenFailed here (the daemon's start fails)."""
        if self.previous:
            # A previous daemon that died without stopping leaves its gateway draining its streams for
            # up to shutdown_grace_s, still listening on the port: it is ended before the port is taken.
            await anyio.to_thread.run_sync(self._end_previous, self.previous)
        sock = bind_listen(self.settings.host, self.settings.port)
        self.listen = listen_text(sock)
        try:
            task_status.started(self.listen)
            while True:
                started_at = anyio.current_time()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._note_stable)
                    ended = await self._run_once(sock)
                    tg.cancel_scope.cancel()
                delay_s, self.respawn, alert = gateway_respawn.after_exit(
                    self.respawn, ran_s=anyio.current_time() - started_at, listen=self.listen,
                    exit_text=str(ended.get("exit")), reason=str(ended.get("reason")))
                self.restarts += 1
                self.on_exit({**ended, "restarts": self.restarts, "next_start_in_s": delay_s})
                if alert is not None:
                    self.on_alert(alert)
                await anyio.sleep(delay_s)
        finally:
            sock.close()

    async def _note_stable(self) -> None:
        """The process has run for ``STABLE_S`` (cancelled when it ends sooner): its streak of deaths is over."""
        await anyio.sleep(gateway_respawn.STABLE_S)
        state = self.respawn
        if not state.down and self.down_open():
            state = dataclasses.replace(state, down=True)
        self.respawn, alert = gateway_respawn.after_stable_run(state, listen=self.listen)
        if alert is not None:
            self.on_alert(alert)

    @property
    def down(self) -> bool:
        """The gateway died again and again (``gateway.down`` is raised): no client is served."""
        return self.respawn.down

    def _end_previous(self, previous: dict[str, Any]) -> None:
        try:
            proc = psutil.Process(int(previous["pid"]))
            same = (abs(proc.create_time() - float(previous["create_time"])) < 1.0
                    and WORKER_MODULE in proc.cmdline())
        except psutil.ZombieProcess as exc:
            # Ended already; after a re-exec it may be this process's own child, to be reaped here.
            try:
                os.waitpid(exc.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            return
        except (psutil.Error, KeyError, TypeError, ValueError):
            return
        if not same:
            return  # the pid is someone else's now
        self.log.warning("gateway.previous_ended", pid=proc.pid)
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=self.settings.shutdown_grace_s + STOP_MARGIN_S)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=5)

    def persisted(self) -> dict[str, Any] | None:
        """What the next daemon needs to end this gateway process if this daemon dies without stopping."""
        if self.pid is None:
            return None
        try:
            return {"pid": self.pid, "create_time": psutil.Process(self.pid).create_time()}
        except psutil.Error:
            return None

    def _spawn(self, sock: socket.socket, child_end: socket.socket) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", WORKER_MODULE,
                "--channel-fd", str(child_end.fileno()), "--listen-fd", str(sock.fileno())]
        # Its own session: a Ctrl-C at the daemon's terminal reaches the daemon, which stops the
        # gateway in order (open requests get their grace), not both at once.
        return subprocess.Popen(argv, pass_fds=(child_end.fileno(), sock.fileno()), start_new_session=True,
                                stdin=subprocess.DEVNULL)

    async def _run_once(self, sock: socket.socket) -> dict[str, Any]:
        """One gateway process from start to end; returns how it ended (it died: the daemon runs on).

        There is no separate start-up phase on this side: requests already waiting in the socket's
        backlog reach the daemon before the gateway reports ``started``, and are answered like any.
        """
        ours, theirs = socket.socketpair()
        try:
            proc = await anyio.to_thread.run_sync(self._spawn, sock, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = proc.pid
        try:
            self.on_spawn()
            channel = await open_channel(ours)
        except BaseException:
            ours.close()
            with anyio.CancelScope(shield=True):
                await self._stop(proc)
            raise
        self._channel = channel
        self._granting_seq, self._acked_seq, self._passes = -1, 0, frozenset()  # a new process holds none
        ended: dict[str, Any] = {"pid": proc.pid}
        try:
            channel.send("init", self.settings, self.log_setup)
            self.publish()
            reason = await self._serve(channel)
            code = await self._reap(proc, kill_after_s=STOP_MARGIN_S)
            if not self._accepting:
                reason = f"it ended during startup ({reason}); its reason is logged above"
            return {**ended, "exit": _exit_text(code), "reason": reason}
        finally:
            with anyio.CancelScope(shield=True):
                if proc.poll() is None:
                    # The daemon is stopping: no new connection may wait on a port nobody will serve,
                    # and what the gateway reports while it finishes its open requests still counts.
                    sock.close()
                    await self._stop(proc, channel)
            self._channel = None
            self._acked.set()  # nobody waits for an acknowledgement from a process that is gone
            self._acked = anyio.Event()
            self.on_passes_closed()  # its passes went with it
            channel.close()
            for scope in self._waits.values():
                scope.cancel()
            self._finish_open_requests()
            self.stats = {}
            self.pid = None
            self._accepting = False

    async def _serve(self, channel: Channel) -> str:
        """Answer the gateway until its end of the channel closes; returns why it closed."""
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    message = await channel.receive()
                    try:
                        self._dispatch(tg, channel, message)
                    except Exception:  # a message this side cannot read must not take the daemon down
                        self.log.exception("gateway.message_failed", message=repr(message)[:200])
            except ChannelClosed as exc:
                reason = f"its channel closed ({exc})"
            finally:
                tg.cancel_scope.cancel()
        return reason

    def _dispatch(self, tg: anyio.abc.TaskGroup | None, channel: Channel, message: tuple[Any, ...]) -> None:
        """One message from the gateway. With no task group (the gateway is stopping), only its reports
        are taken: notes, tokens and counters."""
        kind = message[0]
        if kind == "tokens":
            self._tokens(message[1])
        elif kind == "note":
            self._note(message[1], *message[2])
        elif kind == "stats":
            self.stats = message[1]
        elif kind == "started":
            self._accepting = True
        elif kind == "ack":
            closed_before = self._acked_seq > self._granting_seq
            self._acked_seq = max(self._acked_seq, message[1])
            self._acked.set()
            self._acked = anyio.Event()
            if not closed_before and self._acked_seq > self._granting_seq:
                self.on_passes_closed()
        elif tg is None:
            return
        elif kind == "acquire":
            # The wait's scope exists before its task runs: a cancel read in the same batch finds it.
            scope = self._waits[message[1]] = anyio.CancelScope()
            # (A gateway of an older daemon's version sends no may_start: it may, as before.)
            tg.start_soon(self._acquire, channel, message[1], message[2], message[3] if len(message) > 3 else True,
                          scope)
        elif kind == "cancel":
            waiting = self._waits.get(message[1])
            if waiting is not None:
                waiting.cancel()
        elif kind == "call" and message[2] == "status_doc":
            tg.start_soon(self._status_doc, channel, message[1])

    async def _acquire(self, channel: Channel, rid: int, model: str | None, may_start: bool,
                       scope: anyio.CancelScope) -> None:
        with scope:
            try:
                upstream = await self.inner.acquire(model, may_start=may_start)
            except (EngineUnavailable, UnknownEngine, SupervisordLLMError) as exc:
                channel.send("refused", rid, *refusal_record(exc))
            except Exception as exc:
                self.log.exception("gateway.backend_failed", method="acquire")
                channel.send("refused", rid, *refusal_record(exc))
            else:
                if not channel.send("acquired", rid, upstream) and not channel.closed:
                    channel.send("refused", rid, *refusal_record(RuntimeError("the engine's address could not be sent")))
            finally:
                self._waits.pop(rid, None)

    async def _status_doc(self, channel: Channel, rid: int) -> None:
        try:
            doc = await self.status_doc()
        except Exception as exc:
            self.log.exception("gateway.backend_failed", method="status_doc")
            channel.send("refused", rid, *refusal_record(exc))
        else:
            channel.send("result", rid, doc)

    def _tokens(self, latest: dict[str, float]) -> None:
        for engine, at_s in latest.items():
            try:
                self.inner.token_progress(engine, at_s)
            except Exception:
                self.log.exception("gateway.backend_failed", method="token_progress")

    def _note(self, method: str, *args: Any) -> None:
        if method == "let_through":
            pass
        elif method == "request_started":
            self._open[args[0]] += 1
            self._busy.set()
        elif method == "request_finished":
            engine = args[0].engine
            if self._open[engine] > 0:
                self._open[engine] -= 1
        elif method == "prefill_changed":
            self._in_prefill[args[0]] = args[1]
        elif method == "line_changed":
            self._in_line[args[0]] = args[1]
        elif method != "stall_detected":
            return  # not a note this side knows: ignored, never called by name
        try:
            getattr(self.inner, method)(*args)
        except Exception:
            self.log.exception("gateway.backend_failed", method=method)

    def _finish_open_requests(self) -> None:
        in_line, self._in_line = self._in_line, Counter()
        for engine, count in in_line.items():
            if count > 0:
                try:
                    self.inner.line_changed(engine, 0)
                except Exception:
                    self.log.exception("gateway.backend_failed", method="line_changed")
        in_prefill, self._in_prefill = self._in_prefill, Counter()
        for engine, count in in_prefill.items():
            if count > 0:
                try:
                    self.inner.prefill_changed(engine, 0, None)
                except Exception:
                    self.log.exception("gateway.backend_failed", method="prefill_changed")
        open_requests, self._open = self._open, Counter()
        for engine, count in open_requests.items():
            for _ in range(count):
                try:
                    self.inner.request_finished(RequestStats(engine=engine, ttft_s=None, tokens=0, decode_s=None,
                                                             max_gap_s=None, ended="gateway_exited"))
                except Exception:
                    self.log.exception("gateway.backend_failed", method="request_finished")

    async def _stop(self, proc: subprocess.Popen[bytes], channel: Channel | None = None) -> None:
        """Tell the gateway to stop (its open requests get their grace) and take its last reports
        until it ends; kill it if it overruns."""
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        limit_s = self.settings.shutdown_grace_s + STOP_MARGIN_S
        if channel is not None:
            with anyio.move_on_after(limit_s):
                try:
                    while True:
                        message = await channel.receive()
                        try:
                            self._dispatch(None, channel, message)
                        except Exception:
                            self.log.exception("gateway.message_failed", message=repr(message)[:200])
                except ChannelClosed:
                    pass
        code = await self._reap(proc, kill_after_s=limit_s if channel is None else STOP_MARGIN_S)
        if code == -signal.SIGKILL:
            self.log.error("gateway.stop_timeout", pid=proc.pid, waited_s=limit_s)

    async def _reap(self, proc: subprocess.Popen[bytes], *, kill_after_s: float) -> int:
        """The process's exit status, waited for up to ``kill_after_s`` and then killed."""
        with anyio.move_on_after(kill_after_s):
            while proc.poll() is None:
                await anyio.sleep(0.02)
            return proc.returncode
        proc.kill()
        return await anyio.to_thread.run_sync(proc.wait)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
