"""Non-streamed answers fetched as streams (policies.frontdoor.fetch_as_stream, gateway/reassemble.py): the
client gets the answer the engine itself gives, on the real engines.

The real mlx_lm.server and the real llama-server (built from source) answer the same greedy request twice:
straight, non-streamed, and through the gateway, which asks the engine for a stream and rebuilds the answer.
The text, the finish reason and the token counts must be the engine's own. With ``watch_non_streamed =
false`` a request goes to the engine as the client sent it. tests/integration/test_watchdog_evidence.py shows
what it is for: an engine that goes silent in a non-streamed answer is `hung` within the stall limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import Daemon, free_port, mlx_engine_toml, standin_engine_toml
from tests.llama_cpp_engine import llama_engine_toml, require_llama_server

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits on the engines: run beside the rest

CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}]}
TEXT = {"prompt": "Once upon a time"}


def _same_answer(direct: dict, via: dict, chat: bool) -> None:
    d_choice, v_choice = direct["choices"][0], via["choices"][0]
    if chat:
        assert v_choice["message"]["role"] == "assistant"
        assert v_choice["message"]["content"] == d_choice["message"]["content"], (direct, via)
    else:
        assert v_choice["text"] == d_choice["text"], (direct, via)
    assert v_choice["finish_reason"] == d_choice["finish_reason"]
    assert v_choice.get("logprobs", "absent") == d_choice.get("logprobs", "absent"), (direct, via)
    assert via["object"] == direct["object"]
    for key in ("completion_tokens", "prompt_tokens", "total_tokens"):
        assert via["usage"][key] == direct["usage"][key], (direct["usage"], via["usage"])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_real_engines_answers_come_back_as_the_engine_gives_them(daemon_factory, tiny_model: Path,
                                                                     path: str) -> None:
    """Greedy, 24 tokens: the rebuilt answer through the gateway is the engine's own non-streamed one, for the
    real mlx_lm.server and the real llama-server, and the gateway metered its tokens as a stream's."""
    binary, model = require_llama_server()
    gw, mlx_port, llama_port, metrics = free_port(), free_port(), free_port(), free_port()
    cfg = f'[daemon]\nmetrics_listen = "127.0.0.1:{metrics}"\n'
    cfg += mlx_engine_toml("tiny", mlx_port, tiny_model, default=True, canary_interval="10m")
    cfg += llama_engine_toml("llama", llama_port, binary, model, canary_interval="10m")
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("tiny", "ready", 120)
    d.wait_state("llama", "ready", 120)
    chat = path == "/v1/chat/completions"
    extra = CHAT if chat else TEXT
    for name, port, served in (("tiny", mlx_port, "default_model"), ("llama", llama_port, "tiny-llama")):
        body = {"max_tokens": 24, "temperature": 0, **extra}
        direct = httpx.post(f"http://127.0.0.1:{port}{path}", json={**body, "model": served}, timeout=120)
        via = httpx.post(f"http://127.0.0.1:{gw}{path}", json={**body, "model": name}, timeout=120)
        assert direct.status_code == 200 and via.status_code == 200, (direct.text, via.text)
        assert via.headers["content-type"] == "application/json"
        _same_answer(direct.json(), via.json(), chat)
    # Metered as streams: each request's first token was seen as it came (a non-streamed answer has none). The
    # gateway's note of a request's end reaches the daemon a moment after the answer: the scrape waits for it.
    wanted = [f'supervisord_llm_gateway_time_to_first_token_seconds_count{{engine="{name}"}} 1.0'
              for name in ("tiny", "llama")]
    deadline = time.monotonic() + 10
    while True:
        scrape = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
        if all(line in scrape for line in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for line in wanted:
        assert line in scrape, scrape


def test_with_watch_non_streamed_off_a_request_goes_as_the_client_sent_it(daemon_factory) -> None:
    """The stand-in logs whether each request asked for a stream: on by default the gateway asks for one; with
    ``watch_non_streamed = false`` it does not, and the client gets the engine's own body either way."""
    for watch, streamed in ((True, "stream=True"), (False, "stream=False")):
        gw = free_port()
        cfg = standin_engine_toml("e", free_port(), default=True, canary_interval="10m")
        cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\nwatch_non_streamed = {str(watch).lower()}\n'
        d: Daemon = daemon_factory(cfg).start()
        d.wait_state("e", "ready", 60)
        answer = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60,
                            json={"model": "e", "max_tokens": 5, **CHAT})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "tok " * 5
        assert answer.json()["usage"]["completion_tokens"] == 5
        log = (d.state_dir / "logs" / "e.log").read_text().splitlines()
        client_requests = [line for line in log if line.startswith("request ")][1:]  # after the start check
        assert client_requests and client_requests[-1].endswith(streamed), (watch, client_requests)
        d.stop()


