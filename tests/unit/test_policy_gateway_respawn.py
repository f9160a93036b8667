"""Starting a dead gateway process again (policies/gateway_respawn.py), as gateway/process.py calls it."""

from __future__ import annotations

from policies.gateway_respawn import (
    DOWN_AFTER_EXITS,
    RESPAWN_MAX_S,
    STABLE_S,
    GatewayRespawn,
    after_exit,
    after_stable_run,
)


def _exit(state: GatewayRespawn, ran_s: float) -> tuple[float, GatewayRespawn, object]:
    return after_exit(state, ran_s=ran_s, listen="127.0.0.1:8080", exit_text="exit code 1", reason="ImportError")


def test_quick_deaths_double_the_wait_and_the_third_in_a_row_raises_gateway_down_once() -> None:
    state, waits, alerts = GatewayRespawn(), [], []
    for _ in range(12):
        wait_s, state, alert = _exit(state, ran_s=1.0)
        waits.append(wait_s)
        alerts.append(alert)
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0] and max(waits) == RESPAWN_MAX_S
    raised = [(i + 1, a) for i, a in enumerate(alerts) if a is not None]
    assert [n for n, _ in raised] == [DOWN_AFTER_EXITS]  # once per episode
    alert = raised[0][1]
    assert alert.key == "gateway.down" and alert.severity == "critical" and "127.0.0.1:8080" in alert.summary
    state, resolved = after_stable_run(state, listen="127.0.0.1:8080")
    assert resolved is not None and resolved.resolved and state == GatewayRespawn()


def test_a_death_after_a_stable_run_starts_a_new_streak_and_one_death_is_no_alert() -> None:
    state = GatewayRespawn()
    for _ in range(DOWN_AFTER_EXITS - 1):
        _, state, alert = _exit(state, ran_s=1.0)
        assert alert is None
    wait_s, state, alert = _exit(state, ran_s=STABLE_S)  # it had held a minute: the streak starts over
    assert (wait_s, state.quick_exits, alert) == (0.5, 1, None)
    assert after_stable_run(GatewayRespawn(), listen="x")[1] is None  # nothing raised: nothing to resolve
