"""Resending a request to an engine that did not answer it: how often, and when never."""

from __future__ import annotations

import httpx
import pytest

from policies import resend
from supervisord_llm.gateway import retry

pytestmark = pytest.mark.anyio


class Engine:
    """Fails each send with the next error in ``errors``, then answers 200."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.sends = 0

    async def send(self) -> httpx.Response:
        self.sends += 1
        if self.errors:
            raise self.errors.pop(0)
        return httpx.Response(200)


async def _send(engine: Engine, retries: list[bool], *, goes_down: bool = True) -> httpx.Response:
    """``goes_down``: whether the daemon shows the engine down after a request reached it and was dropped."""
    async def serving(timeout_s: float) -> bool:
        return True

    async def went_down(timeout_s: float) -> bool:
        return goes_down

    clock = iter(range(1_000_000))
    return await retry.send_until_answered(engine.send, wait_serving=serving, went_down=went_down, hold_s=1e6,
                                           now=lambda: float(next(clock)), on_retry=lambda exc, held: retries.append(held))


def _reused(exc: Exception) -> Exception:
    exc.reused_connection = True  # type: ignore[attr-defined]  # as gateway/upstream.py marks it
    return exc


async def test_a_refused_request_is_held_and_resent_until_the_engine_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused connections never reached the engine: held and resent as often as the hold allows."""
    monkeypatch.setattr(resend, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(resend, "QUICK_RETRY_DELAYS_S", (0.0,))
    engine = Engine([httpx.ConnectError("refused") for _ in range(6)])
    retries: list[bool] = []
    assert (await _send(engine, retries)).status_code == 200
    assert engine.sends == 7 and retries == [False] + [True] * 5


async def test_a_request_the_engine_died_on_is_resent_once_not_replayed_into_every_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset after the request was written (it may be what killed the engine) gets one held resend, not more."""
    monkeypatch.setattr(resend, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(resend, "QUICK_RETRY_DELAYS_S", (0.0,))
    engine = Engine([httpx.ReadError("reset") for _ in range(5)])
    retries: list[bool] = []
    with pytest.raises(httpx.ReadError):
        await _send(engine, retries)
    assert engine.sends == 2 and retries == [True]  # no quick retry into the engine that had it; one held resend


async def test_an_answer_with_any_status_is_never_sent_again() -> None:
    """Once a response head came back the request is not resent, whatever its status."""
    engine = Engine([])
    assert (await _send(engine, [])).status_code == 200 and engine.sends == 1


async def test_a_request_the_engine_died_on_is_resent_once_also_when_refusals_came_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine died with the request (reset): its resend to the restarted engine is the request's one resend
    after a delivery, also when refusals (the engine still coming up) came between. A second death with it ends
    the request, rather than replaying it into a third run."""
    monkeypatch.setattr(resend, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(resend, "QUICK_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    died, refused = httpx.ReadError("reset"), httpx.ConnectError("refused")
    engine = Engine([died, refused, refused, refused, died, refused, refused, died])
    with pytest.raises(httpx.ReadError):
        await _send(engine, [])
    assert engine.sends == 5  # two runs of the engine got it: the first and the restarted one


async def test_refusals_after_the_one_resend_do_not_count_as_deliveries(monkeypatch: pytest.MonkeyPatch) -> None:
    """After its resend, a request refused while the engine comes up again is held as any refused one."""
    monkeypatch.setattr(resend, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(resend, "QUICK_RETRY_DELAYS_S", (0.0,))
    died, refused = httpx.ReadError("reset"), httpx.ConnectError("refused")
    engine = Engine([died, refused, refused, refused])
    assert (await _send(engine, [])).status_code == 200
    assert engine.sends == 5


async def test_a_request_a_live_engine_dropped_is_not_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine closed the connection without answering and runs on (a request handler that failed on this
    request): it is not sent again, neither at once nor after a hold (each send would cost its prefill again)."""
    monkeypatch.setattr(resend, "HELD_RETRY_DELAY_S", 0.0)
    engine = Engine([httpx.RemoteProtocolError("closed without a response") for _ in range(5)])
    retries: list[bool] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await _send(engine, retries, goes_down=False)
    assert engine.sends == 1 and retries == []


async def test_a_pooled_connection_the_engine_had_just_closed_is_retried_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that went out on a kept-alive connection the engine closed just then never reached it: it is
    sent again at once on another connection, with no hold and no question whether the engine went down."""
    monkeypatch.setattr(resend, "QUICK_RETRY_DELAYS_S", (0.0, 0.0))
    engine = Engine([_reused(httpx.RemoteProtocolError("closed")), _reused(httpx.ReadError("reset"))])
    retries: list[bool] = []
    assert (await _send(engine, retries, goes_down=False)).status_code == 200
    assert engine.sends == 3 and retries == [False, False]
