"""Translation tables: Messages requests → chat completions, engine chunks → Messages events.

Every produced shape is checked with the SDKs' own types (``anthropic.types``, ``openai.types``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from supervisord_llm.gateway.anthropic import (
    MAX_TOOLS,
    Accumulator,
    EngineStreamError,
    RequestInvalid,
    StreamTranslator,
    check_request,
    estimate_tokens,
    events_bytes,
    to_openai,
)

EVENTS = TypeAdapter(RawMessageStreamEvent)
BASE: dict[str, Any] = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def openai_body(**fields: Any) -> dict[str, Any]:
    return to_openai(check_request({**BASE, **fields}), "default_model")


# ---------------------------------------------------------------------------------------------
# Request: each field


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"model": "default_model", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "hi"}]}),
        ({"system": "Be brief."}, {"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "hi"}]}),
        ({"system": [{"type": "text", "text": "A."}, {"type": "text", "text": "B.",
                                                       "cache_control": {"type": "ephemeral"}}]},
         {"messages": [{"role": "system", "content": "A.B."}, {"role": "user", "content": "hi"}]}),
        ({"temperature": 0.2, "top_p": 0.9, "top_k": 40}, {"temperature": 0.2, "top_p": 0.9, "top_k": 40}),
        ({"metadata": {"user_id": "u-1"}}, {"user": "u-1"}),
        ({"tool_choice": {"type": "auto"}, "tools": [{"name": "t", "input_schema": {"type": "object"}}]},
         {"tool_choice": "auto", "tools": [{"type": "function", "function": {
             "name": "t", "description": "", "parameters": {"type": "object"}}}]}),
        ({"tool_choice": {"type": "any"}, "tools": [{"name": "t", "input_schema": {}}]}, {"tool_choice": "required"}),
        ({"tool_choice": {"type": "none"}, "tools": [{"name": "t", "input_schema": {}}]}, {"tool_choice": "none"}),
        ({"tool_choice": {"type": "tool", "name": "t", "disable_parallel_tool_use": True},
          "tools": [{"name": "t", "input_schema": {}}]},
         {"tool_choice": {"type": "function", "function": {"name": "t"}}, "parallel_tool_calls": False}),
        ({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Zürich"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "sun"}]},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "boom", "is_error": True},
                {"type": "text", "text": "thanks"}]}]},
         {"messages": [
             {"role": "user", "content": "weather?"},
             {"role": "assistant", "content": "Let me check.", "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Zürich"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
             {"role": "tool", "tool_call_id": "call_2", "content": "Error: boom"},
             {"role": "user", "content": "thanks"}]}),
        ({"messages": [{"role": "user", "content": "go"},
                       {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "w", "input": {}}]}]},
         {"messages": [{"role": "user", "content": "go"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}]}),
        ({"stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 1024}}, {}),
    ],
)
def test_request_fields_translate_to_chat_completions(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each Messages request field becomes its chat completions counterpart (stop sequences stay in the gateway)."""
    body = openai_body(**fields)
    for key, value in expected.items():
        assert body[key] == value, key
    assert "stop" not in body and "thinking" not in body and "metadata" not in body


@pytest.mark.parametrize(
    ("fields", "field", "hint"),
    [
        ({"max_tokens": None}, "max_tokens", "whole number"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": True}, "max_tokens", "got boolean"),
        ({"messages": "hi"}, "messages", "array"),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", '"user" or "assistant"'),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]}, "messages[0].content[0].type",
         "tool_result"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                      "is_error": "yes"}]}]},
         "messages[0].content[0].is_error", "true or false"),
        ({"system": 5}, "system", "string or an array"),
        ({"temperature": "hot"}, "temperature", "number"),
        ({"top_p": 2}, "top_p", "from 0 to 1"),
        ({"top_k": -1}, "top_k", ">= 0"),
        ({"stop_sequences": "END"}, "stop_sequences", "array of strings"),
        ({"stop_sequences": [""]}, "stop_sequences[0]", "non-empty"),
        ({"tools": [{"name": "t"}]}, "tools[0].input_schema", "JSON schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "server tool"),
        ({"tools": [{"name": "t", "input_schema": {}}] * (MAX_TOOLS + 1)}, "tools", f"at most {MAX_TOOLS}"),
        ({"tool_choice": {"type": "maybe"}}, "tool_choice.type", '"auto", "any", "tool" or "none"'),
        ({"tool_choice": {"type": "tool", "name": "x"}, "tools": [{"name": "t", "input_schema": {}}]},
         "tool_choice.name", "not among the tools: t"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id", "string"),
        ({"thinking": {"type": "maybe"}}, "thinking.type", "enabled"),
        ({"stream": "yes"}, "stream", "true or false"),
        ({"metadata": {"deep": json.loads("[" * 70 + "]" * 70)}}, "metadata.deep" + "[0]" * 63, "nested deeper"),
    ],
)
def test_bad_requests_name_the_field_and_what_is_valid(fields: dict[str, Any], field: str, hint: str) -> None:
    """A wrong field is refused with its JSON path and what would be valid."""
    doc = {**BASE, **fields}
    if fields.get("max_tokens", 1) is None:
        doc.pop("max_tokens")
    with pytest.raises(RequestInvalid) as info:
        check_request(doc)
    assert info.value.field == field
    assert hint in str(info.value)


