"""Faults injected into real engines: each scenario checks the outcome and that nothing was lost
(events durable, no process left behind, never two engines, the daemon still answering)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
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
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def daemon_id(d) -> str:  # type: ignore[no-untyped-def]
    return (d.state_dir / "daemon-id").read_text().strip()


def no_engine_processes(d, name: str = "") -> bool:  # type: ignore[no-untyped-def]
    return pids_with_tag_prefix(f"{daemon_id(d)}/{name}") == []


def kinds(d, kind: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in d.events() if e["kind"] == kind]


def test_sigkill_of_engine_is_recorded_and_restart_is_scheduled(daemon_factory, outcome) -> None:
    """A SIGKILLed engine: exit with SIGKILL in the durable event log, backoff ≥ 60 s, nothing left running."""
    outcome.scenario = "SIGKILL of the engine"
    outcome.expected = "engine.exited (SIGKILL) in events.jsonl at once; backoff with next start ≥ 60 s after the spawn"
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    engine = d.wait_state("e", "backoff", 10)
    took = time.monotonic() - t0
    exited = [e for e in kinds(d, "engine.exited") if e["pid"] == pid]
    assert exited and exited[0]["signal"] == "SIGKILL"
    assert engine["last_exit"]["signal"] == "SIGKILL"
    spawned = [e for e in kinds(d, "engine.spawned") if e["pid"] == pid]
    assert spawned and engine["next_start_at"] is not None
    # The rule is 60 s from the previous spawn. The spawn is recorded just before the fork and its
    # event stamped just after, so the event may be late by the fork's duration, never by seconds.
    assert engine["next_start_at"] - datetime.fromisoformat(spawned[0]["at"]).timestamp() >= 59.5
    assert wait_for(lambda: no_engine_processes(d), 10, "no process of the engine left")
    outcome.observed = (f"backoff {took * 1000:.0f} ms after the kill (seen by polling status); exit recorded with "
                        f"signal SIGKILL; next start in {engine['next_start_in_s']:.0f} s; no process left")
    outcome.lost = "nothing (the exit event is in events.jsonl)"


def test_sigstop_of_real_engine_reads_hung_then_recovers_without_restart(daemon_factory, tiny_model, outcome) -> None:
    """SIGSTOP of a real mlx_lm.server: `hung` within seconds; after SIGCONT `ready` again, same pid."""
    outcome.scenario = "SIGSTOP of the real mlx_lm.server"
    outcome.expected = "hung within process probe + 1 s confirmation (+ slack); SIGCONT → ready, same pid, no restart"
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model, stall="5s")
                       + '\n[policies.restart]\nhang_restart_after = "10m"\n').start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = d.wait_state("tiny", "hung", 15)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "SIGSTOP" in hung["state_reason"] or "stopped" in hung["state_reason"]
    back = d.wait_state("tiny", "ready", 30)
    assert back["pid"] == pid and back["restarts"] == 0
    assert any(e.get("key") == "engine.hung:tiny" for e in kinds(d, "alert.raised"))
    outcome.observed = (f"hung after {took:.1f} s ({hung['state_reason']}); ready again after SIGCONT with the "
                        "same pid, 0 restarts; hung alert raised")
    outcome.lost = "nothing"


def test_engine_ignoring_sigterm_is_killed_after_the_grace(daemon_factory, outcome) -> None:
    """An engine that ignores SIGTERM is SIGKILLed after stop_grace, and its whole tree is gone."""
    outcome.scenario = "SIGTERM ignored"
    outcome.expected = "stop waits stop_grace (2 s), then SIGKILL; stopped; nothing left"
    d = daemon_factory(standin_engine_toml("stubborn", free_port(), "--ignore-sigterm", stop_grace="2s")).start()
    pid = d.wait_state("stubborn", "ready", 30)["pid"]
    t0 = time.monotonic()
    assert d.llmctl("stop", "stubborn").returncode == 0
    d.wait_state("stubborn", "stopped", 30)
    took = time.monotonic() - t0
    stopped = kinds(d, "engine.stopped")[-1]
    assert took >= 1.9 and stopped["graceful"] is False and pid in stopped["killed_pids"]
    assert no_engine_processes(d)
    outcome.observed = f"stopped after {took:.1f} s, graceful=false, SIGKILL to pid {pid}; no process left"
    outcome.lost = "nothing"


def test_exit_during_start_goes_to_backoff(daemon_factory, outcome) -> None:
    """An engine that exits while starting (liveness up, never generates, then exits) ends in backoff, not ready."""
    outcome.scenario = "exit during start"
    outcome.expected = "never ready; engine.exited during start; backoff with the reason; nothing left"
    d = daemon_factory(standin_engine_toml("flaky", free_port(), "--never-ready", "--exit-after-s", "1")).start()
    engine = d.wait_state("flaky", {"backoff", "failed"}, 30)
    assert "exited during start" in engine["last_exit"]["reason"]
    assert not any(e.get("to") == "ready" for e in kinds(d, "engine.state_changed"))
    assert wait_for(lambda: no_engine_processes(d), 10, "no process left")
    outcome.observed = f"{engine['state']}: {engine['last_exit']['reason']}; never ready; no process left"
    outcome.lost = "nothing"


def test_never_ready_engine_times_out_and_is_stopped(daemon_factory, outcome) -> None:
    """/health answers but generation always fails: start_timeout, the engine is stopped and backs off."""
    outcome.scenario = "never ready (/health 200, generation fails)"
    outcome.expected = "not ready on /health alone; start_timeout → stopped → backoff; nothing left"
    d = daemon_factory(standin_engine_toml("liar", free_port(), "--never-ready", start_timeout="3s")).start()
    engine = d.wait_state("liar", {"backoff", "failed"}, 30)
    timeouts = kinds(d, "engine.start_timeout")
    assert timeouts and "generation" in timeouts[0]["error"]
    assert not any(e.get("to") == "ready" for e in kinds(d, "engine.state_changed"))
    assert wait_for(lambda: no_engine_processes(d), 10, "no process left")
    outcome.observed = f"{engine['state']} after start_timeout: {timeouts[0]['error'][:120]}; no process left"
    outcome.lost = "nothing"


def test_port_stolen_after_a_crash_is_named(daemon_factory, outcome) -> None:
    """The engine crashes and another program takes its port: the next start names that program's pid."""
    outcome.scenario = "port stolen by another process"
    outcome.expected = "the start fails with PortInUse naming the holder's pid and command; daemon keeps running"
    port = free_port()
    d = daemon_factory(standin_engine_toml("e", port)).start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("e", "backoff", 10)
    thief = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 10, "the thief listens")
        assert d.post("/v1/engines/e/start", {"force": True}).status_code == 200
        engine = wait_for(lambda: (e := d.engine("e"))["state"] in ("backoff", "failed")
                          and e["diagnosis"] and e["diagnosis"]["signature"] == "PortInUse" and e, 20,
                          "the start to fail with PortInUse")
        assert f"pid {thief.pid}" in engine["last_exit"]["reason"]
        assert d.status()["daemon"]["pid"] == d.proc.pid
        outcome.observed = f"{engine['state']}: {engine['last_exit']['reason'][:140]}"
        outcome.lost = "nothing"
    finally:
        thief.kill()
        thief.wait()


