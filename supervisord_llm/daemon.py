"""The daemon: composes the engines' supervisors, the subsystems (extensions) and the policies' executor.

Room: daemon composition.

One daemon per state dir (an exclusive ``flock`` on ``<state_dir>/daemon.lock``). Its durable state
(``state.json``) records each engine's pid, process create time, command line and backoff history,
so a daemon that was killed and restarted adopts its still-running engines instead of starting
second copies, and keeps the 60 s spacing of spawns across its own restarts.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

from policies import backoff, episodes, restore
from policies.actions import Admit, Alert, Drain, EscalateReboot, Refuse, RunReboot, Start, WaitUntil
from policies.admission import (
    Footprint,
    admit,
    after_refusal,
    auto_footprint_bytes,
    effective_budget_bytes,
    exclusive_conflicts,
)
from policies.heartbeat import loop_stalled
from policies.memory_guard import PeakHistory, admission_bytes
from policies.swap import (
    ActiveSwap,
    JoinSwap,
    SwapPlan,
    decide_memory_wait,
    decide_swap_request,
    drained,
    memory_returned,
    plan_swap,
)
from probes.readings import ProcessTreeReading, SystemMemoryReading
from probes.weights import read_weights
from supervisord_llm import __version__
from supervisord_llm.clock import Clock, SystemClock
from supervisord_llm.config import Config
from supervisord_llm.engine.process import (
    EngineProcess,
    claim_exit_records,
    find_keeper,
    reap_keepers,
    reap_zombie_children,
    tagged_processes,
    wait_gone,
)
from supervisord_llm.engine.supervisor import RESIDENT_STATES, SHUTDOWN_REASON, EngineState, EngineSupervisor
from supervisord_llm.errors import (
    DaemonAlreadyRunning,
    StartRefused,
    StateError,
    SwapError,
    SwapInProgress,
    UnknownEngine,
)
from supervisord_llm.events import EventLog
from supervisord_llm.eventtypes import EVENT_TYPES
from supervisord_llm.executor import ActionExecutor
from supervisord_llm.extension import Extension
from supervisord_llm.redact import redact_argv
from supervisord_llm.statefile import move_aside, read_json, state_shape_problem
from supervisord_llm.statewriter import StateWriter

STATE_VERSION = 1


def prepare_state_dir(path: Path) -> None:
    """Create the state dir 0700 (it holds the control socket, logs and alert outbox)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        (path / "logs").mkdir(exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot use state dir {path}: {exc.strerror or exc}; set daemon.state_dir or "
                         "SUPERVISORD_LLM_STATE_DIR to a writable directory") from exc


