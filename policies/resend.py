"""Sending a request to an engine again when it provably did not answer it (pure): the rule the gateway's
resend loop (``supervisord_llm/gateway/retry.py``) asks after every send that got no response head.

A request is sent again only when the engine gave no response head: the connection was refused (the
engine is restarting and nothing listens), or it was reset or closed before the status line came back.
Once a response head came back (any status), the request is never sent again: an engine that answered is
never asked twice, and nothing the client may have seen is generated a second time.

Three kinds of failure, told apart by the runtime:

- ``REFUSED``: nothing listened. The engine never had the request.
- ``REUSED``: written on a connection opened earlier (pooled, or a spare) that the engine closed just as
  the request went out. The engine never read it. Its close was already on its way, so the failure comes
  at once (``failure_of_send``); one that came later came after the engine read the request.
- ``DELIVERED``: written on a fresh connection, or on one opened earlier that failed only later (the engine
  read the request and worked on it: a prefill, then a crash), then reset or closed before any answer. The
  engine had it.

The first two get a few quick retries (the engine's listener is briefly gone), then the request is held
until the engine serves again and sent to it, all within ``hold_s`` of the first failure. A delivered
request is another matter: it is sent again only to a restarted engine (the daemon saw the engine go down
after it), and only once, never into the run that dropped it: a prompt that itself kills the engine (an
out-of-memory abort on a huge context) must not be replayed into every fresh run, and one that makes a live
engine's request handler fail (a Python exception in mlx_lm.server closes the connection without an answer)
must not cost its prefill again and again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

QUICK_RETRY_DELAYS_S = (0.05, 0.2, 0.5)
# Between two sends while the engine is down: its supervisor may not have noticed the exit yet and still
# call it serving, and a refused connect costs nothing to repeat.
HELD_RETRY_DELAY_S = 0.5
# Held resends of a request the engine may have been working on when it died.
MAX_HELD_RESENDS_AFTER_DELIVERY = 1
# How long to wait for the daemon to say that an engine which dropped a request went down (its exit is seen
# at once; its state reaches the gateway with the next snapshot): no word by then, and it runs on.
WENT_DOWN_WAIT_S = 3.0


class Failure(StrEnum):
    REFUSED = "refused"
    REUSED = "reused"
    DELIVERED = "delivered"


# A connection opened earlier that the engine had already closed fails within a turn or two of the event loop
# after the request is written (its FIN or RST was on its way); a failure later than this came after the engine
# read the request. Generous for a loop busy with other requests (a large body's parse), and below a prefill
# worth sparing: a request the engine drops within it cost the engine little.
REUSED_FAILS_WITHIN_S = 1.0

# The daemon's engine states in which an engine answers requests.
SERVING_STATES = frozenset({"ready", "degraded"})


def shown_down(state: str | None) -> bool:
    """The daemon's last word on an engine is a state that serves nothing (``None``: it said nothing)."""
    return state is not None and state not in SERVING_STATES


def failure_of_send(*, refused: bool, reused: bool, failed_after_s: float | None) -> Failure:
    """Which failure a send that got no response head was: ``refused`` (the connect failed), ``reused`` (it went
    out on a connection opened earlier), ``failed_after_s`` (from the write to the failure; None: unknown)."""
    if refused:
        return Failure.REFUSED
    if reused and (failed_after_s is None or failed_after_s <= REUSED_FAILS_WITHIN_S):
        return Failure.REUSED
    return Failure.DELIVERED


class Resend(StrEnum):
    QUICK = "quick"  # send again after ``delay_s``
    HOLD = "hold"  # wait ``delay_s``, then until the engine serves again (until ``deadline_s``), and send
    GIVE_UP = "give_up"  # the client gets the error


@dataclass(frozen=True, slots=True)
class ResendState:
    """What one request's sends so far were; a new request starts from ``ResendState()``."""

    quick_used: int = 0
    deadline_s: float | None = None  # ``hold_s`` after the first failure that was not retried at once
    held_after_delivery: int = 0
    # A send failed after it reached the engine, since the last hold. Sticky across the quick retries, which
    # find nothing listening once the engine has died.
    reached: bool = False


@dataclass(frozen=True, slots=True)
class ResendStep:
    action: Resend
    state: ResendState
    delay_s: float = 0.0
    # Before a HOLD: ask the daemon, waiting up to this long, whether the engine went down since it had the
    # request; no (it runs on, and dropped the request itself) is a GIVE_UP. None: no need to ask.
    ask_went_down_s: float | None = None


def after_failure(state: ResendState, failure: Failure, *, now_s: float, hold_s: float,
                  shown_down: bool = False) -> ResendStep:
    """What to do after a send that got no response head. ``shown_down``: the daemon already shows the engine
    not serving (in backoff, restarting, stopped): quick retries are for an exit it has not noticed yet, so
    the request is held at once (a queue of requests behind a crashed engine then gets the daemon's answer
    at once, not one after another each after its quick retries)."""
    if failure is Failure.DELIVERED:
        state = replace(state, reached=True)
    elif shown_down:
        state = replace(state, quick_used=len(QUICK_RETRY_DELAYS_S))
    elif state.quick_used < len(QUICK_RETRY_DELAYS_S):
        return ResendStep(Resend.QUICK, replace(state, quick_used=state.quick_used + 1),
                          delay_s=QUICK_RETRY_DELAYS_S[state.quick_used])
    if state.deadline_s is None:
        state = replace(state, deadline_s=now_s + hold_s)
    assert state.deadline_s is not None
    left_s = state.deadline_s - now_s
    if left_s <= 0:
        return ResendStep(Resend.GIVE_UP, state)
    ask_s = None
    if state.reached:  # the engine had it: only a restarted engine gets it again, and only once
        state = replace(state, reached=False, held_after_delivery=state.held_after_delivery + 1)
        if state.held_after_delivery > MAX_HELD_RESENDS_AFTER_DELIVERY:
            return ResendStep(Resend.GIVE_UP, state)
        ask_s = min(WENT_DOWN_WAIT_S, left_s)
    # Shown down: the wait for it to serve again is the hold itself, without a pause first.
    delay_s = 0.0 if shown_down and ask_s is None else min(HELD_RETRY_DELAY_S, left_s)
    return ResendStep(Resend.HOLD, state, delay_s=delay_s, ask_went_down_s=ask_s)


__all__ = ["HELD_RETRY_DELAY_S", "MAX_HELD_RESENDS_AFTER_DELIVERY", "QUICK_RETRY_DELAYS_S", "REUSED_FAILS_WITHIN_S",
           "SERVING_STATES", "WENT_DOWN_WAIT_S", "Failure", "Resend", "ResendState", "ResendStep", "after_failure",
           "failure_of_send", "shown_down"]
