"""Whole-machine memory: macOS from ``vm_stat`` + ``sysctl``, Linux from psutil (MemAvailable).

Parsing is separate from running the commands: :func:`parse_vm_stat` is a pure function of the
text, tested on captured samples. The ``read_*`` functions block (subprocess, /proc); the daemon
calls them in a worker thread.

Why wired memory matters: after a Metal GPU hang, memory wired by a killed MLX process can stay
wired until reboot. "Pages wired down" is the number the stranded-memory ledger watches.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from probes.errors import ProbeError, ProbeParseError, ProbeUnavailable
from probes.readings import SystemMemoryReading

__all__ = [
    "VmStat",
    "parse_vm_stat",
    "parse_sysctl_int",
    "read_darwin_memory",
    "read_linux_memory",
    "read_system_memory",
]

_HEADER = re.compile(r"^Mach Virtual Memory Statistics: \(page size of (\d+) bytes\)\s*$")
# `Pages free:   652276.` and `"Translation faults":   8304623196.` (the one quoted label)
_LINE = re.compile(r'^\s*"?(?P<label>[^":]+?)"?:\s+(?P<value>\d+)\.?\s*$')

# vm_stat label -> VmStat field; all of these must be present for a reading to be trusted.
_REQUIRED = {
    "Pages free": "free_pages",
    "Pages active": "active_pages",
    "Pages inactive": "inactive_pages",
    "Pages speculative": "speculative_pages",
    "Pages wired down": "wired_pages",
    "Pages purgeable": "purgeable_pages",
    "Pages occupied by compressor": "compressor_pages",
}

_DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class VmStat:
    """One ``vm_stat`` sample. Counts are pages; the ``*_bytes`` properties multiply by the page size."""

    page_size_bytes: int
    free_pages: int
    active_pages: int
    inactive_pages: int
    speculative_pages: int
    wired_pages: int
    purgeable_pages: int
    compressor_pages: int
    # Every labelled counter of the sample (including the ones above), by its vm_stat label.
    counters: Mapping[str, int]

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_size_bytes

    @property
    def active_bytes(self) -> int:
        return self.active_pages * self.page_size_bytes

    @property
    def inactive_bytes(self) -> int:
        return self.inactive_pages * self.page_size_bytes

    @property
    def speculative_bytes(self) -> int:
        return self.speculative_pages * self.page_size_bytes

    @property
    def wired_bytes(self) -> int:
        return self.wired_pages * self.page_size_bytes

    @property
    def purgeable_bytes(self) -> int:
        return self.purgeable_pages * self.page_size_bytes

    @property
    def compressed_bytes(self) -> int:
        """RAM occupied by the compressor ("Pages occupied by compressor")."""
        return self.compressor_pages * self.page_size_bytes

    @property
    def available_bytes(self) -> int:
        """Memory a new process can get without swapping: free + speculative + inactive + purgeable."""
        pages = self.free_pages + self.speculative_pages + self.inactive_pages + self.purgeable_pages
        return pages * self.page_size_bytes


def parse_vm_stat(text: str) -> VmStat:
    """Parse the output of macOS ``vm_stat`` (no arguments). Raises ProbeParseError on anything else."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ProbeParseError(
            "vm_stat printed nothing; expected a header "
            "'Mach Virtual Memory Statistics: (page size of N bytes)' followed by 'Label: N.' lines"
        )
    header = _HEADER.match(lines[0].strip())
    if header is None:
        raise ProbeParseError(
            f"vm_stat output starts with {lines[0][:80]!r}; expected "
            "'Mach Virtual Memory Statistics: (page size of N bytes)'"
        )
    page_size_bytes = int(header.group(1))
    if page_size_bytes <= 0 or page_size_bytes & (page_size_bytes - 1):
        raise ProbeParseError(
            f"vm_stat reports a page size of {page_size_bytes} bytes; expected a power of two such as 4096 or 16384"
        )
    counters: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        match = _LINE.match(line)
        if match is None:
            raise ProbeParseError(
                f"vm_stat line {number} is {line[:80]!r}; expected 'Label: N.' (e.g. 'Pages free: 652276.')"
            )
        counters[match.group("label").strip()] = int(match.group("value"))
    missing = [label for label in _REQUIRED if label not in counters]
    if missing:
        raise ProbeParseError(
            f"vm_stat output lacks {', '.join(repr(m) for m in missing)}; "
            f"expected all of {', '.join(repr(label) for label in _REQUIRED)} (truncated output?)"
        )
    fields = {field: counters[label] for label, field in _REQUIRED.items()}
    return VmStat(page_size_bytes=page_size_bytes, counters=MappingProxyType(counters), **fields)


