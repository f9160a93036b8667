"""The gateway's resend loop: it sends a request until the engine answers with a response head, asking
``policies.resend.after_failure`` after every send that got none (the rule, and why, are that module's).
This module tells the failures apart from httpx's errors and does the waiting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import httpx

from policies.resend import Failure, Resend, ResendState, after_failure, failure_of_send

R = TypeVar("R")

# No response head came back: the engine did not answer this request.
UNANSWERED = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def failure_of(exc: BaseException) -> Failure:
    """Which failure a send's error was (``policies.resend.failure_of_send``): refused (a connect error), written
    on a connection opened earlier (``reused_connection``, with ``failed_after_s`` from the write, set by
    gateway/upstream.py), or delivered."""
    failed_after_s = getattr(exc, "failed_after_s", None)
    return failure_of_send(refused=isinstance(exc, httpx.ConnectError),
                           reused=bool(getattr(exc, "reused_connection", False)),
                           failed_after_s=failed_after_s if isinstance(failed_after_s, float) else None)


async def send_until_answered(
    send_once: Callable[[], Awaitable[R]],
    *,
    wait_serving: Callable[[float], Awaitable[bool]],
    went_down: Callable[[float], Awaitable[bool]],
    hold_s: float,
    now: Callable[[], float],
    on_retry: Callable[[Exception, bool], None],
    shown_down: Callable[[], bool] = lambda: False,
) -> R:
    """``send_once()`` until the engine answers with a response head.

    ``wait_serving(timeout_s)`` waits until the engine serves again and says whether it does (False:
    it will not within the time, or it is stopped, failed or in backoff: the last error is raised).
    ``went_down(timeout_s)`` waits (briefly) to learn whether the engine went down since the request reached
    it (False: it runs on, and dropped the request itself: the error is raised).
    ``on_retry(error, held)`` is told of every resend (``held``: it waited for the engine).
    ``shown_down()``: the daemon shows the engine not serving now (no quick retries then).
    """
    state = ResendState()
    while True:
        try:
            return await send_once()
        except UNANSWERED as exc:
            step = after_failure(state, failure_of(exc), now_s=now(), hold_s=hold_s, shown_down=shown_down())
            state = step.state
            if step.action is Resend.GIVE_UP:
                raise
            if step.action is Resend.QUICK:
                on_retry(exc, False)
                await anyio.sleep(step.delay_s)
                continue
            if step.ask_went_down_s is not None and not await went_down(step.ask_went_down_s):
                raise
            deadline_s = state.deadline_s if state.deadline_s is not None else now()
            await anyio.sleep(min(step.delay_s, max(0.0, deadline_s - now())))
            if not await wait_serving(max(0.0, deadline_s - now())):
                raise
            on_retry(exc, True)


__all__ = ["UNANSWERED", "failure_of", "send_until_answered"]
