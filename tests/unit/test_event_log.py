"""The event log on a real file: delivery before the disk, order, and no loss through a file outage."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord_llm.clock import SystemClock
from supervisord_llm.events import EventLog
from tests.recording import RecordingLogger


def on_disk(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def log_and_path(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    logger = RecordingLogger()
    events = EventLog(path, SystemClock(), logger, retry_s=0.05)
    yield events, path, logger
    events.close(timeout_s=2.0)


def test_every_event_reaches_the_file_in_emit_order(log_and_path) -> None:
    """500 events emitted back to back are all in events.jsonl, in order, each once."""
    events, path, _ = log_and_path
    for i in range(500):
        events.emit("test.burst", i=i)
    assert events.flush(timeout_s=10)
    seqs = [e["seq"] for e in on_disk(path)]
    assert seqs == list(range(1, 501))
    assert [e["i"] for e in on_disk(path)] == list(range(500))


def test_listeners_get_an_event_before_it_is_written(log_and_path) -> None:
    """Listeners see an event before the durable write begins (delivery never waits for an fsync)."""
    events, path, _ = log_and_path
    seen_on_disk: list[bool] = []
    events.listeners.append(lambda e: seen_on_disk.append(path.exists() and f'"seq":{e["seq"]},' in path.read_text()))
    for i in range(20):
        events.emit("test.order", i=i)
    assert events.flush(timeout_s=10)
    assert seen_on_disk == [False] * 20
    assert len(on_disk(path)) == 20


@pytest.mark.anyio
async def test_an_unwritable_file_loses_no_event_once_restored(log_and_path) -> None:
    """events.jsonl replaced by a directory: subscribers still get events; once restored, all are on disk in order."""
    events, path, logger = log_and_path
    receive = events.subscribe()
    events.emit("test.before")
    assert events.flush(timeout_s=10)
    path.unlink()
    path.mkdir()
    for i in range(30):
        events.emit("test.during", i=i)
    live = [receive.receive_nowait() for _ in range(31)]
    assert [e["kind"] for e in live] == ["test.before"] + ["test.during"] * 30
    await anyio.sleep(0.3)  # several retries fail meanwhile
    assert events.backlog == 30
    assert len(logger.named("events.write_failed")) == 1  # reported once per outage, not per retry
    path.rmdir()
    events.emit("test.after")
    assert await anyio.to_thread.run_sync(events.flush, 10.0)
    kinds = [e["kind"] for e in on_disk(path)]  # the directory took the old file's place: it starts anew
    assert kinds == ["test.during"] * 30 + ["test.after"]
    assert [e["seq"] for e in on_disk(path)] == list(range(2, 33))
    recovered = logger.named("events.write_recovered")
    # The writer may retry between rmdir and the next emit: the outage's 30 events are written late either
    # way, "test.after" only when it was queued before that retry.
    assert len(recovered) == 1 and recovered[0]["written_late"] in (30, 31) and recovered[0]["lost"] == 0
    assert events.overflowed == 0
    events.unsubscribe(receive)


def test_a_backlog_overflow_drops_the_oldest_and_says_how_many(tmp_path: Path) -> None:
    """Past max_backlog during an outage the oldest queued events are dropped, counted and reported."""
    path = tmp_path / "events.jsonl"
    logger = RecordingLogger()
    events = EventLog(path, SystemClock(), logger, max_backlog=5, retry_s=0.05)
    try:
        path.mkdir()
        for i in range(8):
            events.emit("test.outage", i=i)
        time.sleep(0.2)
        assert events.overflowed == 3 and events.backlog == 5
        assert logger.named("events.backlog_overflow")[0]["first_lost_seq"] == 1
        path.rmdir()
        assert events.flush(timeout_s=10)
        assert [e["i"] for e in on_disk(path)] == [3, 4, 5, 6, 7]
        recovered = logger.named("events.write_recovered")[0]
        assert recovered["lost"] == 3 and recovered["lost_seqs"] == "1..3"
    finally:
        events.close(timeout_s=2.0)


def test_close_writes_what_is_still_queued(tmp_path: Path) -> None:
    """Events emitted just before close() are in the file when it returns (a clean daemon exit loses none)."""
    path = tmp_path / "events.jsonl"
    events = EventLog(path, SystemClock(), RecordingLogger())
    for i in range(100):
        events.emit("test.last", i=i)
    assert events.close(timeout_s=10)
    assert len(on_disk(path)) == 100


def test_a_restarted_log_continues_the_sequence(tmp_path: Path) -> None:
    """A new EventLog on the same file keeps counting seq from the last event written."""
    path = tmp_path / "events.jsonl"
    first = EventLog(path, SystemClock(), RecordingLogger())
    for _ in range(3):
        first.emit("test.one")
    first.close()
    second = EventLog(path, SystemClock(), RecordingLogger())
    assert second.emit("test.two")["seq"] == 4
    second.close()
    assert [e["seq"] for e in on_disk(path)] == [1, 2, 3, 4]


@pytest.mark.parametrize(("kwargs", "named"), [({"max_backlog": 0}, "max_backlog"), ({"retry_s": 0}, "retry_s")])
def test_bad_settings_are_refused_by_name(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    """A backlog below one event or a non-positive retry time is refused, naming the setting."""
    with pytest.raises(ValueError, match=named):
        EventLog(tmp_path / "events.jsonl", SystemClock(), RecordingLogger(), **kwargs)


def test_a_full_file_is_rotated_and_no_event_is_lost_across_the_two(tmp_path: Path) -> None:
    """Past max_bytes the file becomes events.jsonl.1; the previous and the current file hold every event once."""
    path = tmp_path / "events.jsonl"
    events = EventLog(path, SystemClock(), RecordingLogger(), max_bytes=2000)
    try:
        for i in range(30):
            events.emit("test.rotate", i=i, padding="x" * 40)
            assert events.flush(timeout_s=10)  # one batch per event, so the cap is checked after each
    finally:
        events.close()
    rotated = on_disk(tmp_path / "events.jsonl.1")
    current = on_disk(path)
    assert rotated and current
    seqs = [e["seq"] for e in rotated + current]
    assert seqs == list(range(seqs[0], 31)) and path.stat().st_size <= 2000 + 200


def test_close_during_an_outage_returns_promptly_and_names_what_is_unwritten(tmp_path: Path) -> None:
    """Closing while the file is unwritable takes about one retry, not the whole timeout, and logs what stays unwritten."""
    path = tmp_path / "events.jsonl"
    logger = RecordingLogger()
    events = EventLog(path, SystemClock(), logger, retry_s=0.2)
    path.mkdir()
    events.emit("test.unwritten")
    time.sleep(0.1)
    started = time.monotonic()
    assert events.close(timeout_s=30) is False
    assert time.monotonic() - started < 5
    assert logger.named("events.unwritten_at_exit")[0]["events"] == 1
    path.rmdir()
    events.emit("test.after_close")  # written at once, with the one still queued
    assert [e["kind"] for e in on_disk(path)] == ["test.unwritten", "test.after_close"]
