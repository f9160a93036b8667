"""The exit-episode policy: every unplanned exit opens a warning, a crash loop raises it, ready resolves it."""

from __future__ import annotations

import pytest

from policies import backoff, episodes
from policies.actions import Alert, MarkFailed, WaitUntil
from probes.readings import Diagnosis

METAL_OOM = Diagnosis(cause="Metal ran out of GPU memory (kIOGPUCommandBufferCallbackErrorOutOfMemory)",
                      remedy="use a smaller quantisation or raise iogpu.wired_limit_mb", line="…",
                      signature="mlx.metal_oom")


def facts(**overrides: object) -> episodes.ExitFacts:
    fields: dict[str, object] = {
        "engine": "qwen", "code": None, "signal": "SIGKILL", "reason": "killed by SIGKILL", "diagnosis": None,
        "next_start_in_s": 60.0, "next_start_at": "2026-11-30 14:03:12 UTC", "consecutive_failures": 1,
    }
    fields.update(overrides)
    return episodes.ExitFacts(**fields)  # type: ignore[arg-type]


WAIT = (WaitUntil(160.0, "backoff"),)
LOOP = (MarkFailed("qwen", "5 failures within 30m00s"),
        Alert(key="engine.failed:qwen", severity="critical", summary="qwen failed 5 times within 30m00s (last: x); "
              "it will not be restarted automatically. Fix the cause, then run `llmctl start qwen`",
              details={"engine": "qwen", "failures": 5}))


@pytest.mark.parametrize(
    ("exit_facts", "decided", "alert_on_exit", "expected"),
    [
        (facts(), WAIT, True, [("engine.exited:qwen", "warning", "SIGKILL")]),
        (facts(signal=None, code=1, reason="exited with code 1"), WAIT, True,
         [("engine.exited:qwen", "warning", "code 1")]),
        (facts(signal=None, reason="hang restart: no token for 15s"), WAIT, True,
         [("engine.exited:qwen", "warning", "hang")]),
        (facts(signal=None, reason="no successful generation within start_timeout 900s"), WAIT, True,
         [("engine.exited:qwen", "warning", "start timeout")]),
        (facts(next_start_in_s=None, next_start_at=None), LOOP, True, [("engine.exited:qwen", "critical", "SIGKILL")]),
        (facts(), WAIT, False, []),
        (facts(next_start_in_s=None, next_start_at=None), LOOP, False, [("engine.failed:qwen", "critical", None)]),
    ],
    ids=["sigkill", "exit-code", "hang-restart", "start-timeout", "crash-loop-raises", "off", "off-crash-loop-still"],
)
def test_unplanned_exit_alerts(exit_facts: episodes.ExitFacts, decided: tuple, alert_on_exit: bool,
                               expected: list[tuple]) -> None:
    """Each kind of unplanned exit opens the engine.exited episode; a crash loop raises that same key to critical."""
    alerts = episodes.on_unplanned_exit(exit_facts, decided, alert_on_exit=alert_on_exit)
    assert [(a.key, a.severity, a.details.get("exit")) for a in alerts] == expected


def test_the_warning_names_the_exit_the_diagnosis_and_the_next_start() -> None:
    """A user reads what killed the engine, the cause and remedy from its log, and when it comes back."""
    [alert] = episodes.on_unplanned_exit(facts(diagnosis=METAL_OOM, reason=f"killed by SIGABRT: {METAL_OOM.cause}",
                                               signal="SIGABRT"), WAIT, alert_on_exit=True)
    assert alert.summary == (f"qwen went down: killed by SIGABRT: {METAL_OOM.cause}; remedy: {METAL_OOM.remedy}; "
                             "next start at 2026-11-30 14:03:12 UTC (in 1m00s)")
    assert alert.details["cause"] == METAL_OOM.cause and alert.details["remedy"] == METAL_OOM.remedy
    assert alert.details["next_start_at"] == "2026-11-30 14:03:12 UTC"
    assert alert.details["signal"] == "SIGABRT" and alert.details["crash_loop"] is False


def test_the_crash_loop_alert_keeps_the_backoff_summary_and_numbers() -> None:
    """The raised episode says it will not be restarted and how to start it again, with the failure count."""
    [alert] = episodes.on_unplanned_exit(facts(diagnosis=METAL_OOM, next_start_in_s=None, next_start_at=None),
                                         LOOP, alert_on_exit=True)
    assert "will not be restarted automatically" in alert.summary and "llmctl start qwen" in alert.summary
    assert METAL_OOM.remedy in alert.summary
    assert alert.details["failures"] == 5 and alert.details["crash_loop"] is True


