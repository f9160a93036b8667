"""Durable state writes off the event loop.

``state.json`` is rewritten at every state change (temp file, fsync, rename, directory fsync). An
fsync can take tens of milliseconds, and seconds on a busy or failing disk; on the event loop that
stalls every probe, stream and control request. So the loop only serialises the state (cheap) and
hands the text to one writer thread, which writes the newest version: versions superseded while a
write was in progress are skipped, since each is a complete snapshot.

Durability where an order depends on it: ``wait_written(version)`` returns once that version (or a
newer one) is on disk. The daemon waits for it before forking an engine (the spawn time must
survive a daemon killed right after the fork), before running a reboot command (the ledger must
survive the reboot) and before releasing its lock at exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from supervisord_llm.statefile import write_text_atomic


class StateWriter:
    """One thread that writes the newest submitted snapshot of a file atomically."""

    def __init__(self, path: Path, on_result: Callable[[OSError | None], None]) -> None:
        self.path = path
        self._on_result = on_result  # called in the writer thread after every write attempt
        self._cond = threading.Condition()
        self._text: str | None = None
        self._submitted = 0
        self._written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._thread.start()

    def submit(self, text: str) -> int:
        """Queue ``text`` as the file's next content; returns its version for ``wait_written``."""
        with self._cond:
            self._submitted += 1
            self._text = text
            self._cond.notify_all()
            return self._submitted

    def wait_written(self, version: int, timeout_s: float | None = None) -> bool:
        """Block until ``version`` (or newer) was written or failed; False on timeout. Not on the loop."""
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= version or not self._thread.is_alive(), timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is pending, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._text is not None or self._closed)
                if self._text is None:
                    return  # closed with nothing pending
                text, version, self._text = self._text, self._submitted, None
            error: OSError | None = None
            try:
                write_text_atomic(self.path, text)
            except OSError as exc:
                error = exc
            try:
                self._on_result(error)
            finally:
                with self._cond:
                    # A failed write counts as done: the next state change retries with newer state.
                    self._written = version
                    self._cond.notify_all()


__all__ = ["StateWriter"]
