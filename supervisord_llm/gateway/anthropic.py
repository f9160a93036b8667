"""The Anthropic Messages API, translated to and from the OpenAI chat completions API.

For engines that serve only the OpenAI API (mlx_lm.server, most ``command`` engines) the gateway
turns a ``POST /v1/messages`` into a streaming ``POST /v1/chat/completions`` and the engine's
stream back into Messages events (or one Message when the client did not ask for a stream).
Everything here is pure: no I/O, no clock, no logging, so each direction is table-tested.

    check_envelope(doc, count=False)            the Messages API's own rules, for any engine (before routing)
    check_request(doc) -> MessagesRequest       400-worthy problems raise RequestInvalid(field, ...)
    to_openai(request, served_model) -> dict     the chat completions body (always streamed)
    StreamTranslator.feed(engine bytes) -> bytes Anthropic SSE events for the client
    Accumulator.apply(event) / .message          the same events folded into one Message

Why the engine is always asked to stream, even for a non-streaming client: the gateway's token
watchdog then sees the engine's progress on every translated request, and ``stop_sequences`` can
be matched here (mlx_lm.server strips a matched stop word and reports ``finish_reason: "stop"``
exactly as for end of turn, so the engine cannot tell us which one happened; see
mlx_lm/server.py ``handle_completion`` and ``make_text_state_machine`` in mlx-lm 0.32). When a
stop sequence matches, the translator says ``done`` and the gateway closes the engine's stream,
which stops the generation (mlx_lm.server stops when its write to a closed socket fails).

The request is checked explicitly, field by field, rather than by validating against the SDK's
``MessageCreateParams`` TypedDicts: those declare ``Iterable[...]`` fields, which pydantic checks
lazily and reports without the path (``messages[3].content[1]`` becomes ``0``), so an error could
not name the field. The SDK's own models (``anthropic.types.Message``, ``RawMessageStreamEvent``,
``openai.types.chat.ChatCompletionChunk``) check every shape this module produces in the tests.

Why not litellm, which has an Anthropic→OpenAI adapter: it makes the engine call itself (so the
gateway's meter would no longer read the engine's bytes as they arrive, which the watchdog's
evidence rule needs), and version 1.110 is a 44 MB wheel (133 MB, 4,192 files installed) pulling
boto3, aiohttp, tokenizers, huggingface-hub, tiktoken and more into a daemon that must stay small.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_NESTING_DEPTH",
    "MAX_TOOLS",
    "THINK_MODES",
    "Accumulator",
    "MessagesRequest",
    "RequestInvalid",
    "StreamTranslator",
    "check_envelope",
    "check_request",
    "estimate_tokens",
    "EngineStreamError",
    "count_text",
    "error_event",
    "events_bytes",
    "nesting_depth_exceeded",
    "openai_error_message",
    "sse",
    "to_openai",
]

MAX_TOOLS = 1024  # a local model's context cannot hold more tool definitions than this anyway
MAX_NESTING_DEPTH = 64  # JSON nesting of the request body (tool schemas and inputs are far shallower)
MAX_STOP_SEQUENCES = 64
THINK_MODES = ("text", "thinking", "auto")

# OpenAI finish_reason → Anthropic stop_reason. "tool_calls" is what mlx_lm.server reports when a
# generation ended after a tool call (server.py: `if finish_reason == "stop" and made_tool_call`).
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


class RequestInvalid(ValueError):
    """A Messages request the gateway cannot serve; ``field`` is its JSON path (``messages[2].role``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class MessagesRequest:
    """A checked Messages request: the original document and what the translation needs from it."""

    doc: dict[str, Any]
    model: str | None
    max_tokens: int
    stream: bool
    stop_sequences: tuple[str, ...]
    thinking_requested: bool


# --------------------------------------------------------------------------------------------
# Checking a request


def nesting_depth_exceeded(doc: Any, limit: int = MAX_NESTING_DEPTH) -> str | None:
    """The JSON path of the first place nested deeper than ``limit``, or None. Iterative: no recursion."""
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > limit:
            return path or "(body)"
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, (dict, list)):
                    stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (dict, list)):
                    stack.append((item, f"{path}[{i}]", depth + 1))
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> None:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RequestInvalid(where, f"expected {what}, got {_type_name(value)}")
    if not isinstance(value, kind):
        raise RequestInvalid(where, f"expected {what}, got {_type_name(value)}")