def parse_sysctl_int(text: str, key: str) -> int:
    """Parse the output of ``sysctl -n KEY`` as one non-negative integer."""
    value = text.strip()
    if not value.isdigit():
        raise ProbeParseError(f"sysctl -n {key} printed {value[:80]!r}; expected one non-negative integer")
    return int(value)


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise ProbeUnavailable(f"{argv[0]} was not found (it exists on macOS only; set its path for a stand-in)") from exc
    except PermissionError as exc:
        raise ProbeUnavailable(f"{argv[0]} cannot be executed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProbeError(f"{' '.join(argv)} did not finish within {timeout_s:g}s") from exc


def _run_checked(argv: list[str], timeout_s: float) -> str:
    done = _run(argv, timeout_s)
    if done.returncode != 0:
        raise ProbeError(f"{' '.join(argv)} exited with status {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def read_darwin_memory(
    at_s: float,
    vm_stat_cmd: str = "vm_stat",
    sysctl_cmd: str = "sysctl",
    *,
    timeout_s: float = _DEFAULT_TIMEOUT_S,
) -> SystemMemoryReading:
    """Read memory on macOS. Blocking: call it in a worker thread.

    ``vm_stat_cmd`` and ``sysctl_cmd`` are a name found on PATH or an explicit path (so a stand-in
    can be used on Linux). ``iogpu.wired_limit_mb`` of 0, or a sysctl without that key (Intel, old
    macOS), means the system default and gives ``wired_limit_bytes=None``.
    """
    stat = parse_vm_stat(_run_checked([vm_stat_cmd], timeout_s))
    total_bytes = parse_sysctl_int(_run_checked([sysctl_cmd, "-n", "hw.memsize"], timeout_s), "hw.memsize")
    limit = _run([sysctl_cmd, "-n", "iogpu.wired_limit_mb"], timeout_s)
    wired_limit_bytes: int | None = None
    if limit.returncode == 0 and limit.stdout.strip():
        limit_mb = parse_sysctl_int(limit.stdout, "iogpu.wired_limit_mb")
        wired_limit_bytes = limit_mb * 1024 * 1024 if limit_mb > 0 else None
    return SystemMemoryReading(
        at_s=at_s,
        platform="darwin",
        total_bytes=total_bytes,
        available_bytes=stat.available_bytes,
        wired_bytes=stat.wired_bytes,
        compressed_bytes=stat.compressed_bytes,
        wired_limit_bytes=wired_limit_bytes,
    )


def read_linux_memory(at_s: float) -> SystemMemoryReading:
    """Read memory on Linux (MemAvailable through psutil). Blocking: call it in a worker thread."""
    import psutil

    try:
        vm = psutil.virtual_memory()
    except OSError as exc:
        raise ProbeError(f"cannot read /proc/meminfo: {exc}") from exc
    return SystemMemoryReading(
        at_s=at_s, platform="linux", total_bytes=int(vm.total), available_bytes=int(vm.available)
    )


def read_system_memory(
    at_s: float,
    *,
    platform: str = sys.platform,
    vm_stat_cmd: str = "vm_stat",
    sysctl_cmd: str = "sysctl",
    timeout_s: float = _DEFAULT_TIMEOUT_S,
) -> SystemMemoryReading:
    """Read memory the way ``platform`` ("darwin" or "linux*") does. Blocking."""
    if platform == "darwin":
        return read_darwin_memory(at_s, vm_stat_cmd, sysctl_cmd, timeout_s=timeout_s)
    if platform.startswith("linux"):
        return read_linux_memory(at_s)
    raise ProbeUnavailable(f"no memory probe for platform {platform!r}; supported: 'darwin', 'linux'")
