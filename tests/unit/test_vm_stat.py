"""macOS memory: the vm_stat parser on every captured sample, and the reader through stand-in commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.errors import ProbeError, ProbeParseError, ProbeUnavailable
from probes.memory import parse_vm_stat, read_darwin_memory, read_linux_memory, read_system_memory
from tests.helpers import FIXTURES, REPO

SAMPLES = sorted((FIXTURES / "vm_stat").glob("*.txt"))
STANDINS = REPO / "tests" / "standins"
GIB = 1024**3


def _field(text: str, label: str) -> int:
    """An independent reading of one counter: the digits after 'label:' on its line."""
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return int(line.split(":", 1)[1].strip().rstrip("."))
    raise AssertionError(f"{label} not in sample")


def _page_size(text: str) -> int:
    first = text.splitlines()[0]
    return int(first.split("page size of", 1)[1].split("bytes", 1)[0])


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_sample_parses_to_the_numbers_in_the_file(sample: Path) -> None:
    """Each captured vm_stat sample gives wired/compressed/available bytes equal to its pages × its page size."""
    text = sample.read_text()
    page = _page_size(text)
    stat = parse_vm_stat(text)
    assert stat.page_size_bytes == page
    assert stat.wired_bytes == _field(text, "Pages wired down") * page
    assert stat.compressed_bytes == _field(text, "Pages occupied by compressor") * page
    assert stat.free_bytes == _field(text, "Pages free") * page
    assert stat.available_bytes == page * sum(
        _field(text, label)
        for label in ("Pages free", "Pages speculative", "Pages inactive", "Pages purgeable")
    )
    assert stat.counters['Translation faults'] == int(
        next(line for line in text.splitlines() if line.startswith('"Translation faults"')).split()[-1].rstrip(".")
    )


@pytest.mark.parametrize(
    ("name", "wired_gib"),
    [
        ("studio-512gb-idle", 6),
        ("studio-512gb-4bit-loaded", 117),
        ("studio-512gb-8bit-loaded", 234),
        ("studio-512gb-stranded-after-hang", 245),
        ("studio-512gb-two-models-danger", 435),
    ],
)
def test_studio_samples_show_the_wired_memory_of_their_situation(name: str, wired_gib: int) -> None:
    """The 512 GB Studio samples read as the wired GiB their situation describes (245 GiB stranded, 435 GiB two models)."""
    stat = parse_vm_stat((FIXTURES / "vm_stat" / f"{name}.txt").read_text())
    assert stat.page_size_bytes == 16384
    assert stat.wired_bytes / GIB == pytest.approx(wired_gib, abs=0.5)


def test_intel_page_size_is_read_from_the_header() -> None:
    """An Intel Mac's 4096-byte pages are used, not the Apple Silicon 16384."""
    stat = parse_vm_stat((FIXTURES / "vm_stat" / "intel-4096-page.txt").read_text())
    assert stat.page_size_bytes == 4096
    assert stat.wired_bytes == 765432 * 4096


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "printed nothing"),
        ("   \n\n", "printed nothing"),
        ("vm_stat: command not found\n", "Mach Virtual Memory Statistics"),
        ("<html>500 Internal Server Error</html>", "Mach Virtual Memory Statistics"),
        ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n", "lacks 'Pages free'"),
        ("Mach Virtual Memory Statistics: (page size of 3000 bytes)\nPages free: 1.\n", "power of two"),
        ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages free: lots.\n", "line 2"),
    ],
)
def test_garbage_is_refused_with_what_was_expected(text: str, expected: str) -> None:
    """Text that is not vm_stat output raises ProbeParseError saying what shape was expected."""
    with pytest.raises(ProbeParseError, match=expected):
        parse_vm_stat(text)


def test_truncated_output_names_the_missing_counters() -> None:
    """A sample cut off after 'Pages wired down' is refused, naming the counters that are missing."""
    text = (FIXTURES / "vm_stat" / "macmini-m4-32gb.txt").read_text()
    cut = text[: text.index("Pages purgeable")]
    with pytest.raises(ProbeParseError) as info:
        parse_vm_stat(cut)
    assert "'Pages purgeable'" in str(info.value)
    assert "'Pages occupied by compressor'" in str(info.value)
    assert "'Pages free'" not in str(info.value).split("expected")[0]


_LABELS = [
    "Pages free", "Pages active", "Pages inactive", "Pages speculative", "Pages throttled",
    "Pages wired down", "Pages purgeable", '"Translation faults"', "Pages occupied by compressor",
]


@given(
    page_shift=st.integers(min_value=12, max_value=16),
    values=st.lists(st.integers(min_value=0, max_value=10**12), min_size=len(_LABELS), max_size=len(_LABELS)),
)
def test_any_well_formed_sample_round_trips(page_shift: int, values: list[int]) -> None:
    """Whatever the counts and page size, the parsed wired bytes equal wired pages × page size."""
    page = 1 << page_shift
    body = "".join(f"{label}:{' ' * 8}{value}.\n" for label, value in zip(_LABELS, values, strict=False))
    stat = parse_vm_stat(f"Mach Virtual Memory Statistics: (page size of {page} bytes)\n{body}")
    assert stat.wired_bytes == values[5] * page
    assert stat.counters["Translation faults"] == values[7]


@pytest.fixture
def standin_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    state = tmp_path / "vm_stat.pos"
    monkeypatch.setenv("STANDIN_VM_STAT_STATE", str(state))
    monkeypatch.delenv("STANDIN_VM_STAT_SEQUENCE_FILE", raising=False)
    monkeypatch.delenv("STANDIN_IOGPU_WIRED_LIMIT_MB", raising=False)
    monkeypatch.setenv("STANDIN_HW_MEMSIZE", str(512 * GIB))
    return state


