"""Reboot escalation: opt-in, announced, cancellable, and at most one per cooldown.

Some failures only a reboot fixes: wired memory stranded by a Metal GPU hang (``sudo purge`` does
not free it) and an NVIDIA GPU that fell off the bus (XID 79). The policy is a small state machine:

    idle ──stranded, disabled or in cooldown──▶ required   (alert only: reboot by hand)
    idle ──stranded, enabled──▶ announced(at_s, execute_at_s, reason)   Alert + EscalateReboot
    announced ──grace over──▶ executed                                  RunReboot(argv)
    announced ──cancel()──▶ cancelled    (no reboot for the rest of this episode)
    any ──condition gone──▶ idle         (resolved alerts)

An *episode* lasts while the condition persists; a cancel holds for the episode, so the next
automatic reboot needs the condition to clear and come back.

The **ledger** of past reboots uses WALL-clock timestamps, unlike everything else here: it must
survive the reboot it records, and the monotonic clock restarts at every boot, so a monotonic
timestamp from before the reboot would be meaningless after it. A ledger entry later than the
current wall time (the clock was stepped back) counts as inside the cooldown: the safe side.
``RebootState`` itself uses monotonic times and belongs to one boot; the caller drops it (after
``verify_after_reboot``) when the boot changes, and closes the alert episodes of the boot that is
over (``on_new_boot``): a reboot, also one a person ran by hand, is what frees stranded memory.

A GPU's own episodes (``gpu.lost:<i>``, ``gpu.reset_required:<i>``) are not ended by a new boot
alone: a GPU still missing after a reboot is still lost, and a daemon only reports a GPU lost that
it has seen, so nothing would report it again. ``gpu_episodes_over`` ends them on evidence that
the GPU is back (``GpuAnswer``, from the daemon's NVML readings).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from policies._format import gb, require, secs
from policies.actions import Action, Alert, EscalateReboot, RunReboot, Stop, WaitUntil
from policies.stranded import STRANDED_ALERT_KEY

RebootPhase = Literal["idle", "required", "announced", "cancelled", "executed"]

# NVIDIA XIDs (driver error codes) that the policy acts on.
XID_FALLEN_OFF_BUS = 79
XID_RESET_REQUIRED: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

_LEDGER_KEPT = 32

# A GPU's own episodes, keyed by its index at the time (``gpu.lost:1``); see ``gpu_episodes_over``.
GPU_LOST = "gpu.lost"
GPU_RESET_REQUIRED = "gpu.reset_required"

# Episodes about one boot that the next boot ends: the memory a reboot frees, and every step of the
# escalation towards that reboot. Where the condition is back in the new boot, its own readings open
# a new episode.
BOOT_EPISODES = (STRANDED_ALERT_KEY, "reboot.required", "reboot.announced", "reboot.failed",
                 "reboot.not_happened", "reboot.did_not_free")


@dataclass(frozen=True, slots=True)
class RebootSettings:
    """Reboot escalation settings; off unless a person turns it on."""

    enabled: bool = False
    grace_s: float = 300.0
    cooldown_s: float = 21600.0
    argv: tuple[str, ...] = ("sudo", "shutdown", "-r", "now")

    def __post_init__(self) -> None:
        require(
            isinstance(self.enabled, bool),
            f"reboot enabled must be true or false, got {self.enabled!r}",
        )
        require(
            self.grace_s >= 30,
            f"reboot grace_s must be >= 30s, got {self.grace_s!r}: the reboot is announced first so a "
            "person has time to run `llmctl reboot cancel`",
        )
        require(
            self.cooldown_s >= 3600,
            f"reboot cooldown_s must be >= 3600s (1h), got {self.cooldown_s!r}: a condition that comes "
            "back after every boot must not turn into a reboot loop",
        )
        argv = self.argv
        require(
            not isinstance(argv, (str, bytes)),
            f'reboot argv must be a list of strings such as ["sudo", "shutdown", "-r", "now"], '
            f"not a shell string: got {argv!r}",
        )
        require(
            isinstance(argv, (list, tuple))
            and len(argv) > 0
            and all(isinstance(a, str) and a for a in argv),
            f"reboot argv must be a non-empty list of non-empty strings such as "
            f'["sudo", "shutdown", "-r", "now"], got {argv!r}',
        )
        object.__setattr__(self, "argv", tuple(argv))


@dataclass(frozen=True, slots=True)
class RebootState:
    """Where the escalation stands in this boot (monotonic seconds)."""

    phase: RebootPhase = "idle"
    announced_at_s: float | None = None
    execute_at_s: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RebootLedger:
    """Past automatic reboots as wall-clock Unix timestamps (see the module docstring for why)."""

    reboots_wall_s: tuple[float, ...] = ()

    @property
    def last_wall_s(self) -> float | None:
        return max(self.reboots_wall_s) if self.reboots_wall_s else None


def record_reboot(ledger: RebootLedger, now_wall: float) -> RebootLedger:
    """Add a reboot; the runtime persists the result *before* running the reboot argv."""
    return RebootLedger((*ledger.reboots_wall_s, now_wall)[-_LEDGER_KEPT:])


def in_cooldown(ledger: RebootLedger, settings: RebootSettings, now_wall: float) -> bool:
    """True inside the cooldown after the last reboot, and when the ledger is ahead of the clock."""
    last = ledger.last_wall_s
    if last is None:
        return False
    return now_wall < last or now_wall - last < settings.cooldown_s


def cancel(state: RebootState) -> RebootState:
    """``llmctl reboot cancel``: an announced reboot will not run, nor will another this episode.

    Cancelling while the reboot is only ``required`` (escalation off or in cooldown) also holds
    for the episode. With nothing to cancel (idle) or once executed, the state is returned
    unchanged: the caller tells the person there was nothing to cancel.
    """
    if state.phase in ("announced", "required"):
        return replace(state, phase="cancelled")
    return state


def decide_reboot(
    state: RebootState,
    ledger: RebootLedger,
    settings: RebootSettings,
    stranded_persisting: bool | None,
    now_s: float,
    now_wall: float,
    reason: str = "wired memory stranded",
    resident_engines: Sequence[str] = (),
) -> tuple[RebootState, tuple[Action, ...]]:
    """One step of the escalation; call it on every assessment tick (and on a timer while a
    reboot is pending: nothing else steps it where no memory reading comes, as on Linux).

    ``stranded_persisting`` is the condition that needs a reboot (stranded memory above its
    threshold, or a GPU lost). ``None`` means no verdict (inside the reclaim window after an
    exit): nothing changes, neither the episode nor a pending reboot, which waits for a verdict.
    ``resident_engines`` are engines that are resident or serving now: while there is one, the
    reboot is neither announced nor run (it would cut off a working engine); it is required, and
    announced afresh, with its full grace, once they have stopped.
    Returns the new state and the actions to carry out.
    """
    if stranded_persisting is None:
        return state, ()
    if not stranded_persisting:
        if state.phase == "announced":
            return RebootState(), (
                Alert(
                    "reboot.announced",
                    "critical",
                    f"reboot called off: {state.reason or reason} cleared",
                    resolved=True,
                ),
            )
        if state.phase in ("required", "cancelled"):
            return RebootState(), (
                Alert(
                    "reboot.required",
                    "critical",
                    f"reboot no longer required: {state.reason or reason} cleared",
                    resolved=True,
                ),
            )
        return RebootState(), ()

    if state.phase == "cancelled":
        return state, (
            Alert("reboot.announced", "critical", "reboot cancelled by a person", resolved=True),
            Alert(
                "reboot.required",
                "critical",
                f"reboot required ({state.reason or reason}); the automatic reboot was cancelled, "
                "reboot the machine by hand when convenient",
            ),
        )
    if state.phase == "executed":
        return state, ()

    blocked = _blocked(ledger, settings, now_wall, reason) or _engines_resident(resident_engines, reason)
    if state.phase == "announced":
        assert state.execute_at_s is not None
        if now_s < state.execute_at_s:
            return state, (WaitUntil(state.execute_at_s, f"reboot announced: {state.reason}"),)
        if blocked is not None:
            return RebootState("required", reason=state.reason), (
                Alert("reboot.announced", "critical", "announced reboot not run", resolved=True),
                blocked,
            )
        return RebootState("executed", state.announced_at_s, state.execute_at_s, state.reason), (
            # The announcement's episode ends with the reboot it announced: left open, the outbox would
            # drop the next reboot's announcement as a duplicate, and that reboot would come unwarned.
            Alert("reboot.announced", "critical", f"rebooting now: {state.reason or reason}", resolved=True),
            RunReboot(settings.argv, state.reason or reason),
        )

    # idle or required
    if blocked is not None:
        return RebootState("required", reason=reason), (blocked,)
    execute_at_s = now_s + settings.grace_s
    # "Required" (an engine was resident, or escalation waited) becomes the announcement: that episode ends.
    required_over = ((Alert("reboot.required", "critical", "the reboot is announced now", resolved=True),)
                     if state.phase == "required" else ())
    return RebootState("announced", now_s, execute_at_s, reason), (
        *required_over,
        Alert(
            "reboot.announced",
            "critical",
            f"rebooting in {secs(settings.grace_s)}: {reason}. Run `llmctl reboot cancel` to stop it",
            details={"grace_s": settings.grace_s, "argv": list(settings.argv), "reason": reason},
        ),
        EscalateReboot(execute_at_s, reason),
    )


def _blocked(
    ledger: RebootLedger, settings: RebootSettings, now_wall: float, reason: str
) -> Alert | None:
    """The alert that replaces a reboot when escalation is off or inside the cooldown."""
    if not settings.enabled:
        return Alert(
            "reboot.required",
            "critical",
            f"reboot required ({reason}); automatic reboot is disabled (reboot.enabled = false), "
            "reboot the machine by hand",
            details={"enabled": False},
        )
    if in_cooldown(ledger, settings, now_wall):
        last = ledger.last_wall_s
        assert last is not None
        ago_s = now_wall - last
        return Alert(
            "reboot.required",
            "critical",
            f"reboot required ({reason}), but the last automatic reboot was {secs(max(0.0, ago_s))} ago, "
            f"inside the {secs(settings.cooldown_s)} cooldown; reboot the machine by hand",
            details={"last_reboot_wall_s": last, "cooldown_s": settings.cooldown_s},
        )
    return None


def _engines_resident(resident_engines: Sequence[str], reason: str) -> Alert | None:
    """The alert that replaces a reboot while engines are resident or serving."""
    if not resident_engines:
        return None
    names = ", ".join(resident_engines)
    return Alert(
        "reboot.required",
        "critical",
        f"reboot required ({reason}), but not while {names} "
        f"{'is' if len(resident_engines) == 1 else 'are'} resident; stop "
        f"{'it' if len(resident_engines) == 1 else 'them'} (`llmctl stop NAME`) and the reboot is announced, "
        "or reboot the machine by hand",
        details={"resident_engines": list(resident_engines)},
    )


def decide_xid(
    xid: int,
    device_index: int,
    engines_on_device: Sequence[str],
    state: RebootState,
    ledger: RebootLedger,
    settings: RebootSettings,
    now_s: float,
    now_wall: float,
    *,
    stop_grace_s: float = 30.0,
    uuid: str | None = None,
    boot_id: str | None = None,
) -> tuple[RebootState, tuple[Action, ...]]:
    """Act on an NVIDIA XID event: 79 takes the reboot path; reset-class XIDs stop engines + alert.

    Other XIDs (mostly application faults such as 13, 31, 43) are left to the engine's own
    crash handling: nothing happens here. ``uuid`` (the GPU's) and ``boot_id`` (this boot's) go into
    the alert's details: what ``gpu_episodes_over`` needs to tell when the episode ends.
    """
    if xid == XID_FALLEN_OFF_BUS:
        return decide_gpu_lost(
            device_index,
            engines_on_device,
            state,
            ledger,
            settings,
            now_s,
            now_wall,
            stop_grace_s=stop_grace_s,
            cause=f"GPU {device_index} fell off the bus (XID 79)",
            uuid=uuid,
            boot_id=boot_id,
        )
    what = XID_RESET_REQUIRED.get(xid)
    if what is None:
        return state, ()
    stops = tuple(
        Stop(e, stop_grace_s, f"GPU {device_index} XID {xid}: {what}") for e in engines_on_device
    )
    stopped = f"; stopped {', '.join(engines_on_device)}" if engines_on_device else ""
    return state, (
        *stops,
        Alert(
            f"{GPU_RESET_REQUIRED}:{device_index}",
            "critical",
            f"GPU reset required: GPU {device_index} reported XID {xid} ({what}){stopped}. "
            f"Reset it (`nvidia-smi -r -i {device_index}`) or reboot",
            details={"xid": xid, "device_index": device_index, "engines": list(engines_on_device),
                     **_device_details(uuid, boot_id)},
        ),
    )


def says_gpu_is_lost(error: str) -> bool:
    """NVML_ERROR_GPU_IS_LOST as the probe words it (``NVMLError_GpuIsLost: GPU is lost``)."""
    return "gpuislost" in error.lower().replace(" ", "").replace("_", "")


def gpu_lost_cause(index: int, name: str, *, missing_s: float | None, lost_after_s: float,
                   device_error: str | None, probe_error: str | None) -> str | None:
    """Whether a GPU seen before is lost (the cause, for ``decide_gpu_lost``), or None.

    Lost at once when NVML says so ("GPU is lost", for the device or for the whole reading); lost when NVML
    answered for the machine but not for this GPU (not listed, or an error reading it) for ``lost_after_s``:
    a driver that answers late once is not a lost GPU. ``missing_s``: for how long NVML answered without this
    GPU (None: it did not miss it). ``probe_error``: the whole reading failed (None: NVML answered). A
    reading that failed as a whole with any other error (NVML timing out, or unable to count the devices) is
    no evidence about any one GPU, and the engines on the GPUs may well go on generating: their own watchdog
    judges them, on what they do. Stopping them on a probe's failure would unload models that work and ask
    for a reboot the machine may not need."""
    for error in (device_error, probe_error):
        if error is not None and says_gpu_is_lost(error):
            return f"GPU {index} ({name}) is lost (NVML: {error})"
    if probe_error is not None or missing_s is None or missing_s < lost_after_s:
        return None
    return f"GPU {index} ({name}) has not answered NVML for {missing_s:.0f}s ({device_error or 'no longer listed'})"


NVML_FAILING_KEY = "gpu.probe_failing"
NVML_FAILING_ALERT_AFTER_S = 60.0


def nvml_failing_alert(*, failing_since_s: float | None, now_s: float, error: str | None, devices_seen: int,
                       raised: bool) -> Alert | None:
    """A warning for a person when every NVML reading has failed for ``NVML_FAILING_ALERT_AFTER_S`` on a machine
    whose GPUs answered before (``gpu_lost_cause`` takes no GPU for lost on such readings, so nothing else says
    it), and its resolution once NVML answers again; None when there is nothing to change."""
    if failing_since_s is None:
        return Alert(NVML_FAILING_KEY, "warning", "NVML answers again", resolved=True) if raised else None
    if raised or devices_seen <= 0 or now_s - failing_since_s < NVML_FAILING_ALERT_AFTER_S:
        return None
    if error is not None and says_gpu_is_lost(error):
        return None  # that is gpu.lost's episode, not a probe's failure
    return Alert(NVML_FAILING_KEY, "warning",
                 f"NVML has not answered for {now_s - failing_since_s:.0f}s ({error or 'no reason given'}): the daemon "
                 f"sees neither GPU memory nor lost GPUs; the engines' own watchdog still judges them; "
                 f"`nvidia-smi` shows whether the driver answers",
                 details={"failing_s": round(now_s - failing_since_s, 1), "error": error, "devices_seen": devices_seen})


def decide_gpu_lost(
    device_index: int,
    engines_on_device: Sequence[str],
    state: RebootState,
    ledger: RebootLedger,
    settings: RebootSettings,
    now_s: float,
    now_wall: float,
    *,
    stop_grace_s: float = 30.0,
    cause: str | None = None,
    uuid: str | None = None,
    boot_id: str | None = None,
) -> tuple[RebootState, tuple[Action, ...]]:
    """A GPU is gone (XID 79, or NVML no longer sees it): stop its engines, then the reboot path.

    ``uuid`` and ``boot_id`` go into the ``gpu.lost`` alert's details, as for ``decide_xid``."""
    cause = cause or f"GPU {device_index} is lost"
    stops = tuple(Stop(e, stop_grace_s, cause) for e in engines_on_device)
    new_state, actions = decide_reboot(state, ledger, settings, True, now_s, now_wall, reason=cause)
    lost = Alert(
        f"{GPU_LOST}:{device_index}",
        "critical",
        f"{cause}; only a reboot brings it back",
        details={"device_index": device_index, "engines": list(engines_on_device),
                 **_device_details(uuid, boot_id)},
    )
    return new_state, (*stops, lost, *actions)


