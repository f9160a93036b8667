"""The keeper: an adopted engine's exit keeps its real code or signal after the daemon was restarted.

One daemon runs four engines, is SIGKILLed, and a second daemon on the same state dir adopts them;
then each test ends one engine its own way. Two are the real mlx_lm.server on the tiny model (the
SIGKILL of an OOM kill, the SIGABRT of a Metal abort). Two are the OpenAI stand-in, because the
real server cannot exit 0 when a test asks, and because the keeper-killed case is about the keeper,
not the engine: what is recorded is the kernel's wait status, whatever the program.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from supervisord_llm.engine.process import EngineProcess, find_keeper, reap_keepers, reap_zombie_children
from tests.helpers import Daemon, free_port, mlx_engine_toml, short_tmpdir, standin_engine_toml, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest

ENGINES = ("oom", "abort", "clean", "orphaned")


def _keeper_of(pid: int) -> psutil.Process:
    parent = psutil.Process(pid).parent()
    assert parent is not None and any(arg.endswith("keeper.py") for arg in parent.cmdline()), parent
    return parent


def _gone(proc: psutil.Process) -> bool:
    """Gone from the process table: neither running nor a zombie waiting for its parent."""
    try:
        return psutil.Process(proc.pid).create_time() != proc.create_time()
    except psutil.NoSuchProcess:
        return True


class Adopted:
    """The second daemon, which adopted the engines of a SIGKILLed first one."""

    def __init__(self, daemon: Daemon, pids: dict[str, int]) -> None:
        self.daemon = daemon
        self.pids = pids

    def exit_of(self, name: str) -> tuple[dict, dict, dict]:
        """The engine's ``engine.exited`` event, its ``episodes`` decision and its status' last_exit."""
        def found() -> tuple[dict, dict] | None:
            events = self.daemon.events()
            exited = [e for e in events if e.get("kind") == "engine.exited" and e.get("engine") == name]
            decided = [e for e in events if e.get("kind") == "policy.decided" and e.get("policy") == "episodes"
                       and e.get("engine") == name]
            return (exited[-1], decided[-1]) if exited and decided else None

        exited, decided = wait_for(found, 30, f"{name}'s exit in events.jsonl")
        return exited, decided, self.daemon.engine(name)["last_exit"]


@pytest.fixture(scope="module")
def adopted(tiny_model: Path) -> Iterator[Adopted]:
    state_dir = short_tmpdir()
    standin = {"stop_grace": "5s", "cwd": str(state_dir)}
    config = (mlx_engine_toml("oom", free_port(), tiny_model, cwd=str(state_dir))
              + mlx_engine_toml("abort", free_port(), tiny_model, cwd=str(state_dir))
              + standin_engine_toml("clean", free_port(), "--exit-on-sigusr1", "--exit-code", "0", **standin)
              + standin_engine_toml("orphaned", free_port(), **standin)
              + standin_engine_toml("unwatched", free_port(), **standin))
    first = Daemon(config, state_dir=state_dir).start()
    second = Daemon(config, state_dir=state_dir)
    try:
        pids = {name: first.wait_state(name, "ready", timeout_s=90)["pid"] for name in (*ENGINES, "unwatched")}
        first.kill()
        os.kill(pids["unwatched"], signal.SIGKILL)  # while no daemon runs: only its keeper sees it
        wait_for(lambda: (state_dir / "exits" / f"unwatched.{pids['unwatched']}.json").exists(), 10, "the keeper's record")
        second.start()
        for name in ENGINES:
            assert second.wait_state(name, "ready", timeout_s=60)["pid"] == pids[name]
        assert sum(1 for e in second.events() if e.get("kind") == "engine.spawned") == len(ENGINES) + 1
        yield Adopted(second, pids)
    finally:
        second.cleanup()
        first.cleanup()


def test_an_adopted_engine_killed_by_sigkill_reports_sigkill(adopted: Adopted) -> None:
    """An OOM-killed engine that a restarted daemon adopted shows SIGKILL in status, events and its alert episode."""
    parent = psutil.Process(adopted.pids["oom"]).parent()
    parent_argv = parent.cmdline() if parent is not None else []
    os.kill(adopted.pids["oom"], signal.SIGKILL)
    exited, decided, last_exit = adopted.exit_of("oom")
    assert exited["signal"] == "SIGKILL" and exited["code"] is None, exited
    assert decided["exit"] == "SIGKILL", decided
    assert last_exit["signal"] == "SIGKILL" and last_exit["reason"].startswith("killed by SIGKILL"), last_exit
    assert parent is not None and any(arg.endswith("keeper.py") for arg in parent_argv), parent
    wait_for(lambda: _gone(parent), 10, "the keeper to exit after its engine (and init to reap it)")


def test_an_adopted_engine_that_aborts_reports_sigabrt(adopted: Adopted) -> None:
    """A Metal-style abort (SIGABRT) of an adopted engine is told apart from an OOM kill."""
    os.kill(adopted.pids["abort"], signal.SIGABRT)
    exited, decided, last_exit = adopted.exit_of("abort")
    assert exited["signal"] == "SIGABRT" and decided["exit"] == "SIGABRT", (exited, decided)
    assert last_exit["signal"] == "SIGABRT", last_exit


def test_an_adopted_engine_that_exits_cleanly_reports_code_0(adopted: Adopted) -> None:
    """An adopted engine that ends on its own with status 0 reports code 0, not an unknown status."""
    os.kill(adopted.pids["clean"], signal.SIGUSR1)
    exited, decided, last_exit = adopted.exit_of("clean")
    assert exited["code"] == 0 and exited["signal"] is None, exited
    assert decided["exit"] == "code 0", decided
    assert last_exit["code"] == 0 and last_exit["reason"].startswith("exited with code 0"), last_exit


def test_a_killed_keeper_leaves_its_engine_running_and_the_status_unknown(adopted: Adopted) -> None:
    """SIGKILL of a keeper does not touch its engine (still adopted, same pid); its exit then reads 'status unknown'."""
    pid = adopted.pids["orphaned"]
    keeper = _keeper_of(pid)
    keeper.kill()
    wait_for(lambda: _gone(keeper), 10, "the killed keeper to be reaped")
    time.sleep(1.0)
    engine = adopted.daemon.engine("orphaned")
    assert engine["state"] == "ready" and engine["pid"] == pid, engine
    os.kill(pid, signal.SIGKILL)
    exited, _decided, last_exit = adopted.exit_of("orphaned")
    assert exited["code"] is None and exited["signal"] is None, exited
    assert "status unknown: its keeper process was killed" in last_exit["reason"], last_exit


def test_an_engine_that_died_while_no_daemon_ran_reports_how(adopted: Adopted) -> None:
    """An engine killed while the daemon was down shows that exit (SIGKILL) once a daemon starts again."""
    exited = next(e for e in adopted.daemon.events() if e.get("kind") == "engine.exited"
                  and e.get("engine") == "unwatched")
    assert exited["signal"] == "SIGKILL" and exited["while_daemon_down"] is True, exited
    last_exit = adopted.daemon.engine("unwatched")["last_exit"]
    assert last_exit["reason"] == "exited while no daemon was running (killed by SIGKILL)", last_exit
    assert not [p for p in (adopted.daemon.state_dir / "exits").iterdir() if p.name.startswith("unwatched.")]


# ---- the keeper of an engine this daemon spawned ------------------------------------------------

ENGINE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
         "print('engine up', flush=True); time.sleep(60)"


async def _spawn(tmp_path: Path) -> EngineProcess:
    return await anyio.to_thread.run_sync(lambda: EngineProcess.spawn(
        [sys.executable, "-c", ENGINE], env={}, cwd=None, log_path=tmp_path / "e.log", tag="test/e/1", engine="e"))


@pytest.mark.anyio
async def test_stop_ends_the_engine_tree_and_its_keeper_without_a_zombie(tmp_path: Path) -> None:
    """A stopped engine leaves neither its tree nor its keeper behind (no zombie), and its SIGTERM is recorded."""
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    keeper = psutil.Process(proc.keeper.pid)
    assert psutil.Process(proc.pid).parent() == keeper
    assert os.getpgid(proc.pid) == proc.pid and os.getpgid(keeper.pid) != proc.pid  # killpg never hits the keeper
    await anyio.sleep(0.5)
    tree = psutil.Process(proc.pid).children(recursive=True)
    result = await proc.stop(grace_s=5.0)
    assert result.graceful and proc.exit is not None and proc.exit.signal == signal.SIGTERM, proc.exit
    assert _gone(keeper), keeper.status()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # init reaps these
    assert not list((tmp_path / "exits").iterdir()), "the record was handed over and removed"


@pytest.mark.anyio
async def test_sigterm_to_the_keeper_neither_ends_it_nor_reaches_the_engine(tmp_path: Path) -> None:
    """A stray SIGTERM to the keeper is ignored: the engine keeps running and its later exit code is still recorded."""
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    os.kill(proc.keeper.pid, signal.SIGTERM)
    await anyio.sleep(0.5)
    assert psutil.Process(proc.keeper.pid).status() != psutil.STATUS_ZOMBIE
    assert proc.running and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    os.kill(proc.pid, signal.SIGKILL)
    with anyio.fail_after(15):
        info = await proc.wait()
    assert info.signal == signal.SIGKILL, info
    await proc.stop(grace_s=1.0)  # sweeps the grandchild


@pytest.mark.anyio
async def test_a_keeper_killed_under_this_daemon_is_reaped_and_its_engine_lives_on(tmp_path: Path) -> None:
    """SIGKILL of the keeper of an engine this daemon spawned: no zombie keeper, the engine keeps running, status unknown."""
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    keeper = psutil.Process(proc.keeper.pid)
    async with anyio.create_task_group() as tg:
        tg.start_soon(proc.wait)  # the daemon always has its exit watcher waiting
        keeper.kill()
        with anyio.fail_after(10):
            while not _gone(keeper):
                await anyio.sleep(0.05)
        assert proc.running and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.exit is not None and proc.exit.describe() == "exited (status unknown: its keeper process was killed)"
    await proc.stop(grace_s=1.0)


@pytest.mark.anyio
async def test_a_missing_program_is_reported_by_name(tmp_path: Path) -> None:
    """An engine command that does not exist fails the start with 'command not found' naming it, keeper gone."""
    from supervisord_llm.errors import EngineSpawnFailed

    with pytest.raises(EngineSpawnFailed, match="command not found: '/nonexistent/engine'"):
        await anyio.to_thread.run_sync(lambda: EngineProcess.spawn(
            ["/nonexistent/engine"], env={}, cwd=None, log_path=tmp_path / "e.log", tag="test/e/2", engine="e"))


# ---- faults of the keeper's own ---------------------------------------------------------------

@pytest.mark.anyio
async def test_an_unwritable_record_reads_unknown_and_says_why_in_the_engine_log(tmp_path: Path) -> None:
    """When the keeper cannot write the exit record the status is 'unknown' (not a guess) and the log says why."""
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    keeper = psutil.Process(proc.keeper.pid)
    proc.keeper.record_path.mkdir()  # rename(2) of a file onto a directory fails: EISDIR
    os.kill(proc.pid, signal.SIGKILL)
    with anyio.fail_after(15):
        info = await proc.wait()
    assert info.code is None and info.signal is None, info
    assert info.describe() == "exited (status unknown: its keeper recorded no exit status)"
    assert "supervisord-llm keeper: cannot record the exit of pid" in (tmp_path / "e.log").read_text()
    assert _gone(keeper)
    assert [p.name for p in (tmp_path / "exits").iterdir()] == [proc.keeper.record_path.name], "no temporary left"
    await proc.stop(grace_s=1.0)


@pytest.mark.anyio
async def test_a_stuck_keeper_is_killed_once_its_engine_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keeper that cannot finish (SIGSTOPped) after its engine died is killed and reaped; the status reads unknown."""
    from supervisord_llm.engine import process

    monkeypatch.setattr(process, "KEEPER_RECORD_WAIT_S", 1.0)
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    keeper = psutil.Process(proc.keeper.pid)
    os.kill(keeper.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGKILL)
    with anyio.fail_after(15):
        info = await proc.wait()
    assert info.code is None and info.signal is None, info
    assert _gone(keeper)
    await proc.stop(grace_s=1.0)


