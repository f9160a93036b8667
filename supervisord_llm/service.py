"""Run the daemon itself as a service: render and install a launchd agent or a systemd user unit.

The systemd unit template lives in ``supervisord_llm/templates/systemd.service``; the launchd
agent is built as data and written with ``plistlib``. Both are filled with real, absolute paths. Both units restart the daemon
no sooner than 60 s after it exits, and give it longer to stop than the longest engine grace
period, because the daemon stops its engines gracefully before it exits.

Installing writes one file into the user's own agent/unit directory and returns the commands
that load it; it never runs ``sudo`` and never runs the commands itself (``llmctl service
install`` shows them, and runs them when asked).
"""

from __future__ import annotations

import math
import os
import plistlib
import shlex
import shutil
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

KINDS = ("launchd", "systemd")
LAUNCHD_LABEL = "com.supervisord-llm"
SYSTEMD_WANTED_BY = "default.target"  # the [Install] target of templates/systemd.service
SYSTEMD_UNIT = "supervisord-llm.service"
EXECUTABLE_NAME = "supervisord-llm"

# The same floor as the daemon's own restart policy: never respawn sooner than a minute.
THROTTLE_INTERVAL_S = 60
RESTART_S = 60
WATCHDOG_S = 60
START_TIMEOUT_S = 120
ABORT_TIMEOUT_S = 10
# After the last engine's grace the daemon still measures memory, writes state and exits.
STOP_MARGIN_S = 30

CONFIG_ENV = "SUPERVISORD_LLM_CONFIG"
STATE_DIR_ENV = "SUPERVISORD_LLM_STATE_DIR"


def stop_timeout_s(max_stop_grace_s: float) -> int:
    """Seconds the service manager must wait before SIGKILL: the longest engine grace plus a margin."""
    if max_stop_grace_s < 0 or math.isnan(max_stop_grace_s):
        raise ValueError(f"max_stop_grace_s must be a non-negative number of seconds, got {max_stop_grace_s!r}")
    return math.ceil(max_stop_grace_s + STOP_MARGIN_S)