def _device_details(uuid: str | None, boot_id: str | None) -> dict[str, object]:
    return {k: v for k, v in (("uuid", uuid), ("boot_id", boot_id)) if v is not None}


@dataclass(frozen=True, slots=True)
class GpuAnswer:
    """A GPU that NVML read without an error in the latest reading.

    ``again``: this daemon had not seen it answer before this reading (its first reading of the GPU, at
    the daemon's start or when the GPU first appears, or the first since NVML lost it). ``serving``:
    engines that are ready (or degraded) and whose processes hold memory on it.
    """

    index: int
    uuid: str
    name: str = ""
    again: bool = False
    serving: tuple[str, ...] = ()


def gpu_episodes_over(
    open_episodes: Mapping[str, Mapping[str, object]],
    answering: Iterable[GpuAnswer],
    boot_id: str,
) -> tuple[Alert, ...]:
    """The resolves of the open ``gpu.lost`` / ``gpu.reset_required`` episodes that the GPUs answering now end.

    ``open_episodes``: episode key -> the details of the alert that opened it (other keys are left
    alone). ``boot_id``: this boot's. Only positive evidence that the GPU is back ends an episode,
    never a boot change alone:

    * ``gpu.lost:<i>`` ends when that GPU answers NVML again (``again``: back while the daemon
      watched, after a reset or a driver reload, or seen by a daemon started since, also after a
      reboot), or an engine serves from it. A GPU still missing keeps it open, also after a reboot.
    * ``gpu.reset_required:<i>`` ends when that GPU works after a reset: an engine serves from it
      (it loaded its model there and is ready), or the GPU answers NVML in a later boot than the one
      the episode opened in (a reboot resets every GPU). It answering NVML in the same boot proves
      nothing: a GPU that needs a reset still answers, also to a restarted daemon.

    An episode is matched to its GPU by the uuid in its details (indexes shift when a GPU drops off
    the bus or comes back); one opened by an older daemon, without a uuid, by its index.
    """
    gpus = tuple(answering)
    out: list[Alert] = []
    for key, details in open_episodes.items():
        kind, _, suffix = key.partition(":")
        if kind not in (GPU_LOST, GPU_RESET_REQUIRED):
            continue
        gpu = _episode_gpu(suffix, details, gpus)
        if gpu is None:
            continue
        what = f"GPU {gpu.index}" + (f" ({gpu.name})" if gpu.name else "")
        summary: str | None = None
        if gpu.serving:
            summary = (f"{what} works again: {', '.join(gpu.serving)} "
                       f"{'is' if len(gpu.serving) == 1 else 'are'} serving from it")
        elif kind == GPU_LOST and gpu.again:
            summary = f"{what} answers NVML again"
        elif kind == GPU_RESET_REQUIRED and gpu.again and isinstance(details.get("boot_id"), str) \
                and details["boot_id"] != boot_id:
            summary = f"{what} answers NVML after a reboot (a reboot resets the GPU)"
        if summary is not None:
            out.append(Alert(key, "info", summary, details={"device_index": gpu.index, "uuid": gpu.uuid},
                             resolved=True))
    return tuple(out)


