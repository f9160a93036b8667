"""The monitor's per-tick process reads on real processes: cheap root status, full walk only when due."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.process import ProcessGone
from supervisord_llm.engine.health import TreeWatch
from supervisord_llm.engine.process import EngineProcess, LogTail

CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
        "print('engine up', flush=True); time.sleep(60)"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineProcess]:
    proc = EngineProcess.spawn([sys.executable, "-c", CHILD], env={}, cwd=None, log_path=tmp_path / "e.log",
                               tag="test/tree-watch", engine="e")
    try:
        yield proc
    finally:
        for pid in {proc.pid, *(p for p, _ in proc.known_descendants)}:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.popen is not None:
            proc.popen.wait(10)


def _until_child(watch: TreeWatch, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(watch.tick(time.monotonic(), True).pids) >= 2:
            return
        time.sleep(0.05)
    raise AssertionError("the engine's child never showed up in its tree")


def test_the_whole_tree_is_walked_only_when_due(engine: EngineProcess, tmp_path: Path) -> None:
    """An idle engine's tree (memory, children) is read on full ticks only; other ticks keep that reading."""
    watch = TreeWatch(engine, None)
    _until_child(watch)
    walks = watch.full_walks
    full = watch.tree
    assert full is not None and full.rss_bytes > 0
    assert {p for p, _ in engine.known_descendants} == set(full.pids[1:])  # remembered for the stop sweep
    for _ in range(5):
        reading = watch.tick(time.monotonic(), False)
        assert reading is full and not reading.stopped and not reading.zombie
    assert watch.full_walks == walks
    watch.tick(time.monotonic(), True)
    assert watch.full_walks == walks + 1


def test_a_sigstopped_root_reads_as_stopped_and_a_resumed_one_does_not(engine: EngineProcess) -> None:
    """SIGSTOP of the engine is seen on a cheap tick (after the 1 s confirmation); SIGCONT clears it."""
    watch = TreeWatch(engine, None)
    _until_child(watch)
    os.kill(engine.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        reading = watch.tick(time.monotonic(), False)
        while not reading.stopped and time.monotonic() < deadline:
            reading = watch.tick(time.monotonic(), False)
        assert reading.stopped and len(reading.pids) >= 2
    finally:
        os.kill(engine.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while watch.tick(time.monotonic(), False).stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watch.tick(time.monotonic(), False).stopped


def test_a_stopped_child_alone_is_not_a_stopped_engine(engine: EngineProcess) -> None:
    """Only the root's stop counts as a hang: a SIGSTOPped helper process leaves the engine not stopped."""
    watch = TreeWatch(engine, None)
    _until_child(watch)
    child = watch.tree.pids[1]  # type: ignore[union-attr]
    os.kill(child, signal.SIGSTOP)
    try:
        assert not watch.tick(time.monotonic(), True).stopped
    finally:
        os.kill(child, signal.SIGCONT)


def test_each_tick_reads_the_new_log_lines(engine: EngineProcess, tmp_path: Path) -> None:
    """The log is followed in the same tick: the engine's output shows up in the tail's lines."""
    tail = LogTail(tmp_path / "e.log", max_bytes=10**6)
    watch = TreeWatch(engine, tail)
    deadline = time.monotonic() + 10
    while "engine up" not in tail.lines and time.monotonic() < deadline:
        watch.tick(time.monotonic(), False)
        time.sleep(0.05)
    assert "engine up" in tail.lines


def test_a_gone_root_raises_process_gone(engine: EngineProcess) -> None:
    """Once the engine has exited and been reaped the tick says so (the exit watcher reports the exit)."""
    watch = TreeWatch(engine, None)
    watch.tick(time.monotonic(), True)
    os.kill(engine.pid, signal.SIGKILL)
    assert engine.popen is not None
    engine.popen.wait(10)
    with pytest.raises(ProcessGone):
        watch.tick(time.monotonic(), False)