@pytest.mark.anyio
async def test_a_keeper_that_cannot_start_fails_the_spawn_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keeper that exits without reporting the engine's pid fails the start with a message naming the keeper."""
    from supervisord_llm.engine import process
    from supervisord_llm.errors import EngineSpawnFailed

    monkeypatch.setattr(process, "python_executable", lambda: "/bin/false")
    with pytest.raises(EngineSpawnFailed, match="its keeper did not report the engine's pid"):
        await _spawn(tmp_path)


def test_a_record_of_another_spawn_or_a_damaged_one_is_not_believed(tmp_path: Path) -> None:
    """An exit record of a reused pid (another spawn's tag) or a damaged one is ignored, never reported as this exit."""
    from supervisord_llm.engine.process import read_exit_record

    record = tmp_path / "e.42.json"
    record.write_text('{"pid": 42, "tag": "d/e/old", "code": 0, "signal": null, "at": 1.0}')
    assert read_exit_record(record, pid=42, tag="d/e/new") is None
    assert record.exists()
    for damaged in ('{"pid": 42, "tag": "d/e/new", "code": 0, "signal": 9, "at": 1.0}', "{", "[]",
                    '{"pid": 42, "tag": "d/e/new", "code": "0", "signal": null, "at": 1.0}'):
        record.write_text(damaged)
        assert read_exit_record(record, pid=42, tag="d/e/new") is None, damaged
    record.write_text('{"pid": 42, "tag": "d/e/new", "code": null, "signal": 6, "at": 1.5}')
    info = read_exit_record(record, pid=42, tag="d/e/new")
    assert info is not None and info.signal == signal.SIGABRT and info.describe() == "killed by SIGABRT"
    assert not record.exists(), "a record that was handed over is removed"


