"""The gateway: one OpenAI/Anthropic-compatible front port for every configured engine.

Room: gateway.

The ``model`` field of a request picks the engine (name, alias, or the default engine). The
gateway forwards requests byte for byte, streams pass through chunk by chunk, and every token that
goes by is watched: time to first token, gaps between tokens, token counts, and stalls (a live
stream with no token for too long) are reported to the daemon. The one translation: the Anthropic
Messages API for engines that serve only the OpenAI API (``anthropic_api``), where the meter still
reads the engine's own bytes as they arrive.

A stream is read from the engine at the *engine's* pace into a bounded per-stream buffer
(``client_buffer_bytes``), and a token counts as progress when it arrives from the engine, not when
the client takes it: a client that stops reading, is paused or sits on a slow network must never
look like an engine stall. While that buffer is full the engine is not read (and not blamed); a
client that does not drain it within ``client_timeout_s`` is cut (``gateway.client_cut``).

It depends on the daemon only through :class:`GatewayBackend` (a protocol defined here):

    acquire(model) -> Upstream          resolve the model, swap or wait for the engine, or raise
                                        EngineUnavailable (503 + Retry-After, or 404)
    request_started(engine)             a request is now in flight on the engine
    token_progress(engine, at_s)        one token arrived from the engine (hot path; must be cheap)
    engine_progress_s(engine)           the engine's latest progress from any source (or None)
    stall_detected(engine, phase, s)    a live stream got nothing from the engine for too long
    request_finished(stats)             a request ended (RequestStats)

Error bodies are JSON in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, or the
Anthropic shape ``{"type": "error", "error": {"type", "message"}}`` on ``/v1/messages``; an engine's own
error answer is passed on in that shape too (``engine_error_body``), untouched where it already is.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import socket
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import httpx
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policies import resend, silence
from policies.frontdoor import (
    EMBEDDINGS_PATH,
    FORWARDED_PATHS,
    KIND_DEPENDENT_PATHS,
    LOCAL_HOST_SUFFIXES,
    OLLAMA_API_PATHS,
    Admission,
    SwapPermission,
    admit_request,
    check_path,
    check_path_safe,
    engine_serves,
    fetch_as_stream,
    host_allowed,
    host_check_applies,
    key_needed_to_use,
    may_start_engine,
    origin_allowed,
    own_host,
    retry_after_s,
    room_to_wait_for_engine,
    start_refused_message,
    translated_error_status,
)
from policies.health import prefill_counts
from supervisord_llm.clock import Clock, SystemClock
from supervisord_llm.errors import SupervisordLLMError, UnknownEngine
from supervisord_llm.gateway import anthropic as anthropic_api
from supervisord_llm.gateway import hold, retry
from supervisord_llm.gateway.prefills import PrefillSpans, QuietTally
from supervisord_llm.gateway.protocol import (
    EngineUnavailable,
    GatewayBackend,
    GatewayListenFailed,
    QuietDecode,
    RequestStats,
    Upstream,
    bind_listen,
    listen_text,
)
from supervisord_llm.gateway.reassemble import StreamReassembly, stream_request_body
from supervisord_llm.gateway.settings import GatewaySettings, is_loopback, parse_listen  # noqa: F401 - re-exported
from supervisord_llm.gateway.upstream import UpstreamClient, UpstreamRequest, UpstreamResponse
from supervisord_llm.httpserver import DaemonServer

__all__ = [
    "EngineUnavailable",
    "GatewayBackend",
    "GatewayListenFailed",
    "GatewaySettings",
    "GatewayStats",
    "RequestStats",
    "TokenMeter",
    "Upstream",
    "build_app",
    "serve",
]

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# A translated stream sends the client a ping after this long without any other event.
TRANSLATED_PING_INTERVAL_S = 5.0
# How long past hold_s the gateway waits for the backend's own answer to a hold that ran out (it says why).
ACQUIRE_ANSWER_GRACE_S = 2.0
# On a count_tokens answer: "engine" (its own count_tokens), "engine-tokenizer" (its /tokenize),
# or "estimate (...)" saying how.
TOKEN_COUNT_HEADER = "x-supervisord-llm-token-count"


# --------------------------------------------------------------------------------------------
# The protocol the daemon implements: gateway/protocol.py (the daemon imports only that, never this
# module and its HTTP stack)



# --------------------------------------------------------------------------------------------
# Watching tokens in a passing SSE stream

# A chunk carries a token when one of these fields holds a non-empty string (or a tool call starts).
# A JSON string's own quotes are escaped inside content, so a generated text cannot fake a match.
_OPENAI_TOKEN_RE = re.compile(
    rb'"(?:content|reasoning_content|reasoning|text)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)
_ANTHROPIC_DELTA_RE = re.compile(rb'"type"\s*:\s*"content_block_delta"')
_OPENAI_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"')  # a finish reason, not null
_ANTHROPIC_MESSAGE_DELTA_RE = re.compile(rb'"type"\s*:\s*"message_delta"')
_MAX_PARTIAL_LINE_BYTES = 4 * 2**20
# Ollama's own API streams one JSON object per line, each with "done": false until the last
# (server/routes.go, ChatHandler/GenerateHandler; docs/api.md "Streaming responses").
_NDJSON_NOT_DONE_RE = re.compile(rb'"done"\s*:\s*false')


class TokenMeter:
    """Counts tokens in SSE bytes as they pass, without holding them back.

    OpenAI: one token per ``data:`` chunk carrying content/reasoning/text; a ``usage`` chunk's
    ``completion_tokens`` wins when it arrives. Anthropic: one token per ``content_block_delta``
    event; ``message_delta.usage.output_tokens`` wins. Comments (``: keepalive``) and empty data
    are not progress. Only data lines that can carry usage or an error are parsed as JSON.
    ``ndjson`` (Ollama's own API): one token per line with ``"done": false`` (a thinking model's
    lines with empty content are its steps too); the last line's ``eval_count`` wins; a line with
    ``error`` is the engine's error.
    """

    __slots__ = (
        "anthropic",
        "ndjson",
        "on_token",
        "first_token_at_s",
        "last_token_at_s",
        "max_gap_s",
        "counted_tokens",
        "usage_tokens",
        "error",
        "finished",
        "finish_seen",
        "_partial",
        "_event",
    )

    def __init__(self, *, anthropic: bool, on_token: Callable[[float], None] | None = None,
                 ndjson: bool = False) -> None:
        self.anthropic = anthropic
        self.ndjson = ndjson
        self.on_token = on_token
        self.first_token_at_s: float | None = None
        self.last_token_at_s: float | None = None
        self.max_gap_s: float | None = None
        self.counted_tokens = 0
        self.usage_tokens: int | None = None
        self.error: Any = None
        self.finished = False  # the engine's own end of the stream passed: [DONE], message_stop, "done": true
        self.finish_seen = False  # an OpenAI chunk with a finish_reason passed (its answer ended, [DONE] may follow)
        self._partial = b""
        self._event = b""

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.counted_tokens

    def end(self, at_s: float) -> None:
        """The stream ended: a last line that came without its newline is read as a line."""
        if self._partial:
            rest, self._partial = self._partial, b""
            self.feed(rest + b"\n", at_s)

    @property
    def answer_ended(self) -> bool:
        """The engine ended its answer in the stream itself, not just its connection: ``[DONE]``, a
        finish_reason, ``message_stop`` or ``"done": true``."""
        return self.finished or self.finish_seen

    def feed(self, chunk: bytes, at_s: float) -> None:
        buf = self._partial + chunk if self._partial else chunk
        start = 0
        find = buf.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self.ndjson:
                if line:
                    self._ndjson_line(line, at_s)
                continue
            if not line:
                self._event = b""  # an empty line ends an event
            elif line[0] == 0x3A:  # ":" comment, e.g. keepalive: not progress
                continue
            elif line.startswith(b"data:"):
                self._data(line[5:].strip(), at_s)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
        rest = buf[start:] if start < len(buf) else b""
        self._partial = rest if len(rest) <= _MAX_PARTIAL_LINE_BYTES else b""

    def _token(self, at_s: float) -> None:
        last = self.last_token_at_s
        if last is None:
            self.first_token_at_s = at_s
        else:
            gap = at_s - last
            if self.max_gap_s is None or gap > self.max_gap_s:
                self.max_gap_s = gap
        self.last_token_at_s = at_s
        self.counted_tokens += 1
        if self.on_token is not None:
            self.on_token(at_s)

    def _ndjson_line(self, line: bytes, at_s: float) -> None:
        # The last line carries the counts (a tool call's arguments in it may hold any text, "done": false too).
        if b'"eval_count"' not in line and _NDJSON_NOT_DONE_RE.search(line):
            self._token(at_s)
            return
        doc = _loads(line)
        if not isinstance(doc, dict):
            return
        if doc.get("error") is not None:
            self.error = doc["error"]
        elif doc.get("done") is True:
            self.finished = True
            count = doc.get("eval_count")
            if type(count) is int and count >= 0:
                self.usage_tokens = count
        elif doc.get("done") is False:
            self._token(at_s)

    def _data(self, payload: bytes, at_s: float) -> None:
        if not payload:
            return
        if payload == b"[DONE]":
            self.finished = True
            return
        if self.anthropic:
            event = self._event
            if event == b"message_stop" or (not event and b'"message_stop"' in payload):
                self.finished = True
                return
            if event == b"content_block_delta" or (
                not event and _ANTHROPIC_DELTA_RE.search(payload)
            ):
                self._token(at_s)
            elif event == b"message_delta" or (
                not event and _ANTHROPIC_MESSAGE_DELTA_RE.search(payload)
            ):
                doc = _loads(payload)
                usage = doc.get("usage") if isinstance(doc, dict) else None
                if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                    self.usage_tokens = usage["output_tokens"]
            elif event == b"error" or (not event and b'"error"' in payload):
                doc = _loads(payload)
                if isinstance(doc, dict) and ("error" in doc):
                    self.error = doc["error"]
            return
        if _OPENAI_TOKEN_RE.search(payload):
            self._token(at_s)
        if not self.finish_seen and _OPENAI_FINISH_RE.search(payload):
            self.finish_seen = True
        if b'"completion_tokens"' in payload or b'"error"' in payload:
            doc = _loads(payload)
            if isinstance(doc, dict):
                usage = doc.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    self.usage_tokens = usage["completion_tokens"]
                if doc.get("error") is not None:
                    self.error = doc["error"]


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # an engine's odd output is not the gateway's crash
        return None


def usage_tokens_of(body: bytes) -> int | None:
    """Completion tokens from a non-streamed OpenAI, Anthropic or Ollama response body, if it says."""
    doc = _loads(body)
    if isinstance(doc, dict) and type(doc.get("eval_count")) is int and doc["eval_count"] >= 0:
        return int(doc["eval_count"])  # Ollama's own API
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    for name in ("completion_tokens", "output_tokens"):
        if isinstance(usage.get(name), int):
            return usage[name]
    return None


# --------------------------------------------------------------------------------------------
# The gateway's own bookkeeping (what `llmctl status` shows as gateway{listen, in_flight})


ENDINGS = ("complete", "client_disconnected", "client_too_slow", "upstream_error", "stalled", "gateway_stopping")


class GatewayStats:
    """Counters the gateway keeps about itself; ``app.state.gateway`` is one of these.

    ``on_change`` (when set) is called after any top-level counter is assigned or a refusal counted:
    the gateway's process sends its counters to the daemon then, and sleeps while nothing changes.
    """

    on_change: Callable[[], None] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if self.on_change is not None:
            self.on_change()

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.in_flight = 0  # requests being handled, from arrival to the last byte
        self.waiting = 0  # of those, waiting for an engine (acquire)
        self.requests_total = 0
        self.upstream_retries = 0  # sends retried after the engine dropped the connection unanswered
        self.clients_cut = 0  # clients cut for not draining their stream buffer within client_timeout_s
        self.engines: dict[str, dict[str, int]] = {}
        # Requests the door turned away, by why: path, method, key, invalid_json, invalid_model, invalid_request
        # (a Messages API request breaking its rules), origin, host,
        # body_timeout, body_too_large, header_timeout, bad_http, swap, queue_full, queue_timeout, connections;
        # and an engine that cannot serve, by the daemon's reason: hold_timeout, backoff, failed, draining, ...,
        # model_not_found.
        self.refused: dict[str, int] = {}

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        if self.on_change is not None:
            self.on_change()

    def engine(self, name: str) -> dict[str, int]:
        counts = self.engines.get(name)
        if counts is None:
            counts = self.engines[name] = {"in_flight": 0, "requests": 0, **{e: 0 for e in ENDINGS}}
        return counts

    def snapshot(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "requests_total": self.requests_total,
            "upstream_retries": self.upstream_retries,
            "clients_cut": self.clients_cut,
            "refused": dict(sorted(self.refused.items())),
            "engines": {name: dict(c) for name, c in sorted(self.engines.items())},
        }


# --------------------------------------------------------------------------------------------
# Errors as JSON


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    502: "upstream_error",
    503: "engine_unavailable",
    504: "upstream_timeout",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


def _error_type(anthropic: bool, status: int) -> str:
    """The error type of a status the tables above do not name: the client's error (4xx), or the server's."""
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error" if anthropic else "server_error"


def error_body(
    anthropic: bool, status: int, message: str, code: str, **extra: Any
) -> dict[str, Any]:
    err: dict[str, Any]
    if anthropic:
        err = {"type": _ANTHROPIC_TYPES.get(status) or _error_type(True, status), "message": message, "code": code}
        err.update(extra)
        return {"type": "error", "error": err}
    err = {"message": message, "type": _OPENAI_TYPES.get(status) or _error_type(False, status), "param": None,
           "code": code}
    err.update(extra)
    return {"error": err}


# An engine's error body is read up to this much to put it in the client's API shape; the rest is not read.
ENGINE_ERROR_READ_BYTES = 64 * 2**10


def engine_error_shaped(anthropic: bool, raw: bytes) -> bool:
    """An engine's error body already in the client's API shape (passed on untouched): OpenAI's
    ``{"error": {"message": ...}}``, or Anthropic's ``{"type": "error", "error": {"type", "message"}}``."""
    doc = _loads(raw)
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return False
    return not anthropic or (doc.get("type") == "error" and isinstance(error.get("type"), str))


