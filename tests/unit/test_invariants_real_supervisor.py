"""Invariants 1 and 2 checked on the code that runs: the real daemon's admission and swaps, real supervisors.

``test_invariants_statemachine.py`` proves the invariants on a model built from the policies. Here
hypothesis drives random sequences of ``llmctl start/stop/switch``, gateway (automatic) switches,
engine crashes and the passing of time through the real ``Daemon.start/stop/switch`` (so the real
``plan_swap``, ``admit``, backoff and 60 s floor) and real ``EngineSupervisor`` loops, each with the
daemon as its ``SupervisorHost``. Only the edges are fakes: the process layer (``EngineProcess.spawn``
makes a fake process that a step may crash), the readiness probe (a live fake process is ready after
``LOAD_S``), memory readings (none: the configured budget decides), persistence, and the clock (trio's
virtual clock, so ``anyio.sleep`` and ``clock.now()`` move together and a run takes milliseconds; under
hypothesis trio's task order is seeded, so interleavings vary between examples and replay exactly).

The fake process layer is the ground truth; at every spawn, every state change and every step:

1. the processes alive never hold more than the budget together, and an exclusive engine's process
   never runs next to another (nor do two copies of one engine run);
2. an automatic spawn (backoff over, a gateway switch) comes >= 60 s after the engine's previous spawn;
3. a person's switch from stopped/failed, with nothing else happening meanwhile, is never refused by
   admission for budget or exclusivity: the swap plan stopped what had to go.

``EngineSupervisor.resident`` is not the ground truth here: an engine counts as resident from the
moment it enters ``starting``, before admission has decided, so two engines may briefly "be resident"
although only one of them will ever spawn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import policies.backoff as backoff_policy
import supervisord_llm.daemon as daemon_module
import supervisord_llm.engine.supervisor as supervisor_module
from policies.admission import admit as real_admit
from policies.swap import SwapPlan
from policies.swap import plan_swap as real_plan_swap
from probes.readings import CanaryReading
from supervisord_llm.config import parse_config
from supervisord_llm.daemon import Daemon
from supervisord_llm.engine.process import EngineProcess, ExitInfo, StopResult
from supervisord_llm.engine.supervisor import EngineSupervisor, Ready
from supervisord_llm.errors import SupervisordLLMError
from tests.unit.test_supervisor_transitions import NullLog, RecordingEvents

GB = 10**9
BUDGET_GB = 10
MIN_INTERVAL_S = 60.0
LOAD_S = 5.0  # a fake engine answers its generation check this long after the spawn
STOP_S = 2.0  # a fake engine's process tree is gone this long after SIGTERM
OK_CANARY = CanaryReading(at_s=0.0, ok=True, ttft_s=0.05, tokens_per_s=100.0)


@dataclass(frozen=True)
class EngineSpec:
    name: str
    footprint_gb: int
    exclusive: bool


@dataclass(frozen=True)
class Step:
    op: str  # start | stop | switch | auto_switch | crash | wait
    engine: int
    wait_s: float


class FakeProcess:
    """An engine process that only exists in the world's table: it runs until stopped or crashed."""

    def __init__(self, world: World, engine: str, pid: int) -> None:
        self.world, self.engine, self.pid = world, engine, pid
        self.create_time = 0.0
        self.argv = [engine]
        self.tag = f"test/{engine}/{pid}"
        self.popen = None
        self.log_path = None
        self.adopted = False
        self.known_descendants: set[tuple[int, float]] = set()
        self.exit: ExitInfo | None = None
        self._exited = anyio.Event()

    @property
    def running(self) -> bool:
        return self.exit is None

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    def end(self, signal: int | None) -> None:
        if self.exit is None:
            self.exit = ExitInfo(code=None if signal else 1, signal=signal, at_wall=0.0)
            self._exited.set()
            self.world.check(f"{self.engine} pid {self.pid} exited")

    async def stop(self, grace_s: float) -> StopResult:
        if self.exit is None:
            await anyio.sleep(STOP_S)
            self.end(15)
        return StopResult(graceful=True, killed_pids=(), duration_s=STOP_S)


