"""The forwarding client: one proxied request to an engine, its response head and body as they come.

Room: gateway.

This is the gateway's per-token hot path. httpx reads a response body through httpcore, h11's
pure-Python chunked decoder, an anyio stream with a timeout scope per read and four generator
layers: about half of the gateway's CPU per streamed token (bench/gateway_microbench.py). aiohttp's
client parses the head and the chunked body in C (llhttp) and pools keep-alive connections, so each
chunk the engine sends costs one buffer hand-over here. httpx stays for the gateway's other calls.

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

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

__all__ = ["UpstreamClient", "UpstreamRequest", "UpstreamResponse"]

# Read this much of a body at most per chunk handed on: whatever has arrived, up to this.
_READ_BYTES = 2**16


@dataclass(frozen=True)
class UpstreamRequest:
    """One request as it goes to the engine (the path was checked by the gateway before)."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes


def _mapped(exc: BaseException, url: str) -> httpx.HTTPError:
    request = httpx.Request("POST", url)
    message = f"{type(exc).__name__}: {exc}"
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

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url
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
        if response.content.at_eof():
            response.release()
        else:
            response.close()


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
            connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                           keepalive_timeout=30.0, use_dns_cache=True),
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
        return UpstreamResponse(response, request.url)
