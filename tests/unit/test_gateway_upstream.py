"""The gateway's forwarding client against real sockets: what goes out, and how engine faults come back."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import httpx
import pytest
from anyio import fail_after as anyio_fail_after

from policies import silence
from supervisord_llm.gateway import retry, upstream
from supervisord_llm.gateway.upstream import UpstreamClient, UpstreamRequest

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """The gateway's own loop is uvloop (gateway/worker.py), whose transports differ from asyncio's
    (connection_made comes later, the socket is wrapped): each test runs on both."""
    return request.param

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def engine(handler: Handler, port: int = 0) -> AsyncIterator[str]:
    """A real TCP server on 127.0.0.1 (an ephemeral port unless given) answering with ``handler``."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    if length:
        await reader.readexactly(length)
    return head


def client() -> UpstreamClient:
    return UpstreamClient(connect_timeout_s=2.0, read_timeout_s=2.0, max_connections=8, pool_timeout_s=None)


def request(url: str, path: str = "/v1/chat/completions") -> UpstreamRequest:
    return UpstreamRequest("POST", url + path, [(b"content-type", b"application/json"), (b"x-trace", b"7")], b"{}")


async def chunks_until_error(response: upstream.UpstreamResponse, *errors: type[BaseException]) -> list[bytes]:
    """The body's chunks read before it fails with one of ``errors`` (the test fails if it does not)."""
    chunks: list[bytes] = []
    with pytest.raises(errors):
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
    await response.aclose()
    return chunks


class KeepAliveEngine:
    """Answers ``ok`` to every request on a connection until the client closes it, like vLLM or SGLang;
    records when each connection was accepted."""

    def __init__(self) -> None:
        self.accepted: list[float] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


async def test_the_request_reaches_the_engine_as_the_client_sent_it() -> None:
    """The engine gets the path and query unchanged, the client's headers, and no headers the proxy made up."""
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        response = await c.send(request(url, "/v1/chat/completions?a=%2F&b=1"))
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    assert (response.status_code, body) == (200, b"{}")
    request_line, *lines = heads[0].decode().split("\r\n")
    assert request_line == "POST /v1/chat/completions?a=%2F&b=1 HTTP/1.1"
    names = {line.split(":")[0].lower() for line in lines if line}
    assert names == {"host", "content-type", "x-trace", "content-length"}


async def test_a_chunked_stream_arrives_as_the_engine_sent_it() -> None:
    """Each event of a chunked stream is handed on as it arrives, decoded from its chunk framing."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        response = await c.send(request(url))
        chunks = [chunk async for chunk in response.aiter_raw()]
        await response.aclose()
    assert response.headers["content-type"] == "text/event-stream"
    assert chunks == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_a_refused_connection_is_a_connect_error() -> None:
    """Nothing listening (an engine restarting) is a connect error, which the gateway may resend."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with client() as c:
            with pytest.raises(httpx.ConnectError):
                await c.send(request(f"http://127.0.0.1:{port}"))


