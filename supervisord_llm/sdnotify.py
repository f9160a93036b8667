"""A tiny sd_notify client: tell systemd the daemon is ready, what it is doing, and that it lives.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket) to a
``Type=notify`` service, and ``WATCHDOG_USEC`` (with ``WATCHDOG_PID``) when ``WatchdogSec=`` is
set. Messages are newline-separated ``KEY=value`` lines in one datagram. Without
``NOTIFY_SOCKET`` (launchd, a terminal, a container) every call is a quiet no-op.

The watchdog ping is sent only while the daemon's own loop is healthy
(:func:`watchdog_loop`): a wedged daemon stops pinging and systemd restarts it, which is the
point of ``WatchdogSec=``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

import anyio

# A send must never stall the event loop: the datagram is sent without blocking, and a full
# receive queue (systemd busy) drops this one message; the next ping comes an interval later.
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0)
_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages to ``address``; a Notifier without an address does nothing."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None, logger: Any = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._log = logger
        self._socket: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True,
                 logger: Any = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ`` (default os.environ).

        With ``unset_environment`` (the default) the three variables are removed afterwards, so
        engines the daemon spawns do not inherit them and talk to systemd in its name.
        A ``WATCHDOG_PID`` naming another process means the watchdog is not ours: disabled.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            address = None  # systemd only ever passes a path or an abstract name; ignore anything else
        watchdog_usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            watchdog_usec = usec if usec > 0 else None
        except ValueError:
            watchdog_usec = None
        pid_text = env.get("WATCHDOG_PID")
        if watchdog_usec is not None and pid_text:
            try:
                if int(pid_text) != os.getpid():
                    watchdog_usec = None
            except ValueError:
                watchdog_usec = None
        if unset_environment:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return cls(address, watchdog_usec, logger)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises; None when off."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1_000_000 / 2

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="…")``); True when the datagram went out."""
        if self.address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify field {key}: the value must be one line, got {text!r}")
            lines.append(f"{key}={text}")
        message = "\n".join(lines).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # non-inheritable by default
            self._socket.sendto(message, _SEND_FLAGS, target)
            return True
        except OSError as exc:
            if self._log is not None:
                # ENOENT/ECONNREFUSED: nobody listens (systemd gone); EAGAIN: its queue is full.
                self._log.warning("sdnotify.failed", error=errno.errorcode.get(exc.errno or 0, str(exc)),
                                  fields=sorted(fields))
            return False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the daemon is up (its control API answers); engines may still be loading."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires (long engine stops)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def watchdog_loop(notifier: Notifier, is_healthy: Callable[[], bool], *,
                        interval_s: float | None = None) -> None:
    """Ping ``WATCHDOG=1`` every interval while ``is_healthy()``; return at once when no watchdog is set.

    ``is_healthy`` should say whether the daemon's own loop made progress recently (a
    supervisor tick within a bound), not whether the engines are fine: an unhealthy engine is
    the daemon's job, a stuck daemon is systemd's.
    """
    interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s
    if interval_s is None or not notifier.enabled:
        return
    while True:
        if is_healthy():
            notifier.watchdog()
        await anyio.sleep(interval_s)
