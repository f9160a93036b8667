"""The Anthropic Messages API through the gateway for engines that speak only the OpenAI API.

Clients are the official ``anthropic`` SDK (sync and async, streaming and not). The engine is the
real mlx_lm.server on the tiny model for everything it can do; tool calls, which the tiny random
model cannot make, come from the mlx_lm tool-call stand-in (tests/standins/mlx_toolcall_engine.py,
recorded from mlx_lm/server.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from supervisord_llm.gateway.proxy import TOKEN_COUNT_HEADER, GatewaySettings, Upstream
from tests.helpers import PYTHON, REPO, MlxServer, free_port, mlx_engine_toml, wait_http
from tests.integration.test_gateway import Backend, opened, running_gateway

pytestmark = pytest.mark.long_wait  # mostly waits: run beside the rest

TOOL_STANDIN = REPO / "tests" / "standins" / "mlx_toolcall_engine.py"
EVENTS = TypeAdapter(RawMessageStreamEvent)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[MlxServer]:
    """One real mlx_lm.server for the module."""
    server = MlxServer(tiny_model)
    try:
        yield server
    finally:
        server.close()


def _start_standin(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(TOOL_STANDIN), "--port", str(port), *extra], start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    wait_http(base_url + "/health", timeout_s=20)
    return proc, base_url


@pytest.fixture(scope="module")
def tool_engine() -> Iterator[str]:
    """The mlx_lm tool-call stand-in (whole call in one chunk, as mlx_lm.server sends it)."""
    proc, url = _start_standin()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def fragment_engine() -> Iterator[str]:
    """The stand-in streaming the call's arguments in 9 fragments (vLLM / llama-server style), with /tokenize."""
    proc, url = _start_standin("--fragments", "9", "--tokenize")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def backend_for(engine: MlxServer | None = None, **standins: str) -> Backend:
    upstreams = {}
    if engine is not None:
        upstreams["tiny"] = Upstream("tiny", engine.base_url, "mlx_lm", supports_messages=False,
                                     served_model="default_model")
    for name, url in standins.items():
        upstreams[name] = Upstream(name, url, "mlx_lm", supports_messages=False, served_model="default_model")
    return Backend(upstreams, default=next(iter(upstreams)))


# This SDK version has no sampling arguments of its own; the API still takes them in the body.
GREEDY = {"extra_body": {"temperature": 0.0, "top_k": 1}}


# ---------------------------------------------------------------------------------------------
# The real mlx_lm.server


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_sdk_create_and_stream_against_real_mlx(engine: MlxServer) -> None:
    """messages.create and messages.stream work against mlx_lm.server, usage from the engine's counts."""
    backend = backend_for(engine)
    async with running_gateway(backend) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        message = await client.messages.create(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}], **GREEDY
        )
        async with client.messages.stream(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}], **GREEDY
        ) as stream:
            kinds = [event.type async for event in stream]
            streamed = await stream.get_final_message()
    Message.model_validate(message.model_dump())
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 8 and message.usage.input_tokens > 0
    assert streamed.content[0].text == message.content[0].text  # greedy: same words both ways
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert streamed.usage.output_tokens == 8
    # the watchdog saw the engine's tokens on both translated requests
    assert [(s.tokens, s.ended) for s in backend.finished] == [(8, "complete"), (8, "complete")]
    assert backend.progress["tiny"] >= 16


