"""``llmctl doctor`` on a config: its findings and fixes read as written (no half sentences, no eaten brackets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisord_llm.config import load_config
from supervisord_llm.doctor import check_memory_cap, run_doctor


@pytest.mark.parametrize("kind", ["ollama", "omlx", "command"])
def test_the_memory_cap_fix_is_a_whole_sentence_for_engines_without_a_cap_flag(tmp_path: Path, kind: str) -> None:
    """For an engine with no known cache-cap flag the fix read "or set engine.memory_soft ...": the first half was
    the flag suggestion it does not have."""
    extra = 'command = ["my-server", "--port", "{port}"]\n' if kind == "command" else ""
    path = tmp_path / "config.toml"
    path.write_text(f'[[engine]]\nname = "e"\nkind = "{kind}"\nmodel = "/models/m"\nfootprint = "100GB"\n{extra}')
    config = load_config(path)
    finding = check_memory_cap(config.engines[0], config)
    assert finding.level == "warn"
    assert finding.fix.startswith('set engine.memory_soft / engine.memory_hard (e.g. "110GB" / "130GB"'), finding.fix


def test_the_suggested_watermarks_follow_the_engines_footprint(tmp_path: Path) -> None:
    """A 1 GB engine is not told to set 110 GB / 130 GB watermarks: the example is the guard's factors over its
    footprint."""
    path = tmp_path / "config.toml"
    path.write_text('[[engine]]\nname = "e"\nkind = "ollama"\nmodel = "m"\nfootprint = "1GB"\n')
    config = load_config(path)
    fix = check_memory_cap(config.engines[0], config).fix
    assert '"1.1GB" / "1.3GB"' in fix and "110GB" not in fix, fix


def test_no_nvidia_gpu_is_no_warning_to_install_its_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama.cpp engine on a machine with no NVIDIA GPU (CPU-only, another vendor's): NVML is missing because
    there is nothing for it to see, not because a driver is missing; one whose GPU's driver fails still warns."""
    from supervisord_llm import doctor

    path = tmp_path / "config.toml"
    path.write_text('[[engine]]\nname = "e"\nkind = "llama_cpp"\nmodel = "/m.gguf"\nfootprint = "1GB"\n')
    config = load_config(path)
    present = doctor.nvidia_device_present
    assert present(tmp_path / "dev", tmp_path / "proc") is False
    monkeypatch.setattr(doctor, "nvidia_device_present", lambda: False)
    [finding] = doctor.check_nvml(config)
    if "GPU(s):" not in finding.message:  # (a machine with a working NVIDIA GPU reads it)
        assert finding.level == "ok" and "no NVIDIA GPU" in finding.message, finding
        monkeypatch.setattr(doctor, "nvidia_device_present", lambda: True)
        [finding] = doctor.check_nvml(config)
        assert finding.level == "warn" and "install the NVIDIA driver" in finding.fix, finding


def test_doctor_prints_brackets_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Findings and config errors naming TOML tables keep their brackets ("no [[engine]]" printed as "no []")."""
    monkeypatch.setenv("COLUMNS", "400")  # one finding a line, however long the temporary path
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[probes]\nvm_stat = "/nonexistent/vm_stat"\n'
                    'platform = "darwin"\n')
    run_doctor(str(path))
    out = capsys.readouterr().out
    assert "no [[engine]] configured" in out and "add an [[engine]] table" in out, out

    path.write_text('engine = "mlx"\n')
    assert run_doctor(str(path)) == 2
    out = capsys.readouterr().out
    assert "engine: expected [[engine]] tables" in out, out


def test_doctor_finds_what_would_stop_run_from_listening(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A gateway or metrics port another process holds, or a file where the control socket goes: `run` exits on
    each, and doctor used to report 0 errors."""
    import socket

    notes = tmp_path / "notes.txt"
    notes.write_text("keep\n")
    with socket.socket() as gw, socket.socket() as metrics:
        for s in (gw, metrics):
            s.bind(("127.0.0.1", 0))
            s.listen()
        gw_port, metrics_port = gw.getsockname()[1], metrics.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\ncontrol_socket = "{notes}"\n'
                        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
                        f'[gateway]\nlisten = "127.0.0.1:{gw_port}"\n')
        assert run_doctor(str(path)) == 1
    out = " ".join(capsys.readouterr().out.split())  # as rich wrapped it, unwrapped
    assert f"[gateway] listen: the gateway cannot listen on 127.0.0.1:{gw_port}" in out, out
    assert "[daemon] metrics_listen: the daemon cannot listen on" in out, out
    assert f"[daemon] control_socket: {notes} exists and is not a socket" in out, out
    assert "3 error(s)" in out


@pytest.mark.parametrize("recorded", [True, False])
def test_a_gateway_port_held_by_an_earlier_daemons_gateway_is_no_error(tmp_path: Path, recorded: bool,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """After a daemon died, its gateway process drains on while holding the port; `run` ends it before it listens
    (the one its state file records), so doctor warns instead of reporting an error `run` will not meet. The
    gateway of another daemon (another state dir: not recorded here) is not ended: `run` fails on its port, and
    doctor says so (it said "which run ends")."""
    import json
    import socket
    import subprocess
    import sys

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                               "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)",
                               "supervisord_llm.gateway.worker"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        path = tmp_path / "c.toml"
        path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[gateway]\nlisten = "127.0.0.1:{port}"\n')
        if recorded:
            (tmp_path / "s").mkdir()
            (tmp_path / "s" / "state.json").write_text(json.dumps(
                {"gateway": {"pid": holder.pid, "create_time": psutil.Process(holder.pid).create_time()}}))
        assert run_doctor(str(path)) == (0 if recorded else 1)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    out = " ".join(capsys.readouterr().out.split())
    if recorded:
        assert f"is held by the gateway of an earlier daemon (pid {holder.pid})" in out, out
    else:
        assert "earlier daemon" not in out and f"the gateway cannot listen on 127.0.0.1:{port}" in out, out


def test_an_engine_cwd_that_is_no_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config and doctor passed `cwd = "/nonexistent"`; only the start failed (at once, in backoff)."""
    import sys

    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[[engine]]\nname = "a"\nkind = "command"\n'
                    f'command = ["{sys.executable}", "-c", "pass"]\nport = 1\nfootprint = "1MB"\n'
                    f'cwd = "{tmp_path}/gone"\n')
    assert run_doctor(str(path)) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"engine a: cwd: {tmp_path}/gone is not a directory" in out, out
