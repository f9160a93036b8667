"""The memory guard, carried out for the daemon: watermarks, drain, restart, learned peaks.

The decisions are ``policies.memory_guard``; this module feeds them each engine's memory reading
(taken with the other per-engine probes, on every full tree walk of the watchdog) and each
machine memory reading, carries out what they return and logs every decision that changes
something as ``policy.decided`` with its inputs. What it needs from the daemon is narrow: the
clock, events, alerts, persistence, the supervisors (to read in-flight counts and post a
restart verdict) and the engines' configured footprints.

Drain: the engine's ``health.draining`` holds the reason; the gateway answers new requests for it
with 503 (``draining``) while in-flight ones finish, for up to ``drain_grace``; then the
supervisor gets a ``memory_restart`` verdict and stops the engine gracefully as a failure, so the
restart goes through the normal backoff (the 60 s floor between spawns holds, and a model that
keeps outgrowing its footprint ends in ``failed`` with an alert instead of a loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from policies import memory_guard as policy
from policies.actions import Alert, Drain, Restart
from probes.footprint import engine_memory_reading
from probes.readings import EngineMemoryReading, ProcessTreeReading, SystemMemoryReading
from supervisord_llm.extension import Extension

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.engine.supervisor import EngineSupervisor

DRAIN_POLL_S = 0.2
PERSIST_GROWTH = 1.05  # a learned peak is written to the state file when it grew by 5%
AUTO_RUNTIME_BYTES = 10**9  # added to a footprint = "auto" estimate for the watermarks only


# Flags through which an engine bounds its own cache (the guard only notices growth after it
# happened; a cap keeps it from happening). Sources: mlx_lm/server.py 0.32 (--prompt-cache-bytes:
# the prompt-cache LRU is trimmed to that many bytes after each request; --max-kv-size belongs to
# mlx_lm.generate/chat/cache_prompt and the server's argparse rejects it), llama.cpp tools/server
# (-c/--ctx-size: the KV cache is allocated for that context up front), vllm/engine/arg_utils.py
# (--gpu-memory-utilization, 0.9 when not given), sglang/srt/server_args.py (--mem-fraction-static).
CACHE_CAP_FLAGS: dict[str, tuple[str, ...]] = {
    "mlx_lm": ("--prompt-cache-bytes",),
    "llama_cpp": ("-c", "--ctx-size"),
    "vllm": ("--gpu-memory-utilization",),
    "sglang": ("--mem-fraction-static",),
}


def cache_cap_flag(kind: str, argv: tuple[str, ...] | list[str]) -> str | None:
    """The engine-side cache cap an argv sets, if any (``--flag value`` or ``--flag=value``)."""
    flags = CACHE_CAP_FLAGS.get(kind, ())
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in flags:
            return name
    return None


@dataclass
class _Engine:
    state: policy.GuardState = field(default_factory=policy.GuardState)
    peaks: policy.PeakHistory = field(default_factory=policy.PeakHistory)
    gen: int | None = None
    reading: EngineMemoryReading | None = None
    marks: policy.Watermarks | None = None
    verdict: str = "ok"
    persisted_learned_bytes: int = 0
    # GPU memory (NVML, summed over the engine's devices) has its own watermarks and episode.
    gpu_state: policy.GuardState = field(default_factory=policy.GuardState)
    gpu_marks: policy.Watermarks | None = None
    gpu_verdict: str = "ok"


class MemoryGuardExtension(Extension):
    name = "memory_guard"

    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.config.memory_guard
        self.daemon = daemon
        self.enabled = cfg.enabled
        self.settings = cfg.guard  # the config builds the policy's settings object
        self.engines: dict[str, _Engine] = {e.name: _Engine() for e in daemon.config.engines}
        self._machine_decision = ""
        self._tg: anyio.abc.TaskGroup | None = None
        daemon.memory_guard = self

    # ---- persistence ------------------------------------------------------------------------

    def restore(self, saved: dict[str, Any]) -> None:
        from supervisord_llm.daemon import model_key

        engines = saved.get("engines")
        if not isinstance(engines, dict):
            engines = {}
        for engine in self.daemon.config.engines:
            record = engines.get(engine.name)
            if not isinstance(record, dict) or record.get("model") != model_key(engine):
                continue  # another model under the same name: its peak says nothing about this one
            peaks = record.get("run_peaks_bytes")
            if isinstance(peaks, list) and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0
                                               for p in peaks):
                history = policy.PeakHistory(tuple(peaks[-self.settings.keep_runs:]))
                self.engines[engine.name].peaks = history
                self.engines[engine.name].persisted_learned_bytes = policy.learned_bytes(history)

    def persisted(self) -> dict[str, Any]:
        from supervisord_llm.daemon import model_key

        out = {}
        for engine in self.daemon.config.engines:
            g = self.engines[engine.name]
            if g.peaks.run_peaks_bytes:
                out[engine.name] = {"model": model_key(engine), "run_peaks_bytes": list(g.peaks.run_peaks_bytes)}
        return {"engines": out}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    # ---- what admission and status read ------------------------------------------------------

    def peaks(self, name: str) -> policy.PeakHistory:
        """The engine's learned peaks (what admission counts beside its footprint)."""
        g = self.engines.get(name)
        return g.peaks if g is not None else policy.PeakHistory()

    def contribute_status(self, doc: dict[str, Any]) -> None:
        for e in doc.get("engines", []):
            g = self.engines.get(e.get("name"))
            if g is None:
                continue
            mem = e.setdefault("memory", {})
            current = g.reading if g.gen is not None else None
            mem["phys_footprint_bytes"] = current.phys_footprint_bytes if current else None
            mem["held_bytes"] = current.host_bytes if current and e.get("pid") else None
            mem["peak_bytes"] = g.peaks.run_peaks_bytes[-1] if g.peaks.run_peaks_bytes and e.get("pid") else None
            mem["learned_peak_bytes"] = policy.learned_bytes(g.peaks) or None
            marks = g.marks or self._watermarks(self.daemon.supervisors[e["name"]])
            mem["soft_bytes"] = marks.soft_bytes if marks else None
            mem["hard_bytes"] = marks.hard_bytes if marks else None
            running = bool(e.get("pid"))
            mem["guard"] = "off" if not self.enabled or marks is None else g.verdict if running else None
            gpu_marks = g.gpu_marks or self._gpu_watermarks(self.daemon.supervisors[e["name"]])
            # (null, not absent, without GPU watermarks: schema 1 lists them for every engine)
            mem["gpu_soft_bytes"] = gpu_marks.soft_bytes if gpu_marks is not None else None
            mem["gpu_hard_bytes"] = gpu_marks.hard_bytes if gpu_marks is not None else None
            mem["gpu_guard"] = (None if gpu_marks is None else "off" if not self.enabled
                                else g.gpu_verdict if running else None)

    # ---- per-engine readings (watchdog, every full tree walk) ---------------------------------

    def on_engine_memory(self, sup: EngineSupervisor, gen: int, tree: ProcessTreeReading,
                         gpu_bytes: int | None) -> None:
        g = self.engines[sup.name]
        reading = engine_memory_reading(tree, gpu_bytes)
        if g.gen != gen:
            # A new run: its own episode and its own peak; the previous runs' peaks stay learned.
            g.gen, g.state, g.verdict = gen, policy.GuardState(), "ok"
            g.gpu_state, g.gpu_verdict = policy.GuardState(), "ok"
            g.peaks = policy.new_run(g.peaks, self.settings)
        g.reading = reading
        held = reading.host_bytes
        g.peaks = policy.observe_peak(g.peaks, held, self.settings)
        learned = policy.learned_bytes(g.peaks)
        if learned > max(g.persisted_learned_bytes, 1) * PERSIST_GROWTH:
            g.persisted_learned_bytes = learned
            self.daemon.events.emit("memory.peak_learned", engine=sup.name, peak_bytes=learned)
            self.daemon.persist()
        g.marks = self._watermarks(sup)
        g.gpu_marks = self._gpu_watermarks(sup)
        if not self.enabled:
            return
        now = self.daemon.clock.now()
        if g.marks is not None:
            source = "phys_footprint" if reading.phys_footprint_bytes is not None else "rss"
            decision = policy.decide(sup.name, g.state, held, g.marks, now, self.settings, source=source)
            g.state = decision.state
            if decision.verdict != g.verdict:
                self._log_decision(sup, decision.verdict, "memory", held, source, g.marks, reading)
                # Over hard starts the drain: what follows is "draining" and needs no second entry.
                g.verdict = "draining" if decision.verdict == "over" else decision.verdict
            self._carry_out(sup, gen, decision.actions)
        if g.gpu_marks is not None and gpu_bytes is not None and g.state.draining_since_s is None:
            decision = policy.decide(sup.name, g.gpu_state, gpu_bytes, g.gpu_marks, now, self.settings,
                                     source="nvml", resource="gpu_memory")
            g.gpu_state = decision.state
            if decision.verdict != g.gpu_verdict:
                self._log_decision(sup, decision.verdict, "gpu_memory", gpu_bytes, "nvml", g.gpu_marks, reading)
                g.gpu_verdict = decision.verdict
            if decision.verdict == "over":
                # One drain per run, whichever memory crossed: the host state carries it from here.
                g.state = policy.gpu_drain(g.state, decision, now)
                g.verdict = g.gpu_verdict = "draining"
            self._carry_out(sup, gen, decision.actions)

    def _log_decision(self, sup: EngineSupervisor, verdict: str, resource: str, held: int, source: str,
                      marks: policy.Watermarks, reading: EngineMemoryReading) -> None:
        self.daemon.events.emit(
            "policy.decided", policy="memory_guard", engine=sup.name, decision=verdict, resource=resource,
            held_bytes=held, source=source, rss_bytes=reading.rss_bytes, gpu_bytes=reading.gpu_bytes,
            soft_bytes=marks.soft_bytes, hard_bytes=marks.hard_bytes, footprint_bytes=marks.footprint_bytes,
            capped_by_headroom=marks.capped_by_headroom, in_flight=self._in_flight(sup))

    def _carry_out(self, sup: EngineSupervisor, gen: int, actions: tuple[Alert | Drain, ...]) -> None:
        for action in actions:
            if isinstance(action, Drain) and gen != sup.gen:
                continue  # the reading was of an earlier run: the fresh one is judged on its own readings
            self.daemon.apply(action)  # a Drain comes back to drain() below

    def drain(self, action: Drain) -> bool:
        """The executor's ``Drain``: no new requests for the engine's current run, then a graceful restart."""
        sup = self.daemon.supervisors.get(action.engine)
        if sup is None:
            return False
        self._begin_drain(sup, sup.gen, action)
        return True

    def _guarded_footprint(self, sup: EngineSupervisor) -> int | None:
        """The footprint the watermarks and the machine rule hold the engine to (never the learned peak,
        so a recycled run's peak cannot ratchet its own watermarks up)."""
        base = self.daemon.configured_footprint_bytes(sup)
        if sup.config.footprint_bytes is None and base:
            # "auto" estimates the weights; the engine's runtime (interpreter, Metal/CUDA context) comes on
            # top and is a large share of a small model: without it a healthy small engine would be recycled.
            base += AUTO_RUNTIME_BYTES
        return base

    def _gpu_watermarks(self, sup: EngineSupervisor) -> policy.Watermarks | None:
        """GPU memory the engine may hold over all its devices: gpu_footprint x devices x the factors.

        Only with an explicit gpu_footprint: without it the host footprint split over the devices is an
        admission estimate (CUDA context and allocator slack are not in it), too rough to restart on.
        """
        cfg = sup.config
        if not cfg.gpu_devices or not cfg.gpu_footprint_bytes:
            return None
        return policy.watermarks(cfg.gpu_footprint_bytes * len(cfg.gpu_devices), self.settings)

    def _watermarks(self, sup: EngineSupervisor) -> policy.Watermarks | None:
        daemon = self.daemon
        cfg = sup.config
        mem = daemon.memory
        others = sum(daemon.footprint_bytes(s) or 0 for s in daemon.resident(exclude=sup.name))
        return policy.watermarks(self._guarded_footprint(sup), self.settings,
                                 soft_bytes=cfg.memory_soft_bytes, hard_bytes=cfg.memory_hard_bytes,
                                 total_bytes=mem.total_bytes if mem else None,
                                 headroom_bytes=daemon.config.memory.headroom_bytes, others_bytes=others)

    @staticmethod
    def _in_flight(sup: EngineSupervisor) -> int:
        return sup.health.in_flight if sup.health is not None else 0

    # ---- the machine rule (every machine memory reading) --------------------------------------

    def on_memory(self, reading: SystemMemoryReading | None) -> None:
        if reading is None or not self.enabled:
            return
        daemon = self.daemon
        holdings = []
        for sup in daemon.supervisors.values():
            g = self.engines[sup.name]
            # Draining until the new run's first reading resets it: one recycle at a time.
            recycling = g.state.draining_since_s is not None
            current = sup.serving and g.reading is not None and g.gen == sup.gen
            configured = self._guarded_footprint(sup)
            if recycling or (current and configured is not None):
                held = g.reading.host_bytes if current and g.reading is not None else 0
                holdings.append(policy.Holding(sup.name, held, configured or 0, recycling=recycling))
        decision = policy.decide_machine(reading.available_bytes, daemon.config.memory.headroom_bytes, holdings,
                                         self.settings)
        label = decision.reason if not isinstance(decision, Drain) else f"drain {decision.engine}"
        if label != self._machine_decision:
            self._machine_decision = label
            if isinstance(decision, Drain) or reading.available_bytes < daemon.config.memory.headroom_bytes:
                daemon.events.emit("policy.decided", policy="memory_guard_machine",
                                   decision="drain" if isinstance(decision, Drain) else "none",
                                   engine=decision.engine if isinstance(decision, Drain) else None,
                                   message=decision.reason, available_bytes=reading.available_bytes,
                                   headroom_bytes=daemon.config.memory.headroom_bytes,
                                   engines={h.engine: {"held_bytes": h.held_bytes, "footprint_bytes": h.footprint_bytes}
                                            for h in holdings})
        if isinstance(decision, Drain):
            g = self.engines[decision.engine]
            drain = policy.machine_drain(decision, g.state, daemon.clock.now(), available_bytes=reading.available_bytes,
                                         headroom_bytes=daemon.config.memory.headroom_bytes,
                                         held_bytes=g.reading.host_bytes if g.reading else None)
            g.state, g.verdict = drain.state, drain.verdict
            for action in drain.actions:
                daemon.apply(action)

    # ---- drain, then restart -------------------------------------------------------------------

    def _begin_drain(self, sup: EngineSupervisor, gen: int, action: Drain) -> None:
        if sup.health is not None:
            sup.health.draining = action.reason
        self.daemon.events.emit("engine.draining", engine=sup.name, reason=action.reason, grace_s=action.grace_s,
                                in_flight=self._in_flight(sup))
        if self._tg is not None:
            self._tg.start_soon(self._drain, sup, gen)

    async def _drain(self, sup: EngineSupervisor, gen: int) -> None:
        from supervisord_llm.engine.supervisor import HealthVerdict, Verdict

        g = self.engines[sup.name]
        while sup.gen == gen and sup.serving:
            now = self.daemon.clock.now()
            in_flight = self._in_flight(sup)
            action = policy.drain_finished(sup.name, g.state, in_flight, now, self.settings)
            if isinstance(action, Restart):
                self.daemon.events.emit("policy.decided", policy="memory_guard", engine=sup.name, decision="restart",
                                        message=action.reason, in_flight=in_flight,
                                        drained_s=round(now - (g.state.draining_since_s or now), 3))
                sup.post(HealthVerdict(gen, Verdict.MEMORY_RESTART, action.reason))
                return
            await anyio.sleep(DRAIN_POLL_S)


__all__ = ["CACHE_CAP_FLAGS", "MemoryGuardExtension", "cache_cap_flag"]
