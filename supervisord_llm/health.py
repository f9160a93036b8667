"""The per-engine watchdog: runs the probes for one serving engine and turns readings into verdicts.

The decisions are the pure functions in ``policies.health``; this module does the I/O (process
tree, canaries, engine counters) on a schedule and posts verdicts to the engine's supervisor, which
alone changes state. Probe cost is kept low: the process tree is read once a second in a worker
thread, canaries run only when no real traffic flowed for ``canary_interval``, counters every
probe interval.
"""

from __future__ import annotations

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
from probes.process import read_process_tree
from probes.readings import CanaryReading, EngineCounters, ProcessTreeReading, ThroughputSample

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.process import EngineProcess
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


def _confirmed_stopped(pid: int) -> bool:
    """Stopped for the whole confirmation time (blocking; worker thread)."""
    import time

    end = time.monotonic() + STOP_CONFIRM_S
    try:
        proc = psutil.Process(pid)
        while time.monotonic() < end:
            if proc.status() != psutil.STATUS_STOPPED:
                return False
            time.sleep(0.007)  # short and odd, so a periodic SIGSTOP duty cycle cannot alias with it
    except psutil.Error:
        return False
    return True


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

    async with anyio.create_task_group() as tg:
        while proc.running:
            now = clock.now()
            # Process state: stopped (SIGSTOP) or zombie means no generation can happen.
            try:
                tree = await anyio.to_thread.run_sync(read_process_tree, proc.pid, now)
            except ProbeError:
                break  # gone: the exit watcher reports it
            if tree.stopped:
                confirmed = await anyio.to_thread.run_sync(_confirmed_stopped, proc.pid)
                if not confirmed:
                    tree = ProcessTreeReading(at_s=tree.at_s, root_pid=tree.root_pid, pids=tree.pids,
                                              rss_bytes=tree.rss_bytes, cpu_percent=tree.cpu_percent,
                                              stopped=False, zombie=tree.zombie)
            health.tree = tree
            for ext in daemon.extensions:
                if hasattr(ext, "engine_gpu_bytes"):
                    health.gpu_bytes = ext.engine_gpu_bytes(tree.pids)
            if now - last_descendants_s >= daemon.config.probes.interval_s:
                last_descendants_s = now
                await anyio.to_thread.run_sync(proc.remember_descendants)

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
