"""The per-engine watchdog: runs the probes for one serving engine and turns readings into verdicts.

Room: engine.

The decisions are the pure functions in ``policies.health``; this module does the I/O (process
tree, canaries, engine counters) on a schedule and posts verdicts to the engine's supervisor, which
alone changes state. Probe cost is kept low, because an idle daemon should cost next to nothing:
each ``process_interval`` (1 s) one worker-thread hop reads the engine's root process status (one
``/proc/<pid>/stat`` read; a SIGSTOPped or zombie root is what a hang looks like from outside) and
the new lines of its log; the whole process tree (RSS, descendants) is walked only every
``probes.interval`` (5 s) or when the root looks stopped. Canaries run only when no real traffic
flowed for ``canary_interval``, counters every probe interval.

Hung follows the evidence rule (``policies.health.assess_progress``): progress is what the engine
itself shows (tokens read from it on live streams by the gateway, successful canaries, per-step
counters, its prefill progress lines); any of it clears a stall verdict at once. A lazy engine whose
model its own keep-alive unloaded gets no canary (that would reload it and hold it resident); its
liveness and its next real request judge it, and a canary to it allows ``load_timeout`` for the load.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import httpx
import psutil

from policies.actions import Restart
from policies.health import (
    MAX_BAND,
    DegradedAssessment,
    HealthSettings,
    ProgressEvidence,
    ProgressVerdict,
    Silence,
    ThroughputBaseline,
    ThroughputTracker,
    assess_degraded,
    assess_progress,
    band_label,
    canary_due,
    canary_sample_rate,
    decide_degraded_restart,
    decide_hang_restart,
    decode_rate_sample,
    hang_cleared,
    hang_episode_since,
    hang_relapse_may_follow,
    learn_baseline,
    prefill_beside,
    progress_or_busy_s,
    requests_beside,
    sample_concurrency,
    steps_advanced,
)
from probes.errors import ProbeError
from probes.process import ProcessGone, read_process_tree
from probes.readings import EngineCounters, ProcessTreeReading, ThroughputSample
from supervisord_llm.clock import Clock
from supervisord_llm.config import Config
from supervisord_llm.events import EventLog

if TYPE_CHECKING:
    from supervisord_llm.engine.process import EngineProcess, LogTail
    from supervisord_llm.engine.supervisor import EngineSupervisor

IN_FLIGHT_CHANGES = 65536  # two per request: at most the last 32768 requests' starts and ends
IN_FLIGHT_KEPT_S = 3600.0  # and none older than a decode needs
STOP_CONFIRM_S = 1.0  # a SIGSTOP duty cycle (slow engine) must not read as a hang


class MonitorHost(Protocol):
    """**Protocol:** what the watchdog needs from the daemon: clock, config, HTTP client, events, GPU memory."""

    clock: Clock
    config: Config
    http: httpx.AsyncClient
    events: EventLog
    log: Any

    def engine_gpu_bytes(self, pids: tuple[int, ...]) -> int | None: ...

    def on_engine_memory(self, sup: EngineSupervisor, gen: int, tree: ProcessTreeReading,
                         gpu_bytes: int | None) -> None: ...


class EngineHealth:
    """What the watchdog knows about one engine: throughput, baseline, memory, traffic."""

    def __init__(self, settings: HealthSettings, baseline: ThroughputBaseline) -> None:
        self.settings = settings
        self.tracker = ThroughputTracker()
        self.baseline_state = baseline
        self.tree: ProcessTreeReading | None = None
        self.gpu_bytes: int | None = None
        self.in_flight = 0
        # Where in_flight changed: (monotonic s, count from then on), for a stream's mean concurrency.
        self.in_flight_changes: deque[tuple[float, int]] = deque([(0.0, 0)], maxlen=IN_FLIGHT_CHANGES)
        self.assessment: DegradedAssessment | None = None  # the last degraded check
        self.last_traffic_s: float | None = None
        self.counters: deque[EngineCounters] = deque(maxlen=120)
        self.last_rate: float | None = None
        self.hung_since_s: float | None = None
        self.degraded = False
        self.draining: str | None = None  # set by the memory guard: why no new requests are routed here
        # Requests with a long prompt (policies.health.prefill_counts) the gateway has in prefill to this
        # engine now, and when the last such prefill ended (the gateway's clock, which is this one): a counter
        # interval either touched gives no decode sample (policies.health.prefill_beside). Kept across a
        # new run of the engine: the gateway reports its requests' ends as they come.
        self.gateway_in_prefill = 0
        self.gateway_prefill_end_s: float | None = None
        # Counter intervals (vLLM, SGLang) taken as decode samples, and those left out because a long prompt
        # was prefilled in them, with the last reason: status shows them, so a check that sees nothing but
        # prefill (a steady load of long prompts) is not silently blind.
        self.counter_samples_taken = 0
        self.counter_samples_left_out = 0
        self.counter_left_out_reason: str | None = None
        self._clear_progress()

    def _clear_progress(self) -> None:
        # Engine-side progress of this run, by source (monotonic seconds), and silence evidence.
        self.watch_since_s: float | None = None
        self.last_token_s: float | None = None
        self.last_canary_ok_s: float | None = None
        self.last_prefill_s: float | None = None
        self.last_counter_advance_s: float | None = None
        self.silences: deque[Silence] = deque(maxlen=16)
        self.model_resident: bool | None = None  # lazy engines: the engine's own word, else None
        self.loading_since_s: float | None = None
        self.loading_until_s = 0.0
        self.verdict: ProgressVerdict | None = None

    def progress_s(self, now_s: float) -> float | None:
        """The engine's latest progress from any source (cheap: the gateway asks per stream tick).

        While a lazy engine loads its model (up to its load deadline) it is busy, not silent: a
        stream waiting for its first token meanwhile is not stalled."""
        return progress_or_busy_s(self.last_token_s, self.last_canary_ok_s, self.last_prefill_s,
                                  self.last_counter_advance_s,
                                  loading=self.loading_since_s is not None and now_s < self.loading_until_s,
                                  now_s=now_s)

    def watchdog(self, now_s: float) -> dict[str, Any]:
        """What status shows of the watchdog: phase, and the evidence of the last verdict."""
        v = self.verdict
        if v is None:
            return {"phase": None}
        last = v.last_progress_s
        doc: dict[str, Any] = {"phase": v.phase, "evidence": v.evidence() if v.hung else None,
               "last_progress": {"source": v.last_progress_source,
                                 "silent_s": None if last is None else round(now_s - last, 1)},
               "model_resident": self.model_resident}
        if self.counter_samples_taken or self.counter_samples_left_out:
            doc["counter_samples"] = {"taken": self.counter_samples_taken,
                                      "left_out_for_prefill": self.counter_samples_left_out,
                                      "last_left_out": self.counter_left_out_reason}
        return doc

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
        self.degraded = False
        self.assessment = None
        self.draining = None
        self._clear_progress()

    def add_sample(self, sample: ThroughputSample) -> None:
        self.tracker = self.tracker.add(sample, self.settings)
        self.last_rate = sample.tokens_per_s

    def tokens_per_s(self) -> float | None:
        """One request's decode rate in the last window, as the degraded check judged it; None when the
        last window had nothing it could judge (no traffic, say). Before any baseline is learned, the
        rate of the last window with samples."""
        if self.assessment is not None and self.assessment.baseline_tokens_per_s is not None:
            rate = self.assessment.rate_tokens_per_s
            return round(rate, 2) if rate is not None else None
        if self.baseline_state.learned(self.settings):
            return None  # judged before, nothing to judge in the last window
        if not self.tracker.samples:  # nothing learned yet: the last samples' rate, all concurrencies together
            return None
        now = self.tracker.samples[-1].at_s
        rate = self.tracker.rate(now, self.settings)
        return round(rate, 2) if rate is not None else None

    def judged_concurrency(self) -> str | None:
        """The concurrency band ("1", "9-16", ...) the last window was judged at."""
        return self.assessment.band if self.assessment is not None else None

    def baseline(self) -> float | None:
        """What that rate was judged against; with no judgement, the lone request's baseline (or the
        fewest concurrent requests' learned)."""
        if self.assessment is not None and self.assessment.baseline_tokens_per_s is not None:
            return round(self.assessment.baseline_tokens_per_s, 2)
        learned = self.baseline_state.learned(self.settings)
        if not learned:
            return None
        return round(learned[min(learned)], 2)

    def baselines(self) -> dict[str, float]:
        """Every learned baseline by the number of concurrent requests it was learned at ("1", "3-4", ...)."""
        return {band_label(b): round(v, 2) for b, v in sorted(self.baseline_state.learned(self.settings).items())}

    def _in_flight_changed(self, now_s: float) -> None:
        changes = self.in_flight_changes
        changes.append((now_s, self.in_flight))
        while len(changes) > 2 and changes[1][0] < now_s - IN_FLIGHT_KEPT_S:
            changes.popleft()  # the first kept entry still says what held from before the horizon

    def request_started(self, now_s: float) -> None:
        self.in_flight += 1
        self._in_flight_changed(now_s)
        self.last_traffic_s = now_s

    def request_finished(self, now_s: float, decode_s: float | None, through_gateway: float | None = None) -> int:
        """Count a request's end; the number of requests the engine ran during its decode (at least 1;
        ``through_gateway``: the gateway's own mean over the part of it its rate comes from)."""
        concurrency = sample_concurrency(self.in_flight_changes, self.counters, now_s - (decode_s or 0.0), now_s,
                                         in_flight_now=self.in_flight, through_gateway=through_gateway)
        self.in_flight = max(0, self.in_flight - 1)
        self._in_flight_changed(now_s)
        self.last_traffic_s = now_s
        return concurrency

    def prefill_changed(self, in_prefill: int, at_s: float) -> None:
        """The gateway has ``in_prefill`` long-prompt requests in prefill to this engine since ``at_s``; one
        fewer than before means one's prefill ended then."""
        if in_prefill < self.gateway_in_prefill:
            self.gateway_prefill_end_s = max(at_s, self.gateway_prefill_end_s or at_s)
        self.gateway_in_prefill = max(0, in_prefill)

    def memory(self) -> tuple[int | None, int | None]:
        return (self.tree.rss_bytes if self.tree else None), self.gpu_bytes


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
        self.new_lines: list[str] = []  # log lines read by the last tick
        self._root: psutil.Process | None = None

    def tick(self, now_s: float, full: bool) -> ProcessTreeReading:
        """Raises ProbeError (ProcessGone) when the root is gone."""
        self.new_lines = []
        if self.log_tail is not None:
            try:
                self.new_lines = self.log_tail.poll()
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


