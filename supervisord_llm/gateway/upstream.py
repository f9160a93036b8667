"""The forwarding client: one proxied request to an engine, its response head and body as they come.

Room: gateway.

This is the gateway's per-token hot path. httpx reads a response body through httpcore, h11's
pure-Python chunked decoder, an anyio stream with a timeout scope per read and four generator
layers: about half of the gateway's CPU per streamed token (bench/gateway_microbench.py). aiohttp's
client parses the head and the chunked body in C (llhttp) and pools keep-alive connections, so each
chunk the engine sends costs one buffer hand-over here. httpx stays for the gateway's other calls.

A connection the engine closes after each response costs a connect on the request's path: the
gateway's own (socket, connect, transport) and the engine's accept. Two engines do that:

- mlx_lm.server speaks HTTP/1.0, so every request opens a new connection (it says so: the status
  line's version, or ``Connection: close``);
- llama-server closes the connection after every *streamed* response without saying so: its stream
  provider returns false once the stream is done (tools/server/server-http.cpp,
  ``chunked_content_provider`` returns ``has_next``), which cpp-httplib's ``write_content_chunked``
  (vendor/cpp-httplib/httplib.cpp) takes as a cancel, and the connection ends. Its head still says
  ``Keep-Alive``. So the connector also learns it: a new connection is needed while the one last
  given back to the pool, less than ``SPARE_MAX_AGE_S`` before, has been closed by the engine
  (no engine's keep-alive timeout is that short: uvicorn's and llama-server's are 5 s). A connection
  that serves a second response unlearns it.

So the connector keeps one *spare* for such an engine: once a response that the engine ends by
closing its connection is over, the next connection is opened (not earlier: the engine's accept
would take its time from that very response), and the next request to that address takes it
instead of connecting. Engines that keep connections alive (vLLM, SGLang, llama-server's
non-streamed answers) reuse pooled connections and get no spare. A spare is
used only while its engine has not closed it (checked with a non-blocking peek just before) and for
at most ``SPARE_MAX_AGE_S``; then it is closed and not replaced, so an idle gateway holds none. (A
server that handles one connection at a time (older mlx_lm.server releases ran a plain
``HTTPServer``; the ones tested here run ``ThreadingHTTPServer``, mlx_lm/server.py) would wait on a
spare for that long: hence the short age.) The hook is ``TCPConnector._wrap_create_connection``, the one aiohttp's connector
subclasses override (aiohttp-socks does the same); the tests run a real HTTP/1.0 server through it.

Errors are raised as the httpx exceptions that :mod:`supervisord_llm.gateway.retry` and the forward
already judge (connect refused, reset before the head, timeouts, a body broken off), mapped at this
boundary with ``raise ... from``; nothing above this module sees an aiohttp type.

    aiohttp.ClientConnectorError (refused, unreachable)     -> httpx.ConnectError
    aiohttp.ConnectionTimeoutError                          -> httpx.ConnectTimeout
    aiohttp.SocketTimeoutError, TimeoutError                -> httpx.ReadTimeout
    aiohttp.ServerDisconnectedError (closed before/in body) -> httpx.RemoteProtocolError
    aiohttp.ClientPayloadError (chunked body broken off)    -> httpx.RemoteProtocolError
    aiohttp.ClientOSError (reset on write or read)          -> httpx.ReadError
    any other aiohttp.ClientError                           -> httpx.ReadError
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohappyeyeballs
import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

__all__ = ["UpstreamClient", "UpstreamRequest", "UpstreamResponse"]

# Read this much of a body at most per chunk handed on: whatever has arrived, up to this.
_READ_BYTES = 2**16
# A spare connection not taken within this long is closed (and not replaced until one is needed).
SPARE_MAX_AGE_S = 2.0
# Opening a spare gives up after this long (an engine that does not accept: the request connects itself).
SPARE_CONNECT_S = 5.0


@dataclass(frozen=True)
class UpstreamRequest:
    """One request as it goes to the engine (the path was checked by the gateway before)."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes


