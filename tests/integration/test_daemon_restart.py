"""A restart of the daemon that keeps the models (`llmctl daemon restart`, SIGHUP), outside any service manager."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port, mlx_engine_toml, standin_engine_toml

pytestmark = [pytest.mark.slow]


def _spawns(events: list[dict]) -> int:
    return sum(1 for e in events if e.get("kind") == "engine.spawned")


def _wait_restarted(d, uptime_before: float, timeout_s: float = 30) -> dict:
    # llmctl's own client: it closes its socket when a connect is refused (the control socket is
    # briefly gone during the exec), where httpx's Unix transport leaks it.
    from supervisord_llm.cli import Client, NoDaemon

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = Client(d.socket, timeout_s=5).request("GET", "/v1/status")
            if response.status_code == 200 and response.json()["daemon"]["uptime_s"] < uptime_before:
                return response.json()
        except (NoDaemon, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the daemon did not restart: {d.stderr()}")


def test_llmctl_daemon_restart_keeps_the_engine_and_its_exit_status_stays_known(daemon_factory, tiny_model: Path) -> None:
    """`llmctl daemon restart` re-executes the daemon in place: same pids, no reload; a later engine crash still reports its signal."""
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model)).start()
    engine = d.wait_state("tiny", "ready", timeout_s=60)
    daemon_pid = d.proc.pid

    done = d.llmctl("daemon", "restart", timeout=90)
    assert done.returncode == 0, done.stderr
    # As it serves again (an adopted engine is checked again, `starting` a moment: it was reported so).
    assert f"engines kept: tiny ready (pid {engine['pid']})" in done.stdout, done.stdout
    assert d.proc.poll() is None and d.status()["daemon"]["pid"] == daemon_pid
    after = d.wait_state("tiny", "ready", timeout_s=30)
    assert after["pid"] == engine["pid"]
    assert _spawns(d.events()) == 1, "the engine must be adopted, not started again"

    # The adopted engine is still this process's child: its real exit status is reaped, not "unknown".
    os.kill(engine["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        exited = [e for e in d.events() if e.get("kind") == "engine.exited"]
        if exited:
            break
        time.sleep(0.1)
    last_exit = d.engine("tiny")["last_exit"]
    assert last_exit["signal"] == "SIGKILL", last_exit


def test_llmctl_daemon_restart_sees_a_restart_of_a_daemon_up_for_less_than_a_second(daemon_factory) -> None:
    """llmctl told the new daemon by an uptime that went back by more than a second: a daemon restarted within
    about a second of its start was never seen to restart (exit 4 after the timeout). Its start time tells."""
    d = daemon_factory(standin_engine_toml("e", free_port(), autostart=False)).start()
    done = d.llmctl("daemon", "restart", "--timeout", "20", timeout=60)
    assert done.returncode == 0 and "daemon restarted" in done.stdout, (done.stdout, done.stderr)


def test_an_adopted_engine_keeps_how_long_it_has_been_ready(daemon_factory) -> None:
    """After `llmctl daemon restart` the engine the daemon adopts shows it has been ready since its own run became
    ready (status FOR, `ready_since`), not since the new daemon's check of it; its ready event's startup_s is
    that check, not the time since the original spawn."""
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", timeout_s=30)
    time.sleep(4)
    before = d.engine("e")["for_s"]
    done = d.llmctl("daemon", "restart", timeout=90)
    assert done.returncode == 0, done.stderr
    after = d.wait_state("e", "ready", timeout_s=30)
    assert after["for_s"] >= before, (before, after["for_s"])
    readies = [e for e in d.events() if e.get("kind") == "engine.state_changed" and e.get("to") == "ready"]
    assert len(readies) == 2 and readies[-1]["startup_s"] < before, readies


def test_sighup_restarts_the_daemon_without_touching_the_engine(daemon_factory, tiny_model: Path) -> None:
    """SIGHUP (what `systemctl reload` sends) re-executes the daemon; the engine keeps its pid and state."""
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model)).start()
    engine = d.wait_state("tiny", "ready", timeout_s=60)
    time.sleep(1.5)
    uptime = d.status()["daemon"]["uptime_s"]
    os.kill(d.proc.pid, signal.SIGHUP)
    _wait_restarted(d, uptime)
    assert d.proc.poll() is None
    after = d.wait_state("tiny", "ready", timeout_s=30)
    assert after["pid"] == engine["pid"]
    kinds = [e.get("kind") for e in d.events()]
    assert "daemon.restarting" in kinds and _spawns(d.events()) == 1


def test_a_restart_onto_a_config_that_no_longer_loads_is_refused_and_the_daemon_runs_on(daemon_factory) -> None:
    """A typo saved into the config, then `llmctl daemon restart` (or SIGHUP, `systemctl reload`): the new daemon
    would stop at once on the config and leave the engines to no one. It used to: llmctl said only that the daemon
    did not answer again. Now the restart is refused with the config's error and this daemon supervises on."""
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    engine = d.wait_state("e", "ready", timeout_s=30)
    good = d.config_path.read_text()
    d.config_path.write_text(good + "oops = 1\n")
    refused = d.llmctl("daemon", "restart", "--timeout", "20")
    assert refused.returncode == 1, refused
    assert "the restart is refused" in refused.stderr and "oops: unknown key" in refused.stderr, refused.stderr
    os.kill(d.proc.pid, signal.SIGHUP)
    assert d.wait_events(lambda e: e.get("kind") == "daemon.restart_refused" and "oops" in e.get("error", ""))
    time.sleep(1.0)
    assert d.proc.poll() is None
    assert d.engine("e")["pid"] == engine["pid"] and d.engine("e")["state"] == "ready"
    assert not [e for e in d.events() if e.get("kind") == "daemon.restarting"]
    d.config_path.write_text(good)  # fixed: the restart goes ahead
    done = d.llmctl("daemon", "restart", "--timeout", "60", timeout=90)
    assert done.returncode == 0, done.stderr
    assert d.wait_state("e", "ready", timeout_s=30)["pid"] == engine["pid"]


