"""Stranded wired memory: baseline learning and assessment on captured vm_stat samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policies.stranded import (
    STRANDED_ALERT_KEY,
    BaselineState,
    StrandedSettings,
    assess_stranded,
    update_baseline,
)

GB = 10**9
VM_STAT = Path(__file__).resolve().parent.parent / "fixtures" / "vm_stat"
S = StrandedSettings()


def wired_bytes(name: str) -> int:
    """Wired bytes of a captured vm_stat sample: 'Pages wired down' x the header's page size."""
    text = (VM_STAT / name).read_text()
    page = re.search(r"page size of (\d+) bytes", text)
    pages = re.search(r"^Pages wired down:\s+(\d+)\.", text, re.MULTILINE)
    assert page and pages, name
    return int(pages.group(1)) * int(page.group(1))


IDLE = wired_bytes("studio-512gb-idle.txt")
LOADED_8BIT = wired_bytes("studio-512gb-8bit-loaded.txt")
LOADED_4BIT = wired_bytes("studio-512gb-4bit-loaded.txt")
STRANDED = wired_bytes("studio-512gb-stranded-after-hang.txt")


def learned(samples: list[int], boot: str = "boot-1") -> BaselineState:
    state = BaselineState()
    for i, wired in enumerate(samples):
        state = update_baseline(
            state,
            boot_id=boot,
            wired_bytes=wired,
            engine_resident=False,
            last_exit_at_s=None,
            now_s=1000.0 + i,
            settings=S,
        )
    return state


def test_fixture_numbers_are_the_situations_described() -> None:
    """The captured samples read as documented: ~6 GB idle, ~251/~126 GB loaded, ~263 GB stranded."""
    assert 5 * GB < IDLE < 8 * GB
    assert 240 * GB < LOADED_8BIT < 260 * GB
    assert 120 * GB < LOADED_4BIT < 130 * GB
    assert 255 * GB < STRANDED < 270 * GB


def test_baseline_needs_settled_idle_samples() -> None:
    """The baseline is set only after enough idle samples, and is their minimum."""
    assert learned([IDLE, IDLE]).baseline_wired_bytes is None
    assert learned([IDLE + GB, IDLE, IDLE + 2 * GB]).baseline_wired_bytes == IDLE


@pytest.mark.parametrize(
    ("engine_resident", "last_exit_at_s", "changes"),
    [
        (True, None, False),  # an engine is resident: its memory is not the baseline
        (False, 1000.0, False),  # 50 s after an exit: memory still coming back
        (False, 900.0, True),  # 150 s after an exit: settled
        (False, None, True),
    ],
)
def test_baseline_updates_only_when_settled(
    engine_resident: bool, last_exit_at_s: float | None, changes: bool
) -> None:
    """A lower sample moves the baseline only with no engine resident and no recent exit."""
    state = learned([IDLE] * 3)
    after = update_baseline(
        state,
        boot_id="boot-1",
        wired_bytes=IDLE - GB,
        engine_resident=engine_resident,
        last_exit_at_s=last_exit_at_s,
        now_s=1050.0,
        settings=S,
    )
    assert (after.baseline_wired_bytes == IDLE - GB) is changes


def test_stranded_idle_samples_do_not_raise_the_baseline() -> None:
    """Idle samples taken while memory is stranded never teach the baseline that this is normal."""
    state = learned([IDLE] * 3)
    for i in range(20):
        state = update_baseline(
            state,
            boot_id="boot-1",
            wired_bytes=STRANDED,
            engine_resident=False,
            last_exit_at_s=None,
            now_s=5000.0 + i,
            settings=S,
        )
    assert state.baseline_wired_bytes == IDLE