def engine_error_body(anthropic: bool, engine: str, status: int, raw: bytes, *, client_status: int | None = None,
                      translated_to: str | None = None) -> dict[str, Any]:
    """An engine's error answer (``status``, its body ``raw``: an ``error`` string, no ``error``, plain text)
    in the client's API shape: its text, said to be the engine's, typed as the client's error (4xx) or the
    server's (5xx), with the engine and its status. ``client_status``: the status the client gets, where it
    is not the engine's; ``translated_to``: the engine's path a translated request was sent to."""
    client_status = client_status or status
    refused = status < 500
    what = "the request" if translated_to is None else f"the request translated to {translated_to} (HTTP {status})"
    message = (f"engine {engine!r} {'refused' if refused else 'failed to answer'} {what}: "
               f"{anthropic_api.openai_error_message(raw)}")
    # A Messages client reads the type (a rate_limit_error or overloaded_error is waited out, an
    # authentication_error is not); an OpenAI client reads the status, the type says whose error it is.
    kind = (_ANTHROPIC_TYPES.get(client_status) or _error_type(True, client_status)) if anthropic \
        else _error_type(False, client_status)
    return error_body(anthropic, client_status, message, "engine_refused" if refused else "engine_error",
                      type=kind, engine=engine, engine_status=status)


async def _read_error_body(response: UpstreamResponse) -> tuple[bytes, bool]:
    """An engine's error body, up to ``ENGINE_ERROR_READ_BYTES``, and whether that is all of it (False: it was
    longer, or the engine broke off)."""
    parts: list[bytes] = []
    size = 0
    try:
        async with aclosing(response.aiter_raw()) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size > ENGINE_ERROR_READ_BYTES:
                    return b"".join(parts)[:ENGINE_ERROR_READ_BYTES], False
    except httpx.HTTPError:
        return b"".join(parts), False
    return b"".join(parts), True


def _unanswered(engine: str, base_url: str, exc: httpx.HTTPError, sends: int) -> tuple[str, str]:
    """The code and message of a 502 for a request the engine gave no answer (``retry.UNANSWERED`` and the
    like): a connection that failed (nothing accepts it: the engine is not there) is not one the engine took
    and closed or reset without answering (its handler crashed, it died with the request), nor an answer it
    began that does not parse."""
    at = f"engine {engine!r} at {base_url}"
    tries = f" (sent {sends} times)" if sends > 1 else ""
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        how = "reset" if isinstance(exc, httpx.ReadError) else "closed"
        return "upstream_closed", (f"{at} {how} the connection without answering the request{tries}: it was reached "
                                   f"and may have failed on this request, its log says why ({exc})")
    if isinstance(exc, httpx.ProtocolError):
        return "upstream_bad_response", f"{at} answered with a response the gateway could not read: {exc}"
    return "upstream_unreachable", f"{at} could not be reached{tries}: {type(exc).__name__}: {exc}"


# Refusals a resend cannot change (an engine a person stopped or that failed, which requests may not start):
# the OpenAI and Anthropic SDKs retry a 503 on their own unless told not to (their ``x-should-retry``).
PERMANENT_REFUSALS = frozenset({"engine_not_running", "failed"})
NO_RETRY = {"x-should-retry": "false"}


def error_response(
    anthropic: bool,
    status: int,
    message: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        error_body(anthropic, status, message, code, **extra),
        status_code=status,
        headers=dict(headers or {}),
    )


def _ndjson_error(message: str) -> bytes:
    """An error line in a stream of Ollama's own API, as Ollama writes one (``{"error": "..."}``)."""
    return json.dumps({"error": message}).encode() + b"\n"


def _sse_error(anthropic: bool, status: int, message: str, code: str) -> bytes:
    body = json.dumps(error_body(anthropic, status, message, code), separators=(",", ":"))
    return (f"event: error\ndata: {body}\n\n" if anthropic else f"data: {body}\n\n").encode()


# --------------------------------------------------------------------------------------------
# Forwarding


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        # The gateway decided whether the page may use it (policies.frontdoor.origin_allowed); an engine with
        # its own origin list (Ollama's OLLAMA_ORIGINS) would refuse an origin the operator allowed here.
        "origin",
    }
)
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_RESPONSE_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "date",
        "server",
        # An engine's own CORS answer (mlx_lm.server and llama-server allow every origin, "*"): the gateway
        # answers for the origins it allows (_BrowserGuard), and never lets an engine widen that.
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "access-control-max-age",
    }
)
_NO_CONTENT_LENGTH = frozenset({"content-length"})
_COLLECT_LIMIT_BYTES = 16 * 2**20


@dataclass
class _Translation:
    """A /v1/messages request served by translating to and from the engine's chat completions."""

    translator: anthropic_api.StreamTranslator
    stream: bool  # what the client asked for; the engine streams either way
    message: anthropic_api.Accumulator = field(default_factory=anthropic_api.Accumulator)

    def relay(self, events: list[dict[str, Any]]) -> bytes:
        """Bytes for the client now (stream), or nothing while the message is being folded up."""
        if self.stream:
            return anthropic_api.events_bytes(events) if events else b""
        self.message.apply(events)
        return b""