async def test_an_engine_closing_before_its_answer_is_an_unanswered_request() -> None:
    """A connection closed before the response head reads as a protocol error: the request was not answered."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    async with engine(handler) as url, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.send(request(url))


async def test_an_unanswered_request_says_whether_it_went_out_on_a_connection_opened_earlier() -> None:
    """A request on a fresh connection that the engine closes unanswered reached the engine (retry.py does not
    send it again into a live engine); one on a kept-alive connection the engine closed as it went out is marked,
    so it is sent again at once on another connection."""
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await read_head(reader)
        if answered:  # the second request, on the first's kept-alive connection or a new one: closed unanswered
            writer.close()
            return
        answered += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)  # the second request arrives here, on the kept-alive connection
        writer.close()

    async with engine(handler) as url, client() as c:
        assert await exchange(c, url) == b"ok"
        with pytest.raises(httpx.RemoteProtocolError) as reused:
            await c.send(request(url))
        assert getattr(reused.value, "reused_connection", False) is True
        from policies.resend import Failure
        from supervisord_llm.gateway.retry import failure_of

        assert failure_of(reused.value) is Failure.REUSED  # closed as it went out: sent again at once
        with pytest.raises(httpx.RemoteProtocolError) as fresh:
            await c.send(request(url))
        assert getattr(fresh.value, "reused_connection", False) is False


async def test_a_kept_alive_connection_that_fails_only_after_the_engine_read_the_request_delivered_it() -> None:
    """An engine that reads a request on a kept-alive connection, works on it (a prefill) and then dies had
    the request: it is not sent again at once like one the engine closed as it went out. It was, so a prompt
    that crashes the engine went to two fresh runs instead of one (and a handler's failure paid its prefill
    four times)."""
    from policies.resend import Failure
    from supervisord_llm.gateway.retry import failure_of

    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await read_head(reader)
        if answered:
            writer.close()
            return
        answered += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)  # the second request, on the kept-alive connection: worked on, then dropped
        await asyncio.sleep(1.3)
        writer.close()

    async with engine(handler) as url, client() as c:
        assert await exchange(c, url) == b"ok"
        with pytest.raises(httpx.RemoteProtocolError) as late:
            await c.send(request(url))
    assert getattr(late.value, "reused_connection", False) is True
    assert getattr(late.value, "failed_after_s", 0.0) >= 1.2
    assert failure_of(late.value) is Failure.DELIVERED


async def test_a_stream_broken_off_midway_is_an_error_not_an_end() -> None:
    """An engine that dies mid-stream (chunked body cut short) raises, so the client is told it broke."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        chunks = await chunks_until_error(await c.send(request(url)), httpx.RemoteProtocolError)
    assert chunks == [b"data: 1\n\n"]


