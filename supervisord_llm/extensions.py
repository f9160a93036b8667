"""The optional subsystems the daemon carries, and which ones the config turns on (room: daemon composition).

Each subsystem is an :class:`supervisord_llm.extension.Extension` (typed hooks with no-op
defaults); ``install_extensions`` attaches them in the order the daemon starts them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from policies import backoff
from policies.actions import Refuse
from policies.frontdoor import SwapPermission, start_refused_message
from policies.gateway_respawn import GATEWAY_DOWN_ALERT_KEY
from policies.health import stream_decode_rate
from supervisord_llm.engine.supervisor import EngineState
from supervisord_llm.extension import Extension
from supervisord_llm.gateway.protocol import EngineUnavailable, RequestStats, Upstream

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.engine.supervisor import EngineSupervisor


class DaemonGatewayBackend:
    """The gateway's view of the daemon: routing, holding through restarts and swaps, traffic.

    A request for an engine that is not resident starts a swap (mutual exclusion and memory
    admission hold). While the engine is starting, swapping or restarting the request waits up to
    the hold time; in backoff or failed it gets 503 with Retry-After. Engines that cannot share the
    machine take turns: held requests are served grouped by engine (gateway/turns.py).
    """

    def __init__(self, daemon: Daemon, hold_s: float) -> None:
        from supervisord_llm.gateway.turns import EngineTurns

        self.daemon = daemon
        self.hold_s = hold_s
        self.turns = EngineTurns(_Turns(self))
        # Set by the gateway's process (GatewayProcess): taking its passes back, and telling it that
        # they may have changed. With no gateway process nobody holds a pass.
        self.close_passes: Callable[[], bool] = lambda: True
        self.passes_may_change: Callable[[], None] = lambda: None
        # Per engine: the requests its line in the gateway holds (slots taken, places waiting), as last told.
        self.in_line: dict[str, int] = {}

    def models(self) -> list[dict]:
        out = []
        for sup in self.daemon.supervisors.values():
            out.append({"id": sup.name, "object": "model", "owned_by": "supervisord-llm",
                        "aliases": list(sup.config.aliases), "engine": sup.config.kind, "state": str(sup.state),
                        "limits": {"max_concurrent": sup.config.max_concurrent, "max_queue": sup.config.max_queue}})
        return out

    def default_engine(self) -> str | None:
        default = self.daemon.config.default_engine
        return default.name if default else None

    def _resolve(self, model: str | None) -> EngineSupervisor:
        daemon = self.daemon
        if not model:
            name = self.default_engine()
            if name is None:
                raise EngineUnavailable("-", "no_engines", "no engines are configured", status=404)
            return daemon.supervisors[name]
        name = self.routes().get(model)
        if name is not None:
            return daemon.supervisors[name]
        names = ", ".join(sorted(daemon.supervisors))
        raise EngineUnavailable(model, "unknown_model",
                                f"no engine serves model {model!r}; configured: {names}", status=404)

    def routes(self) -> dict[str, str]:
        """Every model name a request may give, and the engine it reaches: an engine's name or one of
        its aliases first, then the names the engines serve their models under; the first engine in
        the config wins a name two of them give."""
        sups = list(self.daemon.supervisors.values())
        table: dict[str, str] = {}
        for sup in sups:
            for name in (sup.name, *sup.config.aliases):
                table.setdefault(name, sup.name)
        for sup in sups:
            for served in (sup.config.served_model, sup.config.model, sup.config.model_as_written):
                if served:
                    table.setdefault(served, sup.name)
        return table

    def passes(self) -> dict[str, Upstream]:
        from policies.frontdoor import gateway_may_pass

        held = self.turns.held_groups()
        return {sup.name: self._upstream(sup) for sup in self.daemon.supervisors.values()
                if gateway_may_pass(serving=self.serving_now(sup), held_groups=held,
                                    draining=sup.health is not None and bool(sup.health.draining))}

    def let_through(self, engine: str) -> None:
        if engine in self.daemon.supervisors:
            self.turns.let_through(engine)

    def _upstream(self, sup: EngineSupervisor) -> Upstream:
        return Upstream(engine=sup.name, base_url=sup.config.base_url, kind=sup.config.kind,
                        supports_messages=sup.adapter.messages_supported, served_model=sup.adapter.request_model,
                        accepts_images=sup.config.vision,
                        auth_headers=tuple(sup.adapter.auth_headers().items()),
                        max_concurrent=sup.config.max_concurrent, max_queue=sup.config.max_queue,
                        steps_watched=sup.adapter.progress_counter == "per_step" and sup.adapter.counter_silence)

    def _unavailable(self, sup: EngineSupervisor) -> EngineUnavailable:
        now = self.daemon.clock.now()
        if sup.state == EngineState.BACKOFF and sup.next_start_at_s is not None:
            wait = max(1.0, sup.next_start_at_s - now)
            message = (f"{sup.name} starts in {wait:.0f}s ({sup.state_reason}); it did not serve within the gateway "
                       f"hold time ({self.hold_s:.0f}s)" if sup.floor_wait else
                       f"{sup.name} is in restart backoff after: {sup.state_reason}; next start in {wait:.0f}s")
            return EngineUnavailable(sup.name, "backoff", message,
                                     retry_after_s=wait, until_wall=self.daemon.clock.wall() + wait)
        if sup.state == EngineState.FAILED:
            # What the operator's start would meet (a plain `llmctl start` is refused inside the streak's backoff).
            verdict = backoff.start_allowed(sup.backoff, sup.host.backoff_settings, now, force=False, manual=True)
            how = (f"an operator must run `llmctl start {sup.name}`" if not isinstance(verdict, Refuse) else
                   f"an operator must run `llmctl start {sup.name} --force` (a plain `llmctl start` is refused for "
                   f"another {max(1.0, (verdict.until_s or now) - now):.0f}s, the failure streak's backoff)")
            return EngineUnavailable(sup.name, "failed",
                                     f"{sup.name} failed and is not restarted automatically ({sup.state_reason}); "
                                     f"{how}")  # no wait ends it
        return EngineUnavailable(sup.name, "hold_timeout",
                                 f"{sup.name} did not become ready within the gateway hold time "
                                 f"({self.hold_s:.0f}s); it is {sup.state}: {sup.state_reason}", retry_after_s=10.0)

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        sup = self._resolve(model)
        if sup.health is not None and sup.health.draining:
            # The memory guard is draining it: in-flight requests finish, new ones would grow it further.
            raise EngineUnavailable(sup.name, "draining",
                                    f"{sup.name} takes no new requests: {sup.health.draining}; it restarts once "
                                    "its in-flight requests have finished", retry_after_s=60.0)
        if not self.turns.must_hold(sup.name):
            self.turns.let_through(sup.name)
            return self._upstream(sup)
        if _refused_while_waiting(sup):
            raise self._unavailable(sup)
        # Held in the engine's group (gateway/turns.py): served when its turn comes and it serves,
        # swapped in when its turn comes and it is not resident.
        released = False
        with anyio.move_on_after(self.hold_s):
            await anyio.lowlevel.checkpoint()
            await self.turns.wait_turn(sup.name, may_start=may_start)
            released = True  # counted as on its way to the engine (turns.py) until it starts there
        if self.serving_now(sup):
            if not released:
                self.turns.let_through(sup.name)
            return self._upstream(sup)
        if released:
            self.turns.request_started(sup.name)  # not going on after all: it must not hold the next swap
        raise self._unavailable(sup)

    def serving_now(self, sup: EngineSupervisor) -> bool:
        """Serving, and no swap is underway that would stop it or that it is the target of."""
        return sup.serving and not sup.swap_in_progress and self.daemon.swap_target in (None, sup.name)

    def start_swap(self, name: str, *, may_start: bool = True) -> bool | Exception:
        daemon = self.daemon
        sup = daemon.supervisors[name]
        if daemon.swap_target is not None or sup.resident or sup.floor_wait:
            # A swap runs (the turn comes again after it), the engine is (re)starting, or its start is scheduled
            # once the floor between spawns has passed (the requests wait for it, within hold_s).
            return False
        if not may_start:
            # No request waiting for it may start it (gateway.swaps): it stays as the operator left it, the
            # same answer the gateway gives a request for an engine already stopped.
            gateway = daemon.config.gateway
            permission = SwapPermission(gateway.swaps) if gateway is not None else SwapPermission.NEVER
            return EngineUnavailable(name, "engine_not_running", start_refused_message(name, str(sup.state), permission))
        from policies.actions import Refuse

        verdict = daemon.automatic_start_verdict(sup, daemon.clock.now())
        if isinstance(verdict, Refuse):  # a recent failure (its backoff holds) or refusal: nothing is swapped
            wait = max(1.0, (verdict.until_s or daemon.clock.now()) - daemon.clock.now())
            return EngineUnavailable(sup.name, verdict.reason, verdict.message, retry_after_s=wait,
                                     until_wall=daemon.clock.wall() + wait)
        # The swap runs in the daemon's own task group: a client giving up must not cancel it midway.
        daemon.spawn_background(self._swap_quietly, sup.name)
        return True

    async def _swap_quietly(self, name: str) -> None:
        from supervisord_llm.errors import SupervisordLLMError

        try:
            await self.daemon.switch(name, manual=False)
        except SupervisordLLMError as exc:
            self.daemon.events.emit("gateway.swap_failed", engine=name, error=str(exc))
            self.turns.swap_failed(name, EngineUnavailable(name, "swap_failed", f"the swap to {name} failed: {exc}",
                                                           retry_after_s=30.0))
        finally:
            self.turns.changed()

    def _health(self, engine: str) -> Any:
        sup = self.daemon.supervisors.get(engine)
        return sup.health if sup is not None else None

    def request_started(self, engine: str) -> None:
        from supervisord_llm.subsystems import idle

        unloader = idle.find(self.daemon.extensions)
        if unloader is not None:
            unloader.request_started(engine)
        self.turns.request_started(engine)
        health = self._health(engine)
        if health is not None:
            health.request_started(self.daemon.clock.now())

    def token_progress(self, engine: str, at_s: float) -> None:
        health = self._health(engine)
        if health is not None:
            health.last_traffic_s = at_s
            health.last_token_s = at_s  # read from the engine, whatever the client's pace

    def engine_progress_s(self, engine: str) -> float | None:
        health = self._health(engine)
        return health.progress_s(self.daemon.clock.now()) if health is not None else None

    def line_changed(self, engine: str, occupied: int) -> None:
        self.in_line[engine] = occupied

    def prefill_changed(self, engine: str, in_prefill: int, ended_at_s: float | None) -> None:
        health = self._health(engine)
        if health is not None:
            health.prefill_changed(in_prefill, ended_at_s if ended_at_s is not None else self.daemon.clock.now())

    def request_finished(self, stats: RequestStats) -> None:
        from probes.readings import ThroughputSample
        from supervisord_llm.subsystems import observe

        watching = observe.find(self.daemon.extensions)
        if watching is not None:
            watching.telemetry.request_finished(stats)
        from supervisord_llm.subsystems import idle

        unloader = idle.find(self.daemon.extensions)
        if unloader is not None:
            unloader.request_finished(stats.engine)
        self.turns.changed()  # a swap's drain may be waiting on this one
        health = self._health(stats.engine)
        if health is None:
            return
        now = self.daemon.clock.now()
        quiet = stats.quiet
        concurrency = health.request_finished(
            now, stats.decode_s, quiet.in_flight_s / quiet.seconds if quiet is not None and quiet.seconds > 0 else None)
        rate = stream_decode_rate(stats.tokens, stats.decode_s,
                                  (quiet.tokens, quiet.seconds, quiet.events) if quiet is not None else None,
                                  held_back=stats.held_back)
        if rate is not None and stats.ended == "complete":
            health.add_sample(ThroughputSample(at_s=now, tokens_per_s=rate[0], source="gateway", tokens=round(rate[1]),
                                               concurrency=concurrency))

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        health = self._health(engine)
        if health is None:
            return
        from policies.health import Silence

        now = self.daemon.clock.now()
        health.silences.append(Silence("stream", since_s=now - stalled_for_s, at_s=now,
                                       detail=f"a live {phase} stream got nothing from the engine for "
                                              f"{stalled_for_s:.0f}s"))
        self.daemon.events.emit("gateway.stall_detected", engine=engine, phase=phase,
                                stalled_for_s=round(stalled_for_s, 3))


class _Turns:
    """The daemon as turn-taking sees it (gateway/turns.py ``TurnHost``)."""

    def __init__(self, backend: DaemonGatewayBackend) -> None:
        self.backend = backend
        self.daemon = backend.daemon

    def now(self) -> float:
        return self.daemon.clock.now()

    def engine_names(self) -> list[str]:
        return list(self.daemon.supervisors)

    def serving(self, engine: str) -> bool:
        return self.backend.serving_now(self.daemon.supervisors[engine])

    def exclusive(self, engine: str) -> bool:
        return bool(self.daemon.supervisors[engine].config.exclusive)

    def resident(self) -> str | None:
        return next((s.name for s in self.daemon.supervisors.values() if s.serving), None)

    def unavailable(self, engine: str) -> Exception | None:
        sup = self.daemon.supervisors[engine]
        if _refused_while_waiting(sup) and self.daemon.swap_target != engine:
            return self.backend._unavailable(sup)
        return None

    def start_swap(self, engine: str, *, may_start: bool = True) -> bool | Exception:
        return self.backend.start_swap(engine, may_start=may_start)

    def decided(self, action: Any, **inputs: object) -> None:
        self.daemon.decided("serving_order", action.engine, action, **inputs)

    def close_passes(self) -> bool:
        return self.backend.close_passes()

    def groups_changed(self) -> None:
        self.backend.passes_may_change()


class GatewayExtension(Extension):
    """The gateway, in a process of its own (``gateway.process``, ``gateway.worker``): traffic never
    runs in the daemon's process, and the daemon is reached only through one channel."""

    name = "gateway"

    def __init__(self, daemon: Daemon) -> None:
        from supervisord_llm.gateway.process import GatewayProcess
        from supervisord_llm.logsetup import current
        from supervisord_llm.subsystems.ui import daemon_snapshot

        self.daemon = daemon
        assert daemon.config.gateway is not None, "installed only when [gateway] is on"
        self.settings = daemon.config.gateway
        self.inner = DaemonGatewayBackend(daemon, self.settings.hold_s)
        # The status page shares the gateway's port and its key (see ui.py); its document is made on
        # the daemon's loop, asked for over the channel.
        snapshot = daemon_snapshot(daemon)

        async def status_doc() -> dict[str, Any]:
            return snapshot()

        def on_exit(fields: dict[str, Any]) -> None:
            daemon.events.emit("gateway.exited", pid=fields["pid"], exit=fields["exit"], reason=fields["reason"],
                               restarts=fields["restarts"], next_start_in_s=fields["next_start_in_s"])

        self.process = GatewayProcess(self.inner, self.settings, status_doc=status_doc, log_setup=current(),
                                      on_exit=on_exit, on_spawn=daemon.persist, on_alert=daemon.apply,
                                      down_open=lambda: daemon.alerts_outbox is not None
                                      and GATEWAY_DOWN_ALERT_KEY in daemon.alerts_outbox.open_episode_details(),
                                      log=daemon.log.bind(component="gateway"),
                                      on_passes_closed=self.inner.turns.changed)
        self.inner.close_passes = self.process.close_passes
        self.inner.passes_may_change = self.process.publish_passes
        self.listen = self.settings.listen

    def restore(self, saved: dict[str, Any]) -> None:
        self.process.previous = saved

    def persisted(self) -> dict[str, Any] | None:
        return self.process.persisted()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") in ("engine.state_changed", "engine.draining", "swap.started", "swap.finished"):
            self.process.publish()
            self.inner.turns.changed()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.daemon.events.listeners.append(self._on_event)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.process.run_publisher)
                tg.start_soon(self.inner.turns.run)
                self.listen = await tg.start(self.process.run)
                task_status.started()
        finally:
            self.daemon.events.listeners.remove(self._on_event)

    def requests_in_line(self, engine: str) -> int:
        return self.inner.in_line.get(engine, 0)

    def on_stopped_by_person(self, sup: EngineSupervisor) -> None:
        # Requests held for it (its load, its turn) are answered as the ones in its line are: a person's stop
        # stays a stop; they do not start it again (a new request may, where gateway.swaps lets it).
        self.inner.turns.refuse_waiting(sup.name, EngineUnavailable(
            sup.name, "engine_not_running", start_refused_message(sup.name, "stopped", SwapPermission.ALLOWED)))

    async def requests_settled(self) -> None:
        # A request let through on a pass, or started a moment ago, reaches the daemon as a note (at
        # most channel.LAZY_S late): the gateway's acknowledgement of a snapshot sent now comes after
        # them, and that snapshot takes back the passes the engine's new state no longer gives.
        await self.process.settle()

    def contribute_status(self, doc: dict[str, Any]) -> None:
        # The gateway process's counters as it last sent them (at most STATS_PUSH_S old).
        stats = self.process.stats
        doc["gateway"] = {"listen": self.listen, "pid": self.process.pid, "restarts": self.process.restarts,
                          "in_flight": stats.get("in_flight", 0), "clients_cut": stats.get("clients_cut", 0),
                          "upstream_retries": stats.get("upstream_retries", 0),
                          "refused": dict(stats.get("refused") or {})}