def _number(doc: dict[str, Any], name: str, low: float, high: float | None) -> None:
    if name not in doc or doc[name] is None:
        return
    value = doc[name]
    _expect(value, (int, float), name, "a number")
    if value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise RequestInvalid(name, f"expected a number {bound}, got {value!r}")


def _text_blocks(value: Any, where: str) -> None:
    if isinstance(value, str):
        return
    _expect(value, list, where, "a string or an array of text blocks")
    for i, block in enumerate(value):
        _expect(block, dict, f"{where}[{i}]", 'a text block {"type": "text", "text": ...}')
        if block.get("type") != "text":
            raise RequestInvalid(f"{where}[{i}].type", f"expected \"text\", got {block.get('type')!r}")
        _expect(block.get("text"), str, f"{where}[{i}].text", "a string")


_USER_BLOCKS = ("text", "image", "document", "tool_result")
_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _content(value: Any, where: str, role: str) -> None:
    if isinstance(value, str):
        return
    _expect(value, list, where, "a string or an array of content blocks")
    allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
    for i, block in enumerate(value):
        at = f"{where}[{i}]"
        _expect(block, dict, at, "a content block object")
        kind = block.get("type")
        if kind not in allowed:
            raise RequestInvalid(
                f"{at}.type",
                f"expected one of {', '.join(allowed)} in a {role} message, got {kind!r}",
            )
        if kind == "text":
            _expect(block.get("text"), str, f"{at}.text", "a string")
        elif kind == "tool_use":
            _expect(block.get("id"), str, f"{at}.id", "a string")
            _expect(block.get("name"), str, f"{at}.name", "a string")
            _expect(block.get("input"), dict, f"{at}.input", "an object")
        elif kind == "tool_result":
            _expect(block.get("tool_use_id"), str, f"{at}.tool_use_id", "a string")
            inner = block.get("content", "")
            if not isinstance(inner, str):
                _expect(inner, list, f"{at}.content", "a string or an array of text blocks")
                for j, part in enumerate(inner):
                    _expect(part, dict, f"{at}.content[{j}]", "a content block object")
                    if part.get("type") not in ("text", "image"):
                        raise RequestInvalid(
                            f"{at}.content[{j}].type",
                            f"expected text or image, got {part.get('type')!r}",
                        )
                    if part.get("type") == "text":
                        _expect(part.get("text"), str, f"{at}.content[{j}].text", "a string")
            if "is_error" in block and block["is_error"] is not None:
                _expect(block["is_error"], bool, f"{at}.is_error", "true or false")
        elif kind == "thinking":
            _expect(block.get("thinking"), str, f"{at}.thinking", "a string")