def test_a_real_backoff_sequence_gives_warnings_then_one_critical() -> None:
    """Five failures in a row: the same episode key each time, warning until the crash loop makes it critical."""
    settings = backoff.BackoffSettings()
    state = backoff.BackoffState(engine="qwen")
    severities = []
    now = 0.0
    for _ in range(5):
        state = backoff.record_spawn(state, now)
        now += 5.0
        state = backoff.record_exit(state, now, 0.0, "killed by SIGKILL", settings=settings)
        decided = backoff.decide_after_exit(state, settings, now)
        [alert] = episodes.on_unplanned_exit(facts(), decided, alert_on_exit=True)
        assert alert.key == "engine.exited:qwen"
        severities.append(alert.severity)
        now = backoff.next_start_at(state, settings, now)
    assert severities == ["warning"] * 4 + ["critical"]


def test_ready_resolves_every_open_episode_of_that_engine_only() -> None:
    """Ready again closes qwen's exit, hung and failed episodes, not another engine's nor daemon-wide ones."""
    open_keys = ["engine.exited:qwen", "engine.hung:qwen", "engine.failed:qwen", "engine.exited:llama",
                 "memory.stranded", "swap.failed:llama"]
    resolved = episodes.on_ready("qwen", open_keys)
    assert [a.key for a in resolved] == ["engine.exited:qwen", "engine.hung:qwen", "engine.failed:qwen"]
    assert all(a.resolved for a in resolved)


def test_a_failed_swap_to_an_engine_ends_when_it_is_ready_or_a_person_stops_it() -> None:
    """swap.failed and the memory that did not come back before its start end with the target's other
    episodes (regression: nothing ever resolved them, and the next failure of the same swap was dropped)."""
    open_keys = ["swap.failed:qwen", "swap.memory_not_returned:qwen", "gpu.memory_not_returned:qwen",
                 "swap.failed:llama", "engine.start_refused:qwen"]
    mine = ["swap.failed:qwen", "swap.memory_not_returned:qwen", "gpu.memory_not_returned:qwen",
            "engine.start_refused:qwen"]
    for decide in (episodes.on_ready, episodes.on_stopped_by_person):
        resolved = decide("qwen", open_keys)
        assert [a.key for a in resolved] == mine
        assert all(a.resolved and a.details == {"engine": "qwen"} for a in resolved)


def test_a_persons_stop_resolves_the_engines_episodes_saying_so() -> None:
    """llmctl stop on a crashed engine closes its exit episode, naming the stop; other engines' stay open."""
    resolved = episodes.on_stopped_by_person("qwen", ["engine.exited:qwen", "engine.exited:llama"])
    assert [(a.key, a.resolved) for a in resolved] == [("engine.exited:qwen", True)]
    assert "llmctl stop" in resolved[0].summary


def test_ready_again_after_a_memory_guard_restart_closes_its_soft_watermark_warning() -> None:
    """The guard's soft-watermark warning (host or GPU) of a run it then restarted: the new run starts low, so
    ready closes it (a new run's guard never saw it high, and would never resolve it)."""
    resolved = episodes.on_ready("qwen", ["engine.memory_high:qwen", "engine.gpu_memory_high:qwen",
                                          "engine.memory_high:llama"])
    assert [a.key for a in resolved] == ["engine.memory_high:qwen", "engine.gpu_memory_high:qwen"]


def test_a_rolled_back_swap_closes_its_targets_exit_episode_saying_no_restart_comes() -> None:
    """The exit episode of a target that crashed while loading announced its next start; the rollback stopped
    it, so that start will not come: the episode closes saying so. swap.failed and others' episodes stay."""
    open_keys = ["engine.exited:qwen", "swap.failed:qwen", "engine.exited:llama"]
    resolved = episodes.on_swap_rolled_back("qwen", open_keys)
    assert [(a.key, a.resolved) for a in resolved] == [("engine.exited:qwen", True)]
    assert "no restart is scheduled" in resolved[0].summary
    assert episodes.on_swap_rolled_back("qwen", ["swap.failed:qwen"]) == ()
