"""Reboot escalation: opt-in, announced, cancellable, rate-limited by a wall-clock ledger; XIDs."""

from __future__ import annotations

import pytest

from policies.actions import Alert, EscalateReboot, RunReboot, Stop, WaitUntil
from policies.reboot import (
    GpuAnswer,
    RebootLedger,
    RebootSettings,
    RebootState,
    cancel,
    decide_gpu_lost,
    decide_reboot,
    decide_xid,
    gpu_episodes_over,
    gpu_lost_cause,
    in_cooldown,
    ledger_from_record,
    ledger_to_record,
    nvml_failing_alert,
    on_new_boot,
    record_reboot,
    state_after_restart,
    verify_after_reboot,
)

GB = 10**9
ON = RebootSettings(enabled=True)
OFF = RebootSettings()
WALL = 1_800_000_000.0


def kinds(actions: tuple[object, ...]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_disabled_only_alerts() -> None:
    """With escalation off (the default), persisting stranded memory gives an alert, never a reboot."""
    state, actions = decide_reboot(RebootState(), RebootLedger(), OFF, True, 100.0, WALL)
    assert state.phase == "required"
    assert kinds(actions) == ["Alert"]
    alert = actions[0]
    assert isinstance(alert, Alert) and "reboot.enabled = false" in alert.summary
    for t in (400.0, 10_000.0, 100_000.0):
        state, actions = decide_reboot(state, RebootLedger(), OFF, True, t, WALL + t)
        assert not any(isinstance(a, (RunReboot, EscalateReboot)) for a in actions)


def test_enabled_announces_then_reboots_after_the_grace() -> None:
    """Enabled: announce (alert + EscalateReboot), wait the grace, then run the argv."""
    state, actions = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    assert state.phase == "announced" and state.execute_at_s == 400.0
    assert kinds(actions) == ["Alert", "EscalateReboot"]
    assert "llmctl reboot cancel" in actions[0].summary  # type: ignore[union-attr]
    assert actions[1] == EscalateReboot(400.0, "wired memory stranded")

    state, actions = decide_reboot(state, RebootLedger(), ON, True, 399.0, WALL + 299)
    assert state.phase == "announced" and actions == (
        WaitUntil(400.0, "reboot announced: wired memory stranded"),
    )

    state, actions = decide_reboot(state, RebootLedger(), ON, True, 400.0, WALL + 300)
    assert state.phase == "executed"
    # The announcement ends with the reboot (left open, the next reboot's announcement would be dropped).
    assert kinds(actions) == ["Alert", "RunReboot"]
    assert actions[0].key == "reboot.announced" and actions[0].resolved  # type: ignore[union-attr]
    assert actions[1] == RunReboot(("sudo", "shutdown", "-r", "now"), "wired memory stranded")

    state, actions = decide_reboot(state, RebootLedger(), ON, True, 401.0, WALL + 301)
    assert actions == ()  # never a second RunReboot in the same episode


def test_cancel_stops_the_reboot_for_the_episode() -> None:
    """After `llmctl reboot cancel` no reboot runs while the condition lasts; only an alert."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    state = cancel(state)
    assert state.phase == "cancelled"
    for t in (400.0, 5000.0, 50_000.0):
        state, actions = decide_reboot(state, RebootLedger(), ON, True, t, WALL + t)
        assert not any(isinstance(a, (RunReboot, EscalateReboot)) for a in actions)
        assert any(
            isinstance(a, Alert) and a.key == "reboot.required" and not a.resolved for a in actions
        )


def test_a_new_episode_after_a_cancel_can_announce_again() -> None:
    """Once the condition clears, a later episode is announced again."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    state = cancel(state)
    state, actions = decide_reboot(state, RebootLedger(), ON, False, 200.0, WALL + 100)
    assert state.phase == "idle" and all(isinstance(a, Alert) and a.resolved for a in actions)
    state, actions = decide_reboot(state, RebootLedger(), ON, True, 300.0, WALL + 200)
    assert state.phase == "announced"


def test_cancel_with_nothing_announced_changes_nothing() -> None:
    """Cancelling when idle (or after the reboot ran) leaves the state as it is."""
    assert cancel(RebootState()) == RebootState()
    executed = RebootState("executed", 1.0, 2.0, "x")
    assert cancel(executed) == executed


def test_condition_clearing_calls_off_an_announced_reboot() -> None:
    """If the memory comes back during the grace, the reboot is called off with a resolved alert."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    state, actions = decide_reboot(state, RebootLedger(), ON, False, 200.0, WALL + 100)
    assert state.phase == "idle"
    assert len(actions) == 1 and isinstance(actions[0], Alert)
    assert actions[0].key == "reboot.announced" and actions[0].resolved


@pytest.mark.parametrize(
    ("last_reboot_ago_s", "reboots"),
    [
        (3600.0, False),  # 1 h ago, cooldown 6 h
        (21599.0, False),
        (21600.0, True),
        (-60.0, False),  # ledger ahead of the wall clock (clock stepped back): stay safe
    ],
)
def test_at_most_one_reboot_per_cooldown(last_reboot_ago_s: float, reboots: bool) -> None:
    """Inside the cooldown after the last reboot only an alert is raised."""
    ledger = record_reboot(RebootLedger(), WALL - last_reboot_ago_s)
    state, actions = decide_reboot(RebootState(), ledger, ON, True, 100.0, WALL)
    assert (state.phase == "announced") is reboots
    if not reboots:
        assert kinds(actions) == ["Alert"] and "cooldown" in actions[0].summary  # type: ignore[union-attr]


def test_cooldown_is_rechecked_when_the_grace_ends() -> None:
    """A reboot recorded during the grace (another path) blocks the announced one."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    ledger = record_reboot(RebootLedger(), WALL + 10)
    state, actions = decide_reboot(state, ledger, ON, True, 400.0, WALL + 300)
    assert not any(isinstance(a, RunReboot) for a in actions)
    assert state.phase == "required"


def test_ledger_uses_wall_time_across_the_reboot() -> None:
    """The ledger survives a reboot: monotonic time restarts near 0, the wall-clock cooldown still holds."""
    ledger = ledger_from_record(ledger_to_record(record_reboot(RebootLedger(), WALL)))
    # After the reboot: monotonic now_s is small again, wall time moved on 10 minutes.
    state, actions = decide_reboot(RebootState(), ledger, ON, True, 5.0, WALL + 600)
    assert state.phase == "required"
    assert in_cooldown(ledger, ON, WALL + 600) and not in_cooldown(ledger, ON, WALL + 21600)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"argv": "sudo shutdown -r now"}, "not a shell string"),
        ({"argv": ()}, "non-empty list"),
        ({"argv": ("sudo", "")}, "non-empty list of non-empty strings"),
        ({"argv": ("sudo", 5)}, "non-empty list of non-empty strings"),
        ({"grace_s": 5}, "llmctl reboot cancel"),
        ({"cooldown_s": 60}, "reboot loop"),
        ({"enabled": "yes"}, "true or false"),
    ],
)
def test_invalid_reboot_settings(kwargs: dict[str, object], needle: str) -> None:
    """A shell-string argv, a tiny grace or cooldown are rejected with the reason."""
    with pytest.raises(ValueError, match=needle):
        RebootSettings(**kwargs)  # type: ignore[arg-type]


