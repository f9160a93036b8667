"""The engine supervisor's state machine, table-tested: (state, message) -> state, events, alerts, workers.

The real ``EngineSupervisor`` runs against a test double of its host protocol with a fake clock;
workers are recorded instead of run, so each row is one synchronous step of the transition function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from policies.actions import Alert
from policies.backoff import BackoffSettings
from probes.readings import CanaryReading
from supervisord_llm.clock import FakeClock
from supervisord_llm.config import parse_config
from supervisord_llm.engine.process import ExitInfo
from supervisord_llm.engine.supervisor import (
    TRANSITIONS,
    BackoffOver,
    EngineState,
    EngineSupervisor,
    Exited,
    HealthVerdict,
    IllegalTransition,
    LaunchFailed,
    Ready,
    Stopped,
    Then,
    Verdict,
)
from supervisord_llm.errors import EngineSpawnFailed, StartRefused

S = EngineState


class RecordingEvents:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.kinds.append(kind)
        return {"kind": kind, **fields}


class RecordingTaskGroup:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start_soon(self, fn: Any, *args: Any) -> None:
        self.started.append(getattr(fn, "__name__", "?"))


class NullLog:
    def bind(self, **_: Any) -> NullLog:
        return self

    def __getattr__(self, _: str) -> Any:
        return lambda *a, **k: None


@dataclass
class FakeHost:
    """The supervisor's host protocol, recording what the supervisor asks of it."""

    config: Any
    clock: FakeClock = field(default_factory=FakeClock)
    events: RecordingEvents = field(default_factory=RecordingEvents)
    http: Any = None
    backoff_settings: BackoffSettings = field(default_factory=BackoffSettings)
    daemon_id: str = "test"
    alerts: list[Alert] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    exited: list[str] = field(default_factory=list)

    @property
    def shutting_down(self) -> bool:
        return False

    def persist(self) -> None:
        pass

    async def persist_durably(self) -> None:
        pass

    def alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def admit(self, sup: EngineSupervisor) -> None:
        pass

    def engine_ready(self, sup: EngineSupervisor) -> None:
        self.ready.append(sup.name)

    def engine_exited(self, sup: EngineSupervisor) -> None:
        self.exited.append(sup.name)

    async def monitor_engine(self, sup: EngineSupervisor, gen: int, proc: Any) -> None:
        pass

    def footprint_bytes(self, sup: EngineSupervisor) -> int | None:
        return 10**9

    async def requests_settled(self) -> None:
        pass


_MADE: list[EngineSupervisor] = []


@pytest.fixture(autouse=True)
def _close_supervisors() -> Any:
    """Every supervisor made here has its inbox closed afterwards."""
    yield
    while _MADE:
        _MADE.pop().close()


def make(state: EngineState, tmp_path: Any) -> tuple[EngineSupervisor, FakeHost, RecordingTaskGroup]:
    config = parse_config({"engine": [{"name": "e", "kind": "command", "command": ["x"], "port": 18080,
                                       "footprint": "1GB"}]}, "test.toml")
    host = FakeHost(config=config)
    sup = EngineSupervisor(config.engines[0], host, log=NullLog(), logs_dir=tmp_path, log_max_bytes=10**6)
    tg = RecordingTaskGroup()
    sup._tg = tg  # type: ignore[assignment]  # workers are recorded, not run
    sup.state = state
    _MADE.append(sup)
    return sup, host, tg


OK_CANARY = CanaryReading(at_s=1000.0, ok=True, ttft_s=0.05, tokens_per_s=100.0)