def find_executable(name: str = EXECUTABLE_NAME) -> Path:
    """The ``supervisord-llm`` console script: next to this Python first (a venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which(name)
    if found:
        return Path(found).absolute()
    raise FileNotFoundError(
        f"cannot find the {name} executable next to {sys.executable} or on PATH; "
        "install the package into this environment (pip install -e .) or pass the executable's path"
    )


def _template(name: str) -> string.Template:
    return string.Template(resources.files("supervisord_llm").joinpath("templates", name).read_text())


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().absolute()


def _one_line(what: str, value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"{what} must be one line without NUL, got {value!r}")
    return value


def default_path_env(executable: Path) -> str:
    """The installing shell's PATH with the executable's directory first (deduplicated)."""
    parts = [str(executable.parent)] + os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin").split(os.pathsep)
    seen: list[str] = []
    for part in parts:
        if part and part not in seen:
            seen.append(part)
    return os.pathsep.join(seen)


def _environment(config_path: Path, state_dir: Path, path_env: str) -> dict[str, str]:
    return {
        CONFIG_ENV: str(config_path),
        STATE_DIR_ENV: str(state_dir),
        "PATH": path_env,
        "PYTHONUNBUFFERED": "1",
    }


def render_launchd(*, executable: str | os.PathLike[str], config_path: str | os.PathLike[str],
                   state_dir: str | os.PathLike[str], max_stop_grace_s: float,
                   log_dir: str | os.PathLike[str] | None = None, path_env: str | None = None,
                   label: str = LAUNCHD_LABEL) -> str:
    """The launchd agent plist (XML) for ``executable run --config CONFIG``."""
    executable, config_path, state_dir = _absolute(executable), _absolute(config_path), _absolute(state_dir)
    logs = _absolute(log_dir) if log_dir is not None else state_dir / "logs"
    path_env = path_env if path_env is not None else default_path_env(executable)
    arguments = [str(executable), "run", "--config", str(config_path)]
    environment = _environment(config_path, state_dir, path_env)

    for value in (label, *arguments, *environment.values()):
        _one_line("a launchd value", value)
    # Built as data and written by plistlib: no hand-kept XML to escape. Why each key is there is
    # in units/README.md (a plist written by plistlib carries no comments).
    plist = {
        "Label": label,
        "ProgramArguments": arguments,
        # launchd starts jobs with PATH=/usr/bin:/bin:/usr/sbin:/sbin: engines installed with
        # Homebrew or pip would not be found without the installing shell's PATH.
        "EnvironmentVariables": environment,
        "RunAtLoad": True,
        "KeepAlive": True,
        # Never respawn sooner than this: a crash loop that restarts at once is how a Metal OOM
        # turned into a machine that needed a reboot.
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        # SIGKILL comes this long after SIGTERM: the longest engine grace plus a margin.
        "ExitTimeOut": stop_timeout_s(max_stop_grace_s),
        "ProcessType": "Interactive",
        "StandardOutPath": str(logs / "daemon.out.log"),
        "StandardErrorPath": str(logs / "daemon.err.log"),
    }
    return plistlib.dumps(plist, sort_keys=False).decode()


_SYSTEMD_PLAIN = set(string.ascii_letters + string.digits + "/_.,:=+@-")


def systemd_word(value: str, *, in_exec: bool = True) -> str:
    """One argument of ``ExecStart=``/``Environment=``, quoted and escaped as systemd parses it.

    ``%`` starts a specifier and ``$`` an environment reference in ``ExecStart=``; both are doubled.
    """
    _one_line("a systemd value", value)
    escaped = value.replace("%", "%%")
    if in_exec:
        escaped = escaped.replace("$", "$$")
    if value and all(c in _SYSTEMD_PLAIN for c in value):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_systemd(*, executable: str | os.PathLike[str], config_path: str | os.PathLike[str],
                   state_dir: str | os.PathLike[str], max_stop_grace_s: float,
                   path_env: str | None = None) -> str:
    """The systemd user unit (``Type=notify``, watchdog, restart floor, long stop timeout)."""
    executable, config_path, state_dir = _absolute(executable), _absolute(config_path), _absolute(state_dir)
    path_env = path_env if path_env is not None else default_path_env(executable)
    arguments = [str(executable), "run", "--config", str(config_path)]
    environment = _environment(config_path, state_dir, path_env)
    return _template("systemd.service").substitute(
        unit_name=SYSTEMD_UNIT,
        exec_start=" ".join(systemd_word(a) for a in arguments),
        environment=" ".join(systemd_word(f"{k}={v}", in_exec=False) for k, v in environment.items()),
        watchdog_s=WATCHDOG_S,
        restart_s=RESTART_S,
        start_timeout_s=START_TIMEOUT_S,
        stop_timeout_s=stop_timeout_s(max_stop_grace_s),
        abort_timeout_s=ABORT_TIMEOUT_S,
    )


def default_unit_dir(kind: str) -> Path:
    """``~/Library/LaunchAgents`` for launchd; ``$XDG_CONFIG_HOME/systemd/user`` for systemd."""
    _check_kind(kind)
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents"
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def default_kind() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown service kind {kind!r}; expected one of {', '.join(KINDS)}")


def unit_file_name(kind: str, label: str = LAUNCHD_LABEL) -> str:
    _check_kind(kind)
    return f"{label}.plist" if kind == "launchd" else SYSTEMD_UNIT


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """What (un)installing did or would do: the unit file, its text, and the commands to run next."""

    kind: str
    path: Path
    content: str | None  # the unit text (None for uninstall)
    dry_run: bool
    changed: bool  # the file was written/removed (always False for a dry run)
    commands: tuple[tuple[str, ...], ...]
    made_dirs: tuple[Path, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def shell(self) -> str:
        """The commands as one shell line, for people to read or paste."""
        return " && ".join(shlex.join(command) for command in self.commands)


def _load_commands(kind: str, path: Path, label: str, uid: int, replacing: bool) -> tuple[tuple[str, ...], ...]:
    if kind == "launchd":
        domain = f"gui/{uid}"
        bootstrap = ("launchctl", "bootstrap", domain, str(path))
        return ((("launchctl", "bootout", f"{domain}/{label}"),) if replacing else ()) + (bootstrap,)
    reload = ("systemctl", "--user", "daemon-reload")
    if replacing:
        return (reload, ("systemctl", "--user", "enable", SYSTEMD_UNIT),
                ("systemctl", "--user", "restart", SYSTEMD_UNIT))
    return (reload, ("systemctl", "--user", "enable", "--now", SYSTEMD_UNIT))


def _write_atomically(path: Path, content: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", encoding="utf-8") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(temp, 0o644)
    os.replace(temp, path)


def install(kind: str, dry_run: bool = False, *, config_path: str | os.PathLike[str],
            state_dir: str | os.PathLike[str], max_stop_grace_s: float,
            executable: str | os.PathLike[str] | None = None, unit_dir: str | os.PathLike[str] | None = None,
            log_dir: str | os.PathLike[str] | None = None, path_env: str | None = None,
            label: str = LAUNCHD_LABEL, uid: int | None = None) -> ServicePlan:
    """Render the unit for ``kind`` and write it into the user's unit dir (not with ``dry_run``).

    Returns the plan: the path, the text, and the commands that load it (not run here). A
    dry run touches nothing on disk.
    """
    _check_kind(kind)
    executable_path = _absolute(executable) if executable is not None else find_executable()
    unit_path = _absolute(unit_dir or default_unit_dir(kind)) / unit_file_name(kind, label)
    notes: list[str] = []
    if not _absolute(config_path).is_file():
        notes.append(f"the config file {_absolute(config_path)} does not exist yet; the daemon will not start without it")
    names = environment_names(_absolute(config_path))
    if names:
        listed = ", ".join(names)
        where = (f"add them under EnvironmentVariables in {unit_path} (or `launchctl setenv NAME VALUE` before "
                 f"loading it)" if kind == "launchd" else
                 f"add them with `systemctl --user edit {SYSTEMD_UNIT}` ([Service] Environment=NAME=VALUE lines, "
                 "or EnvironmentFile= a file only you can read)")
        notes.append(f"the config reads {listed} from the environment, which a service does not inherit from your "
                     f"shell: {where}, or the daemon stops at start naming the first one missing")
    logs = _absolute(log_dir) if log_dir is not None else _absolute(state_dir) / "logs"
    if kind == "launchd":
        content = render_launchd(executable=executable_path, config_path=config_path, state_dir=state_dir,
                                 max_stop_grace_s=max_stop_grace_s, log_dir=logs, path_env=path_env, label=label)
    else:
        content = render_systemd(executable=executable_path, config_path=config_path, state_dir=state_dir,
                                 max_stop_grace_s=max_stop_grace_s, path_env=path_env)
        notes.append(f"user services stop at logout; to keep it running: loginctl enable-linger {_user_name()}")
    replacing = unit_path.exists()
    commands = _load_commands(kind, unit_path, label, os.getuid() if uid is None else uid, replacing)
    # launchd does not create the directory of StandardOutPath; the job would fail to start.
    wanted_dirs = [unit_path.parent] + ([logs] if kind == "launchd" else [])
    missing = tuple(d for d in wanted_dirs if not d.exists())
    if dry_run:
        return ServicePlan(kind, unit_path, content, True, False, commands, missing, tuple(notes))
    for directory in missing:
        directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(unit_path, content)
    return ServicePlan(kind, unit_path, content, False, True, commands, missing, tuple(notes))


def uninstall(kind: str, dry_run: bool = False, *, unit_dir: str | os.PathLike[str] | None = None,
              label: str = LAUNCHD_LABEL, uid: int | None = None) -> ServicePlan:
    """Remove the unit file, and for systemd its enablement link (``default.target.wants``), not with ``dry_run``;
    the plan's commands, run after it, stop the service and unload it. They work without the file (which
    ``systemctl disable`` would not): ``launchctl bootout`` by label; ``systemctl stop`` of the unit still loaded,
    then a ``daemon-reload`` that forgets it."""
    _check_kind(kind)
    unit_path = _absolute(unit_dir or default_unit_dir(kind)) / unit_file_name(kind, label)
    links: tuple[Path, ...] = ()
    if kind == "launchd":
        commands: tuple[tuple[str, ...], ...] = (
            ("launchctl", "bootout", f"gui/{os.getuid() if uid is None else uid}/{label}"),)
    else:
        link = unit_path.parent / f"{SYSTEMD_WANTED_BY}.wants" / unit_path.name
        links = (link,) if link.is_symlink() else ()
        commands = (("systemctl", "--user", "stop", SYSTEMD_UNIT), ("systemctl", "--user", "daemon-reload"))
    exists = unit_path.exists()
    notes = () if exists else (f"{unit_path} is not installed: nothing to remove",)
    if dry_run or not (exists or links):
        return ServicePlan(kind, unit_path, None, dry_run, False, commands if exists else (), (), notes)
    for link in links:  # also a link left behind by a unit file removed by hand
        link.unlink()
    if not exists:
        return ServicePlan(kind, unit_path, None, False, False, commands, (), notes)
    unit_path.unlink()
    return ServicePlan(kind, unit_path, None, False, True, commands, (), notes)


def environment_names(config_path: Path) -> list[str]:
    """The environment variables a config reads its secrets from (every ``*_env`` key: api_key_env,
    url_env, secret_env, ...), in the order they appear; none where the file cannot be read."""
    import tomllib

    try:
        document = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and key.endswith("_env") and isinstance(item, str) and item not in names:
                    names.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    return names


def _user_name() -> str:
    """This user's login name (``loginctl`` takes a name or a uid): the password database's, else $USER."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())