def test_argv_list_is_kept_as_a_tuple() -> None:
    """A list argv from TOML becomes an immutable tuple carried unchanged to RunReboot."""
    assert RebootSettings(argv=["/sbin/reboot"]).argv == ("/sbin/reboot",)  # type: ignore[arg-type]


@pytest.mark.parametrize("xid", [48, 62, 64, 95, 119, 120])
def test_reset_class_xid_stops_engines_and_alerts(xid: int) -> None:
    """A reset-class XID stops the engines on that GPU and alerts 'GPU reset required'."""
    state, actions = decide_xid(xid, 1, ["vllm"], RebootState(), RebootLedger(), ON, 10.0, WALL)
    assert state == RebootState()
    assert isinstance(actions[0], Stop) and actions[0].engine == "vllm"
    alert = actions[-1]
    assert isinstance(alert, Alert) and alert.key == "gpu.reset_required:1"
    assert "GPU reset required" in alert.summary and f"XID {xid}" in alert.summary
    assert not any(isinstance(a, (EscalateReboot, RunReboot)) for a in actions)


def test_xid_79_takes_the_reboot_path() -> None:
    """XID 79 (fallen off the bus) stops the engines and announces a reboot when enabled."""
    state, actions = decide_xid(79, 0, ["vllm"], RebootState(), RebootLedger(), ON, 10.0, WALL)
    assert state.phase == "announced" and "XID 79" in (state.reason or "")
    assert kinds(actions) == ["Stop", "Alert", "Alert", "EscalateReboot"]
    state, actions = decide_xid(79, 0, ["vllm"], RebootState(), RebootLedger(), OFF, 10.0, WALL)
    assert state.phase == "required" and not any(isinstance(a, EscalateReboot) for a in actions)