def _episode_gpu(suffix: str, details: Mapping[str, object], gpus: Sequence[GpuAnswer]) -> GpuAnswer | None:
    """The answering GPU an episode is about, by the uuid in its details, else by the index in its key."""
    uuid = details.get("uuid")
    if isinstance(uuid, str):
        return next((g for g in gpus if g.uuid == uuid), None)
    if not suffix.isdigit():
        return None
    return next((g for g in gpus if g.index == int(suffix)), None)


@dataclass(frozen=True, slots=True)
class RebootVerification:
    """What the first look after (what should have been) a reboot found."""

    rebooted: bool
    memory_back: bool | None  # None when there was no recorded reboot to verify
    alert: Alert | None


def verify_after_reboot(
    ledger: RebootLedger,
    boot_wall_s: float,
    baseline_wired_bytes: int | None,
    wired_bytes: int,
    threshold_bytes: int,
) -> RebootVerification:
    """Did the recorded reboot happen, and did the stranded memory come back?

    ``boot_wall_s`` is this boot's start (wall clock); ``baseline_wired_bytes`` the idle
    baseline from before the reboot.
    """
    last = ledger.last_wall_s
    if last is None:
        return RebootVerification(rebooted=False, memory_back=None, alert=None)
    if boot_wall_s < last:
        return RebootVerification(
            rebooted=False,
            memory_back=False,
            alert=Alert(
                "reboot.not_happened",
                "critical",
                "the reboot command ran but the machine did not reboot; check that the reboot argv "
                "can run without a password (sudoers) and reboot by hand",
                details={"reboot_wall_s": last, "boot_wall_s": boot_wall_s},
            ),
        )
    if baseline_wired_bytes is None:
        return RebootVerification(rebooted=True, memory_back=None, alert=None)
    above = max(0, wired_bytes - baseline_wired_bytes)
    details: dict[str, object] = {
        "wired_bytes": wired_bytes,
        "baseline_wired_bytes": baseline_wired_bytes,
        "reboot_wall_s": last,
    }
    if above < threshold_bytes:
        return RebootVerification(
            rebooted=True,
            memory_back=True,
            alert=Alert(
                "memory.stranded",
                "critical",
                f"the reboot freed the stranded memory: {gb(wired_bytes)} wired, "
                f"idle baseline {gb(baseline_wired_bytes)}",
                details=details,
                resolved=True,
            ),
        )
    return RebootVerification(
        rebooted=True,
        memory_back=False,
        alert=Alert(
            "reboot.did_not_free",
            "critical",
            f"after the reboot {gb(above)} is still wired above the idle baseline "
            f"({gb(wired_bytes)} wired, baseline {gb(baseline_wired_bytes)}); something else holds it",
            details=details,
        ),
    )