@dataclass
class World:
    """The ground truth the invariants are checked on: which fake processes live, when each spawned."""

    specs: dict[str, EngineSpec]
    procs: list[FakeProcess] = field(default_factory=list)
    spawns: dict[str, list[float]] = field(default_factory=dict)
    starting_manual: dict[str, bool] = field(default_factory=dict)
    quiet_switch: str | None = None  # a person's switch from stopped/failed, nothing else happening
    in_flight: int = 0  # commands sent and not yet answered
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def live(self) -> list[FakeProcess]:
        return [p for p in self.procs if p.running]

    def spawn(self, engine: str) -> FakeProcess:
        now = trio.current_time()
        automatic = not self.starting_manual.get(engine, True)
        previous = self.spawns.setdefault(engine, [])
        if automatic and previous and now - previous[-1] < MIN_INTERVAL_S - 1e-6:
            self.violations.append(f"invariant 2: automatic spawns of {engine} only {now - previous[-1]:.1f}s "
                                   f"apart (at {previous[-1]:.1f}s and {now:.1f}s), not >= 60s apart")
        previous.append(now)
        proc = FakeProcess(self, engine, 1000 + len(self.procs))
        self.procs.append(proc)
        self.log.append(f"{now:8.1f}s spawn {engine} ({'automatic' if automatic else 'manual'})")
        self.check(f"{engine} spawned")
        return proc

    def check(self, where: str) -> None:
        """Invariant 1 on the live processes."""
        live = self.live()
        names = [p.engine for p in live]
        total = sum(self.specs[n].footprint_gb for n in names)
        if total > BUDGET_GB:
            self.violations.append(f"invariant 1: {', '.join(names)} alive hold {total} GB, over the budget of "
                                   f"{BUDGET_GB} GB ({where})")
        exclusive = [n for n in names if self.specs[n].exclusive]
        if exclusive and len(names) > 1:
            self.violations.append(f"invariant 1: exclusive {exclusive[0]} alive next to {', '.join(names)} ({where})")

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        engine = str(fields.get("engine"))
        if kind == "engine.state_changed" and fields.get("to") == "starting":
            self.starting_manual[engine] = bool(fields.get("manual", True))
        if (kind == "policy.decided" and fields.get("policy") == "admission" and fields.get("decision") == "refuse"
                and fields.get("reason") in ("budget", "exclusive") and engine == self.quiet_switch):
            self.violations.append(f"swap plan: the switch to {engine} left it refused by admission "
                                   f"({fields.get('reason')}: {fields.get('message')})")


_WORLD: World | None = None


def _world() -> World:
    assert _WORLD is not None
    return _WORLD


class WorldEvents(RecordingEvents):
    """The event log: kinds recorded, and the world told of starts and admission refusals."""

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        _world().on_event(kind, fields)
        return super().emit(kind, **fields)


class VirtualClock:
    """The injected clock on trio's virtual time: ``anyio.sleep`` and ``now()`` move together."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return 1_800_000_000.0 + trio.current_time()


class WorldDaemon(Daemon):
    """The real daemon (admission, swaps, start/stop), with persistence, memory readings and probes off."""

    def persist(self) -> int:
        return 0

    async def persist_durably(self) -> None:
        pass

    async def _read_memory(self) -> None:
        pass  # no reading: the configured budget is what admission and the swap plan count

    async def monitor_engine(self, sup: EngineSupervisor, gen: int, proc: EngineProcess) -> None:
        await anyio.sleep_forever()


def _fake_spawn(cls: type, argv: Any, *, engine: str, **_: Any) -> FakeProcess:
    return _world().spawn(engine)


async def _fake_wait_ready(self: EngineSupervisor, gen: int, proc: Any) -> None:
    await anyio.sleep(LOAD_S)
    if proc.running:
        self.post(Ready(gen, OK_CANARY))


async def _inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
    return fn(*args)


@pytest.fixture
def fake_edges(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Processes, readiness probe and the port check are fakes; everything between them is real."""
    monkeypatch.setattr(EngineProcess, "spawn", classmethod(_fake_spawn))
    monkeypatch.setattr(EngineSupervisor, "_wait_ready", _fake_wait_ready)
    monkeypatch.setattr(supervisor_module, "port_holder", lambda host, port, engine="": None)
    monkeypatch.setattr(anyio.to_thread, "run_sync", _inline)  # no threads: virtual time stays deterministic
    yield


