"""Actions: the plain values policies return and the runtime carries out.

A policy never does anything itself; it answers with one or more of these, and the runtime
executes them (and logs each decision with its inputs). They are frozen dataclasses of plain
values so they can be compared in tests, logged as JSON and written to the event log.

    Start(engine)                       spawn the engine now (admission already passed)
    Stop(engine, grace_s, reason)       SIGTERM the whole process tree, SIGKILL after grace_s
    Restart(engine, reason)             Stop then Start, through the same backoff and admission
    Drain(engine, grace_s, reason)      route no new requests to it; in-flight ones may finish within grace_s
    WaitUntil(at_s, reason)             do nothing until monotonic time at_s, then decide again
    Alert(key, severity, summary, ...)  tell a person; ``key`` names the episode (see below)
    EscalateReboot(at_s, reason)        a reboot is announced for monotonic time at_s (cancellable)
    RunReboot(argv, reason)             execute argv now (never through a shell)
    Refuse(engine, reason, message)     a start/switch was refused; ``message`` says why and what would help
    MarkFailed(engine, reason)          stop trying: the engine goes to ``failed`` until a person acts
    Admit(engine, message)              a start may go ahead (admission, manual start)
    Noop(reason)                        nothing to do

Alert keys are stable per episode ("engine.failed:mlx", "memory.stranded") so the delivery layer
can send one notification when an episode opens and one (``resolved=True``) when it closes, however
often a policy repeats the alert while the condition lasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

Severity: TypeAlias = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")


@dataclass(frozen=True, slots=True)
class Start:
    """Spawn ``engine`` now."""

    engine: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop ``engine``: SIGTERM to its process group, SIGKILL only after ``grace_s``.

    The grace is long on purpose: SIGKILL of a wedged Metal process can strand wired memory
    until reboot, while a graceful exit frees it in seconds.
    """

    engine: str
    grace_s: float
    reason: str

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError(f"Stop.grace_s must be >= 0 seconds, got {self.grace_s!r}")


@dataclass(frozen=True, slots=True)
class Restart:
    """Stop ``engine`` and start it again (the start still passes backoff and admission)."""

    engine: str
    reason: str


@dataclass(frozen=True, slots=True)
class Drain:
    """Stop routing new requests to ``engine``; in-flight ones may finish for up to ``grace_s``
    (a ``Restart`` follows once they have)."""

    engine: str
    grace_s: float
    reason: str

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError(f"Drain.grace_s must be >= 0 seconds, got {self.grace_s!r}")


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Nothing to do before monotonic time ``at_s``; decide again then."""

    at_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    """A notification for a person.

    ``key`` is the stable episode key (``"engine.failed:mlx"``); ``resolved=True`` closes the
    episode. ``details`` holds the numbers behind the summary (bytes, seconds, counts).
    """

    key: str
    severity: Severity
    summary: str
    details: dict[str, object] = field(default_factory=dict, hash=False)
    resolved: bool = False

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"Alert.severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}"
            )
        if not self.key:
            raise ValueError(
                "Alert.key must be a non-empty episode key such as 'engine.failed:mlx'"
            )


@dataclass(frozen=True, slots=True)
class EscalateReboot:
    """A reboot is announced for monotonic time ``at_s``; ``llmctl reboot cancel`` stops it."""

    at_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class RunReboot:
    """Execute ``argv`` (an argument vector, never a shell string) to reboot the machine.

    Before running it the runtime records the reboot in the persisted ledger
    (``policies.reboot.record_reboot``), so the cooldown holds across the reboot itself.
    """

    argv: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """A start or switch of ``engine`` was refused.

    ``reason`` is a stable id ("backoff", "failed", "exclusive", "budget", "memory", "stranded",
    "gpu", "swap_in_progress", "memory_not_returned"); ``message`` is the sentence for a person,
    with the numbers and what would help. ``until_s`` (monotonic) is when the refusal lapses by
    itself, if it does.
    """

    engine: str
    reason: str
    message: str
    until_s: float | None = None


@dataclass(frozen=True, slots=True)
class MarkFailed:
    """Stop restarting ``engine``: it stays ``failed`` until a person starts it again."""

    engine: str
    reason: str


@dataclass(frozen=True, slots=True)
class Admit:
    """A start of ``engine`` may go ahead; ``message`` summarises the check (for the event log)."""

    engine: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Noop:
    """Nothing to do."""

    reason: str = ""


Action: TypeAlias = (
    Start
    | Stop
    | Restart
    | Drain
    | WaitUntil
    | Alert
    | EscalateReboot
    | RunReboot
    | Refuse
    | MarkFailed
    | Admit
    | Noop
)
