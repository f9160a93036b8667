"""One typed event bus: every event the daemon emits is a registered kind with registered fields."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from supervisord_llm.clock import SystemClock
from supervisord_llm.events import EventLog, UnregisteredEvent
from supervisord_llm.eventtypes import EVENT_TYPES, EventKind
from tests.recording import RecordingLogger

RUNTIME = Path(__file__).resolve().parents[2] / "supervisord_llm"
# Where a kind arrives as a value: the alert outbox's delivery events, forwarded to the daemon's log.
FORWARDERS = {("extensions.py", "kind"), ("alerts/delivery.py", "kind")}




def emit_calls() -> list[tuple[str, int, ast.Call]]:
    """Every ``<...>events.emit(...)`` and outbox ``_emit(...)`` call in the runtime."""
    calls = []
    for path in sorted(RUNTIME.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            receiver = ast.unparse(node.func.value)
            where = str(path.relative_to(RUNTIME))
            if (node.func.attr == "emit" and receiver.endswith("events")) or (
                    node.func.attr == "_emit" and where == "alerts/delivery.py"):
                calls.append((where, node.lineno, node))
    return calls


def test_every_emitted_kind_is_registered_with_its_fields() -> None:
    """Each event name in the source is an EventKind, and each field it is given is one its type names."""
    calls = emit_calls()
    assert len(calls) > 50, "the walk found the daemon's emit calls"
    problems = []
    for where, line, call in calls:
        kind = call.args[0]
        if not (isinstance(kind, ast.Constant) and isinstance(kind.value, str)):
            if (where, ast.unparse(kind)) not in FORWARDERS:
                problems.append(f"{where}:{line}: kind {ast.unparse(kind)} is not a literal registered name")
            continue
        event_type = EVENT_TYPES.get(kind.value)
        if event_type is None:
            problems.append(f"{where}:{line}: {kind.value!r} is not an EventKind")
            continue
        named = {kw.arg: None for kw in call.keywords if kw.arg is not None}
        if any(kw.arg is None for kw in call.keywords) and not event_type.open_:
            problems.append(f"{where}:{line}: {kind.value!r} is given fields by ** but its type is not open")
        if (problem := event_type.problem(named)) is not None:
            problems.append(f"{where}:{line}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_alert_outbox_forwards_only_registered_kinds() -> None:
    """The delivery events the alert outbox hands the daemon (delivered, retrying, dropped) are registered."""
    source = ast.parse((RUNTIME / "alerts" / "delivery.py").read_text())
    kinds = {
        node.value.elts[0].value
        for node in ast.walk(source)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts
        and isinstance(node.value.elts[0], ast.Constant) and str(node.value.elts[0].value).startswith("alert.")
    }
    assert kinds == {"alert.delivered", "alert.retrying", "alert.dropped"}
    assert kinds <= set(EVENT_TYPES)


def test_event_kinds_keep_their_jsonl_names() -> None:
    """The enum's values are the names users and tools parse (the jsonl format is unchanged)."""
    assert EventKind.ENGINE_STATE_CHANGED == "engine.state_changed"
    assert EventKind.POLICY_DECIDED.value == "policy.decided"
    assert all(kind.name == kind.value.upper().replace(".", "_") for kind in EventKind)


def test_an_unregistered_kind_fails_loudly_in_tests(tmp_path: Path) -> None:
    """With the registry, an unknown kind or an unknown field raises (tests run strict) and nothing is written."""
    log = EventLog(tmp_path / "events.jsonl", SystemClock(), RecordingLogger(), registry=EVENT_TYPES)
    try:
        with pytest.raises(UnregisteredEvent, match="unknown event kind 'engine.exploded'"):
            log.emit("engine.exploded", engine="e")
        with pytest.raises(UnregisteredEvent, match="has no field 'colour'"):
            log.emit(EventKind.REBOOT_CANCELLED, reason="a person", colour="red")
        event = log.emit(EventKind.REBOOT_CANCELLED, reason="a person")
        assert event["kind"] == "reboot.cancelled" and isinstance(event["kind"], str)
        log.flush()
        lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert [e["kind"] for e in lines] == ["reboot.cancelled"]
    finally:
        log.close()


def test_in_production_an_unregistered_event_is_written_and_reported_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside tests an unknown kind is still written (nothing is lost) and named once on the daemon's log."""
    monkeypatch.setattr(EventLog, "strict_kinds", False)
    monkeypatch.delenv("SUPERVISORD_LLM_STRICT_EVENTS", raising=False)
    logger = RecordingLogger()
    log = EventLog(tmp_path / "events.jsonl", SystemClock(), logger, registry=EVENT_TYPES)
    try:
        log.emit("engine.exploded", engine="e")
        log.emit("engine.exploded", engine="f")
        log.flush()
        lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
        assert [e["engine"] for e in lines] == ["e", "f"]
        reported = [r for r in logger.records if r[1] == "events.unregistered"]
        assert len(reported) == 1 and "engine.exploded" in reported[0][2]["problem"]
    finally:
        log.close()
