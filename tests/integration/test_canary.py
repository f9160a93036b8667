"""Canaries: real generations against a real mlx_lm.server, and scripted streams from real HTTP servers on 127.0.0.1.

The scripted servers send exactly the bytes an engine would (SSE chunks, Ollama NDJSON, keepalive
comments, pauses), so stalls mid-stream, reasoning-only output and engine error events can be
produced on demand; the mlx_lm.server tests prove the same code against a real engine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from policies.health import MIN_SAMPLE_DECODE_S, canary_sample_rate
from probes.canary import (
    run_ollama_canary,
    run_openai_chat_canary,
    run_openai_completion_canary,
)
from tests.helpers import MlxServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest


# ---------------------------------------------------------------- real engine: mlx_lm.server


async def test_chat_canary_on_a_real_server(mlx_server: MlxServer) -> None:
    """A healthy mlx_lm.server passes the chat canary with the requested token count and a positive rate."""
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, mlx_server.base_url, max_tokens=8, stall_s=20, timeout_s=60)
    assert reading.ok, reading.error
    assert reading.error is None and not reading.stalled
    assert reading.completion_tokens == 8  # from the usage chunk
    assert reading.tokens_per_s is not None and reading.tokens_per_s > 0
    assert reading.ttft_s is not None and 0 < reading.ttft_s <= reading.duration_s


async def test_completion_canary_on_a_real_server(mlx_server: MlxServer) -> None:
    """The /v1/completions canary (the vLLM/llama.cpp path) passes on a real server with timed tokens."""
    async with httpx.AsyncClient() as client:
        reading = await run_openai_completion_canary(client, mlx_server.base_url, max_tokens=6, stall_s=20, timeout_s=60)
    assert reading.ok, reading.error
    assert reading.completion_tokens == 6
    assert reading.tokens_per_s is not None and reading.tokens_per_s > 0


@pytest.mark.slow
async def test_sigstopped_server_gives_a_stalled_reading(mlx_server: MlxServer) -> None:
    """A frozen (SIGSTOP) engine whose port still accepts connections yields stalled=True after about stall_s, then recovers on SIGCONT."""
    os.killpg(mlx_server.proc.pid, signal.SIGSTOP)
    try:
        async with httpx.AsyncClient() as client:
            started = time.monotonic()
            reading = await run_openai_chat_canary(client, mlx_server.base_url, max_tokens=8, stall_s=2.0, timeout_s=30)
            waited_s = time.monotonic() - started
    finally:
        os.killpg(mlx_server.proc.pid, signal.SIGCONT)
    assert reading.stalled and not reading.ok
    assert "no token within 2s" in reading.error
    assert 1.8 <= waited_s <= 10.0
    assert reading.duration_s == pytest.approx(waited_s, abs=0.5)
    async with httpx.AsyncClient() as client:
        again = await run_openai_chat_canary(client, mlx_server.base_url, max_tokens=4, stall_s=20, timeout_s=60)
    assert again.ok, again.error


async def test_refused_port_is_an_error_not_an_exception() -> None:
    """Nothing listening on the port gives ok=False with the connection error, never an exception."""
    port = free_port()
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, f"http://127.0.0.1:{port}", stall_s=5, timeout_s=5)
    assert not reading.ok and not reading.stalled
    assert "ConnectError" in reading.error and str(port) in reading.error
    assert reading.completion_tokens is None and reading.ttft_s is None


# ---------------------------------------------------------------- scripted streams


def _sse(delta: dict | None = None, *, finish: str | None = None, usage: int | None = None) -> bytes:
    if usage is not None:
        payload: dict = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": usage}}
    else:
        payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class _Scripted(BaseHTTPRequestHandler):
    """Answers each path with a status and a list of (pause_s, bytes) steps, then closes the connection."""

    scripts: dict[str, tuple[int, list[tuple[float, bytes]]]] = {}
    stop: threading.Event
    bodies: list[dict]

    def _answer(self) -> None:
        status, steps = self.scripts.get(self.path, (404, [(0.0, b"not found")]))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for pause_s, chunk in steps:
                if pause_s and self.stop.wait(pause_s):
                    return
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
        self._answer()

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, dict, list[dict]]]:
    """A real HTTP server on 127.0.0.1 streaming the scripts a test sets; returns (base_url, scripts, request bodies)."""
    scripts: dict = {}
    bodies: list[dict] = []
    stop = threading.Event()
    handler = type("Handler", (_Scripted,), {"scripts": scripts, "stop": stop, "bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", scripts, bodies
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


async def test_reasoning_tokens_count_so_thinking_models_pass(scripted) -> None:
    """A model that only thinks (<think> in reasoning deltas, no visible text) passes with its tokens counted."""
    base_url, scripts, bodies = scripted
    steps = [(0.05, _sse({"role": "assistant", "reasoning_content": "<think>"}))]
    steps += [(0.02, _sse({"reasoning_content": " hmm"})) for _ in range(3)]
    steps += [(0.0, _sse(finish="length")), (0.0, DONE)]
    scripts["/v1/chat/completions"] = (200, steps)
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, model="MiniMax-M2", max_tokens=4, stall_s=5, timeout_s=10)
    assert reading.ok, reading.error
    assert reading.completion_tokens == 4  # no usage chunk: counted from the deltas
    assert reading.tokens_per_s is not None and reading.tokens_per_s > 0
    assert bodies[0]["model"] == "MiniMax-M2" and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["max_tokens"] == 4


async def test_tokens_read_in_one_burst_make_no_throughput_sample(scripted) -> None:
    """16 tokens written at once (an engine that held them back, or a reader that was busy) time at tens of
    thousands of tokens/s: the reading says how short its decode was, and it is no sample for the learned
    baseline (policies.health.canary_sample_rate); a real 16-token decode over 0.3 s is one."""
    base_url, scripts, _ = scripted
    burst = b"".join(_sse({"content": " tok"}) for _ in range(16))
    scripts["/v1/chat/completions"] = (200, [(0.05, _sse({"role": "assistant"})), (0.0, burst),
                                             (0.0, _sse(finish="length")), (0.0, DONE)])
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, max_tokens=16, stall_s=5, timeout_s=10)
    assert reading.ok and reading.completion_tokens == 16, reading
    assert reading.decode_s is not None and reading.decode_s < MIN_SAMPLE_DECODE_S, reading
    assert canary_sample_rate(reading.tokens_per_s, reading.decode_s) is None

    steps = [(0.05, _sse({"role": "assistant"}))] + [(0.02, _sse({"content": " tok"})) for _ in range(16)]
    scripts["/v1/chat/completions"] = (200, steps + [(0.0, _sse(finish="length")), (0.0, DONE)])
    async with httpx.AsyncClient() as client:
        steady = await run_openai_chat_canary(client, base_url, max_tokens=16, stall_s=5, timeout_s=10)
    rate = canary_sample_rate(steady.tokens_per_s, steady.decode_s)
    assert rate is not None and 20 < rate < 60, steady


async def test_keepalives_are_not_progress(scripted) -> None:
    """An engine that only sends keepalive comments (stuck in prefill) is stalled after stall_s, not kept alive forever."""
    base_url, scripts, _ = scripted
    scripts["/v1/chat/completions"] = (200, [(0.2, b": keepalive\n\n")] * 50)
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, stall_s=1.0, timeout_s=20)
    assert reading.stalled and not reading.ok
    assert reading.duration_s < 5
    assert "waiting for the response" in reading.error


async def test_stall_after_some_tokens(scripted) -> None:
    """Tokens that stop mid-stream give a stalled reading that keeps the time to first token and the count so far."""
    base_url, scripts, _ = scripted
    scripts["/v1/chat/completions"] = (200, [(0.0, _sse({"content": "a"})), (0.0, _sse({"content": "b"})), (30.0, DONE)])
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, stall_s=1.0, timeout_s=20)
    assert reading.stalled and not reading.ok
    assert reading.completion_tokens == 2
    assert reading.ttft_s is not None
    assert "the next token" in reading.error


async def test_slow_but_steady_stream_times_out_without_stalling(scripted) -> None:
    """A stream that keeps producing tokens but exceeds timeout_s fails as a timeout, not as a stall."""
    base_url, scripts, _ = scripted
    scripts["/v1/chat/completions"] = (200, [(0.2, _sse({"content": "x"}))] * 30)
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, stall_s=1.0, timeout_s=1.5)
    assert not reading.ok and not reading.stalled
    assert "did not finish within 1.5s" in reading.error
    assert reading.completion_tokens and reading.completion_tokens >= 3


async def test_engine_error_status_and_error_event(scripted) -> None:
    """An HTTP error status or an error event inside the stream gives ok=False with the engine's message."""
    base_url, scripts, _ = scripted
    scripts["/v1/chat/completions"] = (500, [(0.0, b'{"error": "model not loaded"}')])
    scripts["/v1/completions"] = (200, [(0.0, b'data: {"error": {"message": "CUDA error: out of memory"}}\n\n')])
    async with httpx.AsyncClient() as client:
        chat = await run_openai_chat_canary(client, base_url, stall_s=5, timeout_s=5)
        completion = await run_openai_completion_canary(client, base_url, stall_s=5, timeout_s=5)
    assert not chat.ok and "HTTP 500" in chat.error and "model not loaded" in chat.error
    assert not completion.ok and "CUDA error: out of memory" in completion.error


