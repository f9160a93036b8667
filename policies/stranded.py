"""Stranded wired memory (macOS): memory that stays wired after the engine that held it is gone.

A Metal GPU hang once left ~245 GB wired with no engine running; ``sudo purge`` did not help and
only a reboot freed it, while every relaunch went out of memory at once. The daemon keeps:

- a **baseline**: wired bytes measured while no engine is resident and the system has settled
  (no exit within the reclaim window), the minimum of recent idle samples. Within one boot it only
  ever goes *down*: an idle sample taken while memory is stranded is high, and must not teach the
  baseline that stranded memory is normal. A new boot (``boot_id`` changes) learns a new
  baseline, since a reboot is exactly what frees stranded memory; until it has enough idle
  samples of its own, the previous boot's baseline stands in (provisional), so that a daemon that
  starts its engine right after boot is not blind to stranded memory for the whole boot. The
  caller persists ``BaselineState``.
- an **assessment**: ``wired - baseline - wired memory the live engines account for``, reported
  as 0 within ``reclaim_window_s`` after an exit (a graceful exit frees its memory in seconds,
  not at once), and above ``threshold_bytes`` a critical alert "reboot required" (resolved once
  it falls back below the threshold).

Pure: the caller passes ``now_s`` and the readings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies._format import gb, require
from policies.actions import Alert

STRANDED_ALERT_KEY = "memory.stranded"


@dataclass(frozen=True, slots=True)
class StrandedSettings:
    """Thresholds for the stranded-memory ledger."""

    reclaim_window_s: float = 120.0
    threshold_bytes: int = 32_000_000_000
    tolerance_bytes: int = 2_000_000_000  # wired memory drifts by this much on an idle Mac
    baseline_min_samples: int = 3
    baseline_recent_samples: int = 10

    def __post_init__(self) -> None:
        require(
            self.reclaim_window_s >= 0,
            f"stranded reclaim_window_s must be >= 0 seconds, got {self.reclaim_window_s!r}",
        )
        require(
            self.threshold_bytes > 0,
            f"stranded threshold_bytes must be > 0 (e.g. 32GB), got {self.threshold_bytes!r}",
        )
        require(
            0 <= self.tolerance_bytes < self.threshold_bytes,
            f"stranded tolerance_bytes must be >= 0 and below threshold_bytes ({self.threshold_bytes!r}), "
            f"got {self.tolerance_bytes!r}",
        )
        require(
            1 <= self.baseline_min_samples <= self.baseline_recent_samples,
            "stranded baseline_min_samples must be >= 1 and <= baseline_recent_samples "
            f"({self.baseline_recent_samples!r}), got {self.baseline_min_samples!r}",
        )


@dataclass(frozen=True, slots=True)
class BaselineState:
    """Persisted idle-wired baseline of one boot."""

    boot_id: str | None = None
    baseline_wired_bytes: int | None = None
    recent_idle_wired_bytes: tuple[int, ...] = ()
    provisional: bool = False  # the baseline is the previous boot's, until this boot learns its own


def is_settled(
    engine_resident: bool, last_exit_at_s: float | None, now_s: float, settings: StrandedSettings
) -> bool:
    """No engine resident, and the last exit (if any) is older than the reclaim window."""
    if engine_resident:
        return False
    return last_exit_at_s is None or now_s - last_exit_at_s >= settings.reclaim_window_s


def update_baseline(
    state: BaselineState,
    *,
    boot_id: str,
    wired_bytes: int,
    engine_resident: bool,
    last_exit_at_s: float | None,
    now_s: float,
    settings: StrandedSettings,
) -> BaselineState:
    """Feed one wired-memory sample; the baseline changes only on settled idle samples.

    The first baseline of a boot needs ``baseline_min_samples`` settled idle samples (until then
    the previous boot's stands in); after that it is ``min(baseline, min(recent idle samples))``.
    """
    require(wired_bytes >= 0, f"wired_bytes must be >= 0, got {wired_bytes!r}")
    if state.boot_id != boot_id:
        state = BaselineState(
            boot_id=boot_id,
            baseline_wired_bytes=state.baseline_wired_bytes,
            provisional=state.baseline_wired_bytes is not None,
        )
    if not is_settled(engine_resident, last_exit_at_s, now_s, settings):
        return state
    recent = (*state.recent_idle_wired_bytes, wired_bytes)[-settings.baseline_recent_samples :]
    own = state.baseline_wired_bytes is not None and not state.provisional
    if not own and len(recent) < settings.baseline_min_samples:
        return replace(state, recent_idle_wired_bytes=recent)
    low = min(recent)
    baseline = min(state.baseline_wired_bytes, low) if own else low  # type: ignore[type-var]
    return replace(
        state, baseline_wired_bytes=baseline, recent_idle_wired_bytes=recent, provisional=False
    )


@dataclass(frozen=True, slots=True)
class StrandedAssessment:
    stranded_bytes: int
    reclaiming: bool  # inside the reclaim window after an exit: not judged yet
    over_threshold: bool
    alert: Alert | None


def assess_stranded(
    baseline_wired_bytes: int | None,
    wired_bytes: int,
    live_engine_wired_bytes: int,
    last_exit_at_s: float | None,
    now_s: float,
    settings: StrandedSettings,
    *,
    alert_active: bool = False,
) -> StrandedAssessment:
    """How much wired memory is stranded now, and the alert it calls for.

    ``live_engine_wired_bytes`` is what the resident engines account for (their footprints).
    With no baseline yet nothing can be judged: 0. ``alert_active`` says whether the stranded
    alert is open, so that a fall below the threshold sends its resolution once.
    """
    reclaiming = last_exit_at_s is not None and now_s - last_exit_at_s < settings.reclaim_window_s
    if baseline_wired_bytes is None or reclaiming:
        stranded = 0
    else:
        excess = wired_bytes - baseline_wired_bytes - max(0, live_engine_wired_bytes)
        stranded = excess if excess > settings.tolerance_bytes else 0
    over = stranded >= settings.threshold_bytes
    alert: Alert | None = None
    details: dict[str, object] = {
        "stranded_bytes": stranded,
        "wired_bytes": wired_bytes,
        "baseline_wired_bytes": baseline_wired_bytes,
        "live_engine_wired_bytes": live_engine_wired_bytes,
        "threshold_bytes": settings.threshold_bytes,
    }
    if over:
        alert = Alert(
            key=STRANDED_ALERT_KEY,
            severity="critical",
            summary=(
                f"wired memory stranded: {gb(stranded)}; reboot required "
                f"({gb(wired_bytes)} wired, idle baseline {gb(baseline_wired_bytes or 0)}, engines "
                f"account for {gb(live_engine_wired_bytes)}; restarts are refused until it is freed)"
            ),
            details=details,
        )
    elif alert_active and not reclaiming:
        alert = Alert(
            key=STRANDED_ALERT_KEY,
            severity="critical",
            summary=f"wired memory no longer stranded: {gb(stranded)} above the idle baseline",
            details=details,
            resolved=True,
        )
    return StrandedAssessment(
        stranded_bytes=stranded, reclaiming=reclaiming, over_threshold=over, alert=alert
    )


__all__ = [
    "STRANDED_ALERT_KEY",
    "BaselineState",
    "StrandedAssessment",
    "StrandedSettings",
    "assess_stranded",
    "is_settled",
    "update_baseline",
]