def test_images_are_refused_naming_the_block() -> None:
    """An image for an engine reached through the translation is refused, naming where it was."""
    doc = {**BASE, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"},
        {"type": "tool_result", "tool_use_id": "a", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]}]}
    with pytest.raises(RequestInvalid) as info:
        to_openai(check_request(doc), None, engine="tiny")
    assert info.value.field == "messages[0].content[1].content[0]" and "'tiny'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Response: engine chunks → events


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "default_model",
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        doc["usage"] = usage
    ChatCompletionChunk.model_validate(doc)  # what we feed is what engines send
    return f"data: {json.dumps(doc)}\n\n".encode()


USAGE = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35, "prompt_tokens_details": {"cached_tokens": 10}}


def run(translator: StreamTranslator, stream: bytes, split: int | None = None) -> list[dict[str, Any]]:
    """Feed the bytes (in pieces of ``split`` bytes when given) and finish; every event SDK-validated."""
    events = translator.start()
    pieces = [stream[i:i + split] for i in range(0, len(stream), split)] if split else [stream]
    for piece in pieces:
        events += translator.feed(piece)
        if translator.done:
            break
    events += translator.finish()
    for event in events:
        if event["type"] != "ping":
            EVENTS.validate_python(event)
    return events


def folded(events: list[dict[str, Any]]) -> Message:
    acc = Accumulator()
    acc.apply(events)
    return Message.model_validate(acc.message)


@pytest.mark.parametrize("split", [None, 1, 7])
def test_text_stream_becomes_message_events_in_order(split: int | None) -> None:
    """Text chunks become start/ping/block start/deltas/stop/message_delta/stop, however the bytes split."""
    stream = (b": keepalive 1/2\n\n" + chunk({"role": "assistant", "content": "Hel"}) + chunk({"content": "lo"})
              + chunk({}, "stop") + chunk(None, usage=USAGE) + b"data: [DONE]\n\n")
    events = run(StreamTranslator(model="tiny", message_id="msg_1"), stream, split)
    kinds = [e["type"] for e in events]
    assert kinds == ["message_start", "ping", "ping", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2]["usage"] == {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 10}
    message = folded(events)
    assert message.content[0].text == "Hello" and message.id == "msg_1" and message.model == "tiny"


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"),
                                                 ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_finish_reasons_map_to_stop_reasons(finish: str, reason: str) -> None:
    """Each OpenAI finish_reason maps to its Anthropic stop_reason."""
    events = run(StreamTranslator(model="m"), chunk({"content": "x"}) + chunk({}, finish) + b"data: [DONE]\n\n")
    assert folded(events).stop_reason == reason


@pytest.mark.parametrize("split", [None, 1, 3])
def test_stop_sequence_spanning_chunks_ends_the_message_and_is_not_shown(split: int | None) -> None:
    """A stop sequence split across engine chunks is found, cut from the text, and reported."""
    stream = b"".join(chunk({"content": c}) for c in ["The ans", "wer is ", "4", "2 EN", "D and more"])
    translator = StreamTranslator(model="m", stop_sequences=("NOPE", "2 END"))
    events = run(translator, stream + chunk({}, "stop"), split)
    message = folded(events)
    assert translator.done
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "2 END")
    assert message.content[0].text == "The answer is 4"
    assert message.usage.output_tokens == 5  # chunks the engine produced before the gateway stopped it


