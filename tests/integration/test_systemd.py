"""The daemon under a real systemd: engines outlive the daemon, a restart keeps the models.

systemd runs as PID 1 of a private PID + mount namespace (``unshare``), with its own tmpfs on
``/run``. The filesystem is otherwise the host's, and a normal boot would run systemd-tmpfiles
and empty the machine's /tmp, so it boots into an empty target of ours, with sysinit.target,
basic.target, journald and every systemd-tmpfiles unit masked, and the daemon's unit gets
``DefaultDependencies=no``. Killing the namespace's PID 1 ends everything in it.

The unit under test is the one ``llmctl service install`` writes (``render_systemd``), with a
drop-in that only shortens its timers (RestartSec, WatchdogSec, TimeoutAbortSec), runs this
checkout's code and writes the daemon's output to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisord_llm.service import render_systemd
from tests.helpers import PYTHON, REPO, free_port, mlx_engine_toml, short_tmpdir

pytestmark = [pytest.mark.slow]

SYSTEMD = Path("/lib/systemd/systemd")
MASKED = ("sysinit.target", "basic.target", "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
          "systemd-tmpfiles-clean.service", "systemd-tmpfiles-clean.timer", "systemd-journald.service",
          "systemd-journald.socket", "systemd-journald-dev-log.socket", "systemd-journald-audit.socket",
          "tmp.mount")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "systemd as PID 1 of a namespace needs root"
    if not SYSTEMD.exists() or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs /lib/systemd/systemd, unshare and nsenter (Debian: systemd, util-linux)"
    return None


class SystemdNamespace:
    """systemd as PID 1 of a private PID + mount namespace; ``ctl`` runs systemctl inside it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.units = workdir / "units"
        self.units.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None

    def boot(self) -> None:
        (self.units / "sltest.target").write_text("[Unit]\nDescription=empty test target\nDefaultDependencies=no\n")
        masks = "\n".join(f"ln -sf /dev/null /run/systemd/system/{u}" for u in MASKED)
        script = self.workdir / "boot.sh"
        script.write_text(f"""#!/bin/sh
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system
{masks}
cp -r {self.units}/. /run/systemd/system/
exec {SYSTEMD} --system --unit=sltest.target
""")
        script.chmod(0o755)
        log = open(self.workdir / "systemd.log", "ab")
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--mount-proc", str(script)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = psutil.Process(self.proc.pid).children()
            if children and "systemd" in " ".join(children[0].cmdline()):
                self.init_pid = children[0].pid
                if self.ctl("is-system-running", check=False).stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise TimeoutError(f"systemd did not boot: {(self.workdir / 'systemd.log').read_text()[-2000:]}")

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.init_pid is not None
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-p", "-m", *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def prop(self, unit: str, name: str) -> str:
        return self.ctl("show", "-p", name, "--value", unit).stdout.strip()

    def close(self) -> None:
        if self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)  # the kernel then kills every process of the namespace
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(timeout=30)


@pytest.fixture
def systemd_ns() -> Iterator[SystemdNamespace]:
    why = _why_not()
    if why:
        pytest.skip(why)
    ns = SystemdNamespace(short_tmpdir("sd-"))
    try:
        yield ns
    finally:
        ns.close()


def _install_unit(ns: SystemdNamespace, name: str, config_text: str) -> tuple[Path, Path]:
    """Write config + the rendered unit + the test drop-in; returns (state dir, daemon log)."""
    state_dir = ns.workdir / name
    state_dir.mkdir()
    config = state_dir / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n' + config_text)
    unit = render_systemd(executable=REPO / ".venv" / "bin" / "supervisord-llm", config_path=config,
                          state_dir=state_dir, max_stop_grace_s=10)
    (ns.units / f"{name}.service").write_text(unit)
    dropin = ns.units / f"{name}.service.d"
    dropin.mkdir()
    log = state_dir / "daemon.log"
    (dropin / "test.conf").write_text(f"""[Unit]
DefaultDependencies=no
[Service]
ExecStart=
ExecStart={PYTHON} -m supervisord_llm.main run --config {config}
Environment=PYTHONPATH={REPO}
RestartSec=1
WatchdogSec=4
TimeoutAbortSec=2
StandardOutput=append:{log}
StandardError=append:{log}
""")
    return state_dir, log


def _status(state_dir: Path, timeout_s: float = 30) -> dict:
    # llmctl's own client: it closes its socket when a connect is refused (a daemon restarting),
    # where httpx's Unix transport leaks it.
    from supervisord_llm.cli import Client, NoDaemon

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = Client(state_dir / "control.sock", timeout_s=5).request("GET", "/v1/status")
            if response.status_code == 200:
                return response.json()
        except (NoDaemon, TimeoutError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"no answer on {state_dir / 'control.sock'}: {last}")