class _Forward:
    """The ASGI response for one forwarded request: sends upstream, pumps bytes back, watches tokens.

    Written as a plain ASGI callable (not a StreamingResponse over an async generator) so that the
    cancel scopes for stall and disconnect live in one task, and the upstream response is closed
    in the same task whatever ends the exchange.
    """

    def __init__(
        self,
        gw: _Gateway,
        upstream: Upstream,
        request: UpstreamRequest,
        *,
        anthropic: bool,
        stream_requested: bool,
        translation: _Translation | None = None,
        ndjson: bool = False,
        tools: bool = False,
        reassembly: StreamReassembly | None = None,
    ) -> None:
        self.gw = gw
        # A non-streamed request fetched as a stream: the client gets the answer rebuilt from it.
        self.reassembly = reassembly
        self._attempts = 0  # sends of a fetched-as-stream request (each reads the whole stream)
        self.sends = 1  # of the request to the engine, resends included
        self.ndjson = ndjson  # Ollama's own API: a stream of JSON lines, metered and watched as SSE is
        self.translation = translation
        self.on_done: Callable[[], None] | None = None  # gives the engine's slot back
        self.upstream = upstream
        # An engine silent toward this request for upstream_read_timeout_s may be waited for while it shows
        # progress elsewhere (a non-streamed answer comes whole, after the whole generation).
        self.request = replace(request, progress_age_s=self._engine_progress_age_s)
        self.anthropic = anthropic
        self.stream_requested = stream_requested
        self.sent_at_s = 0.0
        self.stalled: tuple[str, float] | None = None
        self.stopping_cut = False  # ended by the gateway's stop (the daemon restarts or stops): _Gateway.end_open
        self.client_gone = False
        self.client_cut = False  # did not drain its buffer within client_timeout_s
        # While the stream buffer is full the engine is not read, so its silence is ours, not the
        # engine's: the stall clock stops, and starts again from when reading resumed.
        self.blocked_since_s: float | None = None
        self.held_back = False  # ever blocked by its client (RequestStats.held_back)
        self.unblocked_at_s = 0.0
        self.awaiting_engine = False  # held in a resend, waiting for the engine to serve again
        self._client_send: Any = None  # the client's send, for a stream held in a resend (its head and comments)
        self._after_head: hold.AfterHead | None = None  # the send once a held resend sent the client its head
        self.unavailable: EngineUnavailable | None = None  # why the engine will not serve the resend
        self.upstream_failed = False
        self.non_stream_tokens: int | None = None
        self.pump_scope = anyio.CancelScope()
        # The stall watchdog is a timer, re-armed until the exchange ends (no task per stream).
        self._stall_timer: asyncio.Handle | None = None
        self._stall_due_s: float | None = None  # when the armed stall look is due (a late one: the gateway paused)
        self._stall_watch_over = False
        self._tg: anyio.abc.TaskGroup | None = None  # the exchange's task group (the engine's reader)
        self.response_complete = False
        self.response: UpstreamResponse | None = None
        self.translated_headers_sent = False
        self.client_fed_at_s = 0.0  # when the client of a translated stream last got bytes
        engine = upstream.engine
        token_progress = gw.backend.token_progress
        prefills = gw.prefills
        self.prefill_key: int | None = None  # in prefill (gateway/prefills.py) from the send to the first token
        self.short_prompt = not prefill_counts(len(request.content))
        # This stream's decode where no other request's prefill touched it (the rate the daemon learns and
        # judges).
        engine_counts = gw.stats.engine(engine)
        self._in_flight_now = lambda: engine_counts["in_flight"]
        self.quiet = QuietTally(prefills, engine, self._in_flight_now)

        def on_token(at_s: float) -> None:
            # A non-streamed request with a long prompt fetched as a stream keeps its span until its end, as it
            # did when it was sent as asked: the engine's work on it goes on after its first token (a stream
            # beside a 700-word prompt on mlx_lm read its backlog, delivered right after that token, as a burst
            # of fast tokens). A short prompt's ends at its first token, as a stream's does: beside a stream on
            # mlx_lm, 180-word non-streamed requests of 20 tokens twice a second left its rates judged at 0.73
            # to 1.01 of the lone canaries' (the clients' own: 0.48 to 0.74), none above.
            if self.prefill_key is not None and (self.reassembly is None or self.short_prompt):
                prefills.end(engine, self.prefill_key, at_s)
                self.prefill_key = None
            self.quiet.token(at_s)
            try:
                token_progress(engine, at_s)
            except Exception:  # a backend bug must not break a stream
                gw.log.exception("gateway.backend_failed", method="token_progress", engine=engine)

        # A translated request's meter reads the engine's own (OpenAI) bytes, not what we send.
        self.meter = TokenMeter(anthropic=anthropic and translation is None, on_token=on_token, ndjson=ndjson)
        settings = gw.settings
        self.limits = silence.stall_limits(
            prefill_stall_s=settings.prefill_stall_s, prefill_per_mib_s=settings.prefill_per_mib_s,
            decode_stall_s=settings.decode_stall_s, body_bytes=len(request.content), engine_kind=upstream.kind,
            tools=tools)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gw = self.gw
        engine = self.upstream.engine
        counts = gw.stats.engine(engine)
        counts["in_flight"] += 1
        counts["requests"] += 1
        gw.call_backend("request_started", engine)
        gw.open_forwards.add(self)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                self.sent_at_s = gw.clock.now()
                self._begin_prefill()
                if self.stream_requested:
                    self._start_stall_watch()
                await self._exchange(send, tg)
                if self._after_head is not None and not (self.client_gone or self.client_cut):
                    await self._after_head.flush()  # a held stream ends with its error event, if it had one
                tg.cancel_scope.cancel()
        finally:
            gw.open_forwards.discard(self)
            self._stop_stall_watch()
            with anyio.CancelScope(shield=True):
                if self.response is not None:
                    # Closing before the body is read drops the connection: the engine sees the
                    # client go away and stops generating.
                    await self.response.aclose()
            counts["in_flight"] -= 1
            self._finish(counts)

    def _engine_progress_age_s(self) -> float | None:
        """How long ago the engine showed progress (its counters, its prefill, other streams, a canary); None:
        never, or not known."""
        gw = self.gw
        try:
            progress_s = gw.backend.engine_progress_s(self.upstream.engine)
        except Exception:
            gw.log.exception("gateway.backend_failed", method="engine_progress_s")
            return None
        return None if progress_s is None else gw.clock.now() - progress_s

    def _start_stall_watch(self) -> None:
        if self._stall_timer is None and not self._stall_watch_over:
            self._stall_timer = asyncio.get_running_loop().call_soon(self._check_stall)

    def _stop_stall_watch(self) -> None:
        self._stall_watch_over = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_stall(self) -> None:
        """The stall watchdog's tick: either the stream stalled (the pump is cancelled), or the next
        tick is armed for when it would have."""
        self._stall_timer = None
        if self._stall_watch_over or self.response_complete:
            return
        now_s, due_s = self.gw.clock.now(), self._stall_due_s
        if due_s is not None and silence.gateway_paused(due_s=due_s, now_s=now_s):
            # The gateway read nothing while it was paused: that silence is its own (policies.silence).
            self.gw.log.warning("gateway.paused", engine=self.upstream.engine, late_s=round(now_s - due_s, 3))
            self.unblocked_at_s = now_s
            self.held_back = True
        try:
            wait_s = self._stall_wait_s()
        except Exception:  # a bug here must not end the watch: look again in a second
            self.gw.log.exception("gateway.stall_watch_failed", engine=self.upstream.engine)
            wait_s = 1.0
        if wait_s is None:
            self._stall_watch_over = True
            self.pump_scope.cancel()
            return
        self._stall_due_s = now_s + wait_s
        self._stall_timer = asyncio.get_running_loop().call_later(wait_s, self._check_stall)

    async def _watch_disconnect(self, receive: Any, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The server also reports a disconnect once the response is complete.
                if not self.response_complete:
                    self.client_gone = True
                    scope.cancel()
                return

    def _stall_wait_s(self) -> float | None:
        """How long until the stream would be stalled; None (and ``stalled`` set) once it is
        (``policies.silence.stream_stall_check`` decides)."""
        try:
            elsewhere_s = self.gw.backend.engine_progress_s(self.upstream.engine)
        except Exception:
            elsewhere_s = None
            self.gw.log.exception("gateway.backend_failed", method="engine_progress_s")
        check = silence.stream_stall_check(
            now_s=self.gw.clock.now(), sent_at_s=self.sent_at_s, last_token_s=self.meter.last_token_at_s,
            resumed_at_s=self.unblocked_at_s, limits=self.limits,
            # The client's back-pressure, or the request held while its engine restarts: neither is the
            # engine's silence.
            not_judged=self.blocked_since_s is not None or self.awaiting_engine,
            engine_progress_s=elsewhere_s)
        if check.stalled:
            self.stalled = (check.phase, check.stalled_for_s)
            return None
        return check.wait_s

    async def _send_upstream(self) -> UpstreamResponse:
        # Sent again only while the engine gave no response head (gateway/retry.py): refused while
        # it restarts, reset before it answered. A response with any status is never sent twice.
        gw = self.gw

        def on_retry(exc: Exception, held: bool) -> None:
            gw.stats.upstream_retries += 1
            self.sends += 1
            # The engine's prefill deadline starts at the resend: the time held is not the engine's.
            self.unblocked_at_s = gw.clock.now()
            if held:
                gw.log.info("gateway.upstream_retried", engine=self.upstream.engine, error=type(exc).__name__)

        return await retry.send_until_answered(
            self._send_once if self.reassembly is not None else lambda: gw.upstream_client.send(self.request),
            wait_serving=self._engine_serving, went_down=self._engine_went_down, hold_s=gw.settings.hold_s,
            now=gw.clock.now, on_retry=on_retry, shown_down=self._engine_shown_down)

    def _engine_entry(self) -> dict[str, Any] | None:
        """The daemon's last word on this request's engine (its /v1/models entry, with its state)."""
        engine = self.upstream.engine
        return next((m for m in self.gw.backend.models() if m.get("id") == engine), None)

    def _engine_shown_down(self) -> bool:
        """The daemon's last word on the engine is a state that serves nothing (a backend that shows no states,
        a test's, shows none)."""
        entry = self._engine_entry()
        state = entry.get("state") if entry is not None else None
        return resend.shown_down(state if isinstance(state, str) else None)

    async def _send_once(self) -> UpstreamResponse:
        """A non-streamed request fetched as a stream: sent, and its stream read whole into the answer, as one
        unit. Nothing reaches the client before the answer is whole, so an engine that dies mid-answer (reset,
        or closed before the stream's end) is, for the client, an engine that did not answer: the request is
        held and sent again to the restarted engine as a non-streamed request would be (gateway/retry.py)."""
        assert self.reassembly is not None
        gw = self.gw
        if self._attempts:
            self._new_attempt()
        self._attempts += 1
        response = await gw.upstream_client.send(self.request)
        if response.status_code >= 400 or not response.headers.get("content-type", "").startswith(
                "text/event-stream"):
            if response.status_code < 400 and self.upstream.engine not in gw.not_streaming:
                # It answered a stream request with a whole body: it does not stream, and is not asked to again
                # (its head comes only at the end, after the stall limits may have run out).
                gw.not_streaming.add(self.upstream.engine)
                gw.log.warning("gateway.engine_does_not_stream", engine=self.upstream.engine,
                               content_type=response.headers.get("content-type"))
            return response  # the engine's refusal (or its own non-streamed body): passed through as it is
        self.reassembly = StreamReassembly(chat=self.reassembly.chat)  # this attempt's answer only
        self.response = response
        try:
            async with aclosing(self._engine_chunks(response)) as chunks:
                async for chunk in chunks:
                    self.reassembly.feed(chunk)
            if not self.reassembly.complete() and self.reassembly.error is None:
                # Closed before its end (mlx_lm.server's HTTP/1.0 stream ends with its connection, also when
                # the engine died): for the client, who got nothing, an engine that did not answer.
                raise httpx.RemoteProtocolError("the engine closed its answer before its end (no [DONE], no "
                                                "finish_reason)", request=httpx.Request("POST", self.request.url))
        except BaseException:
            self.response = None
            with anyio.CancelScope(shield=True):
                await response.aclose()
            raise
        return response

    def _new_attempt(self) -> None:
        """A resend starts its request's watch again: the failed attempt's tokens, prefill and timing are not
        this one's (the new engine's prefill is judged as a prefill, its first token timed from this send)."""
        gw = self.gw
        engine = self.upstream.engine
        now = gw.clock.now()
        if self.prefill_key is not None:
            gw.prefills.end(engine, self.prefill_key, now)
            self.prefill_key = None
        self.meter = TokenMeter(anthropic=False, on_token=self.meter.on_token, ndjson=False)
        self.quiet = QuietTally(gw.prefills, engine, self._in_flight_now)
        self.sent_at_s = self.unblocked_at_s = now
        self._begin_prefill()

    def _begin_prefill(self) -> None:
        """The request was sent: in prefill from now until its first token (gateway/prefills.py), which leaves
        the intervals of the streams beside it that it touched out of their rates. The daemon is told only of
        a long prompt's, and only where its first token will be seen (``policies.health.prefill_counts``)."""
        self.prefill_key = self.gw.prefills.begin(self.upstream.engine,
                                                  tell=self.stream_requested and not self.short_prompt)
        self.quiet.own = self.prefill_key

    async def _engine_went_down(self, timeout_s: float) -> bool:
        """The daemon shows the engine down (stopping, restarting, in backoff, hung, gone) within ``timeout_s``:
        its run ended with this request in it. An engine shown serving all that time runs on: it dropped the
        request itself. A backend that shows no states (a test's) is taken to show it down."""
        gw = self.gw
        engine = self.upstream.engine
        deadline_s = gw.clock.now() + timeout_s
        while True:
            entry = self._engine_entry()
            if entry is None or entry.get("state", "") not in resend.SERVING_STATES:
                return True
            left_s = deadline_s - gw.clock.now()
            if left_s <= 0:
                gw.log.warning("gateway.engine_dropped_request", engine=engine,
                               note="the engine closed the connection without answering and runs on: not sent again")
                return False
            await anyio.sleep(min(0.05, left_s))

    async def _engine_serving(self, timeout_s: float) -> bool:
        """The engine is serving again (within ``timeout_s``), as the daemon's hold decides; never a
        start the request alone would cause: an engine stopped or failed meanwhile stays so."""
        gw = self.gw
        engine = self.upstream.engine
        entry = self._engine_entry()
        if entry is None or entry.get("state") in ("stopped", "failed"):
            state = "gone" if entry is None else str(entry.get("state"))
            self.unavailable = EngineUnavailable(
                # Not retried by the SDKs (x-should-retry: false): a stopped engine is started by a person
                # (or a new request, where gateway.swaps lets it), a failed one by `llmctl start --force`.
                engine, "engine_not_running" if state == "stopped" else state,
                f"it went down with this request and is {state}: it is not started again for it")
            return False
        self.awaiting_engine = True
        try:
            if not self._client_streams() or self._client_send is None or self._tg is None:
                return await self._wait_engine_serving(timeout_s)
            # A stream waits like one held for a loading engine: its head, then comments, so the client does
            # not time out while the engine restarts (a 200 GB model: minutes). The comments run in the
            # exchange's task group (an error of the wait stays itself, not a group) and end with the wait:
            # cancelled before the resend, they never meet the engine's bytes.
            keepalive = anyio.CancelScope()

            async def hold_stream() -> None:
                with keepalive:
                    await self._hold_stream()

            self._tg.start_soon(hold_stream)
            try:
                return await self._wait_engine_serving(timeout_s)
            finally:
                keepalive.cancel()
        finally:
            self.awaiting_engine = False
            self.unblocked_at_s = gw.clock.now()

    def _client_streams(self) -> bool:
        """The client asked for an SSE stream and gets the engine's (translated) stream: not a whole answer
        rebuilt from a stream (a non-streamed request fetched as one, or translated), not Ollama's JSON lines."""
        return (self.stream_requested and self.reassembly is None and not self.ndjson
                and (self.translation is None or self.translation.stream))

    async def _hold_stream(self) -> None:
        """A stream held in a resend: after ``hold.HOLD_DETECT_S`` its head (unless a hold before sent it), then
        an SSE comment every ``hold_keepalive_s`` until cancelled (the engine serves again, or will not)."""
        gw = self.gw
        await anyio.sleep(hold.HOLD_DETECT_S)
        since_s = gw.clock.now()
        send = self._client_send
        if self._after_head is None:
            try:
                await send(hold.EARLY_HEAD)
            except OSError:
                return  # the client is gone: its disconnect ends the exchange
            anthropic = self.anthropic
            self._after_head = hold.AfterHead(
                send, anthropic, lambda status, message, code: error_body(anthropic, status, message, code))
        engine = self.upstream.engine
        await hold.keep_alive(send, gw.settings.hold_keepalive_s, gw.clock.now, since_s,
                              lambda: gw._engine_state(engine))

    async def _wait_engine_serving(self, timeout_s: float) -> bool:
        gw = self.gw
        engine = self.upstream.engine
        try:
            with anyio.move_on_after(timeout_s):
                # Never a start the resend alone would cause: an engine stopped meanwhile (by an operator, a
                # swap, its idle unload) stays stopped; a restart under way is waited for as before.
                return (await gw.backend.acquire(engine, may_start=False)).engine == engine
        except EngineUnavailable as exc:  # backoff, failed, ...: the client gets that answer
            if exc.reason == "engine_not_running":  # a resend never starts it, whatever gateway.swaps says
                state = gw._engine_state(engine)[1]
                exc = EngineUnavailable(engine, exc.reason, start_refused_message(engine, state, SwapPermission.ALLOWED))
            self.unavailable = exc
            return False
        except SupervisordLLMError:
            return False
        return False

    async def _exchange(self, send: Any, tg: anyio.abc.TaskGroup) -> None:
        gw = self.gw
        upstream = self.upstream
        headers_sent = False
        is_sse = is_lines = False
        self._client_send = send
        with self.pump_scope:
            try:
                response = self.response = await self._send_upstream()
            except httpx.TimeoutException as exc:
                send = self._after_head or send  # held in a resend: its head went out (errors as an SSE event)
                self.upstream_failed = True
                self.response_complete = True
                await _send_json(
                    send,
                    error_body(
                        self.anthropic,
                        504,
                        f"engine {upstream.engine!r} did not answer in time: {exc}",
                        "upstream_timeout",
                        engine=upstream.engine,
                    ),
                    504,
                )
                return
            except httpx.HTTPError as exc:
                send = self._after_head or send
                self.upstream_failed = True
                self.response_complete = True
                gw.log.warning(
                    "gateway.upstream_failed", engine=upstream.engine, error=type(exc).__name__
                )
                if self.unavailable is not None:  # it died with the request, and is down for a while
                    body, headers = gw._unavailable_parts(self.unavailable, self.anthropic)
                    await _send_json(send, body, self.unavailable.status, headers)
                    return
                code, message = _unanswered(upstream.engine, upstream.base_url, exc, self.sends)
                await _send_json(send, error_body(self.anthropic, 502, message, code, engine=upstream.engine), 502)
                return
            send = self._after_head or send  # held in a resend: the engine's head is dropped, its errors an event
            if response.status_code >= 500:
                self.upstream_failed = True
            content_type = response.headers.get("content-type", "")
            is_sse = content_type.startswith("text/event-stream")
            # Ollama's stream of JSON lines: passed through as it comes, metered and watched like SSE.
            is_lines = self.ndjson and content_type.startswith("application/x-ndjson")
            if self.translation is not None:
                if await self._pump_translated(send, response, tg):
                    return
            if self.reassembly is not None and is_sse and response.status_code < 400:
                await self._answer_reassembled(send)
                return
            if response.status_code >= 400 and not (is_sse or self.ndjson):
                await self._engine_refusal(send, response)  # (Ollama's own API: its {"error": "..."} is the shape)
                return
            drop = _RESPONSE_DROP if is_sse or is_lines else _RESPONSE_DROP - _NO_CONTENT_LENGTH
            if is_sse or is_lines:
                drop = drop | _NO_CONTENT_LENGTH
                self._start_stall_watch()
            raw_headers = [
                (k.lower(), v) for k, v in response.headers.raw if k.lower().decode() not in drop
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": raw_headers,
                }
            )
            headers_sent = True
            try:
                if is_sse or is_lines:
                    await self._pump_sse(response, send)
                    if self.client_cut:
                        self.response_complete = True
                        return
                    self.meter.end(gw.clock.now())
                    if (response.status_code < 400 and self.stalled is None and self.meter.error is None
                            and not self.meter.answer_ended and not self.stopping_cut):
                        # Its connection ended, its answer did not (mlx_lm.server's HTTP/1.0 stream ends with
                        # the connection, also when the engine died): the client hears that, not a clean end.
                        raise httpx.RemoteProtocolError(
                            "the engine closed its stream before its end (no [DONE], no finish_reason)",
                            request=httpx.Request("POST", str(upstream.base_url)))
                else:
                    collected: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_raw():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        size += len(chunk)
                        if size <= _COLLECT_LIMIT_BYTES:
                            collected.append(chunk)
                    if size <= _COLLECT_LIMIT_BYTES and response.status_code < 400:
                        self.non_stream_tokens = usage_tokens_of(b"".join(collected))
            except OSError:  # the client went away while we were sending (ASGI spec 2.4)
                self.client_gone = True
                return
            except httpx.HTTPError as exc:
                self.upstream_failed = True
                gw.log.warning(
                    "gateway.upstream_broke", engine=upstream.engine, error=type(exc).__name__
                )
                self.response_complete = True
                broke = f"engine {upstream.engine!r} broke off the stream: {str(exc) or type(exc).__name__}"
                if is_sse:
                    await _send_quietly(send, _sse_error(self.anthropic, 502, broke, "upstream_broke_stream"))
                elif is_lines:
                    await _send_quietly(send, _ndjson_error(broke))
                await _send_quietly(send, b"", more=False)
                return
        headers_sent = headers_sent or self.translated_headers_sent
        # Cut while a resend waited or after it (a stall, the client's pace): the held head went out already.
        send = self._after_head or send
        if self.stopping_cut and self.stalled is None:
            self.response_complete = True
            message = (f"the gateway is stopping (the supervisor daemon restarts or stops): this request to engine "
                       f"{upstream.engine!r} was ended after the gateway's shutdown_grace_s; send it again")
            if headers_sent:
                # An event only into a stream whose answer has not ended (a plain body keeps its length: nothing
                # can be added to it; the server's close ends it).
                if (is_sse or is_lines or self.translated_headers_sent) and not self.meter.answer_ended:
                    await _send_quietly(send, _ndjson_error(message) if self.ndjson else _sse_error(
                        self.anthropic, 503, message, "gateway_stopping"))
                    await _send_quietly(send, b"", more=False)
            elif self.ndjson:
                await _send_json(send, {"error": message}, 503)
            else:
                await _send_json(send, error_body(self.anthropic, 503, message, "gateway_stopping",
                                                  engine=upstream.engine), 503, {"retry-after": "5"})
            return
        if self.stalled is not None:
            phase, stalled_for_s = self.stalled
            gw.call_backend("stall_detected", upstream.engine, phase, stalled_for_s)
            gw.log.warning(
                "gateway.stall_detected",
                engine=upstream.engine,
                phase=phase,
                stalled_for_s=round(stalled_for_s, 3),
            )
            message = (
                f"engine {upstream.engine!r} stalled: no token for {stalled_for_s:.1f}s "
                f"during {phase}; the request was ended"
            )
            self.response_complete = True
            if headers_sent:
                await _send_quietly(
                    send, _ndjson_error(message) if self.ndjson else _sse_error(self.anthropic, 504, message,
                                                                                  "engine_stalled")
                )
                await _send_quietly(send, b"", more=False)
            elif self.ndjson:
                await _send_json(send, {"error": message}, 504)  # Ollama's own error shape
            else:
                await _send_json(
                    send,
                    error_body(
                        self.anthropic,
                        504,
                        message,
                        "engine_stalled",
                        engine=upstream.engine,
                        phase=phase,
                    ),
                    504,
                )
            return
        if self.meter.error is not None:
            self.upstream_failed = True
        self.response_complete = True
        await _send_quietly(send, b"", more=False)

    async def _pump_sse(self, response: UpstreamResponse, send: Any) -> None:
        """Pass an engine's event stream through, read at the engine's own pace."""
        async with aclosing(self._engine_chunks(response)) as chunks:
            await self._pump_buffered(chunks, send)

    async def _pump_buffered(self, source: AsyncIterator[bytes], send: Any) -> None:
        """Read ``source`` (the engine's bytes, metered as they arrive) into a bounded buffer at the
        engine's pace; the client drains it at its own pace.

        A send that does not complete within ``client_timeout_s`` (the client stopped reading, or
        its socket stayed full) cuts the client. An error of the source (the engine broke off, an
        error event) is raised here after the buffer is closed, as if it had been read inline.
        """
        gw = self.gw
        now = gw.clock.now
        loop = asyncio.get_running_loop()
        buffer = _StreamBuffer(gw.settings.client_buffer_bytes)
        timeout_s = gw.settings.client_timeout_s
        read_error: list[Exception] = []
        send_error: list[OSError] = []
        # When the send in progress began (None: no send in progress). One timer per stream holds
        # the client to client_timeout_s per send, instead of a cancel scope and a timer per chunk.
        sending_since: float | None = None
        reading = anyio.CancelScope()
        sending = anyio.CancelScope()
        reader_done = anyio.Event()
        reader_started = False
        watch: asyncio.TimerHandle | None = None

        async def read_engine() -> None:
            nonlocal reader_started
            reader_started = True
            try:
                with reading:
                    async for chunk in source:
                        if buffer.full():
                            self.blocked_since_s = now()
                            self.held_back = True
                            await buffer.wait_room()
                            self.unblocked_at_s = now()
                            self.blocked_since_s = None
                        buffer.put(chunk)
            except Exception as exc:
                read_error.append(exc)
            finally:
                buffer.close()
                reader_done.set()

        def watch_client() -> None:
            # Waiting timeout_s while no send is in progress is exact: a send that begins meanwhile
            # is due no earlier than the next tick, which then waits until it is due.
            nonlocal watch
            since = sending_since
            wait_s = timeout_s if since is None else since + timeout_s - now()
            if wait_s > 0:
                watch = loop.call_later(wait_s, watch_client)
                return
            watch = None
            self.client_cut = True
            sending.cancel()  # first: the cut stands whatever happens below
            reading.cancel()
            gw.stats.clients_cut += 1
            gw.log.warning(
                "gateway.client_cut",
                engine=self.upstream.engine,
                reason="the client did not read its stream within client_timeout_s",
                client_timeout_s=timeout_s,
                buffered_bytes=buffer.size_bytes,
                tokens_read=self.meter.tokens,
            )

        # The reader runs in the exchange's task group: a task group of its own per stream would cost
        # the first byte its set-up. It is always waited for below: ``source`` is closed after this.
        assert self._tg is not None
        self._tg.start_soon(read_engine)
        watch = loop.call_later(timeout_s, watch_client)
        try:
            with sending:
                while True:
                    await buffer.wait_data()
                    if not buffer.chunks:
                        break  # the engine's stream ended and everything was sent
                    data = buffer.take()
                    sending_since = now()
                    try:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    except OSError as exc:  # the client went away: raised below
                        send_error.append(exc)
                        break
                    finally:
                        sending_since = None
                    self.client_fed_at_s = now()
                    buffer.taken(len(data))
        finally:
            if watch is not None:
                watch.cancel()
            reading.cancel()
            if reader_started:  # (a task that never ran has nothing open; it ends at once when it does)
                with anyio.CancelScope(shield=True):
                    await reader_done.wait()
        if send_error:
            raise send_error[0]
        if read_error and not self.client_cut:
            raise read_error[0]

    async def _pump_translated(
        self, send: Any, response: UpstreamResponse, tg: anyio.abc.TaskGroup
    ) -> bool:
        """Relay the engine's chat completion stream as Messages events (or one Message).

        The engine's bytes go through the same meter as on passthrough, as they arrive, so the
        watchdog sees the engine's own progress. True when the exchange is over; False when a
        stall cancelled it (the caller reports the stall).
        """
        translation = self.translation
        assert translation is not None
        upstream = self.upstream
        gw = self.gw
        if response.status_code >= 400 or not response.headers.get(
            "content-type", ""
        ).startswith("text/event-stream"):
            await self._translated_refusal(send, response)
            return True
        self._start_stall_watch()
        if translation.stream:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            self.translated_headers_sent = True
        translator = translation.translator
        relay = translation.relay
        now = gw.clock.now
        code = "engine_error"
        try:
            await _send_some(send, relay(translator.start()))
            self.client_fed_at_s = now()
            if translation.stream:
                tg.start_soon(self._ping_while_quiet, send)

            async def translated() -> AsyncGenerator[bytes, None]:
                async with aclosing(self._engine_chunks(response)) as chunks:
                    async for chunk in chunks:
                        out = relay(translator.feed(chunk))
                        if out:
                            yield out
                        if translator.done:
                            return  # a stop sequence matched: closing the stream stops the engine
                out = relay(translator.finish())
                if out:
                    yield out

            # Engine-paced like passthrough: a client that stops reading fills its own buffer
            # and is cut after client_timeout_s; the engine's tokens are metered as they arrive.
            async with aclosing(translated()) as out_chunks:
                await self._pump_buffered(out_chunks, send)
            if self.client_cut:
                self.response_complete = True
                return True
        except anthropic_api.EngineStreamCut as exc:
            gw.log.warning("gateway.upstream_broke", engine=upstream.engine, error="stream ended before its end")
            code = "upstream_broke_stream"
            message = f"engine {upstream.engine!r} broke off the stream: {exc}"
        except anthropic_api.EngineStreamError as exc:
            message = f"engine {upstream.engine!r} reported an error mid-stream: {exc}"
        except OSError:  # the client went away while we were sending (ASGI spec 2.4)
            self.client_gone = True
            return True
        except httpx.HTTPError as exc:
            gw.log.warning("gateway.upstream_broke", engine=upstream.engine, error=type(exc).__name__)
            code = "upstream_broke_stream"
            message = f"engine {upstream.engine!r} broke off the stream: {type(exc).__name__}"
        else:
            if self.meter.error is not None:
                self.upstream_failed = True
            self.response_complete = True
            if translation.stream:
                await _send_quietly(send, b"", more=False)
            else:
                await _send_json(send, translation.message.message, 200)
            return True
        self.upstream_failed = True
        self.response_complete = True
        if self.translated_headers_sent:
            await _send_quietly(send, _sse_error(True, 502, message, code))
            await _send_quietly(send, b"", more=False)
        else:
            await _send_json(send, error_body(True, 502, message, code, engine=upstream.engine), 502)
        return True

    async def _answer_reassembled(self, send: Any) -> None:
        """The answer to a non-streamed request fetched as a stream (read whole in ``_send_once``)."""
        reassembly = self.reassembly
        assert reassembly is not None
        upstream = self.upstream
        self.response_complete = True
        if reassembly.error is not None:
            self.upstream_failed = True
            error = reassembly.error
            message = error.get("message") if isinstance(error, dict) else error
            await _send_json(send, error_body(
                self.anthropic, 502, f"engine {upstream.engine!r} reported an error: {message}", "engine_error",
                engine=upstream.engine), 502)
            return
        if reassembly.usage is None and upstream.engine not in self.gw.not_streaming:
            # The engine ignored stream_options.include_usage: its streams carry no token counts, which its
            # non-streamed answers give. Its later requests go as sent, so a client counting tokens keeps them.
            self.gw.not_streaming.add(upstream.engine)
            self.gw.log.warning("gateway.engine_streams_no_usage", engine=upstream.engine)
        await _send_json(send, reassembly.answer(), 200)

    async def _ping_while_quiet(self, send: Any) -> None:
        """A ``ping`` event whenever the client got nothing for a while (a long prefill, say).

        Engines that send keep-alives while they prefill (mlx_lm.server) already become pings in
        the translator; this covers those that send nothing. Pings are for the client only: the
        watchdog reads the engine's bytes, so a ping is never progress.
        """
        assert self.translation is not None
        translator = self.translation.translator
        now = self.gw.clock.now
        ping = anthropic_api.events_bytes([{"type": "ping"}])
        while True:
            wait_s = self.client_fed_at_s + TRANSLATED_PING_INTERVAL_S - now()
            if wait_s > 0:
                await anyio.sleep(wait_s)
                continue
            if self.response_complete or translator.done:
                return
            self.client_fed_at_s = now()
            await _send_quietly(send, ping)

    async def _engine_chunks(self, response: UpstreamResponse) -> AsyncGenerator[bytes, None]:
        """The engine's body as it arrives, each chunk through the token meter before anyone else.

        The meter is the watchdog's view of the engine: it sees the engine's own bytes at the
        moment they arrive, whatever is then made of them for the client.
        """
        feed = self.meter.feed
        now = self.gw.clock.now
        async for chunk in response.aiter_raw():
            feed(chunk, now())
            yield chunk

    async def _engine_refusal(self, send: Any, response: UpstreamResponse) -> None:
        """The engine answered with an error (status 400 and up): passed on with its status and headers, its body
        untouched where it is in the client's API shape, else rewritten into it (``engine_error_body``)."""
        raw, whole = await _read_error_body(response)
        self.response_complete = True
        status = response.status_code
        headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower().decode() not in _RESPONSE_DROP]
        if whole and engine_error_shaped(self.anthropic, raw):
            try:
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": raw, "more_body": False})
            except OSError:  # the client went away (ASGI spec 2.4)
                self.client_gone = True
            return
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if not k.startswith(b"content-")}
        body = engine_error_body(self.anthropic, self.upstream.engine, status, raw)
        await _send_json(send, body, status, kept)

    async def _translated_refusal(self, send: Any, response: UpstreamResponse) -> None:
        """The engine refused the translated request: its reason, in the Messages error shape."""
        upstream = self.upstream
        raw, _ = await _read_error_body(response)
        self.response_complete = True
        status = response.status_code
        if status < 400:
            self.upstream_failed = True
            message = (
                f"engine {upstream.engine!r} answered the translated request without a stream "
                f"({response.headers.get('content-type') or 'no content type'})"
            )
            await _send_json(send, error_body(True, 502, message, "engine_error", engine=upstream.engine), 502)
            return
        client_status = translated_error_status(status, upstream.kind)
        body = engine_error_body(True, upstream.engine, status, raw, client_status=client_status,
                                 translated_to=OPENAI_PATHS[0])
        # The engine's own wait (a 429's or a 503's Retry-After) is the client's too.
        retry_after = response.headers.get("retry-after")
        await _send_json(send, body, client_status, headers={"retry-after": retry_after} if retry_after else None)

    def _finish(self, counts: dict[str, int]) -> None:
        meter = self.meter
        if self.stalled is not None:
            ended = "stalled"
        elif self.stopping_cut:
            ended = "gateway_stopping"
        elif self.client_cut:
            ended = "client_too_slow"
        elif self.client_gone and not meter.finished:
            # A client that leaves once the engine's own end marker has passed (an SDK stops reading at [DONE])
            # got its whole answer.
            ended = "client_disconnected"
        elif self.upstream_failed:
            ended = "upstream_error"
        else:
            ended = "complete"
        counts[ended] += 1
        first, last = meter.first_token_at_s, meter.last_token_at_s
        tokens = meter.tokens
        now = self.gw.clock.now()
        self.quiet.settle()  # its last arrival, before its own span's end (a request fetched as a stream)
        if self.prefill_key is not None:  # no token came: in prefill until now
            self.gw.prefills.end(self.upstream.engine, self.prefill_key, now)
            self.prefill_key = None
        if self.non_stream_tokens is not None and not tokens:
            tokens = self.non_stream_tokens
        stats = RequestStats(
            engine=self.upstream.engine,
            ttft_s=None if first is None else first - self.sent_at_s,
            tokens=tokens,
            decode_s=None if first is None or last is None else last - first,
            max_gap_s=meter.max_gap_s,
            ended=ended,
            duration_s=now - self.sent_at_s if self.sent_at_s else None,
            quiet=QuietDecode(self.quiet.tokens, self.quiet.seconds, meter.counted_tokens, self.quiet.in_flight_s),
            held_back=self.held_back,
        )
        self.gw.call_backend("request_finished", stats)


