"""The memory budget on the real daemon with real engine processes (invariant 1, non-exclusive path).

Two non-exclusive engines whose footprints together exceed the budget never run together: a start
of the second waits for memory (bounded by ``admission_wait``), then is refused naming the numbers
(the engine stays ``stopped``, so a later start asks again);
``llmctl switch`` plans the swap (``policies.swap.plan_swap``): the first engine is stopped for the
budget before the second starts.
"""

from __future__ import annotations

import time

from tests.helpers import free_port, standin_engine_toml

BUDGET = '[policies.memory]\nbudget = "1GB"\nheadroom = "10MB"\nadmission_wait = "3s"\n\n'


def _events(d, kind: str, engine: str) -> list[dict]:
    return [e for e in d.events() if e["kind"] == kind and e.get("engine") == engine]


def test_two_engines_over_the_budget_never_run_together(daemon_factory) -> None:
    """b (0.6 GB) next to a (0.6 GB) in a 1 GB budget waits, is refused naming the numbers (stopped, not failed), and never spawns; a switch stops a first."""
    cfg = BUDGET + standin_engine_toml("a", free_port(), footprint="600MB")
    cfg += standin_engine_toml("b", free_port(), footprint="600MB", autostart=False)
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 30)

    started_s = time.monotonic()
    assert d.post("/v1/engines/b/start").status_code == 200
    d.wait_events(lambda e: e["kind"] == "engine.start_refused" and e["engine"] == "b", 30)
    b = d.wait_state("b", "stopped", 30)
    waited_s = time.monotonic() - started_s
    assert "b needs 0.6 GB; with 0.6 GB resident (a (0.6 GB)) that is 1.2 GB, over the memory budget of 1.0 GB" \
        in b["state_reason"], b
    [waiting] = _events(d, "engine.admission_waiting", "b")
    assert waiting["reason"] == "budget" and waited_s >= 2.5  # it waited for memory before refusing
    refused = [e for e in _events(d, "policy.decided", "b") if e.get("policy") == "admission"]
    assert refused[-1]["decision"] == "refuse" and refused[-1]["reason"] == "budget"
    assert not _events(d, "engine.spawned", "b")
    assert d.engine("a")["state"] == "ready"

    assert d.post("/v1/switch", {"name": "b"}, timeout=120).status_code == 200
    d.wait_state("b", "ready", 60)
    assert d.engine("a")["state"] == "stopped"
    [plan] = [e for e in _events(d, "policy.decided", "b") if e.get("policy") == "swap_plan"]
    assert plan["stops"] == ["a"] and plan["budget_bytes"] == 10**9 and plan["resident"] == {"a": 600 * 10**6}
    kinds = [(e["kind"], e.get("engine")) for e in d.events()]
    # Stop first, then start: a's stop is complete before b is spawned.
    assert kinds.index(("engine.stopped", "a")) < kinds.index(("engine.spawned", "b"))