@pytest.mark.slow
def test_sync_sdk_multi_turn_stop_sequence_and_count_tokens(engine: MlxServer) -> None:
    """Sync SDK: multi-turn with system blocks, stop_sequences, count_tokens flagged, a tool_result turn."""
    backend = backend_for(engine)

    async def run() -> tuple[Message, Message, list[str], Any]:
        async with running_gateway(backend) as url:

            def calls() -> tuple[Message, Message, list[str], Any]:
                with anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0) as client:
                    turns = [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                        {"role": "user", "content": [{"type": "text", "text": "again"}]},
                    ]
                    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
                    first = client.messages.create(model="tiny", max_tokens=12, system=system, messages=turns,
                                                   **GREEDY)
                    words = first.content[0].text.split(" ")
                    stop = " " + words[3]
                    cut = client.messages.create(model="tiny", max_tokens=12, system=system, messages=turns,
                                                 stop_sequences=["NEVER", stop], **GREEDY)
                    with client.messages.stream(model="tiny", max_tokens=12, system=system, messages=turns,
                                                stop_sequences=[stop], **GREEDY) as stream:
                        kinds = [event.type for event in stream]
                    counted = client.messages.with_raw_response.count_tokens(model="tiny", messages=turns,
                                                                             system=system)
                    # a tool_use / tool_result history reaches the real engine as tool_calls + tool messages
                    tools = [WEATHER_TOOL]
                    after_tool = client.messages.create(model="tiny", max_tokens=6, tools=tools, messages=[
                        {"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": [
                            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain", "is_error": False}]},
                    ], **GREEDY)
                    assert after_tool.content[0].text and after_tool.stop_reason == "max_tokens"
                    return first, cut, kinds, counted

            return await anyio.to_thread.run_sync(calls)

    first, cut, kinds, counted = anyio.run(run)
    text = first.content[0].text
    stop = " " + text.split(" ")[3]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert counted.status_code == 200 and counted.parse().input_tokens > 0
    # mlx_lm.server has no tokenizer endpoint: the count is an estimate, and says so
    assert counted.headers[TOKEN_COUNT_HEADER].startswith("estimate")


@pytest.mark.slow
@pytest.mark.anyio
async def test_claude_code_shaped_request_gets_a_valid_event_stream(engine: MlxServer) -> None:
    """A request shaped like Claude Code's (system blocks, a dozen tools, metadata, thinking) streams valid events."""
    tools = [
        {"name": f"tool_{i}", "description": f"Tool number {i}",
         "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
                          "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}
        for i in range(12)
    ]
    body = {
        "model": "tiny",
        "max_tokens": 10,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "Use the tools.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}},
            ]},
        ],
        "tools": tools,
        "metadata": {"user_id": "user_abc_account_123_session_456"},
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "temperature": 1,
    }
    backend = backend_for(engine)
    async with running_gateway(backend) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/messages", json=body,
                                 headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}) \
                as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = (await response.aread()).decode()
    events = []
    kinds: list[str] = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        kinds.append(event["type"])
        if event["type"] != "ping":  # the SDK's stream reader skips pings; its event union has none
            events.append(EVENTS.validate_python(event))
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == list(range(len(starts))) and starts
    # At temperature 1 (as Claude Code sends) the tiny model now and then samples its end of text
    # before max_tokens: then the turn ended, with fewer tokens.
    final = events[-2]
    assert (final.delta.stop_reason == "max_tokens" and final.usage.output_tokens == 10) or (
        final.delta.stop_reason == "end_turn" and 1 <= final.usage.output_tokens < 10), final


