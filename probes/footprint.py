"""What an engine really holds: the process tree's RSS, and on macOS its physical footprint.

On Apple silicon RSS undercounts an MLX engine: Metal buffers (the weights and the KV cache) are
not in the resident set of the process but are in its *physical footprint*, the number Activity
Monitor shows as "Memory" and the one the kernel's memory-pressure logic charges to the process.
It is read with ``proc_pid_rusage(pid, RUSAGE_INFO_V0, &info)`` from libproc (``libSystem``),
field ``ri_phys_footprint``. The struct is parsed by :func:`parse_rusage_info` (pure, tested on
bytes laid out as ``<sys/resource.h>`` declares them); :func:`read_phys_footprint_bytes` does the
call. On other systems the footprint is ``None`` and RSS is what counts.

    struct rusage_info_v0 {            // offset (all fields native-endian, 8-byte aligned)
        uint8_t  ri_uuid[16];          //  0
        uint64_t ri_user_time;         // 16
        uint64_t ri_system_time;       // 24
        uint64_t ri_pkg_idle_wkups;    // 32
        uint64_t ri_interrupt_wkups;   // 40
        uint64_t ri_pageins;           // 48
        uint64_t ri_wired_size;        // 56
        uint64_t ri_resident_size;     // 64
        uint64_t ri_phys_footprint;    // 72
        uint64_t ri_proc_start_abstime;// 80
        uint64_t ri_proc_exit_abstime; // 88
    };                                 // 96 bytes; v1..v6 only append fields

Blocking (a syscall per process): the daemon calls these in a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from probes.errors import ProbeParseError
from probes.readings import EngineMemoryReading, ProcessTreeReading

__all__ = [
    "RUSAGE_INFO_V0",
    "RUSAGE_INFO_V0_SIZE",
    "RusageInfo",
    "engine_memory_reading",
    "parse_rusage_info",
    "read_phys_footprint_bytes",
    "read_tree_phys_footprint_bytes",
]

RUSAGE_INFO_V0 = 0
RUSAGE_INFO_V0_SIZE = 96
_V0 = struct.Struct("=16s10Q")  # uuid, then ten uint64 (native byte order, as the kernel writes them)


@dataclass(frozen=True, slots=True)
class RusageInfo:
    """The memory fields of one ``rusage_info_v0`` (bytes)."""

    wired_bytes: int
    resident_bytes: int
    phys_footprint_bytes: int


def parse_rusage_info(buf: bytes) -> RusageInfo:
    """Parse the bytes ``proc_pid_rusage`` wrote (v0 or any later, longer version)."""
    if len(buf) < RUSAGE_INFO_V0_SIZE:
        raise ProbeParseError(f"rusage_info is {len(buf)} bytes; a rusage_info_v0 needs {RUSAGE_INFO_V0_SIZE}")
    fields = _V0.unpack_from(buf)
    wired, resident, footprint = fields[6], fields[7], fields[8]
    if footprint >= 1 << 56 or resident >= 1 << 56:
        # Tens of petabytes: the bytes are not a rusage_info (wrong byte order or layout).
        raise ProbeParseError(f"rusage_info holds an impossible footprint {footprint} / resident size {resident}")
    return RusageInfo(wired_bytes=wired, resident_bytes=resident, phys_footprint_bytes=footprint)


_libproc: ctypes.CDLL | None = None


def _proc_pid_rusage() -> ctypes.CDLL | None:
    global _libproc
    if sys.platform != "darwin":
        return None
    if _libproc is None:
        path = ctypes.util.find_library("proc") or "/usr/lib/libSystem.B.dylib"
        _libproc = ctypes.CDLL(path, use_errno=True)
        _libproc.proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _libproc.proc_pid_rusage.restype = ctypes.c_int
    return _libproc


def read_phys_footprint_bytes(pid: int) -> int | None:
    """The physical footprint of one process (macOS); None elsewhere or when it cannot be read
    (the process exited, or belongs to another user)."""
    lib = _proc_pid_rusage()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(RUSAGE_INFO_V0_SIZE)
    if lib.proc_pid_rusage(pid, RUSAGE_INFO_V0, buf) != 0:
        return None
    return parse_rusage_info(buf.raw).phys_footprint_bytes


def read_tree_phys_footprint_bytes(pids: Iterable[int]) -> int | None:
    """Summed over a process tree; None where the platform has no footprint."""
    if sys.platform != "darwin":
        return None
    return sum(read_phys_footprint_bytes(pid) or 0 for pid in pids)


def engine_memory_reading(tree: ProcessTreeReading, gpu_bytes: int | None) -> EngineMemoryReading:
    """One engine's memory from its tree walk and its NVML per-process GPU bytes."""
    return EngineMemoryReading(at_s=tree.at_s, rss_bytes=tree.rss_bytes,
                               phys_footprint_bytes=tree.phys_footprint_bytes, gpu_bytes=gpu_bytes)
