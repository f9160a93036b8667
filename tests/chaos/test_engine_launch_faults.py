"""Engines that misbehave around their own process: a launcher that double-forks and exits (the
server lives on in its own session holding the port), an engine that exits 0 at once, one that
floods its log, and a port held by another user's process. The double-fork runs the real
mlx_lm.server on the tiny model; the others use the OpenAI stand-in or plain programs, since the
behaviour under test is the process's, not the engine's."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time

import psutil
import pytest

from tests.chaos.test_engine_faults import daemon_id, kinds, no_engine_processes, wait_for
from tests.helpers import PYTHON, STANDINS, free_port, pids_with_tag_prefix, short_tmpdir, standin_engine_toml

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _command_toml(name: str, port: int, argv: list[str], **keys: str) -> str:
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "command"', f"port = {port}", f"command = {json.dumps(argv)}"]
    keys.setdefault("footprint", "100MB")
    keys.setdefault("stop_grace", "5s")
    keys.setdefault("start_timeout", "60s")
    lines += [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


DOUBLE_FORK = """
import os, sys
if os.fork():
    sys.exit(0)          # the launcher returns at once, as a daemonising wrapper does
os.setsid()
if os.fork():
    os._exit(0)
os.execv(sys.executable, [sys.executable, "-m", "mlx_lm.server", *sys.argv[1:]])
"""


@pytest.mark.chaos_full
def test_launcher_that_double_forks_and_exits_leaves_no_server_behind(daemon_factory, tiny_model, outcome) -> None:
    """A launcher exits 0 after double-forking a real mlx_lm.server: the exit is a failed start, the
    detached server (own session, holding the port) is found by its tag and stopped; the port is free."""
    outcome.scenario = "launcher double-forks and exits (real mlx_lm.server lives on in its own session)"
    outcome.expected = ("exit during start recorded; the detached server found by tag and stopped; port free; "
                        "backoff, never ready")
    port = free_port()
    argv = [PYTHON, "-c", DOUBLE_FORK, "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(port)]
    d = daemon_factory(_command_toml("forker", port, argv)).start()
    engine = d.wait_state("forker", {"backoff", "failed"}, 30)
    assert "exited during start" in engine["last_exit"]["reason"] and "code 0" in engine["last_exit"]["reason"]
    wait_for(lambda: no_engine_processes(d), 30, "the detached server to be stopped")
    wait_for(lambda: not _listening(port), 10, "the port to be free")
    assert not any(e.get("to") == "ready" for e in kinds(d, "engine.state_changed"))
    outcome.observed = (f"{engine['state']}: {engine['last_exit']['reason'][:100]}; detached server stopped by tag; "
                        "port free")
    outcome.lost = "nothing"


def test_engine_that_exits_0_at_once_is_a_failed_start(daemon_factory, outcome) -> None:
    """An engine that exits with status 0 right away is not 'stopped': it is a failed start with backoff."""
    outcome.scenario = "engine exits 0 at once"
    outcome.expected = "exit during start (code 0) recorded; backoff, never ready; the 60 s floor holds"
    d = daemon_factory(_command_toml("quitter", free_port(), [PYTHON, "-c", "pass"])).start()
    engine = d.wait_state("quitter", {"backoff", "failed"}, 30)
    assert engine["last_exit"]["code"] == 0 and "exited during start" in engine["last_exit"]["reason"]
    assert engine["next_start_in_s"] is not None and engine["next_start_in_s"] > 55
    assert len(kinds(d, "engine.spawned")) == 1
    outcome.observed = f"{engine['state']}: {engine['last_exit']['reason']}; next start in {engine['next_start_in_s']:.0f} s"
    outcome.lost = "nothing"


FLOOD = """
import sys, time
line = b"flood " * 170 + b"\\n"   # ~1 KB
while True:
    t = time.monotonic()
    for _ in range(2000):
        sys.stdout.buffer.write(line)
    sys.stdout.flush()
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t)))   # ~20 MB/s
"""


@pytest.mark.chaos_full
def test_engine_flooding_its_log_keeps_the_cap_and_the_daemon_responsive(daemon_factory, outcome) -> None:
    """~20 MB/s into the engine's log for 10 s: the file stays near its cap, the daemon's memory and
    `llmctl status` stay bounded."""
    outcome.scenario = "engine floods its log (~20 MB/s for 10 s)"
    outcome.expected = "log file held near log_max_bytes (2 MB) by rotation; daemon RSS and llmctl status bounded"
    port = free_port()
    script = f"{PYTHON} -c '{FLOOD}' & exec {PYTHON} {STANDINS / 'openai_engine.py'} --port {port}"
    state_dir = short_tmpdir()
    d = daemon_factory(f'[daemon]\nstate_dir = "{state_dir}"\nlog_max_bytes = "2MB"\n'
                       + _command_toml("chatty", port, ["/bin/sh", "-c", script]), state_dir=state_dir).start()
    d.wait_state("chatty", "ready", 30)
    log = d.state_dir / "logs" / "chatty.log"
    daemon_proc = psutil.Process(d.proc.pid)
    biggest = rss = 0
    slowest = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            biggest = max(biggest, log.stat().st_size)
        except OSError:
            pass
        rss = max(rss, daemon_proc.memory_info().rss)
        t0 = time.monotonic()
        assert d.llmctl("status", timeout=30).returncode == 0
        slowest = max(slowest, time.monotonic() - t0)
    assert (d.state_dir / "logs" / "chatty.log.1").exists(), "the log was never rotated"
    assert biggest <= 40 * 10**6, f"the log grew to {biggest / 1e6:.0f} MB with a 2 MB cap"
    assert rss <= 300 * 2**20, f"daemon RSS {rss / 2**20:.0f} MiB"
    assert slowest <= 10, f"llmctl status took {slowest:.1f} s"
    assert d.engine("chatty")["state"] == "ready"
    outcome.observed = (f"largest log seen {biggest / 1e6:.1f} MB (cap 2 MB, rotated to .1); daemon RSS ≤ "
                        f"{rss / 2**20:.0f} MiB; slowest llmctl status {slowest * 1000:.0f} ms; engine ready")
    outcome.lost = "log lines beyond the cap (rotated out by design)"


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root and /usr/bin/python3 to run the port holder as another user")
def test_port_held_by_another_users_process_is_named_and_left_alone(daemon_factory, outcome) -> None:
    """Another user's server holds the engine's port: the start fails naming it; that process is not signalled."""
    outcome.scenario = "port held by another user's process"
    outcome.expected = "start fails with PortInUse naming the holder; the holder keeps running; daemon keeps running"
    port = free_port()
    # The system's Python: the project's virtual environment may not be readable by that user.
    holder = subprocess.Popen([SYSTEM_PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd="/",
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_as_nobody)
    try:
        wait_for(lambda: _listening(port), 10, "the other user's server listens")
        d = daemon_factory(standin_engine_toml("e", port)).start()
        engine = wait_for(lambda: (e := d.engine("e"))["state"] in ("backoff", "failed") and e["diagnosis"] and e,
                          20, "the start to fail")
        assert engine["diagnosis"]["signature"] == "PortInUse" and str(port) in engine["last_exit"]["reason"]
        time.sleep(1)
        assert holder.poll() is None, "the other user's process was signalled"
        assert pids_with_tag_prefix(daemon_id(d) + "/") == []
        outcome.observed = f"{engine['state']}: {engine['last_exit']['reason'][:140]}; holder (uid 65534) untouched"
        outcome.lost = "nothing"
    finally:
        holder.kill()
        holder.wait()


class _JumpingClock:
    """The system's monotonic clock with a wall clock that a test can jump (NTP step, a person's `date -s`)."""

    def __init__(self) -> None:
        self.wall_offset_s = 0.0

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time() + self.wall_offset_s


@pytest.mark.anyio
async def test_wall_clock_jump_changes_no_restart_timing(outcome) -> None:
    """The wall clock steps an hour back, then two forward, while an engine waits in backoff: the wait
    (measured on the monotonic clock) is unchanged; only the displayed wall time of the next start moves."""
    import io
    import signal as signals

    import anyio
    import structlog

    from supervisord_llm.config import load_config
    from supervisord_llm.daemon import Daemon

    outcome.scenario = "wall clock jumps ±1 h while an engine waits in backoff (in-process daemon, stand-in engine)"
    outcome.expected = "next start in ≈ the same seconds before and after each jump; no spawn, no early restart"
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n' + standin_engine_toml("e", free_port()))
    clock = _JumpingClock()
    daemon = Daemon(load_config(path), logger=structlog.wrap_logger(structlog.PrintLogger(io.StringIO())), clock=clock)
    daemon.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            sup = daemon.supervisors["e"]
            with anyio.fail_after(30):
                await sup.wait_for(lambda s: s.state == "ready", None)
            assert sup.proc is not None
            os.kill(sup.proc.pid, signals.SIGKILL)
            with anyio.fail_after(10):
                await sup.wait_for(lambda s: s.state == "backoff", None)
            seen = []
            for jump_s in (0.0, -3600.0, 7200.0):
                clock.wall_offset_s += jump_s
                await anyio.sleep(0.5)
                status = sup.status()
                seen.append((status["next_start_in_s"], status["next_start_at"] - clock.wall()))
            spawns = [e for e in daemon.events.recent if e["kind"] == "engine.spawned"]
            await daemon.shutdown()
            tg.cancel_scope.cancel()
    finally:
        daemon.close()
    waits = [w for w, _ in seen]
    assert max(waits) - min(waits) < 3, f"the backoff wait moved with the wall clock: {seen}"
    assert all(abs(w - shown) < 1.5 for w, shown in seen), seen
    assert min(waits) > 50 and len(spawns) == 1, "no restart came early"
    outcome.observed = (f"next start in {waits[0]:.1f} s, then {waits[1]:.1f} s after −1 h, {waits[2]:.1f} s after +2 h; "
                        "one spawn")
    outcome.lost = "nothing"
