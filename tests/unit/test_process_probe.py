"""Process-tree probe on real processes: memory of the whole tree, SIGSTOP anywhere, zombie root, tagged orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from probes.process import ProcessGone, find_tagged_processes, read_process_tree

PY = sys.executable
MIB = 1024 * 1024

# A parent that starts a child, which starts a grandchild in its own session (setsid) holding 64 MiB.
_TREE = f"""
import subprocess, sys, time
grandchild = '''
import sys, time
block = b"x" * (64 * 1024 * 1024)
print("ready", flush=True)
time.sleep(120)
'''
child = '''
import subprocess, sys, time
g = subprocess.Popen([{PY!r}, "-c", {{g!r}}], start_new_session=True, stdout=subprocess.PIPE)
g.stdout.readline()
print(g.pid, flush=True)
time.sleep(120)
'''.replace("{{g!r}}", repr(grandchild))
c = subprocess.Popen([{PY!r}, "-c", child], stdout=subprocess.PIPE)
gpid = int(c.stdout.readline())
print(c.pid, gpid, flush=True)
time.sleep(120)
"""


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached within the bound")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    proc = subprocess.Popen([PY, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    child_pid, grandchild_pid = (int(x) for x in proc.stdout.readline().split())
    try:
        yield proc, child_pid, grandchild_pid
    finally:
        for pid in (grandchild_pid, child_pid):
            _kill(pid)
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_tree_includes_grandchild_in_its_own_session(tree) -> None:
    """A grandchild that called setsid still counts: its pid and its 64 MiB are in the engine's tree."""
    proc, child_pid, grandchild_pid = tree
    reading = read_process_tree(proc.pid, at_s=7.0)
    assert reading.at_s == 7.0
    assert reading.root_pid == proc.pid
    assert set(reading.pids) == {proc.pid, child_pid, grandchild_pid}
    assert reading.rss_bytes >= 64 * MIB
    own = psutil.Process(proc.pid).memory_info().rss
    assert reading.rss_bytes > own + 64 * MIB
    assert not reading.stopped and not reading.zombie


def test_sigstop_anywhere_in_the_tree_is_seen(tree) -> None:
    """SIGSTOP of the grandchild marks the tree stopped; SIGCONT clears it."""
    proc, _child_pid, grandchild_pid = tree
    os.kill(grandchild_pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: read_process_tree(proc.pid, 0.0).stopped)
    finally:
        os.kill(grandchild_pid, signal.SIGCONT)
    _wait_for(lambda: not read_process_tree(proc.pid, 0.0).stopped)


def test_zombie_root_is_reported_then_gone_after_reaping() -> None:
    """An exited but unreaped engine reads as a zombie with no memory; once reaped the probe says it is gone."""
    proc = subprocess.Popen([PY, "-c", "pass"])
    _wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
    reading = read_process_tree(proc.pid, 1.0)
    assert reading.zombie
    assert reading.rss_bytes == 0
    assert reading.pids == (proc.pid,)
    proc.wait()
    with pytest.raises(ProcessGone, match=f"process {proc.pid} does not exist"):
        read_process_tree(proc.pid, 2.0)


def test_orphaned_tagged_grandchild_is_found_outside_the_tree() -> None:
    """A grandchild whose parent exited is outside any tree but is found by the tag its environment carries."""
    value = uuid.uuid4().hex
    spawn_orphan = (
        "import subprocess, sys\n"
        f"g = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(120)'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(g.pid, flush=True)\n"
    )
    env = {**os.environ, "SUPERVISORD_LLM_TEST_TAG": value}
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"], env={**os.environ, "SUPERVISORD_LLM_TEST_TAG": "other"})
    done = subprocess.run([PY, "-c", spawn_orphan], env=env, capture_output=True, text=True, check=True)
    orphan = int(done.stdout)
    try:
        assert psutil.Process(orphan).ppid() != os.getpid()
        assert orphan not in read_process_tree(os.getpid(), 0.0).pids
        assert find_tagged_processes("SUPERVISORD_LLM_TEST_TAG", value) == [orphan]
        _kill(orphan)
        _wait_for(lambda: find_tagged_processes("SUPERVISORD_LLM_TEST_TAG", value) == [])
    finally:
        _kill(orphan)
        other.kill()
        other.wait()


@pytest.mark.parametrize(("tag_env", "value"), [("", "x"), ("A=B", "x"), ("TAG", "")])
def test_bad_tag_is_refused(tag_env: str, value: str) -> None:
    """An empty or malformed tag raises ValueError instead of matching unrelated processes."""
    with pytest.raises(ValueError, match="tag_env|value"):
        find_tagged_processes(tag_env, value)