async def test_stream_cut_before_the_end(scripted) -> None:
    """A stream that closes after some tokens but before finish_reason (engine crashed mid-generation) is not ok."""
    base_url, scripts, _ = scripted
    scripts["/v1/chat/completions"] = (200, [(0.0, _sse({"role": "assistant", "content": "Hel"})), (0.0, _sse({"content": "lo"}))])
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, stall_s=5, timeout_s=5)
    assert not reading.ok and not reading.stalled
    assert "ended before the generation finished" in reading.error


async def test_stream_without_done_marker_but_finished(scripted) -> None:
    """A server that omits [DONE] but reports finish_reason passes, counting tokens from the deltas."""
    base_url, scripts, _ = scripted
    steps = [(0.01, _sse({"content": w})) for w in ("One", " two", " three")] + [(0.0, _sse(finish="stop"))]
    scripts["/v1/chat/completions"] = (200, steps)
    async with httpx.AsyncClient() as client:
        reading = await run_openai_chat_canary(client, base_url, stall_s=5, timeout_s=5)
    assert reading.ok, reading.error
    assert reading.completion_tokens == 3


def _ndjson(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def test_ollama_canary_uses_ollamas_own_rate(scripted) -> None:
    """Ollama's /api/generate stream passes, with thinking counted and tokens/s from eval_count / eval_duration."""
    base_url, scripts, bodies = scripted
    steps = [(0.0, _ndjson({"model": "qwen3:8b", "response": "", "thinking": "Okay", "done": False}))]
    steps += [(0.01, _ndjson({"model": "qwen3:8b", "response": "Hi", "done": False}))] * 3
    steps += [(0.0, _ndjson({"model": "qwen3:8b", "response": "", "done": True, "eval_count": 16, "eval_duration": 250_000_000}))]
    scripts["/api/generate"] = (200, steps)
    async with httpx.AsyncClient() as client:
        reading = await run_ollama_canary(client, base_url, model="qwen3:8b", max_tokens=16, stall_s=5, timeout_s=10)
    assert reading.ok, reading.error
    assert reading.completion_tokens == 16
    assert reading.tokens_per_s == pytest.approx(64.0)
    assert bodies[0]["options"]["num_predict"] == 16 and bodies[0]["stream"] is True


async def test_ollama_error_line(scripted) -> None:
    """Ollama's error line (e.g. the runner died) becomes the canary's error."""
    base_url, scripts, _ = scripted
    # The runner-died text of current Ollama (llm/llama_server.go); releases before it said "llama runner".
    scripts["/api/generate"] = (200, [(0.0, _ndjson({"error": "llama-server process has terminated: exit status 2: CUDA error: out of memory"}))])
    async with httpx.AsyncClient() as client:
        reading = await run_ollama_canary(client, base_url, model="qwen3:8b", stall_s=5, timeout_s=5)
    assert not reading.ok and "llama-server process has terminated" in str(reading.error)


async def test_bad_arguments_are_refused() -> None:
    """A zero token budget or a non-positive stall time is a ValueError naming the argument."""
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match="max_tokens"):
            await run_openai_chat_canary(client, "http://127.0.0.1:1", max_tokens=0)
        with pytest.raises(ValueError, match="stall_s"):
            await run_openai_chat_canary(client, "http://127.0.0.1:1", stall_s=0)