@pytest.mark.slow
@pytest.mark.anyio
async def test_unknown_model_is_404_in_anthropic_shape(engine: MlxServer) -> None:
    """An unknown model is a 404 not_found_error the SDK raises as NotFoundError."""
    async with running_gateway(backend_for(engine)) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.create(model="no-such", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such" in info.value.body["error"]["message"]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Tool calls (mlx_lm's recorded stream format; the tiny model cannot call tools)


@pytest.mark.anyio
async def test_forced_tool_call_comes_back_as_tool_use_and_tool_result_turn_is_translated(
    tool_engine: str,
) -> None:
    """A forced tool call is a tool_use block (stop_reason tool_use); the tool_result turn reaches the engine."""
    backend = backend_for(mlxtools=tool_engine)
    async with running_gateway(backend) as url, httpx.AsyncClient() as plain:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        message = await client.messages.create(
            model="mlxtools", max_tokens=64, tools=[WEATHER_TOOL],
            tool_choice={"type": "tool", "name": "get_weather"},
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        )
        sent_first = (await plain.get(tool_engine + "/standin/last")).json()
        call = message.content[-1]
        async with client.messages.stream(
            model="mlxtools", max_tokens=64, tools=[WEATHER_TOOL],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": message.content},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "tool_result", "tool_use_id": "other", "content": "timeout", "is_error": True},
                    {"type": "text", "text": "and tomorrow?"},
                ]},
            ],
        ) as stream:
            deltas = [e.delta.partial_json async for e in stream
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            second = await stream.get_final_message()
        sent_second = (await plain.get(tool_engine + "/standin/last")).json()
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "Paris", "days": 3, "units": "metric"}
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 12
    assert sent_first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent_first["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]
    assert sent_first["stream"] is True and sent_first["model"] == "default_model"
    # the second turn: the call kept its id, the results became tool messages, then the user's text
    assert sent_second["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent_second["messages"][2:] == [
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        {"role": "tool", "tool_call_id": "other", "content": "Error: timeout"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert len(deltas) == 1 and json.loads(deltas[0])["city"] == "Paris"
    assert second.content[-1].input == call.input and second.stop_reason == "tool_use"


@pytest.mark.anyio
async def test_tool_arguments_in_many_fragments_become_input_json_deltas(fragment_engine: str) -> None:
    """Arguments streamed in 9 fragments arrive as 9 input_json_delta events and parse to the full input."""
    backend = backend_for(frag=fragment_engine)
    async with running_gateway(backend) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        async with client.messages.stream(
            model="frag", max_tokens=64, tools=[WEATHER_TOOL], tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather?"}],
        ) as stream:
            deltas = [e.delta.partial_json async for e in stream
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            final = await stream.get_final_message()
        counted = await client.messages.with_raw_response.count_tokens(
            model="frag", system="one two", messages=[{"role": "user", "content": "three four five"}])
    assert len(deltas) == 9
    # an engine with a tokenizer endpoint counts the tokens itself, and the header says so
    assert (await counted.parse()).input_tokens == 5 and counted.headers[TOKEN_COUNT_HEADER] == "engine-tokenizer"
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"city": "Paris", "days": 3, "units": "metric"}
    assert final.stop_reason == "tool_use"


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.anyio
async def test_bad_requests_are_400_naming_the_field_and_the_gateway_keeps_serving(tool_engine: str) -> None:
    """Malformed JSON, wrong types, missing max_tokens, 10,000 tools, deep nesting: 400s naming the field."""
    backend = backend_for(mlxtools=tool_engine)
    ok = {"model": "mlxtools", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    deep = "[" * 5000 + '"x"' + "]" * 5000  # json.loads gives up on this (RecursionError)
    cases = {
        "malformed": (b'{"model": "mlxtools", "max_tokens": ', "invalid_json", "not valid JSON"),
        "wrong type": (json.dumps({**ok, "max_tokens": "five"}).encode(), "invalid_request", "max_tokens"),
        "missing max_tokens": (json.dumps({k: v for k, v in ok.items() if k != "max_tokens"}).encode(),
                               "invalid_request", "max_tokens"),
        "bad role": (json.dumps({**ok, "messages": [{"role": "robot", "content": "x"}]}).encode(),
                     "invalid_request", "messages[0].role"),
        "10000 tools": (json.dumps({**ok, "tools": [WEATHER_TOOL] * 10000}).encode(), "invalid_request", "tools"),
        "deep content": (('{"model": "mlxtools", "max_tokens": 5, "messages": [{"role": "user", "content": '
                          f'[{{"type": "tool_result", "tool_use_id": "a", "content": {deep}}}]}}]}}').encode(),
                         "invalid_json", "nested"),
        "deep but parseable": (json.dumps({**ok, "metadata": {"user_id": "u", "x": json.loads(
            "[" * 100 + "]" * 100)}}).encode(), "invalid_request", "metadata.x"),
        "image": (json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}).encode(),
            "invalid_request", "messages[0].content[0]"),
    }
    async with running_gateway(backend) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        for name, (body, code, named) in cases.items():
            r = await client.post("/v1/messages", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, name
            doc = r.json()
            assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", name
            assert doc["error"]["code"] == code, (name, doc)
            assert named in doc["error"]["message"], (name, doc)
        served = await client.post("/v1/messages", json=ok)
    assert served.status_code == 200 and served.json()["content"][0]["text"] == "ok"
    assert served.json()["stop_reason"] == "end_turn"


@pytest.mark.anyio
async def test_engine_errors_reach_the_client_in_anthropic_shape(engine: MlxServer, tool_engine: str) -> None:
    """A real engine's refusal is a 400 quoting it; an error mid-stream is an `event: error` the SDK raises."""
    backend = backend_for(engine, mlxtools=tool_engine)
    # mlx_lm.server answers 404 {"error": ...} when it cannot load the model a request names.
    backend.upstreams["tiny"] = Upstream("tiny", engine.base_url, "mlx_lm", supports_messages=False,
                                         served_model="/no/such/model")
    async with running_gateway(backend) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.APIStatusError) as broke:
            async with client.messages.stream(model="mlxtools", max_tokens=5,
                                              messages=[{"role": "user", "content": "FAIL MID-STREAM"}]) as stream:
                async for _event in stream:
                    pass
        with pytest.raises(anthropic.APIStatusError) as broke_whole:
            await client.messages.create(model="mlxtools", max_tokens=5,
                                         messages=[{"role": "user", "content": "FAIL MID-STREAM"}])
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["code"] == "engine_refused" and error["engine_status"] == 404 and "'tiny'" in error["message"]
    assert "out of memory while decoding" in str(broke.value.body)
    assert broke_whole.value.status_code == 502 and "out of memory" in str(broke_whole.value.body)
    assert [s.ended for s in backend.finished] == ["complete", "upstream_error", "upstream_error"]


# ---------------------------------------------------------------------------------------------
# Under the real daemon: restarts hold translated requests, the watchdog sees translated streams


@pytest.mark.slow
def test_daemon_holds_a_translated_request_through_a_restart_and_a_stalled_stream_marks_hung(
    daemon_factory, tiny_model: Path
) -> None:
    """A Messages request is held through a restart, bad input is a 400, a stalled translated stream is `hung`."""
    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, default=True, canary_interval="10m")
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = 60\ndecode_stall_s = 2\n'
    cfg += '[policies.restart]\nhang_restart_after = "10m"\n'
    d = daemon_factory(cfg).start()
    first = d.wait_state("tiny", "ready", 90)
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw}", api_key="unused", max_retries=0, timeout=90)
    try:
        assert d.llmctl("restart", "tiny", "--force", "--no-wait").returncode == 0
        message = client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text and message.usage.output_tokens == 4
        pid = d.engine("tiny")["pid"]
        assert pid != first["pid"]
        # bad input to the real daemon: 400s in Anthropic's shape, and it goes on serving
        bad = httpx.post(f"http://127.0.0.1:{gw}/v1/messages", content=b'{"model": "tiny", "max_tokens": 5,',
                         headers={"content-type": "application/json"}, timeout=30)
        many = httpx.post(f"http://127.0.0.1:{gw}/v1/messages", timeout=30, json={
            "model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER_TOOL] * 10_000})
        assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_request_error")
        assert many.status_code == 400 and many.json()["error"]["field"] == "tools"

        seen = 0
        with pytest.raises(anthropic.APIStatusError) as info:
            with client.messages.stream(model="tiny", max_tokens=4000,
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
                for event in stream:
                    if event.type == "content_block_delta":
                        seen += 1
                        if seen == 3:
                            os.kill(pid, signal.SIGSTOP)
        hung = d.wait_state("tiny", "hung", 15)
    finally:
        client.close()
        try:
            os.kill(d.engine("tiny")["pid"], signal.SIGCONT)
        except (ProcessLookupError, TypeError):
            pass
    # "during decode": the gateway's meter saw the engine's tokens on the translated stream, then none
    assert "stalled" in str(info.value.body) and "during decode" in str(info.value.body)
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert hung["pid"] == pid


@pytest.fixture
def quiet_engine() -> Iterator[str]:
    """The OpenAI stand-in engine, silent for 1.5 s before its first token (no keep-alives)."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "standins" / "openai_engine.py"), "--port", str(port),
                             "--first-token-delay-s", "1.5"], start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.anyio
async def test_pings_keep_a_quiet_prefill_alive_and_are_not_progress(
    quiet_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an engine sends nothing before its first token, the client gets pings; the watchdog sees no token."""
    from supervisord_llm.gateway import proxy as gateway

    monkeypatch.setattr(gateway, "TRANSLATED_PING_INTERVAL_S", 0.25)
    backend = Backend({"quiet": Upstream("quiet", quiet_engine, "command", supports_messages=False)}, "quiet")
    async with running_gateway(backend) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"model": "quiet", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with client.stream("POST", "/v1/messages", json=body) as response:
            kinds = [line[7:] async for line in response.aiter_lines() if line.startswith("event: ")]
    first_block = kinds.index("content_block_start")
    assert kinds[0] == "message_start" and kinds[1:first_block].count("ping") >= 4
    assert kinds[-1] == "message_stop"
    stats = backend.finished[0]
    assert stats.tokens == 3 and stats.ttft_s is not None and stats.ttft_s >= 1.4  # pings were not tokens


@pytest.mark.anyio
async def test_think_tags_auto_gives_thinking_blocks_only_to_requests_that_enable_thinking(tool_engine: str) -> None:
    """With think_tags = "auto", reasoning becomes a thinking block when the request enables thinking, else text."""
    backend = backend_for(mlxtools=tool_engine)
    ask = {"model": "mlxtools", "max_tokens": 50, "messages": [{"role": "user", "content": "THINK FIRST"}]}
    async with running_gateway(backend, GatewaySettings(think_tags="auto")) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        thinking = await client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 1024})
        async with client.messages.stream(**ask) as stream:
            plain = await stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in thinking.content] == [
        ("thinking", "plan more"), ("text", "answer")]
    assert [(b.type, b.text) for b in plain.content] == [("text", "<think>plan more</think>answer")]


