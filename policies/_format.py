"""Small formatting helpers for the sentences policies put in Refuse messages and Alerts.

Sizes are decimal GB (10^9 bytes), as Activity Monitor and the config's "120GB" read them.
"""

from __future__ import annotations

import math


def gb(n_bytes: int | float) -> str:
    """``123456789012`` -> ``"123.5 GB"``."""
    return f"{n_bytes / 1e9:.1f} GB"


def secs(seconds: float) -> str:
    """A short human duration: ``"45s"``, ``"12m05s"``, ``"6h00m"``. Under a minute it rounds up: a wait of 0.4 s
    is "1s", never "0s" (which reads as "now" while a start is still refused)."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{math.ceil(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless ``condition``: the settings classes' validation step."""
    if not condition:
        raise ValueError(message)