def test_grandchild_of_a_crashed_engine_is_swept(daemon_factory, outcome) -> None:
    """A grandchild in its own session outlives its SIGKILLed parent: the daemon finds it by tag and kills it."""
    outcome.scenario = "grandchild left behind after a crash"
    outcome.expected = "the crash sweep finds the grandchild by its tag and ends it; no tagged process left"
    d = daemon_factory(standin_engine_toml("forky", free_port(), "--grandchild")).start()
    pid = d.wait_state("forky", "ready", 30)["pid"]
    tagged = wait_for(lambda: len(p := pids_with_tag_prefix(daemon_id(d) + "/forky/")) >= 2 and p, 10,
                      "the grandchild to exist")
    grandchild = next(p for p in tagged if p != pid)
    os.kill(pid, signal.SIGKILL)
    d.wait_state("forky", "backoff", 10)
    wait_for(lambda: no_engine_processes(d), 20, "no tagged process left")

    def ended() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # A process in the middle of exiting has lost its environment (so its tag) a moment before it is a zombie.
    wait_for(ended, 10, "the grandchild to end")
    # engine.leftovers_killed names only processes that needed SIGKILL; this one went on SIGTERM.
    swept = kinds(d, "engine.leftovers_killed")
    outcome.observed = (f"grandchild {grandchild} (own session) gone after the crash sweep; no tagged process left; "
                        f"leftovers_killed events: {len(swept)} (the sweep's SIGTERM sufficed)")
    outcome.lost = "nothing"


def test_daemon_sigkilled_mid_swap_finishes_the_swap_after_restart(daemon_factory, outcome) -> None:
    """Daemon SIGKILLed while a swap loads the new engine: the next daemon finishes it; one engine, no orphan."""
    outcome.scenario = "daemon SIGKILLed in the middle of a swap, then restarted"
    outcome.expected = "swap resumed and finished (or rolled back); exactly one engine resident; no orphan"
    d = daemon_factory(standin_engine_toml("a", free_port(), exclusive=True, default=True)
                       + standin_engine_toml("b", free_port(), "--load-s", "4", exclusive=True)).start()
    d.wait_state("a", "ready", 30)
    def ask_switch() -> None:
        try:
            d.post("/v1/switch", {"name": "b"}, timeout=120)
        except Exception:  # the daemon is killed while this waits: expected
            pass

    switch = threading.Thread(target=ask_switch, daemon=True)
    switch.start()
    wait_for(lambda: (s := d.status())["swap"] is not None and any(
        e["name"] == "b" and e["state"] == "starting" and e["pid"] for e in s["engines"]), 30,
        "the swap to be loading b")
    b_pid = d.engine("b")["pid"]
    d.kill()
    switch.join(5)
    d.start()
    wait_for(lambda: kinds(d, "swap.resumed"), 20, "swap.resumed")
    wait_for(lambda: kinds(d, "swap.finished") or kinds(d, "swap.rolled_back"), 60, "the swap to end")
    d.wait_state("b" if kinds(d, "swap.finished") else "a", "ready", 30)
    status = d.status()
    resident = [e["name"] for e in status["engines"] if e["pid"]]
    assert len(resident) == 1, status["engines"]
    assert status["swap"] is None
    tagged = pids_with_tag_prefix(daemon_id(d) + "/")
    assert len(tagged) == 1, f"expected one engine process, found {tagged}"
    how = "finished" if kinds(d, "swap.finished") else "rolled back"
    outcome.observed = (f"swap {how} by the restarted daemon; resident: {resident} (b pid {b_pid} "
                        f"{'adopted' if d.engine('b')['pid'] == b_pid else 'replaced'}); one tagged process")
    outcome.lost = "nothing (the pending swap was in state.json)"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape"])
