"""What an engine holds: the rusage_info parser (macOS physical footprint) and the engine reading.

The buffers are laid out field by field as ``struct rusage_info_v0`` in ``<sys/resource.h>``
(16-byte uuid, then ten uint64), little-endian as on Apple silicon and Intel Macs. The values are
those of an mlx_lm.server holding a 4-bit 235B model (``tests/fixtures/vm_stat``'s
studio-512gb-4bit-loaded): a physical footprint of 125.6 GB against an RSS of 1.9 GB, because the
weights live in Metal buffers that RSS does not count.
"""

from __future__ import annotations

import os
import struct
import sys

import pytest

from probes.errors import ProbeParseError
from probes.footprint import (
    RUSAGE_INFO_V0_SIZE,
    engine_memory_reading,
    parse_rusage_info,
    read_phys_footprint_bytes,
)
from probes.process import read_process_tree
from probes.readings import ProcessTreeReading

UUID = bytes(range(16))
WIRED, RESIDENT, FOOTPRINT = 0, 1_912_602_624, 125_627_793_408


def rusage_v0(*, wired: int = WIRED, resident: int = RESIDENT, footprint: int = FOOTPRINT) -> bytes:
    # user, system, pkg_idle, interrupt, pageins, wired, resident, footprint, start, exit
    return UUID + struct.pack("<10Q", 81_000_000_000, 9_000_000_000, 12, 3_400, 915_000, wired, resident,
                              footprint, 3_141_592_653_589, 0)


def test_parses_the_footprint_of_a_v0_buffer() -> None:
    """ri_phys_footprint at offset 72 is read, next to resident and wired sizes."""
    buf = rusage_v0()
    assert len(buf) == RUSAGE_INFO_V0_SIZE
    info = parse_rusage_info(buf)
    assert (info.phys_footprint_bytes, info.resident_bytes, info.wired_bytes) == (FOOTPRINT, RESIDENT, WIRED)


def test_longer_versions_parse_the_same_leading_fields() -> None:
    """v1..v6 only append fields: a v4-sized buffer gives the same footprint."""
    v4_size = 296
    buf = rusage_v0() + bytes(v4_size - RUSAGE_INFO_V0_SIZE)
    assert parse_rusage_info(buf).phys_footprint_bytes == FOOTPRINT


@pytest.mark.skipif(sys.byteorder != "little", reason="the captured layout is little-endian")
def test_a_short_or_byte_swapped_buffer_is_an_error_not_a_number() -> None:
    """A truncated buffer, or one of the wrong byte order, raises ProbeParseError naming the problem."""
    with pytest.raises(ProbeParseError, match="96"):
        parse_rusage_info(rusage_v0()[:80])
    # An RSS of 123,456,789 bytes written big-endian reads back as about 1.6 exabytes.
    swapped = UUID + struct.pack(">10Q", 0, 0, 0, 0, 0, 0, 123_456_789, 123_456_789, 0, 0)
    with pytest.raises(ProbeParseError, match="impossible"):
        parse_rusage_info(swapped)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the footprint is real")
def test_without_macos_there_is_no_footprint_and_rss_counts() -> None:
    """Elsewhere the footprint is None and the tree's RSS is what the guard compares."""
    assert read_phys_footprint_bytes(os.getpid()) is None
    tree = read_process_tree(os.getpid(), 1.0)
    assert tree.phys_footprint_bytes is None and tree.rss_bytes > 0
    reading = engine_memory_reading(tree, gpu_bytes=None)
    assert reading.host_bytes == tree.rss_bytes


def test_the_footprint_wins_over_rss_where_there_is_one() -> None:
    """On macOS the guard compares the physical footprint (it counts Metal buffers), not RSS."""
    tree = ProcessTreeReading(at_s=1.0, root_pid=1, pids=(1,), rss_bytes=RESIDENT, phys_footprint_bytes=FOOTPRINT)
    reading = engine_memory_reading(tree, gpu_bytes=7)
    assert reading.host_bytes == FOOTPRINT and reading.rss_bytes == RESIDENT and reading.gpu_bytes == 7
