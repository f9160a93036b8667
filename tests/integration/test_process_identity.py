"""A pid is never signalled on its number alone: after the engine's process is gone its pid may
belong to an unrelated process, and stopping the engine must leave that process alone.

PID reuse cannot be forced here, so the reused pid is played by a real unrelated process (its own
session, like an engine) that an EngineProcess record names with another create time: exactly what
the record of a reaped or dead engine looks like once the kernel has handed its pid to someone else.
"""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import psutil
import pytest

from supervisord_llm.engine.process import EngineProcess, ExitInfo


@pytest.fixture
def bystander():
    """An unrelated process leading its own session, as another user's server or engine would."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _stale_record(pid: int, *, reaped: bool) -> EngineProcess:
    created = psutil.Process(pid).create_time() - 100.0  # the engine that had this pid started earlier
    record = EngineProcess(pid, created, ["engine"], "nodaemon/e/0", popen=None, log_path=None)
    if reaped:
        record.exit = ExitInfo(code=0, signal=None, at_wall=time.time())
    return record


@pytest.mark.anyio
@pytest.mark.parametrize("reaped", [True, False], ids=["exit-seen", "adopted-died-unseen"])
async def test_stopping_an_engine_whose_pid_was_reused_leaves_the_new_owner_alive(bystander, reaped) -> None:
    """Stopping an engine whose pid now names another process neither signals it nor waits for it."""
    record = _stale_record(bystander.pid, reaped=reaped)
    with anyio.fail_after(20):
        result = await record.stop(grace_s=2.0)
    await anyio.sleep(0.3)
    assert bystander.poll() is None, "an unrelated process that got the engine's old pid was killed"
    assert bystander.pid not in result.killed_pids


@pytest.mark.anyio
async def test_waiting_on_a_dead_engine_whose_pid_was_reused_returns_at_once(bystander) -> None:
    """The exit watcher of an adopted engine does not mistake the pid's new owner for the engine."""
    record = _stale_record(bystander.pid, reaped=False)
    with anyio.fail_after(5):
        info = await record.wait()
    assert info is not None and not record.running


@pytest.mark.anyio
async def test_stop_of_a_live_engine_still_reaches_its_whole_group() -> None:
    """The identity check does not spare the engine itself: its group and grandchildren are stopped."""
    from pathlib import Path
    from tempfile import mkdtemp

    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " time.sleep(60)")
    log = Path(mkdtemp(prefix="sl-")) / "e.log"
    proc = EngineProcess.spawn([sys.executable, "-c", code], env={}, cwd=None, log_path=log, tag="t/e/1", engine="e")
    await anyio.sleep(0.5)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    result = await proc.stop(grace_s=2.0)
    assert result.graceful
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
