"""Optional subsystems the daemon carries: each is an object with ``run(task_status)`` and hooks.

Hooks a subsystem may offer (the daemon calls those that exist): ``on_memory(reading)``,
``before_start(sup)`` (async), ``on_engine_ready(sup)``, ``on_engine_exit(sup)``,
``stranded_bytes()``, ``gpu_free_bytes()``, ``engine_gpu_bytes(pids)``, ``contribute_status(doc)``,
``persisted()`` (with a ``name``), ``cancel_reboot()``.
"""

from __future__ import annotations

from typing import Any


def install_extensions(daemon: Any) -> None:
    """Attach the subsystems the config turns on."""
