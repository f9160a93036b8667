"""A crash that becomes a crash loop is one Alertmanager thread whose severity is raised (real Alertmanager)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.alertmanager import alerts_toml
from tests.helpers import PYTHON, free_port, mlx_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.chaos_full]


def test_crash_loop_raises_the_same_alert_to_critical(daemon_factory, tiny_model, alertmanager, outcome) -> None:
    """SIGKILL opens a warning; the restart dies during start (crash loop): the same alert turns critical."""
    outcome.scenario = "SIGKILL, then the restart crashes during start (max_failures = 2), with a real Alertmanager"
    outcome.expected = ("engine.exited warning with exit=SIGKILL at once; after the 60 s floor the restart exits "
                        "with code 3 during start; the same alert (same labels but severity) becomes critical, "
                        "the warning one ends, one Alertmanager group")
    am = alertmanager.start()
    flag = am.dir / "crash-on-start"
    # The real mlx_lm.server, behind a shell that exits at once while the flag file exists.
    wrapper = f'[ -e "{flag}" ] && exit 3; exec "{PYTHON}" -m mlx_lm.server "$@"'
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, command=["/bin/sh", "-c", wrapper, "mlx"])
    cfg += '[policies.restart]\nmax_failures = 2\n' + alerts_toml(am, 'max_backoff = "2s"')
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 60)["pid"]
    flag.write_text("")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    [warning] = am.wait_active(15, alertname="engine.exited", engine="tiny", severity="warning")
    assert warning["labels"]["exit"] == "SIGKILL"
    d.wait_state("tiny", "failed", 120)
    [critical] = am.wait_active(15, alertname="engine.exited", engine="tiny", severity="critical")
    am.wait_inactive(15, alertname="engine.exited", engine="tiny", severity="warning")
    assert {k: v for k, v in critical["labels"].items() if k != "severity"} == \
        {k: v for k, v in warning["labels"].items() if k != "severity"}
    assert critical["startsAt"] == warning["startsAt"]
    assert "will not be restarted automatically" in critical["annotations"]["summary"]
    assert "last_exit: code 3" in critical["annotations"]["description"]
    assert len(am.active(alertname="engine.exited")) == 1
    deadline = time.monotonic() + 15
    while len({p["groupKey"] for p in am.notifications.payloads}) < 1 or not any(
            a["labels"]["severity"] == "critical" for a in am.notifications.alerts()):
        assert time.monotonic() < deadline, am.notifications.payloads
        time.sleep(0.1)
    assert len({p["groupKey"] for p in am.notifications.payloads}) == 1  # one thread
    outcome.observed = (f"warning active with exit=SIGKILL; failed {time.monotonic() - killed:.0f} s after the kill; "
                        "the same alert critical, the warning ended; one notification group")
    outcome.lost = "nothing"