def test_application_xids_are_left_alone() -> None:
    """An application XID (13) does nothing here; the engine's own crash handling applies."""
    assert decide_xid(13, 0, ["vllm"], RebootState(), RebootLedger(), ON, 10.0, WALL) == (
        RebootState(),
        (),
    )


@pytest.mark.parametrize(
    ("boot_offset_s", "wired", "rebooted", "memory_back", "alert_key", "resolved"),
    [
        (120.0, 7 * GB, True, True, "memory.stranded", True),
        (120.0, 200 * GB, True, False, "reboot.did_not_free", False),
        (-3600.0, 260 * GB, False, False, "reboot.not_happened", False),
    ],
)
def test_verify_after_reboot(
    boot_offset_s: float,
    wired: int,
    rebooted: bool,
    memory_back: bool,
    alert_key: str,
    resolved: bool,
) -> None:
    """After the reboot the daemon says whether it happened and whether the memory came back."""
    ledger = record_reboot(RebootLedger(), WALL)
    result = verify_after_reboot(ledger, WALL + boot_offset_s, 6 * GB, wired, 32 * GB)
    assert (result.rebooted, result.memory_back) == (rebooted, memory_back)
    assert (
        result.alert is not None
        and result.alert.key == alert_key
        and result.alert.resolved is resolved
    )


def test_verify_without_a_recorded_reboot_says_nothing() -> None:
    """With no reboot in the ledger there is nothing to verify."""
    result = verify_after_reboot(RebootLedger(), WALL, 6 * GB, 7 * GB, 32 * GB)
    assert result.alert is None and result.rebooted is False


def test_a_bad_ledger_record_is_named() -> None:
    """A persisted reboot ledger that is not a list of timestamps is refused with what is valid."""
    with pytest.raises(ValueError, match="list of Unix timestamps"):
        ledger_from_record("yesterday")


def test_no_verdict_changes_nothing() -> None:
    """Inside the reclaim window after an exit (no verdict) a pending reboot neither runs nor is called off."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    assert decide_reboot(state, RebootLedger(), ON, None, 500.0, WALL + 400) == (state, ())
    cancelled = cancel(state)
    assert decide_reboot(cancelled, RebootLedger(), ON, None, 500.0, WALL + 400) == (cancelled, ())


def test_no_reboot_is_announced_while_an_engine_is_resident() -> None:
    """Stranded memory next to a resident engine: reboot required and named, never announced, until it stops."""
    state, actions = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL, resident_engines=["big"])
    assert state.phase == "required" and kinds(actions) == ["Alert"]
    assert "big is resident" in actions[0].summary  # type: ignore[union-attr]
    state, actions = decide_reboot(state, RebootLedger(), ON, True, 5000.0, WALL, resident_engines=["big"])
    assert not any(isinstance(a, (RunReboot, EscalateReboot)) for a in actions)
    state, actions = decide_reboot(state, RebootLedger(), ON, True, 5001.0, WALL, resident_engines=[])
    assert state.phase == "announced" and state.execute_at_s == 5301.0  # the full grace, announced afresh
    # "Required" ends as the announcement begins.
    assert [(a.key, a.resolved) for a in actions if isinstance(a, Alert)] == [  # type: ignore[attr-defined]
        ("reboot.required", True), ("reboot.announced", False)]


def test_an_announced_reboot_does_not_run_once_an_engine_became_resident() -> None:
    """An engine started during the grace: at the deadline the reboot is not run; it is required instead."""
    state, _ = decide_reboot(RebootState(), RebootLedger(), ON, True, 100.0, WALL)
    state, actions = decide_reboot(state, RebootLedger(), ON, True, 400.0, WALL + 300, resident_engines=["e"])
    assert state.phase == "required"
    assert not any(isinstance(a, RunReboot) for a in actions)


@pytest.mark.parametrize(
    ("phase", "same_boot", "expected"),
    [
        ("cancelled", True, "cancelled"),
        ("required", True, "required"),
        ("announced", True, "idle"),
        ("executed", True, "idle"),
        ("cancelled", False, "idle"),
        ("bogus", True, "idle"),
        (None, True, "idle"),
    ],
)
def test_a_restarted_daemon_keeps_a_cancel_for_the_rest_of_the_boot(phase: object, same_boot: bool,
                                                                     expected: str) -> None:
    """A person's cancel holds across a daemon restart in the same boot; an announced reboot is announced afresh."""
    assert state_after_restart(phase, same_boot=same_boot).phase == expected


def test_a_new_boot_resolves_the_episodes_of_the_boot_before() -> None:
    """After a reboot (also one by hand) stranded memory and the reboot steps are resolved; other episodes stay open."""
    open_keys = ["engine.exited:qwen", "memory.stranded", "reboot.required", "reboot.announced", "gpu.lost:0"]
    resolved = on_new_boot(open_keys)
    assert [(a.key, a.resolved) for a in resolved] == [
        ("memory.stranded", True), ("reboot.required", True), ("reboot.announced", True)]
    assert all("rebooted" in a.summary for a in resolved)
    assert on_new_boot(["engine.exited:qwen"]) == ()


# ---- when a GPU's episodes end -------------------------------------------------------------------

LOST = {"device_index": 1, "uuid": "GPU-b", "boot_id": "boot-A"}
RESET = {"device_index": 0, "uuid": "GPU-a", "boot_id": "boot-A", "xid": 48}


def test_gpu_episodes_carry_the_uuid_and_boot_they_opened_in() -> None:
    """The lost and reset alerts name the GPU's uuid (indexes shift when a GPU drops off) and the boot."""
    _, actions = decide_xid(48, 0, [], RebootState(), RebootLedger(), OFF, 1.0, WALL, uuid="GPU-a", boot_id="boot-A")
    assert isinstance(actions[-1], Alert) and actions[-1].details["uuid"] == "GPU-a"
    assert actions[-1].details["boot_id"] == "boot-A"
    _, actions = decide_gpu_lost(1, [], RebootState(), RebootLedger(), OFF, 1.0, WALL, uuid="GPU-b", boot_id="boot-A")
    lost = next(a for a in actions if isinstance(a, Alert) and a.key == "gpu.lost:1")
    assert (lost.details["uuid"], lost.details["boot_id"]) == ("GPU-b", "boot-A")


@pytest.mark.parametrize(
    ("answering", "boot", "resolved"),
    [
        # It answers again: back while the daemon watched, or a daemon started since sees it (same boot or not).
        ([GpuAnswer(1, "GPU-b", again=True)], "boot-A", True),
        ([GpuAnswer(0, "GPU-b", again=True)], "boot-B", True),  # after a reboot under another index
        # Answering all along (XID 79 while NVML still read it) is no news; an engine serving from it is.
        ([GpuAnswer(1, "GPU-b")], "boot-A", False),
        ([GpuAnswer(1, "GPU-b", serving=("qwen",))], "boot-A", True),
        # Still missing, also on a new boot: another GPU that took its index is not it.
        ([], "boot-B", False),
        ([GpuAnswer(1, "GPU-c", again=True)], "boot-B", False),
        ([GpuAnswer(0, "GPU-a", again=True)], "boot-B", False),
    ],
)
def test_gpu_lost_ends_only_when_that_gpu_answers_nvml_again(answering: list[GpuAnswer], boot: str,
                                                               resolved: bool) -> None:
    """gpu.lost ends on positive evidence the GPU is back, never on a boot change alone."""
    alerts = gpu_episodes_over({"gpu.lost:1": LOST}, answering, boot)
    assert [(a.key, a.resolved) for a in alerts] == ([("gpu.lost:1", True)] if resolved else [])


