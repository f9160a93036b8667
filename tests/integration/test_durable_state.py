"""state.json is written durably but never on the event loop: an fsync that takes seconds on a busy
disk must not stall probes, streams and the control API. Where an order depends on the state being
on disk (the spawn time before the fork), it still is."""

from __future__ import annotations

import io
import json
import os
import shlex
import threading

import anyio
import pytest
import structlog

from supervisord_llm.config import load_config
from supervisord_llm.daemon import Daemon
from tests.helpers import PYTHON, STANDINS, free_port, short_tmpdir, standin_engine_toml

pytestmark = pytest.mark.slow


def _daemon(config_text: str) -> Daemon:
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n' + config_text)
    logger = structlog.wrap_logger(structlog.PrintLogger(io.StringIO()))
    daemon = Daemon(load_config(path), logger=logger)
    daemon.open()
    return daemon


@pytest.mark.anyio
async def test_state_changes_are_fsynced_off_the_event_loop_and_reach_the_disk(monkeypatch) -> None:
    """An engine's start and stop write state.json many times; no fsync runs on the loop's thread."""
    loop_thread = threading.get_ident()
    on_loop: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    daemon = _daemon(standin_engine_toml("s", free_port()))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            sup = daemon.supervisors["s"]
            with anyio.fail_after(30):
                await sup.wait_for(lambda s: s.state == "ready", None)
            await daemon.stop("s")
            with anyio.fail_after(30):
                await sup.wait_for(lambda s: s.state == "stopped" and not s.resident, None)
            tg.cancel_scope.cancel()
    finally:
        daemon.close()  # flushes the writer before the lock is released
    assert not on_loop, f"{len(on_loop)} fsync(s) ran on the event loop"
    saved = json.loads((daemon.state_dir / "state.json").read_text())
    assert saved["engines"]["s"]["state"] == "stopped"
    assert len(saved["engines"]["s"]["backoff"]["spawn_times_s"]) >= 1


def test_spawn_time_is_on_disk_before_the_engine_process_exists(daemon_factory, tmp_path) -> None:
    """The engine itself reads state.json at its first instruction and finds its own spawn recorded."""
    port = free_port()
    seen = tmp_path / "state-seen-by-engine.json"
    d = daemon_factory("")
    script = (f"cp {shlex.quote(str(d.state_dir / 'state.json'))} {shlex.quote(str(seen))}; "
              f"exec {PYTHON} {STANDINS / 'openai_engine.py'} --port {port}")
    d.config_path.write_text(d.config_path.read_text() + standin_engine_toml("s", port).replace(
        f'command = ["{PYTHON}", "{STANDINS / "openai_engine.py"}", "--port", "{{port}}"]',
        f"command = {json.dumps(['/bin/sh', '-c', script])}"))
    d.start()
    d.wait_state("s", "ready", 30)
    record = json.loads(seen.read_text())["engines"]["s"]
    assert len(record["backoff"]["spawn_times_s"]) == 1


@pytest.mark.anyio
async def test_alerts_are_journaled_off_the_event_loop_and_none_is_lost_at_exit(monkeypatch) -> None:
    """An engine refused at start raises a critical alert: its outbox record is fsynced off the loop and
    is in the journal once the daemon has closed (the webhook never answered)."""
    from supervisord_llm.extensions import AlertsExtension

    loop_thread = threading.get_ident()
    on_loop: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    config = (standin_engine_toml("huge", free_port(), footprint="900TB")
              + '[policies.memory]\nadmission_wait = "0s"\n'
              + f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:{free_port()}/x"\n')
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n' + config)
    def build() -> Daemon:  # as the entry point does: in a worker thread (the outbox compacts when built)
        daemon = Daemon(load_config(path), logger=structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
        daemon.claim()
        daemon.extensions.append(AlertsExtension(daemon))
        daemon.open()
        return daemon

    daemon = await anyio.to_thread.run_sync(build)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            sup = daemon.supervisors["huge"]
            with anyio.fail_after(30):
                await sup.wait_for(lambda s: s.state == "stopped" and s.start_refused is not None, None)
            tg.cancel_scope.cancel()
    finally:
        daemon.close()
    assert not on_loop, f"{len(on_loop)} fsync(s) ran on the event loop"
    journal = (state / "alerts" / "outbox.jsonl").read_text()
    assert "engine.start_refused:huge" in journal


def test_a_saved_time_too_large_for_a_float_is_ignored_and_the_daemon_starts(tmp_path) -> None:
    """A hand-edited or damaged state file whose times are integers beyond a float's range (JSON allows
    them) must not stop the daemon from starting: those times are ignored, the rest is kept."""
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n' + standin_engine_toml("s", free_port()))
    (state / "state.json").write_text(json.dumps({"engines": {"s": {
        "pid": -5, "create_time": 10**400, "tag": "x/s/1",
        "state": "stopped", "restarts": 3, "reason": "stopped by llmctl", "ready_since": 10**400,
        "start_refused": {"reason": "memory", "message": "not enough memory", "at": 10**400},
        "backoff": {"engine": "s", "spawn_times_s": [10**400], "consecutive_failures": 2}}}}))
    logger = structlog.wrap_logger(structlog.PrintLogger(io.StringIO()))
    daemon = Daemon(load_config(path), logger=logger)
    try:
        daemon.open()
        sup = daemon.supervisors["s"]
        assert sup.restarts == 3 and sup.start_refused is not None  # the rest of the saved state is kept
        assert sup.start_refused_at_s is None and sup.saved_ready_since_wall is None
        assert sup.backoff.consecutive_failures == 0  # the damaged backoff record is replaced by a fresh one
        adopted, _ = daemon.find_adoptable()  # a pid or create time no process can have: nothing to adopt
        assert adopted == {}
    finally:
        daemon.close()
