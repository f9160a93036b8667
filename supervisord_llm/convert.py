"""Small converters for the config's human units: durations ("60s", "5m") and sizes ("120GB")."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")

# Sizes use the units people read off their machines: GB = 10^9, GiB = 2^30.
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

DURATION_HELP = 'a duration such as "90s", "5m", "1.5h" (units ms, s, m, h, d) or a number of seconds'
SIZE_HELP = ('a size such as "120GB", "64GiB", "512MB" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; '
             'K, M, G, T are binary: "64G" is "64GiB")')


def parse_duration_s(value: object) -> float:
    """Return seconds for ``"60s"``/``"5m"``/a bare number of seconds; ValueError names what is valid."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            if _DURATION_RE.match(value.strip().lstrip("-")):
                raise ValueError(f"a duration cannot be negative, got {value!r}; expected {DURATION_HELP}")
            try:
                bare = float(value)
            except ValueError:
                bare = None
            if bare is not None and math.isfinite(bare):  # "30": seconds, but in quotes (a string needs its unit)
                raise ValueError(f"expected {DURATION_HELP}, got {value!r}: a string needs its unit "
                                 f"({value.strip()}s), a number of seconds is written without quotes")
            raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected {DURATION_HELP}, got {type(value).__name__} {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}; expected {DURATION_HELP}")
    return seconds


def parse_size_bytes(value: object) -> int:
    """Return bytes for ``"120GB"``/``"64GiB"``/a bare number of bytes; ValueError names what is valid."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}; expected {SIZE_HELP}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected {SIZE_HELP}, got {type(value).__name__} {value!r}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected {SIZE_HELP}, got {value!r}")
    unit = (match.group(2) or "b").lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {match.group(2)!r} in {value!r}; expected {SIZE_HELP}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_bytes(n: int | float | None) -> str:
    """Human-readable size in GB/MB (decimal, as Activity Monitor shows)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"
