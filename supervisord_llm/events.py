"""Events: one JSON object per line in ``<state_dir>/events.jsonl`` (durable), and live subscribers.

Each event is ``{"seq", "at" (wall, ISO 8601 UTC), "kind" (dotted noun), "engine"?, ...fields}``.
A full disk or an unwritable file never stops the daemon: the event is still logged and published,
the write failure is counted and reported once per episode (``events.write_failed``), and writing
resumes by itself when the file can be written again.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from supervisord_llm.clock import Clock


def iso_utc(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    def __init__(self, path: Path, clock: Clock, logger: Any, *, max_bytes: int = 50 * 10**6,
                 recent: int = 1000) -> None:
        self.path = Path(path)
        self.clock = clock
        self.log = logger
        self.max_bytes = max_bytes
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.write_failures = 0
        self._failing = False
        self._subscribers: set[MemoryObjectSendStream[dict[str, Any]]] = set()
        self._seq = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._load_recent()

    def _load_recent(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256 * 1024))
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines[-self.recent.maxlen:] if self.recent.maxlen else []:
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                self.recent.append(event)
                self._seq = max(self._seq, int(event.get("seq", 0) or 0))

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        event = _clean({"seq": self._seq, "at": iso_utc(self.clock.wall()), "kind": kind, **fields})
        self.recent.append(event)
        self._write(event)
        self.log.info(kind, **{k: v for k, v in event.items() if k not in ("kind", "at", "seq")})
        for listener in list(self.listeners):
            listener(event)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                pass  # a slow follower misses events rather than slowing the daemon
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(stream)
        return event

    def _write(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        try:
            self._rotate_if_needed()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(28, "short write (disk full?)")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_failures += 1
            if not self._failing:
                self._failing = True
                self.log.error("events.write_failed", path=str(self.path), error=str(exc))
            return
        if self._failing:
            self._failing = False
            self.log.warning("events.write_recovered", path=str(self.path), lost_lines=self.write_failures)

    def _rotate_if_needed(self) -> None:
        try:
            if self.path.stat().st_size > self.max_bytes:
                os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        except FileNotFoundError:
            pass

    def subscribe(self) -> Any:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1000)
        self._subscribers.add(send)
        return receive

    def unsubscribe(self, stream: Any) -> None:
        for send in list(self._subscribers):
            if send._state is getattr(stream, "_state", None):
                self._subscribers.discard(send)
                send.close()