@pytest.mark.long_wait  # the engine's new run waits out the 60 s floor after its first spawn
def test_an_engine_whose_address_changed_in_the_config_is_restarted_on_it_not_adopted_as_it_was(daemon_factory) -> None:
    """A new port for an engine, then `llmctl daemon restart`: the old process listens on the old port. It used to
    be adopted anyway and probed on the new port, in `starting` until start_timeout (15 min by default). llmctl
    says it was started again, not kept."""
    old_port, new_port = free_port(), free_port()
    d = daemon_factory(standin_engine_toml("e", old_port, start_timeout="10m")).start()
    engine = d.wait_state("e", "ready", timeout_s=30)
    d.config_path.write_text(d.config_path.read_text().replace(f"port = {old_port}", f"port = {new_port}"))
    done = d.llmctl("daemon", "restart", "--timeout", "150", timeout=200)
    assert done.returncode == 0, done.stderr
    # Not "kept" (llmctl said so of the engine it had just seen started again on its new port).
    assert "engines kept: none; started: e " in done.stdout and f"was {engine['pid']})" in done.stdout, done.stdout
    assert d.wait_events(lambda e: e.get("kind") == "engine.state_changed" and e.get("engine") == "e"
                         and "address changed" in str(e.get("reason")), timeout_s=30), d.stderr()
    after = d.wait_state("e", "ready", timeout_s=150)
    assert after["pid"] != engine["pid"] and after["port"] == new_port
    assert not psutil.pid_exists(engine["pid"]) or psutil.Process(engine["pid"]).status() == psutil.STATUS_ZOMBIE


def test_a_restart_onto_an_address_it_cannot_take_or_another_state_dir_is_refused(daemon_factory) -> None:
    """A config that loads, but whose new gateway port another process holds, or that moves the state dir: the
    new daemon would stop on the port (engines left to no one), or not find its engines (second copies)."""
    import socket

    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port()) + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n').start()
    engine = d.wait_state("e", "ready", timeout_s=30)
    good = d.config_path.read_text()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        d.config_path.write_text(good.replace(f"127.0.0.1:{gw}", f"127.0.0.1:{busy}"))
        refused = d.llmctl("daemon", "restart", "--timeout", "20")
    assert refused.returncode == 1 and f"cannot listen on 127.0.0.1:{busy}" in refused.stderr, refused
    moved = d.state_dir / "elsewhere"
    d.config_path.write_text(good.replace(f'state_dir = "{d.state_dir}"', f'state_dir = "{moved}"'))
    refused = d.llmctl("daemon", "restart", "--timeout", "20")
    assert refused.returncode == 1 and "moves the state dir" in refused.stderr, refused
    assert d.proc.poll() is None and d.engine("e")["pid"] == engine["pid"]
    d.config_path.write_text(good)
    assert d.llmctl("daemon", "restart", "--timeout", "60", timeout=90).returncode == 0


def test_after_a_restart_the_keeper_of_an_orphan_is_reaped_once_the_orphan_is_killed(daemon_factory) -> None:
    """An engine dropped from the config before SIGHUP is killed as an orphan by the re-executed daemon,
    and its keeper (still the daemon's child) is reaped: no zombie keeper stays behind."""
    dropped_toml = standin_engine_toml("dropped", free_port())
    d = daemon_factory(standin_engine_toml("kept", free_port()) + dropped_toml).start()
    d.wait_state("kept", "ready", timeout_s=30)
    dropped = d.wait_state("dropped", "ready", timeout_s=30)
    keeper = psutil.Process(dropped["pid"]).parent()
    assert keeper is not None and keeper.ppid() == d.proc.pid and "keeper.py" in " ".join(keeper.cmdline())
    d.config_path.write_text(d.config_path.read_text().replace(dropped_toml, ""))
    uptime = d.status()["daemon"]["uptime_s"]
    os.kill(d.proc.pid, signal.SIGHUP)
    _wait_restarted(d, uptime)
    deadline = time.monotonic() + 20
    while not any(e.get("kind") == "daemon.orphans_killed" for e in d.events()):
        assert time.monotonic() < deadline, d.stderr()
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while keeper.is_running():  # a zombie still "is running" to psutil (same pid and create time)
        assert time.monotonic() < deadline, f"keeper {keeper.pid} is left {keeper.status()}"
        time.sleep(0.1)
    assert not psutil.pid_exists(dropped["pid"])
    assert d.wait_state("kept", "ready", timeout_s=30)["restarts"] == 0


