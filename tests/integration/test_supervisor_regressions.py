"""Regression tests for supervisor/swap defects found in review; each names the bug it pins."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.helpers import free_port, standin_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest


def _spawns(d, name: str) -> int:
    return len([e for e in d.events() if e["kind"] == "engine.spawned" and e["engine"] == name])


def test_gateway_requests_for_a_broken_engine_do_not_respawn_in_a_loop(daemon_factory) -> None:
    """Bug: each gateway request for a broken exclusive engine forced a new swap (both engines respawned
    every request, no 60 s floor). Now the broken engine keeps its backoff and requests get 503."""
    gw = free_port()
    cfg = standin_engine_toml("a", free_port(), exclusive=True, default=True)
    cfg += standin_engine_toml("b", free_port(), "--print-line", "boom", exclusive=True)
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = 20\n'
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 30)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    statuses = []
    for _ in range(3):
        statuses.append(httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json=body, timeout=60).status_code)
        time.sleep(1)
    assert statuses == [503, 503, 503]
    assert _spawns(d, "b") == 1, "the broken engine was spawned again inside its backoff"
    assert _spawns(d, "a") == 2  # started once, brought back once by the rollback
    assert d.engine("b")["state"] == "stopped" and d.wait_state("a", "ready", 30)


def test_switch_right_after_a_restart_finishes(daemon_factory) -> None:
    """Bug: a swap that began while an engine it had to stop was restarting waited forever (and the
    gateway answered 503 for every engine). Now the stop wins over the pending restart."""
    cfg = standin_engine_toml("a", free_port(), "--load-s", "1", exclusive=True, default=True, stop_grace="5s")
    cfg += standin_engine_toml("b", free_port(), exclusive=True)
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 30)
    assert d.llmctl("restart", "a", "--force", "--no-wait").returncode == 0
    out = d.llmctl("switch", "b", timeout=120)
    assert out.returncode == 0, out.stderr
    status = d.status()
    assert status["swap"] is None
    assert d.engine("b")["state"] == "ready" and d.engine("a")["state"] == "stopped"


def test_daemon_restart_during_backoff_keeps_waiting(daemon_factory) -> None:
    """Bug: a daemon restarted while an engine waited in backoff spawned it at once (the 60 s floor was
    lost across daemon restarts). Now it resumes the backoff."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    pid = d.wait_state("a", "ready", 30)["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("a", "backoff", 10)
    d.kill()
    d.start()
    engine = d.wait_state("a", "backoff", 10)
    assert engine["next_start_in_s"] > 45
    time.sleep(2)
    assert _spawns(d, "a") == 1


def test_an_engine_that_died_while_the_daemon_was_down_waits_out_its_floor_in_backoff(daemon_factory) -> None:
    """Bug: when the state file had the spawn but not the exit (the engine died while the daemon was
    down, or the daemon was killed before its last state write landed), the next daemon showed the
    engine `starting` for a minute while it spawned nothing. Now it is `backoff` with the time left."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    pid = d.wait_state("a", "ready", 30)["pid"]
    d.kill()
    os.kill(pid, signal.SIGKILL)
    d.start()
    engine = d.wait_state("a", "backoff", 10)
    assert engine["next_start_in_s"] > 40 and engine["pid"] is None
    assert "not running" in engine["state_reason"]
    time.sleep(2)
    assert _spawns(d, "a") == 1 and d.engine("a")["state"] == "backoff"


def test_unwritable_log_fails_the_start_visibly(daemon_factory) -> None:
    """Bug: an OSError while opening the engine's log left it `starting` forever. Now the start fails
    with the reason and the engine goes to backoff."""
    d = daemon_factory(standin_engine_toml("a", free_port(), autostart=False))
    (d.state_dir / "logs" / "a.log").mkdir(parents=True)  # a directory where the log file must go
    d.start()
    assert d.post("/v1/engines/a/start").status_code == 200
    engine = d.wait_state("a", {"backoff", "failed"}, 20)
    assert "cannot open its log file" in engine["last_exit"]["reason"]


def test_stop_of_an_engine_in_backoff_names_the_state_it_was_in(daemon_factory) -> None:
    """Bug: `llmctl stop` of an engine in backoff said "stopped (it was in stopped)"."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    os.kill(d.wait_state("a", "ready", 30)["pid"], signal.SIGKILL)
    d.wait_state("a", "backoff", 10)
    out = d.llmctl("stop", "a")
    assert out.returncode == 0 and "it was in backoff" in out.stdout
