"""Events: one JSON object per line in ``<state_dir>/events.jsonl`` (durable), and live subscribers.

Room: events.

Each event is ``{"seq", "at" (wall, ISO 8601 UTC), "kind" (dotted noun), "engine"?, ...fields}``.

:meth:`EventLog.emit` is synchronous for its callers and never waits for the disk: the event goes
to the in-memory ring (``recent``), to listeners and to live subscribers (``llmctl events -f``)
first, then into a queue that one writer thread drains in order, appending what it took in one
write and one fsync. So a crash reaches a follower without waiting for an fsync, and the file
keeps the order in which events were emitted.

A full disk or an unwritable file never stops the daemon and, within limits, loses nothing: the
events that could not be written stay queued (at most ``max_backlog``, 10,000 by default) and are
written, in order, as soon as the file can be written again (the writer retries every
``retry_s``). Only a backlog overflow (the oldest queued events are dropped and counted in
``overflowed``) or the daemon dying during the outage loses events. Both the outage and the
recovery are reported once per episode on the daemon's log (``events.write_failed``,
``events.write_recovered`` with the number of events written late and lost).

:meth:`EventLog.emit` is the one path of every event: the ring, the listeners (the ``sd_notify``
status line, the gateway telemetry), the live subscribers (``llmctl events -f``, the status page),
the jsonl writer and structlog all get it from there, in that order. The daemon's log is given the
registry of event types (``supervisord_llm.eventtypes``): an event of a kind that is not registered,
or with a field its type does not name, raises in tests (``strict_kinds``, or
``SUPERVISORD_LLM_STRICT_EVENTS=1`` for a daemon the tests run as a process) and is written anyway,
and reported once per kind as ``events.unregistered``, in production.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisord_llm.clock import Clock
from supervisord_llm.eventtypes import EventType

DEFAULT_MAX_BACKLOG = 10_000
DEFAULT_RETRY_S = 1.0


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


class UnregisteredEvent(ValueError):
    """An event whose kind (or one of whose fields) is not in the registry of event types."""


class EventLog:
    # Tests set this: an unregistered event raises instead of being reported on the daemon's log.
    strict_kinds = False

    def __init__(self, path: Path, clock: Clock, logger: Any, *, max_bytes: int = 50 * 10**6,
                 recent: int = 1000, max_backlog: int = DEFAULT_MAX_BACKLOG,
                 retry_s: float = DEFAULT_RETRY_S, registry: Mapping[str, EventType] | None = None) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be at least 1 event, got {max_backlog}")
        if retry_s <= 0:
            raise ValueError(f"retry_s must be a positive number of seconds, got {retry_s}")
        self.path = Path(path)
        self.clock = clock
        self.log = logger
        self.max_bytes = max_bytes
        self.max_backlog = max_backlog
        self.retry_s = retry_s
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.write_failures = 0  # failed write attempts (each covers a batch of events)
        self.overflowed = 0  # events dropped from a full backlog, never written
        self.written = 0  # events appended to the file by this log
        self._failing = False
        # receive end -> send end: unsubscribing closes both, so neither is left for the collector
        self._subscribers: dict[MemoryObjectReceiveStream[dict[str, Any]], MemoryObjectSendStream[dict[str, Any]]] = {}
        self._seq = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.registry = registry  # None: any kind (a log that is not the daemon's)
        self._reported_kinds: set[str] = set()
        # The writer's queue: (seq, line) in emit order. Guarded by _cond.
        self._pending: deque[tuple[int, bytes]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # the writer holds a batch it has not finished with
        self._overflow_seqs: list[int] = []  # first and last seq lost in the current outage
        self._thread: threading.Thread | None = None
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

    # ---- emitting (event loop) ---------------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record one event (``kind`` an ``EventKind`` or its value) and hand it to every reader."""
        kind = str(kind)
        if self.registry is not None:
            self._check(kind, fields)
        self._seq += 1
        event = _clean({"seq": self._seq, "at": iso_utc(self.clock.wall()), "kind": kind, **fields})
        self.recent.append(event)
        for listener in list(self.listeners):
            listener(event)
        for receive, send in list(self._subscribers.items()):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                pass  # a slow follower misses events rather than slowing the daemon
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.unsubscribe(receive)
        self._enqueue(event)
        self.log.info(kind, **{k: v for k, v in event.items() if k not in ("kind", "at", "seq")})
        return event

    def _check(self, kind: str, fields: Mapping[str, Any]) -> None:
        assert self.registry is not None
        event_type = self.registry.get(kind)
        problem = (f"unknown event kind {kind!r}; register it in supervisord_llm/eventtypes.py (EventKind)"
                   if event_type is None else event_type.problem(fields))
        if problem is None:
            return
        if self.strict_kinds or os.environ.get("SUPERVISORD_LLM_STRICT_EVENTS") == "1":
            raise UnregisteredEvent(problem)
        if kind not in self._reported_kinds:  # written anyway: a record is never lost to its own schema
            self._reported_kinds.add(kind)
            self.log.warning("events.unregistered", problem=problem)

    def _enqueue(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        with self._cond:
            if len(self._pending) >= self.max_backlog:
                lost_seq, _ = self._pending.popleft()
                self.overflowed += 1
                if not self._overflow_seqs:
                    self._overflow_seqs = [lost_seq, lost_seq]
                    self.log.error("events.backlog_overflow", path=str(self.path), max_backlog=self.max_backlog,
                                   first_lost_seq=lost_seq)
                else:
                    self._overflow_seqs[1] = lost_seq
            self._pending.append((event["seq"], line))
            closed = self._closing
            if self._thread is None and not closed:
                self._thread = threading.Thread(target=self._writer, name="events-writer", daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._cond.notify_all()
        if closed:  # after close() (the process is exiting): write it here, once
            self._write_now()

    def _write_now(self) -> None:
        with self._cond:
            batch = list(self._pending)
        if batch and self._append(batch):
            with self._cond:
                last = batch[-1][0]
                while self._pending and self._pending[0][0] <= last:
                    self._pending.popleft()

    # ---- the writer thread ------------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, nothing left
                batch = list(self._pending)
                self._busy = True
            ok = self._append(batch)
            with self._cond:
                self._busy = False
                if ok:
                    # The backlog may have overflowed meanwhile (oldest dropped): drop what was written by seq.
                    last = batch[-1][0]
                    while self._pending and self._pending[0][0] <= last:
                        self._pending.popleft()
                self._cond.notify_all()
                # After a failure, wait out retry_s (new events do not make it retry sooner).
                retry_at = time.monotonic() + self.retry_s
                while not ok and not self._closing and (left := retry_at - time.monotonic()) > 0:
                    self._cond.wait(left)
                if not ok and self._closing:
                    return

    def _append(self, batch: list[tuple[int, bytes]]) -> bool:
        data = b"".join(line for _, line in batch)
        # Nothing but the open comes before the write: each system call hands the GIL back and
        # waits to get it again from a busy event loop, and the batch is visible once written.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                sent = 0
                try:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        if written <= 0:
                            raise OSError(28, "short write (disk full?)")
                        sent += written
                        view = view[written:]
                    os.fsync(fd)
                    size_bytes = os.fstat(fd).st_size
                except OSError:
                    # The whole batch is written again later: cut a partial one off, so no line is
                    # half-written or written twice.
                    if sent:
                        try:
                            os.ftruncate(fd, os.fstat(fd).st_size - sent)
                        except OSError:
                            pass
                    raise
            finally:
                os.close(fd)
            if size_bytes > self.max_bytes:
                self._rotate()
        except OSError as exc:
            self.write_failures += 1
            if not self._failing:
                self._failing = True
                self.log.error("events.write_failed", path=str(self.path), error=str(exc),
                               queued=len(batch), max_backlog=self.max_backlog)
            return False
        self.written += len(batch)
        if self._failing:
            self._failing = False
            with self._cond:
                lost = list(self._overflow_seqs)
                self._overflow_seqs = []
            self.log.warning("events.write_recovered", path=str(self.path), written_late=len(batch),
                             lost=(lost[1] - lost[0] + 1) if lost else 0,
                             lost_seqs=f"{lost[0]}..{lost[1]}" if lost else None,
                             overflowed_total=self.overflowed)
        return True

    def _rotate(self) -> None:
        """The file grew past max_bytes: it becomes ``events.jsonl.1`` (the one before is dropped)."""
        try:
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        except OSError as exc:  # the batch is written; the next one tries again
            self.log.warning("events.rotate_failed", path=str(self.path), error=str(exc))

    # ---- flushing and closing ---------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Events emitted but not yet in the file."""
        with self._cond:
            return len(self._pending)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (blocking; not on the event loop) until every event emitted so far is in the file.

        False when that did not happen within ``timeout_s`` (e.g. the file is unwritable).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return not self._pending
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Write what is queued (bounded by ``timeout_s``; while the file cannot be written, by one
        more retry) and stop the writer thread. Events emitted afterwards are written at once."""
        if self._failing:
            timeout_s = min(timeout_s, self.retry_s + 0.5)
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)
        _LIVE.discard(self)
        if not flushed and self._pending:
            self.log.error("events.unwritten_at_exit", path=str(self.path), events=len(self._pending),
                           first_seq=self._pending[0][0], last_seq=self._pending[-1][0])
        return flushed

    # ---- subscribers ------------------------------------------------------------------------

    def subscribe(self) -> MemoryObjectReceiveStream[dict[str, Any]]:
        """A live feed of every event emitted from now on; give it back with :meth:`unsubscribe`."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1000)
        self._subscribers[receive] = send
        return receive

    def unsubscribe(self, receive: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        send = self._subscribers.pop(receive, None)
        if send is not None:
            send.close()
        receive.close()


_LIVE: weakref.WeakSet[EventLog] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A daemon exiting normally writes what it emitted last (its writer threads are daemon threads)."""
    for log in list(_LIVE):
        log.close(timeout_s=5.0)
