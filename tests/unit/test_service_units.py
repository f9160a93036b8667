"""The launchd plist and systemd unit that run the daemon, and installing them."""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from supervisord_llm import service
from supervisord_llm.config import parse_config
from supervisord_llm.service import (
    ServicePlan,
    find_executable,
    install,
    render_launchd,
    render_systemd,
    stop_timeout_s,
    uninstall,
)
from tests.helpers import REPO

GRACE_S = 300.0


@pytest.fixture
def executable(tmp_path: Path) -> Path:
    """A real executable in a directory with a space in its name."""
    path = tmp_path / "my venv" / "bin" / "supervisord-llm"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def unit_sections(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",),
                                          comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def systemd_analyze_verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], check=False, capture_output=True,
                          text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)}, timeout=60)


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def test_stop_timeout_exceeds_the_engine_grace() -> None:
    """The service manager waits the longest engine grace plus a margin before it kills the daemon."""
    assert stop_timeout_s(120) == 150
    assert stop_timeout_s(0.5) == 31
    with pytest.raises(ValueError, match="non-negative"):
        stop_timeout_s(-1)


def test_launchd_plist_parses_and_keeps_the_daemon_alive_safely(tmp_path: Path, executable: Path) -> None:
    """The plist is valid, restarts the daemon no faster than 60 s, and outwaits the engine grace on stop."""
    config = tmp_path / "Application Support" / "conf & <more>.toml"
    text = render_launchd(executable=executable, config_path=config, state_dir=tmp_path / "state",
                          max_stop_grace_s=GRACE_S, log_dir=tmp_path / "logs", path_env="/opt/homebrew/bin:/usr/bin")
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "com.supervisord-llm"
    assert plist["ProgramArguments"] == [str(executable), "run", "--config", str(config)]
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ThrottleInterval"] >= 60
    assert plist["ExitTimeOut"] > GRACE_S
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == str(tmp_path / "logs" / "daemon.out.log")
    assert plist["StandardErrorPath"] == str(tmp_path / "logs" / "daemon.err.log")
    assert plist["EnvironmentVariables"] == {
        "PATH": "/opt/homebrew/bin:/usr/bin", "SUPERVISORD_LLM_CONFIG": str(config),
        "SUPERVISORD_LLM_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}


def test_launchd_path_defaults_to_the_installing_shell_with_the_executable_first(
        tmp_path: Path, executable: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines on the user's PATH (Homebrew, pip) are found by the agent: PATH is taken from the installing shell."""
    monkeypatch.setenv("PATH", "/opt/homebrew/bin:/usr/bin:/bin")
    plist = plistlib.loads(render_launchd(executable=executable, config_path=tmp_path / "c.toml",
                                          state_dir=tmp_path, max_stop_grace_s=60).encode())
    assert plist["EnvironmentVariables"]["PATH"] == f"{executable.parent}:/opt/homebrew/bin:/usr/bin:/bin"
    assert plist["StandardOutPath"] == str(tmp_path / "logs" / "daemon.out.log")


def test_systemd_unit_has_the_required_keys(tmp_path: Path, executable: Path) -> None:
    """The unit is Type=notify with a watchdog, restarts no faster than 60 s, and outwaits the engine grace."""
    config = tmp_path / "my config" / "config.toml"
    unit = unit_sections(render_systemd(executable=executable, config_path=config, state_dir=tmp_path / "st",
                                        max_stop_grace_s=GRACE_S, path_env="/usr/bin:/bin"))
    s = unit["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] == "60"
    assert s["Restart"] == "always" and int(s["RestartSec"]) >= 60
    assert int(s["TimeoutStopSec"]) > GRACE_S
    assert s["KillMode"] == "mixed"
    assert shlex.split(s["ExecStart"]) == [str(executable), "run", "--config", str(config)]
    assert shlex.split(s["Environment"]) == [f"SUPERVISORD_LLM_CONFIG={config}",
                                             f"SUPERVISORD_LLM_STATE_DIR={tmp_path / 'st'}",
                                             "PATH=/usr/bin:/bin", "PYTHONUNBUFFERED=1"]
    assert unit["Install"]["WantedBy"] == "default.target"


@needs_systemd
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, executable: Path) -> None:
    """systemd itself accepts the unit: no unknown keys, bad values or a missing executable."""
    unit = tmp_path / "supervisord-llm.service"
    unit.write_text(render_systemd(executable=executable, config_path=tmp_path / "config.toml",
                                   state_dir=tmp_path / "100% $HOME state", max_stop_grace_s=GRACE_S))
    result = systemd_analyze_verify(unit, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    assert "100%% $HOME state" in unit.read_text()  # % escaped for systemd's specifiers


@needs_systemd
def test_systemd_analyze_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    """The verification above is real: a unit whose ExecStart does not exist is refused."""
    unit = tmp_path / "supervisord-llm.service"
    unit.write_text(render_systemd(executable=tmp_path / "no such dir" / "supervisord-llm",
                                   config_path=tmp_path / "c.toml", state_dir=tmp_path, max_stop_grace_s=60))
    result = systemd_analyze_verify(unit, tmp_path)
    assert result.returncode != 0
    assert "no such dir/supervisord-llm" in result.stderr


@pytest.mark.parametrize("kind", ["launchd", "systemd"])
def test_dry_run_install_writes_nothing(tmp_path: Path, executable: Path, kind: str) -> None:
    """A dry run shows the file and the commands but creates no file and no directory."""
    unit_dir = tmp_path / "units"
    plan = install(kind, dry_run=True, config_path=tmp_path / "c.toml", state_dir=tmp_path / "state",
                   max_stop_grace_s=60, executable=executable, unit_dir=unit_dir, uid=501)
    assert plan.dry_run and not plan.changed
    assert not unit_dir.exists() and not (tmp_path / "state").exists()
    assert plan.content and str(executable) in plan.content
    if kind == "launchd":
        assert plan.path == unit_dir / "com.supervisord-llm.plist"
        assert plan.commands == (("launchctl", "bootstrap", "gui/501", str(plan.path)),)
        assert tmp_path / "state" / "logs" in plan.made_dirs
    else:
        assert plan.path == unit_dir / "supervisord-llm.service"
        assert plan.shell == ("systemctl --user daemon-reload && "
                              "systemctl --user enable --now supervisord-llm.service")
    assert any("does not exist yet" in note for note in plan.notes)


def test_install_writes_the_unit_and_reinstall_reloads_it(tmp_path: Path, executable: Path) -> None:
    """Installing writes the plist (0644) and the log dir; a second install unloads the old job first."""
    unit_dir = tmp_path / "LaunchAgents"
    args = {"config_path": tmp_path / "c.toml", "state_dir": tmp_path / "state", "max_stop_grace_s": 60,
            "executable": executable, "unit_dir": unit_dir, "uid": 501}
    plan = install("launchd", **args)  # type: ignore[arg-type]
    assert plan.changed and plan.path.read_text() == plan.content
    assert plan.path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "state" / "logs").is_dir()
    again = install("launchd", **args)  # type: ignore[arg-type]
    assert again.commands[0] == ("launchctl", "bootout", "gui/501/com.supervisord-llm")
    assert [p.name for p in unit_dir.iterdir()] == ["com.supervisord-llm.plist"]  # no temp file left


def test_systemd_reinstall_restarts_and_uninstall_removes(tmp_path: Path, executable: Path) -> None:
    """Reinstalling the systemd unit restarts it; uninstall (dry run first) disables it, then removes the file."""
    unit_dir = tmp_path / "systemd" / "user"
    args = {"config_path": tmp_path / "c.toml", "state_dir": tmp_path, "max_stop_grace_s": 60,
            "executable": executable, "unit_dir": unit_dir}
    install("systemd", **args)  # type: ignore[arg-type]
    again = install("systemd", **args)  # type: ignore[arg-type]
    assert again.commands[-1] == ("systemctl", "--user", "restart", "supervisord-llm.service")
    # What `systemctl --user enable` makes of the unit's [Install] WantedBy=default.target.
    wants = unit_dir / "default.target.wants"
    wants.mkdir()
    (wants / "supervisord-llm.service").symlink_to(unit_dir / "supervisord-llm.service")
    dry = uninstall("systemd", dry_run=True, unit_dir=unit_dir)
    assert not dry.changed and dry.path.exists()
    # Commands that work once the file is gone (`systemctl disable` would fail: "Unit file ... does not exist").
    assert dry.commands == (("systemctl", "--user", "stop", "supervisord-llm.service"),
                            ("systemctl", "--user", "daemon-reload"))
    done = uninstall("systemd", unit_dir=unit_dir)
    assert done.changed and not done.path.exists()
    assert list(wants.iterdir()) == []  # not enabled any more: nothing starts it at the next login
    # A unit file removed by hand leaves its enablement link dangling: uninstall removes that too.
    (wants / "supervisord-llm.service").symlink_to(unit_dir / "supervisord-llm.service")
    uninstall("systemd", unit_dir=unit_dir)
    assert list(wants.iterdir()) == []
    assert uninstall("systemd", unit_dir=unit_dir).commands == ()  # nothing left to unload


def test_unknown_kind_names_the_valid_ones(tmp_path: Path) -> None:
    """Asking for an unknown service manager says which exist."""
    with pytest.raises(ValueError, match="launchd, systemd"):
        install("upstart", dry_run=True, config_path=tmp_path, state_dir=tmp_path, max_stop_grace_s=1,
                executable=tmp_path)


def test_find_executable_prefers_the_console_script_beside_python() -> None:
    """The unit runs the supervisord-llm installed in this environment, by absolute path."""
    found = find_executable()
    assert found.is_absolute() and found.name == "supervisord-llm" and os.access(found, os.X_OK)


def test_shipped_examples_match_the_renderer() -> None:
    """The example units in units/ are exactly what the renderer produces (regenerate: python -m supervisord_llm.service units)."""
    for name, text in service.example_units().items():
        assert (REPO / "units" / name).read_text() == text, f"units/{name} is stale"


def test_kubernetes_example_runs_one_daemon_per_node_with_probes_and_scraping() -> None:
    """The DaemonSet probes the daemon's health port, is scraped by Prometheus, and its config is valid as shipped."""
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((REPO / "units" / "kubernetes" / "daemonset.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports["metrics"]) == annotations["prometheus.io/port"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    config = parse_config(tomllib.loads(config_map["data"]["config.toml"]), "daemonset.yaml", environ={})
    assert config.daemon.metrics_listen == f"0.0.0.0:{ports['metrics']}"
    grace_s = max(e.stop_grace_s for e in config.engines)
    assert pod["spec"]["terminationGracePeriodSeconds"] == stop_timeout_s(grace_s)
    assert [t.format for t in config.alerts.targets] == ["alertmanager_api"]
    assert container["command"][-2:] == ["--config", "/etc/supervisord-llm/config.toml"]


def test_plan_shell_quotes_paths_with_spaces() -> None:
    """The copy-paste command line quotes paths that contain spaces."""
    plan = ServicePlan("launchd", Path("/Users/a b/x.plist"), None, True, False,
                       (("launchctl", "bootstrap", "gui/501", "/Users/a b/x.plist"),))
    assert plan.shell == "launchctl bootstrap gui/501 '/Users/a b/x.plist'"


@pytest.mark.parametrize("kind", ["launchd", "systemd"])
def test_install_names_the_variables_the_config_reads_from_the_environment(tmp_path: Path, executable: Path,
                                                                           kind: str) -> None:
    """A service does not inherit the installing shell's environment: the secrets the config keeps there
    (url_env, api_key_env) are named, with where the service would read them, so the daemon does not fail its
    config check at every start."""
    config = tmp_path / "c.toml"
    config.write_text('[gateway]\napi_key_env = "GW_KEY"\n[[alerts.webhook]]\nname = "chat"\nformat = "slack"\n'
                      'url_env = "SLACK_WEBHOOK_URL"\n')
    plan = install(kind, dry_run=True, config_path=config, state_dir=tmp_path / "state", max_stop_grace_s=60,
                   executable=executable, unit_dir=tmp_path / "units", uid=501)
    note = next((n for n in plan.notes if "SLACK_WEBHOOK_URL" in n), None)
    assert note is not None and "GW_KEY" in note, plan.notes
    assert ("EnvironmentVariables" if kind == "launchd" else "systemctl --user edit") in note
