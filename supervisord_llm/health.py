"""The per-engine watchdog: runs the probes for one serving engine and turns readings into verdicts.

The decisions are the pure functions in ``policies.health``; this module does the I/O (process
tree, canaries, engine counters) on a schedule and posts verdicts to the engine's supervisor, which
alone changes state. Probe cost is kept low, because an idle daemon should cost next to nothing:
each ``process_interval`` (1 s) one worker-thread hop reads the engine's root process status (one
``/proc/<pid>/stat`` read; a SIGSTOPped or zombie root is what a hang looks like from outside) and
the new lines of its log; the whole process tree (RSS, descendants) is walked only every
``probes.interval`` (5 s) or when the root looks stopped. Canaries run only when no real traffic
flowed for ``canary_interval``, counters every probe interval.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import psutil

from policies.health import (
    HealthSettings,
    ThroughputBaseline,
    ThroughputTracker,
    assess_degraded,
    assess_hung,
    learn_baseline,
)
from probes.errors import ProbeError
from probes.process import ProcessGone, read_process_tree
from probes.readings import CanaryReading, EngineCounters, ProcessTreeReading, ThroughputSample

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.process import EngineProcess, LogTail
    from supervisord_llm.supervisor import EngineSupervisor

STOP_CONFIRM_S = 1.0  # a SIGSTOP duty cycle (slow engine) must not read as a hang


class EngineHealth:
    """What the watchdog knows about one engine: throughput, baseline, memory, traffic."""

    def __init__(self, settings: HealthSettings, baseline: ThroughputBaseline) -> None:
        self.settings = settings
        self.tracker = ThroughputTracker()
        self.baseline_state = baseline
        self.tree: ProcessTreeReading | None = None
        self.gpu_bytes: int | None = None
        self.in_flight = 0
        self.last_traffic_s: float | None = None
        self.counters: deque[EngineCounters] = deque(maxlen=120)
        self.last_rate: float | None = None
        self.hung_since_s: float | None = None
        self.stall_reason: str | None = None  # set by the gateway when a live stream stalls
        self.degraded = False
        self.draining: str | None = None  # set by the memory guard: why no new requests are routed here

    def new_run(self) -> None:
        """A new process of the engine: what was seen of the previous one must not judge this one
        (its slow samples, frozen counters or a stall would mark the new run degraded or hung, and a
        stale ``hung_since_s`` would hide a real hang). The learned baseline and traffic stay."""
        self.tracker = ThroughputTracker()
        self.tree = None
        self.gpu_bytes = None
        self.counters.clear()
        self.last_rate = None
        self.hung_since_s = None
        self.stall_reason = None
        self.degraded = False
        self.draining = None

    def add_sample(self, sample: ThroughputSample) -> None:
        self.tracker = self.tracker.add(sample, self.settings)
        self.last_rate = sample.tokens_per_s

    def tokens_per_s(self) -> float | None:
        if not self.tracker.samples:
            return None
        now = self.tracker.samples[-1].at_s
        rate = self.tracker.rate(now, self.settings)
        return round(rate, 2) if rate is not None else None

    def baseline(self) -> float | None:
        value = self.baseline_state.tokens_per_s(self.settings)
        return round(value, 2) if value is not None else None

    def memory(self) -> tuple[int | None, int | None]:
        return (self.tree.rss_bytes if self.tree else None), self.gpu_bytes

    def traffic_recent(self, now_s: float, interval_s: float) -> bool:
        return self.in_flight > 0 or (self.last_traffic_s is not None and now_s - self.last_traffic_s < interval_s)


def _confirmed_stopped(root: psutil.Process) -> bool:
    """Stopped for the whole confirmation time (blocking; worker thread)."""
    import time

    end = time.monotonic() + STOP_CONFIRM_S
    try:
        while time.monotonic() < end:
            if root.status() != psutil.STATUS_STOPPED:
                return False
            time.sleep(0.007)  # short and odd, so a periodic SIGSTOP duty cycle cannot alias with it
    except psutil.Error:
        return False
    return True


class TreeWatch:
    """The monitor's blocking reads of one engine, done in one worker-thread call per tick.

    Each :meth:`tick` reads the root's status (cheap), polls the engine's log, and walks the whole
    tree only when asked to (``full``) or when the root looks stopped. Between walks the last walk's
    reading (pids, RSS) stands; its ``stopped``/``zombie`` are always those of this tick.
    Only the root's stop counts as a hang (confirmed over ``STOP_CONFIRM_S``), as before: a stopped
    helper process of the engine does not by itself stop generation.
    """

    def __init__(self, proc: EngineProcess, log_tail: LogTail | None) -> None:
        self.proc = proc
        self.log_tail = log_tail
        self.tree: ProcessTreeReading | None = None
        self.full_walks = 0
        self._root: psutil.Process | None = None

    def tick(self, now_s: float, full: bool) -> ProcessTreeReading:
        """Raises ProbeError (ProcessGone) when the root is gone."""
        if self.log_tail is not None:
            try:
                self.log_tail.poll()
            except OSError:
                pass  # a log that cannot be read now is read on the next tick
        status = self._root_status()
        looks_stopped = status == psutil.STATUS_STOPPED
        zombie = status == psutil.STATUS_ZOMBIE
        if full or looks_stopped or self.tree is None:
            self.tree = read_process_tree(self.proc.pid, now_s)
            self.full_walks += 1
            self._remember(self.tree.pids[1:])
        stopped = looks_stopped and self._root is not None and _confirmed_stopped(self._root)
        tree = self.tree
        if tree.stopped != stopped or tree.zombie != zombie:
            tree = dataclasses.replace(tree, stopped=stopped, zombie=zombie)
        return tree

    def _remember(self, pids: tuple[int, ...]) -> None:
        """Record the descendants just seen for the stop sweep (as EngineProcess.remember_descendants
        does, without walking the process table a second time)."""
        for pid in pids:
            try:
                self.proc.known_descendants.add((pid, psutil.Process(pid).create_time()))
            except psutil.Error:
                pass

    def _root_status(self) -> str:
        try:
            if self._root is None:
                self._root = psutil.Process(self.proc.pid)
            return self._root.status()
        except psutil.NoSuchProcess as exc:
            raise ProcessGone(self.proc.pid) from exc
        except psutil.AccessDenied as exc:
            raise ProbeError(f"process {self.proc.pid} belongs to another user; cannot read it") from exc


async def monitor(daemon: Daemon, sup: EngineSupervisor, gen: int, proc: EngineProcess) -> None:
    """Watch a serving engine until its generation ends (the supervisor cancels this task)."""
    from supervisord_llm.supervisor import EngineState, HealthVerdict

    cfg = sup.config
    health: EngineHealth = sup.health
    clock = daemon.clock
    interval = daemon.config.probes.process_interval_s
    hang_restart_after = daemon.config.restart.hang_restart_after_s
    last_canary_s = clock.now()  # the readiness canary just ran
    last_counters_s = 0.0
    last_descendants_s = 0.0
    canary_running = False
    stalled_canary: CanaryReading | None = None
    restart_requested = False
    degraded_restart_requested = False

    async def run_canary() -> None:
        nonlocal canary_running, stalled_canary, last_canary_s
        try:
            reading = await sup.adapter.canary(daemon.http, stall_s=cfg.stall_s, timeout_s=cfg.canary_timeout_s)
        finally:
            canary_running = False
            last_canary_s = clock.now()
        sup._record_canary(reading)
        daemon.events.emit("probe.canary", engine=sup.name, ok=reading.ok, ttft_s=reading.ttft_s,
                           tokens_per_s=reading.tokens_per_s, stalled=reading.stalled, error=reading.error) \
            if not reading.ok else None
        if reading.stalled:
            stalled_canary = reading
        elif reading.ok:
            stalled_canary = None
            if reading.tokens_per_s:
                health.add_sample(ThroughputSample(at_s=clock.now(), tokens_per_s=reading.tokens_per_s,
                                                   source="canary", tokens=reading.completion_tokens or 0))

    watch = TreeWatch(proc, sup.log_tail)
    full_every_s = daemon.config.probes.interval_s
    async with anyio.create_task_group() as tg:
        while proc.running:
            now = clock.now()
            # Process state: a stopped (SIGSTOP) or zombie root means no generation can happen.
            # The whole tree (memory, descendants to sweep later) only every probe interval.
            full = now - last_descendants_s >= full_every_s
            if full:
                last_descendants_s = now
            try:
                tree = await anyio.to_thread.run_sync(watch.tick, now, full)
            except ProbeError:
                break  # gone: the exit watcher reports it
            health.tree = tree
            for ext in daemon.extensions:
                if hasattr(ext, "engine_gpu_bytes"):
                    health.gpu_bytes = ext.engine_gpu_bytes(tree.pids)
            if full:
                for ext in daemon.extensions:
                    if hasattr(ext, "on_engine_memory"):
                        ext.on_engine_memory(sup, gen, tree, health.gpu_bytes)

            # Counters (vLLM, llama.cpp, SGLang /metrics; oMLX /api/status).
            if sup.adapter.counters_kind and now - last_counters_s >= daemon.config.probes.interval_s:
                last_counters_s = now
                try:
                    counters = await sup.adapter.counters(daemon.http, now)
                except Exception as exc:  # a probe failure is an observation, not a crash
                    counters = None
                    daemon.log.debug("probe.failed", probe="counters", engine=sup.name, error=str(exc))
                if counters is not None:
                    if health.counters and counters.generated_tokens_total is not None:
                        prev = health.counters[-1]
                        if prev.generated_tokens_total is not None and counters.at_s > prev.at_s:
                            delta = counters.generated_tokens_total - prev.generated_tokens_total
                            if delta > 0:
                                health.add_sample(ThroughputSample(
                                    at_s=now, tokens_per_s=delta / (counters.at_s - prev.at_s),
                                    source="metrics", tokens=int(delta)))
                                health.last_traffic_s = now
                    elif counters.tokens_per_s:
                        health.add_sample(ThroughputSample(at_s=now, tokens_per_s=counters.tokens_per_s,
                                                           source="metrics"))
                    health.counters.append(counters)

            # Canary: only when no real traffic proves generation; more often while hung.
            hung_now = sup.state == EngineState.HUNG
            canary_every = 2.0 if hung_now else cfg.canary_interval_s
            if (not canary_running and now - last_canary_s >= canary_every
                    and (hung_now or not health.traffic_recent(now, cfg.canary_interval_s))):
                canary_running = True
                tg.start_soon(run_canary)

            # Verdicts.
            verdict = assess_hung(stalled_canary, tree, list(health.counters), cfg.stall_s, now)
            reason = verdict.reason
            if not verdict.hung and health.stall_reason:
                reason = health.stall_reason
            if verdict.hung or health.stall_reason:
                if health.hung_since_s is None:
                    health.hung_since_s = now
                    sup.post(HealthVerdict(gen, "hung", reason or "hung"))
                elif not restart_requested and now - health.hung_since_s >= hang_restart_after:
                    restart_requested = True
                    sup.post(HealthVerdict(gen, "hang_restart", reason or "hung"))
            elif health.hung_since_s is not None:
                health.hung_since_s = None
                restart_requested = False
                sup.post(HealthVerdict(gen, "ok", "generating again"))

            healthy = sup.state == EngineState.READY
            health.baseline_state = learn_baseline(health.baseline_state, health.tracker.samples, health.settings,
                                                   now, healthy=healthy)
            assessment = assess_degraded(health.tracker.samples, health.baseline(), health.settings, now)
            if assessment.degraded and sup.state == EngineState.READY:
                health.degraded = True
                sup.post(HealthVerdict(gen, "degraded", assessment.reason))
            elif assessment.recovered and sup.state == EngineState.DEGRADED:
                health.degraded = False
                degraded_restart_requested = False
                sup.post(HealthVerdict(gen, "ok", f"throughput recovered: {assessment.reason}"))
            elif (sup.state == EngineState.DEGRADED and daemon.config.degraded.restart_when_idle
                  and not degraded_restart_requested and health.in_flight == 0):
                degraded_restart_requested = True
                sup.post(HealthVerdict(gen, "degraded_restart", assessment.reason))
            await anyio.sleep(interval)
        tg.cancel_scope.cancel()


def health_settings(daemon: Daemon) -> HealthSettings:
    d = daemon.config.degraded
    return HealthSettings(window_s=d.window_s, degraded_share=d.share, degraded_windows=d.windows)


def baseline_from_record(record: Any) -> ThroughputBaseline:
    if not isinstance(record, dict):
        return ThroughputBaseline()
    rates = record.get("window_rates")
    if not isinstance(rates, list) or not all(isinstance(r, (int, float)) for r in rates):
        return ThroughputBaseline()
    return ThroughputBaseline(window_rates=tuple(float(r) for r in rates), last_window_end_s=None)


def baseline_record(baseline: ThroughputBaseline) -> dict[str, Any]:
    return {"window_rates": list(baseline.window_rates)}