async def monitor(daemon: MonitorHost, sup: EngineSupervisor, gen: int, proc: EngineProcess) -> None:
    """Watch a serving engine until its generation ends (the supervisor cancels this task)."""
    from supervisord_llm.engine.supervisor import EngineState, HealthVerdict, Verdict

    cfg = sup.config
    health: EngineHealth = sup.health
    clock = daemon.clock
    interval = daemon.config.probes.process_interval_s
    hang_restart_after = daemon.config.restart.hang_restart_after_s
    last_canary_s = clock.now()  # the readiness canary just ran
    last_counters_s = 0.0
    last_descendants_s = 0.0
    canary_running = False
    restart_requested = False
    degraded_restart_requested = False
    adapter = sup.adapter
    per_step = adapter.progress_counter == "per_step"
    health.watch_since_s = clock.now()
    # The start check just saw the engine generate (its own canary, or its counters while it waited).
    health.last_canary_ok_s = health.watch_since_s
    last_verdict: tuple[bool, str | None] = (False, None)
    hung_verdict = ProgressVerdict(True, "hung")  # the verdict that called it hung (kept until it is cleared)
    last_hang: tuple[float, float] | None = None  # the last hang's (episode start, clearing): a relapse continues it
    episode_since_s = 0.0  # when the hang episode began (a relapse: its first hang); hung_since_s is this hang's

    async def run_canary(started_s: float) -> None:
        nonlocal canary_running, last_canary_s
        stall_s, timeout_s = cfg.stall_s, cfg.canary_timeout_s
        if adapter.lazy_loads_model and health.model_resident is not True:
            # The canary may be what loads the model: its first token waits for the load.
            stall_s, timeout_s = max(stall_s, cfg.load_timeout_s), timeout_s + cfg.load_timeout_s
            health.loading_since_s = clock.now()
            health.loading_until_s = health.loading_since_s + stall_s
        try:
            reading = await adapter.canary(daemon.http, stall_s=stall_s, timeout_s=timeout_s)
        finally:
            canary_running = False
            health.loading_since_s = None
            last_canary_s = clock.now()
        sup.record_canary(reading)
        daemon.events.emit("probe.canary", engine=sup.name, ok=reading.ok, ttft_s=reading.ttft_s,
                           tokens_per_s=reading.tokens_per_s, stalled=reading.stalled, error=reading.error) \
            if not reading.ok else None
        if reading.stalled:
            waited_s = reading.duration_s if reading.duration_s is not None else clock.now() - started_s
            health.silences.append(Silence("canary", since_s=started_s, at_s=clock.now(),
                                           detail=f"a canary got no token within {waited_s:.0f}s"))
        elif reading.ok:
            health.last_canary_ok_s = clock.now()
            others = requests_beside(health.in_flight_changes, started_s, clock.now())
            if (rate := canary_sample_rate(reading.tokens_per_s, reading.decode_s, others)) is not None:
                health.add_sample(ThroughputSample(at_s=clock.now(), tokens_per_s=rate,
                                                   source="canary", tokens=reading.completion_tokens or 0,
                                                   concurrency=sample_concurrency(
                                                       health.in_flight_changes, health.counters, started_s,
                                                       clock.now(), in_flight_now=health.in_flight,
                                                       beside_gateway=True)))

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
            prefill_re = adapter.prefill_progress_re
            if prefill_re is not None and any(prefill_re.search(line) for line in watch.new_lines):
                health.last_prefill_s = now
            health.gpu_bytes = daemon.engine_gpu_bytes(tree.pids)
            if full:
                daemon.on_engine_memory(sup, gen, tree, health.gpu_bytes)

            # Counters (vLLM, llama.cpp, SGLang /metrics; oMLX /api/status).
            if sup.adapter.counters_kind and now - last_counters_s >= daemon.config.probes.interval_s:
                last_counters_s = now
                try:
                    counters = await sup.adapter.counters(daemon.http, now)
                except Exception as exc:  # a probe failure is an observation, not a crash
                    counters = None
                    daemon.log.debug("probe.failed", probe="counters", engine=sup.name, error=str(exc))
                if counters is not None:
                    if per_step and health.counters and steps_advanced(health.counters[-1], counters):
                        health.last_counter_advance_s = now
                    if health.counters:
                        prev = health.counters[-1]
                        sample = decode_rate_sample(prev, counters, adapter.decode_token_total,
                                                    in_prefill=health.gateway_in_prefill,
                                                    last_prefill_end_s=health.gateway_prefill_end_s,
                                                    prompt_counted_per_chunk=adapter.prompt_counted_per_chunk)
                        if sample is not None:
                            health.add_sample(dataclasses.replace(sample, at_s=now))
                            health.counter_samples_taken += 1
                        elif adapter.decode_token_total:
                            left_out = prefill_beside(prev, counters, health.gateway_in_prefill,
                                                      health.gateway_prefill_end_s,
                                                      prompt_counted_per_chunk=adapter.prompt_counted_per_chunk)
                            if left_out is not None:
                                health.counter_samples_left_out += 1
                                health.counter_left_out_reason = left_out
                        if (prev.generated_tokens_total is not None and counters.generated_tokens_total is not None
                                and counters.generated_tokens_total > prev.generated_tokens_total):
                            health.last_traffic_s = now
                    health.counters.append(counters)

            # A lazy engine says whether its model is in memory; unloaded by its own keep-alive, it
            # gets no canary (that would reload it and keep it resident against its TTL).
            if adapter.lazy_loads_model and full:
                health.model_resident = await adapter.model_resident(daemon.http)
            requests_loading = (adapter.lazy_loads_model and health.model_resident is False
                                and health.in_flight > 0)
            if requests_loading and health.loading_since_s is None:
                health.loading_since_s = now
                health.loading_until_s = now + max(cfg.load_timeout_s, cfg.stall_s)
            elif not requests_loading and not canary_running:
                health.loading_since_s = None
            loading = health.loading_since_s is not None and now < health.loading_until_s

            # Canary: only when no real traffic proves generation; more often while hung.
            if canary_due(now, last_canary_s, cfg.canary_interval_s, running=canary_running,
                          hung=sup.state == EngineState.HUNG,
                          unloaded=adapter.lazy_loads_model and health.model_resident is False,
                          in_flight=health.in_flight, last_traffic_s=health.last_traffic_s):
                canary_running = True
                tg.start_soon(run_canary, clock.now())  # its start: a request noted from now on ran beside it

            # Verdict: hung only on the engine's own silence, with the evidence named.
            evidence = ProgressEvidence(
                watch_since_s=health.watch_since_s, last_token_s=health.last_token_s,
                last_canary_ok_s=health.last_canary_ok_s, last_prefill_s=health.last_prefill_s,
                silences=tuple(health.silences), counters=tuple(health.counters) if per_step else (),
                counters_per_step=per_step, gauge_stale_s=adapter.running_gauge_stale_s,
                counter_silence=adapter.counter_silence,
                process_stopped=tree.stopped, zombie=tree.zombie, root_pid=tree.root_pid,
                loading=loading)
            verdict = assess_progress(evidence, cfg.stall_s, now)
            health.verdict = verdict
            if (verdict.hung, verdict.source) != last_verdict:
                last_verdict = (verdict.hung, verdict.source)
                daemon.events.emit("policy.decided", policy="hung", engine=sup.name,
                                   decision="hung" if verdict.hung else "not_hung", phase=verdict.phase,
                                   reason=verdict.reason, **verdict.evidence(),
                                   stall_s=cfg.stall_s, process_stopped=tree.stopped, zombie=tree.zombie,
                                   loading=evidence.loading, counters_per_step=per_step)
            still_hung = (health.hung_since_s is not None
                          and not hang_cleared(health.hung_since_s, verdict, hung_verdict.source))
            if verdict.hung or still_hung:
                if verdict.hung:  # the evidence of the hang; kept while a verdict that is not hung clears nothing
                    hung_verdict = verdict
                reason = hung_verdict.reason or "hung"
                if health.hung_since_s is None:
                    # This hang's progress is judged from now (hang_cleared); its restart from its episode's start.
                    health.hung_since_s = now
                    episode_since_s = hang_episode_since(
                        now, last_since_s=last_hang[0] if last_hang else None,
                        cleared_at_s=last_hang[1] if last_hang else None, stall_s=cfg.stall_s)
                    sup.post(HealthVerdict(gen, Verdict.HUNG, reason, hung_verdict.evidence()))
                else:
                    decision = decide_hang_restart(sup.name, episode_since_s, now, hang_restart_after,
                                                   already_requested=restart_requested, reason=reason)
                    if isinstance(decision, Restart):
                        restart_requested = True
                        daemon.events.emit("policy.decided", policy="hang_restart", engine=sup.name,
                                           decision="restart", hung_for_s=round(now - episode_since_s, 3),
                                           hang_restart_after_s=hang_restart_after, message=decision.reason)
                        sup.post(HealthVerdict(gen, Verdict.HANG_RESTART, decision.reason, hung_verdict.evidence()))
            elif health.hung_since_s is not None:
                # Only a hang a canary or a counter cleared may come back as the same one; real tokens end it.
                last_hang = ((episode_since_s, now) if hang_relapse_may_follow(verdict.last_progress_source)
                             else None)
                health.hung_since_s = None
                restart_requested = False
                health.silences.clear()
                sup.post(HealthVerdict(gen, Verdict.OK, f"generating again ({verdict.last_progress_source} progress)",
                                       {"last_progress": verdict.last_progress_source}))

            healthy = sup.state == EngineState.READY
            health.baseline_state = learn_baseline(health.baseline_state, health.tracker.samples, health.settings,
                                                   now, healthy=healthy)
            assessment = assess_degraded(health.tracker.samples, health.baseline_state, health.settings, now)
            health.assessment = assessment
            if assessment.degraded and sup.state == EngineState.READY:
                health.degraded = True
                sup.post(HealthVerdict(gen, Verdict.DEGRADED, assessment.reason))
            elif assessment.recovered and sup.state == EngineState.DEGRADED:
                health.degraded = False
                degraded_restart_requested = False
                sup.post(HealthVerdict(gen, Verdict.OK, f"throughput recovered: {assessment.reason}"))
            elif isinstance(restart := decide_degraded_restart(
                    sup.name, sup.state == EngineState.DEGRADED, health.settings.restart_when_idle,
                    health.in_flight, already_requested=degraded_restart_requested, reason=assessment.reason),
                    Restart):
                degraded_restart_requested = True
                daemon.events.emit("policy.decided", policy="degraded_restart", engine=sup.name, decision="restart",
                                   in_flight=health.in_flight, message=restart.reason)
                sup.post(HealthVerdict(gen, Verdict.DEGRADED_RESTART, restart.reason))
            await anyio.sleep(interval)
        tg.cancel_scope.cancel()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def baseline_from_record(record: Any) -> ThroughputBaseline:
    """A persisted baseline: ``window_rates`` and ``window_totals`` as [concurrency band, rate] pairs. A list
    of bare rates (a state file from before concurrency bands) is dropped and learned again: those rates
    mixed lone requests with engine-wide totals, so as a lone request's baseline they would read as a
    slowdown. So are malformed rates (each must be a finite number above zero in a known band); malformed
    totals are dropped alone."""
    if not isinstance(record, dict):
        return ThroughputBaseline()
    rates = _band_pairs(record.get("window_rates"))
    if rates is None:
        return ThroughputBaseline()
    # totals that are missing or malformed are dropped alone: the rates are judged by themselves then
    totals = _band_pairs(record.get("window_totals", [])) or ()
    return ThroughputBaseline(window_rates=rates, window_totals=totals, last_window_end_s=None)


def _band_pairs(value: Any) -> tuple[tuple[int, float], ...] | None:
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 2 and _band(r[0]) and _number(r[1]) and math.isfinite(r[1])
            and r[1] > 0 for r in value):
        return None
    return tuple((int(b), float(r)) for b, r in value)


def _band(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BAND


def baseline_record(baseline: ThroughputBaseline) -> dict[str, Any]:
    return {"window_rates": [[band, rate] for band, rate in baseline.window_rates],
            "window_totals": [[band, total] for band, total in baseline.window_totals]}
