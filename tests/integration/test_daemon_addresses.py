"""The daemon's own addresses and names, as a user writes them in the config and on llmctl's command line.

A control socket path that names another file keeps that file; a socket another daemon serves keeps
serving; a port the metrics listener cannot have names its own setting; an engine host that is no
address of this machine is reported as such (not as a busy port); an alias such as ``Qwen/Qwen3-8B``
works with every llmctl command that takes a name.
"""

from __future__ import annotations

import socket

import pytest

from tests.helpers import Daemon, free_port, short_tmpdir, standin_engine_toml


def _exits_with(d: Daemon, timeout_s: float = 30) -> str:
    assert d.proc is not None
    d.proc.wait(timeout_s)
    assert d.proc.returncode == 1, d.stderr()
    return d.stderr()


def test_a_control_socket_path_naming_a_file_keeps_the_file_and_refuses_to_start(daemon_factory) -> None:
    """``control_socket`` set to the config file (a slip of the pen): the daemon used to delete it at start."""
    state = short_tmpdir()
    precious = state / "notes.txt"
    precious.write_text("keep me\n")
    d = daemon_factory(f'[daemon]\ncontrol_socket = "{precious}"\n' + standin_engine_toml("a", free_port()),
                       state_dir=state).start(wait=False)
    err = _exits_with(d)
    assert precious.read_text() == "keep me\n"
    assert "daemon.control_socket" in err and "exists and is not a socket" in err, err
    assert "Traceback" not in err, err


def test_a_socket_another_daemon_serves_is_not_taken_over(daemon_factory) -> None:
    """Two daemons with their own state dirs and one control socket: the second is refused; llmctl still
    reaches the first (it used to lose it to the second)."""
    shared = short_tmpdir() / "ctl.sock"
    first = daemon_factory(f'[daemon]\ncontrol_socket = "{shared}"\n' + standin_engine_toml("a", free_port()))
    first.socket = shared
    first.start()
    second = daemon_factory(f'[daemon]\ncontrol_socket = "{shared}"\n' + standin_engine_toml("b", free_port()))
    second.socket = shared
    second.start(wait=False)
    err = _exits_with(second)
    assert "another daemon listens on" in err and "daemon.control_socket" in err, err
    status = first.llmctl("status")
    assert status.returncode == 0 and "a" in status.stdout, status


def test_a_stale_socket_and_a_missing_directory_are_handled(daemon_factory) -> None:
    """What a killed daemon left (a socket nobody listens on) is replaced; a directory not there yet is made."""
    where = short_tmpdir()
    stale = where / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, never listened on, closed: a dead daemon's leftover
    d = daemon_factory(f'[daemon]\ncontrol_socket = "{stale}"\n' + standin_engine_toml("a", free_port()))
    d.socket = stale
    d.start()
    assert d.llmctl("status").returncode == 0
    nested = where / "run" / "ctl.sock"
    e = daemon_factory(f'[daemon]\ncontrol_socket = "{nested}"\n' + standin_engine_toml("b", free_port()))
    e.socket = nested
    e.start()
    assert e.llmctl("status").returncode == 0


def test_a_taken_metrics_port_names_metrics_listen(daemon_factory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        d = daemon_factory(f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n'
                           + standin_engine_toml("a", free_port())).start(wait=False)
        err = _exits_with(d)
    assert f"the daemon cannot listen on 127.0.0.1:{port}" in err and "[daemon] metrics_listen" in err, err
    assert "[gateway] listen" not in err, err


# TEST-NET-1 (RFC 5737), and a private address: where the network takes every connect (as this machine's
# does for 10.0.0.0/8), an address of another machine seemed to have a local process on the port.
@pytest.mark.parametrize("host", ["192.0.2.1", "10.255.255.1"])
def test_an_engine_host_that_is_no_address_of_this_machine_is_named_not_a_busy_port(daemon_factory,
                                                                                     host: str) -> None:
    d = daemon_factory(standin_engine_toml("a", free_port(), host=host)).start()
    events = d.wait_events(lambda e: e["kind"] == "engine.state_changed" and e.get("engine") == "a"
                           and host in str(e.get("reason", "")), timeout_s=30)
    assert events, d.events()
    reason = events[-1]["reason"]
    assert f"cannot listen on {host}:" in reason and "an address of this machine" in reason, reason
    assert "already in use" not in reason, reason
    doctor = d.llmctl("doctor")
    assert host in doctor.stdout + doctor.stderr and "in use" not in doctor.stdout, doctor.stdout
    # Its failed starts never spawned: a plain restart keeps the backoff as a plain start does (it went ahead,
    # failed again and made the backoff longer); --force overrides it.
    assert d.engine("a")["state"] == "backoff"
    restart = d.llmctl("restart", "a", "--no-wait")
    assert restart.returncode == 1 and "--force" in restart.stderr and "cannot listen" in restart.stderr, restart
    assert d.llmctl("restart", "a", "--force", "--no-wait").returncode == 0


@pytest.mark.parametrize("alias", ["Qwen/Qwen3-8B", "my model", "modèle"])
def test_llmctl_takes_any_alias_a_client_may_send(daemon_factory, alias: str) -> None:
    """``llmctl stop Qwen/Qwen3-8B`` was "no such control operation"; a space or a non-ASCII letter a traceback."""
    d = daemon_factory(standin_engine_toml("a", free_port(), aliases=[alias])).start()
    d.wait_state("a", "ready", 30)
    stopped = d.llmctl("stop", alias)
    assert stopped.returncode == 0, stopped
    assert d.engine("a")["state"] == "stopped"
    logs = d.llmctl("logs", alias, "-n", "5")
    assert logs.returncode == 0 and "Traceback" not in logs.stderr, logs
    started = d.llmctl("start", alias, "--timeout", "30")
    assert started.returncode == 0, started
    assert d.engine("a")["state"] == "ready"
    unknown = d.llmctl("stop", "no such/engine")
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr and "no such engine" in unknown.stderr, unknown
