"""The gateway against real engines: a real mlx_lm.server on the tiny model and the Anthropic stand-in.

Clients are the official ``openai`` and ``anthropic`` SDKs. The daemon side is a small backend
defined here on top of the real engine processes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anthropic
import anyio
import httpx
import openai
import psutil
import pytest

from supervisord_llm.clock import SystemClock
from supervisord_llm.errors import ConfigError
from supervisord_llm.gateway import proxy
from supervisord_llm.gateway.proxy import (
    EngineUnavailable,
    GatewaySettings,
    RequestStats,
    TokenMeter,
    Upstream,
    build_app,
    serve,
    usage_tokens_of,
)
from tests.helpers import PYTHON, REPO, MlxServer, engine_process, free_port

pytestmark = pytest.mark.long_wait  # mostly waits: run beside the rest

STANDIN = REPO / "tests" / "standins" / "anthropic_engine.py"


class Backend:
    """A small daemon side: fixed engines, records every call the gateway makes."""

    def __init__(self, upstreams: dict[str, Upstream], default: str | None = None) -> None:
        self.upstreams = upstreams
        self.default = default
        self.unavailable: dict[str, EngineUnavailable] = {}
        self.clock = SystemClock()
        self.started: list[str] = []
        self.progress: Counter[str] = Counter()
        self.finished: list[RequestStats] = []
        self.stalls: list[tuple[str, str, float, float]] = []
        self.prefills: list[tuple[str, int, float | None]] = []  # prefill_changed, as told
        self.lines: dict[str, int] = {}  # line_changed, as told

    def models(self) -> list[dict]:
        return [
            {"id": name, "owned_by": "supervisord-llm", "aliases": []} for name in self.upstreams
        ]

    def default_engine(self) -> str | None:
        return self.default

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        name = model or self.default
        if name in self.unavailable:
            raise self.unavailable[name]
        if name not in self.upstreams:
            raise EngineUnavailable(
                str(name),
                "unknown_model",
                f"no model {name!r}; available models: {', '.join(self.upstreams)}",
                status=404,
            )
        return self.upstreams[name]

    def engine_for(self, model: str | None) -> str | None:
        name = model or self.default
        return name if name in self.upstreams or name in self.unavailable else None

    def try_pass(self, model: str | None) -> Upstream | None:
        return None  # every request asks acquire (the daemon's passes are tested through the real daemon)

    def request_started(self, engine: str) -> None:
        self.started.append(engine)

    def token_progress(self, engine: str, at_s: float) -> None:
        self.progress[engine] += 1

    def request_finished(self, stats: RequestStats) -> None:
        self.finished.append(stats)

    def engine_progress_s(self, engine: str) -> float | None:
        return None

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None:
        self.stalls.append((engine, phase, stalled_for_s, self.clock.now()))

    def prefill_changed(self, engine: str, in_prefill: int, ended_at_s: float | None) -> None:
        self.prefills.append((engine, in_prefill, ended_at_s))

    def line_changed(self, engine: str, occupied: int) -> None:
        self.lines[engine] = occupied


_open_clients: list = []


def opened(client):  # type: ignore[no-untyped-def]
    """An SDK client that running_gateway closes on the way out (inside the event loop)."""
    _open_clients.append(client)
    return client


@asynccontextmanager
async def running_gateway(
    backend: Backend,
    settings: GatewaySettings | None = None,
) -> AsyncIterator[str]:
    settings = replace(settings or GatewaySettings(), port=0)
    app = build_app(backend, settings, SystemClock())
    async with anyio.create_task_group() as tg:
        listen = await tg.start(serve, app, settings)
        try:
            yield f"http://{listen}"
        finally:
            while _open_clients:
                await _open_clients.pop().close()
            tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[MlxServer]:
    """One real mlx_lm.server for the module (tests that stop it always continue it)."""
    server = MlxServer(tiny_model)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def standin() -> Iterator[str]:
    """The Anthropic stand-in engine as a real process."""
    port = free_port()
    with engine_process([PYTHON, str(STANDIN), "--port", str(port)], port, quiet=False) as base_url:
        yield base_url


def mlx_upstream(engine: MlxServer) -> Upstream:
    return Upstream(
        "tiny", engine.base_url, "mlx_lm", supports_messages=False, served_model="default_model"
    )


def standin_upstream(base_url: str) -> Upstream:
    return Upstream(
        "claude-standin", base_url, "command", supports_messages=True, served_model=None
    )


def both(engine: MlxServer, standin: str) -> Backend:
    return Backend(
        {"tiny": mlx_upstream(engine), "claude-standin": standin_upstream(standin)}, default="tiny"
    )


async def wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await anyio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Real clients, real engines


@pytest.mark.slow
@pytest.mark.anyio
async def test_openai_sdk_chat_streaming_and_not_through_gateway(engine: MlxServer) -> None:
    """The official OpenAI SDK gets chat answers and streams through the gateway, with token stats."""
    backend = Backend({"tiny": mlx_upstream(engine)}, default="tiny")
    async with running_gateway(backend) as url:
        client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
        reply = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=12,
            temperature=1.0,
        )
        # Sampling at temperature 1.0 may draw the tiny model's end token early: the gateway's count must
        # equal what the engine reports, whatever the length.
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
        await wait_for(lambda: len(backend.finished) == 1)
        assert backend.finished[0].tokens == reply.usage.completion_tokens and backend.finished[0].ended == "complete"

        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=24,
            temperature=1.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert pieces and usage is not None and 0 < usage.completion_tokens <= 24
        await wait_for(lambda: len(backend.finished) == 2)
        stats = backend.finished[1]
    print(
        f"\nstreamed chat: ttft={stats.ttft_s:.4f}s tokens={stats.tokens} max_gap={stats.max_gap_s}"
    )
    assert stats.ended == "complete" and stats.tokens == usage.completion_tokens  # usage wins over the chunk count
    assert stats.ttft_s is not None and 0 < stats.ttft_s < 30
    assert backend.progress["tiny"] >= len(pieces)
    assert backend.started == ["tiny", "tiny"]


@pytest.mark.anyio
async def test_a_query_string_from_the_client_does_not_make_mlx_lm_answer_404(engine: MlxServer) -> None:
    """SDK setups that add a query (Azure-style ``api-version``; Claude Code's ``?beta=true``) reach the real
    mlx_lm.server, which matches the whole request target: the gateway sends the path alone (it was a 404
    "engine refused the request: Not Found")."""
    backend = Backend({"tiny": mlx_upstream(engine)}, default="tiny")
    async with running_gateway(backend) as url:
        client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                           default_query={"api-version": "2024-06-01"}))
        reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                     max_tokens=3)
        assert reply.choices[0].message.content is not None
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3, stream=True)
        assert [chunk async for chunk in stream]
        async with httpx.AsyncClient(timeout=60) as http:
            completion = await http.post(url + "/v1/completions?beta=true", json={"prompt": "hi", "max_tokens": 2})
        assert completion.status_code == 200, completion.text


@pytest.mark.slow
@pytest.mark.anyio
async def test_openai_sdk_text_completion_stream_counts_each_token(engine: MlxServer) -> None:
    """A streamed /v1/completions is counted token by token when no usage chunk comes."""
    backend = Backend({"tiny": mlx_upstream(engine)}, default="tiny")
    async with running_gateway(backend) as url:
        client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
        stream = await client.completions.create(
            model="tiny", prompt="hello", max_tokens=40, stream=True
        )
        texts = [c.choices[0].text async for c in stream if c.choices and c.choices[0].text]
        await wait_for(lambda: len(backend.finished) == 1)
    stats = backend.finished[0]
    assert stats.tokens == len(texts) == 40
    assert (
        stats.decode_s is not None
        and stats.max_gap_s is not None
        and stats.max_gap_s <= stats.decode_s
    )


@pytest.mark.slow
@pytest.mark.anyio
async def test_anthropic_sdk_messages_streaming_and_not(engine: MlxServer, standin: str) -> None:
    """The official Anthropic SDK gets messages and streams from an engine that serves /v1/messages."""
    backend = both(engine, standin)
    async with running_gateway(backend) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        message = await client.messages.create(
            model="claude-standin", max_tokens=7, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.usage.output_tokens == 7 and message.content[0].text
        async with client.messages.stream(
            model="claude-standin",
            max_tokens=15,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text.startswith("Hello from the stand-in") and final.usage.output_tokens == 15
        await wait_for(lambda: len(backend.finished) == 2)
    non_streamed, streamed = backend.finished
    assert (non_streamed.tokens, non_streamed.ended) == (7, "complete")
    assert (streamed.tokens, streamed.ended) == (15, "complete")
    assert backend.progress["claude-standin"] == 15


@pytest.mark.slow
@pytest.mark.anyio
async def test_messages_batches_on_a_translated_engine_is_404_naming_what_is_served(
    engine: MlxServer, standin: str
) -> None:
    """Messages paths other than messages and count_tokens (batches) are a 404 at the door naming the paths the
    gateway forwards; no engine is started for one."""
    backend = both(engine, standin)
    async with running_gateway(backend) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages/batches", json={"model": "tiny", "requests": []})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "not_found_error"
    assert "/v1/messages/batches" in error["message"] and "/v1/messages/count_tokens" in error["message"]
    assert backend.started == []


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.anyio
async def test_api_key_is_required_when_configured() -> None:
    """With an api_key set, a wrong or missing key gets 401 and the right one (Bearer or x-api-key) passes."""
    backend = Backend({})
    settings = GatewaySettings(api_key="s3cret-key")
    async with running_gateway(backend, settings) as url:
        wrong = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="nope", max_retries=0))
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        async with httpx.AsyncClient() as http:
            assert (await http.get(url + "/v1/models")).status_code == 401
            assert (await http.get(url + "/gateway/status")).status_code == 401
            ok_header = await http.get(url + "/v1/models", headers={"x-api-key": "s3cret-key"})
            assert ok_header.status_code == 200
        right = opened(
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        )
        assert (await right.models.list()).data == []


@pytest.mark.anyio
async def test_body_over_limit_is_413_without_reading_it_all() -> None:
    """A body over max_body_bytes is refused with 413, declared or chunked, and the engine is never asked."""
    backend = Backend(
        {"tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None)}, "tiny"
    )
    settings = GatewaySettings(max_body_bytes=4096)
    async with running_gateway(backend, settings) as url:
        async with httpx.AsyncClient() as http:
            big = json.dumps({"model": "tiny", "prompt": "x" * 10_000})
            declared = await http.post(
                url + "/v1/completions", content=big, headers={"content-type": "application/json"}
            )

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(100):
                    yield b"x" * 1024

            chunked = await http.post(url + "/v1/completions", content=chunks())
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert "4096" in response.json()["error"]["message"]
    assert backend.started == []


@pytest.mark.anyio
async def test_invalid_json_is_400() -> None:
    """A body that is not JSON gets a 400 saying so, in the API's own error shape."""
    backend = Backend(
        {"tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None)}, "tiny"
    )
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient() as http:
            chat = await http.post(
                url + "/v1/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            messages = await http.post(
                url + "/v1/messages", content=b"[1, 2", headers={"content-type": "application/json"}
            )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_json"
    assert messages.status_code == 400
    assert (
        messages.json()["type"] == "error"
        and messages.json()["error"]["type"] == "invalid_request_error"
    )


@pytest.mark.anyio
async def test_unknown_model_is_404_listing_models() -> None:
    """Asking for a model nobody serves is a 404 that lists the models that exist."""
    backend = Backend(
        {
            "tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None),
            "big": Upstream("big", "http://127.0.0.1:9", "vllm", False, None),
        },
        "tiny",
    )
    async with running_gateway(backend) as url:
        client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            )
    message = info.value.body["message"]  # type: ignore[index]
    assert "gpt-9" in message and "tiny" in message and "big" in message


@pytest.mark.anyio
async def test_an_embeddings_request_goes_by_its_model_whatever_its_content_type() -> None:
    """curl -d sends a form's content type: an embeddings body is read as JSON all the same, so its model picks
    the engine (it went to the default engine, unread: mlx_lm's "no embeddings endpoint" for any model)."""
    backend = Backend(
        {
            "tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None),
            "big": Upstream("big", "http://127.0.0.1:9", "vllm", False, None),
        },
        "tiny",
    )
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with running_gateway(backend) as url, httpx.AsyncClient() as http:
        unknown = await http.post(url + "/v1/embeddings", content=b'{"model": "nope", "input": "hi"}', headers=form)
        not_object = await http.post(url + "/v1/embeddings", content=b'"hi"', headers=form)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found", unknown.text
    assert "big" in unknown.json()["error"]["message"]
    assert not_object.status_code == 400 and not_object.json()["error"]["code"] == "invalid_json", not_object.text


@pytest.mark.anyio
async def test_unavailable_engine_is_503_with_retry_after_and_until() -> None:
    """An engine in backoff answers 503 with Retry-After and a JSON body saying why and until when."""
    backend = Backend(
        {"tiny": Upstream("tiny", "http://127.0.0.1:9", "mlx_lm", False, None)}, "tiny"
    )
    until_wall = time.time() + 42
    backend.unavailable["tiny"] = EngineUnavailable(
        "tiny",
        "backoff",
        "crashed 3 times; next start in 42s",
        retry_after_s=41.2,
        until_wall=until_wall,
    )
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient() as http:
            response = await http.post(
                url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            status = (await http.get(url + "/gateway/status")).json()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "42"
    error = response.json()["error"]
    assert error["reason"] == "backoff" and "next start in 42s" in error["message"]
    assert error["until_wall"] == until_wall and error["until"].startswith(
        time.strftime("%Y-", time.gmtime())
    )
    assert status["in_flight"] == 0 and status["requests_total"] == 1


@pytest.mark.anyio
async def test_models_and_status_answer_while_every_engine_is_down() -> None:
    """/v1/models and /gateway/status keep answering when no engine is reachable; requests get a 502."""
    dead = free_port()
    backend = Backend(
        {"tiny": Upstream("tiny", f"http://127.0.0.1:{dead}", "mlx_lm", False, None)}, "tiny"
    )
    # An engine its daemon calls serving but whose port refuses is retried within hold_s (gateway/retry.py):
    # a short hold keeps the wait for the 502 short.
    async with running_gateway(backend, GatewaySettings(hold_s=2.0)) as url:
        client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert (await client.models.retrieve("tiny")).id == "tiny"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-9")
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="tiny", prompt="x", max_tokens=1)
        async with httpx.AsyncClient() as http:
            status = (await http.get(url + "/gateway/status")).json()
    assert info.value.status_code == 502
    assert status["engines"]["tiny"]["upstream_error"] == 1 and status["in_flight"] == 0
    assert backend.finished[0].ended == "upstream_error"


# ---------------------------------------------------------------------------------------------
# Watching tokens: stalls, keepalives, disconnects


def engine_cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigstopped_engine_mid_stream_is_detected_as_decode_stall(engine: MlxServer) -> None:
    """An engine frozen mid-stream is reported within decode_stall_s and the client gets an error event."""
    backend = Backend({"tiny": mlx_upstream(engine)}, "tiny")
    settings = GatewaySettings(decode_stall_s=2.0)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100_000, "stream": True}
    lines: list[str] = []
    stopped_at = None
    try:
        async with running_gateway(backend, settings) as url:
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream("POST", url + "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if stopped_at is None and len(lines) > 20:
                            os.kill(engine.proc.pid, signal.SIGSTOP)
                            stopped_at = time.monotonic()
            await wait_for(lambda: len(backend.finished) == 1)
    finally:
        os.kill(engine.proc.pid, signal.SIGCONT)
    assert stopped_at is not None and len(backend.stalls) == 1
    name, phase, stalled_for_s, detected_at = backend.stalls[0]
    detection_s = detected_at - stopped_at
    print(
        f"\nstall detected {detection_s:.2f}s after SIGSTOP (decode_stall_s=2.0, stalled_for={stalled_for_s:.2f}s)"
    )
    assert (name, phase) == ("tiny", "decode")
    assert stalled_for_s >= 2.0 and detection_s < 2.0 + 3.0
    error_events = [json.loads(x[5:]) for x in lines if x.startswith("data:") and '"error"' in x]
    assert error_events and error_events[-1]["error"]["code"] == "engine_stalled"
    assert backend.finished[0].ended == "stalled" and backend.finished[0].tokens > 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_client_disconnect_stops_generation_in_the_engine(engine: MlxServer) -> None:
    """A client that goes away mid-stream makes the engine stop generating (it goes idle at once)."""
    backend = Backend({"tiny": mlx_upstream(engine)}, "tiny")
    proc = psutil.Process(engine.proc.pid)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100_000, "stream": True}
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data:")
                    if seen == 5:
                        busy_from = (time.monotonic(), engine_cpu_s(proc))
                    if seen >= 200:
                        break
                busy_to = (time.monotonic(), engine_cpu_s(proc))
            # leaving the block closes the client connection mid-stream
        await wait_for(lambda: len(backend.finished) == 1)
        assert backend.finished[0].ended == "client_disconnected"
        await anyio.sleep(0.5)  # let the engine notice the closed socket
        idle_from = (time.monotonic(), engine_cpu_s(proc))
        await anyio.sleep(2.0)
        idle_to = (time.monotonic(), engine_cpu_s(proc))
        busy_share = (busy_to[1] - busy_from[1]) / (busy_to[0] - busy_from[0])
        idle_share = (idle_to[1] - idle_from[1]) / (idle_to[0] - idle_from[0])
        print(
            f"\nengine CPU while streaming {busy_share:.2f} cores, after disconnect {idle_share:.2f} cores"
        )
        # A 100k-token request left running would keep the engine busy for minutes.
        assert busy_share > 0.5 and idle_share < 0.15
        async with httpx.AsyncClient(timeout=30) as http:
            started = time.monotonic()
            small = await http.post(
                url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5}
            )
            assert small.status_code == 200 and time.monotonic() - started < 10
    assert backend.finished[0].tokens >= 200