# In-process gateways against engines written here, for what the real engines do only when they fail.

async def _serve(handle) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    import asyncio

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader) -> dict:  # type: ignore[no-untyped-def]
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return json.loads(await reader.readexactly(length))


def _answer(writer, content_type: bytes, body: bytes) -> None:  # type: ignore[no-untyped-def]
    """One HTTP/1.1 answer with a Content-Length (the connection stays open for the next request)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                 % (content_type, len(body), body))


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    doc = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


BODY = {"model": "e", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


async def _through_gateway(handle, kind: str, requests: int = 1, settings=None):  # type: ignore[no-untyped-def]
    """Serve ``handle`` as engine ``e`` of ``kind`` behind an in-process gateway and post ``BODY`` through it
    ``requests`` times, one after the other; the answers and the gateway's backend (what it was told)."""
    from supervisord_llm.gateway.protocol import Upstream
    from tests.integration.test_gateway import Backend, running_gateway

    server, base_url = await _serve(handle)
    try:
        backend = Backend({"e": Upstream("e", base_url, kind, supports_messages=False)}, default="e")
        async with running_gateway(backend, settings) as url, httpx.AsyncClient(timeout=30) as client:
            answers = [await client.post(url + "/v1/chat/completions", json=BODY) for _ in range(requests)]
    finally:
        server.close()  # type: ignore[attr-defined]
    return answers, backend


@pytest.mark.anyio
async def test_an_answer_an_http_10_engine_broke_off_is_resent_and_judged_as_a_new_request() -> None:
    """mlx_lm.server's stream ends with its connection (HTTP/1.0), also when the engine died mid-answer: an
    answer without its end (no [DONE], no finish reason) is not given to the client as if whole; the request is
    sent again, and the resend's wait for its first token is judged as a prefill (5 s here), not as a pause
    between the failed attempt's tokens (1 s)."""
    import asyncio

    from supervisord_llm.gateway.settings import GatewaySettings

    seen: list[dict] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await _read_request(reader))
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
            if len(seen) == 1:  # dies two tokens in
                writer.write(_chunk("Good") + _chunk("bye"))
            else:  # the restarted engine: a slow prefill, then the whole answer
                await asyncio.sleep(1.5)
                writer.write(_chunk("Hel") + _chunk("lo") + _chunk(finish="stop") + b"data: [DONE]\n\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    (answer,), backend = await _through_gateway(handle, "mlx_lm",
                                                settings=GatewaySettings(decode_stall_s=1.0, prefill_stall_s=5.0))
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello", answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "stop"
    assert len(seen) == 2 and all(request["stream"] is True for request in seen)
    assert backend.finished[-1].ended == "complete" and not backend.stalls


@pytest.mark.anyio
async def test_an_engine_that_answers_a_stream_request_whole_is_not_asked_for_a_stream_again() -> None:
    """An OpenAI-compatible server that ignores "stream" sends its head only at the end, after the stall limits
    may have run out: once it has answered a stream request with a whole body, its requests go as sent."""
    import asyncio

    seen: list[dict] = []
    whole = json.dumps({"id": "w", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                seen.append(await _read_request(reader))
                _answer(writer, b"application/json", whole)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    answers, _ = await _through_gateway(handle, "command", requests=2)
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == ["whole", "whole"]
    assert [request.get("stream") for request in seen] == [True, None]


@pytest.mark.anyio
async def test_an_engine_whose_streams_carry_no_usage_gets_its_requests_as_sent_after_the_first() -> None:
    """An engine that ignores ``stream_options.include_usage`` (older OpenAI-compatible servers) gives usage only in
    its non-streamed answers: a client counting tokens must not lose it for every request. The first rebuilt answer
    shows the engine streams none; its later requests go as the client sent them, usage and all."""
    import asyncio

    seen: list[dict] = []
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    whole = json.dumps({"id": "w", "object": "chat.completion", "usage": usage, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                seen.append(request)
                if request.get("stream"):  # no usage chunk, whatever stream_options says
                    _answer(writer, b"text/event-stream",
                            _chunk("Hel") + _chunk("lo") + _chunk(finish="stop") + b"data: [DONE]\n\n")
                else:
                    _answer(writer, b"application/json", whole)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    answers, _ = await _through_gateway(handle, "command", requests=3)
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == ["Hello"] * 3
    assert [request.get("stream") for request in seen] == [True, None, None]
    assert [a.json().get("usage") for a in answers[1:]] == [usage, usage]
