"""Sending a request to an engine again when it provably did not answer it.

A request is sent again only when the engine gave no response head: the connection was refused
(the engine is restarting and nothing listens), or it was reset or closed before the status line
came back (the engine died while it had the request, or closed a pooled keep-alive connection).
httpx raises these before it returns a response, so once ``send`` has returned a response (any
status, any byte of head) the request is never sent again: an engine that answered is never asked
twice, and nothing the client may have seen is generated a second time.

Two kinds of retry: a few quick ones, for a refused connection (the engine's listener is briefly gone)
and for a connection opened earlier (pooled, or a spare) that the engine closed just as the request went
out; then, while the engine is down, the request is held until the daemon says the engine serves again
(``wait_serving``, the gateway's own hold) and sent to the restarted engine, all within ``hold_s`` of the
first failure.

A request that may have reached the engine (reset or closed after it was written on a fresh connection,
not refused) is another matter: the engine had it. It is sent again only to a restarted engine, once
(``went_down``: the daemon saw the engine go down after it), never into the run that dropped it: a prompt
that itself kills the engine (an out-of-memory abort on a huge context) must not be replayed into every
fresh run, and one that makes a live engine's request handler fail (a Python exception in mlx_lm.server
closes the connection without an answer) must not cost its prefill again and again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import httpx

R = TypeVar("R")

# No response head came back: the engine did not answer this request.
UNANSWERED = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
QUICK_RETRY_DELAYS_S = (0.05, 0.2, 0.5)
# Between two sends while the engine is down: its supervisor may not have noticed the exit yet and
# still call it serving, and a refused connect costs nothing to repeat.
HELD_RETRY_DELAY_S = 0.5
# Held resends of a request the engine may have been working on when it died (see the module's text).
MAX_HELD_RESENDS_AFTER_DELIVERY = 1
# How long to wait for the daemon to say that an engine which dropped a request went down (its exit is seen
# at once; its state reaches the gateway with the next snapshot): no word by then, and it runs on.
WENT_DOWN_WAIT_S = 3.0


def delivered(exc: BaseException) -> bool:
    """The failed send may have reached the engine: written on a fresh connection, then reset or closed
    before any answer (not refused, and not a connection opened earlier that the engine had just closed)."""
    return not isinstance(exc, httpx.ConnectError) and not getattr(exc, "reused_connection", False)


async def send_until_answered(
    send_once: Callable[[], Awaitable[R]],
    *,
    wait_serving: Callable[[float], Awaitable[bool]],
    went_down: Callable[[float], Awaitable[bool]],
    hold_s: float,
    now: Callable[[], float],
    on_retry: Callable[[Exception, bool], None],
) -> R:
    """``send_once()`` until the engine answers with a response head.

    ``wait_serving(timeout_s)`` waits until the engine serves again and says whether it does (False:
    it will not within the time, or it is stopped, failed or in backoff: the last error is raised).
    ``went_down(timeout_s)`` waits (briefly) to learn whether the engine went down since the request reached
    it (False: it runs on, and dropped the request itself: the error is raised).
    ``on_retry(error, held)`` is told of every resend (``held``: it waited for the engine).
    """
    quick = list(QUICK_RETRY_DELAYS_S)
    deadline_s: float | None = None
    held_after_delivery = 0
    # A send failed after it reached the engine, since the last hold. Sticky across the quick retries, which
    # find nothing listening once the engine has died.
    reached = False
    while True:
        try:
            return await send_once()
        except UNANSWERED as exc:
            if delivered(exc):
                reached = True
            elif quick:
                on_retry(exc, False)
                await anyio.sleep(quick.pop(0))
                continue
            if deadline_s is None:
                deadline_s = now() + hold_s
            left_s = deadline_s - now()
            if left_s <= 0:
                raise
            if reached:  # the engine had it: only a restarted engine gets it again, and only once
                reached = False
                held_after_delivery += 1
                if held_after_delivery > MAX_HELD_RESENDS_AFTER_DELIVERY:
                    raise
                if not await went_down(min(WENT_DOWN_WAIT_S, left_s)):
                    raise
            await anyio.sleep(min(HELD_RETRY_DELAY_S, max(0.0, deadline_s - now())))
            if not await wait_serving(max(0.0, deadline_s - now())):
                raise
            on_retry(exc, True)