@pytest.mark.long_wait  # the 60 s spawn floor runs out before the second daemon may start the engines again
def test_after_a_clean_stop_the_next_daemon_starts_again_what_ran_and_keeps_what_a_person_stopped(
        daemon_factory) -> None:
    """SIGTERM stops the engines (stop_engines_on_exit); the next daemon on the same state starts again the
    autostart engines (once their 60 s spawn floor allows), resumes the restart backoff of one that had crashed,
    leaves stopped the one a person stopped, and one a person had started without autostart, as a fresh start
    would. A re-exec (`llmctl daemon restart`) stops nothing: an engine in its backoff keeps it."""
    config = (standin_engine_toml("a", free_port())
              + standin_engine_toml("b", free_port(), autostart=False)
              + standin_engine_toml("c", free_port())
              + standin_engine_toml("off", free_port()))
    first = daemon_factory(config).start()
    for name in ("a", "c", "off"):
        first.wait_state(name, "ready", 30)
    assert first.llmctl("start", "b").returncode == 0
    first.wait_state("b", "ready", 30)
    assert first.llmctl("stop", "off").returncode == 0
    first.wait_state("off", "stopped", 30)
    os.kill(first.engine("c")["pid"], signal.SIGKILL)
    c_before = first.wait_state("c", "backoff", 30)
    first.stop()
    assert first.proc is not None and first.proc.returncode == 0

    second = daemon_factory(config, state_dir=first.state_dir).start()
    for name in ("a", "c"):  # waiting out the floor (a) or the backoff (c), each with its time shown
        engine = second.wait_state(name, "backoff", 30)
        assert engine["next_start_in_s"] is not None and engine["next_start_in_s"] > 0, engine
    assert abs(second.engine("c")["next_start_at"] - c_before["next_start_at"]) < 2.0
    off = second.engine("off")
    assert off["state"] == "stopped" and off["state_reason"] == "llmctl stop", off
    b = second.engine("b")
    assert b["state"] == "stopped" and b["state_reason"] == "daemon shutdown", b
    for name in ("a", "c"):
        assert second.wait_state(name, "ready", 90)["state"] == "ready"
    assert second.engine("off")["state"] == "stopped"

    # b, started by hand, crashes into its backoff; a re-exec of the daemon keeps that backoff.
    assert second.llmctl("start", "b", "--force").returncode == 0
    os.kill(second.wait_state("b", "ready", 30)["pid"], signal.SIGKILL)
    second.wait_state("b", "backoff", 30)
    uptime = second.status()["daemon"]["uptime_s"]
    assert second.llmctl("daemon", "restart").returncode == 0
    _wait_restarted(second, uptime)
    b = second.engine("b")
    assert b["state"] == "backoff" and b["next_start_in_s"] is not None, b


def test_requests_open_through_a_daemon_restart_end_with_an_error_their_clients_can_read(daemon_factory) -> None:
    """`llmctl daemon restart` keeps the engines, but the gateway's process ends with the daemon: its open
    requests get shutdown_grace_s, then each ends with an error in its client's shape (a stream's error event,
    a 503 with Retry-After), not a connection closed mid-answer ("incomplete chunked read"); so does a stream
    still held for an engine that loads."""
    import threading

    import httpx

    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "10", default=True)
                       + standin_engine_toml("slow", free_port(), "--load-s", "60", autostart=False,
                                             start_timeout="2m")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nshutdown_grace_s = 1\n').start()
    d.wait_state("e", "ready", 30)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    body = {"model": "e", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}
    lines: list[str] = []
    whole: list[httpx.Response] = []
    streaming = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                streaming.set()

    held: list[str] = []  # a stream held for an engine that loads: its head and keep-alive comments went out

    def held_stream() -> None:
        with httpx.stream("POST", url, json={**body, "model": "slow", "stream": True}, timeout=60) as response:
            held.extend(response.iter_lines())

    threads = [threading.Thread(target=stream),
               threading.Thread(target=lambda: whole.append(httpx.post(url, json=body, timeout=60))),
               threading.Thread(target=held_stream)]
    for t in threads:
        t.start()
    assert streaming.wait(30)
    time.sleep(1.5)  # the held stream has its head
    assert d.llmctl("daemon", "restart", "--timeout", "60", timeout=90).returncode == 0
    for t in threads:
        t.join(60)
    errors = [line for line in lines if "gateway_stopping" in line]
    assert errors and "send it again" in errors[0], lines[-3:]
    assert [line for line in held if "gateway_stopping" in line], held
    assert whole and whole[0].status_code == 503, whole
    assert whole[0].json()["error"]["code"] == "gateway_stopping" and whole[0].headers["retry-after"], whole[0].text
    r = httpx.post(url, json={**body, "max_tokens": 3}, timeout=60)  # the new daemon's gateway serves
    assert r.status_code == 200, r.text