def example_units(paths: Mapping[str, str] | None = None) -> dict[str, str]:
    """The example units shipped in ``units/``, rendered with placeholder paths of a typical user."""
    p = dict(EXAMPLE_PATHS, **(paths or {}))
    return {
        "com.supervisord-llm.plist": render_launchd(
            executable=p["mac_executable"], config_path=p["mac_config"], state_dir=p["mac_state_dir"],
            max_stop_grace_s=float(p["max_stop_grace_s"]), log_dir=p["mac_log_dir"], path_env=p["mac_path"]),
        "supervisord-llm.service": render_systemd(
            executable=p["linux_executable"], config_path=p["linux_config"], state_dir=p["linux_state_dir"],
            max_stop_grace_s=float(p["max_stop_grace_s"]), path_env=p["linux_path"]),
    }


EXAMPLE_PATHS: dict[str, str] = {
    "max_stop_grace_s": "120",
    "mac_executable": "/Users/you/supervisord-llm/.venv/bin/supervisord-llm",
    "mac_config": "/Users/you/Library/Application Support/supervisord-llm/config.toml",
    "mac_state_dir": "/Users/you/Library/Application Support/supervisord-llm/state",
    "mac_log_dir": "/Users/you/Library/Logs/supervisord-llm",
    "mac_path": "/Users/you/supervisord-llm/.venv/bin:/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "linux_executable": "/home/you/supervisord-llm/.venv/bin/supervisord-llm",
    "linux_config": "/home/you/.config/supervisord-llm/config.toml",
    "linux_state_dir": "/home/you/.local/state/supervisord-llm",
    "linux_path": "/home/you/supervisord-llm/.venv/bin:/usr/local/bin:/usr/bin:/bin",
}


def _print_examples(directory: Sequence[str]) -> None:
    target = Path(directory[0]) if directory else Path("units")
    for name, text in example_units().items():
        (target / name).write_text(text)
        print(target / name)


if __name__ == "__main__":  # regenerate the examples in units/: python -m supervisord_llm.service units
    _print_examples(sys.argv[1:])
