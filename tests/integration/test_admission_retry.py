"""A start that memory admission refuses leaves the engine `stopped`, not `failed`, on the real daemon.

Memory short right now is no crash loop: the engine stays stopped with the refusal's message (what it
needs, what is available) as its reason; `llmctl start` asks admission again at once, requests through the
gateway once the refusal's cooldown has passed, and a daemon restart starts a refused preload again. Memory is a scripted macOS ``vm_stat`` stand-in (tests/standins/vm_stat) whose
sample the test swaps: a machine with 31 GB available, then the idle 512 GB Studio (523 GB).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import STANDINS, free_port, standin_engine_toml, tight_vm_stat_sample, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest



def _chat(base: str, model: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def _refused_stopped(d, name: str) -> dict:
    """The engine once a refused start has left it stopped (its reason then names the numbers)."""
    seen: dict = {}

    def refused() -> dict | None:
        seen.update(d.engine(name))
        return dict(seen) if seen["state"] == "stopped" and "needs" in seen["state_reason"] else None

    try:
        return wait_for(refused, 30, f"{name} stopped after a refused start")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {seen.get('state')}: {seen.get('state_reason')}") from None


def _setup(daemon_factory, tmp_path: Path) -> tuple[object, Path, str, int]:
    """A daemon whose engine "big" (100 GB, preloaded) is refused for memory at its start; returns the daemon,
    the vm_stat sample sequence file (write "studio-512gb-idle" to it for memory to come back), the gateway's
    URL and the metrics port."""
    seq = tmp_path / "sequence.txt"
    seq.write_text(f"{tight_vm_stat_sample(tmp_path)}\n")
    env = {"PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_VM_STAT_SEQUENCE_FILE": str(seq)}
    gw, metrics = free_port(), free_port()
    cfg = f'[daemon]\nmetrics_listen = "127.0.0.1:{metrics}"\n'
    cfg += standin_engine_toml("big", free_port(), footprint="100GB")  # preload (autostart) is on
    cfg += ('[probes]\nplatform = "darwin"\ninterval = "0.5s"\n'
            f'vm_stat = "{STANDINS / "vm_stat"}"\nsysctl = "{STANDINS / "sysctl"}"\n')
    cfg += '[policies.memory]\nadmission_wait = "1s"\n'
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    cfg += f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:{free_port()}/x"\n'
    d = daemon_factory(cfg, env=env).start()
    return d, seq, f"http://127.0.0.1:{gw}", metrics


def _episode_resolved(d, key: str, timeout_s: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        raised = [e for e in d.events() if e["kind"] == "alert.raised" and e["key"] == key]
        if (raised and raised[-1]["resolved"]) or time.monotonic() > deadline:
            return raised
        time.sleep(0.1)


def test_refused_start_leaves_the_engine_stopped_and_a_later_request_starts_it(daemon_factory, tmp_path) -> None:
    """A preload refused for memory leaves `stopped` naming the numbers (status, llmctl, metrics, events, alert,
    /readyz). A request within the refusal's cooldown gets the refusal at once and starts nothing (a swap to it
    would stop what runs, for a start likely refused again); `llmctl start` asks admission again at once; once
    memory allows and the cooldown has passed, the next request starts it."""
    d, seq, base, metrics = _setup(daemon_factory, tmp_path)

    # The preload is refused: stopped (not failed), the reason naming what it needs and what is available.
    big = _refused_stopped(d, "big")
    assert "big needs 100.0 GB + 4.0 GB headroom = 104.0 GB, but only 31." in big["state_reason"], big
    assert big["pid"] is None and big["start_refused"]["reason"] == "memory", big
    assert big["start_refused"]["message"] in big["state_reason"]
    status = d.llmctl("status")
    assert "big: start refused (memory): big needs 100.0 GB + 4.0 GB headroom = 104.0 GB, but only 31." \
        in status.stdout, status.stdout
    scrape = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    assert 'supervisord_llm_engine_start_refused{engine="big",reason="memory"} 1.0' in scrape, scrape
    ready = httpx.get(f"http://127.0.0.1:{metrics}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["engines_not_ok"] == ["big"], ready.text

    # A request within the cooldown gets the refusal in its API's shape, at once, and starts nothing.
    refusals_before = len([e for e in d.events() if e["kind"] == "engine.start_refused"])
    asked = time.monotonic()
    refused = _chat(base, "big")
    assert time.monotonic() - asked < 10
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert "big needs 100.0 GB" in error["message"] and "available" in error["message"], error
    assert "llmctl start big" in error["message"] and "start it again in" in error["message"], error
    assert int(refused.headers["retry-after"]) >= 1
    assert len([e for e in d.events() if e["kind"] == "engine.start_refused"]) == refusals_before
    assert not [e for e in d.events() if e["kind"] == "swap.started"]

    # `llmctl start` asks admission again at once, and says why it stopped (exit 1, not a wait for ready).
    started = d.llmctl("start", "big", timeout=60)
    assert started.returncode == 1, started
    assert "big is stopped" in started.stderr and "104.0 GB" in started.stderr, started.stderr
    refusals = [e for e in d.events() if e["kind"] == "engine.start_refused" and e["engine"] == "big"]
    assert len(refusals) == refusals_before + 1 and refusals[-1]["reason"] == "memory", refusals
    to_stopped = [e for e in d.events() if e["kind"] == "engine.state_changed" and e["engine"] == "big"
                  and e["from"] == "starting"]
    assert [e["to"] for e in to_stopped] == ["stopped", "stopped"], to_stopped  # never failed
    assert not [e for e in d.events() if e["kind"] == "engine.state_changed" and e["to"] == "failed"]

    # Memory comes back: once the cooldown (a minute here) has passed, a request starts the engine and is answered.
    seq.write_text("studio-512gb-idle\n")
    answers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = _chat(base, "big")
        answers.append(answer.status_code)
        if answer.status_code == 200:
            break
        assert answer.status_code == 503 and "start it again in" in answer.json()["error"]["message"], answer.text
        time.sleep(min(5.0, float(answer.headers.get("retry-after", 5))))
    assert answers[-1] == 200, answers
    big = d.wait_state("big", "ready", 30)
    assert big["start_refused"] is None and big["pid"] is not None
    admitted = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "admission"
                and e.get("engine") == "big"]
    assert admitted[-1]["decision"] == "admit", admitted[-1]
    # The refusal's alert episode stayed open while the engine was refused and ends once it is ready.
    raised = _episode_resolved(d, "engine.start_refused:big")
    assert raised and not raised[0]["resolved"] and raised[0]["severity"] == "critical", raised
    assert raised[-1]["resolved"] is True, raised
    scrape = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    assert "supervisord_llm_engine_start_refused{" not in scrape
    assert httpx.get(f"http://127.0.0.1:{metrics}/readyz", timeout=10).status_code == 200


def test_a_daemon_restart_starts_a_refused_preload_again(daemon_factory, tmp_path) -> None:
    """Nobody stopped an engine whose preload was refused: the next daemon keeps showing the refusal until it
    starts the engine again as configured (asking admission again), and the refusal's episode ends once ready."""
    d, seq, _base, _metrics = _setup(daemon_factory, tmp_path)
    _refused_stopped(d, "big")
    d.stop()
    seq.write_text("studio-512gb-idle\n")
    d.start()
    big = d.wait_state("big", "ready", 60)
    assert big["start_refused"] is None and big["pid"] is not None
    raised = _episode_resolved(d, "engine.start_refused:big")
    assert raised and raised[-1]["resolved"] is True, raised


