"""One engine's supervisor: the only writer of its state.

Room: engine.

Everything that changes an engine's state arrives as a message in the supervisor's inbox, from
outside (start, stop, restart) or from its own worker tasks (process exited, ready, hung, stopped,
backoff over). The main loop handles one message at a time, so transitions never race. Workers
belong to a *generation* (one spawn); a message from an older generation is ignored.

    stopped ──start──▶ starting ──generation ok──▶ ready ◀──▶ degraded
       ▲                  │  │                        │
       │           exit/timeout  stop                hung ──(still hung after hang_restart_after)──▶ stopping
       │                  ▼  ▼                        │                                              │
       └──── stopping ◀── backoff ──(next_start_at)──▶ starting                                     ▼
                           │                                                              backoff / starting
                           └──(too many failures)──▶ failed (until `llmctl start`)

    starting ──(memory admission refused, after its bounded wait)──▶ stopped (the next start asks again)

A start that memory admission refuses (after its bounded wait) ends ``stopped``, not ``failed``: memory
short right now is no crash loop. Its reason is the refusal's message (what the engine needs, what is
available); no failure is counted, and the next request for it (or ``llmctl start``) asks admission again.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx

from policies import backoff, restore
from policies.actions import Alert, MarkFailed, Refuse, WaitUntil
from policies.health import GENERATION_OK, decide_start_check
from probes.readings import CanaryReading, Diagnosis, EngineCounters
from supervisord_llm.clock import Clock
from supervisord_llm.config import Config, EngineConfig
from supervisord_llm.engine.adapters import EngineAdapter, adapter_for
from supervisord_llm.engine.episodes import exit_alerts
from supervisord_llm.engine.process import EngineProcess, ExitInfo, LogTail, port_holder
from supervisord_llm.errors import (
    EngineError,
    EngineSpawnFailed,
    EngineStartTimeout,
    PortInUse,
    StartRefused,
)
from supervisord_llm.events import EventLog
from supervisord_llm.redact import daemon_secret_values, engine_environment, redact_argv


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    HUNG = "hung"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


_S = EngineState
# Every transition the supervisor makes (a state may also be re-entered with a new reason). A
# transition not listed is a bug: it raises when ``EngineSupervisor.strict_transitions`` is set (the
# tests set it) and is logged and not applied otherwise, so a daemon never runs on a silent mistake.
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    _S.STOPPED: frozenset({_S.STARTING, _S.BACKOFF}),
    # starting -> stopped: a start memory admission refused (nothing was spawned; see _on_start_failed).
    _S.STARTING: frozenset({_S.READY, _S.STOPPING, _S.STOPPED, _S.BACKOFF, _S.FAILED}),
    _S.READY: frozenset({_S.DEGRADED, _S.HUNG, _S.STOPPING, _S.BACKOFF, _S.FAILED}),
    _S.DEGRADED: frozenset({_S.READY, _S.HUNG, _S.STOPPING, _S.BACKOFF, _S.FAILED}),
    _S.HUNG: frozenset({_S.READY, _S.STOPPING, _S.BACKOFF, _S.FAILED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.STARTING, _S.BACKOFF, _S.FAILED}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPING, _S.STOPPED, _S.FAILED}),
    _S.FAILED: frozenset({_S.STARTING, _S.STOPPING, _S.STOPPED}),
}


class IllegalTransition(RuntimeError):
    """A transition the table does not allow (a supervisor bug, never a user's mistake)."""


class Op(StrEnum):
    """What a person (or the daemon on their behalf) asks of an engine."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"


class Then(StrEnum):
    """What follows a stop once the process tree is gone."""

    STAY = "stay"  # stopped
    START = "start"  # a person's restart: start again at once
    AUTO = "auto"  # a failure: backoff (or failed), counted
    POLICY = "policy"  # a restart a policy asked for: through the 60 s floor, not counted as a failure


class Verdict(StrEnum):
    """The watchdog's and the memory guard's verdicts on a serving engine."""

    OK = "ok"
    HUNG = "hung"
    HANG_RESTART = "hang_restart"
    DEGRADED = "degraded"
    DEGRADED_RESTART = "degraded_restart"
    MEMORY_RESTART = "memory_restart"


RESIDENT_STATES = frozenset({EngineState.STARTING, EngineState.READY, EngineState.DEGRADED, EngineState.HUNG,
                             EngineState.STOPPING})
SERVING_STATES = frozenset({EngineState.READY, EngineState.DEGRADED})
PRELOAD_REASON = "daemon start"  # the reason of the daemon's own start of an autostart engine
# The reason of the daemon's own stop of its engines when it exits cleanly (``policies.restore.SHUTDOWN_REASON``):
# nobody stopped such an engine, so the next daemon starts it again, unlike one a person or its idle unload stopped.
SHUTDOWN_REASON = restore.SHUTDOWN_REASON
ADOPTED_REASON = "adopted running engine"  # the start of a run an earlier daemon left running


# ---- inbox messages ---------------------------------------------------------------------------

@dataclass
class Reply:
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None
    value: Any = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()


@dataclass
class Command:
    op: Op
    force: bool = False
    manual: bool = True
    reason: str = ""
    grace_s: float | None = None  # stop: overrides the engine's stop_grace (a policy's Stop.grace_s)
    drain: bool = False  # stop: a serving engine finishes the requests in flight first (up to swap_drain)
    reply: Reply = field(default_factory=Reply)


@dataclass
class Spawned:
    gen: int
    proc: EngineProcess


@dataclass
class LaunchFailed:
    gen: int
    error: EngineError


@dataclass
class Exited:
    gen: int
    info: ExitInfo


@dataclass
class Ready:
    gen: int
    canary: CanaryReading
    reason: str = GENERATION_OK


@dataclass
class StartTimedOut:
    gen: int
    error: EngineError


@dataclass
class Stopped:
    gen: int
    graceful: bool
    killed: tuple[int, ...]
    then: Then


@dataclass
class HealthVerdict:
    gen: int
    state: Verdict
    reason: str
    evidence: dict[str, Any] | None = None  # which source showed silence (or progress), for how long


@dataclass
class BackoffOver:
    gen: int


@dataclass
class Adopt:
    proc: EngineProcess


class SupervisorHost(Protocol):
    """**Protocol:** what an engine's supervisor needs from whoever runs it (the daemon, or a test's double).

    Events and persistence (``events``, ``persist``), the clock, admission (``admit``, which waits
    or raises ``StartRefused``), alerts, the backoff settings, the HTTP client for probes, and the
    notifications the host acts on (``engine_ready``, ``engine_exited``, ``monitor_engine``).
    The supervisor never reaches further into its host than this.
    """

    clock: Clock
    events: EventLog
    http: httpx.AsyncClient
    backoff_settings: backoff.BackoffSettings
    daemon_id: str
    config: Config  # read for the secrets an engine must not inherit

    async def persist_durably(self) -> None: ...

    @property
    def shutting_down(self) -> bool: ...

    def persist(self) -> object: ...

    def alert(self, alert: Alert) -> None: ...

    async def admit(self, sup: EngineSupervisor) -> None: ...

    def engine_ready(self, sup: EngineSupervisor) -> None: ...

    def engine_exited(self, sup: EngineSupervisor) -> None: ...

    async def monitor_engine(self, sup: EngineSupervisor, gen: int, proc: EngineProcess) -> None: ...

    def footprint_bytes(self, sup: EngineSupervisor) -> int | None: ...

    async def requests_settled(self) -> None:
        """Return once every request sent to an engine so far is counted in its ``health.in_flight``
        (bounded: a gateway that does not answer holds nobody up for long)."""


class EngineSupervisor:
    strict_transitions = False  # the tests set it: an illegal transition raises instead of being logged

    def __init__(self, config: EngineConfig, host: SupervisorHost, *, log: Any, logs_dir: Path,
                 log_max_bytes: int) -> None:
        self.config = config
        self.name = config.name
        self.host = host
        self.clock = host.clock
        self.log = log.bind(engine=config.name)
        self.adapter: EngineAdapter = adapter_for(config)
        self.state = EngineState.STOPPED
        self.since_s = self.clock.now()
        self.since_wall = self.clock.wall()
        self.proc: EngineProcess | None = None
        self.run_listen: str | None = None  # where the current run listens (the config's at its spawn)
        self.gen = 0
        self.restarts = 0
        self.next_start_at_s: float | None = None
        self.last_exit: dict[str, Any] | None = None
        self.diagnosis: Diagnosis | None = None
        self.last_canary: CanaryReading | None = None
        self.last_canary_wall: float | None = None
        self.state_reason = ""
        # The refusal that left the engine stopped ({reason, message, at}): kept while starts are tried
        # again, until the engine is ready or a person stops it (the alert episode ends the same way).
        self.start_refused: dict[str, Any] | None = None
        self.start_refused_at_s: float | None = None  # when (monotonic; automatic starts wait after it)
        self._spawn_reason = ""  # why the start in progress (or the last one) was begun
        # The last readiness check's outcome while starting ("/health answered 503 Loading model").
        self.start_check: str | None = None
        self.ready_since_s: float | None = None
        # When this daemon saw the run ready: the same, except for a run it adopted (``ready_since_s`` is then the
        # last daemon's). The idle unload counts from here: this daemon knows of no request before it.
        self.ready_here_since_s: float | None = None
        # When the last daemon's run of this engine became ready (wall clock, from the state file): an engine this
        # daemon adopts has been ready since then, not since its check here (status FOR, the backoff's streak).
        self.saved_ready_since_wall: float | None = None
        self.backoff = backoff.BackoffState(engine=config.name)
        self.log_path = logs_dir / f"{config.name}.log"
        self.exits_dir = logs_dir.parent / "exits"  # the keepers' exit records: <state_dir>/exits
        self.log_tail = LogTail(self.log_path, max_bytes=log_max_bytes)
        self.weights_bytes: int | None = None  # size of the model's weights on disk, once measured
        self.swap_in_progress = False
        self.health: Any = None  # per-engine health tracker, set by the daemon
        # Unbounded: a dropped Exited or Stopped message would leave the engine stuck in its state.
        self._send, self._inbox = anyio.create_memory_object_stream[Any](math.inf)
        self._gen_scopes: list[anyio.CancelScope] = []
        self._stop_is_failure = False
        self._stop_reason = "stopped"
        self._degraded_raised = False  # this run's engine.degraded alert is open (raised, not yet resolved)
        self._stop_then = Then.STAY  # what follows the stop in progress
        self._stop_ready_for_s = 0.0  # how long the run being stopped had been ready
        self._sweeping = 0  # leftovers of a crashed run still being killed: they hold memory
        self._tg: anyio.abc.TaskGroup | None = None
        self.state_changed = anyio.Event()
        self._on_change: list[Callable[[EngineSupervisor], None]] = []

    # ---- public (any task) ------------------------------------------------------------------

    async def command(self, op: Op | str, *, force: bool = False, manual: bool = True, reason: str = "",
                      grace_s: float | None = None, drain: bool = False) -> Any:
        """Ask the supervisor to start/stop/restart; returns once accepted (not when finished).

        ValueError names the valid operations when ``op`` is none of them.
        """
        try:
            operation = Op(op)
        except ValueError:
            raise ValueError(f"unknown operation {op!r}; valid: {', '.join(Op)}") from None
        cmd = Command(op=operation, force=force, manual=manual, reason=reason, grace_s=grace_s, drain=drain)
        await self._send.send(cmd)
        await cmd.reply.done.wait()
        if cmd.reply.error is not None:
            raise cmd.reply.error
        return cmd.reply.value

    async def wait_for(self, predicate: Callable[[EngineSupervisor], bool], timeout_s: float | None) -> bool:
        with anyio.move_on_after(timeout_s):
            while not predicate(self):
                event = self.state_changed
                await event.wait()
            return True
        return False

    def post(self, message: Any) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            self.log.warning("engine.inbox_full", message=type(message).__name__)
        except anyio.ClosedResourceError:
            pass  # the supervisor has ended (daemon exit): nothing acts on messages any more

    def close(self) -> None:
        """Close the inbox (idempotent): the supervisor's loop has ended or never ran."""
        self._send.close()
        self._inbox.close()

    @property
    def resident(self) -> bool:
        return (self.state in RESIDENT_STATES or (self.proc is not None and self.proc.running)
                or self._sweeping > 0)

    @property
    def floor_wait(self) -> bool:
        """In backoff only for the floor between spawns, no failure streak's backoff (a daemon restarted inside
        the floor, a restart a policy asked for, a crash whose own backoff has passed): its start is due, and
        the gateway holds requests for it where a failure's backoff answers them at once."""
        return self.state == EngineState.BACKOFF and backoff.only_the_floor_holds(
            self.backoff, self.host.backoff_settings, self.clock.now())

    @property
    def serving(self) -> bool:
        return self.state in SERVING_STATES

    @property
    def sweeping(self) -> bool:
        """Leftovers of a crashed run are still being killed (they hold memory until gone)."""
        return self._sweeping > 0

    @property
    def serving_or_hung(self) -> bool:
        return self.state in SERVING_STATES or self.state == EngineState.HUNG

    # ---- main loop --------------------------------------------------------------------------

    async def run(self, adopted: EngineProcess | None, autostart: bool, listen_was: str | None = None,
                  *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """``listen_was``: the address the adopted process was started on (its record), where known."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if adopted is not None:
                self._adopt(adopted)
                self.run_listen = listen_was or self.listen
                if restore.run_moved(listen_was, self.listen):
                    # The config moved the engine (a new port or host): probed where it no longer listens, it
                    # would sit in `starting` until start_timeout. Stopped and started on the new address,
                    # through the 60 s floor, as a policy's restart (no failure).
                    self._begin_stop(f"its address changed in the config ({self.run_listen} -> {self.listen}): "
                                     "restarted on the new one", then=Then.POLICY)
            elif autostart:
                self._autostart()
            task_status.started()
            try:
                async for message in self._inbox:
                    try:
                        self._handle(message)
                    except IllegalTransition:
                        raise  # only raised in strict mode (tests): it must fail loudly there
                    except Exception as exc:  # a bug must not take the supervisor down with the engine
                        self.log.exception("engine.handler_failed", message=type(message).__name__, error=str(exc))
            finally:
                self.close()

    def _autostart(self) -> None:
        """Start at daemon start, unless the spawn history (kept across daemon restarts) says the
        engine is still inside its backoff: then wait for it, as the previous daemon would have."""
        now = self.clock.now()
        at_s = backoff.next_start_at(self.backoff, self.host.backoff_settings, now)
        if at_s > now:
            # Inside the floor or a backoff. The exit may be missing from the record (a daemon killed
            # before its last state write landed): the spawn time, written before every fork, says
            # the engine ran less than min_interval ago and is gone now, so this is a backoff too.
            settings = self.host.backoff_settings
            if not backoff.only_the_floor_holds(self.backoff, settings, now):
                reason = self.backoff.last_exit_reason or "a failure streak"
            else:
                # No failure holds it, only the floor: say so (not an old crash whose backoff has passed).
                last = self.backoff.last_spawn_at_s
                ago = f" {now - last:.0f}s ago" if last is not None else ""
                reason = (f"waiting for the {settings.min_interval_s:.0f}s floor between spawns: last spawned{ago}, "
                          "before the daemon restarted, and not running now")
            self._new_generation()
            self.next_start_at_s = at_s
            self._set_state(EngineState.BACKOFF, reason, next_start_in_s=round(at_s - now, 1))
            self.next_start_at_s = at_s
            self._spawn_worker(self._backoff_timer, self.gen, at_s)
            return
        self._begin_spawn(manual=False, reason=PRELOAD_REASON)

    def step(self, message: Any) -> None:
        """Handle one inbox message now: the transition function (the main loop calls it; table tests too)."""
        self._handle(message)

    def _handle(self, m: Any) -> None:
        if isinstance(m, Command):
            self._handle_command(m)
            return
        if isinstance(m, Spawned) and m.gen != self.gen:
            # A stop or restart overtook this spawn: the process exists but belongs to no run.
            # It must not be left running (two copies, or two exclusive engines at once).
            self.host.events.emit("engine.spawn_overtaken", engine=self.name, pid=m.proc.pid)
            self._start_sweep(m.proc)
            return
        if getattr(m, "gen", self.gen) != self.gen:
            return  # from a generation that no longer exists
        if isinstance(m, Spawned):
            self._on_spawned(m.proc)
        elif isinstance(m, LaunchFailed):
            self._on_start_failed(m.error, exit_info=None)
        elif isinstance(m, Exited):
            self._on_exited(m.info)
        elif isinstance(m, Ready):
            self._on_ready(m.canary, m.reason)
        elif isinstance(m, StartTimedOut):
            self._on_start_timeout(m.error)
        elif isinstance(m, Stopped):
            self._on_stopped(m)
        elif isinstance(m, HealthVerdict):
            self._on_health(m)
        elif isinstance(m, BackoffOver):
            if self.state == EngineState.BACKOFF:
                if self.host.shutting_down:
                    self._set_state(EngineState.STOPPED, SHUTDOWN_REASON)
                else:
                    self._begin_spawn(manual=False, reason="backoff over")

    # ---- state ------------------------------------------------------------------------------

    def _set_state(self, state: EngineState, reason: str = "", **fields: Any) -> None:
        previous = self.state
        if previous == state and reason == self.state_reason:
            return
        if previous != state and state not in TRANSITIONS[previous]:
            message = f"{self.name}: {previous} -> {state} is not a transition of the engine state machine ({reason})"
            if self.strict_transitions:
                raise IllegalTransition(message)
            self.log.error("engine.illegal_transition", **{"from": str(previous)}, to=str(state), reason=reason)
            return
        self.state = state
        self.state_reason = reason
        self.since_s = self.clock.now()
        self.since_wall = self.clock.wall()
        if state == EngineState.READY:
            self._degraded_raised = False  # resolved now (recovered in place) or by the ready path's episodes
        if state == EngineState.READY and previous != EngineState.DEGRADED:
            self.ready_since_s = self.ready_here_since_s = self.since_s
        elif state not in SERVING_STATES and state != EngineState.HUNG:
            self.ready_since_s = self.ready_here_since_s = None
        if state != EngineState.BACKOFF:
            self.next_start_at_s = None
        self.host.events.emit("engine.state_changed", engine=self.name, **{"from": str(previous)},
                                to=str(state), reason=reason, pid=self.proc.pid if self.proc else None, **fields)
        self.host.persist()
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting in ``wait_for`` (a state change, or residency changing without one)."""
        event, self.state_changed = self.state_changed, anyio.Event()
        event.set()
        for callback in list(self._on_change):
            callback(self)

    def _new_generation(self) -> None:
        """Cancel every worker of the current generation; messages they already sent are ignored."""
        for scope in self._gen_scopes:
            scope.cancel()
        self._gen_scopes = []
        self.gen += 1

    def _spawn_worker(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._tg is not None
        scope = anyio.CancelScope()
        self._gen_scopes.append(scope)

        async def runner() -> None:
            with scope:
                try:
                    await fn(*args)
                except Exception as exc:  # a worker bug must not take the supervisor down
                    self.log.exception("engine.worker_failed", worker=getattr(fn, "__name__", "?"), error=str(exc))
            if scope in self._gen_scopes:
                self._gen_scopes.remove(scope)

        runner.__name__ = getattr(fn, "__name__", "worker")  # task names say which worker it is
        self._tg.start_soon(runner)

    # ---- commands ---------------------------------------------------------------------------

    def _handle_command(self, cmd: Command) -> None:
        try:
            if cmd.op is Op.START:
                cmd.reply.set(self._cmd_start(cmd))
            elif cmd.op is Op.STOP:
                cmd.reply.set(self._cmd_stop(cmd))
            else:
                cmd.reply.set(self._cmd_restart(cmd))
        except Exception as exc:
            cmd.reply.set(error=exc)

    def _cmd_start(self, cmd: Command) -> str:
        if self.host.shutting_down:
            raise StartRefused(self.name, "shutting_down", "the daemon is shutting down; no engine is started now")
        if self.state in (EngineState.STARTING, EngineState.READY, EngineState.DEGRADED, EngineState.HUNG):
            return f"{self.name} is already {self.state}"
        if self.state == EngineState.STOPPING:
            raise StartRefused(self.name, "stopping", f"{self.name} is stopping; start it again once it is stopped")
        now = self.clock.now()
        verdict = backoff.start_allowed(self.backoff, self.host.backoff_settings, now, force=cmd.force,
                                        manual=cmd.manual)
        if isinstance(verdict, Refuse):
            raise StartRefused(self.name, verdict.reason, verdict.message, verdict.until_s)
        if cmd.force or self.state == EngineState.FAILED:
            # A person took responsibility: the failure streak starts over.
            self.backoff = backoff.BackoffState(engine=self.name, spawn_times_s=self.backoff.spawn_times_s)
        self._begin_spawn(manual=cmd.manual, reason=cmd.reason or "llmctl start", overrode=verdict.message
                          if cmd.force else None)
        return f"starting {self.name}"

    def _cmd_stop(self, cmd: Command) -> str:
        if self.state in (EngineState.STOPPED,):
            return f"{self.name} is already stopped"
        if self.state in (EngineState.BACKOFF, EngineState.FAILED) and (self.proc is None or not self.proc.running):
            was = self.state
            self._new_generation()
            self._set_state(EngineState.STOPPED, cmd.reason or "llmctl stop")
            return f"{self.name} stopped (it was in {was})"
        if self.state == EngineState.STOPPING:
            # A restart (or hang restart) in progress ends stopped instead of starting again.
            if self._stop_then != Then.STAY:  # a stop already meant to stay keeps its reason (a person's, say)
                self._stop_reason = cmd.reason or "llmctl stop"
            self._stop_then = Then.STAY
            self._stop_is_failure = False
            return f"{self.name} is already stopping; it will stay stopped"
        drain_s = self.host.config.memory.swap_drain_s if cmd.drain and self.state in SERVING_STATES else 0.0
        self._begin_stop(cmd.reason or "llmctl stop", then=Then.STAY, grace_s=cmd.grace_s, drain_s=drain_s)
        return f"stopping {self.name}"

    def _cmd_restart(self, cmd: Command) -> str:
        down = self.state in (EngineState.STOPPED, EngineState.FAILED, EngineState.BACKOFF) and (
            self.proc is None or not self.proc.running)
        spacing = backoff.manual_restart_allowed(self.backoff, self.host.backoff_settings, self.clock.now(), cmd.force,
                                                 running=not down)
        self.host.events.emit("policy.decided", policy="restart_spacing", engine=self.name,
                              decision="refuse" if isinstance(spacing, Refuse) else "admit", force=cmd.force,
                              last_spawn_at_s=self.backoff.last_spawn_at_s, message=spacing.message)
        if isinstance(spacing, Refuse):
            raise StartRefused(self.name, spacing.reason, spacing.message, spacing.until_s)
        if down:
            if cmd.force or self.state == EngineState.FAILED:
                self.backoff = backoff.BackoffState(engine=self.name, spawn_times_s=self.backoff.spawn_times_s)
            self._begin_spawn(manual=True, reason=cmd.reason or "llmctl restart")
            return f"starting {self.name}"
        if self.state == EngineState.STOPPING:
            raise StartRefused(self.name, "stopping", f"{self.name} is stopping; start it once it is stopped")
        self.restarts += 1
        # A person's restart of a working engine lets the requests it is answering finish first (up
        # to swap_drain, as a swap does); it is stopping meanwhile, so new requests wait for the new run.
        # A hung engine finishes nothing: it is stopped at once.
        drain_s = self.host.config.memory.swap_drain_s if self.state in SERVING_STATES else 0.0
        self._begin_stop(cmd.reason or "llmctl restart", then=Then.START, drain_s=drain_s)
        return f"restarting {self.name}"

    # ---- spawn ------------------------------------------------------------------------------

    def _begin_spawn(self, *, manual: bool, reason: str, overrode: str | None = None) -> None:
        self._new_generation()
        self._spawn_reason = reason
        # The previous run's process is reaped: its pid may belong to anyone by now. A stop before
        # the new spawn has nothing to signal.
        self.proc = None
        self.diagnosis = None
        self.start_check = None  # the last run's start checks say nothing about this one
        fields: dict[str, Any] = {"manual": manual}
        if overrode:
            fields["overrode"] = overrode
        self._set_state(EngineState.STARTING, reason, **fields)
        self._spawn_worker(self._launch, self.gen, manual)

    async def _launch(self, gen: int, manual: bool) -> None:
        """Admission, port check, spawn: the part of a start before the process exists."""
        try:
            if not manual:
                now = self.clock.now()
                at_s = backoff.on_demand_start_at(self.backoff, self.host.backoff_settings, now)
                if at_s > now:
                    self.host.events.emit("policy.decided", engine=self.name, policy="spawn_floor", decision="wait",
                                            wait_s=round(at_s - now, 1),
                                            min_interval_s=self.host.backoff_settings.min_interval_s)
                    # What status shows while it waits (a request is held for it meanwhile).
                    self.start_check = (f"waiting for the {self.host.backoff_settings.min_interval_s:.0f}s floor "
                                        f"between spawns: spawns at "
                                        f"{time.strftime('%H:%M:%S UTC', time.gmtime(self.clock.wall() + at_s - now))}")
                    await anyio.sleep(max(0.0, at_s - self.clock.now()))
                    self.start_check = None
            await self.host.admit(self)
            holder = await anyio.to_thread.run_sync(port_holder, self.config.host, self.config.port, self.name)
            if holder is not None:
                pid, command = holder
                raise PortInUse(self.name, self.config.host, self.config.port, pid, command)
            # A stop that arrived during the port check cancels here, before anything is spawned.
            await anyio.lowlevel.checkpoint()
            tag = EngineProcess.new_tag(self.host.daemon_id, self.name)
            # The spawn time is recorded before the fork, so even a daemon killed right after the
            # fork cannot spawn twice within min_interval.
            self.backoff = backoff.record_spawn(self.backoff, self.clock.now())
            await self.host.persist_durably()
            inherit = engine_environment(os.environ, daemon_secret_values(self.host.config))
            spawn = functools.partial(EngineProcess.spawn, self.adapter.argv(), env=self.adapter.env(),
                                      cwd=self.config.cwd, log_path=self.log_path, tag=tag, engine=self.name,
                                      inherit=inherit, exits_dir=self.exits_dir)
            # Waiting for the keeper to report the engine's pid blocks, so a worker thread does it;
            # shielded, because a process that exists must reach the inbox (an overtaken spawn is
            # swept there, never leaked).
            with anyio.CancelScope(shield=True):
                # The tail starts where this run's output will: the engine runs (and may print its
                # fatal error) before the keeper has reported its pid back.
                self.log_tail.start_at_end()
                proc = await anyio.to_thread.run_sync(spawn)
        except EngineError as exc:
            self.post(LaunchFailed(gen, exc))
            return
        except Exception as exc:  # anything else (an unwritable log, a hook's bug) fails this start visibly
            self.log.exception("engine.launch_failed", error=str(exc))
            self.post(LaunchFailed(gen, EngineSpawnFailed(self.name, f"could not start: {type(exc).__name__}: {exc}")))
            return
        self.post(Spawned(gen, proc))

    @property
    def listen(self) -> str:
        """The address the config gives the engine (``host:port``)."""
        return f"{self.config.host}:{self.config.port}"

    def _on_spawned(self, proc: EngineProcess) -> None:
        self.proc = proc
        self.run_listen = self.listen
        if self.health is not None:
            self.health.new_run()
        self.host.events.emit("engine.spawned", engine=self.name, pid=proc.pid, argv=redact_argv(proc.argv))
        self.host.persist()
        self._spawn_worker(self._watch_exit, self.gen, proc)
        self._spawn_worker(self._wait_ready, self.gen, proc)

    def _adopt(self, proc: EngineProcess) -> None:
        self._new_generation()
        self.proc = proc
        if self.health is not None:
            self.health.new_run()
        self.log_tail.start_at_end()
        self._set_state(EngineState.STARTING, ADOPTED_REASON, adopted=True)
        self._spawn_worker(self._watch_exit, self.gen, proc)
        self._spawn_worker(self._wait_ready, self.gen, proc)

    async def _watch_exit(self, gen: int, proc: EngineProcess) -> None:
        info = await proc.wait()
        self.post(Exited(gen, info))

    async def _wait_ready(self, gen: int, proc: EngineProcess) -> None:
        """Ready only on the engine generating: the check's own generation succeeded, or it waited its
        turn behind other clients while the engine's counters showed it working (policies.health
        .decide_start_check). /health alone is no proof."""
        started = self.clock.now()
        deadline = started + self.config.start_timeout_s
        client = self.host.http
        last_error = "no answer yet"
        self.start_check = last_error
        delay = 0.2
        while self.clock.now() < deadline:
            if not proc.running:
                return  # the exit watcher reports it
            try:
                response = await client.get(self.adapter.liveness_url, timeout=2.0, headers=self.adapter.auth_headers())
                live = response.status_code < 500
                if not live:
                    last_error = f"{self.adapter.liveness_path} answered {self.adapter.liveness_detail(response)}"
            except httpx.HTTPError as exc:
                live = False
                last_error = f"{self.adapter.liveness_path}: {type(exc).__name__}"
            if live:
                remaining = max(1.0, deadline - self.clock.now())
                before = await self._step_count(client)
                # The stall deadline comes first, so a check that got no token says so (``stalled``).
                stall_s = min(self.config.canary_timeout_s, remaining)
                try:
                    reading = await self.adapter.canary(client, stall_s=stall_s, timeout_s=stall_s + 1.0)
                except Exception as exc:  # a probe bug counts as a failed attempt, not a stuck start
                    last_error = f"generation check raised {type(exc).__name__}: {exc}"
                    await anyio.sleep(delay)
                    continue
                self.record_canary(reading)
                # No token for the check may be its turn in the engine's queue, behind other clients
                # (who reached the engine's own port): the engine's counters then say so.
                after = await self._step_count(client) if reading.stalled and before is not None else None
                ready = decide_start_check(reading.ok, reading.stalled, before, after)
                if ready is not None:
                    await self._discover(client)
                    self.post(Ready(gen, reading, ready))
                    return
                last_error = f"generation check failed: {reading.error}"
            if last_error != self.start_check:
                self.host.events.emit("engine.start_check", engine=self.name, pid=proc.pid, result=last_error)
            self.start_check = last_error
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        self.post(StartTimedOut(gen, EngineStartTimeout(
            self.name, f"no successful generation within start_timeout {self.config.start_timeout_s:.0f}s "
                       f"(last: {last_error}); raise engine.start_timeout for large models")))

    async def _step_count(self, client: httpx.AsyncClient) -> EngineCounters | None:
        """The engine's counters where it has a step count (vLLM, SGLang, llama.cpp), else None."""
        if self.adapter.progress_counter != "per_step":
            return None
        try:
            return await self.adapter.counters(client, self.clock.now())
        except Exception:  # no counters (llama-server without --metrics): no evidence either way
            return None

    async def _discover(self, client: httpx.AsyncClient) -> None:
        """Version-dependent facts (e.g. a native /v1/messages) asked of the engine once it generates."""
        try:
            facts = await self.adapter.discover(client)
        except Exception as exc:  # a probe bug must not keep a generating engine from ready
            facts = {"error": f"{type(exc).__name__}: {exc}"}
        if facts:
            self.host.events.emit("engine.discovered", engine=self.name, **facts)

    def record_canary(self, reading: CanaryReading) -> None:
        self.last_canary = reading
        self.last_canary_wall = self.clock.wall()

    def _on_ready(self, canary: CanaryReading, reason: str) -> None:
        self.start_refused = self.start_refused_at_s = None
        adopted_ready_wall, self.saved_ready_since_wall = self.saved_ready_since_wall, None
        adopted = self.state_reason == ADOPTED_REASON
        # An adopted engine's start is this daemon's check of it, not the spawn an earlier daemon made.
        started_s = self.since_s if adopted else (self.backoff.last_spawn_at_s or self.since_s)
        self._set_state(EngineState.READY, reason, ttft_s=canary.ttft_s,
                        startup_s=round(self.clock.now() - started_s, 3))
        if adopted and adopted_ready_wall is not None and adopted_ready_wall <= self.since_wall:
            ready_for_s = self.since_wall - adopted_ready_wall
            self.since_s = self.ready_since_s = self.since_s - ready_for_s
            self.since_wall = adopted_ready_wall
            self.host.persist()  # the original ready time, for a daemon after this one
        self.host.engine_ready(self)
        self._spawn_worker(self._monitor, self.gen, self.proc)

    async def _monitor(self, gen: int, proc: EngineProcess) -> None:
        await self.host.monitor_engine(self, gen, proc)

    # ---- failures ---------------------------------------------------------------------------

    def _read_diagnosis(self) -> Diagnosis | None:
        self.log_tail.poll()
        return self.adapter.diagnose(list(self.log_tail.lines))

    def _on_exited(self, info: ExitInfo) -> None:
        if self.state == EngineState.STOPPING:
            return  # the stopper finishes the job and reports Stopped
        was = self.state
        diagnosis = self._read_diagnosis()
        self.diagnosis = diagnosis
        reason = info.describe()
        if diagnosis is not None:
            reason = f"{reason}: {diagnosis.cause}"
        if was == EngineState.STARTING:
            reason = f"exited during start ({reason})"
        self.last_exit = {"code": info.code, "signal": info.signal_name, "reason": reason,
                          "at": info.at_wall}
        self.host.events.emit("engine.exited", engine=self.name, pid=self.proc.pid if self.proc else None,
                                code=info.code, signal=info.signal_name, state_was=str(was),
                                diagnosis=_diag_dict(diagnosis))
        self.host.engine_exited(self)
        # Leftover children of a crashed engine are swept (and the tree verified empty) before backoff.
        proc = self.proc
        self._new_generation()
        self._failure(reason, sweep=proc)

    def _on_start_failed(self, error: EngineError, exit_info: ExitInfo | None) -> None:
        if isinstance(error, StartRefused):
            # Memory (or the budget, an exclusive engine, stranded memory) short right now is no crash
            # loop: the engine stays stopped, not failed, so the next request for it or `llmctl start`
            # asks admission again. Nothing was spawned, so no failure is counted. The alert episode
            # stays open until the engine is ready (or a person stops it).
            self._new_generation()
            # "preload": the daemon's own start of an autostart engine (a daemon restart starts it again).
            self.start_refused = {"reason": error.reason, "message": error.detail, "at": self.clock.wall(),
                                  "preload": self._spawn_reason == PRELOAD_REASON}
            self.start_refused_at_s = self.clock.now()
            if self.health is not None:
                # A drain the memory guard began (then a restart) ends here: nothing runs, nothing drains,
                # and the next request must be able to start it again.
                self.health.draining = None
            self.host.events.emit("engine.start_refused", engine=self.name, reason=error.reason,
                                    message=str(error))
            self.host.alert(Alert(key=f"engine.start_refused:{self.name}", severity="critical",
                                    summary=str(error), details={"engine": self.name, "reason": error.reason}))
            self._set_state(EngineState.STOPPED, str(error), refused=error.reason)
            return
        self.last_exit = {"code": None, "signal": None, "reason": str(error), "at": self.clock.wall()}
        if isinstance(error, (PortInUse, EngineSpawnFailed)):
            self.diagnosis = Diagnosis(cause=str(error), remedy=_remedy_for(error), line="",
                                       signature=type(error).__name__)
        self.host.events.emit("engine.start_failed", engine=self.name, error=str(error),
                                error_type=type(error).__name__)
        self._new_generation()
        self._failure(str(error), sweep=None)

    def _on_start_timeout(self, error: EngineError) -> None:
        self.diagnosis = self._read_diagnosis()
        self.host.events.emit("engine.start_timeout", engine=self.name, error=str(error),
                                diagnosis=_diag_dict(self.diagnosis))
        self.last_exit = {"code": None, "signal": None, "reason": str(error), "at": self.clock.wall()}
        self._begin_stop(str(error), then=Then.AUTO, failure=True)

    def _wait_for_floor(self, reason: str) -> None:
        """A restart a policy asked for: no failure is counted, but the 60 s floor between spawns holds."""
        now = self.clock.now()
        at_s = backoff.next_start_at(self.backoff, self.host.backoff_settings, now)
        self.next_start_at_s = at_s
        self._set_state(EngineState.BACKOFF, reason, next_start_in_s=round(at_s - now, 1))
        self.next_start_at_s = at_s
        self._spawn_worker(self._backoff_timer, self.gen, at_s)

    def _failure(self, reason: str, *, sweep: EngineProcess | None, ready_for_s: float | None = None) -> None:
        """Record an unplanned end of a run and decide: backoff or failed."""
        now = self.clock.now()
        if ready_for_s is not None:
            ready_for = ready_for_s
        else:
            ready_for = (now - self.ready_since_s) if self.ready_since_s is not None else 0.0
        self.backoff = backoff.record_exit(self.backoff, now, ready_for, reason,
                                           settings=self.host.backoff_settings)
        if sweep is not None:
            self._start_sweep(sweep)
        self._schedule_after_failure(reason)

    def _schedule_after_failure(self, reason: str) -> None:
        now = self.clock.now()
        actions = backoff.decide_after_exit(self.backoff, self.host.backoff_settings, now)
        for alert in exit_alerts(self, actions, now, self.host.events):
            self.host.alert(alert)
        first = actions[0]
        if isinstance(first, MarkFailed):
            self._set_state(EngineState.FAILED, first.reason)
            return
        assert isinstance(first, WaitUntil)
        self.restarts += 1
        self.next_start_at_s = first.at_s
        self._set_state(EngineState.BACKOFF, reason, next_start_in_s=round(first.at_s - now, 1))
        self.next_start_at_s = first.at_s  # _set_state clears it for other states only
        self._spawn_worker(self._backoff_timer, self.gen, first.at_s)

    async def _backoff_timer(self, gen: int, at_s: float) -> None:
        await anyio.sleep(max(0.0, at_s - self.clock.now()))
        self.post(BackoffOver(gen))

    def _start_sweep(self, proc: EngineProcess) -> None:
        """Kill what is left of a run. Not a generation worker: a start that follows must not cut it
        short, and until it is done the engine counts as resident (leftovers still hold memory)."""
        assert self._tg is not None
        self._sweeping += 1
        self._tg.start_soon(self._sweep, proc)

    async def _sweep(self, proc: EngineProcess) -> None:
        try:
            with anyio.CancelScope(shield=True):
                result = await proc.stop(grace_s=min(self.config.stop_grace_s, 10.0))
        finally:
            self._sweeping -= 1
            self.notify()
        if result.killed_pids:
            self.host.events.emit("engine.leftovers_killed", engine=self.name, pids=list(result.killed_pids))

    # ---- stop -------------------------------------------------------------------------------

    def _begin_stop(self, reason: str, *, then: Then, failure: bool = False, grace_s: float | None = None,
                    evidence: dict[str, Any] | None = None, drain_s: float = 0.0) -> None:
        """Stop the current run; ``then``: "stay" (stopped), "start" (a person's restart), "auto" (a
        failure: backoff), "policy" (a restart a policy asked for: through the 60 s floor, no failure)."""
        proc = self.proc
        now = self.clock.now()
        # Captured before the state change clears it: a long healthy run ends the failure streak.
        self._stop_ready_for_s = (now - self.ready_since_s) if self.ready_since_s is not None else 0.0
        self._new_generation()
        self._stop_is_failure = failure
        self._stop_reason = reason
        self._stop_then = then
        self._set_state(EngineState.STOPPING, reason, **({"evidence": evidence} if evidence else {}))
        if proc is None:
            self.post(Stopped(self.gen, True, (), then))
            return
        self._spawn_worker(self._stopper, self.gen, proc, self.config.stop_grace_s if grace_s is None else grace_s,
                           drain_s)

    async def _stopper(self, gen: int, proc: EngineProcess, grace_s: float, drain_s: float = 0.0) -> None:
        health = self.health
        if drain_s > 0 and health is not None:
            await self.host.requests_settled()  # requests on their way in count too
            if health.in_flight > 0:
                started_s = self.clock.now()
                self.host.events.emit("engine.draining", engine=self.name, in_flight=health.in_flight,
                                      drain_s=drain_s)
                with anyio.move_on_after(drain_s):
                    while health.in_flight > 0 and proc.running:
                        await anyio.sleep(0.1)
                self.host.events.emit("engine.drained", engine=self.name, in_flight=health.in_flight,
                                      waited_s=round(self.clock.now() - started_s, 3))
        with anyio.CancelScope(shield=True):
            result = await proc.stop(grace_s)
        self.post(Stopped(gen, result.graceful, result.killed_pids, self._stop_then))

    def _on_stopped(self, m: Stopped) -> None:
        info = self.proc.exit if self.proc else None
        self.host.events.emit("engine.stopped", engine=self.name, graceful=m.graceful,
                                killed_pids=list(m.killed), code=info.code if info else None,
                                signal=info.signal_name if info else None)
        self.host.engine_exited(self)
        if self.last_exit is None or not self._stop_is_failure:
            self.last_exit = {"code": info.code if info else None, "signal": info.signal_name if info else None,
                              "reason": self._stop_reason, "at": self.clock.wall()}
        then = Then.STAY if self.host.shutting_down else self._stop_then
        if then is Then.START:
            self._begin_spawn(manual=True, reason="restart")
        elif then is Then.AUTO:
            self._failure(self._stop_reason, sweep=None, ready_for_s=self._stop_ready_for_s)
        elif then is Then.POLICY:
            self._wait_for_floor(self._stop_reason)
        else:
            self._set_state(EngineState.STOPPED, self._stop_reason)

    # ---- health -----------------------------------------------------------------------------

    def _on_health(self, v: HealthVerdict) -> None:
        evidence = {"evidence": v.evidence} if v.evidence else {}
        if v.state is Verdict.HUNG and self.state in SERVING_STATES:
            self._set_state(EngineState.HUNG, v.reason, **evidence)
            self.host.alert(Alert(key=f"engine.hung:{self.name}", severity="critical",
                                    summary=f"{self.name} is hung: {v.reason}", details={"engine": self.name}))
        elif v.state is Verdict.HANG_RESTART and self.state == EngineState.HUNG:
            self.last_exit = {"code": None, "signal": None, "reason": f"hang restart: {v.reason}",
                              "at": self.clock.wall()}
            self._begin_stop(f"hang restart: {v.reason}", then=Then.AUTO, failure=True, evidence=v.evidence)
        elif v.state is Verdict.MEMORY_RESTART and (self.state in SERVING_STATES or self.state == EngineState.HUNG):
            # Counted as a failure: the restart waits out the normal backoff, and a model that keeps
            # outgrowing its footprint ends in failed instead of a loop.
            self.last_exit = {"code": None, "signal": None, "reason": v.reason, "at": self.clock.wall()}
            self._begin_stop(v.reason, then=Then.AUTO, failure=True)
        elif v.state is Verdict.DEGRADED and self.state == EngineState.READY:
            self._set_state(EngineState.DEGRADED, v.reason)
            self._degraded_raised = True
            self.host.alert(Alert(key=f"engine.degraded:{self.name}", severity="warning",
                                    summary=f"{self.name} is degraded: {v.reason}", details={"engine": self.name}))
        elif v.state is Verdict.DEGRADED_RESTART and self.state == EngineState.DEGRADED:
            self.restarts += 1
            self._begin_stop(f"degraded restart while idle: {v.reason}", then=Then.POLICY)
        elif v.state is Verdict.OK and self.state in (EngineState.HUNG, EngineState.DEGRADED):
            # Both: an engine that went degraded, then hung, and recovered in place is neither any more. Only
            # what this run raised is resolved (a "recovered" for a slowdown never reported is noise).
            keys = [key for key, raised in (("hung", self.state == EngineState.HUNG),
                                            ("degraded", self._degraded_raised or self.state == EngineState.DEGRADED))
                    if raised]
            self._set_state(EngineState.READY, v.reason or "recovered", **evidence)
            for key in keys:
                self.host.alert(Alert(key=f"engine.{key}:{self.name}", severity="info",
                                        summary=f"{self.name} recovered", details={"engine": self.name},
                                        resolved=True))

    # ---- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        rss = gpu = None
        tps = baseline = None
        running = self.proc is not None and self.proc.running
        if self.health is not None:
            # What a process holds and generates is its run's: none once it is gone (stopped, crashed, in
            # backoff), or the status, the page and the metrics would show a dead engine using memory and
            # making tokens. The learned baseline stays: the next run is judged against it.
            if running:
                rss, gpu = self.health.memory()
                tps = self.health.tokens_per_s()
            baseline = self.health.baseline()
        counters = None
        if self.health is not None and self.health.counters:
            # The engine's own counters as last read (/metrics, /api/status): proof they are read at all.
            last = self.health.counters[-1]
            counters = {"generated_tokens_total": last.generated_tokens_total,
                        "requests_running": last.requests_running, "steps_total": last.steps_total,
                        "requests_waiting": last.requests_waiting, "cache_usage": last.cache_usage,
                        "age_s": round(now - last.at_s, 1)}
        canary = None
        if self.last_canary is not None:
            canary = {"ok": self.last_canary.ok, "at": self.last_canary_wall, "ttft_s": self.last_canary.ttft_s,
                      "tokens_per_s": self.last_canary.tokens_per_s, "error": self.last_canary.error}
        return {
            "name": self.name,
            "engine": self.config.kind,
            "state": str(self.state),
            "state_reason": self.state_reason,
            "start_check": self.start_check if self.state == EngineState.STARTING else None,
            # Why the last start was refused ({reason, message, at}) while that refusal keeps it stopped, and
            # while a start tries again (it ends once the engine is ready, or a person stops it).
            "start_refused": self.start_refused if self.state in (EngineState.STOPPED, EngineState.STARTING)
            else None,
            "pid": self.proc.pid if self.proc and self.proc.running else None,
            "port": self.config.port,
            "base_url": self.config.base_url,
            "model": self.config.model,
            "exclusive": self.config.exclusive,
            "default": self.config.default,
            "restarts": self.restarts,
            "since": self.since_wall,
            "for_s": round(now - self.since_s, 3),
            "next_start_at": (self.clock.wall() + (self.next_start_at_s - now)) if self.next_start_at_s else None,
            "next_start_in_s": round(self.next_start_at_s - now, 1) if self.next_start_at_s else None,
            # Stopped or failed with a failure streak whose backoff has not passed: no start is scheduled, and
            # `llmctl start` (or a request's start) is refused for this long unless forced.
            "start_allowed_in_s": self._start_allowed_in_s(now),
            # The last failure of that streak (``last_exit`` may be a planned stop since: a swap, llmctl stop).
            "streak_last_failure": self.backoff.last_exit_reason if self.backoff.consecutive_failures else None,
            "last_exit": self.last_exit,
            "diagnosis": _diag_dict(self.diagnosis),
            "tokens_per_s": tps,
            "baseline_tokens_per_s": baseline,
            # per request, by how many requests the engine ran at once when it was learned ("1", "9-16", ...)
            "baselines_by_concurrency": self.health.baselines() if self.health is not None else {},
            "judged_concurrency": self.health.judged_concurrency() if self.health is not None else None,
            "last_canary": canary,
            "counters": counters,
            "memory": {"rss_bytes": rss, "gpu_bytes": gpu},
            "watchdog": self.health.watchdog(now) if self.health is not None and self.serving_or_hung else None,
            "footprint_bytes": self.host.footprint_bytes(self),
            "log": str(self.log_path),
        }

    def _start_allowed_in_s(self, now: float) -> float | None:
        if self.state not in (EngineState.STOPPED, EngineState.FAILED) or self.backoff.consecutive_failures == 0:
            return None
        at_s = backoff.next_start_at(self.backoff, self.host.backoff_settings, now)
        return round(at_s - now, 1) if at_s > now else None

    def persisted(self) -> dict[str, Any]:
        proc = self.proc if self.proc and self.proc.running else None
        return {
            "pid": proc.pid if proc else None,
            "create_time": proc.create_time if proc else None,
            "argv": redact_argv(proc.argv) if proc else None,  # a record, never run again
            "tag": proc.tag if proc else None,
            "listen": self.run_listen if proc else None,  # where this run listens (the config's at its spawn)
            "state": str(self.state),
            "reason": self.state_reason,
            "restarts": self.restarts,
            "backoff": backoff.to_record(self.backoff),
            "last_exit": self.last_exit,
            "start_refused": self.start_refused,
            "ready_since": (self.clock.wall() - (self.clock.now() - self.ready_since_s)
                            if self.ready_since_s is not None else None),
        }


def _diag_dict(d: Diagnosis | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"cause": d.cause, "remedy": d.remedy, "line": d.line, "signature": d.signature,
            "details": dict(d.details)}


def _remedy_for(error: EngineError) -> str:
    if isinstance(error, PortInUse):
        return "stop the process holding the port, or give the engine another port in the config"
    return "check the engine's command and kind in the config (llmctl doctor checks it)"