def _mapped(exc: BaseException, url: str) -> httpx.HTTPError:
    request = httpx.Request("POST", url)
    # What went wrong, in the words of the system call where there is one (not aiohttp's own text).
    os_error = getattr(exc, "os_error", None)
    message = (os_error.strerror if isinstance(os_error, OSError) and os_error.strerror else None) \
        or str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


class UpstreamResponse:
    """The engine's response head; the body is read with :meth:`aiter_raw` (bytes as they came)."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, on_closed: Callable[[bool], None]) -> None:
        self._response = response
        self._url = url
        self._on_closed = on_closed
        self.status_code = response.status
        self.headers = httpx.Headers(list(response.raw_headers))

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _mapped(exc, self._url) from exc

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end; else drop it, which is how
        the engine learns that the client went away (it stops generating)."""
        response = self._response
        # The engine ends this connection after the response (HTTP/1.0, or it said so).
        version = response.version
        engine_closes = (version is not None and version < aiohttp.HttpVersion11) or response.headers.get(
            "Connection", "").lower() == "close"
        if response.content.at_eof():
            response.release()
        else:
            response.close()
        self._on_closed(engine_closes)


def _still_open(sock: socket.socket) -> bool:
    """The peer has not closed (or reset) this idle connection, nor sent anything unasked."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": closed; bytes: not a fresh connection
        return False
    except BlockingIOError:
        return True  # nothing to read: open
    except OSError:
        return False


class SpareConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with one connected socket kept ready per engine address (see above)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spares: dict[tuple[str, int], tuple[socket.socket, float]] = {}
        self._making: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._addr_infos: dict[tuple[str, int], Any] = {}  # of the addresses this connector connected to
        self._expiries: dict[tuple[str, int], asyncio.TimerHandle] = {}
        # Learnt per address: the engine closes its connection after a response without saying so.
        self._closes_unsaid: set[tuple[str, int]] = set()
        # The protocol of the connection last given back per address, and when.
        self._given_back: dict[tuple[str, int], tuple[weakref.ref[Any], float]] = {}
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()  # protocols that served a response

    async def _wrap_create_connection(self, *args: Any, addr_infos: Any, req: Any, **kwargs: Any) -> Any:
        if req.is_ssl():
            return await super()._wrap_create_connection(*args, addr_infos=addr_infos, req=req, **kwargs)
        key = (req.host, req.port)
        self._learn(key)
        spare = self._take_spare(key)
        self._addr_infos[key] = list(addr_infos)
        if spare is not None:
            kwargs.pop("timeout", None)
            kwargs.pop("client_error", None)
            try:
                connection = await self._loop.create_connection(*args, **kwargs, sock=spare)
            except OSError:
                spare.close()
            else:
                return connection
        return await super()._wrap_create_connection(*args, addr_infos=addr_infos, req=req, **kwargs)

    def _take_spare(self, key: tuple[str, int]) -> socket.socket | None:
        held = self._spares.pop(key, None)
        if held is None:
            return None
        sock, made_at = held
        if time.monotonic() - made_at < SPARE_MAX_AGE_S and _still_open(sock):
            return sock
        sock.close()
        return None

    def _learn(self, key: tuple[str, int]) -> None:
        """A new connection to ``key`` is needed: was the one last given back closed by the engine?"""
        given_back = self._given_back.pop(key, None)
        if given_back is None:
            return
        protocol, at = given_back[0](), given_back[1]
        if protocol is None or not protocol.is_connected():
            if time.monotonic() - at < SPARE_MAX_AGE_S:
                self._closes_unsaid.add(key)
        else:  # still open, and busy: a second request at once. The engine keeps its connections.
            self._closes_unsaid.discard(key)

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        """aiohttp gives a connection back to the pool (its response's body was read to the end), or
        closes it (``should_close``: the gateway dropped the response, or the response said close)."""
        if not key.is_ssl and not self._closed:
            address = (key.host, key.port)
            if should_close or protocol.should_close or self._force_close:
                # Closed by this side: nothing to learn about the engine from this connection.
                given_back = self._given_back.get(address)
                if given_back is not None and given_back[0]() is protocol:
                    del self._given_back[address]
            else:
                if protocol in self._served:  # its second response: this engine keeps connections
                    self._closes_unsaid.discard(address)
                self._served.add(protocol)
                self._given_back[address] = (weakref.ref(protocol), time.monotonic())
        super()._release(key, protocol, should_close=should_close)

    def response_done(self, host: str, port: int, engine_says_close: bool) -> None:
        """A response from ``host:port`` is over (``engine_says_close``: its head said it ends the
        connection)."""
        if engine_says_close or (host, port) in self._closes_unsaid:
            self.want_spare(host, port)

    def want_spare(self, host: str, port: int) -> None:
        """A response from ``host:port`` ended with its connection closed: open the next one now."""
        key = (host, port)
        addr_infos = self._addr_infos.get(key)
        if addr_infos is not None and key not in self._making and key not in self._spares and not self.closed:
            self._making[key] = self._loop.create_task(self._open_spare(key, addr_infos))

    async def _open_spare(self, key: tuple[str, int], addr_infos: Any) -> None:
        try:
            async with asyncio.timeout(SPARE_CONNECT_S):
                sock = await aiohappyeyeballs.start_connection(addr_infos=addr_infos, loop=self._loop)
        except (OSError, TimeoutError):
            return  # the engine is not there (now): the next request connects as usual
        finally:
            self._making.pop(key, None)
        if self.closed or key in self._spares:
            sock.close()
            return
        self._spares[key] = (sock, time.monotonic())
        self._expiries[key] = self._loop.call_later(SPARE_MAX_AGE_S, self._expire, key, sock)

    def _expire(self, key: tuple[str, int], sock: socket.socket) -> None:
        held = self._spares.get(key)
        if held is not None and held[0] is sock:
            del self._spares[key]
            sock.close()

    def _close(self, *args: Any, **kwargs: Any) -> Any:
        for task in self._making.values():
            task.cancel()
        self._making.clear()
        for timer in self._expiries.values():
            timer.cancel()
        self._expiries.clear()
        for sock, _ in self._spares.values():
            sock.close()
        self._spares.clear()
        self._given_back.clear()
        return super()._close(*args, **kwargs)


class UpstreamClient:
    """A pool of keep-alive connections to the engines, for forwarded requests only."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int,
                 pool_timeout_s: float | None) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=pool_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UpstreamClient:
        # Made on the loop that serves the gateway: an aiohttp session belongs to one loop.
        self._session = aiohttp.ClientSession(
            connector=SpareConnector(limit=self._max_connections, limit_per_host=0, keepalive_timeout=30.0,
                                     use_dns_cache=True),
            timeout=self._timeout,
            auto_decompress=False,  # the meter reads the engine's own bytes; they pass as they are
            trust_env=False,
            # The engine gets the client's headers as sent, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request; returns once the response head is in (the body is not read yet)."""
        assert self._session is not None, "UpstreamClient used outside its 'async with'"
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers)
        try:
            response = await self._session.request(
                request.method,
                # encoded=True: the path goes out exactly as the gateway checked it (yarl would
                # otherwise normalise it).
                URL(request.url, encoded=True),
                headers=headers,
                data=request.content,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _mapped(exc, request.url) from exc
        url = response.url
        return UpstreamResponse(response, request.url,
                                lambda says_close: self._done(url.host, url.port, says_close))

    def _done(self, host: str | None, port: int | None, engine_says_close: bool) -> None:
        connector = self._session.connector if self._session is not None else None
        if host is not None and port is not None and isinstance(connector, SpareConnector):
            connector.response_done(host, port, engine_says_close)
