"""A failed swap's alert episode ends, on the real daemon with a real webhook receiver.

A swap that fails (its target crashed while loading, or the memory of the engine it stopped did not
come back) opens ``swap.failed:<target>`` (and ``swap.memory_not_returned:<target>``). They used to
stay open for good: receivers showed them firing forever, and the outbox dropped the next failure of
the same swap as a duplicate of the open episode. They end like the target's other episodes: when the
target is ready (a later swap or start brought it up) or when a person stops it with ``llmctl stop``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, STANDINS, JsonWebhookReceiver, free_port, standin_engine_toml, tight_vm_stat_sample, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest



class Receiver(JsonWebhookReceiver):
    """The shared JSON webhook receiver, read by episode."""

    def of(self, key: str) -> list[dict]:
        """The deliveries of episode ``key`` (each alert once: delivery is at least once)."""
        unique = {b["alert_id"]: b for b in list(self.bodies) if b.get("key") == key}
        return list(unique.values())

    def wait(self, key: str, statuses: list[str], timeout_s: float = 30) -> list[dict]:
        def seen() -> list[dict] | None:
            got = self.of(key)
            return got if [b["status"] for b in got] == statuses else None

        try:
            return wait_for(seen, timeout_s, f"{key} delivered as {statuses}")
        except AssertionError:
            raise AssertionError(f"{key}: wanted {statuses}, got {[b['status'] for b in self.of(key)]}: "
                                 f"{self.of(key)}") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _hook(receiver: Receiver) -> str:
    return f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "{receiver.url}"\nformat = "json"\n'


def _loads_once_flag_exists(name: str, port: int, flag: Path) -> str:
    """An exclusive stand-in engine that crashes while loading (exit 1 with an error line) until ``flag`` exists."""
    script = (f"test -e {shlex.quote(str(flag))} || {{ echo 'Error: {name} cannot load its model'; exit 1; }}; "
              f"exec {shlex.quote(PYTHON)} {shlex.quote(str(STANDINS / 'openai_engine.py'))} --port {port}")
    return "\n".join(["[[engine]]", f'name = "{name}"', 'kind = "command"', f"port = {port}",
                      "command = " + json.dumps(["/bin/sh", "-c", script]), 'footprint = "100MB"',
                      'stop_grace = "5s"', 'start_timeout = "30s"', "exclusive = true"]) + "\n"


def test_a_failed_swap_resolves_when_a_later_swap_to_its_target_succeeds(daemon_factory, receiver, tmp_path) -> None:
    """swap.failed:b (b crashed while loading) resolves once `llmctl switch b` makes b ready; b failing again
    later opens a new episode that reaches the receiver instead of being dropped as a duplicate."""
    flag = tmp_path / "b-loads"
    cfg = standin_engine_toml("a", free_port(), exclusive=True, default=True)
    cfg += _loads_once_flag_exists("b", free_port(), flag)
    d = daemon_factory(cfg + _hook(receiver)).start()
    d.wait_state("a", "ready", 30)

    failed = d.llmctl("switch", "b", timeout=120)
    assert failed.returncode == 1 and "did not become ready" in failed.stderr, failed
    d.wait_state("a", "ready", 30)  # rolled back
    [firing] = receiver.wait("swap.failed:b", ["firing"])
    assert firing["severity"] == "critical" and firing["engine"] == "b", firing
    # b's crash opened its exit episode announcing a next start; the rollback stopped b, so it closes saying so.
    exited = receiver.wait("engine.exited:b", ["firing", "resolved"])
    assert "no restart is scheduled" in exited[1]["message"], exited

    flag.touch()
    switched = d.llmctl("switch", "b", timeout=120)
    assert switched.returncode == 0, switched
    d.wait_state("b", "ready", 30)
    first = receiver.wait("swap.failed:b", ["firing", "resolved"])
    assert first[1]["episode_id"] == firing["episode_id"], first
    resolves = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "episodes"
                and "swap.failed:b" in e.get("decision", "")]
    assert resolves and resolves[-1]["trigger"] == "ready", resolves

    # b breaks again: the same swap failing later is a new episode, delivered.
    flag.unlink()
    assert d.llmctl("switch", "a", timeout=120).returncode == 0
    again = d.llmctl("switch", "b", timeout=120)
    assert again.returncode == 1, again
    episodes = receiver.wait("swap.failed:b", ["firing", "resolved", "firing"])
    assert episodes[2]["episode_id"] != firing["episode_id"], episodes


def test_a_swap_whose_memory_did_not_come_back_resolves_when_a_person_stops_its_target(
        daemon_factory, receiver, tmp_path) -> None:
    """A swap to b aborted because memory did not come back (31 GB available, b needs 104 GB) opens
    swap.memory_not_returned:b and swap.failed:b; `llmctl stop b` resolves both."""
    seq = tmp_path / "sequence.txt"
    seq.write_text(f"{tight_vm_stat_sample(tmp_path)}\n")
    env = {"PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_VM_STAT_SEQUENCE_FILE": str(seq)}
    cfg = standin_engine_toml("a", free_port(), exclusive=True, default=True)
    cfg += standin_engine_toml("b", free_port(), exclusive=True, footprint="100GB")
    cfg += ('[probes]\nplatform = "darwin"\ninterval = "0.5s"\n'
            f'vm_stat = "{STANDINS / "vm_stat"}"\nsysctl = "{STANDINS / "sysctl"}"\n')
    cfg += '[policies.memory]\nreturn_wait = "1s"\nadmission_wait = "1s"\n'
    d = daemon_factory(cfg + _hook(receiver), env=env).start()
    d.wait_state("a", "ready", 30)

    failed = d.llmctl("switch", "b", timeout=120)
    assert failed.returncode == 1 and "memory did not come back" in failed.stderr, failed
    d.wait_state("a", "ready", 30)  # rolled back
    receiver.wait("swap.memory_not_returned:b", ["firing"])
    receiver.wait("swap.failed:b", ["firing"])
    assert d.engine("b")["state"] == "stopped"

    stopped = d.llmctl("stop", "b", timeout=60)
    assert stopped.returncode == 0, stopped
    for key in ("swap.memory_not_returned:b", "swap.failed:b"):
        opened, closed = receiver.wait(key, ["firing", "resolved"])
        assert closed["episode_id"] == opened["episode_id"], (opened, closed)
    time.sleep(0.5)  # nothing else about b is sent
    assert [b["status"] for b in receiver.of("swap.failed:b")] == ["firing", "resolved"]