class AlertsExtension(Extension):
    name = "alerts"

    def __init__(self, daemon: Daemon) -> None:
        from supervisord_llm.alerts.delivery import Outbox

        self.daemon = daemon

        def on_event(kind: str, fields: dict[str, Any]) -> None:
            daemon.events.emit(kind, **fields)

        assert daemon.config.alerts is not None, "installed only when [alerts] has webhooks"
        self.outbox = Outbox(daemon.state_dir, daemon.config.alerts, daemon.clock, daemon.log.bind(component="alerts"),
                             on_event=on_event)
        daemon.alerts_outbox = self.outbox

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.outbox.run(task_status=task_status)


def install_extensions(daemon: Daemon) -> None:
    """Attach the subsystems the config turns on."""
    from supervisord_llm.control import ControlExtension
    from supervisord_llm.subsystems.memory_guard import MemoryGuardExtension
    from supervisord_llm.subsystems.observe import ObserveExtension
    from supervisord_llm.subsystems.stranded import StrandedExtension

    config = daemon.config
    daemon.extensions.append(ControlExtension(daemon))
    daemon.extensions.append(StrandedExtension(daemon))
    daemon.extensions.append(ObserveExtension(daemon))
    daemon.extensions.append(MemoryGuardExtension(daemon))
    if config.alerts is not None and config.alerts.targets:
        daemon.extensions.append(AlertsExtension(daemon))
    if config.alerts is not None and config.alerts.heartbeat is not None:
        from supervisord_llm.alerts.heartbeat import HeartbeatExtension

        daemon.extensions.append(HeartbeatExtension(daemon, config.alerts.heartbeat, config.alerts))
    if config.gateway is not None:
        daemon.extensions.append(GatewayExtension(daemon))
        if any(e.idle_unload_s for e in config.engines):
            from supervisord_llm.subsystems.idle import IdleUnloadExtension

            daemon.extensions.append(IdleUnloadExtension(daemon))
    if config.daemon.metrics_listen:
        from supervisord_llm.subsystems.metrics import MetricsExtension

        daemon.extensions.append(MetricsExtension(daemon, config.daemon.metrics_listen))
    if config.probes.nvml:
        from supervisord_llm.subsystems.gpu import GpuExtension

        daemon.extensions.append(GpuExtension(daemon))


def _refused_while_waiting(sup: EngineSupervisor) -> bool:
    """A request for an engine in its restart backoff after a failure, or failed, gets the 503 at once; one for
    an engine waiting only for the floor between spawns (no failure behind it) is held for its start."""
    return sup.state == EngineState.FAILED or (sup.state == EngineState.BACKOFF and not sup.floor_wait)