def _rows() -> list[tuple[str, EngineState, Any, EngineState, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    """(id, state, message built for gen, expected state, events, alert keys, workers started)."""
    return [
        ("ready after a generation", S.STARTING, lambda g: Ready(g, OK_CANARY), S.READY,
         ("engine.state_changed",), (), ("_monitor",)),
        ("hung verdict", S.READY, lambda g: HealthVerdict(g, Verdict.HUNG, "no token for 10s"), S.HUNG,
         ("engine.state_changed",), ("engine.hung:e",), ()),
        ("hung while degraded", S.DEGRADED, lambda g: HealthVerdict(g, Verdict.HUNG, "stopped"), S.HUNG,
         ("engine.state_changed",), ("engine.hung:e",), ()),
        # Resolves what it raised: a hang never reported as a slowdown too gets no "recovered" for one.
        ("recovered from hung", S.HUNG, lambda g: HealthVerdict(g, Verdict.OK, "generating again"), S.READY,
         ("engine.state_changed",), ("engine.hung:e",), ()),
        ("recovered from degraded", S.DEGRADED, lambda g: HealthVerdict(g, Verdict.OK, "fast again"), S.READY,
         ("engine.state_changed",), ("engine.degraded:e",), ()),
        ("hang restart", S.HUNG, lambda g: HealthVerdict(g, Verdict.HANG_RESTART, "hung for 5m"), S.STOPPING,
         ("engine.state_changed",), (), ()),
        ("degraded verdict", S.READY, lambda g: HealthVerdict(g, Verdict.DEGRADED, "10 tok/s"), S.DEGRADED,
         ("engine.state_changed",), ("engine.degraded:e",), ()),
        ("degraded restart", S.DEGRADED, lambda g: HealthVerdict(g, Verdict.DEGRADED_RESTART, "slow"), S.STOPPING,
         ("engine.state_changed",), (), ()),
        ("degraded restart ignored when ready", S.READY,
         lambda g: HealthVerdict(g, Verdict.DEGRADED_RESTART, "slow"), S.READY, (), (), ()),
        ("memory restart", S.READY, lambda g: HealthVerdict(g, Verdict.MEMORY_RESTART, "over hard limit"),
         S.STOPPING, ("engine.state_changed",), (), ()),
        ("stopped, stays stopped", S.STOPPING, lambda g: Stopped(g, True, (), Then.STAY), S.STOPPED,
         ("engine.stopped", "engine.state_changed"), (), ()),
        ("stopped, a person's restart", S.STOPPING, lambda g: Stopped(g, True, (), Then.START), S.STARTING,
         ("engine.stopped", "engine.state_changed"), (), ("_launch",)),
        ("stopped after a failure: backoff", S.STOPPING, lambda g: Stopped(g, True, (), Then.AUTO), S.BACKOFF,
         ("engine.stopped", "engine.state_changed"), ("engine.exited:e",), ("_backoff_timer",)),
        ("stopped for a policy: backoff floor, no failure", S.STOPPING, lambda g: Stopped(g, True, (), Then.POLICY),
         S.BACKOFF, ("engine.stopped", "engine.state_changed"), (), ("_backoff_timer",)),
        ("backoff over", S.BACKOFF, lambda g: BackoffOver(g), S.STARTING, ("engine.state_changed",), (),
         ("_launch",)),
        ("crash while ready", S.READY, lambda g: Exited(g, ExitInfo(code=None, signal=9, at_wall=0.0)), S.BACKOFF,
         ("engine.exited", "engine.state_changed"), ("engine.exited:e",), ("_backoff_timer",)),
        ("spawn failed", S.STARTING, lambda g: LaunchFailed(g, EngineSpawnFailed("e", "no such file")), S.BACKOFF,
         ("engine.start_failed", "engine.state_changed"), ("engine.exited:e",), ("_backoff_timer",)),
        # Memory short right now is no crash loop: stopped (the next request or `llmctl start` asks
        # admission again), the refusal in an event and an alert, no failure counted, nothing scheduled.
        ("start refused by memory admission", S.STARTING,
         lambda g: LaunchFailed(g, StartRefused("e", "memory", "e needs 1.0 GB + 4.0 GB headroom = 5.0 GB, but "
                                                              "only 2.0 GB is available")),
         S.STOPPED, ("engine.start_refused", "engine.state_changed"), ("engine.start_refused:e",), ()),
        ("message of an old run ignored", S.READY,
         lambda g: Exited(g - 1, ExitInfo(code=1, signal=None, at_wall=0.0)), S.READY, (), (), ()),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("state", "message", "expected", "events", "alerts", "workers"),
                         [row[1:] for row in _rows()], ids=[row[0] for row in _rows()])
async def test_transition_table(tmp_path, state, message, expected, events, alerts, workers) -> None:
    """Each (state, message) pair leads to the documented state, events, alerts and workers."""
    sup, host, tg = make(state, tmp_path)
    sup.gen = 5
    m = message(sup.gen)
    if isinstance(m, Stopped):
        sup._stop_then = m.then  # what the stop that is now finishing was begun for
    sup.step(m)
    assert sup.state == expected
    for kind in events:
        assert kind in host.events.kinds, (kind, host.events.kinds)
    if not events:
        assert "engine.state_changed" not in host.events.kinds
    assert sorted({a.key for a in host.alerts}) == sorted(alerts)
    assert tg.started == list(workers)
    if expected != state:
        assert expected in TRANSITIONS[state]


@pytest.mark.anyio
async def test_commands_through_the_table(tmp_path) -> None:
    """start/stop/restart move the engine as llmctl documents: stopped→starting, ready→stopping, failed→starting."""
    for state, op, expected in ((S.STOPPED, "start", S.STARTING), (S.READY, "stop", S.STOPPING),
                                (S.READY, "restart", S.STOPPING), (S.FAILED, "start", S.STARTING),
                                (S.BACKOFF, "stop", S.STOPPED)):
        sup, host, _ = make(state, tmp_path)
        host.clock.advance(120)
        from supervisord_llm.engine.supervisor import Command, Op

        command = Command(op=Op(op))
        sup.step(command)
        assert command.reply.error is None, command.reply.error
        assert sup.state == expected, (state, op, sup.state)


@pytest.mark.anyio
async def test_an_unknown_operation_names_the_valid_ones(tmp_path) -> None:
    """A command other than start/stop/restart is refused with the valid operations named."""
    sup, _, _ = make(S.STOPPED, tmp_path)
    with pytest.raises(ValueError, match="valid: start, stop, restart"):
        await sup.command("reload")


@pytest.mark.anyio
async def test_an_illegal_transition_raises_in_strict_mode_and_is_not_applied_otherwise(tmp_path) -> None:
    """stopped→ready is no transition: strict (tests) raises; production logs it and keeps the state."""
    sup, host, _ = make(S.STOPPED, tmp_path)
    with pytest.raises(IllegalTransition, match="stopped -> ready"):
        sup._set_state(S.READY, "bug")
    EngineSupervisor.strict_transitions = False
    sup._set_state(S.READY, "bug")
    assert sup.state == S.STOPPED and "engine.state_changed" not in host.events.kinds


def test_every_state_has_its_row_in_the_table() -> None:
    """The table names the successors of every state; nothing leads back into starting except start paths."""
    assert set(TRANSITIONS) == set(EngineState)
    assert all(S.READY not in TRANSITIONS[s] for s in (S.STOPPED, S.BACKOFF, S.FAILED, S.STOPPING))


@pytest.mark.anyio
async def test_a_refused_start_ends_a_drain_and_keeps_its_refusal_until_ready(tmp_path) -> None:
    """The memory guard drains an engine, restarts it, and admission refuses the start: nothing runs, so
    nothing drains any more (else every request would hear "draining" forever); the refusal stays in status
    while a start tries again, and ends once the engine is ready."""
    from supervisord_llm.engine.health import EngineHealth, baseline_from_record

    sup, _host, _tg = make(S.STARTING, tmp_path)
    sup.health = EngineHealth(_host.config.degraded, baseline_from_record(None))
    sup.health.draining = "its memory grew past the hard watermark"
    sup.gen = 5
    sup.step(LaunchFailed(5, StartRefused("e", "memory", "e needs 5.0 GB, but only 2.0 GB is available")))
    assert sup.state == S.STOPPED and sup.health.draining is None
    assert sup.status()["start_refused"]["reason"] == "memory"
    sup._begin_spawn(manual=False, reason="a request")  # a start tries again: the refusal still shows
    assert sup.state == S.STARTING and sup.status()["start_refused"]["reason"] == "memory"
    sup.step(Ready(sup.gen, OK_CANARY))
    assert sup.state == S.READY and sup.status()["start_refused"] is None


@pytest.mark.anyio
async def test_a_persons_stop_in_progress_keeps_its_reason_through_the_daemons_own_stop(tmp_path) -> None:
    """A clean daemon exit stops every engine with SHUTDOWN_REASON, which the next daemon undoes; an engine a person
    was stopping at that moment must not take that reason (it would be started again by the next daemon)."""
    from supervisord_llm.engine.supervisor import SHUTDOWN_REASON, Command, Op

    sup, host, _ = make(S.READY, tmp_path)
    sup.step(Command(op=Op("stop"), reason="llmctl stop"))
    assert sup.state == S.STOPPING
    sup.step(Command(op=Op("stop"), reason=SHUTDOWN_REASON))
    sup.step(Stopped(sup.gen, True, (), sup._stop_then))
    assert sup.state == S.STOPPED and sup.persisted()["reason"] == "llmctl stop"


@pytest.mark.anyio
async def test_an_engine_degraded_then_hung_that_recovers_in_place_resolves_both(tmp_path) -> None:
    sup, host, _ = make(S.READY, tmp_path)
    sup.gen = 5
    sup.step(HealthVerdict(5, Verdict.DEGRADED, "10 tok/s"))
    sup.step(HealthVerdict(5, Verdict.HUNG, "no token for 10s"))
    host.alerts.clear()
    sup.step(HealthVerdict(5, Verdict.OK, "generating again"))
    assert sup.state == S.READY
    assert sorted(a.key for a in host.alerts if a.resolved) == ["engine.degraded:e", "engine.hung:e"]


@pytest.mark.anyio
async def test_a_start_on_a_requests_behalf_after_an_old_crash_waits_for_the_floor_instead_of_failing(tmp_path) -> None:
    """An engine that crashed once (its backoff long over), came back, and was swapped out 20 s later is swapped
    back in: the swap's start (not a person's) is admitted and its launch waits out the 60 s floor between
    spawns. Refused, it failed the swap after the resident engine had been stopped for it, and rolled back. A
    person's start in the same spot is still refused, naming the crash, unless forced."""
    from policies import backoff
    from supervisord_llm.engine.supervisor import Command, Op

    for manual in (False, True):
        sup, host, tg = make(S.STOPPED, tmp_path)
        now = host.clock.now()
        state = backoff.record_spawn(backoff.BackoffState(engine="e"), now - 500)
        state = backoff.record_exit(state, now - 490, 0.0, "killed by SIGKILL", settings=host.backoff_settings)
        sup.backoff = backoff.record_spawn(state, now - 20)  # came back 20 s ago (started again, swapped out)
        command = Command(op=Op("start"), manual=manual)
        sup.step(command)
        if manual:
            assert isinstance(command.reply.error, StartRefused) and "SIGKILL" in str(command.reply.error)
            assert sup.state == S.STOPPED
        else:
            assert command.reply.error is None, command.reply.error
            assert sup.state == S.STARTING and "_launch" in tg.started  # the launch waits for the floor


@pytest.mark.anyio
async def test_a_daemon_restarted_inside_the_floor_says_why_the_engine_waits(tmp_path) -> None:
    """At the daemon's start, an engine spawned 20 s ago (by the last daemon) waits in backoff. With an old crash
    whose backoff has passed, or none, only the floor between spawns holds it: the reason says so and requests
    are held for it (``floor_wait``), not an old crash's reason with a 503. Inside a crash's backoff, the crash
    is the reason and requests get the 503."""
    from policies import backoff

    for crashed_s_ago, floor in ((None, True), (500.0, True), (30.0, False)):
        sup, host, tg = make(S.STOPPED, tmp_path)
        now = host.clock.now()
        state = backoff.BackoffState(engine="e")
        if crashed_s_ago is not None:
            state = backoff.record_spawn(state, now - crashed_s_ago - 10)
            state = backoff.record_exit(state, now - crashed_s_ago, 0.0, "killed by SIGKILL",
                                        settings=host.backoff_settings)
        sup.backoff = backoff.record_spawn(state, now - 20) if floor else state
        sup._autostart()
        assert sup.state == S.BACKOFF and sup.floor_wait is floor, (crashed_s_ago, sup.state_reason)
        if floor:
            assert "floor between spawns" in sup.state_reason and "SIGKILL" not in sup.state_reason
        else:
            assert sup.state_reason == "killed by SIGKILL"
