"""Which engines a restarted daemon starts, after a refused start (supervisord_llm/daemon.py ``_engines_to_start``).

A preload memory admission refused was stopped by nobody: the next daemon starts it as configured, asking
admission again. An engine a person stopped, or its idle unload, stays stopped, also when a request's start of
it was refused afterwards; so does a failed one.
"""

from __future__ import annotations

import io
import logging

import pytest
import structlog

from supervisord_llm.config import load_config
from supervisord_llm.daemon import Daemon
from tests.helpers import short_tmpdir, standin_engine_toml


def _daemon() -> Daemon:
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n' + standin_engine_toml("e", 18123))
    logger = structlog.wrap_logger(structlog.PrintLogger(io.StringIO()),
                                   wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    return Daemon(load_config(path), logger=logger)


REFUSAL = {"reason": "memory", "message": "e needs 104.0 GB, but only 31.6 GB is available", "at": 1.0}


@pytest.mark.parametrize(("saved", "starts"), [
    ({"state": "stopped", "start_refused": {**REFUSAL, "preload": True}}, True),  # its preload was refused
    ({"state": "stopped", "start_refused": {**REFUSAL, "preload": False}}, False),  # a request's start, after an idle unload
    ({"state": "stopped"}, False),  # a person stopped it
    ({"state": "failed"}, False),
    ({"state": "ready"}, True),
])
def test_a_restarted_daemon_starts_again_only_a_refused_preload(saved: dict, starts: bool) -> None:
    daemon = _daemon()
    daemon._saved = {"engines": {"e": saved}}
    daemon._load_saved()
    try:
        assert ("e" in daemon._engines_to_start(None)) is starts
        # The refusal is shown again (status, metrics, /readyz) until the engine is ready or a person stops it.
        assert daemon.supervisors["e"].start_refused == saved.get("start_refused")
    finally:
        for sup in daemon.supervisors.values():
            sup.close()
