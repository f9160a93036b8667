"""The daemon's event types: every ``kind`` it writes to ``events.jsonl``, with the fields it carries.

Room: events.

Events are the daemon's record for people and tools (``llmctl events``, the status page, alert
rules, tests): their names and fields are an interface. Every kind the daemon emits is an
:class:`EventKind` member here, with the fields it carries besides ``seq``, ``at`` and ``kind``.
An *open* type also carries fields its emitter names at run time (a policy's inputs in
``policy.decided``, an engine's evidence in ``engine.state_changed``).

:class:`supervisord_llm.events.EventLog` checks each event against this registry on the one path
every event takes (the ring, listeners, live subscribers, the jsonl writer, structlog): in tests an
unknown kind or an unregistered field raises, in production it is written anyway and reported once
as ``events.unregistered`` on the daemon's log (an event is never lost). A test walks the source and
checks that every name passed to ``emit`` is registered, with only its registered fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class EventKind(StrEnum):
    """Every event kind the daemon emits (the jsonl ``kind`` field)."""

    ALERT_DELIVERED = "alert.delivered"
    ALERT_DROPPED = "alert.dropped"
    ALERT_RAISED = "alert.raised"
    ALERT_RETRYING = "alert.retrying"
    DAEMON_ORPHANS_FOUND = "daemon.orphans_found"
    DAEMON_ORPHANS_KILLED = "daemon.orphans_killed"
    DAEMON_RESTARTING = "daemon.restarting"
    DAEMON_RESTART_REFUSED = "daemon.restart_refused"
    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPING = "daemon.stopping"
    ENGINE_ADMISSION_WAITING = "engine.admission_waiting"
    ENGINE_DISCOVERED = "engine.discovered"
    ENGINE_DRAINED = "engine.drained"
    ENGINE_DRAINING = "engine.draining"
    ENGINE_EXITED = "engine.exited"
    ENGINE_FOUND_BY_TAG = "engine.found_by_tag"
    ENGINE_IDLE_UNLOAD_FAILED = "engine.idle_unload_failed"
    ENGINE_LEFTOVERS_KILLED = "engine.leftovers_killed"
    ENGINE_SPAWN_OVERTAKEN = "engine.spawn_overtaken"
    ENGINE_SPAWNED = "engine.spawned"
    ENGINE_START_CHECK = "engine.start_check"
    ENGINE_START_FAILED = "engine.start_failed"
    ENGINE_START_REFUSED = "engine.start_refused"
    ENGINE_START_TIMEOUT = "engine.start_timeout"
    ENGINE_STATE_CHANGED = "engine.state_changed"
    ENGINE_STOP_FAILED = "engine.stop_failed"
    ENGINE_STOPPED = "engine.stopped"
    GATEWAY_EXITED = "gateway.exited"
    GATEWAY_STALL_DETECTED = "gateway.stall_detected"
    GATEWAY_SWAP_FAILED = "gateway.swap_failed"
    GPU_DEVICE_BACK = "gpu.device_back"
    GPU_LOST = "gpu.lost"
    GPU_LOST_FAILED = "gpu.lost_failed"
    GPU_MEMORY_NOT_RETURNED = "gpu.memory_not_returned"
    GPU_MEMORY_RELEASED = "gpu.memory_released"
    GPU_ORPHANS_FREED = "gpu.orphans_freed"
    GPU_ORPHANS_RELEASED = "gpu.orphans_released"
    GPU_PROBE_STARTED = "gpu.probe_started"
    GPU_REBOOT_REQUIRED = "gpu.reboot_required"
    GPU_STOP_FAILED = "gpu.stop_failed"
    GPU_XID = "gpu.xid"
    GPU_XID_FAILED = "gpu.xid_failed"
    MEMORY_PEAK_LEARNED = "memory.peak_learned"
    MEMORY_STRANDED_CHANGED = "memory.stranded_changed"
    POLICY_DECIDED = "policy.decided"
    PROBE_CANARY = "probe.canary"
    PROBE_FAILED = "probe.failed"
    PROBE_RECOVERED = "probe.recovered"
    PROBE_UNAVAILABLE = "probe.unavailable"
    REBOOT_ANNOUNCED = "reboot.announced"
    REBOOT_CANCELLED = "reboot.cancelled"
    REBOOT_COMMAND_FAILED = "reboot.command_failed"
    REBOOT_COMMAND_FINISHED = "reboot.command_finished"
    REBOOT_EXECUTING = "reboot.executing"
    REBOOT_VERIFIED = "reboot.verified"
    STATE_CORRUPT = "state.corrupt"
    STATE_IGNORED = "state.ignored"
    SWAP_ABORTED = "swap.aborted"
    SWAP_FINISHED = "swap.finished"
    SWAP_REFUSED = "swap.refused"
    SWAP_RESUMED = "swap.resumed"
    SWAP_ROLLBACK_FAILED = "swap.rollback_failed"
    SWAP_ROLLED_BACK = "swap.rolled_back"
    SWAP_STARTED = "swap.started"


@dataclass(frozen=True, slots=True)
class EventType:
    """One kind of event and the fields it carries (``open_``: also fields named at run time)."""

    kind: EventKind
    fields: frozenset[str]
    open_: bool = False

    def problem(self, fields: Mapping[str, object]) -> str | None:
        """Why ``fields`` do not fit this type, or None."""
        if self.open_:
            return None
        unknown = sorted(set(fields) - self.fields)
        if unknown:
            return (f"event {self.kind.value!r} has no field {unknown[0]!r}; its fields: "
                    f"{', '.join(sorted(self.fields)) or '(none)'}")
        return None


def _type(kind: EventKind, fields: tuple[str, ...], *, open_: bool = False) -> EventType:
    return EventType(kind, frozenset(fields), open_)


EVENT_TYPES: Mapping[str, EventType] = {t.kind.value: t for t in (
    _type(EventKind.ALERT_DELIVERED, ("alert_id", "attempts", "delivery_id", "engine", "episode_id", "http_status", "key", "severity", "status", "target"), open_=True),
    _type(EventKind.ALERT_DROPPED, ("alert_id", "attempts", "delivery_id", "engine", "episode_id", "http_status", "key", "reason", "severity", "status", "target"), open_=True),
    _type(EventKind.ALERT_RAISED, ("details", "key", "resolved", "severity", "summary")),
    _type(EventKind.ALERT_RETRYING, ("alert_id", "attempts", "delivery_id", "engine", "episode_id", "error", "http_status", "key", "retry_in_s", "severity", "status", "target"), open_=True),
    _type(EventKind.DAEMON_ORPHANS_FOUND, ("commands", "pids")),
    _type(EventKind.DAEMON_ORPHANS_KILLED, ("pids",)),
    _type(EventKind.DAEMON_RESTARTING, ("engines", "pid")),
    _type(EventKind.DAEMON_RESTART_REFUSED, ("error", "pid")),
    _type(EventKind.DAEMON_STARTED, ("adopted", "pid", "state_dir", "version")),
    _type(EventKind.DAEMON_STOPPING, ("pid", "stop_engines")),
    _type(EventKind.ENGINE_ADMISSION_WAITING, ("engine", "message", "reason", "wait_s")),
    _type(EventKind.ENGINE_DISCOVERED, ("engine",), open_=True),
    _type(EventKind.ENGINE_DRAINED, ("engine", "in_flight", "waited_s")),
    # The memory guard's drain (grace_s, reason) and a manual restart's (drain_s).
    _type(EventKind.ENGINE_DRAINING, ("drain_s", "engine", "grace_s", "in_flight", "reason")),
    _type(EventKind.ENGINE_EXITED, ("code", "diagnosis", "engine", "pid", "signal", "state_was", "while_daemon_down")),
    _type(EventKind.ENGINE_FOUND_BY_TAG, ("engine", "pid")),
    _type(EventKind.ENGINE_IDLE_UNLOAD_FAILED, ("engine", "error")),
    _type(EventKind.ENGINE_LEFTOVERS_KILLED, ("engine", "pids")),
    _type(EventKind.ENGINE_SPAWN_OVERTAKEN, ("engine", "pid")),
    _type(EventKind.ENGINE_SPAWNED, ("argv", "engine", "pid")),
    _type(EventKind.ENGINE_START_CHECK, ("engine", "pid", "result")),
    _type(EventKind.ENGINE_START_FAILED, ("engine", "error", "error_type")),
    _type(EventKind.ENGINE_START_REFUSED, ("engine", "message", "reason")),
    _type(EventKind.ENGINE_START_TIMEOUT, ("diagnosis", "engine", "error")),
    _type(EventKind.ENGINE_STATE_CHANGED, ("engine", "from", "pid", "reason", "to"), open_=True),
    _type(EventKind.ENGINE_STOP_FAILED, ("engine", "error")),
    _type(EventKind.ENGINE_STOPPED, ("code", "engine", "graceful", "killed_pids", "signal")),
    _type(EventKind.GATEWAY_EXITED, ("exit", "next_start_in_s", "pid", "reason", "restarts")),
    _type(EventKind.GATEWAY_STALL_DETECTED, ("engine", "phase", "stalled_for_s")),
    _type(EventKind.GATEWAY_SWAP_FAILED, ("engine", "error")),
    _type(EventKind.GPU_DEVICE_BACK, ("device_index", "missing_s", "name", "uuid")),
    _type(EventKind.GPU_LOST, ("already_handled", "cause", "device_index", "engines")),
    _type(EventKind.GPU_LOST_FAILED, ("device_index", "error")),
    _type(EventKind.GPU_MEMORY_NOT_RETURNED, ("bytes", "engine", "pids", "waited_s")),
    _type(EventKind.GPU_MEMORY_RELEASED, ("after_exit_s", "bytes", "engine", "pids")),
    _type(EventKind.GPU_ORPHANS_FREED, ("bytes", "engine", "memory_released", "per_pid", "pids", "sigkilled", "tags", "took_s")),
    _type(EventKind.GPU_ORPHANS_RELEASED, ("bytes", "memory_released", "per_pid", "pids", "still_listed", "took_s", "waited_s")),
    _type(EventKind.GPU_PROBE_STARTED, ("devices", "xid_devices")),
    _type(EventKind.GPU_REBOOT_REQUIRED, ("device_index", "reason", "xid")),
    _type(EventKind.GPU_STOP_FAILED, ("engine", "error")),
    _type(EventKind.GPU_XID, ("device_index", "engines", "xid")),
    _type(EventKind.GPU_XID_FAILED, ("device_index", "error", "xid")),
    _type(EventKind.MEMORY_PEAK_LEARNED, ("engine", "peak_bytes")),
    _type(EventKind.MEMORY_STRANDED_CHANGED, ("baseline_wired_bytes", "stranded_bytes", "wired_bytes")),
    _type(EventKind.POLICY_DECIDED, ("decision", "engine", "message", "policy", "reason"), open_=True),
    _type(EventKind.PROBE_CANARY, ("engine", "error", "ok", "stalled", "tokens_per_s", "ttft_s")),
    _type(EventKind.PROBE_FAILED, ("error", "probe")),
    _type(EventKind.PROBE_RECOVERED, ("probe",)),
    _type(EventKind.PROBE_UNAVAILABLE, ("probe", "reason")),
    _type(EventKind.REBOOT_ANNOUNCED, ("argv", "in_s", "reason")),
    _type(EventKind.REBOOT_CANCELLED, ("reason",)),
    _type(EventKind.REBOOT_COMMAND_FAILED, ("error",)),
    _type(EventKind.REBOOT_COMMAND_FINISHED, ("returncode", "stderr")),
    _type(EventKind.REBOOT_EXECUTING, ("argv", "reason")),
    _type(EventKind.REBOOT_VERIFIED, ("memory_back", "rebooted")),
    _type(EventKind.STATE_CORRUPT, ("problem",)),
    _type(EventKind.STATE_IGNORED, ("engine", "problem")),
    _type(EventKind.SWAP_ABORTED, ("reason", "target")),
    _type(EventKind.SWAP_FINISHED, ("stopped", "target", "total_s"), open_=True),
    _type(EventKind.SWAP_REFUSED, ("message", "reason", "target")),
    _type(EventKind.SWAP_RESUMED, ("previous", "target")),
    _type(EventKind.SWAP_ROLLBACK_FAILED, ("engine", "error")),
    _type(EventKind.SWAP_ROLLED_BACK, ("reason", "restored", "target")),
    _type(EventKind.SWAP_STARTED, ("stopping", "target")),
)}


def event_problem(kind: str, fields: Mapping[str, object]) -> str | None:
    """Why an event of ``kind`` with ``fields`` is not a registered one, or None when it is."""
    event_type = EVENT_TYPES.get(kind)
    if event_type is None:
        return f"unknown event kind {kind!r}; register it in supervisord_llm/eventtypes.py (EventKind)"
    return event_type.problem(fields)


__all__ = ["EVENT_TYPES", "EventKind", "EventType", "event_problem"]
