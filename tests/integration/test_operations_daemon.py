"""Operations a person runs against the real daemon: restart spacing, admission refusals, a second
swap during a swap, hang restarts, sd_notify, logs and events."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from tests.helpers import free_port, mlx_engine_toml, standin_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest


def test_manual_restart_inside_60s_needs_force_and_says_what_it_overrides(daemon_factory) -> None:
    """`llmctl restart` right after a spawn is refused (exit 1, names the 60 s spacing); --force restarts."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    first = d.wait_state("a", "ready", 30)
    refused = d.llmctl("restart", "a")
    assert refused.returncode == 1
    assert "two spawns are kept at least 60s apart" in refused.stderr and "--force" in refused.stderr
    assert d.engine("a")["pid"] == first["pid"]
    forced = d.llmctl("restart", "a", "--force", timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert d.engine("a")["pid"] != first["pid"]


def test_engine_that_does_not_fit_waits_then_stays_stopped_naming_the_numbers(daemon_factory) -> None:
    """A footprint larger than the machine: bounded wait, then `stopped` (not `failed`: no crash loop) with
    the sizes in the reason."""
    cfg = standin_engine_toml("huge", free_port(), footprint="900TB")
    cfg += '[policies.memory]\nadmission_wait = "2s"\n'
    d = daemon_factory(cfg).start()
    d.wait_events(lambda e: e["kind"] == "engine.start_refused" and e["engine"] == "huge", 30)
    engine = d.wait_state("huge", "stopped", 30)
    assert "900000.0 GB" in engine["state_reason"], engine["state_reason"]
    assert engine["start_refused"]["reason"] == "budget", engine  # 900 TB is over any budget (total - headroom)
    waiting = [e for e in d.events() if e["kind"] == "engine.admission_waiting"]
    assert waiting and waiting[0]["wait_s"] <= 2
    assert engine["pid"] is None  # nothing was spawned


def test_a_second_swap_to_another_engine_during_a_swap_is_refused(daemon_factory) -> None:
    """While a swap to b runs, a switch to c gets 409 naming the swap in progress; b's swap finishes."""
    cfg = standin_engine_toml("a", free_port(), exclusive=True, default=True)
    cfg += standin_engine_toml("b", free_port(), "--load-s", "3", exclusive=True)
    cfg += standin_engine_toml("c", free_port(), exclusive=True)
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 30)
    results: dict = {}
    t = threading.Thread(target=lambda: results.update(b=d.post("/v1/switch", {"name": "b"}, timeout=60)))
    t.start()
    d.wait_state("b", "starting", 20)
    second = d.post("/v1/switch", {"name": "c"})
    assert second.status_code == 409
    assert "a swap to 'b' is already in progress" in second.json()["error"]
    t.join(60)
    assert results["b"].status_code == 200
    assert d.engine("b")["state"] == "ready" and d.engine("c")["state"] == "stopped"


def test_hung_engine_is_restarted_gracefully_after_hang_restart_after(daemon_factory, tiny_model) -> None:
    """Still hung after `hang_restart_after`: SIGTERM (after SIGCONT) with the grace; recorded as a hang restart."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, stall="2s")
    cfg += '[policies.restart]\nhang_restart_after = "2s"\n'
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    os.kill(pid, signal.SIGSTOP)
    d.wait_state("tiny", "hung", 20)
    engine = d.wait_state("tiny", "backoff", 30)
    assert engine["last_exit"]["reason"].startswith("hang restart")
    stopped = [e for e in d.events() if e["kind"] == "engine.stopped"][-1]
    assert stopped["graceful"] is True  # woken with SIGCONT, it exited on SIGTERM: no SIGKILL
    assert engine["restarts"] >= 1 and engine["next_start_in_s"] > 0


def test_daemon_sends_ready_status_and_watchdog_to_notify_socket(daemon_factory, tmp_path) -> None:
    """Under systemd (NOTIFY_SOCKET, WATCHDOG_USEC) the daemon sends READY=1, STATUS=… and WATCHDOG=1."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        d = daemon_factory(standin_engine_toml("a", free_port()), env=env).start()
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                any("READY=1" in m for m in seen) and any("WATCHDOG=1" in m for m in seen)
                and any("STATUS=a ready" in m for m in seen)):
            seen.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in seen), seen
        assert any("WATCHDOG=1" in m for m in seen), seen
        assert any("STATUS=a ready" in m for m in seen), seen
        assert d.status()["daemon"]["pid"] == d.proc.pid
    finally:
        sock.close()


