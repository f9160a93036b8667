"""A non-streamed OpenAI answer rebuilt from the engine's stream (``policies.frontdoor.fetch_as_stream``).

Room: gateway.

The gateway sends a plain non-streamed ``/v1/chat/completions`` or ``/v1/completions`` request to an engine
without a step counter as a stream (``"stream": true``, ``"stream_options": {"include_usage": true}``), so
the watchdog sees its tokens as they come; the client gets the one answer it asked for, rebuilt here from the
chunks (OpenAI's chat completion chunk and completion stream formats, as mlx_lm.server, llama-server, Ollama
and oMLX send them):

- the top-level fields of the chunks (``id``, ``created``, ``model``, ``system_fingerprint``, an engine's own
  such as llama-server's ``timings``) are kept, the last value winning; ``object`` becomes
  ``chat.completion`` (a text completion's stays ``text_completion``); ``usage`` is the final usage chunk's;
- per choice (by ``index``): the delta's text fields (``content``, ``reasoning``, ``reasoning_content``,
  ``refusal``) are joined in order; ``role`` is kept; tool calls are merged by their ``index`` (a call
  without one is a call of its own; mlx_lm.server sends each call whole, with an ``index`` when streaming),
  their ``arguments`` joined, and
  given back without ``index`` as a non-streamed answer has them; the last ``finish_reason`` wins; a chat
  message always has ``content`` (None when there was no text), as the schema wants; ``"logprobs": null``
  is kept where the chunks carry it (requests asking for log probabilities are never fetched so);
- a chunk carrying ``error`` is the engine's error, reported instead of an answer.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["StreamReassembly", "stream_request_body"]

_MAX_PARTIAL_LINE_BYTES = 16 * 2**20  # a data line longer than this is not one an engine sends
_CHUNK_ONLY_FIELDS = frozenset({"choices", "object", "usage"})


def stream_request_body(doc: dict[str, Any]) -> bytes:
    """The request as sent to the engine: streamed, with the usage chunk a non-streamed answer carries."""
    options = doc.get("stream_options")
    streamed = {**doc, "stream": True,
                "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    return json.dumps(streamed).encode()


class _Choice:
    __slots__ = ("index", "role", "texts", "tool_calls", "finish_reason", "other", "logprobs_null")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: Any = None
        self.other: dict[str, Any] = {}
        self.logprobs_null = False  # the chunks said "logprobs": null, as the engine's whole answer would

    def add_delta(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                if isinstance(value, str):
                    self.role = value
            elif key == "tool_calls":
                if isinstance(value, list):
                    for call in value:
                        if isinstance(call, dict):
                            self._add_call(call)
            elif isinstance(value, str):
                self.texts.setdefault(key, []).append(value)
            elif value is not None:
                self.other[key] = value

    def _add_call(self, part: dict[str, Any]) -> None:
        index = part.get("index")
        call = None
        if isinstance(index, int):
            call = next((c for c in self.tool_calls if c.get("_index") == index), None)
        if call is None:
            call = {"_index": index if isinstance(index, int) else None}
            self.tool_calls.append(call)
        for key, value in part.items():
            if key == "index":
                continue
            if key == "function" and isinstance(value, dict):
                function = call.setdefault("function", {})
                for name, piece in value.items():
                    if name == "arguments" and isinstance(piece, str):
                        function["arguments"] = function.get("arguments", "") + piece
                    elif piece is not None and (name not in function or not function[name]):
                        function[name] = piece
            elif value is not None:
                call[key] = value

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant"}
        content = self.texts.get("content")
        message["content"] = "".join(content) if content else None
        for key, parts in self.texts.items():
            if key != "content":
                message[key] = "".join(parts)
        message.update(self.other)
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                out = {k: v for k, v in call.items() if k != "_index"}
                out.setdefault("type", "function")
                calls.append(out)
            message["tool_calls"] = calls
        return message


class StreamReassembly:
    """Feed it the engine's SSE bytes as they come (``feed``); ``answer()`` is the non-streamed body."""

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.error: Any = None
        self.top: dict[str, Any] = {}
        self.usage: Any = None
        self.choices: dict[int, _Choice] = {}
        self.chunks = 0
        self.done = False  # the engine's "data: [DONE]" came
        self._partial = b""

    def feed(self, data: bytes) -> None:
        buf = self._partial + data if self._partial else data
        lines = buf.split(b"\n")
        rest = lines.pop()
        self._partial = rest if len(rest) <= _MAX_PARTIAL_LINE_BYTES else b""
        for line in lines:
            if line.startswith(b"data:"):
                self._data(line[5:].strip())

    def _data(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        if doc.get("error") is not None:
            self.error = doc["error"]
            return
        self.chunks += 1
        for key, value in doc.items():
            if key not in _CHUNK_ONLY_FIELDS:
                self.top[key] = value
        if doc.get("usage") is not None:
            self.usage = doc["usage"]
        choices = doc.get("choices")
        if not isinstance(choices, list):
            return
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = self.choices.get(index if isinstance(index, int) else 0)
            if choice is None:
                choice = self.choices[index if isinstance(index, int) else 0] = _Choice(
                    index if isinstance(index, int) else 0)
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
            if "logprobs" in raw and raw["logprobs"] is None:
                choice.logprobs_null = True
            if self.chat:
                delta = raw.get("delta")
                if isinstance(delta, dict):
                    choice.add_delta(delta)
            else:
                text = raw.get("text")
                if isinstance(text, str):
                    choice.texts.setdefault("text", []).append(text)

    def complete(self) -> bool:
        """The engine ended its answer (``[DONE]``, or a finish reason for every choice), not just its connection:
        mlx_lm.server speaks HTTP/1.0, so a stream it broke off (an exception, a Metal OOM, a kill) ends like one
        it finished, and only its content tells them apart."""
        if self.done:
            return True
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())

    def answer(self) -> dict[str, Any]:
        """The non-streamed answer the stream makes."""
        body: dict[str, Any] = dict(self.top)
        body["object"] = "chat.completion" if self.chat else "text_completion"
        choices = []
        for index in sorted(self.choices) or [0]:
            choice = self.choices.get(index) or _Choice(index)
            out: dict[str, Any] = {"index": index}
            if self.chat:
                out["message"] = choice.message()
            else:
                out["text"] = "".join(choice.texts.get("text", []))
            if choice.logprobs_null:
                out["logprobs"] = None
            out["finish_reason"] = choice.finish_reason
            choices.append(out)
        body["choices"] = choices
        if self.usage is not None:
            body["usage"] = self.usage
        return body
