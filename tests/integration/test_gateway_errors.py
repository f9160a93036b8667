"""Bad requests at the gateway get a clear error in the client's own API shape (OpenAI on OpenAI
paths, Anthropic on /v1/messages), and the gateway keeps serving: JSON nested deeper than the
parser can follow, a client that disconnects while its body is still being read, a method a path does
not take; and an engine's own refusals reach the client in that shape too, as does an engine that closed
the connection without answering (told apart from one that could not be reached)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from supervisord_llm.clock import SystemClock
from supervisord_llm.gateway.proxy import GatewaySettings, Upstream, build_app
from tests.helpers import PYTHON, STANDINS, MlxServer, engine_process, free_port
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


@pytest.mark.anyio
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999", "-1E400"])
async def test_json_that_is_not_standard_is_a_400_and_never_reaches_the_engine(constant: str) -> None:
    """NaN and Infinity (Python's json writes them, no JSON parser of an engine need read them): a 400 naming
    the value and what is valid, in each API shape; nothing is started or forwarded."""
    backend = _backend()
    body = b'{"model": "tiny", "max_tokens": ' + constant.encode() + b', "messages": [{"role": "user", "content": "hi"}]}'
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"content-type": "application/json"}
            chat = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
            messages = await http.post(url + "/v1/messages", content=body, headers=headers)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_json", chat.text
    assert constant.lstrip("-") in chat.json()["error"]["message"] and "finite" in chat.json()["error"]["message"]
    assert messages.status_code == 400 and messages.json()["type"] == "error", messages.text
    assert backend.started == []


@pytest.mark.anyio
async def test_the_model_list_with_a_trailing_slash_is_the_list() -> None:
    """GET /v1/models/ is the list, not the default engine's model as if it were its id."""
    backend = Backend({"tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None),
                       "other": Upstream("other", "http://127.0.0.1:9", "mlx_lm", False, None)}, "tiny")
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            listed = await http.get(url + "/v1/models/")
    assert listed.status_code == 200 and listed.json()["object"] == "list", listed.text
    assert sorted(m["id"] for m in listed.json()["data"]) == ["other", "tiny"]


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


# ---------------------------------------------------------------------------------------------
# An engine's own error answers, in the client's API shape


@asynccontextmanager
async def answering_engine(answer: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An engine (asyncio.start_server) that reads each request whole and answers it with ``answer``, raw bytes,
    then closes; an empty ``answer``: it closes the connection without answering. Request heads go into the
    list it yields, as they arrive."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            received.append(head)
            if answer:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a connection closed without a request (the gateway's spare)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", received
    finally:
        server.close()


def _http_answer(status: int, body: bytes, content_type: str = "application/json", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}", f"content-length: {len(body)}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_CHAT = {"model": "a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
# How the request goes: streamed, non-streamed (fetched from the engine as a stream and rebuilt), and non-streamed
# sent as asked (an engine whose step counters are watched).
_HOW = [("stream", True, False), ("whole, fetched as a stream", False, False), ("whole, as sent", False, True)]


@pytest.mark.anyio
@pytest.mark.parametrize(("how", "stream", "steps_watched"), _HOW, ids=[h[0] for h in _HOW])
@pytest.mark.parametrize(("status", "answer", "said", "kind"), [
    (400, _http_answer(400, b'{"error": "max_tokens must be of type int"}'),  # mlx_lm.server
     "engine 'a' refused the request: max_tokens must be of type int", "invalid_request_error"),
    (400, _http_answer(400, b'{"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError",'
                            b' "code": 400}'),  # vLLM before 0.6
     "engine 'a' refused the request: max_tokens must be at least 1", "invalid_request_error"),
    (422, _http_answer(422, b'{"detail": "field required: messages"}'),
     "engine 'a' refused the request: field required: messages", "invalid_request_error"),
    (503, _http_answer(503, b"model is loading\n", "text/plain", retry_after="7"),
     "engine 'a' failed to answer the request: model is loading", "server_error"),
    (500, _http_answer(500, b'{"error": "boom"}'), "engine 'a' failed to answer the request: boom", "server_error"),
], ids=["error-string", "no-error-key", "detail", "text-503", "500"])
async def test_an_engines_error_body_reaches_an_openai_client_in_the_openai_shape(
        how: str, stream: bool, steps_watched: bool, status: int, answer: bytes, said: str, kind: str) -> None:
    """An engine's refusal whose body is not OpenAI's (an ``error`` string, no ``error``, plain text) reaches the
    client with the engine's status, rewritten as {"error": {"message", "type", "param", "code"}} quoting the
    engine and naming it; the engine's Retry-After is kept."""
    async with answering_engine(answer) as (base_url, received):
        upstream = Upstream("a", base_url, "vllm", supports_messages=False, steps_watched=steps_watched)
        async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/chat/completions", json={**_CHAT, "stream": stream})
    assert received, "the request reached the engine"
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["message"] == said, error
    assert error["type"] == kind and error["engine"] == "a", error
    assert error["code"] == ("engine_refused" if status < 500 else "engine_error"), error
    assert "param" in error and error["engine_status"] == status, error
    if status == 503:
        assert r.headers["retry-after"] == "7"


_MESSAGES = {"model": "a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("kind", "status", "answer", "client_status", "error_type"), [
    ("vllm", 429, _http_answer(429, b'{"error": "too many requests"}', retry_after="7"), 429, "rate_limit_error"),
    ("vllm", 503, _http_answer(503, b"model is loading\n", "text/plain", retry_after="9"), 503, "overloaded_error"),
    ("vllm", 401, _http_answer(401, b'{"error": "Unauthorized"}'), 401, "authentication_error"),
    ("vllm", 413, _http_answer(413, b'{"error": "prompt too long"}'), 413, "request_too_large"),
    ("vllm", 422, _http_answer(422, b'{"detail": "field required"}'), 400, "invalid_request_error"),
    ("vllm", 500, _http_answer(500, b'{"error": "boom"}'), 500, "api_error"),
    ("mlx_lm", 404, _http_answer(404, b'{"error": "chat template failed"}'), 400, "invalid_request_error"),
], ids=["429", "503", "401", "413", "422", "500", "mlx-404"])
async def test_an_engines_error_to_a_translated_messages_request_keeps_its_status_and_wait(
        stream: bool, kind: str, status: int, answer: bytes, client_status: int, error_type: str) -> None:
    """The engine's status reaches a Messages client (a 429 or 503 it waits out with the engine's Retry-After, a
    401 it does not retry); every 4xx used to be a 400 (which the Anthropic SDK never retries) and every 5xx
    a 502, without the engine's Retry-After."""
    async with answering_engine(answer) as (base_url, received):
        upstream = Upstream("a", base_url, kind, supports_messages=False)
        async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/messages", json={**_MESSAGES, "stream": stream})
    assert received, "the request reached the engine"
    assert r.status_code == client_status, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == error_type, doc
    assert doc["error"]["engine_status"] == status, doc
    if status in (429, 503):
        assert r.headers["retry-after"] == ("7" if status == 429 else "9"), r.headers


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_an_engines_error_already_in_the_openai_shape_passes_untouched(stream: bool) -> None:
    """An engine's OpenAI-shaped error (llama-server's, vLLM's) reaches the client byte for byte."""
    body = (b'{"error": {"message": "max_tokens must be at least 1", "type": "invalid_request_error", '
            b'"param": "max_tokens", "code": null}}')
    async with answering_engine(_http_answer(400, body, x_request_id="r1")) as (base_url, _):
        upstream = Upstream("a", base_url, "vllm", supports_messages=False)
        async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/chat/completions", json={**_CHAT, "stream": stream})
    assert (r.status_code, r.content, r.headers["x-request-id"]) == (400, body, "r1")


@pytest.mark.anyio
async def test_an_engines_huge_error_body_is_read_only_in_part() -> None:
    """An engine that answers 400 with 8 MiB of text: the client gets a 400 in its shape quoting the start of it."""
    async with answering_engine(_http_answer(400, b"x" * (8 * 2**20), "text/plain")) as (base_url, _):
        upstream = Upstream("a", base_url, "vllm", supports_messages=False)
        async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/chat/completions", json=_CHAT)
    assert r.status_code == 400, r.text[:200]
    message = r.json()["error"]["message"]
    assert message.startswith("engine 'a' refused the request: xxx") and len(message) < 5000, len(message)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_an_engines_error_body_reaches_a_messages_client_in_the_anthropic_shape(stream: bool) -> None:
    """/v1/messages sent on to an engine that serves it: its {"error": "..."} becomes the Anthropic shape; an
    Anthropic-shaped error passes untouched."""
    shaped = b'{"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: required"}}'
    doc = {"model": "a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    answers = []
    for answer in (_http_answer(400, b'{"error": "max_tokens must be of type int"}'), _http_answer(400, shaped)):
        async with answering_engine(answer) as (base_url, _):
            upstream = Upstream("a", base_url, "command", supports_messages=True)
            async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
                answers.append(await http.post(url + "/v1/messages", json=doc))
        async with answering_engine(answer) as (base_url, _):  # its own count_tokens, too
            upstream = Upstream("a", base_url, "command", supports_messages=True)
            async with running_gateway(Backend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
                answers.append(await http.post(url + "/v1/messages/count_tokens", json=doc))
    rewritten, counted, untouched, counted_untouched = answers
    for r in (rewritten, counted):
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error", r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["engine"] == "a", error
        assert error["message"] == "engine 'a' refused the request: max_tokens must be of type int", error
    assert (untouched.status_code, untouched.content) == (400, shaped)
    assert (counted_untouched.status_code, counted_untouched.content) == (400, shaped)


class _SlowBackend(Backend):
    """Takes 0.3 s to hand out an engine: a streaming request is held (its 200 head sent early)."""

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        await anyio.sleep(0.3)
        return await super().acquire(model, may_start=may_start)


@pytest.mark.anyio
async def test_a_held_streams_engine_refusal_is_one_error_event_in_the_openai_shape() -> None:
    """A stream held while its engine was handed out (head already sent) that the engine refuses with
    {"error": "..."}: the stream's one error event carries the OpenAI shape, quoting the engine."""
    async with answering_engine(_http_answer(400, b'{"error": "max_tokens must be of type int"}')) as (base_url, _):
        upstream = Upstream("a", base_url, "vllm", supports_messages=False)
        async with running_gateway(_SlowBackend({"a": upstream}, "a")) as url, httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url + "/v1/chat/completions", json={**_CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert len(events) == 1, r.text
    error = events[0]["error"]
    assert error["message"] == "engine 'a' refused the request: max_tokens must be of type int", error
    assert error["type"] == "invalid_request_error" and error["engine"] == "a", error


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False])
async def test_mlx_lm_servers_refusals_reach_the_client_in_the_openai_shape(mlx_server: MlxServer, stream: bool) -> None:
    """The real mlx_lm.server answers a bad field with 400 {"error": "<text>"}: the client gets the 400 in
    OpenAI's shape, quoting the engine's text."""
    upstream = Upstream("tiny", mlx_server.base_url, "mlx_lm", supports_messages=False, served_model="default_model")
    async with running_gateway(Backend({"tiny": upstream}, "tiny")) as url, httpx.AsyncClient(timeout=60) as http:
        bad_type = await http.post(url + "/v1/chat/completions", json={**_CHAT, "model": "tiny", "max_tokens": "x",
                                                                          "stream": stream})
        not_a_list = await http.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi",
                                                                            "stream": stream})
    for r, said in ((bad_type, "max_tokens must be of type int"), (not_a_list, "'str' object has no attribute 'get'")):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"] == f"engine 'tiny' refused the request: {said}", error
        assert error["type"] == "invalid_request_error" and error["engine"] == "tiny", error


# ---------------------------------------------------------------------------------------------
# An engine that closed the connection without answering is not an engine that could not be reached


@pytest.fixture
def openai_standin() -> Iterator[str]:
    """The OpenAI stand-in engine as a real process."""
    port = free_port()
    with engine_process([PYTHON, str(STANDINS / "openai_engine.py"), "--port", str(port)], port) as base_url:
        yield base_url


@pytest.mark.anyio
async def test_an_engine_that_closes_without_answering_is_told_apart_from_one_not_reached(openai_standin: str) -> None:
    """max_tokens "x" crashes the stand-in's request handler, which closes the connection unanswered: a 502 that
    says so (upstream_closed), not "could not be reached"; a port nobody listens on is upstream_unreachable."""
    backend = Backend({"a": Upstream("a", openai_standin, "command", supports_messages=False),
                       "gone": Upstream("gone", f"http://127.0.0.1:{free_port()}", "command", supports_messages=False)},
                      "a")
    async with running_gateway(backend, GatewaySettings(hold_s=1.0)) as url, httpx.AsyncClient(timeout=30) as http:
        closed = await http.post(url + "/v1/chat/completions", json={**_CHAT, "max_tokens": "x"})
        refused = await http.post(url + "/v1/chat/completions", json={**_CHAT, "model": "gone"})
        served = await http.post(url + "/v1/chat/completions", json=_CHAT)
    assert closed.status_code == 502, closed.text
    error = closed.json()["error"]
    assert error["code"] == "upstream_closed" and error["engine"] == "a", error
    assert "closed the connection without answering" in error["message"], error
    assert "could not be reached" not in error["message"], error
    assert refused.status_code == 502, refused.text
    assert refused.json()["error"]["code"] == "upstream_unreachable", refused.text
    assert "could not be reached" in refused.json()["error"]["message"], refused.text
    assert served.status_code == 200, served.text  # the engine was alive all along


# ---------------------------------------------------------------------------------------------
# A wrong method is the client's error


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/tiny"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_v1_models_are_405_allowing_get(path: str, method: str) -> None:
    """/v1/models is the gateway's own list: POST (or PUT, DELETE, PATCH) there is a 405 with Allow: GET in the
    OpenAI shape, not a 404 saying the gateway answers /v1/models."""
    backend = _backend()
    async with running_gateway(backend) as url, httpx.AsyncClient(timeout=30) as http:
        r = await http.request(method, url + path, json={"model": "tiny"})
        listed = await http.get(url + path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == "GET"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed", error
    assert f"{path} takes GET, not {method}" in error["message"], error
    assert listed.status_code == 200, listed.text
    assert backend.started == []


@pytest.mark.anyio
async def test_a_wrong_method_on_an_inference_path_is_the_clients_error_in_both_shapes() -> None:
    """GET /v1/chat/completions and GET /v1/messages: 405 invalid_request_error (OpenAI and Anthropic shapes)."""
    backend = _backend()
    async with running_gateway(backend) as url, httpx.AsyncClient(timeout=30) as http:
        chat = await http.get(url + "/v1/chat/completions")
        messages = await http.get(url + "/v1/messages")
    assert chat.status_code == 405 and chat.headers["allow"] == "POST", chat.text
    assert chat.json()["error"]["type"] == "invalid_request_error", chat.text
    assert chat.json()["error"]["code"] == "method_not_allowed", chat.text
    assert messages.status_code == 405 and messages.headers["allow"] == "POST", messages.text
    assert messages.json()["type"] == "error", messages.text
    assert messages.json()["error"]["type"] == "invalid_request_error", messages.text


@pytest.mark.anyio
@pytest.mark.parametrize(("raw", "anthropic"), [
    (b"GARBAGE\r\n\r\n", False),
    (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n{}", False),
    (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", True),
], ids=["request-line", "content-length", "chunked-body"])
async def test_bytes_that_are_not_http_get_a_json_400_in_the_api_shape(raw: bytes, anthropic: bool) -> None:
    """What the HTTP parser refuses is answered like every other refusal: JSON in the client's API shape, saying
    what to check, not the server's plain-text "Invalid HTTP request received."."""
    async with running_gateway(Backend({}, None)) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower(), answer
    doc = json.loads(body)
    error = doc["error"]
    if anthropic:
        assert doc["type"] == "error" and error["type"] == "invalid_request_error", doc
    else:
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http", doc
    assert "not valid HTTP/1.1" in error["message"] and "Content-Length" in error["message"], doc
