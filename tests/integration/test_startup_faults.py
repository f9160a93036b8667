"""The daemon's start: a second daemon touches nothing of the first one's state dir, and damaged or
oddly shaped files (state, alert outbox, a webhook target renamed while deliveries wait) never stop
it from starting. Every test runs the real ``supervisord-llm run`` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from supervisord_llm.alerts.delivery import Alert, AlertSettings, Outbox
from supervisord_llm.clock import SystemClock
from tests.helpers import PYTHON, free_port, short_tmpdir, standin_engine_toml

pytestmark = pytest.mark.slow


class _NullLog:
    def __getattr__(self, name: str):
        return lambda *a, **k: None

    def bind(self, **kw: object) -> _NullLog:
        return self


def _alerts_toml(name: str, port: int) -> str:
    return f'[alerts]\n[[alerts.webhook]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}/hook"\nformat = "json"\n'


def _queue_undelivered(state_dir: Path, target: str, port: int) -> None:
    """Leave one alert in the outbox for ``target``, as a daemon that could not deliver it would."""
    settings = AlertSettings.from_toml({"webhook": [{"name": target, "url": f"http://127.0.0.1:{port}/hook",
                                                     "format": "json"}]}, file="test.toml")
    outbox = Outbox(state_dir, settings, SystemClock(), _NullLog())
    assert outbox.submit(Alert.firing("engine.failed:s", "critical", "s failed", engine="s", clock=SystemClock()))
    outbox._journal.close()


def test_second_daemon_leaves_the_first_ones_alert_outbox_alone(daemon_factory) -> None:
    """A second `run` on a taken state dir fails without rewriting the running daemon's outbox."""
    dead = free_port()  # nothing listens: alerts stay pending
    d = daemon_factory(_alerts_toml("hook", dead)).start()
    outbox = d.state_dir / "alerts" / "outbox.jsonl"
    before = os.stat(outbox)
    second = subprocess.run([PYTHON, "-m", "supervisord_llm.main", "run", "--config", str(d.config_path)],
                            capture_output=True, text=True, timeout=60, env=d.env)
    assert second.returncode == 1 and "already" in second.stderr
    after = os.stat(outbox)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), \
        "the second daemon replaced the first one's outbox before failing on the lock"
    assert d.proc is not None and d.proc.poll() is None


def test_pending_delivery_to_a_removed_target_does_not_stop_the_start(daemon_factory) -> None:
    """A webhook renamed while an alert waited for it: the daemon starts and says the delivery was dropped."""
    state_dir = short_tmpdir()
    _queue_undelivered(state_dir, "old-name", free_port())
    d = daemon_factory(_alerts_toml("new-name", free_port()), state_dir=state_dir).start()
    dropped = [e for e in d.events() if e["kind"] == "alert.dropped"]
    assert dropped and dropped[0]["target"] == "old-name" and "no longer configured" in dropped[0]["reason"]


@pytest.mark.parametrize("state", [
    {"engines": []},
    {"engines": {"s": []}, "swap": "x", "baselines": []},
    {"engines": {"s": {"pid": "12", "backoff": [], "restarts": "many", "last_exit": 3}}, "stranded": [],
     "reboot": "soon"},
])
def test_state_file_of_the_wrong_shape_is_kept_aside_and_the_daemon_starts(daemon_factory, state) -> None:
    """Valid JSON of the wrong shape in state.json: a copy is kept, an event warns, the engine starts."""
    state_dir = short_tmpdir()
    (state_dir / "state.json").write_text(json.dumps(state))
    d = daemon_factory(standin_engine_toml("s", free_port()), state_dir=state_dir).start()
    d.wait_state("s", "ready", 30)
    assert [e for e in d.events() if e["kind"] == "state.corrupt"]
    kept = list(state_dir.glob("state.json.corrupt-*"))
    assert kept and json.loads(kept[0].read_text()) == state


def test_outbox_records_of_the_wrong_shape_are_skipped_and_kept(daemon_factory) -> None:
    """Odd episode keys and deliveries in the alert outbox: the daemon starts, a copy of the file is kept."""
    state_dir = short_tmpdir()
    port = free_port()
    _queue_undelivered(state_dir, "hook", port)
    journal = state_dir / "alerts" / "outbox.jsonl"
    good = journal.read_text()
    with journal.open("a") as f:
        f.write(json.dumps({"op": "snapshot", "episodes": {"k": {"odd": 1}}}) + "\n")
        f.write(json.dumps({"op": "queued", "alert": {"key": 3}, "deliveries": [{"no": "id"}]}) + "\n")
        f.write(json.dumps({"op": "snapshot", "episodes": []}) + "\n")
    d = daemon_factory(_alerts_toml("hook", port), state_dir=state_dir).start()
    assert d.status()["alerts"]["pending"] == 1, "the good record before the odd ones is still delivered"
    kept = list((state_dir / "alerts").glob("outbox.jsonl.corrupt-*"))
    assert kept and kept[0].read_text().startswith(good)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_metrics_on_an_ipv6_address_serves(daemon_factory) -> None:
    """`metrics_listen = "[::1]:PORT"` passes validation and serves /healthz at start."""
    import httpx

    port = free_port()
    state_dir = short_tmpdir()
    daemon_factory(f'[daemon]\nstate_dir = "{state_dir}"\nmetrics_listen = "[::1]:{port}"\n',
                       state_dir=state_dir).start()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert httpx.get(f"http://[::1]:{port}/healthz", timeout=2).status_code == 200
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