def _wait_engine(state_dir: Path, name: str, state: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    engine: dict = {}
    while time.monotonic() < deadline:
        try:
            engine = next(e for e in _status(state_dir)["engines"] if e["name"] == name)
        except TimeoutError:
            continue
        if engine["state"] == state:
            return engine
        time.sleep(0.2)
    raise TimeoutError(f"engine {name} not {state} within {timeout_s}s: {engine}")


def _events(state_dir: Path) -> list[dict]:
    path = state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _spawns(state_dir: Path) -> int:
    return sum(1 for e in _events(state_dir) if e.get("kind") == "engine.spawned")


def _wait_main_pid_change(ns: SystemdNamespace, unit: str, old: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = ns.prop(unit, "MainPID")
        if pid not in ("0", old) and ns.prop(unit, "ActiveState") == "active":
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"{unit} was not restarted: {ns.ctl('status', unit, check=False).stdout}")


def test_config_error_fails_the_start_with_the_reason_in_the_unit_status(systemd_ns: SystemdNamespace) -> None:
    """Type=notify: a daemon that cannot start fails `systemctl start`, and `systemctl status` says why."""
    _install_unit(systemd_ns, "slbad", "[[engine]]\nname = 'x'\nkind = 'mlx_lm'\nport = 'not a port'\n")
    systemd_ns.boot()
    started = systemd_ns.ctl("start", "slbad.service", check=False)
    assert started.returncode != 0
    status = systemd_ns.ctl("status", "slbad.service", check=False).stdout
    assert systemd_ns.prop("slbad.service", "Result") == "exit-code", status
    assert "config error" in status and "slbad/config.toml" in status, status


def test_engines_outlive_the_daemon_and_a_restart_keeps_the_models(systemd_ns: SystemdNamespace, tiny_model: Path) -> None:
    """SIGKILL, a watchdog kill and `systemctl reload` of the daemon never restart its engine; stop stops it gracefully."""
    state_dir, log = _install_unit(systemd_ns, "sl", mlx_engine_toml("tiny", free_port(), tiny_model))
    systemd_ns.boot()
    unit = "sl.service"

    # Type=notify: `systemctl start` returns once the daemon sent READY=1, so its control API answers now.
    systemd_ns.ctl("start", unit, timeout=90)
    assert systemd_ns.prop(unit, "ActiveState") == "active"
    _status(state_dir, timeout_s=2)
    engine = _wait_engine(state_dir, "tiny", "ready")
    engine_pid = engine["pid"]
    # The engine runs in a scope unit of its own, outside the daemon's cgroup.
    cgroup = systemd_ns.run("cat", f"/proc/{engine_pid}/cgroup").stdout
    assert "supervisord-llm-tiny-" in cgroup and ".scope" in cgroup and "sl.service" not in cgroup, cgroup
    scopes = systemd_ns.ctl("list-units", "--type=scope", "--no-legend", "supervisord-llm-tiny-*").stdout
    assert "running" in scopes, scopes
    # Its keeper (its parent, which records how it ends) shares the scope.
    status = systemd_ns.run("cat", f"/proc/{engine_pid}/status").stdout
    keeper_pid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
    assert "keeper.py" in systemd_ns.run("cat", f"/proc/{keeper_pid}/cmdline").stdout
    assert systemd_ns.run("cat", f"/proc/{keeper_pid}/cgroup").stdout == cgroup

    # 1. The daemon is SIGKILLed (as an OOM kill would): systemd restarts it, it adopts the same engine.
    main_pid = systemd_ns.prop(unit, "MainPID")
    systemd_ns.run("kill", "-KILL", main_pid)
    main_pid = _wait_main_pid_change(systemd_ns, unit, main_pid)
    engine = _wait_engine(state_dir, "tiny", "ready")
    assert engine["pid"] == engine_pid, "a new daemon must adopt the running engine, not start another"
    assert _spawns(state_dir) == 1

    # 2. The daemon's loop stops (SIGSTOP): the watchdog kills it, systemd restarts it, it adopts again.
    systemd_ns.run("kill", "-STOP", main_pid)
    main_pid = _wait_main_pid_change(systemd_ns, unit, main_pid, timeout_s=30)
    assert systemd_ns.prop(unit, "NRestarts") == "2"
    engine = _wait_engine(state_dir, "tiny", "ready")
    assert engine["pid"] == engine_pid
    assert _spawns(state_dir) == 1

    # 3. `systemctl reload`: the daemon re-executes itself (same main pid), the engine is kept.
    # A new daemon is a new daemon.started event (its uptime cannot tell: the watchdog restart above
    # may have been only a moment ago).
    starts_before = sum(1 for e in _events(state_dir) if e.get("kind") == "daemon.started")
    systemd_ns.ctl("reload", unit)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(1 for e in _events(state_dir) if e.get("kind") == "daemon.started") > starts_before:
            _status(state_dir)
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the daemon did not restart on reload: {log.read_text()[-2000:]}")
    assert systemd_ns.prop(unit, "MainPID") == main_pid
    engine = _wait_engine(state_dir, "tiny", "ready")
    assert engine["pid"] == engine_pid
    assert _spawns(state_dir) == 1
    assert any(e.get("kind") == "daemon.restarting" for e in _events(state_dir))

    # 4. `systemctl stop`: the daemon stops its engine gracefully (SIGTERM, no SIGKILL) and nothing is left.
    systemd_ns.ctl("stop", unit, timeout=90)
    assert systemd_ns.prop(unit, "ActiveState") in ("inactive", "failed")
    stops = [e for e in _events(state_dir) if e.get("kind") == "engine.stopped"]
    assert stops and stops[-1]["graceful"] is True and not stops[-1]["killed_pids"], stops[-1:]
    leftover = systemd_ns.ctl("list-units", "--type=scope", "--all", "--no-legend", "supervisord-llm-*").stdout
    assert "running" not in leftover, leftover
    assert systemd_ns.run("kill", "-0", str(engine_pid), check=False).returncode != 0
    assert systemd_ns.run("kill", "-0", keeper_pid, check=False).returncode != 0, "the keeper went with its engine"