def check_envelope(doc: Any, *, count: bool = False) -> None:
    """The Messages API's own rules for any engine, native or translated (``model``, ``max_tokens`` unless
    ``count``: count_tokens takes none, ``stream``, ``messages`` and their roles); checked before an engine is
    started or swapped in for the request. RequestInvalid names the first field that is wrong."""
    if not isinstance(doc, dict):
        raise RequestInvalid("(body)", f"expected a JSON object, got {_type_name(doc)}")
    model = doc.get("model")
    if model is not None:
        _expect(model, str, "model", "a string")
    if not count:
        if "max_tokens" not in doc:
            raise RequestInvalid("max_tokens", "is required: the most tokens to generate, a whole number >= 1")
        max_tokens = doc["max_tokens"]
        _expect(max_tokens, int, "max_tokens", "a whole number >= 1")
        if max_tokens < 1:
            raise RequestInvalid("max_tokens", f"expected a whole number >= 1, got {max_tokens}")
    stream = doc.get("stream", False)
    if stream is not None:
        _expect(stream, bool, "stream", "true or false")
    messages = doc.get("messages")
    if messages is None:
        raise RequestInvalid("messages", "is required: an array of {role, content} objects")
    _expect(messages, list, "messages", "an array of {role, content} objects")
    if not messages:  # as Anthropic's API: nothing for the engine to answer (mlx_lm.server: "empty conversation")
        raise RequestInvalid("messages", "expected at least one message: an array of {role, content} objects")
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        _expect(message, dict, at, "an object {role, content}")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise RequestInvalid(f"{at}.role", f'expected "user" or "assistant", got {role!r}')
        if "content" not in message:
            raise RequestInvalid(f"{at}.content", "is required: a string or an array of content blocks")


