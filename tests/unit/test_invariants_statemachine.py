"""The supervisor's invariants under random sequences of crashes, hangs, swaps, restarts and reboots.

A small pure model of the supervisor is built only from the policies (backoff, admission, swap,
stranded, reboot, health). Hypothesis drives it with random rules and checks, after every step:

1. resident engines never exceed the memory budget together, and an exclusive one never shares;
2. two automatic spawns of one engine (within one boot) are >= 60 s apart;
3. no reboot unless enabled, none inside the cooldown, none after a cancel in the same episode;
4. after max_failures crashes inside the failure window, no automatic spawn until a person acts.

The ghost bookkeeping that checks them is independent of the policies' own state.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import policies.reboot as reboot_policy
from policies.actions import Admit, MarkFailed, RunReboot, Start, Stop, WaitUntil
from policies.admission import Footprint, admit
from policies.backoff import (
    BackoffSettings,
    BackoffState,
    decide_after_exit,
    from_record,
    manual_start_allowed,
    next_start_at,
    record_exit,
    record_spawn,
    to_record,
)
from policies.health import ProgressEvidence, assess_progress
from policies.reboot import (
    RebootLedger,
    RebootSettings,
    RebootState,
    cancel,
    decide_reboot,
    ledger_from_record,
    ledger_to_record,
    record_reboot,
    state_after_restart,
)
from policies.stranded import BaselineState, StrandedSettings, assess_stranded, update_baseline
from policies.swap import SwapPlan, SwapSettings, decide_memory_wait, memory_returned, plan_swap

GB = 10**9
TOTAL_BYTES = 512 * GB
IDLE_WIRED_BYTES = 6 * GB
BUDGET_BYTES = 400 * GB
HEADROOM_BYTES = 16 * GB
FOOTPRINTS = {
    "a": Footprint("a", 100 * GB),
    "b": Footprint("b", 150 * GB),
    "c": Footprint("c", 120 * GB),
    "x": Footprint("x", 300 * GB, exclusive=True),
}
NAMES = sorted(FOOTPRINTS)
BACKOFF = BackoffSettings()
SWAP = SwapSettings()
STRANDED = StrandedSettings()
BOOT_MONOTONIC_S = 5.0  # the monotonic clock restarts near 0 at every boot
REBOOT_TAKES_S = 90.0

engines = st.sampled_from(NAMES)
durations = st.sampled_from(
    [1.0, 10.0, 30.0, 59.0, 60.0, 61.0, 121.0, 300.0, 900.0, 3600.0, 21600.0]
)


@dataclass
class Ghost:
    """Independent records the invariants are checked against."""

    reboot_enabled: bool = False
    auto_spawns: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (boot, now_s)
    exits: dict[str, list[tuple[int, float, float]]] = field(
        default_factory=dict
    )  # (boot, at_s, ready_for_s)
    crash_looped: set[str] = field(default_factory=set)  # until a person starts it again
    reboots_wall: list[float] = field(default_factory=list)
    cancelled_this_episode: bool = False
    violations: list[str] = field(default_factory=list)


class SupervisorModel(RuleBasedStateMachine):
    """A pure supervisor: policies decide, this class only applies their actions to a model world."""

    def __init__(self) -> None:
        super().__init__()
        self.now_s = 1000.0
        self.now_wall = 1_800_000_000.0
        self.boot = 1
        self.resident: dict[str, float] = {}  # name -> ready since (monotonic), in start order
        self.wanted: set[str] = set()
        self.failed: set[str] = set()
        self.backoff = {n: BackoffState(n) for n in NAMES}
        self.stranded_true_bytes = 0
        self.other_used_bytes = 0
        self.last_exit_at_s: float | None = None
        self.baseline = BaselineState()
        self.stranded_alert_active = False
        self.reboot_settings = RebootSettings()
        self.reboot_state = RebootState()
        self.ledger = RebootLedger()
        self.ghost = Ghost()

    # ---- the world ---------------------------------------------------------------------------
    def wired_bytes(self) -> int:
        return (
            IDLE_WIRED_BYTES
            + sum(FOOTPRINTS[n].bytes for n in self.resident)
            + self.stranded_true_bytes
        )

    def available_bytes(self) -> int:
        return max(0, TOTAL_BYTES - self.wired_bytes() - self.other_used_bytes)

    def stranded_estimate(self) -> tuple[int, bool | None]:
        live = sum(FOOTPRINTS[n].bytes for n in self.resident)
        result = assess_stranded(
            self.baseline.baseline_wired_bytes,
            self.wired_bytes(),
            live,
            self.last_exit_at_s,
            self.now_s,
            STRANDED,
            alert_active=self.stranded_alert_active,
        )
        if result.alert is not None:
            self.stranded_alert_active = not result.alert.resolved
        return result.stranded_bytes, (None if result.reclaiming else result.over_threshold)

    # ---- effects -------------------------------------------------------------------------------
    def spawn(self, name: str, automatic: bool) -> bool:
        stranded, _ = self.stranded_estimate()
        decision = admit(
            FOOTPRINTS[name],
            [FOOTPRINTS[n] for n in self.resident],
            self.available_bytes(),
            HEADROOM_BYTES,
            BUDGET_BYTES,
            None,
            stranded,
        )
        if not isinstance(decision, Admit):
            return False
        if automatic:
            if name in self.ghost.crash_looped:
                self.ghost.violations.append(f"{name} was auto-spawned again after a crash loop")
            for boot, at_s in self.ghost.auto_spawns.get(name, []):
                if boot == self.boot and self.now_s - at_s < 60.0:
                    self.ghost.violations.append(
                        f"{name} auto-spawned {self.now_s - at_s}s after the last"
                    )
            self.ghost.auto_spawns.setdefault(name, []).append((self.boot, self.now_s))
        self.backoff[name] = record_spawn(self.backoff[name], self.now_s)
        self.resident[name] = self.now_s
        return True

    def crash_looping(self, name: str) -> bool:
        """Ghost: max_failures unplanned exits within the window, since the last long healthy run."""
        streak: list[float] = []
        for boot, at_s, ready_for_s in self.ghost.exits.get(name, []):
            if boot != self.boot:
                continue  # a reboot starts afresh (and the monotonic clock restarted)
            if ready_for_s >= BACKOFF.reset_after_ready_s:
                streak = []
            streak.append(at_s)
        recent = [t for t in streak if self.now_s - t <= BACKOFF.failure_window_s]
        return len(recent) >= BACKOFF.max_failures

    def person_acts_on(self, name: str) -> None:
        """A person's start or switch ends the ghost's crash-loop memory, as it ends ``failed``."""
        self.ghost.exits.pop(name, None)
        self.ghost.crash_looped.discard(name)

    def stop(self, name: str) -> None:
        if self.resident.pop(name, None) is not None:
            self.last_exit_at_s = self.now_s

    def unplanned_exit(self, name: str, reason: str) -> None:
        since = self.resident.pop(name)
        self.last_exit_at_s = self.now_s
        self.ghost.exits.setdefault(name, []).append((self.boot, self.now_s, self.now_s - since))
        if self.crash_looping(name):
            self.ghost.crash_looped.add(name)
        state = record_exit(
            self.backoff[name], self.now_s, self.now_s - since, reason, settings=BACKOFF
        )
        self.backoff[name] = state
        decision = decide_after_exit(state, BACKOFF, self.now_s)
        if isinstance(decision[0], MarkFailed):
            self.failed.add(name)
            self.wanted.discard(name)
        else:
            assert isinstance(decision[0], WaitUntil)

    def reboot_machine(self) -> None:
        self.boot += 1
        self.now_s = BOOT_MONOTONIC_S
        self.now_wall += REBOOT_TAKES_S
        self.resident.clear()
        self.stranded_true_bytes = 0
        self.last_exit_at_s = None
        self.reload(reboot=True)

    def tick(self) -> None:
        """One supervisor pass: baseline, stranded memory, reboot escalation, automatic starts."""
        self.baseline = update_baseline(
            self.baseline,
            boot_id=str(self.boot),
            wired_bytes=self.wired_bytes(),
            engine_resident=bool(self.resident),
            last_exit_at_s=self.last_exit_at_s,
            now_s=self.now_s,
            settings=STRANDED,
        )
        _, persisting = self.stranded_estimate()
        if persisting is False:
            self.ghost.cancelled_this_episode = False
        self.reboot_state, actions = decide_reboot(
            self.reboot_state,
            self.ledger,
            self.reboot_settings,
            persisting,
            self.now_s,
            self.now_wall,
        )
        for action in actions:
            if isinstance(action, RunReboot):
                if not self.ghost.reboot_enabled:
                    self.ghost.violations.append("reboot while disabled")
                if self.ghost.cancelled_this_episode:
                    self.ghost.violations.append("reboot after a cancel in the same episode")
                for wall in self.ghost.reboots_wall:
                    if self.now_wall - wall < self.reboot_settings.cooldown_s:
                        self.ghost.violations.append(
                            f"reboot {self.now_wall - wall}s after the last one"
                        )
                self.ledger = record_reboot(self.ledger, self.now_wall)
                self.ghost.reboots_wall.append(self.now_wall)
                self.reboot_machine()
                return
        for name in NAMES:
            if name in self.wanted and name not in self.resident and name not in self.failed:
                if next_start_at(self.backoff[name], BACKOFF, self.now_s) <= self.now_s:
                    self.spawn(name, automatic=True)

    def reload(self, *, reboot: bool = False) -> None:
        """Persist every policy state and load it back, as a restarted daemon does."""
        self.backoff = {
            n: from_record(to_record(s), now_s=self.now_s) for n, s in self.backoff.items()
        }
        self.ledger = ledger_from_record(ledger_to_record(self.ledger))
        self.reboot_state = state_after_restart(self.reboot_state.phase, same_boot=not reboot)

    # ---- rules -----------------------------------------------------------------------------------
    @initialize(enabled=st.booleans(), first=engines)
    def configure(self, enabled: bool, first: str) -> None:
        self.reboot_settings = RebootSettings(enabled=enabled)
        self.ghost.reboot_enabled = enabled
        for _ in range(STRANDED.baseline_min_samples):  # learn the idle baseline
            self.tick()
            self.advance_clock(1.0)
        self.wanted.add(first)
        self.tick()

    def advance_clock(self, seconds: float) -> None:
        self.now_s += seconds
        self.now_wall += seconds

    @rule(seconds=durations)
    def time_passes(self, seconds: float) -> None:
        self.advance_clock(seconds)
        self.tick()

    @rule()
    def sleep_until_next_decision(self) -> None:
        """The supervisor sleeps until its earliest WaitUntil: the next start or the announced reboot."""
        due = [
            next_start_at(self.backoff[n], BACKOFF, self.now_s)
            for n in self.wanted
            if n not in self.resident and n not in self.failed
        ]
        if self.reboot_state.execute_at_s is not None and self.reboot_state.phase == "announced":
            due.append(self.reboot_state.execute_at_s)
        if self.last_exit_at_s is not None:
            due.append(self.last_exit_at_s + STRANDED.reclaim_window_s)
        future = [t for t in due if t > self.now_s]
        self.advance_clock((min(future) - self.now_s) if future else 1.0)
        self.tick()

    @rule(name=engines, force=st.booleans())
    def person_starts(self, name: str, force: bool) -> None:
        self.person_acts_on(name)
        self.wanted.add(name)
        self.failed.discard(name)
        if name not in self.resident and isinstance(
            manual_start_allowed(self.backoff[name], BACKOFF, self.now_s, force), Admit
        ):
            self.spawn(name, automatic=False)

    @rule(name=engines)
    def person_stops(self, name: str) -> None:
        self.wanted.discard(name)
        self.stop(name)

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), then_sleep=st.booleans())
    def crash(self, data: st.DataObject, then_sleep: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.resident)))
        self.unplanned_exit(name, "exit code 1 (Metal OOM)")
        for _ in range(3 if then_sleep else 0):  # wait out the backoff until it runs again
            self.sleep_until_next_decision()
            if name in self.resident or name in self.failed:
                break

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), times=st.integers(min_value=2, max_value=6))
    def crash_loop(self, data: st.DataObject, times: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.resident)))
        for _ in range(times):
            if name not in self.resident:
                break
            self.unplanned_exit(name, "exit code 1 (Metal OOM)")
            for _ in range(4):
                self.sleep_until_next_decision()
                if name in self.resident or name in self.failed:
                    break

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def hang(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.resident)))
        evidence = ProgressEvidence(watch_since_s=self.now_s, process_stopped=True, root_pid=100)
        verdict = assess_progress(evidence, stall_s=30.0, now_s=self.now_s)
        assert verdict.hung
        self.unplanned_exit(name, f"hung: {verdict.reason}")

    @rule(goal=engines, keep_fitting=st.booleans())
    def switch(self, goal: str, keep_fitting: bool) -> None:
        target = goal
        self.person_acts_on(target)
        stranded, _ = self.stranded_estimate()
        plan = plan_swap(
            [FOOTPRINTS[n] for n in self.resident],
            FOOTPRINTS[target],
            BUDGET_BYTES,
            SWAP,
            keep_fitting=keep_fitting,
            stranded_bytes=stranded,
        )
        if not isinstance(plan, SwapPlan):
            return
        before = self.available_bytes()
        for step in plan.stops:
            assert isinstance(step, Stop)
            self.wanted.discard(step.engine)
            self.stop(step.engine)
            self.check_memory_invariant()
        self.wanted.add(target)
        self.failed.discard(target)
        if plan.start is None:
            return
        returned = memory_returned(
            before, self.available_bytes(), FOOTPRINTS[target].bytes + HEADROOM_BYTES
        )
        (decision, *_) = decide_memory_wait(target, self.now_s, self.now_s, returned, SWAP)
        if isinstance(decision, Start) and isinstance(
            manual_start_allowed(self.backoff[target], BACKOFF, self.now_s, False), Admit
        ):
            self.spawn(target, automatic=False)

    @precondition(lambda self: self.resident)
    @rule(
        data=st.data(), sleeps=st.integers(min_value=0, max_value=5), person_cancels=st.booleans()
    )
    def metal_hang_strands_memory(
        self, data: st.DataObject, sleeps: int, person_cancels: bool
    ) -> None:
        """A GPU hang: the engine is killed and ~245 GB of wired memory stays behind."""
        name = data.draw(st.sampled_from(sorted(self.resident)))
        self.unplanned_exit(name, "hung: canary got no token within 10s")
        self.stranded_true_bytes = min(300 * GB, self.stranded_true_bytes + 245 * GB)
        for _ in range(sleeps):
            self.sleep_until_next_decision()
            if person_cancels and self.reboot_state.phase == "announced":
                self.person_cancels_reboot()  # during the grace, then time goes on

    @rule()
    def daemon_restarts(self) -> None:
        self.reload()
        self.tick()

    @rule(amount=st.sampled_from([5 * GB, 40 * GB, 245 * GB]))
    def memory_strands(self, amount: int) -> None:
        self.stranded_true_bytes = min(300 * GB, self.stranded_true_bytes + amount)

    @rule()
    def stranded_memory_frees_itself(self) -> None:
        self.stranded_true_bytes = 0

    @rule(other=st.sampled_from([0, 20 * GB, 200 * GB]))
    def memory_reading_changes(self, other: int) -> None:
        self.other_used_bytes = other
        self.tick()

    @rule()
    def person_cancels_reboot(self) -> None:
        # The ghost records the person's intent, whatever the policy makes of it.
        if self.reboot_state.phase in ("announced", "required"):
            self.ghost.cancelled_this_episode = True
        self.reboot_state = cancel(self.reboot_state)

    @precondition(lambda self: self.reboot_state.phase in ("announced", "required"))
    @rule()
    def person_cancels_pending_reboot(self) -> None:
        self.person_cancels_reboot()

    # ---- invariants ------------------------------------------------------------------------------
    def check_memory_invariant(self) -> None:
        resident = [FOOTPRINTS[n] for n in self.resident]
        total = sum(f.bytes for f in resident)
        assert total <= BUDGET_BYTES, (
            f"resident {sorted(self.resident)} = {total / GB} GB over the budget"
        )
        if any(f.exclusive for f in resident):
            assert len(resident) == 1, (
                f"an exclusive engine shares the machine: {sorted(self.resident)}"
            )

    @invariant()
    def never_over_budget_and_exclusive_alone(self) -> None:
        self.check_memory_invariant()

    @invariant()
    def no_violation_recorded(self) -> None:
        assert not self.ghost.violations, self.ghost.violations


SupervisorModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestSupervisorInvariants(SupervisorModel.TestCase):
    """Budget, exclusivity, the 60 s spawn floor and reboot limits hold under any sequence of events."""


# ---- the model must be able to fail: break one policy at a time and expect a violation ------------
_THIS = sys.modules[__name__]
_real_admit = admit
_real_decide_after_exit = decide_after_exit
_RealRebootSettings = RebootSettings


def _admit_ignoring_exclusive(
    candidate: Footprint, resident: list[Footprint], *args: object
) -> object:
    return _real_admit(
        replace(candidate, exclusive=False), [replace(f, exclusive=False) for f in resident], *args
    )


def _never_mark_failed(state: BackoffState, s: BackoffSettings, now_s: float) -> tuple[object, ...]:
    decision = _real_decide_after_exit(state, s, now_s)
    if isinstance(decision[0], MarkFailed):
        return (WaitUntil(next_start_at(state, s, now_s), "keeps restarting"),)
    return decision


BROKEN_POLICIES: dict[str, tuple[object, str, Callable[..., object], str]] = {
    "no 60 s spawn floor": (
        _THIS,
        "next_start_at",
        lambda state, s, now_s: now_s,
        "after the last",
    ),
    "admission admits everything": (
        _THIS,
        "admit",
        lambda c, *a, **k: Admit(c.engine),
        "over the budget|shares the machine",
    ),
    "admission ignores exclusivity": (
        _THIS,
        "admit",
        _admit_ignoring_exclusive,
        "shares the machine",
    ),
    "crash loop never ends in failed": (
        _THIS,
        "decide_after_exit",
        _never_mark_failed,
        "after a crash loop",
    ),
    "reboot ignores the cooldown": (
        reboot_policy,
        "in_cooldown",
        lambda *a: False,
        "after the last one",
    ),
    "reboot ignores a cancel": (_THIS, "cancel", lambda state: state, "after a cancel"),
    "reboot ignores enabled=false": (
        _THIS,
        "RebootSettings",
        lambda enabled=False: _RealRebootSettings(enabled=True),
        "while disabled",
    ),
}


def _messages(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(_messages(e) for e in exc.exceptions)
    return str(exc)


@pytest.mark.parametrize("broken", sorted(BROKEN_POLICIES))
def test_the_model_catches_a_broken_policy(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Each invariant check fails loudly, with its own message, when the policy behind it is broken."""
    owner, attribute, replacement, expected = BROKEN_POLICIES[broken]
    monkeypatch.setattr(owner, attribute, replacement)
    quick = settings(
        SupervisorModel.TestCase.settings,
        phases=[Phase.explicit, Phase.generate],  # stop at the first failure, no shrinking
        max_examples=300,
        print_blob=False,
    )
    with pytest.raises((AssertionError, BaseExceptionGroup)) as caught:
        run_state_machine_as_test(SupervisorModel, settings=quick)
    assert re.search(expected, _messages(caught.value)), _messages(caught.value)