def _give_back(result: Any) -> None:
    """A held request's forward is over (or never ran): its engine slot goes back."""
    if isinstance(result, _Forward) and result.on_done is not None:
        done, result.on_done = result.on_done, None
        done()


async def _send_json(send: Any, body: dict[str, Any], status: int,
                     headers: Mapping[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    try:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data, "more_body": False})
    except OSError:
        pass


async def _send_some(send: Any, body: bytes) -> None:
    if body:
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_quietly(send: Any, body: bytes, more: bool = True) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": more})
    except OSError:
        pass


class _BodyTooLarge(Exception):
    pass


class _StreamBuffer:
    """Chunks read from the engine that the client has not taken yet, bounded in bytes.

    One reader task puts, one writer task takes; ``size_bytes`` drops only once a send returned, so
    a client that stops reading keeps the buffer full and the reader waits (never unbounded).
    The gateway runs on asyncio (its own loop, gateway/bridge.py): the two wake-ups are asyncio
    events reused for the whole stream, since this runs once per chunk.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.chunks: deque[bytes] = deque()
        self.size_bytes = 0
        self.eof = False
        self._data = asyncio.Event()
        self._room = asyncio.Event()

    def full(self) -> bool:
        return self.size_bytes >= self.limit_bytes

    def put(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size_bytes += len(chunk)
        self._data.set()

    def close(self) -> None:
        self.eof = True
        self._data.set()

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    def taken(self, size_bytes: int) -> None:
        self.size_bytes -= size_bytes
        self._room.set()

    async def wait_data(self) -> None:
        while not self.chunks and not self.eof:
            self._data.clear()
            await self._data.wait()

    async def wait_room(self) -> None:
        while self.full():
            self._room.clear()
            await self._room.wait()


class _Gateway:
    """The gateway's request handling; one per app."""

    def __init__(
        self, backend: GatewayBackend, settings: GatewaySettings, clock: Clock, log: Any
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.clock = clock
        self.log = log
        self.stats = GatewayStats(settings.listen)
        self.lines = EngineLines(lambda engine, occupied: self.call_backend("line_changed", engine, occupied))
        # Engines that answered a request fetched as a stream with a whole body, or with a stream without usage:
        # not fetched so again.
        self.not_streaming: set[str] = set()
        self.prefills = PrefillSpans(lambda *change: self.call_backend("prefill_changed", *change))
        self.open_forwards: set[_Forward] = set()  # requests being answered now (end_open ends them)
        self.stopping = anyio.Event()  # set by end_open: requests still waiting to be routed end too
        self.client: httpx.AsyncClient = None  # type: ignore[assignment]  # made in the lifespan
        # Forwarded requests go through this one (gateway/upstream.py: the per-token hot path).
        self.upstream_client: UpstreamClient = None  # type: ignore[assignment]  # made in the lifespan
        self._api_key = settings.api_key.encode() if settings.api_key else None
        # swaps = "with_key" on loopback: the key is needed to start or swap an engine, not to use one.
        self._key_needed = key_needed_to_use(SwapPermission(settings.swaps), has_key=self._api_key is not None,
                                             loopback=is_loopback(settings.host))

    def end_open(self) -> None:
        """The gateway stops and its grace is about over: every request still being answered ends now with an
        error in its client's shape (a stream's error event), not a bare close when the server cancels it."""
        self.stopping.set()
        for forward in list(self.open_forwards):
            if not forward.response_complete:
                forward.stopping_cut = True
                forward.pump_scope.cancel()

    def make_client(self) -> httpx.AsyncClient:
        s = self.settings
        return httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=s.upstream_connect_timeout_s,
                read=s.upstream_read_timeout_s,
                write=s.upstream_read_timeout_s,
                pool=s.hold_s,
            ),
            limits=httpx.Limits(
                max_connections=s.max_upstream_connections,
                max_keepalive_connections=min(64, s.max_upstream_connections),
                keepalive_expiry=30.0,
            ),
            follow_redirects=False,
            trust_env=False,
        )

    def make_upstream_client(self) -> UpstreamClient:
        s = self.settings
        return UpstreamClient(connect_timeout_s=s.upstream_connect_timeout_s, read_timeout_s=s.upstream_read_timeout_s,
                              max_connections=s.max_upstream_connections, pool_timeout_s=s.hold_s)

    def call_backend(self, method: str, *args: Any) -> None:
        try:
            getattr(self.backend, method)(*args)
        except Exception:
            self.log.exception("gateway.backend_failed", method=method)

    # -- checks ------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """The request carries the gateway's key (always, where it has none)."""
        if self._api_key is None:
            return True
        given = self._given_key(request)
        if not given:
            return False
        return hmac.compare_digest(given.encode(), self._api_key)

    def admits(self, request: Request) -> bool:
        """The request may use the gateway: it carries the key, or no key is needed to use an engine
        (``key_needed_to_use``: then a request without the right key, none or a placeholder such as
        Claude Code's ``ANTHROPIC_AUTH_TOKEN``, uses what is resident and starts nothing)."""
        return not self._key_needed or self.authorized(request)

    @staticmethod
    def _given_key(request: Request) -> str | None:
        headers = request.headers
        given = headers.get("x-api-key")
        auth = headers.get("authorization")
        if auth and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return given or None

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _BodyTooLarge
            parts.append(part)
        return b"".join(parts)

    # -- endpoints ---------------------------------------------------------------------------

    def unauthorized(self, anthropic: bool) -> JSONResponse:
        self.stats.refuse("key")
        return error_response(
            anthropic,
            401,
            "missing or wrong API key; send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            "invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )

    async def models(self, request: Request) -> Response:
        anthropic_client = "anthropic-version" in request.headers
        if not self.admits(request):
            return self.unauthorized(anthropic_client)
        try:
            entries = [_listed(m) for m in self.backend.models()]
        except Exception:
            self.log.exception("gateway.backend_failed", method="models")
            return error_response(
                anthropic_client, 500, "the daemon could not list its models", "models_failed"
            )
        if anthropic_client:
            data = [
                {
                    "type": "model",
                    "id": m["id"],
                    "display_name": m.get("display_name", m["id"]),
                    "created_at": m.get("created_at", "1970-01-01T00:00:00Z"),
                    **{k: v for k, v in m.items() if k not in ("id", "created_at")},
                }
                for m in entries
            ]
            return JSONResponse(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            )
        data = [
            {"object": "model", "created": 0, "owned_by": "supervisord-llm", **m} for m in entries
        ]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        anthropic_client = "anthropic-version" in request.headers
        if not self.admits(request):
            return self.unauthorized(anthropic_client)
        model_id = request.path_params["model_id"]
        if not model_id:  # /v1/models/ with its trailing slash: the list, not the default engine's model
            return await self.models(request)
        entries = [_listed(m) for m in self.backend.models()]
        routed = self.backend.engine_for(model_id)  # a name its model is served under too
        for entry in entries:
            if entry["id"] == model_id or model_id in (entry.get("aliases") or ()) or entry["id"] == routed:
                return JSONResponse(
                    {"object": "model", "created": 0, "owned_by": "supervisord-llm", **entry}
                )
        known = ", ".join(e["id"] for e in entries) or "(none)"
        return error_response(
            anthropic_client,
            404,
            f"no model {model_id!r}; available models: {known}",
            "model_not_found",
        )

    async def health(self, request: Request) -> Response:
        """Liveness for a load balancer, a container's health check or an uptime monitor: the gateway answers
        (no key needed: it says nothing about the engines; /v1/models and ``llmctl status`` do)."""
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    async def status(self, request: Request) -> Response:
        if not self.admits(request):
            return self.unauthorized(False)
        return JSONResponse(self.stats.snapshot())

    async def forward(self, request: Request) -> Response | _Counted:
        scope = request.scope
        path = scope["path"]  # decoded once; forwarded as it is only once it is one of the paths allowed
        anthropic = _messages_path(path)
        if not self.admits(request):
            return self.unauthorized(anthropic)
        # Only inference paths reach an engine, judged on the path as sent: a client, a proxy or an engine
        # would normalise /v1/../api/pull into /api/pull (Ollama's pull).
        verdict = check_path(scope.get("raw_path") or path.encode(), request.method)
        if not verdict.ok:
            self.stats.refuse("method" if verdict.status == 405 else "path")
            return error_response(anthropic, verdict.status, verdict.message, verdict.code,
                                  headers={"allow": verdict.allow} if verdict.allow else None)
        stats = self.stats
        stats.in_flight += 1
        stats.requests_total += 1
        try:
            response = await self._prepare(request, path, anthropic)
        except BaseException:
            stats.in_flight -= 1
            raise
        if isinstance(response, _Forward | hold.HeldStream | hold.WatchedRoute):
            return _Counted(response, stats)
        stats.in_flight -= 1
        return response

    async def _prepare(self, request: Request, path: str, anthropic: bool) -> Response | _Forward | hold.HeldStream | hold.WatchedRoute:
        try:
            with anyio.fail_after(self.settings.body_timeout_s):
                body = await self.read_body(request)
        except TimeoutError:
            self.stats.refuse("body_timeout")
            # The connection is closed with it: the rest of this body, or a next request sent on the connection,
            # would otherwise be read out of step (a new request's first bytes taken as this body's end).
            return error_response(
                anthropic, 408, f"the request body did not arrive within the gateway's body_timeout_s "
                f"({self.settings.body_timeout_s:g}s)", "request_timeout", headers={"connection": "close"}
            )
        except ClientDisconnect:
            # The client is gone: nobody reads this answer and nothing was forwarded. An error reply
            # (not an exception) keeps it out of the server's error log; one such client is routine.
            self.log.info("gateway.client_disconnected", path=path, phase="request_body")
            return error_response(
                anthropic, 400, "the client disconnected before its request body was complete",
                "client_disconnected"
            )
        except _BodyTooLarge:
            self.stats.refuse("body_too_large")
            limit = self.settings.max_body_bytes
            return error_response(
                anthropic,
                413,
                f"request body is larger than the gateway's max_body_bytes ({limit} bytes)",
                "request_too_large",
                max_body_bytes=limit,
            )
        model: str | None = None
        stream = False
        doc: Any = None
        content_type = request.headers.get("content-type", "")
        # Whatever its content type (curl -d sends a form's): its model decides the engine it goes to.
        needs_json = path in OPENAI_PATHS or path == EMBEDDINGS_PATH or path in OLLAMA_API_PATHS or anthropic
        if body and (needs_json or "json" in content_type):
            try:
                doc = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
            except ValueError as exc:
                return self._invalid(anthropic, f"request body is not valid JSON: {exc}", "invalid_json")
            except RecursionError:
                return self._invalid(anthropic, "request body is nested too deeply to parse; keep JSON nesting "
                                     f"under {anthropic_api.MAX_NESTING_DEPTH} levels", "invalid_json")
            if needs_json and not isinstance(doc, dict):
                return self._invalid(anthropic, "request body must be a JSON object", "invalid_json")
            if isinstance(doc, dict):
                raw_model = doc.get("model")
                if raw_model is not None and not isinstance(raw_model, str):
                    return self._invalid(anthropic, f"'model' must be a string, got {type(raw_model).__name__}",
                                         "invalid_model")
                model = raw_model or None
                # Ollama's own API streams lines of JSON (and does so by default): no SSE early head or
                # comments may go into them, so it is passed through as a plain body, held without either.
                stream = doc.get("stream") is True and path not in OLLAMA_API_PATHS
        elif needs_json and request.method == "POST":
            return self._invalid(anthropic, "request body is empty; expected a JSON object", "invalid_json")

        if path in (MESSAGES_PATH, COUNT_TOKENS_PATH) and isinstance(doc, dict):
            # The Messages API's own rules (max_tokens, messages, roles), checked before anything is started or
            # swapped in for the request: a request bound to fail must not cost the resident model its place.
            # What only the translation needs (block types, tools) is checked when it translates.
            try:
                anthropic_api.check_envelope(doc, count=path == COUNT_TOKENS_PATH)
            except anthropic_api.RequestInvalid as exc:
                self.stats.refuse("invalid_request")
                return error_response(True, 400, str(exc), "invalid_request", field=exc.field)
        if path in KIND_DEPENDENT_PATHS:
            entry = self._engine_entry(model)
            if entry is not None:  # known before routing: no engine is started for a path it does not serve
                served = engine_serves(str(entry.get("engine")), path)
                if not served.ok:
                    self.stats.refuse("path")
                    return error_response(anthropic, served.status, served.message, served.code, engine=entry["id"])
        if path == COUNT_TOKENS_PATH and isinstance(doc, dict):
            entry = self._engine_entry(model)
            state = entry.get("state") if entry is not None else None
            if entry is not None and state is not None and state not in ("ready", "degraded"):
                # A count never starts an engine (a 200 GB load), swaps one out or waits for one that loads.
                try:  # the fields of a message, without max_tokens, as a translated count checks them
                    doc = anthropic_api.check_request({"max_tokens": 1, **doc}).doc
                except anthropic_api.RequestInvalid as exc:
                    return error_response(True, 400, str(exc), "invalid_request", field=exc.field)
                return JSONResponse({"input_tokens": anthropic_api.estimate_tokens(doc)}, headers={
                    TOKEN_COUNT_HEADER: f"estimate ({anthropic_api.ESTIMATE_BYTES_PER_TOKEN} bytes per token; engine "
                    f"{entry['id']!r} is {state}: a count does not start it or wait for it)"})
        if stream:
            upstream = self.backend.try_pass(model)
            if (upstream is not None and (upstream.supports_messages or not anthropic)
                    and self.lines.admits_now(upstream.engine, upstream.max_concurrent, upstream.max_queue)):
                # On a pass, with room in its engine's line: nothing to wait for, so nothing to hold.
                return await self._route(request, path, anthropic, doc, body, stream, model, upstream)
            # Any stream may wait, not only one for a loading engine: behind another engine's turn
            # (gateway/turns.py), or in its engine's line. HeldStream sends the early head only once
            # the route has taken longer than hold.HOLD_DETECT_S, so an answer decided at once (a
            # refusal by a full queue: a real 429) keeps its own status.
            return hold.HeldStream(
                lambda: self._unless_stopping(
                    lambda: self._route(request, path, anthropic, doc, body, stream, model, upstream), anthropic),
                anthropic=anthropic,
                keepalive_s=self.settings.hold_keepalive_s, now=self.clock.now,
                state=lambda: self._engine_state(model), finish=_give_back,
                error_body=lambda status, message, code: error_body(anthropic, status, message, code))
        upstream = self.backend.try_pass(model)
        if upstream is not None and self.lines.admits_now(upstream.engine, upstream.max_concurrent,
                                                          upstream.max_queue):
            return await self._route(request, path, anthropic, doc, body, stream, model, upstream)
        # It may wait (its engine loading, another engine's turn, its line): a client that leaves meanwhile
        # gives up its place, and its request never reaches the engine.
        return hold.WatchedRoute(lambda: self._unless_stopping(
            lambda: self._route(request, path, anthropic, doc, body, stream, model, upstream), anthropic),
            finish=_give_back)

    async def _unless_stopping(self, route: Callable[[], Awaitable[Response | _Forward]],
                               anthropic: bool) -> Response | _Forward:
        """``route()``, unless the gateway stops while it waits (for its engine, its turn, its line): then a 503
        its client can read (a held stream's error event), not a close when the server cancels what is left."""
        result: list[Response | _Forward] = []
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                result.append(await route())
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            await self.stopping.wait()
            tg.cancel_scope.cancel()
        if result:
            return result[0]
        return error_response(anthropic, 503, "the gateway is stopping (the supervisor daemon restarts or stops) "
                              "while this request waited; send it again", "gateway_stopping",
                              headers={"retry-after": "5"})

    def _invalid(self, anthropic: bool, message: str, code: str) -> JSONResponse:
        """A 400 for a body the gateway cannot forward (not JSON, not an object, a bad model), counted."""
        self.stats.refuse(code)
        return error_response(anthropic, 400, message, code)

    def _engine_entry(self, model: str | None) -> dict[str, Any] | None:
        """The engine a request reaches, as the daemon routes it (a served model's name too)."""
        name = self.backend.engine_for(model)
        return next((m for m in self.backend.models() if name is not None and m.get("id") == name), None)

    def _state_of(self, engine: str) -> str | None:
        """The engine's state as the daemon last published it (None: not known to this gateway)."""
        entry = next((m for m in self.backend.models() if m.get("id") == engine), None)
        return str(entry.get("state")) if entry is not None and entry.get("state") is not None else None

    def _engine_state(self, model: str | None) -> tuple[str, str]:
        entry = self._engine_entry(model)
        return (entry["id"], str(entry.get("state"))) if entry else (model or "(default)", "unknown")

    async def _route(self, request: Request, path: str, anthropic: bool, doc: Any, body: bytes, stream: bool,
                     model: str | None, passed: Upstream | None = None, *, again: bool = False) -> Response | _Forward:
        """Wait for the request's engine (or refuse), take a place in its line, build the forward.
        ``passed``: the engine, already taken on a pass (``GatewayBackend.try_pass``). ``again``: routed a
        second time, its engine having gone down while it waited in the line."""
        upstream: Upstream | Response
        if passed is not None:
            upstream = passed
        else:
            refused = self._start_refusal(request, model, anthropic)
            if refused is not None:
                return refused
            # Routed again after its engine went down under its wait in the line: like a request the engine went
            # down with, it does not start the engine again (a person's stop stays a stop).
            upstream = self.backend.try_pass(model) or await self._wait_for_engine(
                model, anthropic, self.may_start(request) and not again)
        if isinstance(upstream, Response):
            return upstream
        refused = await self._enter_line(upstream, anthropic)
        if refused is not None:
            return refused
        if not again and resend.shown_down(self._state_of(upstream.engine)):
            # Its engine went down while it waited for a slot (a person's stop, a crash, a restart): it never reached
            # the engine, so it is not sent to the engine going away but routed again: held for a restart, and
            # answered as the requests the engine went down with are where the engine stays down (503).
            self.lines.leave(upstream.engine)
            return await self._route(request, path, anthropic, doc, body, stream, model, again=True)
        try:
            result = await self._dispatch(request, path, anthropic, doc, body, stream, upstream)
        except BaseException:
            self.lines.leave(upstream.engine)
            raise
        if isinstance(result, _Forward):
            engine = upstream.engine
            result.on_done = lambda: self.lines.leave(engine)
        else:
            self.lines.leave(upstream.engine)
        return result

    def _start_refusal(self, request: Request, model: str | None, anthropic: bool) -> Response | None:
        """A request that would start a stopped engine (and swap others out) when this gateway may not."""
        permission = SwapPermission(self.settings.swaps)
        if permission is SwapPermission.ALLOWED:
            return None
        entry = self._engine_entry(model)
        if entry is None or entry.get("state") not in ("stopped", "failed"):
            return None
        key_given = self._api_key is not None and self.authorized(request)
        if may_start_engine(permission, key_given=key_given):
            return None
        self.stats.refuse("swap")
        return error_response(anthropic, 503, start_refused_message(entry["id"], str(entry.get("state")), permission),
                              "engine_not_running", headers=NO_RETRY, engine=entry["id"])

    def may_start(self, request: Request) -> bool:
        """Whether this request may have the daemon start (or swap in) its engine (``gateway.swaps``)."""
        permission = SwapPermission(self.settings.swaps)
        return permission is SwapPermission.ALLOWED or may_start_engine(
            permission, key_given=self._api_key is not None and self.authorized(request))

    async def _wait_for_engine(self, model: str | None, anthropic: bool, may_start: bool) -> Upstream | Response:
        """``_acquire``, counted in the engine's line as held for it: a request the engine's limits could not take
        once it serves is refused now (``policies.frontdoor.room_to_wait_for_engine``), not after the load."""
        entry = self._engine_entry(model)
        limits = entry.get("limits") if entry is not None else None
        if not isinstance(limits, dict):
            return await self._acquire(model, anthropic, may_start)
        engine = str(entry["id"]) if entry is not None else ""
        max_concurrent, max_queue = int(limits.get("max_concurrent") or 0), int(limits.get("max_queue") or 0)
        line = self.lines.line(engine)
        # Requests running on a run that is ending (a restart's drain, a stop) are gone by the time it serves again.
        running = line.running if entry is not None and entry.get("state") in ("ready", "degraded") else 0
        if not room_to_wait_for_engine(held=line.held, running=running, waiting=len(line.waiting),
                                       max_concurrent=max_concurrent, max_queue=max_queue):
            self.stats.refuse("queue_full")
            waiting = line.held + len(line.waiting)
            retry = retry_after_s(waiting=waiting, max_concurrent=max_concurrent)
            why = (f"{running} request(s) running and {waiting} waiting for it (max_concurrent {max_concurrent}, "
                   f"max_queue {max_queue})")
            return error_response(
                anthropic, 429, f"engine {engine!r} is busy: {why}; retry in about {retry}s",
                "rate_limit_exceeded", headers={"retry-after": str(retry)}, engine=engine, retry_after_s=retry)
        line.held += 1
        try:
            return await self._acquire(model, anthropic, may_start)
        finally:
            line.held -= 1

    async def _enter_line(self, upstream: Upstream, anthropic: bool) -> Response | None:
        hold_s = self.settings.hold_s
        try:
            verdict = await self.lines.enter(upstream.engine, upstream.max_concurrent, upstream.max_queue, wait_s=hold_s)
        except _LineWaitExpired:
            verdict = None
        if verdict is Admission.RUN:
            return None
        line = self.lines.line(upstream.engine)
        retry = retry_after_s(waiting=len(line.waiting), max_concurrent=upstream.max_concurrent)
        running = f"{line.running} request(s) running (max_concurrent {upstream.max_concurrent})"
        if verdict is None:  # it had a place in the line, but no slot came within the hold time
            self.stats.refuse("queue_timeout")
            why = (f"this request waited {hold_s:g}s (the gateway's hold_s) in its line without getting a slot; "
                   f"{running}, {len(line.waiting)} still waiting (max_queue {upstream.max_queue})")
        else:
            self.stats.refuse("queue_full")
            why = f"{running} and {len(line.waiting)} waiting (max_queue {upstream.max_queue})"
        return error_response(
            anthropic, 429, f"engine {upstream.engine!r} is busy: {why}; retry in about {retry}s",
            # retry_after_s in the body too: a stream that waited in the line has its head already, and gets this
            # as an SSE error event, without the header.
            "rate_limit_exceeded", headers={"retry-after": str(retry)}, engine=upstream.engine, retry_after_s=retry)

    async def _dispatch(self, request: Request, path: str, anthropic: bool, doc: Any, body: bytes, stream: bool,
                        upstream: Upstream) -> Response | _Forward:
        served = engine_serves(upstream.kind, path)
        if not served.ok:  # an engine reached by a name its model is served under (no entry to check first)
            self.stats.refuse("path")
            return error_response(anthropic, served.status, served.message, served.code, engine=upstream.engine)
        if anthropic and not upstream.supports_messages:
            return await self._translate(request, path, doc, upstream)
        if path == COUNT_TOKENS_PATH and request.method == "POST" and isinstance(doc, dict):
            return await self._native_count_tokens(request, doc, upstream)

        if (
            upstream.served_model is not None
            and isinstance(doc, dict)
            and doc.get("model") != upstream.served_model
        ):
            doc["model"] = upstream.served_model
            body = json.dumps(doc).encode()

        own_key = self._api_key is not None or bool(upstream.auth_headers)
        drop = _HOP_BY_HOP | _CREDENTIALS if own_key else _HOP_BY_HOP
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in drop]
        headers += [(k.encode(), v.encode()) for k, v in upstream.auth_headers]
        headers.append((b"accept-encoding", b"identity"))  # the meter reads plain bytes
        # The query string stays here: no engine's inference API takes one, and mlx_lm.server matches the
        # whole request target (mlx_lm/server.py do_POST: ``self.path not in request_factories``), so a
        # client's ``?api-version=...`` (Azure-style SDK setups) or ``?beta=true`` (Claude Code) made a 404.
        url = upstream.base_url.rstrip("/") + path
        reassembly: StreamReassembly | None = None
        if fetch_as_stream(path, doc, steps_watched=upstream.steps_watched,
                           enabled=self.settings.watch_non_streamed and upstream.engine not in self.not_streaming):
            # Fetched as a stream and rebuilt: the engine's tokens are the watchdog's evidence while it runs.
            assert isinstance(doc, dict)
            body = stream_request_body(doc)
            reassembly = StreamReassembly(chat=path == OPENAI_PATHS[0])
        upstream_request = UpstreamRequest(request.method, url, headers, body)
        ollama = path in OLLAMA_API_PATHS
        return _Forward(
            self, upstream, upstream_request, anthropic=anthropic,
            # Ollama's own API streams unless told not to: watched from the send like any stream.
            stream_requested=stream or reassembly is not None
            or (ollama and isinstance(doc, dict) and doc.get("stream") is not False),
            ndjson=ollama, tools=isinstance(doc, dict) and bool(doc.get("tools")), reassembly=reassembly,
        )

    async def _translate(
        self, request: Request, path: str, doc: Any, upstream: Upstream
    ) -> Response | _Forward:
        """/v1/messages for an engine that speaks only the OpenAI API: translated here."""
        if request.method != "POST" or path not in (MESSAGES_PATH, COUNT_TOKENS_PATH):
            return error_response(
                True,
                404,
                f"{request.method} {path} is not part of the Messages API the gateway translates "
                f"for engine {upstream.engine!r} ({upstream.kind}); it serves POST {MESSAGES_PATH} "
                f"and POST {COUNT_TOKENS_PATH}",
                "not_found",
            )
        try:
            if path == COUNT_TOKENS_PATH:
                # count_tokens takes the same fields as a message, without max_tokens.
                checked = anthropic_api.check_request({"max_tokens": 1, **doc})
                anthropic_api.to_openai(
                    checked, upstream.served_model, engine=upstream.engine, images=upstream.accepts_images
                )
                return await self._count_tokens(checked.doc, upstream)
            checked = anthropic_api.check_request(doc)
            openai_body = anthropic_api.to_openai(
                checked, upstream.served_model, engine=upstream.engine, images=upstream.accepts_images
            )
        except anthropic_api.RequestInvalid as exc:
            return error_response(True, 400, str(exc), "invalid_request", field=exc.field)
        think = self.settings.think_tags
        if think == "auto":
            think = "thinking" if checked.thinking_requested else "text"
        translator = anthropic_api.StreamTranslator(
            model=checked.model or upstream.engine,
            stop_sequences=checked.stop_sequences,
            think=think,
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream"),
            (b"accept-encoding", b"identity"),  # the meter reads plain bytes
        ]
        if upstream.auth_headers:
            # The engine's own key replaces the client's credentials (as on passthrough).
            headers += [(k.encode(), v.encode()) for k, v in upstream.auth_headers]
        elif self._api_key is None:
            # No gateway key: the client's key is meant for the engine (as on passthrough).
            key = request.headers.get("x-api-key")
            auth = request.headers.get("authorization") or (f"Bearer {key}" if key else None)
            if auth:
                headers.append((b"authorization", auth.encode()))
        url = upstream.base_url.rstrip("/") + OPENAI_PATHS[0]
        upstream_request = UpstreamRequest("POST", url, headers, json.dumps(openai_body).encode())
        return _Forward(
            self,
            upstream,
            upstream_request,
            anthropic=True,
            stream_requested=True,  # the engine always streams: the watchdog sees its progress
            translation=_Translation(translator, stream=checked.stream),
        )

    async def _native_count_tokens(self, request: Request, doc: dict[str, Any], upstream: Upstream) -> Response:
        """count_tokens on an engine that serves the Messages API: its own answer where it has the
        endpoint; where it answers 404/405 (a Messages API without count_tokens), counted as for a
        translated engine."""
        body = dict(doc)
        if upstream.served_model is not None:
            body["model"] = upstream.served_model
        headers = {"anthropic-version": request.headers.get("anthropic-version", "2023-06-01")}
        if upstream.auth_headers:
            headers.update(dict(upstream.auth_headers))
        elif self._api_key is None:
            for name in ("x-api-key", "authorization"):
                if name in request.headers:
                    headers[name] = request.headers[name]
        url = upstream.base_url.rstrip("/") + COUNT_TOKENS_PATH  # without the client's query (see _dispatch)
        try:
            response = await self.client.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            code, message = _unanswered(upstream.engine, upstream.base_url, exc, 1)
            return error_response(True, 502, message, code, engine=upstream.engine)
        status = response.status_code
        if status >= 400 and status not in (404, 405) and not engine_error_shaped(True, response.content):
            raw = response.content[:ENGINE_ERROR_READ_BYTES]
            return JSONResponse(engine_error_body(True, upstream.engine, status, raw), status_code=status)
        if response.status_code not in (404, 405):
            return Response(
                response.content,
                status_code=response.status_code,
                media_type=response.headers.get("content-type", "application/json"),
                headers={TOKEN_COUNT_HEADER: "engine"} if response.status_code == 200 else None,
            )
        try:
            checked = anthropic_api.check_request({"max_tokens": 1, **doc})
        except anthropic_api.RequestInvalid as exc:
            return error_response(True, 400, str(exc), "invalid_request", field=exc.field)
        return await self._count_tokens(checked.doc, upstream)

    async def _count_tokens(self, doc: dict[str, Any], upstream: Upstream) -> Response:
        """Tokens of a request: the engine's /tokenize where it has one, else an estimate, said so."""
        text = anthropic_api.count_text(doc)
        url = upstream.base_url.rstrip("/") + "/tokenize"
        # One body both tokenizer APIs read: llama-server wants "content", vLLM/SGLang "prompt".
        body = {"prompt": text, "content": text, "add_special_tokens": False}
        if upstream.served_model is not None:
            body["model"] = upstream.served_model
        try:
            response = await self.client.post(url, json=body, headers=dict(upstream.auth_headers), timeout=10.0)
            counted = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            counted = None
        tokens: int | None = None
        if isinstance(counted, dict):
            if isinstance(counted.get("count"), int):
                tokens = counted["count"]
            elif isinstance(counted.get("tokens"), list):
                tokens = len(counted["tokens"])
        if tokens is not None:
            return JSONResponse({"input_tokens": tokens}, headers={TOKEN_COUNT_HEADER: "engine-tokenizer"})
        return JSONResponse(
            {"input_tokens": anthropic_api.estimate_tokens(doc)},
            headers={
                TOKEN_COUNT_HEADER: f"estimate ({anthropic_api.ESTIMATE_BYTES_PER_TOKEN} bytes per token; "
                f"engine {upstream.engine!r} has no tokenizer endpoint)"
            },
        )

    async def _acquire(self, model: str | None, anthropic: bool, may_start: bool) -> Upstream | Response:
        stats = self.stats
        stats.waiting += 1
        hold_s = self.settings.hold_s
        try:
            # The backend holds the request hold_s itself and then answers why it could not be served (in
            # backoff until when, failed, still starting); this deadline, a little later, is for a backend
            # that does not answer (with hold_s = 0 it would otherwise cut every such answer short).
            with anyio.move_on_after(hold_s + ACQUIRE_ANSWER_GRACE_S):
                return await self.backend.acquire(model, may_start=may_start)
            name = model or self.backend.default_engine() or "(default)"
            raise EngineUnavailable(
                name,
                "hold_timeout",
                f"engine for model {name!r} was not ready within the gateway's hold time "
                f"({hold_s:g}s); retry later",
                retry_after_s=min(30.0, max(1.0, hold_s / 4)),
            )
        except EngineUnavailable as exc:
            return self._unavailable(exc, anthropic)
        except UnknownEngine as exc:
            stats.refuse("model_not_found")
            return error_response(anthropic, 404, str(exc), "model_not_found", engine=exc.engine)
        except SupervisordLLMError as exc:
            stats.refuse("engine_unavailable")
            return error_response(anthropic, 503, str(exc), "engine_unavailable")
        except Exception:
            self.log.exception("gateway.backend_failed", method="acquire")
            return error_response(
                anthropic,
                500,
                "the daemon failed to pick an engine for this request; see the daemon log",
                "internal_error",
            )
        finally:
            stats.waiting -= 1

    def _unavailable(self, exc: EngineUnavailable, anthropic: bool) -> JSONResponse:
        body, headers = self._unavailable_parts(exc, anthropic)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    def _unavailable_parts(self, exc: EngineUnavailable, anthropic: bool) -> tuple[dict[str, Any], dict[str, str]]:
        """The error body and headers (Retry-After) that say why the engine cannot serve, and until when; the
        refusal is counted under its reason (a stopped engine requests may not start: ``swap``, as the door's)."""
        self.stats.refuse("swap" if exc.reason == "engine_not_running" else "model_not_found" if exc.status == 404
                          else exc.reason)
        retry_after_s = exc.retry_after_s
        if retry_after_s is None and exc.until_wall is not None:
            retry_after_s = max(0.0, exc.until_wall - self.clock.wall())
        headers = {}
        if retry_after_s is not None and exc.status == 503:
            headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))
        elif exc.reason in PERMANENT_REFUSALS:
            headers.update(NO_RETRY)
        until = None
        if exc.until_wall is not None:
            until = datetime.fromtimestamp(exc.until_wall, tz=UTC).isoformat(timespec="seconds")
        code = ("model_not_found" if exc.status == 404 else "engine_not_running" if exc.reason == "engine_not_running"
                else "engine_unavailable")
        body = error_body(anthropic, exc.status, str(exc), code, engine=exc.engine, reason=exc.reason,
                          retry_after_s=retry_after_s, until=until, until_wall=exc.until_wall)
        return body, headers