def test_llmctl_logs_and_events(daemon_factory) -> None:
    """`llmctl logs NAME` shows the engine's output; `llmctl events` shows its transitions."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    d.wait_state("a", "ready", 30)
    logs = d.llmctl("logs", "a", "-n", "20")
    assert logs.returncode == 0 and "standin listening on" in logs.stdout
    events = d.llmctl("events", "-n", "50")
    assert events.returncode == 0 and "engine.state_changed [a]" in events.stdout
    missing = d.llmctl("logs", "nope")
    assert missing.returncode == 1 and "no such engine" in missing.stderr


def test_starting_an_exclusive_engine_cancels_a_conflicting_backoff(daemon_factory) -> None:
    """a crashed (backoff); `llmctl start b` (exclusive) stops a's pending restart instead of failing it later."""
    cfg = standin_engine_toml("a", free_port(), exclusive=True, default=True)
    cfg += standin_engine_toml("b", free_port(), exclusive=True)
    d = daemon_factory(cfg).start()
    pid = d.wait_state("a", "ready", 30)["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("a", "backoff", 10)
    out = d.llmctl("start", "b", timeout=60)
    assert out.returncode == 0, out.stderr
    assert d.engine("a")["state"] == "stopped" and d.engine("a")["next_start_at"] is None
    assert d.engine("b")["state"] == "ready"


def test_a_switch_to_an_engine_that_is_still_stopping_waits_for_the_stop_then_starts_it(daemon_factory) -> None:
    """`llmctl switch a` while a is still stopping (an idle unload, `llmctl stop --no-wait`; here it ignores
    SIGTERM for its 3 s grace) waits for the stop and then starts a: no failed swap, no rollback."""
    d = daemon_factory(standin_engine_toml("a", free_port(), "--ignore-sigterm", default=True, stop_grace="3s")).start()
    d.wait_state("a", "ready", 30)
    assert d.llmctl("stop", "a", "--no-wait").returncode == 0
    d.wait_state("a", "stopping", 10)
    switched = d.llmctl("switch", "a", timeout=90)
    assert switched.returncode == 0, (switched.stdout, switched.stderr)
    assert d.engine("a")["state"] == "ready"
    assert not [e for e in d.events() if e["kind"] in ("swap.failed", "swap.rolled_back")]


def test_a_switch_that_outlasts_its_timeout_exits_4_naming_it_and_the_daemon_finishes_it(daemon_factory) -> None:
    """`llmctl switch b --timeout 1` to an engine that loads for 5 s: exit 4 with a message naming the 1 s it
    waited (it named the control client's 30 s), and the daemon goes on: b serves afterwards."""
    d = daemon_factory(standin_engine_toml("a", free_port(), default=True, exclusive=True)
                       + standin_engine_toml("b", free_port(), "--load-s", "5", exclusive=True,
                                             autostart=False)).start()
    d.wait_state("a", "ready", 30)
    switched = d.llmctl("switch", "b", "--timeout", "1", timeout=60)
    assert switched.returncode == 4, (switched.stdout, switched.stderr)
    assert "switching to b did not finish within 1s (--timeout)" in switched.stderr, switched.stderr
    d.wait_state("b", "ready", 60)
    assert d.engine("a")["state"] == "stopped"