class DaemonLock:
    """An exclusive flock on ``daemon.lock``; the file names the holder's pid."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "daemon.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = int(os.read(fd, 32).decode().strip() or 0) or None
            except (ValueError, OSError):
                holder = None
            os.close(fd)
            raise DaemonAlreadyRunning(str(self.path.parent), holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Daemon:
    def __init__(self, config: Config, *, logger: Any, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.log = logger
        self.state_dir = config.daemon.state_dir
        self.started_s = self.clock.now()
        self.started_wall = self.clock.wall()  # tells this daemon from the one it replaced (the same pid)
        self.lock = DaemonLock(self.state_dir)
        self.events: EventLog = None  # type: ignore[assignment]  # set in open()
        self.state_writer: StateWriter | None = None  # set in claim()
        self.http: httpx.AsyncClient = None  # type: ignore[assignment]
        self.supervisors: dict[str, EngineSupervisor] = {}
        self.daemon_id = ""
        self.memory: SystemMemoryReading | None = None
        self.memory_error: str | None = None
        self.backoff_settings = config.restart.backoff  # built by the config, validated once
        self._swap_lock = anyio.Lock()
        self.swap_target: str | None = None
        self._swap_from: list[str] = []
        self._swap_cancelled: str | None = None  # why the running swap was called off (not a failure of its target)
        self.swap_started_s: float | None = None
        self._persist_ok = True
        self._saved: dict[str, Any] = {}
        self.extensions: list[Extension] = []  # optional subsystems (control API, alerts, gateway, metrics, stranded, gpu)
        self.alerts_outbox: Any = None
        self.memory_guard: Any = None  # supervisord_llm.subsystems.memory_guard.MemoryGuardExtension (learned peaks)
        self.gateway_app: Any = None
        self.healthy_loop = True
        self._stopping = False
        self.on_status: list[Callable[[dict[str, Any]], None]] = []
        self._alert_submitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert-submit")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.executor = ActionExecutor(self)

    # ---- lifecycle ----------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the state dir: the lock is held before anything in it is read or written. Blocking.

        A second daemon on the same dir fails here, before it could rewrite a file (the alert outbox,
        the state file) that the running daemon still appends to.
        """
        if self.events is not None:
            return
        prepare_state_dir(self.state_dir)
        self.lock.acquire()
        self.events = EventLog(self.state_dir / "events.jsonl", self.clock, self.log, registry=EVENT_TYPES)
        self.state_writer = StateWriter(self.state_dir / "state.json", self._on_state_written)

    def open(self) -> None:
        """Claim the state dir (refusing a second daemon) and load durable state. Blocking."""
        self.claim()
        path = self.state_dir / "state.json"
        self._saved, problem = read_json(path)
        if problem is None and self._saved:
            # Valid JSON of the wrong shape is a damaged file too: kept aside, warned about, not fatal.
            shape = state_shape_problem(self._saved)
            if shape is None:
                try:
                    self._load_saved()
                except (TypeError, ValueError, KeyError, AttributeError) as exc:
                    shape = f"{type(exc).__name__}: {exc}"
            if shape is not None:
                problem = move_aside(path, f"of the wrong shape ({shape})")
                self._saved = {}
        if problem:
            self.events.emit("state.corrupt", problem=problem)
        if problem or not self._saved:
            self._load_saved()
        id_file = self.state_dir / "daemon-id"
        try:
            self.daemon_id = id_file.read_text().strip()
        except OSError:
            self.daemon_id = ""
        if not self.daemon_id:
            self.daemon_id = uuid.uuid4().hex[:16]
            id_file.write_text(self.daemon_id)

    def _load_saved(self) -> None:
        """Restore the extensions and build the supervisors from ``self._saved`` (may be empty)."""
        for ext in self.extensions:
            saved = self._saved.get(ext.name)
            ext.restore(saved if isinstance(saved, dict) else {})
        from supervisord_llm.engine.health import EngineHealth, baseline_from_record

        baselines = self._saved.get("baselines")
        if not isinstance(baselines, dict):
            baselines = {}
        for old in self.supervisors.values():
            old.close()  # built from a state file read earlier; they never ran
        self.supervisors = {}
        for engine in self.config.engines:
            sup = EngineSupervisor(engine, self, log=self.log, logs_dir=self.state_dir / "logs",
                                   log_max_bytes=self.config.daemon.log_max_bytes)
            sup.health = EngineHealth(self.config.degraded, baseline_from_record(baselines.get(model_key(engine))))
            saved = self._saved.get("engines", {}).get(engine.name, {})
            record = saved.get("backoff") if isinstance(saved, dict) else None
            if isinstance(record, dict):
                try:
                    sup.backoff = backoff.from_record(record, now_s=self.clock.now())
                except ValueError as exc:
                    self.events.emit("state.ignored", engine=engine.name, problem=str(exc))
            if isinstance(saved, dict):
                sup.restarts = int(saved.get("restarts", 0) or 0)
                sup.last_exit = saved.get("last_exit") if isinstance(saved.get("last_exit"), dict) else None
                ready_since = restore.saved_seconds(saved.get("ready_since"))
                if ready_since is not None:
                    sup.saved_ready_since_wall = ready_since  # used only if this daemon adopts the run
                refused = saved.get("start_refused")
                if saved.get("state") == "stopped" and isinstance(refused, dict):
                    sup.start_refused = refused  # status and the metrics keep showing why it is stopped
                    at = restore.saved_seconds(refused.get("at"))
                    if at is not None:
                        # Its cooldown goes on from the refusal, not from this daemon's start: requests in it get
                        # the refusal at once instead of a swap for a start likely refused again.
                        sup.start_refused_at_s = self.clock.now() - max(0.0, self.clock.wall() - at)
                reason = saved.get("reason")
                if isinstance(reason, str) and reason and saved.get("state") in ("stopped", "failed"):
                    # Why it is stopped, as the last daemon knew it (replaced as soon as it starts).
                    sup.state_reason = reason if saved["state"] == "stopped" else f"failed before the daemon restarted: {reason}"
            self.supervisors[engine.name] = sup

    def close(self) -> None:
        self._loop = None
        self._alert_submitter.shutdown(wait=True)  # raised alerts reach the outbox journal first
        if self.alerts_outbox is not None:
            self.alerts_outbox.close()
        if self.state_writer is not None:
            self.state_writer.close()  # the last state reaches the disk before the lock is released
        for sup in self.supervisors.values():
            sup.close()
        if self.events is not None:
            self.events.close()  # what is still queued reaches the file before the lock is released
        self.lock.release()

    def find_adoptable(self) -> tuple[dict[str, EngineProcess], list[psutil.Process]]:
        """Engines from the state file still running as the same process, and orphans of ours.

        Orphans are processes carrying this daemon's tag that no recorded engine accounts for: a
        daemon killed between a spawn and the state write, or a grandchild that outlived its engine.
        """
        adopted: dict[str, EngineProcess] = {}
        engines = self._saved.get("engines", {}) if isinstance(self._saved.get("engines"), dict) else {}
        for name, saved in engines.items():
            if name not in self.supervisors or not isinstance(saved, dict):
                continue
            pid, created, tag = saved.get("pid"), restore.saved_seconds(saved.get("create_time")), saved.get("tag")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or created is None or not isinstance(tag, str):
                continue
            proc = EngineProcess.adopt(pid, created, saved.get("argv") or [], tag,
                                       self.supervisors[name].log_path)
            if proc is not None:
                adopted[name] = proc
        tagged: dict[str, list[psutil.Process]] = {}
        for proc, tag in tagged_processes(self.daemon_id + "/").items():
            tagged.setdefault(tag, []).append(proc)
        adopted_tags = {p.tag for p in adopted.values()}
        # Without a usable record (state file lost or damaged), an engine is still found by its tag: the
        # root of the tagged group is adopted when its create time is known, instead of a second copy.
        # An engine with a usable record whose process is gone is dead: a tagged grandchild of it is
        # an orphan, never the engine.
        recorded = {n for n, saved in engines.items() if isinstance(saved, dict) and isinstance(saved.get("pid"), int)}
        for tag, group in sorted(tagged.items(), key=lambda kv: -_oldest_create_time(kv[1])):
            name = tag.split("/")[1] if tag.count("/") >= 2 else ""
            if tag in adopted_tags or name not in self.supervisors or name in adopted or name in recorded:
                continue
            root = _group_root(group)
            if root is None:
                continue
            sup = self.supervisors[name]
            conflict = any(sup.config.exclusive or self.supervisors[n].config.exclusive for n in adopted)
            if conflict:
                continue  # never adopt two engines that must not share the machine; the extra one is an orphan
            proc = EngineProcess.adopt(root.pid, root.create_time(), _cmdline(root), tag, sup.log_path)
            if proc is not None:
                adopted[name] = proc
                adopted_tags.add(tag)
                self.events.emit("engine.found_by_tag", engine=name, pid=root.pid)
        orphans = [p for tag, group in tagged.items() if tag not in adopted_tags for p in group]
        self._claim_exits(engines, adopted)
        return adopted, orphans

    def _claim_exits(self, engines: dict[str, Any], adopted: dict[str, EngineProcess]) -> None:
        """Engines that ended while no daemon ran: their keepers recorded how (see engine/keeper.py)."""
        recorded = {name: (saved["pid"], saved["tag"]) for name, saved in engines.items()
                    if name in self.supervisors and name not in adopted and isinstance(saved, dict)
                    and isinstance(saved.get("pid"), int) and isinstance(saved.get("tag"), str)}
        keep = {p.keeper.record_path for p in adopted.values() if p.keeper is not None}
        for name, info in claim_exit_records(self.state_dir / "exits", recorded=recorded, keep=keep).items():
            reason = f"exited while no daemon was running ({info.describe()})"
            self.supervisors[name].last_exit = {"code": info.code, "signal": info.signal_name, "reason": reason,
                                                "at": info.at_wall}
            self.events.emit("engine.exited", engine=name, pid=recorded[name][0], code=info.code,
                             signal=info.signal_name, state_was="unsupervised", while_daemon_down=True)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                  ready_callback: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # alerts submitted in a worker thread wake the senders here
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, connect=2.0)) as http:
            self.http = http
            adopted, orphans = await anyio.to_thread.run_sync(self.find_adoptable)
            for name, proc in adopted.items():
                sup = self.supervisors[name]
                if not sup.backoff.spawn_times_s:
                    # History lost with the state file: the process's own start time keeps the 60 s floor.
                    spawned_s = self.clock.now() - max(0.0, self.clock.wall() - proc.create_time)
                    sup.backoff = backoff.record_spawn(sup.backoff, spawned_s)
            if orphans:
                await self._kill_orphans(orphans)
            # Keepers whose engines ended while this daemon re-executed (the engines are gone, so
            # nothing above found them) are its children: reap them rather than leave zombies.
            await anyio.to_thread.run_sync(reap_zombie_children)
            self.events.emit("daemon.started", pid=os.getpid(), version=__version__, state_dir=str(self.state_dir),
                             adopted={n: p.pid for n, p in adopted.items()})
            await self._read_memory()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for ext in self.extensions:
                    await tg.start(ext.run)
                tg.start_soon(self._memory_loop)
                tg.start_soon(self._heartbeat)
                pending_swap = self._saved.get("swap")
                to_start = self._engines_to_start(pending_swap)
                records = self._saved.get("engines")
                saved: dict[str, Any] = records if isinstance(records, dict) else {}
                for name, sup in self.supervisors.items():
                    record = saved.get(name)
                    listen_was = (restore.recorded_listen(record.get("listen"), record.get("argv"), sup.config.host)
                                  if name in adopted and isinstance(record, dict) else None)
                    await tg.start(sup.run, adopted.get(name), name in to_start, listen_was)
                if isinstance(pending_swap, dict) and pending_swap.get("target") in self.supervisors:
                    tg.start_soon(self._resume_swap, pending_swap)
                self.persist()
                task_status.started()
                if ready_callback:
                    ready_callback()
                await anyio.sleep_forever()

    def _engines_to_start(self, pending_swap: Any) -> tuple[str, ...]:
        """At daemon start: the engines to start (``policies.restore.engines_to_start``)."""
        engines = [restore.EngineAtStart(name=n, autostart=s.config.autostart, exclusive=s.config.exclusive,
                                         saved=restore.SavedEngine.from_record(self._saved_engine(n)))
                   for n, s in self.supervisors.items()]
        default = self.config.default_engine
        return restore.engines_to_start(engines, default=default.name if default else None,
                                        swap_pending=isinstance(pending_swap, dict))

    def _saved_engine(self, name: str) -> dict[str, Any] | None:
        """The last daemon's record of this engine (None: none)."""
        engines = self._saved.get("engines") if self._saved else None
        saved = engines.get(name) if isinstance(engines, dict) else None
        return saved if isinstance(saved, dict) else None

    async def _kill_orphans(self, orphans: list[psutil.Process]) -> None:
        pids = [p.pid for p in orphans]
        self.events.emit("daemon.orphans_found", pids=pids,
                         commands=[" ".join(redact_argv(_cmdline(p)))[:120] for p in orphans])
        # Orphans may hold GPU memory: read which before killing them, and wait (bounded) until NVML
        # shows it back before any engine starts, so that no model loads next to their leftovers.
        on_gpu = [(ext, found) for ext in self.extensions if (found := await ext.gpu_orphans_at_start(pids))]
        killed_at_s = self.clock.now()

        def kill() -> None:
            # An orphan's keeper is this daemon's child after a re-exec: once its engine is gone it
            # exits, and would stay a zombie unless it is reaped here.
            keepers = [k for p in orphans if (k := find_keeper(p.pid, None)) is not None]
            for p in orphans:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            alive = wait_gone(orphans, 10)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            wait_gone(alive, 5)
            reap_keepers(keepers)

        await anyio.to_thread.run_sync(kill)
        self.events.emit("daemon.orphans_killed", pids=pids)
        for ext, found in on_gpu:
            await ext.wait_orphans_released(found, killed_at_s)

    async def shutdown(self, *, stop_engines: bool = True) -> None:
        """A clean exit (SIGTERM/SIGINT) stops the engines gracefully, unless configured to leave them
        running for the next daemon to adopt. A daemon that crashes or is SIGKILLed always leaves them."""
        self.events.emit("daemon.stopping", pid=os.getpid(), stop_engines=stop_engines)
        self._stopping = True
        if stop_engines:
            async with anyio.create_task_group() as tg:
                for sup in self.supervisors.values():
                    if sup.resident or sup.state not in (EngineState.STOPPED, EngineState.FAILED):
                        tg.start_soon(self._stop_and_wait, sup)
        self.persist()

    async def _stop_and_wait(self, sup: EngineSupervisor) -> None:
        try:
            await sup.command("stop", reason=SHUTDOWN_REASON)
        except Exception as exc:
            self.events.emit("engine.stop_failed", engine=sup.name, error=str(exc))
            return
        await sup.wait_for(lambda s: s.state in (EngineState.STOPPED, EngineState.FAILED)
                           and not (s.proc and s.proc.running), sup.config.stop_grace_s + 30)

    # ---- persistence -----------------------------------------------------------------------

    def persist(self) -> int:
        """Hand the current state to the writer thread: no disk I/O on the loop. Returns its version.

        Where an order depends on the state being on disk, use ``persist_durably``.
        """
        if self.events is None or self.state_writer is None:
            return 0
        data = {
            "version": STATE_VERSION,
            "daemon_pid": os.getpid(),
            "engines": {name: sup.persisted() for name, sup in self.supervisors.items()},
            "swap": {"target": self.swap_target, "from": self._swap_from} if self.swap_target else None,
            "baselines": self._baselines(),
        }
        for ext in self.extensions:
            record = ext.persisted()
            if record is not None:
                data[ext.name] = record
        # Serialised here, on the loop: the writer thread gets a finished text, never live objects.
        return self.state_writer.submit(json.dumps(data, indent=1, sort_keys=True))

    async def persist_durably(self) -> None:
        """``persist()`` and return once that state is on disk (waited for in a worker thread)."""
        version = self.persist()
        if version and self.state_writer is not None:
            await anyio.to_thread.run_sync(self.state_writer.wait_written, version)

    def _on_state_written(self, error: OSError | None) -> None:
        """The writer thread's report on each write: an outage and its end are logged once each."""
        if error is not None and self._persist_ok:
            self._persist_ok = False
            self.log.error("state.write_failed", path=str(self.state_dir / "state.json"), error=str(error))
        elif error is None and not self._persist_ok:
            self._persist_ok = True
            self.log.warning("state.write_recovered", path=str(self.state_dir / "state.json"))

    def _baselines(self) -> dict[str, Any]:
        """Throughput baselines per model, kept across engine and daemon restarts."""
        from supervisord_llm.engine.health import baseline_record

        saved = self._saved.get("baselines")
        out = dict(saved) if isinstance(saved, dict) else {}
        for sup in self.supervisors.values():
            if sup.health is not None and sup.health.baseline_state.window_rates:
                out[model_key(sup.config)] = baseline_record(sup.health.baseline_state)
        return out

    # ---- memory ---------------------------------------------------------------------------

    async def _read_memory(self) -> None:
        from probes.errors import ProbeError
        from probes.memory import read_system_memory

        p = self.config.probes
        platform = sys.platform if p.platform == "auto" else p.platform
        try:
            self.memory = await anyio.to_thread.run_sync(
                lambda: read_system_memory(self.clock.now(), platform=platform, vm_stat_cmd=p.vm_stat,
                                           sysctl_cmd=p.sysctl))
            if self.memory_error:
                self.events.emit("probe.recovered", probe="memory")
            self.memory_error = None
        except ProbeError as exc:
            if self.memory_error != str(exc):
                self.events.emit("probe.failed", probe="memory", error=str(exc))
            self.memory_error = str(exc)
        for ext in self.extensions:
            ext.on_memory(self.memory)

    async def _heartbeat(self) -> None:
        """The loop is healthy while this task runs on time; systemd's watchdog pings depend on it."""
        beat = self.clock.now()
        while True:
            await anyio.sleep(1.0)
            now = self.clock.now()
            lag = now - beat - 1.0
            self.healthy_loop = not loop_stalled(lag)
            if not self.healthy_loop:
                self.log.error("daemon.loop_stalled", lag_s=round(lag, 1))
            beat = now

    async def _memory_loop(self) -> None:
        persisted_baselines = self._baselines()
        while True:
            await anyio.sleep(self.config.probes.interval_s)
            await self._read_memory()
            # Learned throughput baselines change without a state change: save them as they grow.
            baselines = self._baselines()
            if baselines != persisted_baselines:
                persisted_baselines = baselines
                self.persist()

    # ---- admission -------------------------------------------------------------------------

    async def requests_settled(self) -> None:
        for ext in self.extensions:
            await ext.requests_settled()

    def requests_in_line(self, engine: str) -> int:
        return sum(ext.requests_in_line(engine) for ext in self.extensions)

    def footprint_bytes(self, sup: EngineSupervisor) -> int | None:
        """What admission counts the engine at: max(configured or estimated, the peak it was seen to hold)."""
        peaks = self.memory_guard.peaks(sup.name) if self.memory_guard is not None else PeakHistory()
        return admission_bytes(self.configured_footprint_bytes(sup), peaks)

    def configured_footprint_bytes(self, sup: EngineSupervisor) -> int | None:
        cfg = sup.config
        if cfg.footprint_bytes is not None:
            return cfg.footprint_bytes
        if getattr(cfg, "gpu_footprint_bytes", None) is not None:
            return 0  # "auto" with a GPU footprint: the weights live in GPU memory, not host RAM
        weights = sup.weights_bytes
        if weights is None:
            reading = read_weights(cfg.model, cfg.kind)
            weights = reading.bytes if reading else None
            sup.weights_bytes = weights
        return auto_footprint_bytes(weights, self.config.memory.auto_factor) if weights else None

    def _footprint(self, sup: EngineSupervisor) -> Footprint:
        # footprint is host RAM; gpu_footprint (per device) is what the engine holds on each of its GPUs.
        # Without gpu_footprint the footprint is split evenly over gpu_devices (it is then both).
        return Footprint(engine=sup.name, bytes=self.footprint_bytes(sup) or 0, exclusive=sup.config.exclusive,
                         gpu_devices=sup.config.gpu_devices, gpu_bytes_per_device=sup.config.gpu_footprint_bytes)

    def budget_bytes(self) -> int | None:
        """The memory budget (configured, else total memory minus headroom): one formula for every check."""
        return effective_budget_bytes(self.config.memory.budget_bytes,
                                      self.memory.total_bytes if self.memory else None,
                                      self.config.memory.headroom_bytes)

    def stranded_bytes(self) -> int:
        return max((ext.stranded_bytes() for ext in self.extensions), default=0)

    def _plan_swap(self, target: EngineSupervisor) -> SwapPlan | Refuse:
        """Which engines stop before ``target`` starts (``policies.swap.plan_swap``), logged with its inputs.

        What the plan may stop: engines holding memory, and engines waiting in backoff to come back
        (their automatic restart would otherwise be refused next to the target, or overrun the
        budget). Those in backoff are stopped first (nothing is lost), then the largest first.
        """
        others = [s for s in self.supervisors.values()
                  if s is not target and (s.resident or s.state == EngineState.BACKOFF)]
        others.sort(key=lambda s: (s.state != EngineState.BACKOFF, -(self.footprint_bytes(s) or 0)))
        resident = [self._footprint(s) for s in others]
        if target.resident:
            resident.append(self._footprint(target))
        budget, stranded = self.budget_bytes(), self.stranded_bytes()
        plan = plan_swap(resident, self._footprint(target), budget, self.config.memory.swap, stranded_bytes=stranded,
                         grace_s={s.name: s.config.stop_grace_s for s in others})
        inputs = {"resident": {f.engine: f.bytes for f in resident}, "exclusive": [f.engine for f in resident if f.exclusive],
                  "target_bytes": self.footprint_bytes(target) or 0, "budget_bytes": budget, "stranded_bytes": stranded}
        if isinstance(plan, Refuse):
            self.decided("swap_plan", target.name, plan, **inputs)
        else:
            self.events.emit("policy.decided", policy="swap_plan", engine=target.name, decision="plan",
                             stops=[stop.engine for stop in plan.stops], start=plan.start is not None,
                             resident_after=list(plan.resident_after), **inputs)
        return plan

    async def _wait_memory_returned(self, target: EngineSupervisor, stopped: list[str]) -> None:
        """After the stops: wait (``policies.swap.decide_memory_wait``) until the target fits, or give up."""
        settings = self.config.memory.swap
        need = (self.footprint_bytes(target) or 0) + self.config.memory.headroom_bytes
        stopped_at_s = self.clock.now()
        before = self.memory.available_bytes if self.memory else 0
        while True:
            await self._read_memory()
            now_avail = self.memory.available_bytes if self.memory else need
            returned = memory_returned(before, now_avail, need)
            now = self.clock.now()
            decision = decide_memory_wait(target.name, stopped_at_s, now, returned, settings, stopped=stopped)
            first = decision[0]
            if isinstance(first, WaitUntil):
                await anyio.sleep(max(0.0, first.at_s - now))
                continue
            self.decided("memory_return", target.name, first, needed_bytes=need, available_bytes=now_avail,
                         returned_bytes=returned.returned_bytes, waited_s=round(now - stopped_at_s, 3))
            if isinstance(first, Start):
                return
            for action in decision[1:]:
                await self.execute(action)
            self.events.emit("swap.aborted", target=target.name, reason=first.message)
            raise SwapError(first.message)

    def resident(self, exclude: str | None = None) -> list[EngineSupervisor]:
        return [s for s in self.supervisors.values() if s.name != exclude and s.resident]

    def _admission(self, sup: EngineSupervisor) -> Admit | Refuse:
        mem = self.memory
        resident = [self._footprint(s) for s in self.resident(exclude=sup.name)]
        candidate = self._footprint(sup)
        available = mem.available_bytes if mem else 2**62
        budget = self.budget_bytes()
        stranded = self.stranded_bytes()
        gpu_free = None
        for ext in self.extensions:
            if sup.config.gpu_devices:
                gpu_free = ext.gpu_free_bytes() if gpu_free is None else gpu_free
        return admit(candidate, resident, available, self.config.memory.headroom_bytes, budget, gpu_free,
                     stranded_bytes=stranded)

    async def admit(self, sup: EngineSupervisor) -> None:
        """Wait (bounded) until the engine fits; raise StartRefused naming the numbers otherwise.

        Exclusivity is never waited for: it is a conflict a swap resolves, not memory pressure.
        """
        for ext in self.extensions:
            await ext.before_start(sup)
        # Leftovers of another engine's crashed run are being killed: they hold memory until gone.
        sweeping = [s for s in self.supervisors.values() if s is not sup and s.sweeping]
        for other in sweeping:
            await other.wait_for(lambda s: not s.sweeping, 30)
        deadline = self.clock.now() + self.config.memory.admission_wait_s
        announced = False
        while True:
            await self._read_memory()
            verdict = self._admission(sup)
            if isinstance(verdict, Admit):
                self.decided("admission", sup.name, verdict)
                return
            step = after_refusal(verdict, self.clock.now(), deadline)
            if isinstance(step, Refuse):
                self.decided("admission", sup.name, step)
                raise StartRefused(sup.name, step.reason, step.message)
            if not announced:
                announced = True
                self.events.emit("engine.admission_waiting", engine=sup.name, reason=verdict.reason,
                                 message=verdict.message,
                                 wait_s=round(deadline - self.clock.now(), 1))
            await anyio.sleep(max(0.1, step.at_s - self.clock.now()))

    # ---- callbacks from supervisors -------------------------------------------------------

    def engine_ready(self, sup: EngineSupervisor) -> None:
        self._resolve_engine_alerts(sup)
        for ext in self.extensions:
            ext.on_engine_ready(sup)

    def _resolve_engine_alerts(self, sup: EngineSupervisor) -> None:
        """An engine that is ready again closes every open episode about it (``policies.episodes``)."""
        if self.alerts_outbox is None:
            return
        self._resolve_episodes(sup.name, "ready", episodes.on_ready)

    def _resolve_episodes(self, engine: str, trigger: str, decide: Callable[..., tuple[Alert, ...]]) -> None:
        open_keys = list(self.alerts_outbox.open_episodes())
        alerts = decide(engine, open_keys)
        if alerts:
            self.events.emit("policy.decided", policy="episodes", engine=engine, trigger=trigger,
                             decision="resolve " + ",".join(a.key for a in alerts), open_episodes=open_keys)
        for alert in alerts:
            self.alert(alert)

    def engine_exited(self, sup: EngineSupervisor) -> None:
        for ext in self.extensions:
            ext.on_engine_exit(sup)

    def on_engine_memory(self, sup: EngineSupervisor, gen: int, tree: ProcessTreeReading, gpu_bytes: int | None) -> None:
        for ext in self.extensions:
            ext.on_engine_memory(sup, gen, tree, gpu_bytes)

    def engine_gpu_bytes(self, pids: tuple[int, ...]) -> int | None:
        """GPU memory held by an engine's processes; None without a GPU reading."""
        for ext in self.extensions:
            held = ext.engine_gpu_bytes(pids)
            if held is not None:
                return held
        return None

    def cancel_reboot(self) -> dict[str, Any]:
        for ext in self.extensions:
            result = ext.cancel_reboot()
            if result is not None:
                return result
        return {"ok": True, "cancelled": False, "message": "no reboot is pending"}

    def decided(self, policy: str, engine: str | None, action: Any, **inputs: Any) -> None:
        self.executor.decided(policy, engine, action, **inputs)

    async def execute(self, action: Any) -> None:
        await self.executor.execute(action)

    def request_reboot(self, reason: str) -> bool:
        """Hand a reboot to the extension that runs the reboot escalation; False when none does."""
        return any(ext.request_reboot(reason) for ext in self.extensions)

    def apply(self, action: Any) -> None:
        self.executor.apply(action)

    # The executor's capabilities that extensions provide (the first one that takes the action).
    def announce_reboot(self, action: EscalateReboot) -> bool:
        return any(ext.announce_reboot(action) for ext in self.extensions)

    def run_reboot(self, action: RunReboot) -> bool:
        return any(ext.run_reboot(action) for ext in self.extensions)

    def drain(self, action: Drain) -> bool:
        return any(ext.drain(action) for ext in self.extensions)

    def alert(self, alert: Alert) -> None:
        self.events.emit("alert.raised", key=alert.key, severity=alert.severity, summary=alert.summary,
                         resolved=alert.resolved, details=alert.details)
        if self.alerts_outbox is not None:
            # The outbox fsyncs each record, under a lock its delivery worker also holds while it
            # fsyncs and compacts: not on the loop. One submitting thread keeps the alerts in order;
            # close() waits for it, so what was raised reaches the journal before the daemon exits.
            try:
                self._alert_submitter.submit(self._submit_alert, alert)
            except RuntimeError:  # raised after close(): no loop left to stall, submit it here
                self._submit_alert(alert)

    def _submit_alert(self, alert: Alert) -> None:
        try:
            self.alerts_outbox.submit_action(alert)
        except Exception as exc:  # a bad alert must not stop the ones after it
            self.log.error("alert.submit_failed", key=alert.key, error=f"{type(exc).__name__}: {exc}")
            return
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.alerts_outbox.wake)
            except RuntimeError:
                pass  # the loop has ended: the senders are gone, the journal keeps the alert

    async def monitor_engine(self, sup: EngineSupervisor, gen: int, proc: EngineProcess) -> None:
        from supervisord_llm.engine.health import monitor

        await monitor(self, sup, gen, proc)

    # ---- operations (control API, gateway) --------------------------------------------------

    def spawn_background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` in the daemon's own task group (it outlives the request that asked for it)."""
        self._tg.start_soon(fn, *args)

    def supervisor(self, name: str) -> EngineSupervisor:
        sup = self.supervisors.get(name)
        if sup is None:
            for s in self.supervisors.values():
                if name in s.config.aliases:
                    return s
            raise UnknownEngine(name, list(self.supervisors))
        return sup

    async def start(self, name: str, *, force: bool = False) -> str:
        sup = self.supervisor(name)
        candidate = self._footprint(sup)
        conflicts = exclusive_conflicts(candidate, [self._footprint(s) for s in self.resident(exclude=sup.name)])
        if conflicts:
            names = ", ".join(conflicts)
            raise StartRefused(name, "exclusive",
                               f"{name} cannot run next to {names} (exclusive); use `llmctl switch {name}` "
                               "to stop them first")
        # An engine that cannot share with this one and waits in backoff would have its automatic
        # restart refused later; a person starting this one means that one stays down.
        waiting = [self._footprint(s) for s in self.supervisors.values()
                   if s.name != sup.name and s.state == EngineState.BACKOFF]
        for other in exclusive_conflicts(candidate, waiting):
            await self.supervisors[other].command("stop", reason=f"{name} was started (they cannot share the machine)")
        return await sup.command("start", force=force)

    async def stop(self, name: str) -> str:
        sup = self.supervisor(name)
        if self.swap_target == sup.name:
            self._swap_cancelled = f"{name} was stopped by llmctl stop while it was swapped in"
        message = await sup.command("stop")
        for ext in self.extensions:
            ext.on_stopped_by_person(sup)
        # A person stopped it: a refusal of its start is settled (its alert episode ends below, too).
        sup.start_refused = sup.start_refused_at_s = None
        self.persist()
        if self.alerts_outbox is not None:
            self._resolve_episodes(name, "llmctl stop", episodes.on_stopped_by_person)
        return message

    async def restart(self, name: str, *, force: bool = False) -> str:
        return await self.supervisor(name).command("restart", force=force)

    @property
    def shutting_down(self) -> bool:
        return self._stopping

    async def switch(self, name: str, *, manual: bool = True) -> dict[str, Any]:
        """Swap to ``name``: one swap at a time; a second request for the same target joins it,
        one for another target is refused (SwapInProgress) until the first has finished.

        ``manual`` (a person's ``llmctl switch``) may start a target that waits in backoff or failed;
        an automatic swap (a gateway request) may not: the target's backoff holds, nothing is stopped.
        """
        target = self.supervisor(name)
        if self._stopping:
            raise SwapError("the daemon is shutting down; no swap is started")
        now = self.clock.now()
        active = ActiveSwap(self.swap_target, self.swap_started_s or now) if self.swap_target is not None else None
        request = decide_swap_request(active, target.name, now)
        if isinstance(request, JoinSwap):
            await target.wait_for(lambda s: s.swap_in_progress is False, None)
            return {"target": target.name, "joined": True, "state": str(target.state)}
        if isinstance(request, Refuse) and self.swap_target is not None:
            self.decided("swap_request", target.name, request, active_target=self.swap_target)
            raise SwapInProgress(self.swap_target)
        if not manual and not target.serving:
            # Decided before anything is stopped: an automatic swap never trades a working engine for
            # one its backoff would refuse.
            verdict = self.automatic_start_verdict(target, now)
            if isinstance(verdict, Refuse):
                self.decided("automatic_start", target.name, verdict, state=str(target.state))
                raise StartRefused(target.name, str(target.state), f"not swapping to {target.name}: {verdict.message}",
                                   until_s=verdict.until_s)
        # Claimed before the first await: two requests at the same moment cannot both pass the check.
        self.swap_target, self.swap_started_s = target.name, self.clock.now()
        target.swap_in_progress = True
        try:
            async with self._swap_lock:
                return await self._do_swap(target, manual=manual)
        finally:
            if self.swap_target == target.name and not self._swap_lock.locked():
                self.swap_target, self.swap_started_s = None, None
                target.swap_in_progress = False
                target.notify()

    def automatic_start_verdict(self, sup: EngineSupervisor, now_s: float) -> Admit | Refuse:
        """Whether a request may start (swap in) ``sup`` now (``policies.backoff.automatic_start_allowed``): the one
        question the gateway's swap and the daemon's own check before a swap both ask."""
        waiting = sup.state_reason if sup.state in (EngineState.BACKOFF, EngineState.FAILED) else None
        return backoff.automatic_start_allowed(sup.backoff, self.backoff_settings, now_s, waiting=waiting,
                                               **self.refusal_inputs(sup))

    def refusal_inputs(self, sup: EngineSupervisor) -> dict[str, Any]:
        """The standing admission refusal of ``sup``'s last start, as ``automatic_start_allowed`` takes it."""
        refused = sup.start_refused or {}
        return {"refused_at_s": sup.start_refused_at_s, "refusal": str(refused.get("message") or ""),
                "refusal_cooldown_s": backoff.refusal_cooldown_s(self.config.memory.admission_wait_s)}

    async def _wait_stopped(self, sup: EngineSupervisor, why: str) -> None:
        ok = await sup.wait_for(lambda s: s.state in (EngineState.STOPPED, EngineState.FAILED, EngineState.BACKOFF)
                                and not s.resident, sup.config.stop_grace_s + 60)
        if not ok:
            raise SwapError(f"{sup.name} did not stop within {sup.config.stop_grace_s + 60:.0f}s ({why}); "
                            f"it is {sup.state}: {sup.state_reason}")

    async def _do_swap(self, target: EngineSupervisor, previous: list[str] | None = None, *,
                       manual: bool = True) -> dict[str, Any]:
        started = self.clock.now()
        plan = self._plan_swap(target)
        if isinstance(plan, Refuse):
            self.events.emit("swap.refused", target=target.name, reason=plan.reason, message=plan.message)
            raise SwapError(plan.message)
        to_stop = [self.supervisors[stop.engine] for stop in plan.stops]
        prev = previous if previous is not None else [s.name for s in to_stop if s.serving]
        self.swap_target, self._swap_from, self.swap_started_s = target.name, prev, started
        target.swap_in_progress = True
        self.persist()
        self.events.emit("swap.started", target=target.name, stopping=[s.name for s in to_stop])
        timings: dict[str, float] = {}
        try:
            t0 = self.clock.now()
            # In-flight requests on the engines being stopped may finish first (bounded by swap_drain),
            # and so may those in their lines in the gateway (policies.swap.drained); what still runs
            # after that is cut when the engine stops, and the client sees the error. Requests the
            # gateway sent them a moment ago count too, once it has confirmed its notes.
            if to_stop:
                await self.requests_settled()
            with anyio.move_on_after(self.config.memory.swap_drain_s):
                while not all(drained(in_flight=s.health.in_flight if s.health is not None else 0,
                                      in_line=self.requests_in_line(s.name)) for s in to_stop):
                    await anyio.sleep(0.1)
            timings["drain_s"] = self.clock.now() - t0
            t0 = self.clock.now()
            for stop in plan.stops:
                await self.execute(stop)
            for sup in to_stop:
                await self._wait_stopped(sup, f"swap to {target.name}")
            timings["stop_s"] = self.clock.now() - t0
            # Memory must be back before the new engine loads: never two models at once.
            t1 = self.clock.now()
            if to_stop:
                await self._wait_memory_returned(target, [s.name for s in to_stop])
            timings["memory_wait_s"] = self.clock.now() - t1
            t2 = self.clock.now()
            if not target.serving:
                if target.state == EngineState.STOPPING:
                    # Its own stop (an idle unload, `llmctl stop --no-wait`) finishes first; then it starts (a
                    # restart under way goes on to start by itself).
                    await target.wait_for(lambda s: s.state != EngineState.STOPPING, target.config.stop_grace_s + 30)
                if target.state in (EngineState.STOPPED, EngineState.FAILED, EngineState.BACKOFF):
                    try:
                        await target.command("start", force=manual, manual=manual, reason=f"swap to {target.name}")
                    except StartRefused as exc:
                        raise SwapError(str(exc)) from exc
                ok = await target.wait_for(lambda s: s.state in (EngineState.READY, EngineState.DEGRADED,
                                                                 EngineState.FAILED, EngineState.BACKOFF,
                                                                 EngineState.STOPPED),
                                           target.config.start_timeout_s + 30)
                if not ok or not target.serving:
                    raise SwapError(f"{target.name} did not become ready ({target.state}: {target.state_reason})")
            timings["start_s"] = self.clock.now() - t2
            total = self.clock.now() - started
            self.events.emit("swap.finished", target=target.name, stopped=[s.name for s in to_stop],
                             total_s=round(total, 3), **{k: round(v, 3) for k, v in timings.items()})
            return {"target": target.name, "stopped": [s.name for s in to_stop], "state": str(target.state),
                    "total_s": total, **timings}
        except SwapError as exc:
            cancelled = "the daemon is stopping" if self._stopping else self._swap_cancelled
            if cancelled is not None:
                # Not a failure of the target: no rollback (a person wanted it stopped, or everything stops) and
                # no critical alert; the requests waiting for it get the error.
                self.events.emit("swap.aborted", target=target.name, reason=cancelled)
                raise SwapError(f"the swap to {target.name} was cancelled: {cancelled}") from exc
            await self._rollback(target, prev, str(exc))
            raise
        finally:
            target.swap_in_progress = False
            self._swap_cancelled = None
            self.swap_target, self._swap_from, self.swap_started_s = None, [], None
            self.persist()
            for sup in self.supervisors.values():
                ev, sup.state_changed = sup.state_changed, anyio.Event()
                ev.set()

    async def _rollback(self, target: EngineSupervisor, previous: list[str], reason: str) -> None:
        """The new engine failed: stop it (nothing half-loaded) and bring the previous one back.

        The target ends stopped (or failed) with its failure history kept: a gateway request for it
        gets 503 until its backoff has passed instead of starting another swap at once.
        """
        if (target.state in RESIDENT_STATES or target.state == EngineState.BACKOFF
                or (target.proc is not None and target.proc.running)):
            # Stopped, not left in backoff: its automatic restart would only be refused next to the
            # engine that comes back. Its failure history stays, so automatic swaps keep refusing it
            # until the backoff has passed; a person's `llmctl switch` may try again at once.
            await target.command("stop", reason="swap rollback")
        try:
            # Also waits for the leftovers of a crashed start to be swept: they still hold memory.
            await self._wait_stopped(target, "rollback")
        except SwapError as exc:
            self.events.emit("swap.rollback_failed", engine=target.name, error=str(exc))
            return
        restored = []
        for name in previous:
            sup = self.supervisors[name]
            try:
                await sup.command("start", reason=f"rollback: swap to {target.name} failed")
                restored.append(name)
            except Exception as exc:  # report, do not mask the swap's own error
                self.events.emit("swap.rollback_failed", engine=name, error=str(exc))
        self.events.emit("swap.rolled_back", target=target.name, reason=reason, restored=restored)
        if self.alerts_outbox is not None:  # its exit episode announced a restart the rollback cancelled
            self._resolve_episodes(target.name, "swap rollback", episodes.on_swap_rolled_back)
        self.alert(Alert(key=f"swap.failed:{target.name}", severity="critical",
                         summary=f"swap to {target.name} failed ({reason}); rolled back to "
                                 f"{', '.join(restored) or 'nothing'}",
                         details={"target": target.name, "restored": restored}))

    async def _resume_swap(self, swap: dict[str, Any]) -> None:
        """A daemon killed mid-swap: finish the swap (or roll back) so no two models stay resident."""
        target = self.supervisors[swap["target"]]
        previous = [n for n in swap.get("from") or [] if n in self.supervisors]
        self.events.emit("swap.resumed", target=target.name, previous=previous)
        async with self._swap_lock:
            try:
                await self._do_swap(target, previous=previous)
            except SwapError:
                pass

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        mem = self.memory
        system: dict[str, Any] = {
            "platform": mem.platform if mem else sys.platform,
            "memory": {
                "total_bytes": mem.total_bytes if mem else None,
                "available_bytes": mem.available_bytes if mem else None,
                "wired_bytes": mem.wired_bytes if mem else None,
                "compressed_bytes": mem.compressed_bytes if mem else None,
                "wired_limit_bytes": mem.wired_limit_bytes if mem else None,
                "baseline_wired_bytes": None,
                "stranded_bytes": None,
                "error": self.memory_error,
            },
            "gpus": [],
        }
        doc: dict[str, Any] = {
            "schema": 1,
            "daemon": {"pid": os.getpid(), "version": __version__, "uptime_s": round(self.clock.now() - self.started_s, 1),
                       "started_at": round(self.started_wall, 3), "state_dir": str(self.state_dir),
                       "config": self.config.file},
            "engines": [sup.status() for sup in self.supervisors.values()],
            "system": system,
            "alerts": {"pending": 0, "delivered": 0, "failed": 0},
            "reboot": {"state": "idle", "at": None, "reason": None},
            "gateway": None,
            "swap": {"target": self.swap_target, "for_s": round(self.clock.now() - self.swap_started_s, 1)}
            if self.swap_target and self.swap_started_s is not None else None,
        }
        if self.alerts_outbox is not None:
            doc["alerts"] = self.alerts_outbox.counts()
        for ext in self.extensions:
            ext.contribute_status(doc)
        return doc


def model_key(engine: Any) -> str:
    return f"{engine.kind}:{engine.served_model or engine.model or engine.name}"


def _group_root(group: list[psutil.Process]) -> psutil.Process | None:
    """The process of a tagged group whose parent is not in the group (the engine itself)."""
    pids = {p.pid for p in group}
    roots = []
    for p in group:
        try:
            if p.ppid() not in pids and p.status() != psutil.STATUS_ZOMBIE:
                roots.append(p)
        except psutil.Error:
            continue
    if len(roots) != 1:
        # A grandchild that moved to its own session also has an outside parent; take the oldest.
        roots.sort(key=lambda p: _create_time(p))
    return roots[0] if roots else None


def _create_time(p: psutil.Process) -> float:
    try:
        return p.create_time()
    except psutil.Error:
        return float("inf")


def _oldest_create_time(group: list[psutil.Process]) -> float:
    return min((_create_time(p) for p in group), default=float("inf"))


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


__all__ = ["Daemon", "DaemonLock", "prepare_state_dir"]
