"""Stranded wired memory and reboot escalation, driven by a scripted vm_stat stand-in on PATH.

macOS probes cannot run on Linux, so `vm_stat`/`sysctl` are stand-ins that print captured samples in
the sequence a scenario needs; everything else (the daemon, its state, the reboot argv) is real.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from probes.memory import parse_vm_stat
from tests.helpers import FIXTURES, PYTHON, STANDINS
from tests.integration.test_alerts_daemon import Receiver

pytestmark = pytest.mark.slow

SAMPLES = FIXTURES / "vm_stat"


def wired(name: str) -> int:
    return parse_vm_stat((SAMPLES / f"{name}.txt").read_text()).wired_bytes


def _config(reboot: str = "") -> str:
    return (f'[probes]\nplatform = "darwin"\ninterval = "0.2s"\n'
            f'[policies.stranded]\nreclaim_window = "0s"\nthreshold = "32GB"\n{reboot}')


def _env(tmp: Path, sequence: list[str]) -> dict[str, str]:
    seq = tmp / "sequence.txt"
    seq.write_text("\n".join(sequence) + "\n")
    return {"PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_VM_STAT_SEQUENCE_FILE": str(seq)}


def _recorder(tmp: Path) -> tuple[str, Path]:
    record = tmp / "reboots.log"
    script = tmp / "fake-reboot.py"
    script.write_text(f"import time\nopen({str(record)!r}, 'a').write(f'{{time.time()}}\\n')\n")
    return f'[policies.reboot]\nenabled = true\ngrace = "30s"\nargv = ["{PYTHON}", "{script}"]\n', record


def _wait(predicate, timeout_s: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def test_status_follows_the_vm_stat_sequence_idle_loaded_stranded(daemon_factory, tmp_path) -> None:
    """Status shows wired memory of each sample in turn, then the stranded amount and its alert."""
    seq = ["studio-512gb-idle*8", "studio-512gb-8bit-loaded*4", "studio-512gb-stranded-after-hang"]
    d = daemon_factory(_config(), env=_env(tmp_path, seq)).start()
    seen = set()

    def observe():
        mem = d.status()["system"]["memory"]
        seen.add(mem["wired_bytes"])
        return mem if mem["wired_bytes"] == wired("studio-512gb-stranded-after-hang") and mem["stranded_bytes"] else None

    mem = _wait(observe, 60, "stranded never shown")
    assert wired("studio-512gb-idle") in seen and wired("studio-512gb-8bit-loaded") in seen
    assert mem["baseline_wired_bytes"] == wired("studio-512gb-idle")
    expected = wired("studio-512gb-stranded-after-hang") - wired("studio-512gb-idle")
    assert mem["stranded_bytes"] == expected
    assert mem["total_bytes"] == 549755813888
    alerts = [e for e in d.events() if e["kind"] == "alert.raised" and e["key"] == "memory.stranded"]
    assert alerts and "wired memory stranded" in alerts[0]["summary"] and "reboot required" in alerts[0]["summary"]
    assert not [e for e in d.events() if e["kind"].startswith("reboot.exec")]  # escalation is off by default
    out = d.llmctl("status")
    assert "STRANDED" in out.stdout


@pytest.mark.long_wait
def test_enabled_reboot_runs_once_and_not_again_inside_the_cooldown(daemon_factory, tmp_path) -> None:
    """With escalation on, the reboot argv runs once after the grace; a restarted daemon does not run it again."""
    reboot, record = _recorder(tmp_path)
    seq = ["studio-512gb-idle*5", "studio-512gb-stranded-after-hang"]
    d = daemon_factory(_config(reboot), env=_env(tmp_path, seq)).start()
    _wait(lambda: record.exists(), 50, "reboot argv never ran")
    announced = [e for e in d.events() if e["kind"] == "reboot.announced"]
    executing = [e for e in d.events() if e["kind"] == "reboot.executing"]
    assert announced and executing and announced[0]["seq"] < executing[0]["seq"]
    time.sleep(2)
    assert len(record.read_text().splitlines()) == 1
    d.kill()  # the daemon dies; the ledger in its state dir survives
    d.start()
    restarted_seq = max(e["seq"] for e in d.events() if e["kind"] == "daemon.started")
    raised = _wait(lambda: [e for e in d.events() if e["kind"] == "alert.raised" and "cooldown" in e.get("summary", "")],
                   20, "inside the cooldown an alert says why no reboot happens")
    assert raised
    # Inside the cooldown the reboot is not even announced: it could not run before its 30 s grace
    # anyway, so the announcement is what shows whether it would have been.
    again = [e for e in d.events() if e["kind"] in ("reboot.announced", "reboot.executing") and e["seq"] > restarted_seq]
    assert not again, f"a reboot was announced again inside the cooldown: {again}"
    assert len(record.read_text().splitlines()) == 1, "ran again inside the cooldown"
    verified = [e for e in d.events() if e["kind"] == "reboot.verified"]
    assert verified and verified[-1]["rebooted"] is False  # the command ran but this machine did not reboot


def test_disabled_escalation_never_runs_the_argv(daemon_factory, tmp_path) -> None:
    """Without `enabled = true` only the alert is raised."""
    reboot, record = _recorder(tmp_path)
    reboot = reboot.replace("enabled = true", "enabled = false")
    d = daemon_factory(_config(reboot), env=_env(tmp_path, ["studio-512gb-idle*5", "studio-512gb-stranded-after-hang"])).start()
    _wait(lambda: [e for e in d.events() if e["kind"] == "alert.raised" and e["key"] == "memory.stranded"], 20)
    required = _wait(lambda: [e for e in d.events() if e["kind"] == "alert.raised" and e["key"] == "reboot.required"],
                     10, "the alert that asks for a reboot by hand")
    assert "reboot.enabled = false" in required[0]["summary"]
    # The reboot would run only after its 30 s grace: what must not appear at all is its announcement.
    assert not [e for e in d.events() if e["kind"] in ("reboot.announced", "reboot.executing")]
    assert d.status()["reboot"]["state"] == "required"
    assert not record.exists()


@pytest.mark.long_wait
def test_cancelled_reboot_does_not_run(daemon_factory, tmp_path) -> None:
    """`llmctl reboot cancel` during the grace stops the reboot."""
    reboot, record = _recorder(tmp_path)
    d = daemon_factory(_config(reboot), env=_env(tmp_path, ["studio-512gb-idle*5", "studio-512gb-stranded-after-hang"])).start()
    _wait(lambda: [e for e in d.events() if e["kind"] == "reboot.announced"], 20, "no announcement")
    assert d.status()["reboot"]["state"] == "announced"
    out = d.llmctl("reboot", "cancel")
    assert out.returncode == 0 and "reboot cancelled" in out.stdout
    time.sleep(33)  # past the 30 s grace (the shortest a config may set)
    assert not record.exists()
    assert d.status()["reboot"]["state"] == "cancelled"


def test_a_reboot_by_hand_resolves_the_previous_boots_stranded_and_reboot_alerts(daemon_factory, tmp_path) -> None:
    """Escalation off, the operator reboots: the next daemon resolves memory.stranded and reboot.required at the
    receiver, and stranded memory in the new boot opens a new episode (not dropped as a duplicate of the old one)."""
    receiver = Receiver()
    try:
        hook = f'[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "{receiver.url}"\nformat = "json"\n'
        env = _env(tmp_path, ["studio-512gb-idle*5", "studio-512gb-stranded-after-hang"])
        d = daemon_factory(_config() + hook, env=env).start()
        _wait(lambda: receiver.of("memory.stranded") and receiver.of("reboot.required"), 30, "the alerts fired")
        fired = {b["key"]: b for b in receiver.bodies if b["status"] == "firing"}
        d.stop()
        # The reboot: a new boot id (the state file keeps the one it was written in), and the wired memory is back.
        state_path = d.state_dir / "state.json"
        state = json.loads(state_path.read_text())
        assert state["stranded"]["boot_id"] == state["stranded"]["baseline"]["boot_id"]
        state["stranded"]["boot_id"] = state["stranded"]["baseline"]["boot_id"] = "an-earlier-boot"
        state_path.write_text(json.dumps(state))
        (tmp_path / "sequence.txt").write_text("studio-512gb-idle*5\nstudio-512gb-stranded-after-hang\n")
        (tmp_path / "sequence.txt.pos").unlink(missing_ok=True)
        d.start()

        def resolved(key: str) -> list[dict]:
            return [b for b in receiver.bodies if b["key"] == key and b["status"] == "resolved"]

        _wait(lambda: resolved("memory.stranded") and resolved("reboot.required"), 20,
              "the previous boot's episodes were not resolved at the receiver")
        for key in ("memory.stranded", "reboot.required"):
            assert resolved(key)[0]["episode_id"] == fired[key]["episode_id"]
        # Stranded again in the new boot: a new episode reaches the receiver.
        again = _wait(lambda: [b for b in receiver.of("memory.stranded")
                               if b["status"] == "firing" and b["episode_id"] != fired["memory.stranded"]["episode_id"]],
                      30, "the new boot's stranded memory was not alerted")
        assert "reboot required" in again[0]["message"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_garbage_from_vm_stat_is_a_probe_error_and_the_daemon_keeps_running(daemon_factory, tmp_path) -> None:
    """vm_stat printing garbage: status names the probe error; the control API keeps answering."""
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("Segmentation fault: 11\n\x00\x01 not vm_stat\n")
    d = daemon_factory(_config(), env=_env(tmp_path, [str(garbage)])).start()
    mem = _wait(lambda: d.status()["system"]["memory"] if d.status()["system"]["memory"]["error"] else None, 10)
    assert "vm_stat" in mem["error"] or "page size" in mem["error"]
    assert [e for e in d.events() if e["kind"] == "probe.failed" and e["probe"] == "memory"]
