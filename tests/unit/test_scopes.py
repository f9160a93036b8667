"""Engine scope units under systemd: when they are used and how an engine's command is wrapped."""

from __future__ import annotations

from supervisord_llm.engine.scopes import ScopeLauncher, is_user_manager, scope_unit_name, under_systemd


def test_under_systemd_only_when_a_manager_started_us() -> None:
    """INVOCATION_ID (set by systemd for every service) is what tells the daemon it runs under systemd."""
    assert under_systemd({"INVOCATION_ID": "0123abcd"})
    assert not under_systemd({})
    assert not under_systemd({"INVOCATION_ID": ""})


def test_user_and_system_managers_are_told_apart_by_the_cgroup() -> None:
    """A user service's scopes need `systemd-run --user`; a system service's must not use it."""
    assert is_user_manager("0::/user.slice/user-1000.slice/user@1000.service/app.slice/supervisord-llm.service\n")
    assert not is_user_manager("0::/system.slice/supervisord-llm.service\n")


def test_scope_names_carry_the_engine_and_escape_what_systemd_rejects() -> None:
    """`systemctl status supervisord-llm-<engine>-*` finds an engine; odd engine names cannot break the unit name."""
    assert scope_unit_name("qwen", "ab12") == "supervisord-llm-qwen-ab12.scope"
    assert scope_unit_name("my model/7b", "ab12") == "supervisord-llm-my_model_7b-ab12.scope"


def test_wrap_execs_the_engine_through_systemd_run_scope() -> None:
    """The engine's argv follows `--`, so the spawned pid is the engine itself after systemd-run execs it."""
    system = ScopeLauncher(systemd_run="/usr/bin/systemd-run", user=False)
    argv = system.wrap(["python", "-m", "mlx_lm.server", "--port", "8080"], engine="tiny", spawn_id="ab12")
    assert argv[:5] == ["/usr/bin/systemd-run", "--scope", "--quiet", "--collect", "--unit=supervisord-llm-tiny-ab12.scope"]
    assert argv[argv.index("--") + 1:] == ["python", "-m", "mlx_lm.server", "--port", "8080"]
    assert "--user" not in argv
    assert ScopeLauncher(systemd_run="/usr/bin/systemd-run", user=True).wrap(["x"], engine="e", spawn_id="1")[1] == "--user"
    assert ScopeLauncher(systemd_run=None, user=False).wrap(["x", "y"], engine="e", spawn_id="1") == ["x", "y"]
