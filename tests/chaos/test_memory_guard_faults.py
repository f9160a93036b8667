"""An engine that outgrows its footprint, end to end through the real 60 s restart floor.

The stand-in engine (``tests/standins/openai_engine.py --grow-mb``) allocates and touches memory on
every request and never frees it, as mlx_lm.server's prompt cache did before a cap.
"""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest

from tests.helpers import free_port, standin_engine_toml

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

MB = 10**6


def _alerts(d, prefix: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in d.events() if e["kind"] == "alert.raised" and e["key"].startswith(prefix)]


@pytest.mark.chaos_full
def test_engine_grows_past_its_footprint_and_comes_back_fresh_after_the_floor(daemon_factory, outcome) -> None:
    """Past memory_hard the engine is drained and restarted; after the 60 s floor it is ready again with a
    new pid and its memory back, the critical episode resolved, admission still counting the peak it reached."""
    outcome.scenario = "engine grows past its footprint (40 MB per request, hard watermark 120 MB)"
    outcome.expected = ("critical alert naming the sizes; graceful stop; restart only after the 60 s floor; the new "
                        "run back under its soft watermark; episode resolved when ready; the peak kept for admission")
    gw = free_port()
    cfg = standin_engine_toml("grow", free_port(), "--grow-mb", "40", footprint="60MB", memory_soft="100MB",
                              memory_hard="120MB", canary_interval="10m")
    cfg += '[probes]\ninterval = "0.3s"\nprocess_interval = "0.2s"\n'
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    # An alert target makes the daemon keep episodes (nothing listens there; deliveries just wait).
    cfg += f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:{free_port()}/x"\n'
    d = daemon_factory(cfg).start()
    first = d.wait_state("grow", "ready", 30)
    requests = 0
    while d.engine("grow")["state"] == "ready" and requests < 20:
        httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=30,
                   json={"model": "grow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        requests += 1
        time.sleep(0.5)
    d.wait_state("grow", "backoff", 30)
    again = d.wait_state("grow", "ready", 90)
    mem = again["memory"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (mem.get("held_bytes") is None
                                           or not any(a["resolved"] for a in _alerts(d, "engine.memory_exceeded:grow"))):
        time.sleep(0.2)
        mem = d.engine("grow")["memory"]
    exceeded = _alerts(d, "engine.memory_exceeded:grow")
    spawns = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp() for e in d.events()
              if e["kind"] == "engine.spawned" and e["engine"] == "grow"]
    stopped = [e for e in d.events() if e["kind"] == "engine.stopped" and e["engine"] == "grow"]
    outcome.observed = (f"recycled after {requests} requests at {exceeded[0]['details']['held_bytes'] / MB:.0f} MB "
                        f"(graceful stop: {stopped[0]['graceful']}); spawns {spawns[1] - spawns[0]:.1f} s apart; "
                        f"new run holds {mem['held_bytes'] / MB:.0f} MB ({mem['guard']}); learned peak "
                        f"{mem['learned_peak_bytes'] / MB:.0f} MB; episode resolved: "
                        f"{[a['resolved'] for a in exceeded] == [False, True]}")
    outcome.lost = "the engine's cache (by design); no request was cut (none in flight)"
    assert again["pid"] != first["pid"] and stopped[0]["graceful"] is True
    assert mem["held_bytes"] < 100 * MB and mem["guard"] == "ok", mem
    assert mem["learned_peak_bytes"] >= 120 * MB and d.engine("grow")["footprint_bytes"] >= 120 * MB
    assert [a["resolved"] for a in exceeded] == [False, True]
    assert exceeded[0]["severity"] == "critical" and exceeded[0]["details"]["hard_bytes"] == 120 * MB
    assert len(spawns) == 2 and spawns[1] - spawns[0] >= 60 - 0.5