def test_damaged_state_file_never_stops_the_daemon(daemon_factory, outcome, damage: str) -> None:
    """state.json truncated, garbage or of the wrong shape while the daemon is down: it starts, says so,
    and adopts the running engine (same pid, no restart)."""
    outcome.scenario = f"state file {damage}"
    outcome.expected = "daemon starts; state.corrupt event; file kept aside; the engine adopted: same pid, no restart"
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    first = d.wait_state("e", "ready", 30)
    d.kill()
    path = d.state_dir / "state.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(512))
    else:
        path.write_text('{"engines": [], "swap": "x"}')
    d.start()
    engine = d.wait_state("e", "ready", 30)
    corrupt = kinds(d, "state.corrupt")
    assert corrupt and list(d.state_dir.glob("state.json.corrupt-*"))
    assert wait_for(lambda: len(pids_with_tag_prefix(daemon_id(d) + "/")) == 1, 15, "one engine process")
    restarted = engine["pid"] != first["pid"]
    outcome.observed = (f"state.corrupt: {corrupt[-1]['problem'][:90]}…; engine ready, "
                        f"{'pid changed: restarted' if restarted else 'same pid, adopted by its tag'}")
    outcome.lost = "backoff history (the failure streak)"
    assert not restarted, "the running engine was restarted instead of adopted"
    assert not [e for e in kinds(d, "engine.spawned") if e["pid"] != first["pid"]]


@pytest.mark.chaos_full
def test_damaged_state_file_with_a_grandchild_and_two_exclusive_engines(daemon_factory, outcome) -> None:
    """Garbage state.json, an engine with a grandchild in its own session, a second exclusive engine:
    the resident engine is adopted (same pid), its grandchild is left alone, the other stays stopped."""
    outcome.scenario = "state file garbage; engine with a grandchild; two exclusive engines"
    outcome.expected = ("the resident exclusive engine adopted (same pid), its grandchild untouched, "
                        "the other exclusive engine not started; never two resident")
    cfg = (standin_engine_toml("a", free_port(), "--grandchild", exclusive=True, default=True)
           + standin_engine_toml("b", free_port(), exclusive=True))
    d = daemon_factory(cfg).start()
    first = d.wait_state("a", "ready", 30)
    tagged_before = set(wait_for(lambda: (p := pids_with_tag_prefix(daemon_id(d) + "/a/")) and len(p) >= 2 and p,
                                 15, "the engine and its grandchild"))
    d.kill()
    (d.state_dir / "state.json").write_bytes(os.urandom(700))
    d.start()
    engine = d.wait_state("a", "ready", 30)
    time.sleep(2)  # give a wrong start of b (or a kill of a's grandchild) time to show
    assert engine["pid"] == first["pid"], "the resident engine was restarted instead of adopted"
    assert d.engine("b")["state"] == "stopped" and d.engine("b")["pid"] is None
    assert set(pids_with_tag_prefix(daemon_id(d) + "/")) == tagged_before, "a process of the engine was killed"
    assert kinds(d, "state.corrupt")
    outcome.observed = (f"a adopted (pid {engine['pid']}), {len(tagged_before)} tagged processes kept, "
                        "b stopped; state.corrupt recorded")
    outcome.lost = "backoff history (the failure streak)"


@pytest.mark.chaos_full
def test_sigkill_then_automatic_restart_respects_the_60_s_floor(daemon_factory, outcome) -> None:
    """After a crash the automatic restart comes by itself, no sooner than 60 s after the previous spawn."""
    outcome.scenario = "SIGKILL, automatic restart (real 60 s floor)"
    outcome.expected = "ready again by itself, ≥ 60 s after the previous spawn"
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    spawned_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    d.wait_state("e", "backoff", 10)
    engine = wait_for(lambda: (e := d.engine("e"))["state"] == "ready" and e["pid"] != pid and e, 120,
                      "the automatic restart")
    gap = time.monotonic() - spawned_at
    assert gap >= 59.5
    assert len(pids_with_tag_prefix(daemon_id(d) + "/")) == 1
    outcome.observed = f"ready again {gap:.0f} s after the previous spawn (pid {engine['pid']}); one process"
    outcome.lost = "nothing"

