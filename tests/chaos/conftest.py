"""Chaos suite plumbing: every scenario states what it expected, what it observed and what was lost.

A scenario fills the ``outcome`` fixture; after the run the outcomes (with pass/fail) replace
``.pytest_cache/chaos-results.json`` (or ``$CHAOS_RESULTS``), stamped with the run's date and the
commit it ran on, and ``python -m tests.chaos.report`` renders them into docs/reliability.md. Rows
of older runs are never merged in: the table shows one run of one commit.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import REPO

RESULTS = Path(os.environ.get("CHAOS_RESULTS", REPO / ".pytest_cache" / "chaos-results.json"))
_collected: dict[str, dict] = {}


@dataclass
class Outcome:
    scenario: str = ""
    expected: str = ""
    observed: str = ""
    lost: str = ""


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Outcome:
    """What the scenario expected, observed and lost (filled in by the test as it runs)."""
    o = Outcome()
    request.node._chaos_outcome = o
    return o


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    report = (yield).get_result()
    o = getattr(item, "_chaos_outcome", None)
    if o is None:
        return
    if report.when == "call" or (report.when == "setup" and report.skipped):
        result = "passed" if report.passed else "skipped" if report.skipped else "failed"
        entry = {**asdict(o), "test": item.nodeid, "result": result,
                 "suite": "chaos_full" if item.get_closest_marker("chaos_full") else "chaos",
                 "duration_s": round(report.duration, 1),
                 "at": datetime.now(UTC).isoformat(timespec="seconds")}
        if report.skipped and isinstance(report.longrepr, tuple):
            entry["observed"] = entry["observed"] or f"skipped: {report.longrepr[2]}"
        if report.failed:
            entry["observed"] = (entry["observed"] + " | FAILED: " + str(report.longrepr).splitlines()[-1])[:600]
        _collected[item.nodeid] = entry


def _commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _collected:
        return
    run = {"commit": _commit(), "at": datetime.now(UTC).isoformat(timespec="seconds"),
           "selected": session.testscollected}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"run": run, "results": _collected}, indent=1))