def test_a_refused_starts_cooldown_outlasts_a_daemon_restart(daemon_factory, tmp_path) -> None:
    """An engine a request started, refused for memory: the next daemon keeps the refusal's cooldown (a minute
    from the refusal), so a request right after the restart gets the refusal at once and starts nothing, where
    it made the new daemon try the start (a swap, in a config with an exclusive engine) again."""
    seq = tmp_path / "sequence.txt"
    seq.write_text(f"{tight_vm_stat_sample(tmp_path)}\n")
    env = {"PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_VM_STAT_SEQUENCE_FILE": str(seq)}
    gw = free_port()
    cfg = standin_engine_toml("big", free_port(), footprint="100GB", autostart=False)
    cfg += ('[probes]\nplatform = "darwin"\ninterval = "0.5s"\n'
            f'vm_stat = "{STANDINS / "vm_stat"}"\nsysctl = "{STANDINS / "sysctl"}"\n')
    cfg += '[policies.memory]\nadmission_wait = "1s"\n'
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    d = daemon_factory(cfg, env=env).start()
    base = f"http://127.0.0.1:{gw}"
    first = _chat(base, "big")
    assert first.status_code == 503 and "needs 100.0 GB" in first.json()["error"]["message"], first.text
    _refused_stopped(d, "big")

    def refusals() -> int:
        return len([e for e in d.events() if e["kind"] == "engine.start_refused" and e["engine"] == "big"])

    before = refusals()
    d.stop()
    d.start()
    assert d.engine("big")["start_refused"]["reason"] == "memory"
    again = _chat(base, "big")
    assert again.status_code == 503, again.text
    assert "start it again in" in again.json()["error"]["message"], again.text
    assert 1 <= int(again.headers["retry-after"]) <= 60
    time.sleep(2.0)  # a start it had tried would be refused within admission_wait (1 s)
    assert refusals() == before and d.engine("big")["state"] == "stopped"