def test_a_new_boot_learns_a_new_baseline() -> None:
    """After a reboot the old baseline stands in until the new boot has idle samples of its own."""
    state = learned([IDLE] * 3)

    def sample(s: BaselineState, wired: int, resident: bool = False) -> BaselineState:
        return update_baseline(
            s,
            boot_id="boot-2",
            wired_bytes=wired,
            engine_resident=resident,
            last_exit_at_s=None,
            now_s=10.0,
            settings=S,
        )

    state = sample(state, LOADED_4BIT, resident=True)  # the engine started right after boot
    assert state.boot_id == "boot-2" and state.provisional and state.baseline_wired_bytes == IDLE
    state = sample(sample(sample(state, IDLE + GB), IDLE + GB), IDLE + GB)
    assert not state.provisional and state.baseline_wired_bytes == IDLE + GB  # the new boot's own


def test_hang_leaves_memory_stranded_and_alerts_reboot_required() -> None:
    """After a GPU hang with no engine running, ~257 GB is stranded: a critical 'reboot required' alert."""
    result = assess_stranded(IDLE, STRANDED, 0, last_exit_at_s=100.0, now_s=400.0, settings=S)
    assert result.stranded_bytes == STRANDED - IDLE
    assert result.over_threshold
    assert result.alert is not None
    assert result.alert.key == STRANDED_ALERT_KEY and result.alert.severity == "critical"
    assert not result.alert.resolved
    assert (
        f"wired memory stranded: {(STRANDED - IDLE) / GB:.1f} GB; reboot required"
        in result.alert.summary
    )


def test_nothing_is_stranded_inside_the_reclaim_window() -> None:
    """Right after an exit the wired memory is still coming back: 0 stranded, no alert."""
    result = assess_stranded(IDLE, STRANDED, 0, last_exit_at_s=100.0, now_s=160.0, settings=S)
    assert result.stranded_bytes == 0 and result.reclaiming and result.alert is None


@pytest.mark.parametrize(
    ("sample", "live_bytes"),
    [
        ("studio-512gb-8bit-loaded.txt", LOADED_8BIT - IDLE),
        ("studio-512gb-4bit-loaded.txt", LOADED_4BIT - IDLE),
        ("studio-512gb-idle.txt", 0),
    ],
)
def test_a_live_engine_s_memory_is_not_stranded(sample: str, live_bytes: int) -> None:
    """Memory the resident engine accounts for is not stranded."""
    result = assess_stranded(IDLE, wired_bytes(sample), live_bytes, None, 1000.0, S)
    assert result.stranded_bytes == 0 and result.alert is None


def test_small_drift_is_tolerated_and_moderate_excess_is_reported_without_alert() -> None:
    """A GB of drift is noise; 10 GB is stranded but below the 32 GB alert threshold."""
    assert assess_stranded(IDLE, IDLE + GB, 0, None, 1000.0, S).stranded_bytes == 0
    moderate = assess_stranded(IDLE, IDLE + 10 * GB, 0, None, 1000.0, S)
    assert moderate.stranded_bytes == 10 * GB and moderate.alert is None


def test_alert_resolves_when_memory_falls_back() -> None:
    """An open stranded alert is resolved once wired memory is back near the baseline."""
    result = assess_stranded(IDLE, IDLE, 0, None, 1000.0, S, alert_active=True)
    assert (
        result.alert is not None
        and result.alert.resolved
        and result.alert.key == STRANDED_ALERT_KEY
    )
    assert assess_stranded(IDLE, IDLE, 0, None, 1000.0, S, alert_active=False).alert is None


def test_without_a_baseline_nothing_is_judged() -> None:
    """Before any baseline is learned, stranded memory is reported as 0 (unknown), not guessed."""
    assert assess_stranded(None, STRANDED, 0, None, 1000.0, S).stranded_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"threshold_bytes": 0}, "threshold_bytes must be > 0"),
        ({"tolerance_bytes": 40 * GB}, "tolerance_bytes must be >= 0 and below threshold_bytes"),
        ({"reclaim_window_s": -1}, "reclaim_window_s must be >= 0"),
        ({"baseline_min_samples": 20}, "baseline_min_samples must be >= 1"),
    ],
)
def test_invalid_stranded_settings(kwargs: dict[str, float], needle: str) -> None:
    """Nonsense thresholds are rejected with what is valid."""
    with pytest.raises(ValueError, match=needle):
        StrandedSettings(**kwargs)  # type: ignore[arg-type]
