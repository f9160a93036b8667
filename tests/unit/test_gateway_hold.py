"""A held streaming request whose routing fails after its head went out still gets an error event."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from supervisord_llm.gateway.hold import HeldStream

pytestmark = pytest.mark.anyio


async def test_a_routing_failure_after_the_early_head_ends_the_stream_with_an_error_event() -> None:
    """The client sees its 200 head, then one SSE error event in its API's shape; the failure still reaches the log."""

    async def route() -> Any:
        await anyio.sleep(0.3)  # held past the detection time: the early head goes out
        raise RuntimeError("a bug while routing")

    sent: list[dict[str, Any]] = []
    finished: list[Any] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    held = HeldStream(route, anthropic=False, keepalive_s=5.0, now=anyio.current_time, state=lambda: ("tiny", "starting"),
                      finish=finished.append,
                      error_body=lambda status, message, code: {"error": {"message": message, "code": code}})
    with pytest.raises(RuntimeError, match="a bug while routing"):
        await held({"type": "http"}, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert events and events[-1]["error"]["code"] == "internal_error", body
    assert finished