def _config(specs: list[EngineSpec], state_dir: Path) -> Any:
    engines = [{"name": s.name, "kind": "command", "command": ["x"], "port": 18080 + i,
                "footprint": f"{s.footprint_gb}GB", "exclusive": s.exclusive, "stop_grace": "10s",
                "start_timeout": "60s"} for i, s in enumerate(specs)]
    return parse_config({"daemon": {"state_dir": str(state_dir)},
                         "policies": {"memory": {"budget": f"{BUDGET_GB}GB", "admission_wait": "20s",
                                                 "return_wait": "10s", "swap_drain": "1s"}},
                         "engine": engines}, "test.toml")


async def _command(world: World, what: str, call: Callable[[], Any]) -> None:
    """One command in its own task (``world.in_flight`` was counted up when it was sent)."""
    try:
        await call()
        world.log.append(f"{trio.current_time():8.1f}s {what}: ok")
    except SupervisordLLMError as exc:  # refusals are answers, not violations
        world.log.append(f"{trio.current_time():8.1f}s {what}: {type(exc).__name__}")
    finally:
        world.in_flight -= 1


async def _scenario(world: World, specs: list[EngineSpec], steps: list[Step], state_dir: Path) -> None:
    daemon = WorldDaemon(_config(specs, state_dir), logger=NullLog(), clock=VirtualClock())
    daemon.events = WorldEvents()  # type: ignore[assignment]
    daemon.daemon_id = "test"
    async with anyio.create_task_group() as tg:
        for cfg in daemon.config.engines:
            sup = EngineSupervisor(cfg, daemon, log=NullLog(), logs_dir=state_dir, log_max_bytes=10**6)
            sup._on_change.append(lambda s: world.check(f"{s.name} {s.state}"))
            daemon.supervisors[cfg.name] = sup
            await tg.start(sup.run, None, False)
        for step in steps:
            name = specs[step.engine % len(specs)].name
            sup = daemon.supervisors[name]
            if step.op != "wait":
                world.quiet_switch = None  # something else happened: a refusal may have other causes
            if step.op in ("start", "stop", "switch", "auto_switch"):
                world.in_flight += 1  # counted when sent: the task may run only after the next step began
            if step.op == "start":
                tg.start_soon(_command, world, f"start {name}", lambda n=name: daemon.start(n))
            elif step.op == "stop":
                tg.start_soon(_command, world, f"stop {name}", lambda n=name: daemon.stop(n))
            elif step.op in ("switch", "auto_switch"):
                manual = step.op == "switch"
                # A start still in flight may be accepted after the plan was made (a plain start does
                # not wait for the swap lock): only a switch with nothing else pending is held to it.
                if manual and sup.state in ("stopped", "failed") and world.in_flight == 1:
                    world.quiet_switch = name
                tg.start_soon(_command, world, f"{step.op} {name}",
                              lambda n=name, m=manual: daemon.switch(n, manual=m))
            elif step.op == "crash":
                for proc in world.live():
                    if proc.engine == name:
                        world.log.append(f"{trio.current_time():8.1f}s crash {name}")
                        proc.end(9)
            await anyio.sleep(step.wait_s)
            world.check(f"after {step.op} {name}")
            if world.violations:
                break
        tg.cancel_scope.cancel()


