"""A non-streamed answer rebuilt from an engine's stream (gateway/reassemble.py), and when it is done
(policies.frontdoor.fetch_as_stream).

The streams are in the shapes the engines send: mlx_lm.server (mlx_lm/server.py ``generate_response``: each
tool call whole, without ``index``, a ``reasoning`` field, a last chunk with ``choices: []`` and the usage),
llama-server and OpenAI (tool calls in pieces by ``index``, ``reasoning_content``, its ``timings``).
tests/integration/test_non_streamed_watch.py compares rebuilt answers with the real engines' own.
"""

from __future__ import annotations

import json

import pytest

from policies.frontdoor import fetch_as_stream
from supervisord_llm.gateway.reassemble import StreamReassembly, stream_request_body


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def rebuilt(data: bytes, *, chat: bool = True, piece: int = 0) -> dict:
    """The answer, the stream fed whole or in pieces of ``piece`` bytes (split anywhere, mid-line too)."""
    r = StreamReassembly(chat=chat)
    if piece:
        for i in range(0, len(data), piece):
            r.feed(data[i:i + piece])
    else:
        r.feed(data)
    assert r.error is None
    return r.answer()


MLX_TOOL_STREAM = sse(
    {"id": "chatcmpl-1", "system_fingerprint": "fp", "object": "chat.completion.chunk", "model": "m", "created": 7,
     "choices": [{"index": 0, "finish_reason": None, "delta": {"role": "assistant", "reasoning": "Need the "}}]},
    {"id": "chatcmpl-1", "system_fingerprint": "fp", "object": "chat.completion.chunk", "model": "m", "created": 7,
     "choices": [{"index": 0, "finish_reason": None, "delta": {"role": "assistant", "reasoning": "weather."}}]},
    {"id": "chatcmpl-1", "system_fingerprint": "fp", "object": "chat.completion.chunk", "model": "m", "created": 7,
     "choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {"role": "assistant", "tool_calls": [
         {"function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}, "type": "function", "id": "c1",
          "index": 0},
         {"function": {"name": "get_time", "arguments": "{}"}, "type": "function", "id": "c2", "index": 1}]}}]},
    {"id": "chatcmpl-1", "system_fingerprint": "fp", "object": "chat.completion", "model": "m", "created": 7,
     "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 14, "total_tokens": 23}},
)


@pytest.mark.parametrize("piece", [0, 1, 7, 64])
def test_mlx_tool_calls_and_reasoning_come_back_as_one_message(piece: int) -> None:
    answer = rebuilt(MLX_TOOL_STREAM, piece=piece)
    assert answer == {
        "id": "chatcmpl-1", "system_fingerprint": "fp", "object": "chat.completion", "model": "m", "created": 7,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "reasoning": "Need the weather.",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}, "type": "function",
                 "id": "c1"},
                {"function": {"name": "get_time", "arguments": "{}"}, "type": "function", "id": "c2"}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 14, "total_tokens": 23}}


def test_tool_call_pieces_are_joined_by_index_as_openai_and_llama_server_send_them() -> None:
    stream = sse(
        {"id": "a", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant",
         "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "search", "arguments": ""}}]}}]},
        {"id": "a", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"q\": "}}]}}]},
        {"id": "a", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "\"cats\"}"}}]}}]},
        {"id": "a", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},
                                                                    "finish_reason": "tool_calls"}],
         "timings": {"predicted_n": 9}},
    )
    answer = rebuilt(stream)
    message = answer["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"cats\"}"}}]}
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["timings"] == {"predicted_n": 9}  # an engine's own top-level field is kept
    assert "usage" not in answer  # none was sent: none is made up


def test_text_is_joined_in_order_and_a_text_completion_keeps_its_object() -> None:
    chat = rebuilt(sse(*({"id": "x", "choices": [{"index": 0, "delta": {"content": w}}]} for w in ("Hel", "lo", "!")),
                       {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                "finish_reason": "stop"}]
    assert chat["object"] == "chat.completion"
    text = rebuilt(sse({"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": "Once"}]},
                       {"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": " upon",
                                                                             "finish_reason": "length"}]}),
                   chat=False)
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 0, "text": "Once upon", "finish_reason": "length"}]


def test_comments_and_keepalives_are_not_part_of_the_answer() -> None:
    data = b": keepalive 10/200\n\n" + sse({"id": "x", "choices": [{"index": 0, "delta": {"content": "ok"}}]})
    assert rebuilt(data)["choices"][0]["message"]["content"] == "ok"


def test_an_error_chunk_is_the_engines_error() -> None:
    r = StreamReassembly(chat=True)
    r.feed(sse({"id": "x", "choices": [{"index": 0, "delta": {"content": "pa"}}]},
               {"error": {"message": "CUDA error: out of memory", "type": "server_error"}}))
    assert r.error == {"message": "CUDA error: out of memory", "type": "server_error"}


def test_the_request_is_sent_streamed_with_usage_and_keeps_everything_else() -> None:
    body = json.loads(stream_request_body({"model": "m", "messages": [], "temperature": 0,
                                           "stream_options": {"other": 1}}))
    assert body == {"model": "m", "messages": [], "temperature": 0, "stream": True,
                    "stream_options": {"other": 1, "include_usage": True}}


@pytest.mark.parametrize(("path", "doc", "steps_watched", "enabled", "expected"), [
    ("/v1/chat/completions", {"model": "m"}, False, True, True),
    ("/v1/completions", {"model": "m", "stream": False}, False, True, True),
    ("/v1/chat/completions", {"model": "m", "stream": True}, False, True, False),  # already a stream
    ("/v1/chat/completions", {"model": "m"}, True, True, False),  # vLLM/SGLang: their step counters watch it
    ("/v1/chat/completions", {"model": "m"}, False, False, False),  # watch_non_streamed = false
    ("/v1/embeddings", {"model": "m"}, False, True, False),
    ("/api/chat", {"model": "m", "stream": False}, False, True, False),  # Ollama's own API: its own shape
    ("/v1/chat/completions", {"model": "m", "n": 2}, False, True, False),
    ("/v1/chat/completions", {"model": "m", "logprobs": True}, False, True, False),
    ("/v1/chat/completions", {"model": "m", "top_logprobs": 3}, False, True, False),
    ("/v1/completions", {"model": "m", "echo": True}, False, True, False),
    ("/v1/chat/completions", {"model": "m", "n": 1, "logprobs": False}, False, True, True),
])
def test_which_non_streamed_requests_are_fetched_as_streams(path: str, doc: dict, steps_watched: bool,
                                                            enabled: bool, expected: bool) -> None:
    assert fetch_as_stream(path, doc, steps_watched=steps_watched, enabled=enabled) is expected