@pytest.mark.anyio
async def test_a_spawn_works_with_descriptors_past_fd_setsize(tmp_path: Path) -> None:
    """A daemon holding over 1,024 descriptors (a busy gateway) still starts engines: the keeper's report is read."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard descriptor limit ({hard}) is below 1,200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        proc = await _spawn(tmp_path)
        assert proc.keeper is not None and psutil.Process(proc.pid).parent().pid == proc.keeper.pid
        await proc.stop(grace_s=5.0)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.anyio
async def test_the_keeper_of_a_killed_orphan_is_reaped_and_its_record_removed(tmp_path: Path) -> None:
    """An engine nobody supervises (an orphan after a re-exec) is killed: its keeper, this process's
    child, is reaped (no zombie) and the exit record nobody will read is removed."""
    proc = await _spawn(tmp_path)
    keeper = find_keeper(proc.pid, None)
    assert keeper is not None and proc.keeper is not None and keeper.pid == proc.keeper.pid
    keeper_proc = psutil.Process(keeper.pid)
    os.kill(proc.pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(reap_keepers, [keeper])
    assert _gone(keeper_proc), keeper_proc.status()
    assert not keeper.record_path.exists()
    _forget_popen(proc)


def _forget_popen(proc: EngineProcess) -> None:
    """After a re-exec no Popen holds the keeper; here one does, and it must not look still running."""
    assert proc.keeper is not None and proc.keeper.popen is not None
    proc.keeper.popen.returncode = 0


@pytest.mark.anyio
async def test_a_keeper_that_already_ended_is_reaped_at_start(tmp_path: Path) -> None:
    """A keeper whose engine ended while the daemon re-executed is a zombie child at start: it is reaped."""
    proc = await _spawn(tmp_path)
    assert proc.keeper is not None
    keeper_proc = psutil.Process(proc.keeper.pid)
    os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: keeper_proc.status() == psutil.STATUS_ZOMBIE, 10, "the keeper to end")
    assert keeper_proc.pid in await anyio.to_thread.run_sync(reap_zombie_children)
    assert _gone(keeper_proc)
    _forget_popen(proc)
