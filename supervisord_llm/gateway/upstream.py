"""The forwarding client: one proxied request to an engine, its response head and body as they come.

Room: gateway.

This is the gateway's per-request and per-token hot path, so it is an asyncio protocol per
connection with httptools (llhttp, the C parser uvicorn's server side already uses) reading the
response: the engine's bytes are parsed in ``data_received`` and each piece of body is handed to the
one reader waiting for it, with no stream object, timeout context or task per read. Against the real
mlx_lm.server aiohttp's client took about 0.3 ms longer to the first body byte than such a protocol
in the same process (bench/gateway_bench.py's TTFB rows, before and after); httpx (httpcore, h11's
pure-Python chunked decoder, a timeout scope and four generator layers per read) cost about half of
the gateway's CPU per streamed token before that. httpx stays for the gateway's other calls, and its
exceptions are the ones this module raises (below).

What it speaks: HTTP/1.1 requests (the body is sent whole: the gateway has read it), responses with a
``Content-Length``, a chunked body, or a body that ends with the connection (HTTP/1.0), informational
``1xx`` heads skipped. Keep-alive connections are pooled per engine address, LIFO, for
``KEEPALIVE_S`` at most; an idle connection is checked with a non-blocking peek before it is used,
so one the engine closed meanwhile is not sent on.

A connection the engine closes after each response costs a connect on the request's path: the
gateway's own (socket, connect, transport) and the engine's accept. Two engines do that:

- mlx_lm.server speaks HTTP/1.0, so every request opens a new connection (it says so: the status
  line's version, or ``Connection: close``);
- llama-server closes the connection after every *streamed* response without saying so: its stream
  provider returns false once the stream is done (tools/server/server-http.cpp,
  ``chunked_content_provider`` returns ``has_next``), which cpp-httplib's ``write_content_chunked``
  (vendor/cpp-httplib/httplib.cpp) takes as a cancel, and the connection ends. Its head still says
  ``Keep-Alive``.

So the client keeps one *spare* for such an engine: once a response is over whose connection the
engine ends (its head said so), or once the engine closes a pooled connection less than
``SPARE_MAX_AGE_S`` after that connection's response ended (no engine's keep-alive timeout is that
short: uvicorn's and llama-server's are 5 s), the next connection is opened (not earlier: the
engine's accept would take its time from that very response), and the next request to that address
takes it instead of connecting. Engines that keep connections alive (vLLM, SGLang, llama-server's
non-streamed answers) reuse pooled connections and get no spare. A spare is used only while its
engine has not closed it and for at most ``SPARE_MAX_AGE_S``; then it is closed and not replaced, so
an idle gateway holds none. (A server that handles one connection at a time (older mlx_lm.server
releases ran a plain ``HTTPServer``; the ones tested here run ``ThreadingHTTPServer``,
mlx_lm/server.py) would wait on a spare for that long: hence the short age.)

Errors are raised as the httpx exceptions that :mod:`supervisord_llm.gateway.retry` and the forward
already judge:

    refused, unreachable, no such host                         -> httpx.ConnectError
    connect (or a free connection) not within its time          -> httpx.ConnectTimeout
    no byte from the engine within the read timeout             -> httpx.ReadTimeout
    closed before any byte of a response, or within the body    -> httpx.RemoteProtocolError
    reset (or another socket error) before any byte, or in body -> httpx.ReadError
    closed within the response head, or bytes that do not parse -> httpx.ProtocolError

The last is not one retry.py sends again: the engine had the request and began to answer it.
A connection dropped by the gateway with part of its request unsent (an engine that stopped
reading) is aborted, not closed: a close would wait for those bytes forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools
import httpx

from policies import silence

__all__ = ["UpstreamClient", "UpstreamRequest", "UpstreamResponse"]

# A body the reader has not taken yet pauses reading from the engine beyond this many bytes.
_HIGH_WATER_BYTES = 2**16
# A spare connection not taken within this long is closed (and not replaced until one is needed).
SPARE_MAX_AGE_S = 2.0
# Opening a spare gives up after this long (an engine that does not accept: the request connects itself).
SPARE_CONNECT_S = 5.0
# A pooled keep-alive connection unused this long is closed.
KEEPALIVE_S = 30.0
# A host name's addresses are looked up again after this long.
DNS_TTL_S = 10.0

_Key = tuple[str, int, bool]  # host, port, TLS


@dataclass(frozen=True)
class UpstreamRequest:
    """One request as it goes to the engine (the path was checked by the gateway before).

    ``progress_age_s()``, when given, is asked once the engine has sent nothing for the read timeout: how
    long ago the engine showed progress elsewhere (its step counters, its prefill, other streams; None:
    never). ``policies.silence.quiet_request_verdict`` decides from it whether the request waits another
    read timeout: a non-streamed answer sends nothing until it is whole, however long the generation takes.
    """

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes
    progress_age_s: Callable[[], float | None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class _Target:
    key: _Key
    host_header: bytes


def _split_url(url: str) -> tuple[_Target, str]:
    """``http://host:port/path?q`` -> where to connect, and the request target as given (not normalised)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"the engine's URL {url!r} is not http:// or https://")
    slash = rest.find("/")
    netloc, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    tls = scheme == "https"
    if netloc.startswith("["):
        host, _, port_text = netloc[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
    port = int(port_text) if port_text else (443 if tls else 80)
    return _Target((host, port, tls), netloc.encode("idna" if not netloc.isascii() else "ascii")), target


def _still_open(sock: socket.socket) -> bool:
    """The peer has not closed (or reset) this idle connection, nor sent anything unasked."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": closed; bytes: not a fresh connection
        return False
    except BlockingIOError:
        return True  # nothing to read: open
    except OSError:
        return False


def _os_text(exc: BaseException | None, default: str) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or default if exc is not None else default


class _Connection(asyncio.Protocol):
    """One connection to an engine: the response in progress, parsed as its bytes arrive."""

    def __init__(self, client: UpstreamClient, key: _Key, sock: socket.socket) -> None:
        self._client = client
        self.key = key
        self.sock = sock
        self._loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.closed_here = False
        self.served = 0  # responses read to their end on this connection
        self.released_at = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.is_spare = False
        self._parser: httptools.HttpResponseParser | None = None
        self._reset_response(None)

    def _reset_response(self, method: str | None) -> None:
        self.method = method
        self.url = ""
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.delimited = False  # the head gave a length or chunked framing
        self.says_close = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0  # (reading is never paused here: response_done resumed it)
        self.complete = False
        self.error: httpx.HTTPError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.answered = False  # a byte of the response came
        self.paused = False
        self.last_byte_at = 0.0

    # -- the request ---------------------------------------------------------------------------

    def start(self, method: str, url: str, data: bytes) -> asyncio.Future[None]:
        self._reset_response(method)
        self.url = url
        self._parser = httptools.HttpResponseParser(self)
        self.head = self._loop.create_future()
        self.last_byte_at = self._loop.time()
        if self.transport is None or self.transport.is_closing():
            self._fail(httpx.RemoteProtocolError("the connection to the engine was closed before the request",
                                                 request=self._request()))
        else:
            self.transport.write(data)
        return self.head

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:  # bytes nobody asked for: this connection is not reusable
            self.close()
            return
        self.last_byte_at = self._loop.time()
        self.answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.ProtocolError("the engine switched protocols", request=self._request()))
            self.close()
        except httptools.HttpParserError as exc:
            # Not a RemoteProtocolError: the engine answered (with bytes that do not parse), so the
            # request is not sent again (gateway/retry.py).
            self._fail(httpx.ProtocolError(f"the engine's response does not parse: {exc}",
                                           request=self._request()))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed connection is of no further use

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.method is None:  # idle in the pool (or a spare): nothing was waiting on it
            self._client.lost_idle(self)
            return
        if self.complete or self.error is not None:
            self._wake()
            return
        request = self._request()
        if self.head is not None and not self.head.done():
            if self.answered:  # part of a head came: the engine had the request (never sent again)
                self._fail(httpx.ProtocolError(
                    "the engine closed the connection within its response head", request=request))
            elif exc is None:
                self._fail(httpx.RemoteProtocolError(
                    "the engine closed the connection without sending a response", request=request))
            else:
                self._fail(httpx.ReadError(_os_text(exc, "connection lost"), request=request))
        elif exc is None and not self.delimited:
            self.complete = True  # the body ends with the connection (HTTP/1.0)
        elif exc is None:
            self._fail(httpx.RemoteProtocolError(
                "the engine closed the connection before the end of its response body", request=request))
        else:
            self._fail(httpx.ReadError(_os_text(exc, "connection lost"), request=request))
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second message after this response's end, unasked: data_received closes
            raise httptools.HttpParserError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an informational head (100 Continue): the answer follows
            self.raw_headers = []
            return
        self.status = status
        self.says_close = not self._parser.should_keep_alive()
        for name, value in self.raw_headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                self.delimited = True
        if self.method == "HEAD" or status in (204, 304):
            self.delimited = True
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.method == "HEAD":  # llhttp does not know the method: no body follows, whatever the head says
            self.complete = True
            self.says_close = True  # and the parser would take the next bytes for a body: not reused

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD's head: not the client's
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an informational message
            return
        self.complete = True
        self.served += 1
        self._wake()

    # -- the reader's side -----------------------------------------------------------------------

    def _request(self) -> httpx.Request:
        return httpx.Request(self.method or "GET", self.url)

    def _fail(self, error: httpx.HTTPError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed_here = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                # Part of the request is still unsent (an engine that stopped reading): close() would
                # wait for it forever, holding the socket and the body.
                self.transport.abort()
            else:
                self.transport.close()



class _ReadClock:
    """One timer per wait, and none while bytes keep coming: the engine must send a byte within
    ``timeout_s`` of the last one (or of the request) while someone waits for it, or show progress
    elsewhere meanwhile (``progress_age_s``, see UpstreamRequest), which may give it another ``timeout_s``
    (``policies.silence.quiet_request_verdict`` decides)."""

    def __init__(self, connection: _Connection, timeout_s: float,
                 progress_age_s: Callable[[], float | None] | None = None) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._progress_age_s = progress_age_s
        self._extended_at = 0.0  # when the engine's progress elsewhere last gave it more time
        self._extensions = 0  # given since the engine's last byte
        self._timer: asyncio.TimerHandle | None = None

    def _due(self) -> float:
        return max(self._connection.last_byte_at, self._extended_at) + self._timeout_s

    async def wait(self, future: asyncio.Future[None]) -> None:
        connection = self._connection
        self._timer = connection._loop.call_at(self._due(), self._check, future)
        try:
            await future
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _check(self, future: asyncio.Future[None]) -> None:
        if future.done():
            return
        connection = self._connection
        due = self._due()
        loop = connection._loop
        now = loop.time()
        if now < due:
            self._timer = loop.call_at(due, self._check, future)
            return
        if connection.last_byte_at > self._extended_at:
            self._extensions = 0  # bytes came since the last extension
        progress_age_s = self._progress_age_s
        age_s: float | None = None
        if progress_age_s is not None:
            try:
                age_s = progress_age_s()
            except Exception:  # a bug in the caller's check must not leave the request waiting forever
                age_s = None
        verdict = silence.quiet_request_verdict(
            quiet_s=now - max(connection.last_byte_at, self._extended_at), timeout_s=self._timeout_s,
            progress_age_s=age_s, extensions_in_a_row=self._extensions, watched=progress_age_s is not None)
        if verdict.extend:
            self._extended_at = now
            self._extensions += 1
            self._timer = loop.call_at(self._due(), self._check, future)
            return
        self._timer = None
        future.set_exception(httpx.ReadTimeout(verdict.reason, request=connection._request()))


class UpstreamResponse:
    """The engine's response head; the body is read with :meth:`aiter_raw` (bytes as they came)."""

    def __init__(self, client: UpstreamClient, connection: _Connection, clock: _ReadClock) -> None:
        self._client = client
        self._connection = connection
        self._clock = clock
        self._closed = False
        self.status_code = connection.status
        self.headers = httpx.Headers(connection.raw_headers)

    async def aiter_raw(self) -> AsyncGenerator[bytes, None]:
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
                continue
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                return
            waiter = connection.waiter = connection._loop.create_future()
            try:
                await self._clock.wait(waiter)
            finally:
                if connection.waiter is waiter:
                    connection.waiter = None

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end; else drop it, which is how
        the engine learns that the client went away (it stops generating)."""
        if not self._closed:
            self._closed = True
            self._client.response_done(self._connection)


class UpstreamClient:
    """A pool of keep-alive connections to the engines, for forwarded requests only."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int,
                 pool_timeout_s: float | None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._pool_timeout_s = pool_timeout_s
        self._targets: dict[str, tuple[_Target, str]] = {}
        self._idle: dict[_Key, list[_Connection]] = {}
        self._busy = 0  # connections a request holds (or is opening)
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._making: dict[_Key, asyncio.Task[None]] = {}
        self._addresses: dict[str, tuple[list[str], float]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._open = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on entering

    async def __aenter__(self) -> UpstreamClient:
        self.loop = asyncio.get_running_loop()  # the loop that serves the gateway: its connections live there
        self._open = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._open = False
        for task in self._making.values():
            task.cancel()
        self._making.clear()
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.cancel()

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request; returns once the response head is in (the body is not read yet)."""
        assert self._open, "UpstreamClient used outside its 'async with'"
        split = self._targets.get(request.url)
        if split is None:
            split = _split_url(request.url)
            if len(self._targets) < 1024:
                self._targets[request.url] = split
        target, path = split
        data = self._head_bytes(request, target, path)
        await self._take_slot(request.url)
        connection: _Connection | None = None
        reused = False
        written_at: float | None = None
        try:
            connection = self._pooled(target.key)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(target.key, request.url)
            head = connection.start(request.method, request.url, data)
            written_at = self.loop.time()
            clock = _ReadClock(connection, self._read_timeout_s, request.progress_age_s)
            await clock.wait(head)
        except BaseException as exc:
            if connection is not None:
                connection.close()
            self._give_slot()
            if reused and isinstance(exc, httpx.TransportError):
                # It went out on a connection opened earlier (pooled, or a spare), which the engine may have
                # closed just as it was sent; how soon it failed tells (policies.resend.failure_of_send).
                exc.reused_connection = True  # type: ignore[attr-defined]
                if written_at is not None:
                    exc.failed_after_s = self.loop.time() - written_at  # type: ignore[attr-defined]
            raise
        return UpstreamResponse(self, connection, clock)

    @staticmethod
    def _head_bytes(request: UpstreamRequest, target: _Target, path: str) -> bytes:
        parts = [request.method.encode("ascii"), b" ", path.encode("ascii", "strict"), b" HTTP/1.1\r\nhost: ",
                 target.host_header, b"\r\n"]
        for name, value in request.headers:
            parts += (name, b": ", value, b"\r\n")
        content = request.content
        if content or request.method in ("POST", "PUT", "PATCH"):
            parts += (b"content-length: ", str(len(content)).encode("ascii"), b"\r\n")
        parts += (b"\r\n", content)
        return b"".join(parts)

    # -- the pool --------------------------------------------------------------------------------

    async def _take_slot(self, url: str) -> None:
        if self._busy < self._max_connections and not self._slot_waiters:
            self._busy += 1
            return
        waiter = self.loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._give_slot()  # it was handed over just as this wait ended: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # (_give_slot drops a cancelled waiter itself)
                    self._slot_waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(
                    f"no connection to the engine came free within {self._pool_timeout_s:g}s "
                    f"(gateway.max_upstream_connections = {self._max_connections})",
                    request=httpx.Request("POST", url)) from None
            raise
        # The slot was handed over with the count unchanged (see _give_slot).

    def _give_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: _busy stays
                return
        self._busy -= 1

    def _pooled(self, key: _Key) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()
                connection.idle_timer = None
            if (not connection.lost and not connection.closed_here and connection.transport is not None
                    and not connection.transport.is_closing() and _still_open(connection.sock)):
                return connection
            connection.close()
        return None

    def response_done(self, connection: _Connection) -> None:
        """The response on ``connection`` is over (read to its end, or dropped by the gateway)."""
        self._give_slot()
        reusable = (connection.complete and connection.error is None and not connection.says_close
                    and connection.delimited and not connection.lost and not connection.closed_here
                    and self._open)
        key = connection.key
        if not reusable:
            if not connection.lost:
                connection.close()
            # The engine ends this connection after each response (HTTP/1.0, Connection: close, a body
            # that ends with the connection, or llama-server's streams, closed by the engine as soon
            # as they end, often before the gateway is done with the response): the next one is
            # opened now.
            if connection.complete and connection.error is None and (
                    connection.says_close or not connection.delimited
                    or (connection.lost and not connection.closed_here)):
                self._want_spare(key)
            return
        connection.method = None  # idle: no response in progress
        connection._parser = None
        if connection.paused and connection.transport is not None:  # the body's end was left unread
            connection.paused = False
            connection.transport.resume_reading()
        connection.released_at = time.monotonic()
        connection.is_spare = False
        self._park(connection, KEEPALIVE_S)

    def _park(self, connection: _Connection, max_idle_s: float) -> None:
        self._idle.setdefault(connection.key, []).append(connection)
        connection.idle_timer = self.loop.call_later(max_idle_s, self._expire, connection)

    def _expire(self, connection: _Connection) -> None:
        connection.idle_timer = None
        connections = self._idle.get(connection.key)
        if connections is not None and connection in connections:
            connections.remove(connection)
        connection.close()

    def lost_idle(self, connection: _Connection) -> None:
        """The engine closed a pooled connection: one that served a response just before was closed
        because the engine ends its connections after each response (llama-server's streams): the
        next one is opened now."""
        connections = self._idle.get(connection.key)
        if connections is not None and connection in connections:
            connections.remove(connection)
        if (not connection.closed_here and not connection.is_spare and connection.served
                and time.monotonic() - connection.released_at < SPARE_MAX_AGE_S):
            self._want_spare(connection.key)

    def _want_spare(self, key: _Key) -> None:
        if self._open and key not in self._making and not self._idle.get(key):
            self._making[key] = self.loop.create_task(self._open_spare(key))

    async def _open_spare(self, key: _Key) -> None:
        try:
            async with asyncio.timeout(SPARE_CONNECT_S):
                connection = await self._open_connection(key)
        except (OSError, TimeoutError, httpx.HTTPError):
            return  # the engine is not there (now): the next request connects as usual
        finally:
            self._making.pop(key, None)
        if not self._open or self._idle.get(key):
            connection.close()
            return
        connection.is_spare = True
        self._park(connection, SPARE_MAX_AGE_S)

    # -- connecting ------------------------------------------------------------------------------

    async def _connect(self, key: _Key, url: str) -> _Connection:
        request = httpx.Request("POST", url)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._open_connection(key)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to the engine within {self._connect_timeout_s:g}s", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(_os_text(exc, "connect failed"), request=request) from exc

    async def _open_connection(self, key: _Key) -> _Connection:
        host, port, tls = key
        error: OSError | None = None
        for address in await self._resolve(host, port):
            # The socket is made here, not by create_connection, so that the pool can peek at it.
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, (address, port))
                transport, protocol = await self.loop.create_connection(
                    functools.partial(_Connection, self, key, sock), sock=sock,
                    ssl=self._ssl_context() if tls else None, server_hostname=host if tls else None)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            assert isinstance(protocol, _Connection)
            # uvloop calls connection_made only after create_connection(sock=...) has returned (and its
            # transport is not an asyncio.Transport subclass).
            protocol.transport = cast(asyncio.Transport, transport)
            return protocol
        raise error if error is not None else OSError(f"no address for {host!r}")

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        known = self._addresses.get(host)
        if known is not None and time.monotonic() - known[1] < DNS_TTL_S:
            return known[0]
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._addresses[host] = (addresses, time.monotonic())
        return addresses

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl
