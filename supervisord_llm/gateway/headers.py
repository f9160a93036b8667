"""A header read timeout for the gateway's HTTP server.

uvicorn bounds the idle time between two requests on a kept-alive connection
(``timeout_keep_alive``) but not the time a client takes to send a request's headers: one that opens
a connection and trickles a header byte every few seconds (slowloris) holds a file descriptor and a
parser for as long as it likes, and a few hundred such clients exhaust the daemon's descriptors
(launchd's default soft limit is 256), and with them the control socket and the probes. The
request body has its own deadline in the app (``body_timeout_s``); the headers never reach the app,
so their deadline lives at the protocol level, here.

The guard wraps whichever HTTP protocol class uvicorn would pick (h11, or httptools when it is
installed): both create their ``cycle`` once a request's headers are complete and call
``on_response_complete`` when a response has been sent, which is all it relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

# Enough of a request to read its request line (method and path) for the refusal's API shape.
_SNIFF_BYTES = 1024


def header_timeout_protocol(
    base: type[asyncio.Protocol], *, header_timeout_s: float, on_timeout: Callable[[bytes], bytes | None],
    on_bad_request: Callable[[bytes, str], bytes] | None = None,
) -> type[asyncio.Protocol]:
    """``base`` with a deadline of ``header_timeout_s`` for each request's headers.

    The deadline starts when the connection opens and again when a response has been sent (the next
    request on a kept-alive connection). When it passes, ``on_timeout(first_bytes)`` is called with
    what the client sent of the request so far (empty when nothing): it returns the bytes of a
    response to write before the connection is closed (a 408), or None to close it silently.

    ``on_bad_request(first_bytes, message)``, when given, writes the answer to bytes the HTTP parser
    refuses (a broken request line, a ``Content-Length`` that is no number, a broken chunked body) in
    place of the server's plain-text 400: the response, written before the connection is closed.
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type,misc]
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes: bytes = b""
        _served = False  # answered a request: idle from now on is a kept-alive connection, not a slow one

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is not None and len(self._header_bytes) < _SNIFF_BYTES:
                self._header_bytes += data[: _SNIFF_BYTES - len(self._header_bytes)]
            super().data_received(data)
            if self._header_timer is not None and self._headers_complete():
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            self._served = True
            super().on_response_complete()
            # A pipelined request may already have been parsed by the call above.
            if not self.transport.is_closing() and not self._headers_complete():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            if on_bad_request is None:
                super().send_400_response(msg)
                return
            self._cancel_header_timer()
            self.transport.write(on_bad_request(self._header_bytes, msg))
            self.transport.close()

        def _headers_complete(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_bytes = b""
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._headers_complete() or self.transport.is_closing():
                return
            if self._served and not self._header_bytes:
                self.transport.close()  # a kept-alive connection that went idle: closed, nothing refused
                return
            answer = on_timeout(self._header_bytes)
            if answer:
                self.transport.write(answer)
            self.transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    HeaderTimeoutProtocol.__qualname__ = HeaderTimeoutProtocol.__name__
    return HeaderTimeoutProtocol