def test_held_back_text_that_was_not_a_stop_sequence_is_released() -> None:
    """Text held back as a possible stop sequence start is sent once it proves not to be one."""
    events = run(StreamTranslator(model="m", stop_sequences=("ENDX",)),
                 chunk({"content": "a EN"}) + chunk({"content": "D"}) + chunk({}, "stop"))
    assert folded(events).content[0].text == "a END"


def test_tool_call_in_many_fragments_streams_input_json_deltas_with_a_stable_id() -> None:
    """Arguments in many fragments become input_json_delta events of one tool_use block keeping the engine's id."""
    arguments = json.dumps({"path": "/tmp/a b", "lines": [1, 2, 3], "note": "ünïcode"})
    fragments = [arguments[i:i + 3] for i in range(0, len(arguments), 3)]
    stream = chunk({"role": "assistant", "content": "Reading."})
    stream += chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                                     "function": {"name": "read", "arguments": ""}}]})
    stream += b"".join(chunk({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments)
    stream += chunk({"tool_calls": [{"index": 1, "id": "call_def", "type": "function",
                                     "function": {"name": "list", "arguments": "{}"}}]})
    stream += chunk({}, "tool_calls") + chunk(None, usage=USAGE)
    events = run(StreamTranslator(model="m"), stream, split=5)
    deltas = [e["delta"]["partial_json"] for e in events
              if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert deltas == [*fragments, "{}"]
    message = folded(events)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert (message.content[1].id, message.content[1].name) == ("call_abc", "read")
    assert message.content[1].input == json.loads(arguments)
    assert (message.content[2].id, message.content[2].input) == ("call_def", {})
    assert message.stop_reason == "tool_use"


def test_mlx_tool_call_format_whole_call_in_one_chunk() -> None:
    """mlx_lm.server's format (whole call in one chunk, then finish "tool_calls") is one tool_use block."""
    call = {"function": {"name": "w", "arguments": '{"city": "Paris"}'}, "type": "function",
            "id": "0b4f-uuid", "index": 0}
    events = run(StreamTranslator(model="m"), chunk({"role": "assistant", "tool_calls": [call]})
                 + chunk({"role": "assistant"}, "tool_calls"))
    message = folded(events)
    assert message.content[0].input == {"city": "Paris"} and message.content[0].id == "0b4f-uuid"


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        ("text", [("text", "<think>plan</think>Answer")]),
        ("thinking", [("thinking", "plan"), ("text", "Answer")]),
    ],
)
def test_think_tags_are_kept_as_text_or_become_thinking_blocks(think: str, expected: list[tuple[str, str]]) -> None:
    """<think>…</think> in the content is kept as emitted, or made a thinking block when configured."""
    stream = b"".join(chunk({"content": c}) for c in ["<thi", "nk>pl", "an</th", "ink>Ans", "wer"]) + chunk({}, "stop")
    message = folded(run(StreamTranslator(model="m", think=think), stream, split=4))
    assert [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None)) for b in message.content] == expected


@pytest.mark.parametrize(
    ("think", "expected"),
    [("text", [("text", "<think>plan</think>Answer")]), ("thinking", [("thinking", "plan"), ("text", "Answer")])],
)
def test_engine_reasoning_field_is_kept_as_text_or_becomes_thinking(think: str, expected: list[tuple[str, str]]) -> None:
    """Reasoning the engine split out (mlx_lm "reasoning", vLLM "reasoning_content") follows the same setting."""
    stream = (chunk({"reasoning": "pl"}) + chunk({"reasoning_content": "an"}) + chunk({"content": "Answer"})
              + chunk({}, "stop"))
    message = folded(run(StreamTranslator(model="m", think=think), stream))
    assert [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None)) for b in message.content] == expected


def test_engine_error_in_the_stream_is_raised() -> None:
    """An error object inside the engine's stream is reported, not swallowed."""
    translator = StreamTranslator(model="m")
    translator.start()
    with pytest.raises(EngineStreamError, match="out of memory"):
        translator.feed(b'data: {"error": {"message": "out of memory"}}\n\n')


def test_usage_without_engine_counts_falls_back_to_chunks_seen() -> None:
    """With no usage chunk from the engine, output_tokens counts the content chunks it sent."""
    events = run(StreamTranslator(model="m"), chunk({"content": "a"}) + chunk({"content": "b"}) + chunk({}, "length"))
    assert folded(events).usage.output_tokens == 2


def test_events_serialise_as_named_sse_events() -> None:
    """Each event goes out as 'event: TYPE' plus one data line of JSON."""
    data = events_bytes([{"type": "ping"}, {"type": "message_stop"}])
    assert data == b'event: ping\ndata: {"type":"ping"}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'