def check_request(doc: Any) -> MessagesRequest:
    """Check a Messages request for translation; RequestInvalid names the first field that is wrong and what
    is valid."""
    if not isinstance(doc, dict):
        raise RequestInvalid("(body)", f"expected a JSON object, got {_type_name(doc)}")
    deep = nesting_depth_exceeded(doc)
    if deep is not None:
        raise RequestInvalid(deep, f"nested deeper than {MAX_NESTING_DEPTH} levels")
    check_envelope(doc)
    model, max_tokens, stream, messages = doc.get("model"), doc["max_tokens"], doc.get("stream", False), doc["messages"]
    for i, message in enumerate(messages):
        _content(message["content"], f"messages[{i}].content", message["role"])
    if doc.get("system") is not None:
        _text_blocks(doc["system"], "system")
    _number(doc, "temperature", 0.0, 2.0)
    _number(doc, "top_p", 0.0, 1.0)
    if doc.get("top_k") is not None:
        _expect(doc["top_k"], int, "top_k", "a whole number >= 0")
        if doc["top_k"] < 0:
            raise RequestInvalid("top_k", f"expected a whole number >= 0, got {doc['top_k']}")
    stop = doc.get("stop_sequences")
    stops: tuple[str, ...] = ()
    if stop is not None:
        _expect(stop, list, "stop_sequences", "an array of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise RequestInvalid("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are accepted, got {len(stop)}")
        for i, s in enumerate(stop):
            _expect(s, str, f"stop_sequences[{i}]", "a non-empty string")
            if not s:
                raise RequestInvalid(f"stop_sequences[{i}]", "expected a non-empty string")
        stops = tuple(stop)
    names = _check_tools(doc.get("tools"))
    _check_tool_choice(doc.get("tool_choice"), names)
    if doc.get("metadata") is not None:
        _expect(doc["metadata"], dict, "metadata", "an object such as {\"user_id\": \"...\"}")
        user_id = doc["metadata"].get("user_id")
        if user_id is not None:
            _expect(user_id, str, "metadata.user_id", "a string")
    thinking = doc.get("thinking")
    thinking_requested = False
    if thinking is not None:
        _expect(thinking, dict, "thinking", 'an object such as {"type": "enabled", "budget_tokens": 1024}')
        if thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise RequestInvalid(
                "thinking.type", f'expected "enabled", "disabled" or "adaptive", got {thinking.get("type")!r}'
            )
        if thinking.get("budget_tokens") is not None:
            _expect(thinking["budget_tokens"], int, "thinking.budget_tokens", "a whole number")
        thinking_requested = thinking["type"] != "disabled"
    return MessagesRequest(
        doc=doc,
        model=model,
        max_tokens=max_tokens,
        stream=bool(stream),
        stop_sequences=stops,
        thinking_requested=thinking_requested,
    )


def _check_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    _expect(tools, list, "tools", "an array of tool definitions")
    if len(tools) > MAX_TOOLS:
        raise RequestInvalid("tools", f"at most {MAX_TOOLS} tools are accepted, got {len(tools)}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        _expect(tool, dict, at, "a tool definition {name, description, input_schema}")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise RequestInvalid(
                f"{at}.type",
                f"server tool {kind!r} runs on Anthropic's servers and this engine cannot run it; "
                "only custom tools (name, description, input_schema) are translated",
            )
        _expect(tool.get("name"), str, f"{at}.name", "a string")
        if tool.get("description") is not None:
            _expect(tool["description"], str, f"{at}.description", "a string")
        _expect(tool.get("input_schema"), dict, f"{at}.input_schema", "a JSON schema object")
        names.add(tool["name"])
    return names


def _check_tool_choice(choice: Any, names: set[str]) -> None:
    if choice is None:
        return
    _expect(choice, dict, "tool_choice", 'an object such as {"type": "auto"}')
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise RequestInvalid("tool_choice.type", f'expected "auto", "any", "tool" or "none", got {kind!r}')
    if kind == "tool":
        _expect(choice.get("name"), str, "tool_choice.name", "the name of one of the request's tools")
        if choice["name"] not in names:
            known = ", ".join(sorted(names)) or "(no tools given)"
            raise RequestInvalid("tool_choice.name", f"{choice['name']!r} is not among the tools: {known}")
    if choice.get("disable_parallel_tool_use") is not None:
        _expect(choice["disable_parallel_tool_use"], bool, "tool_choice.disable_parallel_tool_use", "true or false")


# --------------------------------------------------------------------------------------------
# Request: Messages → chat completions


def _text_of(blocks: Any) -> str:
    if isinstance(blocks, str):
        return blocks
    return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")


def _no_images(where: str, engine: str) -> RequestInvalid:
    return RequestInvalid(
        where,
        f"engine {engine!r} cannot see images (its model is text-only; set vision = true in its "
        "[[engine]] table if it can); send text only",
    )


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An Anthropic image block as an OpenAI ``image_url`` content part (data: URL or URL)."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if isinstance(media, str) and isinstance(data, str) and data:
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    elif isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise RequestInvalid(
        f"{where}.source",
        'expected {"type": "base64", "media_type": "image/png", "data": "..."} or {"type": "url", "url": "..."}',
    )


def _user_messages(content: Any, at: str, engine: str, images: bool = False) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and image parts in order, when images are present
    for i, block in enumerate(content):
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "tool_result":
            inner = block.get("content", "")
            if isinstance(inner, list):
                for j, part in enumerate(inner):
                    if part.get("type") == "image":
                        if images:
                            raise RequestInvalid(
                                f"{at}[{i}].content[{j}]",
                                "an image inside a tool_result cannot be translated (OpenAI tool messages "
                                "carry text only); put the image in a user content block instead",
                            )
                        raise _no_images(f"{at}[{i}].content[{j}]", engine)
            text = _text_of(inner)
            if block.get("is_error"):
                # OpenAI tool messages have no error flag: say it in the text the model reads.
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind == "image":
            if not images:
                raise _no_images(f"{at}[{i}]", engine)
            parts.append(_image_part(block, f"{at}[{i}]"))
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") != "text" or not isinstance(source.get("data"), str):
                raise RequestInvalid(
                    f"{at}[{i}].source",
                    "only plain-text documents ({\"type\": \"text\", \"data\": ...}) are translated",
                )
            texts.append(source["data"])
            parts.append({"type": "text", "text": source["data"]})
    # Tool results answer the previous assistant turn, so they go first; the user's words follow.
    if any(p["type"] == "image_url" for p in parts):
        out.append({"role": "user", "content": parts})
    elif texts:
        out.append({"role": "user", "content": "\n\n".join(texts) if len(texts) > 1 else texts[0]})
    return out


def _assistant_message(content: Any) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block["input"], ensure_ascii=False),
                    },
                }
            )
        # thinking / redacted_thinking from earlier turns are not replayed: engines' chat templates
        # drop past reasoning themselves, and a redacted block is opaque to them.
    # "" rather than null: chat templates (the tiny model's among them) iterate over content.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def to_openai(
    request: MessagesRequest, served_model: str | None, *, engine: str = "engine", images: bool = False
) -> dict[str, Any]:
    """The streaming chat completions body for a checked Messages request.

    ``images``: the engine's model can see; otherwise an image block is RequestInvalid.
    """
    doc = request.doc
    messages: list[dict[str, Any]] = []
    system = doc.get("system")
    if system:
        text = _text_of(system) if isinstance(system, list) else system
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(doc["messages"]):
        if message["role"] == "user":
            messages.extend(_user_messages(message["content"], f"messages[{i}].content", engine, images))
        else:
            messages.append(_assistant_message(message["content"]))
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    model = served_model if served_model is not None else doc.get("model")
    if model is not None:
        body["model"] = model
    for name in ("temperature", "top_p", "top_k"):
        if doc.get(name) is not None:
            body[name] = doc[name]
    tools = doc.get("tools")
    if tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t.get("description") or "",
                    "parameters": t["input_schema"],
                },
            }
            for t in tools
        ]
    choice = doc.get("tool_choice")
    if choice:
        kind = choice["type"]
        if kind == "auto":
            body["tool_choice"] = "auto"
        elif kind == "any":
            body["tool_choice"] = "required"
        elif kind == "none":
            body["tool_choice"] = "none"
        else:
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("disable_parallel_tool_use") and tools:
            body["parallel_tool_calls"] = False
    user_id = (doc.get("metadata") or {}).get("user_id")
    if user_id:
        body["user"] = user_id
    return body


