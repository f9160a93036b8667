"""The injected clock. Intervals are always measured on a monotonic clock, never ``time.time()``."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Protocol: ``now()`` is monotonic seconds; ``wall()`` is Unix time, only for display and records."""

    def now(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start_s: float = 1000.0, wall_s: float = 1_800_000_000.0) -> None:
        self._now = start_s
        self._wall_offset = wall_s - start_s

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._now += seconds