def test_estimate_counts_system_messages_and_tools() -> None:
    """The estimate grows with system, messages and tools (about 4 bytes per token)."""
    small = estimate_tokens(BASE)
    big = estimate_tokens({**BASE, "system": "x" * 400, "tools": [{"name": "t", "input_schema": {"a": "b" * 400}}]})
    assert small >= 1 and big >= small + 200


def test_think_tags_setting_is_validated_naming_file_key_and_values() -> None:
    """[gateway] think_tags accepts text/thinking/auto; anything else names the file, key and valid values."""
    from supervisord_llm.errors import ConfigError
    from supervisord_llm.gateway.proxy import GatewaySettings

    assert GatewaySettings.from_toml({"think_tags": "auto"}, file="/etc/llm.toml").think_tags == "auto"
    assert GatewaySettings.from_toml({}, file=None).think_tags == "text"
    with pytest.raises(ConfigError) as info:
        GatewaySettings.from_toml({"think_tags": "blocks"}, file="/etc/llm.toml")
    assert info.value.file == "/etc/llm.toml" and info.value.key == "gateway.think_tags"
    assert "'text', 'thinking', 'auto'" in str(info.value) and "'blocks'" in str(info.value)


def test_images_become_image_url_parts_for_an_engine_that_can_see() -> None:
    """With vision on, base64 and URL images become OpenAI image_url parts in order with the text."""
    doc = {**BASE, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.org/b.jpg"}}]}]}
    body = to_openai(check_request(doc), None, images=True)
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://example.org/b.jpg"}}]}]
    bad = {**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}
    with pytest.raises(RequestInvalid) as info:
        to_openai(check_request(bad), None, images=True)
    assert info.value.field == "messages[0].content[0].source" and "base64" in str(info.value)


def test_vision_key_is_validated_and_defaults_off() -> None:
    """[[engine]] vision must be true or false; it defaults to false (text-only)."""
    from supervisord_llm.config import parse_config
    from supervisord_llm.errors import ConfigError

    engine = {"name": "e", "kind": "mlx_lm", "model": "/m", "port": 9001, "footprint": "1GB"}
    assert parse_config({"engine": [engine]}, "/etc/llm.toml").engines[0].vision is False
    assert parse_config({"engine": [{**engine, "vision": True}]}, "/etc/llm.toml").engines[0].vision is True
    with pytest.raises(ConfigError) as info:
        parse_config({"engine": [{**engine, "vision": "yes"}]}, "/etc/llm.toml")
    assert info.value.file == "/etc/llm.toml" and "vision" in str(info.value.key) and "true or false" in str(info.value)


def test_mlx_chunk_with_a_finished_call_and_the_text_after_it_keeps_their_order() -> None:
    """mlx_lm.server's chunk carrying a finished call plus the text written after it: tool_use, then text."""
    call = {"function": {"name": "w", "arguments": "{}"}, "type": "function", "id": "u1", "index": 0}
    events = run(StreamTranslator(model="m"), chunk({"content": "Let me look."})
                 + chunk({"role": "assistant", "content": " Done.", "tool_calls": [call]}) + chunk({}, "tool_calls"))
    message = folded(events)
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", "Let me look."), ("tool_use", None), ("text", " Done.")]
    assert message.stop_reason == "tool_use"


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="ab <>/thinkEND\n\"\\é", min_size=1, max_size=6), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    think=st.sampled_from(["text", "thinking"]),
)
def test_how_engine_bytes_are_split_never_changes_the_message(pieces: list[str], cuts: list[int], think: str) -> None:
    """However the engine's bytes are split into reads, the client gets the same message (stop sequences too)."""
    stream = b"".join(chunk({"content": p}) for p in pieces) + chunk({}, "stop") + b"data: [DONE]\n\n"

    def message_for(reads: list[bytes]) -> dict[str, Any]:
        translator = StreamTranslator(model="m", stop_sequences=("END",), think=think, message_id="msg_x")
        events = translator.start()
        for read in reads:
            events += translator.feed(read)
            if translator.done:
                break
        events += translator.finish()
        return folded(events).model_dump()

    reads, at = [], 0
    for cut in cuts:
        reads.append(stream[at:at + cut])
        at += cut
    reads.append(stream[at:])
    assert message_for(reads) == message_for([stream])
