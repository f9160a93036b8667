"""The one channel between the daemon and its gateway process: framed messages on a socket pair.

Room: gateway.

Each message is a tuple whose first item names it, sent as a 4-byte length and a pickle. Both ends
are this program, started by the same user from one inherited socket pair, so pickle is safe here:
nothing else can write to it. A send never waits: messages queue in the transport. Messages that a
newer one replaces (snapshots, stats) are dropped while the other side is not reading, so a wedged
peer cannot make its partner's memory grow; the rest are always sent.

A ``lazy`` message (a note nobody waits for) is held up to ``LAZY_S`` and goes out with the next
message or on its own then, never out of order: on the gateway's hot path the daemon is then woken
once after the request's first bytes, not once per note while they are on their way.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

__all__ = ["Channel", "open_channel"]

_HEADER = struct.Struct("!I")
MAX_MESSAGE_BYTES = 64 * 2**20
# Past this much unsent data, messages a newer one replaces are dropped.
BACKLOG_BYTES = 4 * 2**20
# A lazy message waits at most this long for company.
LAZY_S = 0.02


class ChannelClosed(Exception):
    """The other end is gone (end of stream, or a broken frame)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._held: list[bytes] = []  # lazy frames not written yet
        self._flush_at: asyncio.TimerHandle | None = None

    async def receive(self) -> tuple[Any, ...]:
        """The next message; ChannelClosed once the other end has gone."""
        try:
            head = await self.reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(head)
            if size > MAX_MESSAGE_BYTES:
                raise ChannelClosed(f"a message of {size} bytes (at most {MAX_MESSAGE_BYTES})")
            data = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed(str(exc) or type(exc).__name__) from exc
        try:
            message = pickle.loads(data)
        except Exception as exc:  # a frame this end cannot read (another version of the program?)
            raise ChannelClosed(f"an unreadable message: {type(exc).__name__}: {exc}") from exc
        if not isinstance(message, tuple) or not message:
            raise ChannelClosed(f"not a message: {type(message).__name__}")
        return message

    def send(self, *message: Any, replaceable: bool = False, lazy: bool = False) -> bool:
        """Queue a message; False when the channel is closed (or, for a ``replaceable`` one, backed up).
        A ``lazy`` one may wait up to ``LAZY_S`` (see above)."""
        transport = self.writer.transport
        if transport.is_closing():
            return False
        if replaceable and transport.get_write_buffer_size() > BACKLOG_BYTES:
            return False
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an object that cannot cross (a bug): not sent, the channel stays usable
            return False
        frame = _HEADER.pack(len(data)) + data
        if lazy:
            self._held.append(frame)
            if self._flush_at is None:
                self._flush_at = asyncio.get_running_loop().call_later(LAZY_S, self.flush)
            return True
        if self._held:
            self._held.append(frame)
            self.flush()
        else:
            self.writer.write(frame)
        return True

    def flush(self) -> None:
        """Write the lazy messages held back."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._held:
            held, self._held = self._held, []
            if not self.writer.transport.is_closing():
                self.writer.write(b"".join(held))

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.writer.close()


async def open_channel(sock: socket.socket) -> Channel:
    """A channel on one end of a connected socket pair (the socket is the channel's from now on)."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE_BYTES)
    return Channel(reader, writer)
