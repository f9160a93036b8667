"""Every failure signature in the fixtures, printed by a real engine stand-in that then exits,
is named in the engine's status and its exit event by the real daemon."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.helpers import FIXTURES, free_port, standin_engine_toml

pytestmark = pytest.mark.slow


def _blocks() -> list[tuple[str, str]]:
    """(title, first verbatim line) for each block of engine-log-signatures.txt."""
    out = []
    title = None
    for line in (FIXTURES / "engine-log-signatures.txt").read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        elif title and line.strip() and not line.startswith(("#", "cause:", "remedy:")):
            out.append((title, line))
            title = None
    return out


def test_each_fixture_signature_becomes_the_engines_diagnosis(daemon_factory) -> None:
    """One stand-in engine per signature prints it and exits; each gets a diagnosis with a cause and remedy."""
    blocks = _blocks()
    assert len(blocks) >= 15
    cfg = ""
    for i, (_title, line) in enumerate(blocks):
        cfg += standin_engine_toml(f"e{i}", free_port(), "--print-line", line, footprint="1MB")
    cfg += '[policies.memory]\nheadroom = "0GB"\n'
    d = daemon_factory(cfg).start()
    for i, (title, line) in enumerate(blocks):
        engine = d.wait_state(f"e{i}", {"backoff", "failed"}, 60)
        diagnosis = engine["diagnosis"]
        assert diagnosis is not None, f"{title}: no diagnosis for {line!r}"
        assert diagnosis["cause"] and diagnosis["remedy"], title
        assert diagnosis["line"].strip() == line.strip() or diagnosis["line"].strip() in line, (title, diagnosis)
        exited = [e for e in d.events() if e["kind"] == "engine.exited" and e["engine"] == f"e{i}"]
        assert exited and exited[-1]["diagnosis"]["signature"] == diagnosis["signature"], title
    kv = next(i for i, (t, _) in enumerate(blocks) if "KV cache" in t)
    assert "157216" in d.engine(f"e{kv}")["diagnosis"]["remedy"]


def test_an_engine_that_prints_its_error_and_dies_at_once_still_gets_its_diagnosis(daemon_factory) -> None:
    """An engine whose fatal line comes within a millisecond of its start (before its pid is even known) is diagnosed."""
    line = "Ignored (for causing prior/excessive GPU errors) (00000004:kIOGPUCommandBufferCallbackErrorSubmissionsIgnored)"
    cfg = "\n".join(["[[engine]]", 'name = "fast"', 'kind = "command"', f"port = {free_port()}",
                     f"command = [\"sh\", \"-c\", {json.dumps(f'echo {shlex.quote(line)}; exit 1')}]",
                     'footprint = "1MB"', 'start_timeout = "30s"']) + "\n"
    d = daemon_factory(cfg).start()
    engine = d.wait_state("fast", {"backoff", "failed"}, 60)
    assert engine["diagnosis"] is not None and "ignores this process's GPU work" in engine["diagnosis"]["cause"], engine