async def _send_to_a_silent_engine(progress_age_s: Callable[[], float | None] | None, match: str) -> float:
    """Send to an engine that takes the request and answers nothing (read timeout 0.2 s); the seconds until the
    read timeout, which must match ``match``."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(10)

    async with engine(handler) as url:
        async with UpstreamClient(connect_timeout_s=2.0, read_timeout_s=0.2, max_connections=8,
                                  pool_timeout_s=None) as c:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=match):
                await c.send(replace(request(url), progress_age_s=progress_age_s))
            return time.monotonic() - started


async def test_an_engine_silent_past_the_read_timeout_is_a_read_timeout() -> None:
    """An engine that takes the request and sends nothing is a read timeout (504), never resent."""
    await _send_to_a_silent_engine(None, "upstream_read_timeout_s")


async def test_an_engine_silent_toward_a_request_is_waited_for_while_it_shows_progress_elsewhere() -> None:
    """A non-streamed answer comes whole, after the whole generation: while the engine shows progress elsewhere
    (asked with how long it has been quiet toward this request) the request waits another read timeout; once
    it shows none, the read timeout says so and names the setting."""
    asked: list[float] = []

    def progress_age_s() -> float | None:
        asked.append(time.monotonic())
        return 0.05 if len(asked) <= 2 else 5.0  # progress just now twice, then none for longer than the wait

    waited_s = await _send_to_a_silent_engine(progress_age_s, "upstream_read_timeout_s.* showed no progress meanwhile")
    assert len(asked) == 3, asked
    assert 0.55 < waited_s < 3.0, waited_s  # three read timeouts, not one


async def test_progress_counts_only_within_the_quiet_time_since_the_last_extension() -> None:
    """Progress elsewhere extends the wait only when it came after the engine's last byte or the last
    extension: progress 0.1 s into a 0.2 s read timeout gives one more, and the same progress seen at the end of
    that one (older than its quiet time) gives no second."""
    progress_at: list[float] = []
    asked: list[float] = []

    def progress_age_s() -> float | None:
        now = time.monotonic()
        asked.append(now)
        if not progress_at:
            progress_at.append(now - 0.1)  # progress half-way through the first read timeout
        return now - progress_at[0]

    waited_s = await _send_to_a_silent_engine(progress_age_s, "showed no progress meanwhile")
    assert len(asked) == 2, asked
    assert 0.35 < waited_s < 1.5, waited_s  # two read timeouts


class Http10Engine:
    """Answers like mlx_lm.server (HTTP/1.0: one request per connection, closed after the answer) and
    records, per connection, when it was accepted, when its request came, and whether it was closed
    by the client without one."""

    def __init__(self) -> None:
        self.connections: list[dict[str, float]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = {"accepted": time.monotonic()}
        self.connections.append(record)
        try:
            await read_head(reader)
        except asyncio.IncompleteReadError:
            record["closed_unused"] = time.monotonic()
            return
        record["request"] = time.monotonic()
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()


async def exchange(c: UpstreamClient, url: str) -> bytes:
    response = await c.send(request(url))
    body = b"".join([chunk async for chunk in response.aiter_raw()])
    await response.aclose()
    return body


async def test_an_engine_that_closes_every_connection_gets_the_next_one_opened_before_it_is_needed() -> None:
    """Against an HTTP/1.0 engine the connect leaves the request's path: after each answer the next
    connection is opened, and the next request goes out on it, already accepted by the engine."""
    served = Http10Engine()
    sent_at: list[float] = []
    async with engine(served) as url, client() as c:
        for _ in range(3):
            await asyncio.sleep(0.1)  # a client's think time: the spare is ready by then
            sent_at.append(time.monotonic())
            assert await exchange(c, url) == b"ok"
        await asyncio.sleep(0.1)
        assert len(served.connections) == 4  # one per request, and the spare for the next
    first, second, third, spare = served.connections
    assert first["accepted"] >= sent_at[0]  # nothing was ready for the first: connected on its path
    assert second["accepted"] < sent_at[1] < second["request"]
    assert third["accepted"] < sent_at[2] < third["request"]
    assert "request" not in spare


async def test_a_spare_the_engine_closed_meanwhile_is_not_used() -> None:
    """An engine restarted on the same port closed the spare: the next request connects anew and gets
    its answer (no error, no retry), instead of going out on a dead connection."""
    first_run, restarted = Http10Engine(), Http10Engine()
    async with client() as c:
        async with engine(first_run) as url:
            port = int(url.rsplit(":", 1)[1])
            assert await exchange(c, url) == b"ok"
            await asyncio.sleep(0.1)
            assert len(first_run.connections) == 2  # the spare is open
        async with engine(restarted, port=port) as url:  # the engine restarted; its spare was closed
            await asyncio.sleep(0.1)
            assert await exchange(c, url) == b"ok"
    assert "request" in restarted.connections[0]


async def test_a_spare_nobody_takes_is_closed_so_an_idle_gateway_holds_no_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "SPARE_MAX_AGE_S", 0.3)
    served = Http10Engine()
    async with engine(served) as url, client() as c:
        assert await exchange(c, url) == b"ok"
        await asyncio.sleep(0.1)
        assert len(served.connections) == 2 and "closed_unused" not in served.connections[1]
        await asyncio.sleep(0.5)
        assert "closed_unused" in served.connections[1]  # closed by the gateway, not replaced
        assert len(served.connections) == 2


async def test_an_engine_that_keeps_connections_alive_gets_no_spare() -> None:
    """A keep-alive engine (vLLM, SGLang, llama-server's plain answers) is reached on its pooled connection: the gateway
    opens nothing more (a spare would only hold one of its workers)."""
    served = KeepAliveEngine()
    async with engine(served) as url, client() as c:
        for _ in range(3):
            assert await exchange(c, url) == b"ok"
            await asyncio.sleep(0.1)
    assert len(served.accepted) == 1


class StreamClosingEngine:
    """Answers like llama-server's streamed responses: HTTP/1.1, a chunked event stream whose head
    says ``Keep-Alive``, and then closes the connection anyway (its stream provider returns false
    once done, which cpp-httplib takes as a cancel). With ``idle_close_s`` it instead keeps each
    connection until it was idle that long, like a keep-alive engine's timeout. Records connections
    as :class:`Http10Engine` does."""

    def __init__(self, idle_close_s: float | None = None) -> None:
        self.idle_close_s = idle_close_s
        self.connections: list[dict[str, float]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = {"accepted": time.monotonic()}
        self.connections.append(record)
        while True:
            try:
                if self.idle_close_s is not None and "request" in record:
                    await asyncio.wait_for(read_head(reader), self.idle_close_s)
                else:
                    await read_head(reader)
            except (asyncio.IncompleteReadError, TimeoutError):
                if "request" not in record:
                    record["closed_unused"] = time.monotonic()
                return
            record["request"] = time.monotonic()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"keep-alive: timeout=5, max=100\r\n\r\n6\r\ndata: \r\n0\r\n\r\n")
            await writer.drain()
            if self.idle_close_s is None:
                return


async def test_an_engine_that_closes_streams_without_saying_so_is_learnt_and_gets_spares() -> None:
    """llama-server's streams: the engine closes the connection given back right after the first
    response, so from the second on each request goes out on a connection opened (and accepted)
    before it was sent."""
    served = StreamClosingEngine()
    sent_at: list[float] = []
    async with engine(served) as url, client() as c:
        for _ in range(4):
            await asyncio.sleep(0.1)
            sent_at.append(time.monotonic())
            assert await exchange(c, url) == b"data: "
        await asyncio.sleep(0.1)
    first, second, third, fourth = served.connections[:4]
    assert first["accepted"] >= sent_at[0]  # nothing was known yet: connected on its path
    assert second["accepted"] < sent_at[1] < second["request"]
    assert third["accepted"] < sent_at[2] < third["request"]
    assert fourth["accepted"] < sent_at[3] < fourth["request"]


async def test_an_engine_that_only_ends_idle_connections_gets_no_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keep-alive engine closing a connection idle past its timeout is not taken for one that
    closes after every response: the next request connects, and no spare follows."""
    monkeypatch.setattr(upstream, "SPARE_MAX_AGE_S", 0.3)
    served = StreamClosingEngine(idle_close_s=0.5)
    async with engine(served) as url, client() as c:
        for _ in range(3):
            assert await exchange(c, url) == b"data: "
            await asyncio.sleep(0.8)  # the engine ends the idle connection
        await asyncio.sleep(0.1)
    assert len(served.connections) == 3
    assert all("request" in record for record in served.connections)


async def test_a_response_the_gateway_drops_is_not_taken_for_the_engine_closing() -> None:
    """On a keep-alive engine, a response dropped midway (its client went away) closes the connection
    from this side: the next request connects anew, and no spare follows (the engine keeps its
    connections; it closed nothing)."""
    accepted: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        try:
            while True:
                head = await read_head(reader)
                if b"/slow" in head:  # a stream the client leaves before its end
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
                    await writer.drain()
                    await asyncio.sleep(5)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async with engine(handler) as url, client() as c:
        assert await exchange(c, url) == b"ok"  # given back to the pool
        response = await c.send(request(url, "/slow"))  # the same connection, dropped midway
        async for _ in response.aiter_raw():
            break
        await response.aclose()
        assert await exchange(c, url) == b"ok"  # a new connection: the dropped one is gone
        await asyncio.sleep(0.2)
        assert await exchange(c, url) == b"ok"
        await asyncio.sleep(0.2)
    assert len(accepted) == 2  # the first, and the one after the drop: no spare


async def test_a_connection_that_serves_a_second_response_unlearns_the_closing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that closed its first two connections after one response each, and then keeps a
    connection for further responses, is reached on that kept connection: a spare follows only a
    connection the engine closed, never a kept one."""
    monkeypatch.setattr(upstream, "SPARE_MAX_AGE_S", 0.3)
    accepted: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        keep = len(accepted) > 2
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async with engine(handler) as url, client() as c:
        for _ in range(4):  # the second and third go out on spares; the fourth reuses the third's
            assert await exchange(c, url) == b"ok"
            await asyncio.sleep(0.1)
        for _ in range(3):  # each wait outlives a spare: a spare per response would be a connection each
            await asyncio.sleep(0.4)
            assert await exchange(c, url) == b"ok"
    assert len(accepted) == 3  # two closed, and the kept one


async def test_a_body_that_ends_with_the_connection_is_read_whole() -> None:
    """An HTTP/1.0 answer without a length (mlx_lm.server's streams) ends when the engine closes: that
    close is the end of the body, not an error."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        assert await exchange(c, url) == b"data: 1\n\ndata: [DONE]\n\n"


async def test_an_engine_reset_midway_is_a_read_error() -> None:
    """A connection reset within the body (the engine killed) raises instead of ending the body quietly."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    async with engine(handler) as url, client() as c:
        chunks = await chunks_until_error(await c.send(request(url)), httpx.ReadError, httpx.RemoteProtocolError)
    assert chunks == [b"abc"]


async def test_a_response_that_does_not_parse_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with engine(handler) as url, client() as c:
        with pytest.raises(httpx.ProtocolError, match="does not parse") as caught:
            await c.send(request(url))
    assert not isinstance(caught.value, retry.UNANSWERED)  # the engine answered: never sent again


async def test_an_engine_that_dies_within_its_response_head_is_not_asked_again() -> None:
    """Part of a head came, then the connection closed: the engine had the request (a non-streamed
    answer's head comes after the whole generation), so it is not one the gateway may resend."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: appl")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        with pytest.raises(httpx.ProtocolError, match="within its response head") as caught:
            await c.send(request(url))
    assert not isinstance(caught.value, retry.UNANSWERED)


async def test_an_informational_head_is_skipped_for_the_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the final head comes in a read of its own
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async with engine(handler) as url, client() as c:
        response = await c.send(request(url))
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    assert (response.status_code, body) == (201, b"ok")


async def test_a_head_request_has_no_body_whatever_its_length_says() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 512\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with engine(handler) as url, client() as c:
        response = await c.send(UpstreamRequest("HEAD", url + "/v1/models", [], b""))
        with anyio_fail_after(1):
            assert [chunk async for chunk in response.aiter_raw()] == []
        await response.aclose()
    assert response.headers["content-length"] == "512"


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    """Reading from the engine pauses while the reader is behind, and resumes: nothing is lost or reordered."""
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
        await writer.drain()

    async with engine(handler) as url, client() as c:
        response = await c.send(request(url))
        got = bytearray()
        async for chunk in response.aiter_raw():
            got += chunk
            await asyncio.sleep(0.001)
        await response.aclose()
    assert bytes(got) == payload


async def test_no_free_connection_within_the_pool_wait_is_a_connect_timeout() -> None:
    """With every allowed connection to the engines in use, a request waits for one at most
    pool_timeout_s, then fails with a reason that names the setting; a connection given back
    meanwhile is taken at once."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
                await writer.drain()
                await release.wait()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async with engine(handler) as url, UpstreamClient(connect_timeout_s=2.0, read_timeout_s=5.0,
                                                      max_connections=1, pool_timeout_s=0.3) as c:
        held = await c.send(request(url))
        with pytest.raises(httpx.ConnectTimeout, match="max_upstream_connections"):
            await c.send(request(url))
        waiting = asyncio.ensure_future(c.send(request(url)))
        await asyncio.sleep(0.05)
        release.set()
        assert b"".join([chunk async for chunk in held.aiter_raw()]) == b"data: "
        await held.aclose()
        second = await asyncio.wait_for(waiting, 1)
        assert b"".join([chunk async for chunk in second.aiter_raw()]) == b"data: "
        await second.aclose()


async def test_a_request_that_gives_up_as_its_connection_comes_free_passes_it_on() -> None:
    """A client that goes away just as a connection comes free for its waiting request does not take
    that connection with it: the next request gets it at once."""
    async with engine(KeepAliveEngine()) as url, UpstreamClient(connect_timeout_s=2.0, read_timeout_s=5.0,
                                                      max_connections=1, pool_timeout_s=5.0) as c:
        held = await c.send(request(url))
        waiting = asyncio.ensure_future(c.send(request(url)))
        await asyncio.sleep(0.05)
        assert b"".join([chunk async for chunk in held.aiter_raw()]) == b"ok"
        await held.aclose()  # the connection passes to the waiting request...
        waiting.cancel()  # ...whose client leaves before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await asyncio.wait_for(exchange(c, url), 1) == b"ok"


async def test_a_keep_alive_connection_whose_answer_was_read_slowly_serves_the_next_request() -> None:
    """A large answer that came whole while its reader was behind (reading paused) and was then left
    unread (its client went away): the pooled connection reads again, so the next request on it is
    answered instead of waiting out the read timeout."""
    accepted: list[float] = []
    big = b"x" * 200_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async with engine(handler) as url, UpstreamClient(connect_timeout_s=2.0, read_timeout_s=1.0, max_connections=8,
                                                      pool_timeout_s=None) as c:
        response = await c.send(request(url))
        async for _ in response.aiter_raw():
            break  # one piece, then the client is gone
        await asyncio.sleep(0.2)  # the rest of the answer arrives meanwhile
        await response.aclose()
        assert await asyncio.wait_for(exchange(c, url), 0.9) == big
    assert len(accepted) == 1  # the same connection


async def test_a_request_the_engine_stopped_reading_is_dropped_with_its_connection() -> None:
    """An engine that stopped reading mid-request (hung) gets its connection reset once the gateway
    gives up on the answer, so neither the socket nor the unsent body stays behind."""
    ended = asyncio.Event()
    got = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.6)  # hung, not reading; then reads what is there
        try:
            while data := await reader.read(2**20):
                got[0] += len(data)
        except ConnectionError:
            pass
        ended.set()

    body = b"x" * (32 << 20)
    async with engine(handler) as url, UpstreamClient(connect_timeout_s=2.0, read_timeout_s=0.3, max_connections=8,
                                                      pool_timeout_s=None) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.send(UpstreamRequest("POST", url + "/v1/chat/completions", [], body))
        await asyncio.wait_for(ended.wait(), 5)
    # Reset: the engine's reads ended with what the sockets held, not the whole body the gateway kept.
    assert got[0] < len(body) // 2


async def test_a_stream_the_engine_closes_before_the_gateway_is_done_with_it_still_gets_a_spare() -> None:
    """llama-server closes its connection as soon as a stream ends, usually before the gateway has
    finished the client's side of it: that close, too, has the next connection opened at once."""
    served = StreamClosingEngine()
    sent_at: list[float] = []
    async with engine(served) as url, client() as c:
        for _ in range(3):
            await asyncio.sleep(0.1)
            sent_at.append(time.monotonic())
            response = await c.send(request(url))
            assert b"".join([chunk async for chunk in response.aiter_raw()]) == b"data: "
            await asyncio.sleep(0.05)  # the gateway still busy with its client; the engine's close arrives
            await response.aclose()
    for record, sent in zip(served.connections[1:3], sent_at[1:], strict=True):
        assert record["accepted"] < sent < record["request"]


async def test_an_answer_is_not_merged_with_bytes_the_engine_sent_after_it() -> None:
    """A second, unasked response behind the first in the same write is not taken into the first
    (its status, headers or body), and the connection is not used again."""
    accepted: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                             b"HTTP/1.1 500 Oops\r\nx-second: 1\r\ncontent-length: 3\r\n\r\nbad")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async with engine(handler) as url, client() as c:
        response = await c.send(request(url))
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
        assert (response.status_code, body, "x-second" in response.headers) == (200, b"ok", False)
        assert await exchange(c, url) == b"ok"
    assert len(accepted) == 2


async def test_an_engine_that_shows_progress_but_never_answers_a_request_is_given_up_on() -> None:
    """An engine that dropped one request while it serves others shows progress all along: the request is
    waited for six read timeouts in a row, not forever (its client, its slot and its connection are held)."""
    asked: list[float] = []

    def progress_age_s() -> float | None:
        asked.append(time.monotonic())
        return 0.0

    waited_s = await _send_to_a_silent_engine(progress_age_s, "although it showed progress elsewhere")
    # Asked at the end of each read timeout: the first and each extension's.
    assert len(asked) == silence.QUIET_EXTENSIONS_MAX + 1
    assert waited_s >= (silence.QUIET_EXTENSIONS_MAX + 1) * 0.2 - 0.05, waited_s
