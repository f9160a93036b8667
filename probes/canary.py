"""Canaries: one small real generation through the engine's own API, proving generation works.

``/health`` answering 200 proves little (mlx_lm.server answers it even after its generation
thread died), so the watchdog asks for a few tokens and times them.

* Tokens are counted, not visible text: a reasoning model's ``<think>`` tokens (``reasoning`` /
  ``reasoning_content`` deltas) count, so such models never fail a canary by thinking first.
* Time to first token (TTFT) is the first chunk carrying any content, reasoning or tool call.
* ``stalled=True`` when no token arrives within ``stall_s`` (while waiting for the response
  headers, the first token, or any later token); keepalive comments do not count as progress.
* ``timeout_s`` bounds the whole canary; a slow but steadily progressing stream that runs out of
  time is ``ok=False`` but not ``stalled``.
* Errors (refused connection, HTTP error status, an error event in the stream) become
  ``ok=False, error=...``; nothing is raised.

``headers`` go with the request: the engine's API key where it requires one (vLLM and SGLang
``--api-key``, oMLX ``auth.api_key``), or the canary would only ever see 401.

The ``clock`` (monotonic seconds) times the reading; the deadlines use the event loop's clock.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from probes.counters import ollama_rate
from probes.readings import CanaryReading

__all__ = [
    "DEFAULT_PROMPT",
    "run_openai_chat_canary",
    "run_openai_completion_canary",
    "run_ollama_canary",
]

DEFAULT_PROMPT = "Count from 1 to 10."
DEFAULT_STALL_S = 30.0
DEFAULT_TIMEOUT_S = 120.0

Clock = Callable[[], float]


def _check_bounds(max_tokens: int, stall_s: float, timeout_s: float) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    for name, value in (("stall_s", stall_s), ("timeout_s", timeout_s)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class _Progress:
    """What one streamed chunk contributed: token-bearing deltas, a reported total, an error, the end."""

    tokens: int = 0
    usage_tokens: int | None = None
    error: str | None = None
    done: bool = False  # the stream is over ([DONE], Ollama's done:true)
    finished: bool = False  # the generation reported its end (finish_reason, usage)
    rate_tokens_per_s: float | None = None  # an engine-reported rate (Ollama)


def _openai_chunk(payload: dict[str, Any], text_keys: tuple[str, ...]) -> _Progress:
    progress = _Progress()
    error = payload.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        progress.error = f"engine reported an error in the stream: {message}"
        return progress
    usage = payload.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        progress.usage_tokens = usage["completion_tokens"]
        progress.finished = True
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            progress.finished = True
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice
        if any(isinstance(delta.get(key), str) and delta.get(key) for key in text_keys) or delta.get("tool_calls"):
            progress.tokens += 1
    return progress


def _parse_sse_line(line: str, text_keys: tuple[str, ...]) -> _Progress | None:
    if not line.startswith("data:"):
        return None  # blank separators, ": keepalive" comments, event names
    data = line[5:].strip()
    if data == "[DONE]":
        return _Progress(done=True)
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return _Progress(error=f"stream carried a line that is not JSON: {data[:120]!r}")
    if not isinstance(payload, dict):
        return _Progress(error=f"stream carried JSON that is not an object: {data[:120]!r}")
    return _openai_chunk(payload, text_keys)


def _parse_ollama_line(line: str) -> _Progress | None:
    if not line.strip():
        return None
    try:
        payload = json.loads(line)
    except json.JSONDecodeError:
        return _Progress(error=f"stream carried a line that is not JSON: {line[:120]!r}")
    if not isinstance(payload, dict):
        return _Progress(error=f"stream carried JSON that is not an object: {line[:120]!r}")
    if payload.get("error"):
        return _Progress(error=f"engine reported an error in the stream: {payload['error']}")
    progress = _Progress()
    if payload.get("response") or payload.get("thinking"):
        progress.tokens = 1
    if payload.get("done"):
        progress.done = True
        if isinstance(payload.get("eval_count"), int):
            progress.usage_tokens = payload["eval_count"]
            progress.rate_tokens_per_s = ollama_rate(payload["eval_count"], payload.get("eval_duration"))
    return progress


def _decode_rate(
    tokens: int,
    chunks: int,
    started_s: float,
    first_token_s: float | None,
    last_token_s: float | None,
    end_s: float | None,
) -> float | None:
    """Tokens after the first over the time after the first, when tokens arrived in separate chunks.

    Some servers hold tokens back and send them merged (mlx_lm.server buffers whitespace until
    the detokenizer can emit text), so one chunk may carry many tokens. With fewer than two
    token-bearing chunks the decode time cannot be told apart, and the rate is taken over the
    whole request instead (a lower bound: it includes the time to first token).
    """
    if first_token_s is not None and last_token_s is not None and chunks >= 2 and tokens > 1:
        decode_s = last_token_s - first_token_s
        if decode_s > 0:
            return (tokens - 1) / decode_s
    if end_s is not None and tokens >= 1 and end_s > started_s:
        return tokens / (end_s - started_s)
    return None


async def _stream_canary(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    parse_line: Callable[[str], _Progress | None],
    *,
    stall_s: float,
    timeout_s: float,
    clock: Clock,
    headers: Mapping[str, str] | None = None,
) -> CanaryReading:
    started_s = clock()
    loop_start = anyio.current_time()
    overall_deadline = loop_start + timeout_s
    first_token_s: float | None = None
    last_token_s: float | None = None
    last_event_s: float | None = None
    counted = 0  # token-bearing chunks
    usage_tokens: int | None = None
    reported_rate: float | None = None
    error: str | None = None
    finished = False
    saw_finish = False

    with anyio.CancelScope() as scope:
        # The stall deadline moves forward with every token; the overall deadline never moves.
        scope.deadline = min(loop_start + stall_s, overall_deadline)
        try:
            async with client.stream("POST", url, json=body, headers=headers,
                                     timeout=httpx.Timeout(timeout_s)) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    error = f"HTTP {response.status_code} from {url}: {text.strip()[:300]}"
                else:
                    async for line in response.aiter_lines():
                        progress = parse_line(line)
                        if progress is None:
                            continue
                        last_event_s = clock()
                        if progress.error:
                            error = progress.error
                            break
                        if progress.usage_tokens is not None:
                            usage_tokens = progress.usage_tokens
                        saw_finish = saw_finish or progress.finished
                        if progress.rate_tokens_per_s is not None:
                            reported_rate = progress.rate_tokens_per_s
                        if progress.tokens:
                            now = clock()
                            if first_token_s is None:
                                first_token_s = now
                            last_token_s = now
                            counted += progress.tokens
                            scope.deadline = min(anyio.current_time() + stall_s, overall_deadline)
                        if progress.done:
                            finished = True
                            break
                    else:
                        # Some servers close the stream without [DONE]; it still finished if the
                        # generation said so (finish_reason or usage). A bare close did not.
                        finished = saw_finish
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError) as exc:
            error = f"{_error_text(exc)} ({url})"

    duration_s = clock() - started_s
    if scope.cancelled_caught:
        # The stall deadline was the one in force unless it had been clipped to the overall one.
        stalled = scope.deadline < overall_deadline
        waited = "the response" if first_token_s is None and counted == 0 else "the next token"
        if stalled:
            error = f"stalled: no token within {stall_s:g}s while waiting for {waited} ({url})"
        else:
            error = f"the canary did not finish within {timeout_s:g}s ({url})"
        return CanaryReading(
            at_s=started_s,
            ok=False,
            ttft_s=None if first_token_s is None else first_token_s - started_s,
            duration_s=duration_s,
            completion_tokens=counted or None,
            error=error,
            stalled=stalled,
        )

    tokens = usage_tokens if usage_tokens is not None else counted
    if error is None and not finished:
        error = f"the stream ended before the generation finished ({url})"
    if error is None and tokens < 1:
        error = f"the engine finished without generating any token ({url})"
    ttft_s = None if first_token_s is None else first_token_s - started_s
    tokens_per_s = reported_rate
    decode_s = None
    if tokens_per_s is None and error is None:
        tokens_per_s = _decode_rate(tokens, counted, started_s, first_token_s, last_token_s, last_event_s)
        if counted >= 2 and tokens > 1 and first_token_s is not None and last_token_s is not None \
                and last_token_s > first_token_s:
            decode_s = last_token_s - first_token_s  # the span _decode_rate timed the tokens over
    return CanaryReading(
        at_s=started_s,
        ok=error is None,
        ttft_s=ttft_s,
        duration_s=duration_s,
        completion_tokens=tokens if tokens else None,
        tokens_per_s=tokens_per_s,
        error=error,
        decode_s=decode_s,
    )


async def run_openai_chat_canary(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    model: str | None = None,
    max_tokens: int = 16,
    prompt: str = DEFAULT_PROMPT,
    stall_s: float = DEFAULT_STALL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Clock = time.monotonic,
    headers: Mapping[str, str] | None = None,
) -> CanaryReading:
    """A streaming ``POST /v1/chat/completions`` (mlx_lm.server, oMLX, vLLM, llama-server, any OpenAI server)."""
    _check_bounds(max_tokens, stall_s, timeout_s)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return await _stream_canary(
        client,
        _url(base_url, "/v1/chat/completions"),
        body,
        lambda line: _parse_sse_line(line, ("content", "reasoning_content", "reasoning")),
        stall_s=stall_s,
        timeout_s=timeout_s,
        clock=clock,
        headers=headers,
    )


async def run_openai_completion_canary(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    model: str | None = None,
    max_tokens: int = 16,
    prompt: str = DEFAULT_PROMPT,
    stall_s: float = DEFAULT_STALL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Clock = time.monotonic,
    headers: Mapping[str, str] | None = None,
) -> CanaryReading:
    """A streaming ``POST /v1/completions`` (vLLM, llama-server; no chat template involved)."""
    _check_bounds(max_tokens, stall_s, timeout_s)
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return await _stream_canary(
        client,
        _url(base_url, "/v1/completions"),
        body,
        lambda line: _parse_sse_line(line, ("text", "content", "reasoning_content", "reasoning")),
        stall_s=stall_s,
        timeout_s=timeout_s,
        clock=clock,
        headers=headers,
    )


async def run_ollama_canary(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    model: str,
    max_tokens: int = 16,
    prompt: str = DEFAULT_PROMPT,
    stall_s: float = DEFAULT_STALL_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Clock = time.monotonic,
    headers: Mapping[str, str] | None = None,
    keep_alive_s: int | None = None,
) -> CanaryReading:
    """A streaming ``POST /api/generate``; tokens/s from Ollama's own ``eval_count / eval_duration``.

    ``keep_alive_s``: how long Ollama keeps the model loaded after this request. A canary passes
    what is left of the model's current keep-alive, so probing it never extends its residency.
    """
    _check_bounds(max_tokens, stall_s, timeout_s)
    if not model:
        raise ValueError("Ollama needs the model name (e.g. 'llama3.2:1b'); got an empty one")
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "stream": True,
        "options": {"num_predict": max_tokens, "temperature": 0},
    }
    if keep_alive_s is not None:
        body["keep_alive"] = max(1, int(keep_alive_s))
    return await _stream_canary(
        client,
        _url(base_url, "/api/generate"),
        body,
        _parse_ollama_line,
        stall_s=stall_s,
        timeout_s=timeout_s,
        clock=clock,
        headers=headers,
    )