def is_reboot_step(action: object) -> bool:
    """Whether ``action`` belongs to the reboot escalation (a ``reboot.*`` alert, ``EscalateReboot``, ``RunReboot``)."""
    return isinstance(action, (EscalateReboot, RunReboot)) or (
        isinstance(action, Alert) and action.key.startswith("reboot."))


def reboot_needed(actions: Iterable[object], cause: str) -> str | None:
    """Why the reboot escalation must take over, from the answer of ``decide_xid``/``decide_gpu_lost``
    asked with reboots off (running a reboot belongs to the one escalation): the first reboot step
    names it (``cause`` for a reboot alert, the action's own reason otherwise); None when none is needed."""
    for action in actions:
        if isinstance(action, (EscalateReboot, RunReboot)):
            return action.reason
        if is_reboot_step(action):
            return cause
    return None


def state_after_restart(saved_phase: object, *, same_boot: bool) -> RebootState:
    """The escalation state a restarted daemon resumes with.

    A person's cancel, and a reboot found necessary but not allowed, hold for the rest of this boot,
    also across a daemon restart; an announced reboot is announced afresh (its countdown belonged to
    the daemon that announced it), and after a reboot the escalation starts idle.
    """
    if same_boot and saved_phase in ("cancelled", "required"):
        return RebootState(phase=saved_phase)
    return RebootState()