@pytest.fixture(scope="module")
def native_engines() -> Iterator[tuple[str, str]]:
    """Two Anthropic-native stand-ins: one with count_tokens, one whose Messages API lacks it (404)."""
    procs, urls = [], []
    for extra in (["--count-tokens"], []):
        port = free_port()
        procs.append(subprocess.Popen([PYTHON, str(REPO / "tests" / "standins" / "anthropic_engine.py"),
                                       "--port", str(port), *extra], start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            wait_http(url + "/health", timeout_s=20)
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@pytest.mark.anyio
async def test_count_tokens_on_native_engines_uses_theirs_or_falls_back_saying_so(
    native_engines: tuple[str, str],
) -> None:
    """A native engine's own count_tokens answers; one without the endpoint gets the flagged estimate."""
    with_count, without = native_engines
    backend = Backend({
        "counts": Upstream("counts", with_count, "llama_cpp", supports_messages=True),
        "nocount": Upstream("nocount", without, "ollama", supports_messages=True),
    }, "counts")
    messages = [{"role": "user", "content": "one two three"}]
    async with running_gateway(backend) as url:
        client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
        own = await client.messages.with_raw_response.count_tokens(model="counts", messages=messages)
        estimated = await client.messages.with_raw_response.count_tokens(model="nocount", messages=messages)
    assert (await own.parse()).input_tokens == 3 and own.headers[TOKEN_COUNT_HEADER] == "engine"
    assert (await estimated.parse()).input_tokens >= 1
    assert estimated.headers[TOKEN_COUNT_HEADER].startswith("estimate")
