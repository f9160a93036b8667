"""The daemon owns a real engine end to end: ready only after generation, exits seen at once,
nothing left after a stop, adoption after its own crash, one daemon per state dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from datetime import datetime

import psutil
import pytest

from tests.helpers import (
    PYTHON,
    free_port,
    mlx_engine_toml,
    pids_with_tag_prefix,
    standin_engine_toml,
)

pytestmark = pytest.mark.slow


def _event_time(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def test_tiny_model_becomes_ready_only_after_a_real_generation(daemon_factory, tiny_model) -> None:
    """The real mlx_lm.server reaches `ready` after a successful canary; status shows pid and port."""
    port = free_port()
    d = daemon_factory(mlx_engine_toml("tiny", port, tiny_model)).start()
    engine = d.wait_state("tiny", "ready", 90)
    assert engine["pid"] and psutil.pid_exists(engine["pid"])
    assert engine["port"] == port
    assert engine["last_canary"]["ok"] is True and engine["last_canary"]["ttft_s"] > 0
    kinds = [(e["kind"], e.get("to")) for e in d.events() if e.get("engine") == "tiny"]
    assert ("engine.state_changed", "starting") in kinds and ("engine.state_changed", "ready") in kinds
    # llmctl shows the same in its table and its JSON
    out = d.llmctl("status")
    assert out.returncode == 0 and "tiny" in out.stdout and "ready" in out.stdout
    js = d.llmctl("status", "--json")
    assert '"state": "ready"' in js.stdout


def test_sigkill_of_engine_is_seen_within_a_second(daemon_factory, tiny_model) -> None:
    """SIGKILL of the engine: the state leaves `ready` within a second and the signal is recorded."""
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model)).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    engine = d.wait_state("tiny", {"backoff", "failed", "starting"}, 5)
    exited = [e for e in d.events() if e["kind"] == "engine.exited" and e.get("pid") == pid]
    assert exited, d.events()[-5:]
    delay_s = _event_time(exited[0]) - killed_at
    print(f"exit recorded {delay_s * 1000:.1f} ms after SIGKILL")
    assert delay_s < 1.0
    assert exited[0]["signal"] == "SIGKILL"
    assert engine["last_exit"]["signal"] == "SIGKILL"
    assert engine["next_start_at"] is not None  # backoff: the next spawn is scheduled, not immediate


def test_stop_kills_an_engine_that_ignores_sigterm_after_the_grace(daemon_factory) -> None:
    """An engine ignoring SIGTERM is SIGKILLed after stop_grace; nothing is left running."""
    d = daemon_factory(standin_engine_toml("stubborn", free_port(), "--ignore-sigterm", stop_grace="2s")).start()
    pid = d.wait_state("stubborn", "ready", 30)["pid"]
    started = time.monotonic()
    assert d.post("/v1/engines/stubborn/stop").status_code == 200
    d.wait_state("stubborn", "stopped", 30)
    took = time.monotonic() - started
    assert took >= 1.9, "SIGKILL came before the grace period"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    stopped = [e for e in d.events() if e["kind"] == "engine.stopped"][-1]
    assert stopped["graceful"] is False and pid in stopped["killed_pids"]


def test_stop_leaves_no_grandchild_in_another_session(daemon_factory) -> None:
    """A grandchild that moved to its own session is found by its tag and killed on stop."""
    d = daemon_factory(standin_engine_toml("forky", free_port(), "--grandchild")).start()
    d.wait_state("forky", "ready", 30)
    daemon_id = (d.state_dir / "daemon-id").read_text().strip()
    before = pids_with_tag_prefix(daemon_id + "/forky/")
    assert len(before) >= 2, "the stand-in should have a grandchild"
    d.post("/v1/engines/forky/stop")
    d.wait_state("forky", "stopped", 30)
    deadline = time.monotonic() + 5
    while pids_with_tag_prefix(daemon_id + "/") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_with_tag_prefix(daemon_id + "/") == []


def test_daemon_sigkill_and_restart_adopts_the_running_engine(daemon_factory, tiny_model) -> None:
    """SIGKILL the daemon, start it again: same engine pid, no second engine, no restart."""
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model)).start()
    first = d.wait_state("tiny", "ready", 90)
    d.kill()
    assert psutil.pid_exists(first["pid"])
    d.start()
    again = d.wait_state("tiny", "ready", 60)
    assert again["pid"] == first["pid"]
    assert again["restarts"] == first["restarts"]
    daemon_id = (d.state_dir / "daemon-id").read_text().strip()
    engine_procs = [p for p in pids_with_tag_prefix(daemon_id + "/tiny/")]
    assert engine_procs == [first["pid"]]
    spawned = [e for e in d.events() if e["kind"] == "engine.spawned"]
    assert len(spawned) == 1
    adopted = [e for e in d.events() if e["kind"] == "engine.state_changed" and e.get("adopted")]
    assert adopted


def test_second_daemon_on_same_state_dir_is_refused(daemon_factory) -> None:
    """A second daemon on the same state dir exits 1 and names the running one."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    done = subprocess.run([PYTHON, "-m", "supervisord_llm.main", "run", "--config", str(d.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"another supervisord-llm daemon (pid {d.proc.pid}) already runs on state dir {d.state_dir}" in done.stderr
    assert d.status()["daemon"]["pid"] == d.proc.pid  # the first one is untouched


def test_port_taken_by_foreign_process_is_named_and_daemon_keeps_running(daemon_factory) -> None:
    """A foreign listener on the engine's port stops that start with its pid and command."""
    port = free_port()
    holder = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        d = daemon_factory(standin_engine_toml("blocked", port)).start()
        engine = d.wait_state("blocked", {"backoff", "failed"}, 30)
        reason = engine["last_exit"]["reason"]
        assert f"port 127.0.0.1:{port} is already in use by pid {holder.pid}" in reason, reason
        assert "http.server" in reason
        assert engine["diagnosis"]["signature"] == "PortInUse"
        assert d.status()["daemon"]["pid"] == d.proc.pid
    finally:
        holder.kill()
        holder.wait()


def test_llmctl_without_daemon_says_so_in_one_line(tmp_path) -> None:
    """`llmctl status` with no daemon: one line on stderr, exit code 3."""
    done = subprocess.run([PYTHON, "-m", "supervisord_llm.cli", "--socket", str(tmp_path / "none.sock"), "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0
    assert "no supervisord-llm daemon is running" in done.stderr


def test_engine_that_exits_during_start_goes_to_backoff_with_diagnosis(daemon_factory) -> None:
    """An engine printing a Metal OOM line and exiting during start: backoff, diagnosis named."""
    line = ("libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] Command buffer "
            "execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")
    d = daemon_factory(standin_engine_toml("oom", free_port(), "--print-line", line)).start()
    engine = d.wait_state("oom", {"backoff", "failed"}, 30)
    assert engine["diagnosis"] is not None
    assert "Metal" in engine["diagnosis"]["cause"] or "memory" in engine["diagnosis"]["cause"].lower()
    assert "exited during start" in engine["last_exit"]["reason"]


def test_gateway_port_in_use_is_one_clear_line(daemon_factory) -> None:
    """A gateway address that is taken stops the daemon with one line naming it, not a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        d = daemon_factory(standin_engine_toml("a", free_port()) + f'[gateway]\nlisten = "127.0.0.1:{port}"\n')
        d.start(wait=False)
        assert d.proc.wait(60) == 1
        err = d.stderr()
        assert f"the gateway cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    daemon_id = (d.state_dir / "daemon-id").read_text().strip()
    assert pids_with_tag_prefix(daemon_id + "/") == []  # nothing was left running
