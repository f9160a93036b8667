"""Resending a request to an engine that did not answer it: how often, and when never."""

from __future__ import annotations

import httpx
import pytest

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


async def _send(engine: Engine, retries: list[bool]) -> httpx.Response:
    async def serving(timeout_s: float) -> bool:
        return True

    clock = iter(range(1_000_000))
    return await retry.send_until_answered(engine.send, wait_serving=serving, hold_s=1e6,
                                           now=lambda: float(next(clock)), on_retry=lambda exc, held: retries.append(held))


async def test_a_refused_request_is_held_and_resent_until_the_engine_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused connections never reached the engine: held and resent as often as the hold allows."""
    monkeypatch.setattr(retry, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(retry, "QUICK_RETRY_DELAYS_S", (0.0,))
    engine = Engine([httpx.ConnectError("refused") for _ in range(6)])
    retries: list[bool] = []
    assert (await _send(engine, retries)).status_code == 200
    assert engine.sends == 7 and retries == [False] + [True] * 5


async def test_a_request_the_engine_died_on_is_resent_once_not_replayed_into_every_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset after the request was written (it may be what killed the engine) gets one held resend, not more."""
    monkeypatch.setattr(retry, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(retry, "QUICK_RETRY_DELAYS_S", (0.0,))
    engine = Engine([httpx.ReadError("reset") for _ in range(5)])
    retries: list[bool] = []
    with pytest.raises(httpx.ReadError):
        await _send(engine, retries)
    assert engine.sends == 3 and retries == [False, True]  # one quick retry, one held resend, then the error


async def test_an_answer_with_any_status_is_never_sent_again() -> None:
    """Once a response head came back the request is not resent, whatever its status."""
    engine = Engine([])
    assert (await _send(engine, [])).status_code == 200 and engine.sends == 1


async def test_a_request_the_engine_died_on_counts_as_delivered_even_when_refused_quick_retries_came_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine died with the request (reset), so the quick retries right after found nothing listening
    (refused): the held resend to the restarted engine is still its one resend after a delivery. A second
    death with it ends the request, rather than replaying it into a third run."""
    monkeypatch.setattr(retry, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(retry, "QUICK_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    died, refused = httpx.ReadError("reset"), httpx.ConnectError("refused")
    engine = Engine([died, refused, refused, refused, died, refused, refused, died])
    with pytest.raises(httpx.ReadError):
        await _send(engine, [])
    assert engine.sends == 5  # two runs of the engine got it: the first and the restarted one


async def test_refusals_after_the_one_resend_do_not_count_as_deliveries(monkeypatch: pytest.MonkeyPatch) -> None:
    """After its resend, a request refused while the engine comes up again is held as any refused one."""
    monkeypatch.setattr(retry, "HELD_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(retry, "QUICK_RETRY_DELAYS_S", (0.0,))
    died, refused = httpx.ReadError("reset"), httpx.ConnectError("refused")
    engine = Engine([died, refused, refused, refused])
    assert (await _send(engine, [])).status_code == 200
    assert engine.sends == 5
