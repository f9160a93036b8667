"""The probes' own errors (probes never import ``supervisord_llm``).

    ProbeError               a probe could not produce a reading
    ├── ProbeUnavailable     the probe cannot run on this machine (no vm_stat, no NVML driver)
    └── ProbeParseError      a command or endpoint answered text the parser does not understand

The daemon maps these to its own ``ProbeError`` at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class ProbeError(Exception):
    """A probe could not produce a reading."""


class ProbeUnavailable(ProbeError):
    """The probe cannot run on this machine (the command or library is missing)."""


class ProbeParseError(ProbeError):
    """Text from a command or endpoint did not have the expected shape; the message says what was expected."""
