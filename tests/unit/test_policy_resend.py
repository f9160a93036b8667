"""The resend rule (policies/resend.py), the function the gateway's resend loop (gateway/retry.py) asks after
every send that got no response head. Properties over any sequence of failures and any clock:

- a request the engine had (``DELIVERED``) is never sent again at once, only after the daemon was asked
  whether the engine went down, and at most once;
- quick retries are few and only for a refused or reused connection;
- nothing is sent again once ``hold_s`` has passed since the first failure that was not retried at once.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.resend import (
    MAX_HELD_RESENDS_AFTER_DELIVERY,
    QUICK_RETRY_DELAYS_S,
    REUSED_FAILS_WITHIN_S,
    Failure,
    Resend,
    ResendState,
    after_failure,
    failure_of_send,
)

failures = st.lists(st.tuples(st.sampled_from(list(Failure)), st.floats(0.0, 30.0), st.booleans()),
                    min_size=1, max_size=30)


@given(failures, st.floats(0.0, 120.0))
def test_a_request_the_engine_had_is_resent_at_most_once_and_never_into_the_same_run(
        sends: list[tuple[Failure, float, bool]], hold_s: float) -> None:
    state, now_s = ResendState(), 0.0
    quick = resent_after_delivery = 0
    deadline_s = None
    for failure, elapsed_s, shown_down in sends:
        now_s += elapsed_s
        step = after_failure(state, failure, now_s=now_s, hold_s=hold_s, shown_down=shown_down)
        state = step.state
        if deadline_s is None and state.deadline_s is not None:
            deadline_s = state.deadline_s
            assert deadline_s == now_s + hold_s
        if step.action is Resend.GIVE_UP:
            return
        if failure is Failure.DELIVERED:
            assert step.action is Resend.HOLD and step.ask_went_down_s is not None and step.ask_went_down_s > 0
            resent_after_delivery += 1
            assert resent_after_delivery <= MAX_HELD_RESENDS_AFTER_DELIVERY
        if step.action is Resend.QUICK:
            quick += 1
            assert failure is not Failure.DELIVERED and quick <= len(QUICK_RETRY_DELAYS_S)
            assert not shown_down  # an engine the daemon shows down is waited for, not hammered
        else:
            assert deadline_s is not None and now_s < deadline_s
            assert 0 <= step.delay_s <= deadline_s - now_s


def test_refusals_get_quick_retries_then_are_held_until_hold_s_after_the_first_hold() -> None:
    state = ResendState()
    actions = []
    for now_s in (0.0, 0.1, 0.3, 0.8, 1.0, 50.0, 60.7, 60.8):
        step = after_failure(state, Failure.REFUSED, now_s=now_s, hold_s=60.0)
        state = step.state
        actions.append(step.action)
    assert actions == [Resend.QUICK] * 3 + [Resend.HOLD] * 4 + [Resend.GIVE_UP]


def test_a_request_the_engine_had_is_held_once_asking_first_whether_the_engine_went_down() -> None:
    step = after_failure(ResendState(), Failure.DELIVERED, now_s=0.0, hold_s=60.0)
    assert (step.action, step.ask_went_down_s) == (Resend.HOLD, 3.0)
    # Refused while the engine restarts: quick retries, then held, but the daemon is not asked again.
    for now_s in (1.0, 1.1, 1.2, 1.3):
        step = after_failure(step.state, Failure.REFUSED, now_s=now_s, hold_s=60.0)
        assert step.ask_went_down_s is None and step.action is not Resend.GIVE_UP
    # The restarted engine drops it too: no third delivery.
    assert after_failure(step.state, Failure.DELIVERED, now_s=2.0, hold_s=60.0).action is Resend.GIVE_UP


@pytest.mark.parametrize(("refused", "reused", "failed_after_s", "failure"), [
    (True, False, None, Failure.REFUSED),
    (False, True, 0.001, Failure.REUSED),  # closed by the engine as the request went out
    (False, True, None, Failure.REUSED),
    (False, True, REUSED_FAILS_WITHIN_S + 0.01, Failure.DELIVERED),  # the engine read it, worked, then dropped it
    (False, True, 30.0, Failure.DELIVERED),
    (False, False, 0.001, Failure.DELIVERED),
])
def test_a_failure_on_a_connection_opened_earlier_is_a_reuse_only_when_it_came_at_once(
        refused: bool, reused: bool, failed_after_s: float | None, failure: Failure) -> None:
    assert failure_of_send(refused=refused, reused=reused, failed_after_s=failed_after_s) is failure


def test_an_engine_the_daemon_already_shows_down_is_waited_for_at_once() -> None:
    """A queue of requests behind a crashed engine: each one's refused send goes straight to the wait (which
    answers at once with the daemon's backoff), instead of 0.75 s of quick retries and 0.5 s of pause each,
    one after another (12 queued requests got their 503 over 16 s)."""
    step = after_failure(ResendState(), Failure.REFUSED, now_s=0.0, hold_s=60.0, shown_down=True)
    assert (step.action, step.delay_s, step.ask_went_down_s) == (Resend.HOLD, 0.0, None)
    assert after_failure(ResendState(), Failure.REFUSED, now_s=0.0, hold_s=60.0).action is Resend.QUICK
