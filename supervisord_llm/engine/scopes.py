"""Engines outside the daemon's kill scope when systemd runs the daemon (room: engine process control).

Under systemd every process a service starts lives in the service's cgroup, and when the daemon
(the main process) dies, systemd kills what is left of that cgroup before it restarts the
service (``KillMode=mixed`` sends SIGKILL to the rest). A daemon crash, a watchdog kill or an
upgrade would then cost every model a reload, which for a 200 GB model is 10-15 minutes.

So, when the daemon runs under systemd, each engine is started in a transient scope unit of its
own, ``supervisord-llm-<engine>-<spawn id>.scope``, through ``systemd-run --scope``: systemd-run
asks the manager for the scope, moves itself into it and then *execs* the engine's keeper
(keeper.py), which forks the engine into the same scope (exit status, pidfd and the
process-group stop work as without systemd). ``systemctl status supervisord-llm-tiny-*.scope``
shows the engine, its memory and its processes; the service's own cgroup holds only the daemon.

Why scopes rather than ``KillMode=process`` on the service: with ``KillMode=process`` the engines
stay in the service's cgroup, so systemd's accounting shows one blob, a stop timeout kills
nothing but the daemon (engines could be left behind silently), and systemd warns about
"left-over processes" at every restart. A scope per engine keeps the unit's kill semantics for
the daemon's own helpers and gives each engine a name in ``systemctl``.

Where the scope cannot be created (no ``systemd-run``, no user bus for a user service), the
daemon logs that once and starts engines as before: they then share the daemon's fate under
systemd (written in units/README.md). ``SUPERVISORD_LLM_ENGINE_SCOPES=0`` turns scopes off.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SCOPES_ENV = "SUPERVISORD_LLM_ENGINE_SCOPES"
UNIT_PREFIX = "supervisord-llm"


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when a systemd service manager started this process (it sets ``INVOCATION_ID``)."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID"))


def is_user_manager(cgroup_text: str) -> bool:
    """A process of a systemd *user* service lives below ``user@<uid>.service`` in the cgroup tree."""
    return re.search(r"/user@\d+\.service/", cgroup_text) is not None


def scope_unit_name(engine: str, spawn_id: str) -> str:
    """``supervisord-llm-<engine>-<spawn id>.scope``, with anything systemd would reject escaped."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", engine)[:64] or "engine"
    return f"{UNIT_PREFIX}-{safe}-{spawn_id}.scope"


@dataclass(frozen=True)
class ScopeLauncher:
    """Wraps an engine's argv in ``systemd-run --scope`` (or leaves it alone when scopes are off)."""

    systemd_run: str | None
    user: bool

    @property
    def enabled(self) -> bool:
        return self.systemd_run is not None

    def wrap(self, argv: Sequence[str], *, engine: str, spawn_id: str) -> list[str]:
        if self.systemd_run is None:
            return list(argv)
        prefix = [self.systemd_run, "--scope", "--quiet", "--collect", f"--unit={scope_unit_name(engine, spawn_id)}",
                  f"--description=supervisord-llm engine {engine}"]
        if self.user:
            prefix.insert(1, "--user")
        return [*prefix, "--", *argv]


_OFF = ScopeLauncher(systemd_run=None, user=False)
_cached: ScopeLauncher | None = None
why_off: str | None = None


def launcher() -> ScopeLauncher:
    """The launcher for this daemon, decided once: scopes only under systemd, and only if one works.

    The check runs ``systemd-run --scope true`` once (tens of milliseconds): a user service
    without a user bus, or a container without systemd, falls back to plain spawning instead of
    failing every engine start.
    """
    global _cached, why_off
    if _cached is not None:
        return _cached
    _cached, why_off = _decide()
    return _cached


def _decide() -> tuple[ScopeLauncher, str | None]:
    if os.environ.get(SCOPES_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return _OFF, f"{SCOPES_ENV} is off"
    if not under_systemd():
        return _OFF, None
    binary = shutil.which("systemd-run")
    if binary is None:
        return _OFF, "systemd-run is not on PATH: engines share the daemon's cgroup"
    try:
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroup = ""
    candidate = ScopeLauncher(systemd_run=binary, user=is_user_manager(cgroup))
    probe = candidate.wrap(["true"], engine="probe", spawn_id=f"{os.getpid()}")
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _OFF, f"systemd-run --scope failed ({exc}): engines share the daemon's cgroup"
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return _OFF, (f"systemd-run --scope failed ({detail[-1] if detail else f'exit {done.returncode}'}): "
                      "engines share the daemon's cgroup")
    return candidate, None
