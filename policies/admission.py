"""Memory admission: may this engine start next to what is already resident?

Switching models once ran two processes together (435 GB on a 512 GB Mac) and the kernel
panicked. Every start passes ``admit`` first; the checks, in the order a refusal reports them:

1. ``exclusive``: an exclusive engine never shares the machine, whichever side is exclusive.
2. ``budget``: the footprints of all resident engines plus the candidate stay within the budget.
3. ``stranded``: wired memory stranded by an earlier crash counts against the budget and is not
   available; a start that only fails because of it is refused with that reason (a reboot, not
   a retry, is what helps).
4. ``memory``: the candidate's footprint plus the headroom fits in the memory available now.
5. ``gpu``: on each of the candidate's GPU devices, free memory covers its share.

Sizes are bytes; messages speak decimal GB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies._format import gb, require
from policies.actions import Admit, Refuse, WaitUntil


@dataclass(frozen=True, slots=True)
class Footprint:
    """What an engine holds while resident.

    ``bytes`` is the whole footprint (weights + KV cache + runtime). ``gpu_devices`` are the
    NVIDIA device indexes it runs on; its share per device is ``gpu_bytes_per_device`` or, when
    not given, ``bytes`` split evenly (tensor parallel).
    """

    engine: str
    bytes: int
    exclusive: bool = False
    gpu_devices: tuple[int, ...] = ()
    gpu_bytes_per_device: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.engine), "Footprint.engine must be a non-empty engine name")
        require(
            isinstance(self.bytes, int) and not isinstance(self.bytes, bool) and self.bytes >= 0,
            f"Footprint.bytes of {self.engine!r} must be an integer >= 0 (bytes), got {self.bytes!r}",
        )
        object.__setattr__(self, "gpu_devices", tuple(self.gpu_devices))
        require(
            all(isinstance(d, int) and d >= 0 for d in self.gpu_devices),
            f"Footprint.gpu_devices of {self.engine!r} must be device indexes >= 0, got {self.gpu_devices!r}",
        )
        require(
            self.gpu_bytes_per_device is None or self.gpu_bytes_per_device >= 0,
            f"Footprint.gpu_bytes_per_device of {self.engine!r} must be >= 0 or None, "
            f"got {self.gpu_bytes_per_device!r}",
        )

    def per_device_bytes(self) -> int:
        if self.gpu_bytes_per_device is not None:
            return self.gpu_bytes_per_device
        if not self.gpu_devices:
            return 0
        return math.ceil(self.bytes / len(self.gpu_devices))


def auto_footprint_bytes(weights_bytes: int, factor: float = 1.2) -> int:
    """A footprint estimate from the size of the weights on disk (KV cache and runtime on top)."""
    require(weights_bytes >= 0, f"weights_bytes must be >= 0, got {weights_bytes!r}")
    require(
        factor >= 1.0,
        f"footprint factor must be >= 1.0 (the weights alone are the minimum), got {factor!r}",
    )
    return math.ceil(weights_bytes * factor)


def effective_budget_bytes(
    configured_bytes: int | None, total_bytes: int | None, headroom_bytes: int
) -> int | None:
    """The memory budget every check uses: the configured one, else total memory minus the headroom.

    None only when neither is known (no budget configured and no memory reading yet).
    """
    if configured_bytes is not None:
        return configured_bytes
    if total_bytes is None:
        return None
    return max(1, total_bytes - headroom_bytes)


def exclusive_conflicts(candidate: Footprint, others: Sequence[Footprint]) -> tuple[str, ...]:
    """The engines among ``others`` that may not run next to ``candidate`` (either side exclusive)."""
    return tuple(
        f.engine
        for f in others
        if f.engine != candidate.engine and (candidate.exclusive or f.exclusive)
    )


def _names(footprints: Sequence[Footprint]) -> str:
    return ", ".join(f"{f.engine} ({gb(f.bytes)})" for f in footprints)


def admit(
    candidate: Footprint,
    resident: Sequence[Footprint],
    available_bytes: int,
    headroom_bytes: int,
    budget_bytes: int | None,
    gpu_free_bytes: Mapping[int, int] | None,
    stranded_bytes: int = 0,
) -> Admit | Refuse:
    """Decide whether ``candidate`` may start next to ``resident``.

    ``resident`` entries with the candidate's own name are ignored (a restart replaces itself).
    ``budget_bytes=None`` means no budget is configured; ``gpu_free_bytes=None`` means no GPU
    reading (no NVML): the GPU check is then skipped and the message says so.
    """
    require(available_bytes >= 0, f"available_bytes must be >= 0, got {available_bytes!r}")
    require(headroom_bytes >= 0, f"headroom_bytes must be >= 0, got {headroom_bytes!r}")
    require(
        budget_bytes is None or budget_bytes > 0,
        f"budget_bytes must be > 0 or None, got {budget_bytes!r}",
    )
    require(stranded_bytes >= 0, f"stranded_bytes must be >= 0, got {stranded_bytes!r}")

    name = candidate.engine
    others = [f for f in resident if f.engine != name]

    # 1. Exclusivity, either side.
    if exclusive_conflicts(candidate, others) and candidate.exclusive:
        return Refuse(
            name,
            "exclusive",
            f"{name} is exclusive and never shares the machine, but {_names(others)} "
            f"{'is' if len(others) == 1 else 'are'} resident; stop {'it' if len(others) == 1 else 'them'} "
            f"first or use `llmctl switch {name}`",
        )
    exclusive_others = [f for f in others if f.exclusive]
    if exclusive_others:
        holder = exclusive_others[0]
        return Refuse(
            name,
            "exclusive",
            f"{holder.engine} ({gb(holder.bytes)}) is resident and exclusive; {name} cannot start "
            f"next to it. Stop {holder.engine} first or use `llmctl switch {name}`",
        )

    resident_bytes = sum(f.bytes for f in others)
    need_bytes = candidate.bytes + headroom_bytes

    # 2. Budget (3. with stranded memory counted against it).
    if budget_bytes is not None:
        total_bytes = resident_bytes + candidate.bytes
        if total_bytes > budget_bytes:
            return Refuse(
                name,
                "budget",
                f"{name} needs {gb(candidate.bytes)}; with {gb(resident_bytes)} resident"
                f"{' (' + _names(others) + ')' if others else ''} that is {gb(total_bytes)}, over the "
                f"memory budget of {gb(budget_bytes)}. Stop an engine first or use `llmctl switch {name}`",
            )
        if stranded_bytes and total_bytes + stranded_bytes > budget_bytes:
            return Refuse(
                name,
                "stranded",
                f"{name} needs {gb(candidate.bytes)} and {gb(resident_bytes)} is resident, but "
                f"{gb(stranded_bytes)} of wired memory is stranded from an earlier crash, so "
                f"{gb(total_bytes + stranded_bytes)} would exceed the budget of {gb(budget_bytes)}. "
                "Only a reboot frees stranded wired memory",
            )

    # 3./4. Available memory now.
    if need_bytes > available_bytes:
        if stranded_bytes and need_bytes <= available_bytes + stranded_bytes:
            return Refuse(
                name,
                "stranded",
                f"{name} needs {gb(candidate.bytes)} + {gb(headroom_bytes)} headroom, only "
                f"{gb(available_bytes)} is available because {gb(stranded_bytes)} of wired memory is "
                "stranded from an earlier crash. Only a reboot frees stranded wired memory",
            )
        stranded_note = (
            f" ({gb(stranded_bytes)} of it held by stranded wired memory)" if stranded_bytes else ""
        )
        return Refuse(
            name,
            "memory",
            f"{name} needs {gb(candidate.bytes)} + {gb(headroom_bytes)} headroom = {gb(need_bytes)}, "
            f"but only {gb(available_bytes)} is available{stranded_note}",
        )

    # 5. GPU devices.
    gpu_note = ""
    if candidate.gpu_devices:
        if gpu_free_bytes is None:
            gpu_note = "; GPU memory not checked (no GPU reading)"
        else:
            share_bytes = candidate.per_device_bytes()
            for device in candidate.gpu_devices:
                if device not in gpu_free_bytes:
                    visible = ", ".join(str(d) for d in sorted(gpu_free_bytes)) or "none"
                    return Refuse(
                        name,
                        "gpu",
                        f"{name} runs on GPU {device}, which is not visible (visible GPUs: {visible})",
                    )
                free = gpu_free_bytes[device]
                if share_bytes > free:
                    return Refuse(
                        name,
                        "gpu",
                        f"{name} needs {gb(share_bytes)} on GPU {device}, which has only {gb(free)} free",
                    )
            gpu_note = (
                f"; {gb(share_bytes)} per GPU on {', '.join(map(str, candidate.gpu_devices))}"
            )

    budget_note = f" of a {gb(budget_bytes)} budget" if budget_bytes is not None else ""
    return Admit(
        name,
        f"{name} {gb(candidate.bytes)} + {gb(headroom_bytes)} headroom fits in {gb(available_bytes)} "
        f"available; {gb(resident_bytes + candidate.bytes)} resident{budget_note}{gpu_note}",
    )


# While a start waits for memory, admission is asked again this often.
ADMISSION_RECHECK_S = 2.0


def after_refusal(refusal: Refuse, now_s: float, deadline_s: float) -> Refuse | WaitUntil:
    """What a start that ``admit`` refused does: wait and ask again (memory frees as other engines stop and
    their pages return to the system), until ``deadline_s`` (the config's ``[memory] admission_wait``
    from the start); then the refusal stands. An exclusivity conflict is never waited for: a swap resolves
    it, not time."""
    if refusal.reason == "exclusive" or now_s >= deadline_s:
        return refusal
    return WaitUntil(min(deadline_s, now_s + ADMISSION_RECHECK_S), refusal.message)


__all__ = ["ADMISSION_RECHECK_S", "Footprint", "admit", "after_refusal", "auto_footprint_bytes", "effective_budget_bytes", "exclusive_conflicts"]