async def _keepalive_only_prefill(url: str) -> pytest.ExceptionInfo[anthropic.APIStatusError]:
    """A Messages stream to the stand-in whose prefill lasts 6 s and sends only keepalive comments;
    the error the SDK raised when the gateway ended it."""
    client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client.messages.stream(
            model="claude-standin",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-standin-prefill-s": "6", "x-standin-keepalive-s": "0.1"},
        ) as stream:
            async for _ in stream.text_stream:
                pass
    return info


@pytest.mark.slow
@pytest.mark.anyio
async def test_keepalive_comments_are_not_progress(standin: str) -> None:
    """SSE keepalive comments do not count as tokens: a prefill that only sends keepalives is a stall."""
    backend = Backend({"claude-standin": standin_upstream(standin)}, "claude-standin")
    settings = GatewaySettings(prefill_stall_s=1.0)
    async with httpx.AsyncClient() as http:
        gone_before = (await http.get(standin + "/standin/stats")).json()["client_gone"]
    async with running_gateway(backend, settings) as url:
        started = time.monotonic()
        info = await _keepalive_only_prefill(url)
        elapsed_s = time.monotonic() - started
        await wait_for(lambda: len(backend.finished) == 1)
    assert "stalled" in str(info.value) and elapsed_s < 5.0
    assert [(e, p) for e, p, _, _ in backend.stalls] == [("claude-standin", "prefill")]
    assert backend.progress["claude-standin"] == 0 and backend.finished[0].ended == "stalled"
    async with httpx.AsyncClient() as http:
        # the gateway closed the upstream stream: the stand-in's next keepalive write failed
        deadline = time.monotonic() + 5
        while (await http.get(standin + "/standin/stats")).json()["client_gone"] == gone_before:
            assert time.monotonic() < deadline, (
                "the stand-in never saw the gateway close the stream"
            )
            await anyio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_stall_tick_that_fails_does_not_end_the_watch(standin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one tick of the stall watchdog (a timer, not a task: nothing would report it) is
    logged and the watch goes on, so an engine that stalls afterwards is still caught."""
    real_wait_s = proxy._Forward._stall_wait_s
    ticks: list[int] = []

    def first_tick_fails(self: proxy._Forward) -> float | None:
        ticks.append(1)
        if len(ticks) == 1:
            raise RuntimeError("injected: a bug in the stall tick")
        return real_wait_s(self)

    monkeypatch.setattr(proxy._Forward, "_stall_wait_s", first_tick_fails)
    backend = Backend({"claude-standin": standin_upstream(standin)}, "claude-standin")
    async with running_gateway(backend, GatewaySettings(prefill_stall_s=1.0)) as url:
        info = await _keepalive_only_prefill(url)
        await wait_for(lambda: len(backend.finished) == 1)
    assert "stalled" in str(info.value) and len(ticks) > 1
    assert backend.finished[0].ended == "stalled"


@pytest.mark.slow
@pytest.mark.anyio
async def test_in_flight_is_counted_while_a_stream_is_open(standin: str) -> None:
    """/gateway/status shows a stream in flight while it runs and none once it has ended."""
    backend = Backend({"claude-standin": standin_upstream(standin)}, "claude-standin")
    async with running_gateway(backend) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {
                "model": "claude-standin",
                "max_tokens": 50,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
            async with http.stream(
                "POST", url + "/v1/messages", json=body, headers={"x-standin-token-delay-s": "0.05"}
            ) as response:
                lines = response.aiter_lines()
                await lines.__anext__()
                during = (await http.get(url + "/gateway/status")).json()
                async for _ in lines:
                    pass
            await wait_for(lambda: len(backend.finished) == 1)
            after = (await http.get(url + "/gateway/status")).json()
    assert during["in_flight"] == 1 and during["engines"]["claude-standin"]["in_flight"] == 1
    assert after["in_flight"] == 0 and after["engines"]["claude-standin"]["complete"] == 1


# ---------------------------------------------------------------------------------------------
# Pure parts: the token meter and the settings


def test_meter_tells_an_answer_the_engine_ended_from_one_whose_connection_just_closed() -> None:
    """[DONE], a finish_reason, message_stop or "done": true end an answer; a last line without its newline
    still counts once the stream ends (else a finished stream would get a false "broke off" error)."""
    finish = TokenMeter(anthropic=False)
    finish.feed(b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n', 0.0)
    assert not finish.answer_ended
    finish.feed(b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n', 1.0)
    assert finish.answer_ended
    done_without_newline = TokenMeter(anthropic=False)
    done_without_newline.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]', 0.0)
    assert not done_without_newline.answer_ended
    done_without_newline.end(1.0)
    assert done_without_newline.answer_ended
    messages = TokenMeter(anthropic=True)
    messages.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n\n', 0.0)
    assert messages.answer_ended
    lines = TokenMeter(anthropic=False, ndjson=True)
    lines.feed(b'{"done":false,"message":{"content":"a"}}\n', 0.0)
    assert not lines.answer_ended
    lines.feed(b'{"done":true,"eval_count":1}', 1.0)
    lines.end(2.0)
    assert lines.answer_ended


def test_meter_counts_openai_tokens_across_split_chunks_and_prefers_usage() -> None:
    """Token chunks are counted even when split mid-line; comments and empty deltas are not; usage wins."""
    seen: list[float] = []
    meter = TokenMeter(anthropic=False, on_token=seen.append)
    stream = (
        b": keepalive 1/9\n\n"
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"choices":[{"delta":{"reasoning_content":"hm"}}]}\r\n\r\n'
        b'data: {"choices":[{"delta":{"content":"say \\"content\\": \\"x"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":null}, "finish_reason":"stop"}]}\n\n'
    )
    for i in range(0, len(stream), 7):
        meter.feed(stream[i : i + 7], at_s=float(i))
    assert meter.tokens == 3 and len(seen) == 3 and meter.first_token_at_s is not None
    meter.feed(
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":17}}\n\ndata: [DONE]\n\n',
        999.0,
    )
    assert meter.tokens == 17 and meter.counted_tokens == 3


def test_meter_counts_anthropic_deltas_and_records_errors() -> None:
    """content_block_delta events are tokens, ping and keepalives are not, message_delta usage wins."""
    meter = TokenMeter(anthropic=True)
    meter.feed(b'event: ping\ndata: {"type":"ping"}\n\n: keepalive\n\n', 1.0)
    assert meter.tokens == 0
    meter.feed(
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"a"}}\n\n',
        2.0,
    )
    meter.feed(b'data: {"type": "content_block_delta", "delta": {"text": "b"}}\n\n', 4.5)
    assert meter.tokens == 2 and meter.max_gap_s == 2.5
    meter.feed(
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n', 5.0
    )
    meter.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n', 6.0)
    assert meter.tokens == 9 and meter.error == {"type": "overloaded_error"}


def test_settings_from_toml_accepts_units_and_names_bad_keys() -> None:
    """The [gateway] table takes durations and sizes in human units; mistakes name file, key and what is valid."""
    settings = GatewaySettings.from_toml(
        {
            "listen": "0.0.0.0:9000",
            "hold_s": "2m",
            "max_body_bytes": "8MiB",
            "decode_stall_s": 30,
            "api_key_env": "GW_KEY",
        },
        file="/etc/llm.toml",
        key="gateway",
        environ={"GW_KEY": "gw-secret-k3y"},
    )
    assert (settings.host, settings.port, settings.hold_s) == ("0.0.0.0", 9000, 120.0)
    assert (
        settings.max_body_bytes == 8 * 2**20
        and settings.api_key == "gw-secret-k3y"
        and "gw-secret-k3y" not in repr(settings)
    )
    assert GatewaySettings.from_toml({}, file=None).listen == "127.0.0.1:8000"
    cases = [
        ({"listen": "localhost"}, "gateway.listen", "HOST:PORT"),
        ({"hold_s": "soon"}, "gateway.hold_s", '"90s"'),
        ({"decode_stall_s": "0s"}, "gateway.decode_stall_s", "greater than 0"),
        ({"max_body": "1MB"}, "gateway.max_body", "valid keys"),
        ({"api_key_env": "NOPE_NOT_SET"}, "gateway.api_key_env", "not set"),
    ]
    for table, key, hint in cases:
        with pytest.raises(ConfigError) as info:
            GatewaySettings.from_toml(table, file="/etc/llm.toml", key="gateway", environ={})
        assert (
            info.value.key == key and info.value.file == "/etc/llm.toml" and hint in str(info.value)
        )


def test_the_meter_reads_ollamas_own_stream_of_json_lines() -> None:
    """One token per line with "done": false (Go writes it without a space; a thinking model's empty content
    counts: it is a step); the last line's eval_count wins; an error line is the engine's error."""
    seen: list[float] = []
    meter = TokenMeter(anthropic=False, on_token=seen.append, ndjson=True)
    meter.feed(b'{"model":"m","response":"Hi","done":false}\n{"model":"m","message":{"role":"assistant",'
               b'"content":"","thinking":"hmm"},"done": false}\n{"model":"m","res', 1.0)
    meter.feed(b'ponse":" there","done":false}\n', 2.0)  # a line split across chunks: counted once, when whole
    assert meter.tokens == 3 and seen == [1.0, 1.0, 2.0]
    meter.feed(b'{"model":"m","response":"","done":true,"eval_count":7}\n', 3.0)
    assert meter.tokens == 7 and meter.error is None
    tool = TokenMeter(anthropic=False, ndjson=True)  # a tool call's arguments are any JSON: the counts decide
    tool.feed(b'{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":'
              b'{"done": false}}}]},"done":true,"eval_count":12}\n', 1.0)
    assert tool.tokens == 12 and tool.counted_tokens == 0
    assert usage_tokens_of(b'{"model":"m","response":"hi","done":true,"eval_count":5}') == 5  # not streamed
    broken = TokenMeter(anthropic=False, ndjson=True)
    broken.feed(b'{"error":"model runner has unexpectedly stopped"}\n', 1.0)
    assert broken.tokens == 0 and broken.error == "model runner has unexpectedly stopped"


class ProgressingBackend(Backend):
    """Reports the engine's progress as the daemon does from its step counters: always just now."""

    def engine_progress_s(self, engine: str) -> float | None:
        return self.clock.now()


@asynccontextmanager
async def silent_then_whole_engine(silent_s: float, received: list[bytes] | None = None) -> AsyncIterator[str]:
    """An engine that answers a chat completion whole after ``silent_s`` with nothing sent before (a long
    non-streamed generation); each request's head goes into ``received`` as it arrives."""
    import asyncio

    answer = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if received is not None:
                received.append(head)
            await asyncio.sleep(silent_s)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a connection closed without a request (the gateway's spare), or the gateway gave up
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.mark.anyio
@pytest.mark.parametrize("progressing", [True, False])
async def test_a_non_streamed_answer_longer_than_the_read_timeout_waits_while_the_engine_progresses(
    progressing: bool,
) -> None:
    """A non-streamed answer arrives whole, after its whole generation: an engine that sends nothing for longer
    than upstream_read_timeout_s (here 1 s against 3 s) is waited for while it shows progress (its step
    counters), and is a 504 naming the setting when it shows none."""
    async with silent_then_whole_engine(3.0) as base_url:
        upstreams = {"slow": Upstream("slow", base_url, "vllm", supports_messages=False, steps_watched=True)}
        backend = (ProgressingBackend if progressing else Backend)(upstreams, default="slow")
        async with running_gateway(backend, GatewaySettings(upstream_read_timeout_s=1.0)) as url:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": "slow", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    if progressing:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "done", r.text
    else:
        assert r.status_code == 504, r.text
        assert "upstream_read_timeout_s" in r.json()["error"]["message"], r.text


@pytest.mark.anyio
async def test_with_hold_s_0_a_request_waits_for_no_connection_either() -> None:
    """hold_s = 0 (no request waits): with the engine's one connection (max_upstream_connections = 1) busy, the
    next request is answered at once with a 504 naming the setting, not after the busy one has finished."""
    received: list[bytes] = []
    async with silent_then_whole_engine(3.0, received) as base_url:
        backend = Backend({"slow": Upstream("slow", base_url, "vllm", supports_messages=False, steps_watched=True)}, default="slow")
        settings = GatewaySettings(hold_s=0.0, max_upstream_connections=1)
        async with running_gateway(backend, settings) as url, httpx.AsyncClient(timeout=30) as client:
            body = {"model": "slow", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(client.post, url + "/v1/chat/completions", json=body))  # holds it
                await wait_for(lambda: received)  # the engine has it: the one connection is taken
                started = time.monotonic()
                second = await client.post(url + "/v1/chat/completions", json=body)
                took_s = time.monotonic() - started
                tg.cancel_scope.cancel()
    assert second.status_code == 504 and "max_upstream_connections" in second.json()["error"]["message"], second.text
    assert took_s < 2.0, took_s