def _listed(entry: dict[str, Any]) -> dict[str, Any]:
    """A model entry as ``/v1/models`` lists it: without the engine's request limits, which the gateway uses."""
    return {k: v for k, v in entry.items() if k != "limits"}


class _LineWaitExpired(Exception):
    """A request waited in its engine's line for the whole wait it was given, and no slot came."""


class _Line:
    """One engine's requests: how many run now, and the FIFO of those waiting for a slot."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting: deque[anyio.Event] = deque()
        self.held = 0  # requests waiting for the engine to serve (loading, swapping in) before they take a place


class EngineLines:
    """Per-engine admission (``policies.frontdoor.admit_request``): run, wait in line, or be refused.

    A finished request hands its slot straight to the first in line, so the line is served in
    arrival order and ``running`` never exceeds ``max_concurrent``.

    ``on_change(engine, occupied)``: told whenever an engine's slots taken plus places waiting change.
    A swap that stops the engine drains them too (``policies.swap.drained``): a request that waits for a
    slot has not reached its engine yet, and one handed a slot reaches it a moment later.
    """

    def __init__(self, on_change: Callable[[str, int], None] | None = None) -> None:
        self._lines: dict[str, _Line] = {}
        self._on_change = on_change
        self._told: dict[str, int] = {}

    def _changed(self, engine: str) -> None:
        line = self._lines[engine]
        occupied = line.running + len(line.waiting)
        if self._on_change is not None and self._told.get(engine, 0) != occupied:
            self._told[engine] = occupied
            self._on_change(engine, occupied)

    def line(self, engine: str) -> _Line:
        line = self._lines.get(engine)
        if line is None:
            line = self._lines[engine] = _Line()
        return line

    async def enter(self, engine: str, max_concurrent: int, max_queue: int, *, wait_s: float) -> Admission:
        """RUN (a slot is the request's: ``leave`` gives it back) or REFUSE (the line is full); a request
        that waited ``wait_s`` in the line without a slot raises _LineWaitExpired."""
        line = self.line(engine)
        verdict = admit_request(running=line.running, waiting=len(line.waiting), max_concurrent=max_concurrent,
                                max_queue=max_queue)
        if verdict is Admission.RUN:
            line.running += 1
            self._changed(engine)
            return verdict
        if verdict is Admission.REFUSE:
            return verdict
        turn = anyio.Event()
        line.waiting.append(turn)
        self._changed(engine)
        try:
            with anyio.move_on_after(wait_s):
                await turn.wait()
        except BaseException:  # cancelled (the client left): never strand a slot handed over meanwhile
            if turn.is_set():
                self.leave(engine)
            else:
                line.waiting.remove(turn)
                self._changed(engine)
            raise
        if not turn.is_set():
            line.waiting.remove(turn)
            self._changed(engine)
            raise _LineWaitExpired
        return Admission.RUN

    def admits_now(self, engine: str, max_concurrent: int, max_queue: int) -> bool:
        """Whether ``enter`` would let a request run at once."""
        line = self.line(engine)
        return admit_request(running=line.running, waiting=len(line.waiting), max_concurrent=max_concurrent,
                             max_queue=max_queue) is Admission.RUN

    def leave(self, engine: str) -> None:
        line = self.line(engine)
        if line.waiting:
            line.waiting.popleft().set()  # the slot goes to the first in line; running stays the same
        else:
            line.running = max(0, line.running - 1)
        self._changed(engine)


class _ConnectionCap:
    """At most ``limit`` requests in the gateway at once; beyond it a JSON 503 in the client's API shape."""

    def __init__(self, app: Any, limit: int, stats: GatewayStats) -> None:
        self.app = app
        self.limit = limit
        self.stats = stats
        self.active = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self.stats.refuse("connections")
            path = scope.get("path", "")
            response = error_response(
                path.startswith(MESSAGES_PATH), 503,
                f"the gateway is handling its maximum of {self.limit} requests (gateway.max_connections); retry shortly",
                "overloaded", headers={"retry-after": "1"})
            await response(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _FrontDoor:
    """The ASGI app uvicorn runs: the inference requests (POST to an API path the gateway forwards)
    go straight to the forward, everything else through the Starlette app.

    A proxied request is the gateway's hot path; Starlette's router and its two exception
    middlewares cost that request a layer each, and each chunk it sends a wrapper each, for nothing
    it uses: the forward answers its own errors in the client's API shape, and an unexpected
    exception before the response started is still answered with a 500 by uvicorn.
    """

    FAST_PATHS = frozenset(FORWARDED_PATHS)

    def __init__(self, app: Starlette, gw: _Gateway) -> None:
        self.app = app
        self.gw = gw

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] in self.FAST_PATHS:
            response = await self.gw.forward(Request(scope, receive))
            await response(scope, receive, send)
            return
        # Every path the gateway is sent, its own pages' too: one that could read as another path is
        # refused before any route sees it.
        verdict = check_path_safe(scope.get("raw_path") or scope["path"].encode(),
                                  encoded_slash=scope["path"].startswith("/v1/models/"))
        if not verdict.ok:
            self.gw.stats.refuse("path")
            path = scope["path"]
            refusal = error_response(_messages_path(path),
                                     verdict.status, verdict.message, verdict.code)
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BrowserGuard:
    """What a browser may do, before anything else (the connection cap's 503 included, so an allowed page
    can read it). Where ``host_check_applies``, a request is answered only under a local name
    (``host_allowed``: another site's name pointed at 127.0.0.1 would make its pages this server's own
    origin), and a page of another site (its ``Origin``, ``origin_allowed``) is refused before any engine is
    used or started. An allowed page's preflight is answered here, and its responses name its origin.
    Also in front of the metrics port's status page (``refuse`` then counts nothing)."""

    def __init__(self, app: Any, settings: GatewaySettings, *, check_host: bool, log: Any,
                 refuse: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.log = log
        self.check_host = check_host
        self.allowed_hosts = settings.allowed_hosts
        self.allowed_origins = settings.allowed_origins
        self.machine_names = (socket.gethostname().lower(),)
        self.refuse = refuse
        self.logged: set[tuple[str, str]] = set()  # refusals logged once each (a page may retry in a loop)
        # host_allowed's verdict per Host value: a client sends the same one on every request.
        self.host_verdicts: dict[str | None, bool] = {}

    def _host_ok(self, host: str | None) -> bool:
        verdict = self.host_verdicts.get(host)
        if verdict is None:
            verdict = host_allowed(host, self.allowed_hosts, machine_names=self.machine_names)
            if len(self.host_verdicts) < 256:
                self.host_verdicts[host] = verdict
        return verdict

    def _refused(self, why: str, value: str, path: str) -> None:
        if self.refuse is not None:
            self.refuse(why)
        if len(self.logged) < 256 and (why, value) not in self.logged:
            self.logged.add((why, value))
            self.log.warning(f"gateway.{why}_refused", value=value, path=path,
                         reason="a web page of another site" if why == "origin" else "a name that is not local")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = None
        for key, value in scope["headers"]:  # one pass; the first of a header counts, as in _header
            if key == b"host" and host is None:
                host = bytes(value).decode("latin-1")
            elif key == b"origin" and origin is None:
                origin = bytes(value).decode("latin-1")
        if self.check_host and not self._host_ok(host):
            self._refused("host", host or "", scope["path"])
            await _host_refusal(scope["path"], host or "")(scope, receive, send)
            return
        if origin is None:  # not a browser's cross-origin request (SDKs, curl, agents; a page's own GETs)
            await self.app(scope, receive, send)
            return
        own = own_host(host, self.allowed_hosts, checked=self.check_host, machine_names=self.machine_names)
        if not origin_allowed(origin, self.allowed_origins, host=own):
            self._refused("origin", origin, scope["path"])
            await _origin_refusal(scope["path"], origin)(scope, receive, send)
            return
        send = _with_cors(send, origin)
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await _preflight(scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _header(scope: Any, name: bytes) -> str | None:
    """A request header's value (ASGI gives names in lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


# The request headers a page's preflight is allowed when it names none: what the OpenAI and Anthropic SDKs send.
_CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _origin_refusal(path: str, origin: str) -> Response:
    if origin.strip().lower() == "null":
        advice = ("a page whose origin is null (a sandboxed frame, or a page opened from a file) cannot be told "
                  "from any other site's; serve it from http://localhost instead")
    else:
        advice = f"add {origin!r} there to allow that site"
    return error_response(
        _messages_path(path), 403,
        f"a web page of {origin!r} may not use this gateway: browsers may use it from pages served by this "
        f"machine (http://localhost, http://127.0.0.1, any port) and from the origins in [gateway] allowed_origins; "
        f"{advice}", "origin_not_allowed", origin=origin)


def _host_refusal(path: str, host: str) -> Response:
    return error_response(
        _messages_path(path), 403,
        f"this gateway listens on loopback and was reached under the name {host!r}, which could be another site's "
        "name pointed at this machine (DNS rebinding); it answers under IP addresses, names without a dot "
        f"(localhost), names ending in {', '.join(LOCAL_HOST_SUFFIXES)}, this machine's name and the names in [gateway] allowed_hosts: add the name there "
        "if a proxy or a tunnel forwards it", "host_not_allowed", host=host)


def _preflight(scope: Any) -> Response:
    """A browser's CORS preflight from an allowed origin (its origin header is added by ``_with_cors``)."""
    asked = (_header(scope, b"access-control-request-headers") or "").strip()
    headers = {
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": asked if _HEADER_LIST.fullmatch(asked) else _CORS_HEADERS,
        "access-control-max-age": "600",
        "vary": "access-control-request-method, access-control-request-headers",
    }
    # Chrome asks before a public site's page may reach a private address (Private Network Access): the
    # operator listed that site in allowed_origins, so it may.
    if (_header(scope, b"access-control-request-private-network") or "").lower() == "true":
        headers["access-control-allow-private-network"] = "true"
    return Response(status_code=204, headers=headers)


def _with_cors(send: Any, origin: str) -> Any:
    """``send`` for a request of an allowed origin: its response says that origin may read it (only that
    origin: an engine's own ``*`` never passes), and that the answer depends on the origin."""
    added = [(b"access-control-allow-origin", origin.encode("latin-1")),
             (b"access-control-expose-headers", b"retry-after"), (b"vary", b"origin")]

    async def cors_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ())
                       if not bytes(k).lower().startswith(b"access-control-allow-origin")]
            message = {**message, "headers": [*headers, *added]}
        await send(message)

    return cors_send


class _Counted:
    """Wraps a forward so the gateway's in_flight count drops when the exchange ends, however."""

    def __init__(self, inner: _Forward | hold.HeldStream | hold.WatchedRoute, stats: GatewayStats) -> None:
        self.inner = inner
        self.stats = stats

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.stats.in_flight -= 1
            if self.inner.on_done is not None:
                self.inner.on_done()


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (Python's json writes and reads them): refused, not
    forwarded to an engine whose own parser may fail on them (and have the request sent again)."""
    raise ValueError(f"{name} is not a JSON number; numbers must be finite (such as 0.7 or 512)")


def _finite_float(text: str) -> float:
    """A JSON number too large for a float (``1e999``) would be read as infinity and sent on as ``Infinity``."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a number; numbers must be finite (such as 0.7 or 512)")
    return value


def _messages_path(path: str) -> bool:
    """A path of the Anthropic Messages API: its answers, refusals included, come in that API's shape. Any
    path that begins so (``/v1/messages\\count_tokens``, ``/v1/messages;x``, ``/v1/messages%00`` too), as the
    header timeout's answer judges it from the request line."""
    return path.startswith(MESSAGES_PATH)


async def _not_served(request: Request, exc: Exception) -> Response:
    """A path (or a method on it) the gateway does not serve: a JSON error in the client's API shape, not
    Starlette's plain text."""
    from starlette.exceptions import HTTPException

    path = request.url.path
    anthropic = _messages_path(path)
    stats = getattr(request.app.state, "gateway", None)
    method_refused = isinstance(exc, HTTPException) and exc.status_code == 405
    if isinstance(stats, GatewayStats):
        stats.refuse("method" if method_refused else "path")
    if isinstance(exc, HTTPException) and method_refused:
        return error_response(anthropic, 405, f"{path} does not take {request.method}", "method_not_allowed",
                              headers=exc.headers)
    return error_response(anthropic, 404, f"{path} is not a path the gateway serves: it forwards "
                          f"{', '.join(FORWARDED_PATHS)} to the engines and answers /v1/models and /health", "not_found")


def build_app(
    backend: GatewayBackend,
    settings: GatewaySettings,
    clock: Clock | None = None,
    *,
    log: Any = None,
) -> Starlette:
    """The gateway as a Starlette app; ``app.state.gateway`` is its :class:`GatewayStats`."""
    from contextlib import asynccontextmanager

    gw = _Gateway(
        backend,
        settings,
        clock or SystemClock(),
        log or structlog.get_logger("supervisord_llm.gateway.proxy"),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        async with gw.make_client() as client, gw.make_upstream_client() as upstream_client:
            gw.client = client
            gw.upstream_client = upstream_client
            yield

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(
        routes=[
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", gw.model, methods=["GET"]),
            Route("/gateway/status", gw.status, methods=["GET"]),
            Route("/health", gw.health, methods=["GET"]),
            Route("/v1/{rest:path}", gw.forward, methods=methods),
            *(Route(path, gw.forward, methods=methods) for path in OLLAMA_API_PATHS),
        ],
        lifespan=lifespan,
        exception_handlers={404: _not_served, 405: _not_served},
    )
    app.state.gateway = gw.stats
    app.state.gateway_core = gw
    return app


# --------------------------------------------------------------------------------------------
# Serving



def ollama_error_shape(body: bytes) -> bytes | None:
    """An error answer rewritten into Ollama's own shape, ``{"error": "message"}`` (ollama server/routes.go answers
    every error so, ``gin.H{"error": ...}``; ollama-python raises ``ResponseError`` with that string); None where
    the body is not one of the gateway's errors (an engine's own Ollama error passes as it is)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    shaped: dict[str, Any] = {"error": err["message"]}
    for key in ("code", "engine", "reason", "retry_after_s"):  # machine-readable parts, beside Ollama's string
        if err.get(key) is not None:
            shaped[key] = err[key]
    return json.dumps(shaped).encode()


class _OllamaErrors:
    """Requests on Ollama's own paths (/api/chat, /api/generate) get the gateway's refusals in Ollama's shape
    (status and headers kept); every other path is passed straight through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in OLLAMA_API_PATHS:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        parts: list[bytes] = []

        async def shaped_send(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                if int(message["status"]) >= 400 and content_type.startswith(b"application/json"):
                    start = message  # held until the body is whole
                    return
            elif message["type"] == "http.response.body" and start is not None:
                parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(parts)
                body = ollama_error_shape(body) or body
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                start = None
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await self.app(scope, receive, shaped_send)


def _guarded_http_protocol(settings: GatewaySettings, stats: GatewayStats | None) -> type[Any]:
    """uvicorn's HTTP protocol with the header read timeout: a 408 in the client's API shape."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from supervisord_llm.gateway.headers import header_timeout_protocol

    def answer(first_bytes: bytes, status: int, reason: bytes, message: str, code: str) -> bytes:
        request_line = first_bytes.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        target = request_line.split(b" ")[1] if request_line.count(b" ") >= 1 else b""
        body = json.dumps(error_body(target.startswith(MESSAGES_PATH.encode()), status, message, code)).encode()
        if target.split(b"?", 1)[0].decode("latin-1") in OLLAMA_API_PATHS:
            body = ollama_error_shape(body) or body
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body))

    def on_timeout(first_bytes: bytes) -> bytes | None:
        if stats is not None:
            stats.refuse("header_timeout")
        if not first_bytes:
            return None  # nothing was asked: nobody to answer
        return answer(first_bytes, 408, b"Request Timeout",
                      f"the request headers did not arrive within the gateway's header_timeout_s "
                      f"({settings.header_timeout_s:g}s)", "request_timeout")

    def on_bad_request(first_bytes: bytes, message: str) -> bytes:
        if stats is not None:
            stats.refuse("bad_http")
        return answer(first_bytes, 400, b"Bad Request",
                      f"the request is not valid HTTP/1.1 ({message.rstrip('.')}): check its request line, its "
                      f"Content-Length (a number of bytes) and, if chunked, its chunk sizes", "invalid_http")

    return header_timeout_protocol(AutoHTTPProtocol, header_timeout_s=settings.header_timeout_s,
                                   on_timeout=on_timeout, on_bad_request=on_bad_request)


async def serve(
    app: Starlette,
    settings: GatewaySettings,
    *,
    sock: socket.socket | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the app on the listen address (or on ``sock``, already listening) until cancelled;
    ``started(listen)`` once it accepts.

    The value given to ``started`` is the bound ``host:port`` (useful with port 0). Cancelling
    shuts the server down gracefully, waiting up to ``shutdown_grace_s`` for open requests.
    """
    if sock is None:
        sock = bind_listen(settings.host, settings.port)
    listen = listen_text(sock)
    stats = getattr(app.state, "gateway", None)
    if isinstance(stats, GatewayStats):
        stats.listen = listen
    front: Any = app
    core = getattr(app.state, "gateway_core", None)
    loopback = is_loopback(settings.host)
    if isinstance(core, _Gateway):
        front = _OllamaErrors(_BrowserGuard(
            _ConnectionCap(_FrontDoor(app, core), limit=settings.max_connections, stats=core.stats),
            settings, check_host=host_check_applies(loopback=loopback, key_needed=core._key_needed),
            log=core.log, refuse=core.stats.refuse))
    else:  # the metrics port: its status page is not for other sites either
        front = _BrowserGuard(app, settings, check_host=host_check_applies(loopback=loopback, key_needed=False),
                              log=structlog.get_logger("supervisord_llm.metrics"))
    # log_config=None: uvicorn must not reconfigure the process's logging (the daemon owns it).
    config = uvicorn.Config(
        front,
        proxy_headers=False,  # nothing here reads the client's address
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
        http=_guarded_http_protocol(settings, stats if isinstance(stats, GatewayStats) else None),
        ws="none",
        server_header=False,
        date_header=False,
        # No limit_concurrency: uvicorn counts every open connection toward it, idle ones included,
        # so a flood of idle connections made it answer every real client with a plain-text 503.
        # Requests beyond max_connections get the JSON 503 (_ConnectionCap); connections that send
        # no request are closed after header_timeout_s (gateway/headers.py).
        limit_concurrency=None,
    )
    server = DaemonServer(config)
    done = anyio.Event()

    async def run_server() -> None:
        try:
            with anyio.CancelScope(shield=True):
                await server.serve(sockets=[sock])
        finally:
            done.set()
            sock.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        try:
            while not server.started:
                if done.is_set():
                    raise GatewayListenFailed(f"the gateway on {listen} stopped during startup")
                await anyio.sleep(0.005)
            task_status.started(listen)
            await done.wait()
        finally:
            if isinstance(core, _Gateway):
                # Open requests get the grace; a moment before the server cancels what is left, each ends
                # with an error its client can read.
                grace_s = max(1, math.ceil(settings.shutdown_grace_s))
                asyncio.get_running_loop().call_later(max(0.0, grace_s - 0.5), core.end_open)
            server.should_exit = True