def test_reader_uses_standins_by_explicit_path(standin_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With explicit command paths the macOS reader works on Linux: total from sysctl, wired from vm_stat."""
    monkeypatch.setenv("STANDIN_VM_STAT_SEQUENCE", "studio-512gb-stranded-after-hang")
    reading = read_darwin_memory(12.5, str(STANDINS / "vm_stat"), str(STANDINS / "sysctl"))
    assert reading.at_s == 12.5
    assert reading.platform == "darwin"
    assert reading.total_bytes == 512 * GIB
    assert reading.wired_bytes == 16056320 * 16384
    assert reading.compressed_bytes == 50000 * 16384
    assert reading.available_bytes == (15073280 + 200000 + 917504 + 10000) * 16384
    assert reading.wired_limit_bytes is None  # iogpu.wired_limit_mb = 0 is the system default


def test_reader_finds_standins_on_path_and_advances_the_sequence(
    standin_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-ins on PATH answer like the real commands, one sample per call, the last one repeating."""
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_VM_STAT_SEQUENCE", "studio-512gb-idle,studio-512gb-8bit-loaded*2,studio-512gb-stranded-after-hang")
    wired_gib = [
        round(read_system_memory(float(i), platform="darwin").wired_bytes / GIB) for i in range(5)
    ]
    assert wired_gib == [6, 234, 234, 245, 245]


def test_sequence_file_keeps_its_position_beside_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A sequence file (with comments) drives the stand-in; its position is kept in FILE.pos."""
    seq = tmp_path / "scenario.txt"
    seq.write_text("# a hang strands memory\nstudio-512gb-8bit-loaded\nstudio-512gb-stranded-after-hang  # after kill\n")
    monkeypatch.delenv("STANDIN_VM_STAT_SEQUENCE", raising=False)
    monkeypatch.delenv("STANDIN_VM_STAT_STATE", raising=False)
    monkeypatch.setenv("STANDIN_VM_STAT_SEQUENCE_FILE", str(seq))
    first = read_darwin_memory(0.0, str(STANDINS / "vm_stat"), str(STANDINS / "sysctl"))
    second = read_darwin_memory(1.0, str(STANDINS / "vm_stat"), str(STANDINS / "sysctl"))
    assert (first.wired_bytes, second.wired_bytes) == (15335424 * 16384, 16056320 * 16384)
    assert (tmp_path / "scenario.txt.pos").read_text() == "2"


@pytest.mark.parametrize(("limit", "expected"), [("400000", 400000 * 1024 * 1024), ("0", None), ("missing", None)])
def test_wired_limit_is_none_when_default_or_absent(
    standin_env: Path, monkeypatch: pytest.MonkeyPatch, limit: str, expected: int | None
) -> None:
    """iogpu.wired_limit_mb becomes bytes when set; 0 or a Mac without the key means the system default (None)."""
    monkeypatch.setenv("STANDIN_VM_STAT_SEQUENCE", "studio-512gb-idle")
    monkeypatch.setenv("STANDIN_IOGPU_WIRED_LIMIT_MB", limit)
    reading = read_darwin_memory(0.0, str(STANDINS / "vm_stat"), str(STANDINS / "sysctl"))
    assert reading.wired_limit_bytes == expected


def test_missing_vm_stat_says_unavailable(tmp_path: Path) -> None:
    """Without a vm_stat command the probe reports itself unavailable, naming the command."""
    with pytest.raises(ProbeUnavailable, match="no-such-vm_stat"):
        read_darwin_memory(0.0, str(tmp_path / "no-such-vm_stat"), str(STANDINS / "sysctl"))


def test_failing_vm_stat_reports_its_status_and_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vm_stat that exits non-zero gives a ProbeError with its exit status and stderr."""
    monkeypatch.delenv("STANDIN_VM_STAT_SEQUENCE", raising=False)
    monkeypatch.delenv("STANDIN_VM_STAT_SEQUENCE_FILE", raising=False)
    with pytest.raises(ProbeError, match=r"status 2: vm_stat \(stand-in\): set STANDIN_VM_STAT_SEQUENCE"):
        read_darwin_memory(0.0, str(STANDINS / "vm_stat"), str(STANDINS / "sysctl"))


def test_hanging_command_times_out(tmp_path: Path) -> None:
    """A vm_stat that never answers is abandoned after timeout_s with a ProbeError."""
    script = tmp_path / "vm_stat"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    with pytest.raises(ProbeError, match="did not finish within 0.5s"):
        read_darwin_memory(0.0, str(script), str(STANDINS / "sysctl"), timeout_s=0.5)


def test_linux_reader_reports_memavailable() -> None:
    """On Linux the reading has the machine's total and MemAvailable and no macOS-only fields."""
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024) for line in Path("/proc/meminfo").read_text().splitlines()
    )
    reading = read_linux_memory(3.0)
    assert reading.platform == "linux"
    assert reading.total_bytes == meminfo["MemTotal"]
    assert 0 < reading.available_bytes <= reading.total_bytes
    assert reading.available_bytes == pytest.approx(meminfo["MemAvailable"], rel=0.2)
    assert reading.wired_bytes is None


def test_unknown_platform_is_unavailable() -> None:
    """A platform without a memory probe says which platforms are supported."""
    with pytest.raises(ProbeUnavailable, match="'darwin', 'linux'"):
        read_system_memory(0.0, platform="sunos5")
