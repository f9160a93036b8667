"""The gateway reads engines at their own pace: a client that stops reading is cut, never the engine blamed.

A real gateway (in process) in front of the real OpenAI stand-in engine, and a raw-socket client that
sends its request, reads the response head and then reads nothing more.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from supervisord_llm.gateway.proxy import GatewaySettings, Upstream
from tests.helpers import PYTHON, STANDINS, engine_process, free_port
from tests.integration.test_gateway import Backend, running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest

DECODE_STALL_S = 1.0
CLIENT_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def fast_engine() -> Iterator[str]:
    """The stand-in streaming 1000 tok/s, so a stream outgrows every buffer in a second."""
    port = free_port()
    with engine_process([PYTHON, str(STANDINS / "openai_engine.py"), "--port", str(port), "--tps", "1000"],
                        port) as base_url:
        yield base_url


def _hold_without_reading(listen: str, path: str, body: dict, hold_s: float,
                          release: threading.Event | None = None) -> bytes:
    """Send the request, read the head, then hold the connection without reading for ``hold_s`` (or until
    ``release`` is set)."""
    host, port = listen.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window is agreed then
    s.connect((host, int(port)))
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n".encode()
                  + b"anthropic-version: 2023-06-01\r\n" + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        head = s.recv(256)
        (release or threading.Event()).wait(hold_s)
        return head
    finally:
        s.close()


# Passthrough is also covered in the default run end to end (test_watchdog_evidence.py, real mlx_lm).
@pytest.mark.parametrize("path", [pytest.param("/v1/chat/completions", marks=pytest.mark.chaos_full),
                                  "/v1/messages"])
async def test_a_client_that_stops_reading_is_cut_and_no_stall_is_reported(fast_engine: str, path: str) -> None:
    """Passthrough and translated (Messages) streams: a client that reads only the head is cut after
    client_timeout_s (`client_too_slow`), and the engine is never reported stalled for it."""
    backend = Backend({"e": Upstream("e", fast_engine, "command", supports_messages=False)}, "e")
    settings = GatewaySettings(decode_stall_s=DECODE_STALL_S, prefill_stall_s=DECODE_STALL_S,
                               client_timeout_s=CLIENT_TIMEOUT_S, client_buffer_bytes=4096)
    body = {"model": "e", "max_tokens": 200000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with running_gateway(backend, settings) as listen:
        # The kernel still takes a trickle for a few seconds after the buffers first fill (it
        # collapses the idle receiver's queue), so the client holds on well past client_timeout_s.
        head = await anyio.to_thread.run_sync(_hold_without_reading, listen, path, body,
                                              CLIENT_TIMEOUT_S + 9)
        with anyio.fail_after(10):
            while not backend.finished:
                await anyio.sleep(0.05)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert backend.stalls == [], "the engine kept producing; only the client stopped"
    assert [f.ended for f in backend.finished] == ["client_too_slow"]
    assert backend.progress["e"] > 100  # tokens were metered as they came from the engine


def _read_after(listen: str, body: dict, pause_s: float) -> bytes:
    """A client that sends its request, reads nothing for ``pause_s``, then reads its whole stream."""
    host, port = listen.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    got = bytearray()
    try:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(pause_s)
        while not got.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                break
            got += data
        return bytes(got)
    finally:
        s.close()


@pytest.mark.parametrize("pause_s", [10.0, 0.0])
async def test_a_client_that_fell_behind_and_finished_gives_no_decode_rate_for_the_engine(
        fast_engine: str, pause_s: float) -> None:
    """A client that reads nothing for a while fills the kernel's buffers and its own in the gateway, and the
    gateway stops reading the engine for it: the stream still completes (the client catches up within
    client_timeout_s), but its tokens came at the client's pace, so it gives the daemon no decode-rate sample
    (it would read as a slow, `degraded` engine). The same stream read at once gives one."""
    from policies.health import stream_decode_rate

    backend = Backend({"e": Upstream("e", fast_engine, "command", supports_messages=False)}, "e")
    settings = GatewaySettings(client_timeout_s=30.0, client_buffer_bytes=4096)
    body = {"model": "e", "max_tokens": 8000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with running_gateway(backend, settings) as listen:
        got = await anyio.to_thread.run_sync(_read_after, listen, body, pause_s)
        with anyio.fail_after(10):
            while not backend.finished:
                await anyio.sleep(0.05)
    assert got.count(b'"content"') == 8000
    stats = backend.finished[0]
    held = pause_s > 0
    assert stats.ended == "complete" and stats.held_back is held, stats
    quiet = stats.quiet
    assert quiet is not None
    rate = stream_decode_rate(stats.tokens, stats.decode_s, (quiet.tokens, quiet.seconds, quiet.events),
                              held_back=stats.held_back)
    assert (rate is None) is held, rate


@pytest.mark.anyio
@pytest.mark.parametrize("anthropic", [False, True], ids=["openai", "anthropic"])
async def test_a_client_that_leaves_once_the_stream_has_ended_got_its_whole_answer(anthropic: bool) -> None:
    """An SDK stops reading at the stream's end marker ([DONE], message_stop) and closes its connection, while
    the engine may still hold its own open a moment: that request completed, it is not a client that left."""
    import asyncio

    if anthropic:
        body = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{}}}\n\n'
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        kind, path = "command", "/v1/messages"
    else:
        body = (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
                b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        kind, path = "command", "/v1/chat/completions"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + body)
            await writer.drain()
            await asyncio.sleep(1.0)  # the engine ends its connection a moment after the end marker
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        backend = Backend({"e": Upstream("e", base_url, kind, supports_messages=anthropic)}, default="e")
        async with running_gateway(backend) as url:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            request = {"model": "e", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "x"}]}
            payload = json.dumps(request).encode()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         b"anthropic-version: 2023-06-01\r\ncontent-length: %d\r\n\r\n%s"
                         % (path.encode(), len(payload), payload))
            await writer.drain()
            seen = b""
            end = b"message_stop" if anthropic else b"[DONE]"
            while end not in seen:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, seen
                seen += data
            writer.close()  # as an SDK does at the end marker
            # The client has closed; the engine still holds its connection for a second.
            deadline = time.monotonic() + 10
            while not backend.finished and time.monotonic() < deadline:
                await anyio.sleep(0.05)
    finally:
        server.close()
    assert [s.ended for s in backend.finished] == ["complete"], backend.finished


class _SlowToServe(Backend):
    """An engine that takes half a second to serve each request (a start): every stream is held first."""

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream:
        await anyio.sleep(0.5)
        return await super().acquire(model, may_start=may_start)


async def test_a_held_stream_whose_client_stops_reading_is_cut_and_gives_its_slot_back(fast_engine: str) -> None:
    """A stream held for its engine (head and comments sent early) whose client then stops reading is cut after
    client_timeout_s like any other, and its end gives the engine's one slot back while that client still holds
    its connection open: the next request is served (the held stream's last write waited for the client to read,
    forever, and kept the slot)."""
    backend = _SlowToServe({"e": Upstream("e", fast_engine, "command", supports_messages=False, max_concurrent=1,
                                               max_queue=4)}, "e")
    settings = GatewaySettings(client_timeout_s=CLIENT_TIMEOUT_S, client_buffer_bytes=4096, hold_s=30.0)
    body = {"model": "e", "max_tokens": 200000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    release = threading.Event()  # the client holds its connection, unread, until the test is done with it
    async with running_gateway(backend, settings) as listen:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, _hold_without_reading, listen, "/v1/chat/completions", body,
                          120.0, release)
            try:
                with anyio.fail_after(60):
                    while not backend.finished:
                        await anyio.sleep(0.05)
                assert [f.ended for f in backend.finished] == ["client_too_slow"]
                async with httpx.AsyncClient(timeout=10) as client:
                    r = await client.post(f"{listen}/v1/chat/completions", json={
                        "model": "e", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
            finally:
                release.set()