@pytest.mark.parametrize(
    ("answering", "boot", "resolved"),
    [
        # A GPU that needs a reset still answers NVML: that, or a daemon restart in the same boot, proves nothing.
        ([GpuAnswer(0, "GPU-a")], "boot-A", False),
        ([GpuAnswer(0, "GPU-a", again=True)], "boot-A", False),
        # A reboot resets every GPU: it answering in a later boot ends the episode; missing, it does not.
        ([GpuAnswer(0, "GPU-a", again=True)], "boot-B", True),
        ([GpuAnswer(0, "GPU-z", again=True)], "boot-B", False),
        ([], "boot-B", False),
        # After a reset (`nvidia-smi -r`) the GPU works: an engine is ready and holds memory on it.
        ([GpuAnswer(0, "GPU-a", serving=("qwen",))], "boot-A", True),
        ([GpuAnswer(1, "GPU-b", serving=("qwen",))], "boot-A", False),
    ],
)
def test_gpu_reset_required_ends_when_the_gpu_works_after_a_reset(answering: list[GpuAnswer], boot: str,
                                                                    resolved: bool) -> None:
    """gpu.reset_required ends when an engine serves from the GPU again, or it answers NVML after a reboot."""
    alerts = gpu_episodes_over({"gpu.reset_required:0": RESET}, answering, boot)
    assert [(a.key, a.resolved) for a in alerts] == ([("gpu.reset_required:0", True)] if resolved else [])


def test_gpu_episodes_say_why_they_end_and_leave_other_episodes_alone() -> None:
    """Each resolve names its evidence; episodes of older daemons (no uuid) match by index; others stay open."""
    open_episodes = {"gpu.lost:1": {"device_index": 1}, "gpu.reset_required:0": RESET, "engine.exited:qwen": {},
                     "gpu.memory_not_returned:qwen": {}, "reboot.required": {}}
    alerts = gpu_episodes_over(open_episodes, [GpuAnswer(0, "GPU-a", "H100", serving=("qwen",)),
                                               GpuAnswer(1, "GPU-b", "H100", again=True)], "boot-A")
    summaries = {a.key: a.summary for a in alerts}
    assert sorted(summaries) == ["gpu.lost:1", "gpu.reset_required:0"] and all(a.resolved for a in alerts)
    assert "answers NVML again" in summaries["gpu.lost:1"]
    assert "qwen" in summaries["gpu.reset_required:0"] and "serving" in summaries["gpu.reset_required:0"]
    rebooted = gpu_episodes_over({"gpu.reset_required:0": RESET}, [GpuAnswer(0, "GPU-a", again=True)], "boot-B")
    assert "reboot" in rebooted[0].summary
    # Without its boot (an older daemon's episode) a reboot cannot be told apart from a daemon restart.
    assert gpu_episodes_over({"gpu.reset_required:0": {"device_index": 0}}, [GpuAnswer(0, "GPU-a", again=True)],
                             "boot-B") == ()


@pytest.mark.parametrize(("missing_s", "device_error", "probe_error", "lost"), [
    (None, "NVMLError: GPU is lost", None, True),  # NVML says so: at once
    (None, None, "NVML cannot count devices (NVMLError: GPU is lost)", True),
    (9.0, None, None, False),  # a driver that answers late once is not a lost GPU
    (10.0, None, None, True),
    (10.0, "NVMLError: Unknown Error", None, True),
    (600.0, None, "NVML cannot count devices (NVMLError: Timeout)", False),  # a failed reading: no evidence
    (None, None, "NVML cannot count devices (NVMLError: Timeout)", False),
])
def test_gpu_lost_cause(missing_s: float | None, device_error: str | None, probe_error: str | None,
                        lost: bool) -> None:
    cause = gpu_lost_cause(1, "H200", missing_s=missing_s, lost_after_s=10.0, device_error=device_error,
                           probe_error=probe_error)
    assert (cause is not None) is lost, cause


def test_nvml_failing_alert_waits_a_minute_and_leaves_a_lost_gpu_to_gpu_lost() -> None:
    args = {"devices_seen": 2, "raised": False}
    assert nvml_failing_alert(failing_since_s=0.0, now_s=59.0, error="Timeout", **args) is None
    warning = nvml_failing_alert(failing_since_s=0.0, now_s=60.0, error="Timeout", **args)
    assert warning is not None and warning.severity == "warning" and not warning.resolved
    assert nvml_failing_alert(failing_since_s=0.0, now_s=600.0, error="NVMLError: GPU is lost", **args) is None
    assert nvml_failing_alert(failing_since_s=0.0, now_s=600.0, error="Timeout", devices_seen=0, raised=False) is None
    resolved = nvml_failing_alert(failing_since_s=None, now_s=600.0, error=None, devices_seen=2, raised=True)
    assert resolved is not None and resolved.resolved