def on_new_boot(open_keys: Iterable[str]) -> tuple[Alert, ...]:
    """The machine booted since the daemon's state was saved: the resolves of the open episodes of
    ``BOOT_EPISODES`` (also those an earlier daemon opened: the outbox remembers open episodes).

    Without them an operator's own reboot (escalation is off by default) left those alerts firing at
    every receiver, and the outbox dropped the new boot's next firing as a duplicate of the open one.
    """
    keys = set(open_keys)
    return tuple(
        Alert(key, "info", "the machine rebooted since this was raised (a reboot frees stranded wired memory)",
              resolved=True)
        for key in BOOT_EPISODES if key in keys
    )


def ledger_to_record(ledger: RebootLedger) -> list[float]:
    return list(ledger.reboots_wall_s)


def ledger_from_record(record: object) -> RebootLedger:
    """Rebuild a ledger from a list of Unix timestamps; ValueError says what is valid."""
    if not isinstance(record, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in record
    ):
        raise ValueError(
            f"reboot ledger must be a list of Unix timestamps (numbers), got {record!r}"
        )
    return RebootLedger(tuple(float(v) for v in record))


__all__ = [
    "BOOT_EPISODES",
    "GPU_LOST",
    "GPU_RESET_REQUIRED",
    "XID_FALLEN_OFF_BUS",
    "XID_RESET_REQUIRED",
    "GpuAnswer",
    "RebootLedger",
    "RebootSettings",
    "RebootState",
    "RebootVerification",
    "cancel",
    "decide_gpu_lost",
    "gpu_lost_cause",
    "nvml_failing_alert",
    "says_gpu_is_lost",
    "decide_reboot",
    "decide_xid",
    "gpu_episodes_over",
    "in_cooldown",
    "ledger_from_record",
    "ledger_to_record",
    "is_reboot_step",
    "on_new_boot",
    "reboot_needed",
    "record_reboot",
    "state_after_restart",
    "verify_after_reboot",
]