# --------------------------------------------------------------------------------------------
# Response: chat completion chunks → Messages events


def sse(event: dict[str, Any]) -> bytes:
    """One Messages server-sent event."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def error_event(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


# An engine's error text is quoted up to this many characters.
ERROR_TEXT_CHARS = 2000


def openai_error_message(body: bytes) -> str:
    """The message inside an engine's error body, or its text (at most ``ERROR_TEXT_CHARS``): the OpenAI and
    Anthropic shapes' ``error.message``, mlx_lm.server's ``{"error": "..."}``, vLLM's older ``{"object": "error",
    "message": ...}``, a FastAPI ``{"detail": ...}`` (a validation error's list as ``field: msg``)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace").strip()[:ERROR_TEXT_CHARS] or "(empty body)"
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:ERROR_TEXT_CHARS]
    if isinstance(error, str):
        return error[:ERROR_TEXT_CHARS]
    if isinstance(doc, dict) and error is None:
        if isinstance(doc.get("message"), str):
            return doc["message"][:ERROR_TEXT_CHARS]
        detail = doc.get("detail")
        if isinstance(detail, str):
            return detail[:ERROR_TEXT_CHARS]
        if isinstance(detail, list) and detail and all(isinstance(d, dict) and "msg" in d for d in detail):
            return "; ".join(
                f"{'.'.join(str(part) for part in d.get('loc') or ())}: {d['msg']}".lstrip(": ") for d in detail
            )[:ERROR_TEXT_CHARS]
    return json.dumps(doc)[:ERROR_TEXT_CHARS]


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins one of ``needles`` (held back: may complete)."""
    best = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(text)), best, -1):
            if needle.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class _Block:
    index: int
    kind: str  # "text" | "thinking" | "tool_use"


@dataclass
class StreamTranslator:
    """Turns an engine's OpenAI SSE bytes into Messages events, at the pace they arrive.

    ``model`` is the model name the client asked for (echoed back). ``think`` chooses what
    ``<think>…</think>`` text and the engine's ``reasoning``/``reasoning_content`` deltas become:
    ``"text"`` keeps them in the text as the model emitted them; ``"thinking"`` makes them
    ``thinking`` blocks. ``done`` turns true when the message is complete (engine finished, or a
    stop sequence matched: then the caller should stop reading the engine).
    """

    model: str
    stop_sequences: tuple[str, ...] = ()
    think: str = "text"
    message_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    done: bool = False
    output_tokens_seen: int = 0  # content-bearing chunks; the engine's usage wins when it comes
    _partial: bytes = b""
    _started: bool = False
    _block: _Block | None = None
    _next_index: int = 0
    _tools: dict[int, _Block] = field(default_factory=dict)
    _pending: str = ""  # text held back: it may be the start of a stop sequence
    _in_think: bool = False
    _think_buf: str = ""
    _finish: str | None = None
    _ended: bool = False  # the engine's "data: [DONE]" came
    _usage: dict[str, Any] | None = None
    _events: list[dict[str, Any]] = field(default_factory=list)

    # -- driving it ------------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        """The opening events (message_start, then a ping as Anthropic's API sends)."""
        if self._started:
            return []
        self._started = True
        return [
            {
                "type": "message_start",
                "message": {
                    "id": self.message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            },
            {"type": "ping"},
        ]

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Events for these engine bytes (any split: partial lines are kept for the next call)."""
        events = self._events = self.start()
        if self.done:
            return events
        buf = self._partial + chunk if self._partial else chunk
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self._ended = True
                elif payload:
                    self._chunk(payload)
            elif line.startswith(b":") and not self.output_tokens_seen:
                # mlx_lm.server sends ": keepalive N/M" per prefill step: the engine is working.
                events.append({"type": "ping"})
            if self.done:
                break
        return events

    def finish(self) -> list[dict[str, Any]]:
        """Closing events once the engine's stream ended (no-op if already done); EngineStreamCut where the
        engine did not end its answer (no ``[DONE]``, no finish_reason): only its connection ended."""
        events = self._events = self.start()
        if not self.done:
            if self._partial.strip():
                self._partial += b"\n"
                events.extend(self.feed(b""))
            if not self.done:
                if self._finish is None and not self._ended:
                    raise EngineStreamCut("the engine closed its stream before its end (no [DONE], no finish_reason)")
                self._close_message(self._finish or "stop", None)
        return events

    @property
    def usage(self) -> dict[str, int]:
        """Usage in Anthropic terms, from the engine's own counts when it sent them."""
        u = self._usage or {}
        prompt = u.get("prompt_tokens")
        completion = u.get("completion_tokens")
        details = u.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        cached = cached if isinstance(cached, int) and cached >= 0 else 0
        out = {
            "input_tokens": max(0, prompt - cached) if isinstance(prompt, int) else 0,
            "output_tokens": completion if isinstance(completion, int) else self.output_tokens_seen,
        }
        if cached:
            out["cache_read_input_tokens"] = cached
        return out

    # -- one engine chunk --------------------------------------------------------------------

    def _chunk(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if doc.get("error") is not None:
            raise EngineStreamError(openai_error_message(payload))
        if isinstance(doc.get("usage"), dict):
            self._usage = doc["usage"]
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content")
            calls = delta.get("tool_calls")
            if reasoning or content or calls:
                self.output_tokens_seen += 1
            if isinstance(reasoning, str) and reasoning:
                self._reasoning(reasoning)
            # Calls before text: mlx_lm.server sends a finished call together with the text the
            # model wrote after it (server.py handle_completion emits both once the tool section
            # has closed); engines that stream calls send them in chunks of their own.
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool_call(call)
            if isinstance(content, str) and content:
                self._text(content)
                if self.done:
                    return
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if self._finish is not None and doc.get("usage") is not None:
            self._close_message(self._finish, None)

    # -- blocks ----------------------------------------------------------------------------

    def _open(self, kind: str, **start: Any) -> _Block:
        block = _Block(self._next_index, kind)
        self._next_index += 1
        if kind == "text":
            content: dict[str, Any] = {"type": "text", "text": ""}
        elif kind == "thinking":
            content = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            content = {"type": "tool_use", "id": start["id"], "name": start["name"], "input": {}}
        self._events.append({"type": "content_block_start", "index": block.index, "content_block": content})
        return block

    def _close_block(self) -> None:
        block = self._block
        if block is None:
            return
        self._block = None
        self._events.append({"type": "content_block_stop", "index": block.index})

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._block is None or self._block.kind != kind:
            self._close_block()
            self._block = self._open(kind)
        if kind == "text":
            delta = {"type": "text_delta", "text": text}
        else:
            delta = {"type": "thinking_delta", "thinking": text}
        self._events.append({"type": "content_block_delta", "index": self._block.index, "delta": delta})

    def _think_as_blocks(self) -> bool:
        return self.think == "thinking"

    def _reasoning(self, text: str) -> None:
        # The engine split the reasoning out itself (mlx_lm "reasoning", vLLM "reasoning_content").
        if self._think_as_blocks():
            self._emit("thinking", text)
        else:
            if not self._in_think:
                self._in_think = True
                text = _THINK_OPEN + text
            self._visible(text)

    def _text(self, text: str) -> None:
        if self._in_think and not self._think_as_blocks():
            # Reasoning that came as a separate field ended: close the tag the way the model did.
            self._in_think = False
            text = _THINK_CLOSE + text
        if not self._think_as_blocks():
            self._visible(text)
            return
        # <think>…</think> inline in the content (engines without a reasoning parser).
        buf = self._think_buf + text
        self._think_buf = ""
        while buf:
            tag = _THINK_CLOSE if self._in_think else _THINK_OPEN
            pos = buf.find(tag)
            if pos >= 0:
                self._route(buf[:pos])
                self._in_think = not self._in_think
                buf = buf[pos + len(tag):]
                continue
            keep = _partial_suffix(buf, (tag,))
            self._route(buf[: len(buf) - keep])
            self._think_buf = buf[len(buf) - keep:]
            break

    def _route(self, text: str) -> None:
        if self._in_think:
            self._emit("thinking", text)
        else:
            self._visible(text)

    def _visible(self, text: str) -> None:
        """Text the client sees, checked against stop sequences (which may span chunks)."""
        if not self.stop_sequences:
            self._emit("text", text)
            return
        buf = self._pending + text
        hit: tuple[int, str] | None = None
        for needle in self.stop_sequences:
            pos = buf.find(needle)
            if pos >= 0 and (hit is None or pos < hit[0]):
                hit = (pos, needle)
        if hit is not None:
            self._pending = ""
            self._emit("text", buf[: hit[0]])
            self._close_message("stop_sequence", hit[1])
            return
        keep = _partial_suffix(buf, self.stop_sequences)
        self._pending = buf[len(buf) - keep:] if keep else ""
        self._emit("text", buf[: len(buf) - keep])

    def _tool_call(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        if not isinstance(index, int):
            index = len(self._tools) if call.get("id") else max(self._tools, default=0)
        function = call.get("function") or {}
        block = self._tools.get(index)
        if block is None:
            self._flush_text()
            self._close_block()
            call_id = call.get("id") or "toolu_" + uuid.uuid4().hex[:24]
            block = self._open("tool_use", id=call_id, name=function.get("name") or "")
            self._tools[index] = block
            self._block = block
        elif self._block is not block:
            # Fragments of an earlier call after another began: Messages blocks cannot interleave.
            return
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._events.append(
                {
                    "type": "content_block_delta",
                    "index": block.index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                }
            )

    def _flush_text(self) -> None:
        if self._think_buf:
            buf, self._think_buf = self._think_buf, ""
            self._route(buf)
        if self._pending:
            buf, self._pending = self._pending, ""
            self._emit("text", buf)

    def _close_message(self, finish: str, stop_sequence: str | None) -> None:
        if self.done:
            return
        if stop_sequence is None:
            self._flush_text()
            if self._in_think and not self._think_as_blocks():
                self._in_think = False
        self._close_block()
        if stop_sequence is not None:
            reason = "stop_sequence"
        else:
            reason = _STOP_REASONS.get(finish, "end_turn")
            if reason == "end_turn" and self._tools:
                reason = "tool_use"  # engines that report "stop" after a tool call
        self._events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                "usage": self.usage,
            }
        )
        self._events.append({"type": "message_stop"})
        self.done = True


class EngineStreamError(Exception):
    """The engine sent an error object inside its stream."""


class EngineStreamCut(EngineStreamError):
    """The engine's stream ended without its end: no ``[DONE]`` and no finish_reason. mlx_lm.server speaks
    HTTP/1.0, so a stream it broke off (an exception, a Metal OOM, a kill) ends with its connection just as
    one it finished does; closing the message then would hand a cut answer (a tool call's arguments cut in
    half) to the client as whole."""


def events_bytes(events: list[dict[str, Any]]) -> bytes:
    return b"".join(sse(e) for e in events)


# --------------------------------------------------------------------------------------------
# Events folded into one Message (non-streaming clients)


class Accumulator:
    """Applies Messages stream events to build the final Message (what ``messages.create`` returns)."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self._json: dict[int, list[str]] = {}

    def apply(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["type"]
            if kind == "message_start":
                self.message = dict(event["message"], content=[])
            elif kind == "content_block_start":
                self.message["content"].append(dict(event["content_block"]))
            elif kind == "content_block_delta":
                block = self.message["content"][event["index"]]
                delta = event["delta"]
                if delta["type"] == "text_delta":
                    block["text"] += delta["text"]
                elif delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "input_json_delta":
                    self._json.setdefault(event["index"], []).append(delta["partial_json"])
            elif kind == "content_block_stop":
                index = event["index"]
                block = self.message["content"][index]
                if block["type"] == "tool_use":
                    block["input"] = _tool_input("".join(self._json.pop(index, [])))
            elif kind == "message_delta":
                self.message.update(event["delta"])
                self.message["usage"] = dict(event["usage"])


def _tool_input(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        # A call cut off by max_tokens: the client still gets what was generated, unparsed.
        return {"_raw_arguments": text}
    return value if isinstance(value, dict) else {"_value": value}


# --------------------------------------------------------------------------------------------
# Counting tokens without the engine


def count_text(doc: dict[str, Any]) -> str:
    """The text a tokenizer would see for a count_tokens request (system, messages, tools)."""
    parts: list[str] = []
    system = doc.get("system")
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.append(_text_of(system))
    for message in doc.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for block in content:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "text":
                    parts.append(str(block.get("text", "")))
                elif block.get("type") == "tool_use":
                    parts.append(str(block.get("name", "")) + json.dumps(block.get("input", {})))
                elif block.get("type") == "tool_result":
                    parts.append(_text_of(block.get("content", "")) if isinstance(block.get("content"), (str, list)) else "")
    for tool in doc.get("tools") or ():
        if isinstance(tool, dict):
            parts.append(json.dumps(tool, separators=(",", ":")))
    return "\n".join(parts)


ESTIMATE_BYTES_PER_TOKEN = 4  # BPE tokenizers average about 4 bytes of English text per token


def estimate_tokens(doc: dict[str, Any]) -> int:
    """An honest estimate: UTF-8 bytes / 4, rounded up (the gateway flags it as an estimate)."""
    size = len(count_text(doc).encode())
    return max(1, -(-size // ESTIMATE_BYTES_PER_TOKEN))