def _run(specs: list[EngineSpec], steps: list[Step], state_dir: Path) -> None:
    global _WORLD
    world = _WORLD = World(specs={s.name: s for s in specs})
    try:
        trio.run(_scenario, world, specs, steps, state_dir, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        _WORLD = None
    assert not world.violations, "\n".join([world.violations[0], "run:", *world.log[-25:]])


ENGINES = st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=2, max_size=3).map(
    lambda drawn: [EngineSpec(f"e{i}", gb, excl) for i, (gb, excl) in enumerate(drawn)])
STEPS = st.lists(st.builds(Step, op=st.sampled_from(["start", "stop", "switch", "auto_switch", "crash", "wait"]),
                           engine=st.integers(0, 2), wait_s=st.sampled_from([0.0, 1.0, 5.0, 30.0, 61.0, 200.0])),
                 min_size=1, max_size=25)
REAL = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@REAL
@given(specs=ENGINES, steps=STEPS)
def test_the_real_daemon_keeps_the_invariants(fake_edges: None, tmp_path: Path, specs: list[EngineSpec],
                                              steps: list[Step]) -> None:
    """Random starts, stops, switches, crashes and waits on the real daemon never break invariants 1 and 2."""
    _run(specs, steps, tmp_path)


def _admit_without_budget(candidate: Any, resident: Any, available: int, headroom: int, budget: int | None,
                          gpu_free: Any, stranded_bytes: int = 0) -> Any:
    return real_admit(candidate, resident, available, headroom, None, gpu_free, stranded_bytes=stranded_bytes)


def _admit_without_exclusivity(candidate: Any, resident: Any, *args: Any, **kwargs: Any) -> Any:
    return real_admit(replace(candidate, exclusive=False), [replace(f, exclusive=False) for f in resident],
                      *args, **kwargs)


def _plan_stopping_nothing(*args: Any, **kwargs: Any) -> Any:
    plan = real_plan_swap(*args, **kwargs)
    return replace(plan, stops=()) if isinstance(plan, SwapPlan) else plan


def _no_floor(state: Any, settings: Any, now_s: float) -> float:
    return now_s


BROKEN: dict[str, tuple[list[tuple[Any, str, Any]], str]] = {
    "admission ignores the budget": ([(daemon_module, "admit", _admit_without_budget)], r"over the budget"),
    "admission and start ignore exclusivity": (
        [(daemon_module, "admit", _admit_without_exclusivity),
         (daemon_module, "exclusive_conflicts", lambda candidate, others: ())], r"exclusive e\d alive next to"),
    "swap plan stops nothing": ([(daemon_module, "plan_swap", _plan_stopping_nothing)], r"swap plan: the switch"),
    "backoff without the 60 s floor": (
        [(backoff_policy, "next_start_at", _no_floor), (backoff_policy, "on_demand_start_at", _no_floor)],
        r"invariant 2: automatic spawns"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_policy_in_the_real_daemon_is_caught(fake_edges: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Each deliberately broken policy makes the real-daemon run fail loudly, naming the invariant it broke."""
    patches, expected = BROKEN[broken]
    for owner, attribute, replacement in patches:
        monkeypatch.setattr(owner, attribute, replacement)

    # derandomize: the same 300 runs every time, so whether a broken policy is caught does not depend on
    # the draw of the day (a random search missed the budget breakage once in a few hundred runs).
    @settings(REAL, max_examples=300, phases=[Phase.generate], print_blob=False, derandomize=True)
    @given(specs=ENGINES, steps=STEPS)
    def run(specs: list[EngineSpec], steps: list[Step]) -> None:
        _run(specs, steps, tmp_path)

    with pytest.raises(AssertionError) as caught:
        run()
    assert re.search(expected, str(caught.value)), str(caught.value)
