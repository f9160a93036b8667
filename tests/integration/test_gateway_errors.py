"""Bad requests at the gateway get a clear error in the client's own API shape (OpenAI on OpenAI
paths, Anthropic on /v1/messages), and the gateway keeps serving: JSON nested deeper than the
parser can follow, and a client that disconnects while its body is still being read."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from supervisord_llm.clock import SystemClock
from supervisord_llm.gateway.proxy import GatewaySettings, Upstream, build_app
from tests.integration.test_gateway import Backend, running_gateway


def _backend() -> Backend:
    return Backend({"tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None)}, "tiny")


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.anyio
async def test_deeply_nested_json_is_a_400_in_each_api_shape_and_the_gateway_keeps_serving() -> None:
    """100 000 nested brackets: 400 invalid_json (OpenAI and Anthropic shapes), then /v1/models still answers."""
    backend = _backend()
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"content-type": "application/json"}
            chat = await http.post(url + "/v1/chat/completions", content=_nested(100_000), headers=headers)
            messages = await http.post(url + "/v1/messages", content=_nested(100_000), headers=headers)
            models = await http.get(url + "/v1/models")
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["code"] == "invalid_json" and chat.json()["error"]["type"] == "invalid_request_error"
    assert "nested" in chat.json()["error"]["message"]
    assert messages.status_code == 400, messages.text
    assert messages.json()["type"] == "error" and messages.json()["error"]["type"] == "invalid_request_error"
    assert models.status_code == 200
    assert backend.started == []


class _Recorder:
    """A logger that keeps what the gateway logs (to see that no traceback is logged)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def bind(self, **kw: object) -> _Recorder:
        return self

    def __getattr__(self, level: str):
        return lambda event, *a, **k: self.calls.append((level, event))


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_client_disconnect_during_the_body_read_is_no_server_error(path: str) -> None:
    """A client gone half-way through sending its body: no 500, no traceback, nothing forwarded."""
    backend = _backend()
    log = _Recorder()
    app = build_app(backend, GatewaySettings(), SystemClock(), log=log)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 1000}]}).encode()
    incoming = [{"type": "http.request", "body": body[:100], "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    with anyio.fail_after(10):
        await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert not starts or starts[0]["status"] != 500
    assert not [c for c in log.calls if c[0] in ("exception", "error")]
    assert backend.started == []
    assert app.state.gateway.in_flight == 0
