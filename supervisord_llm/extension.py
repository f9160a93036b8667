"""The typed seam for the daemon's optional subsystems (room: daemon composition).

A subsystem (alerts, gateway, metrics, control API, stranded memory, GPUs) subclasses
:class:`Extension` and overrides only the hooks it needs; every hook has a no-op default, so the
daemon calls each hook on every extension without probing for it, and a type checker and grep
can follow every call. The daemon calls the hooks in the order the extensions were installed.

Hooks (who calls them, and when):

- ``run(task_status)``: the daemon's task group, once, after the engines were adopted.
- ``restore(saved)`` / ``persisted()``: the state file, under the extension's ``name``.
- ``on_memory(reading)``: every system memory reading.
- ``before_start(sup)``: before an engine's admission (may raise ``EngineError`` to refuse).
- ``on_engine_ready(sup)`` / ``on_engine_exit(sup)``: an engine's run began serving / ended.
- ``on_engine_memory(sup, gen, tree, gpu_bytes)``: the watchdog's reading of an engine's memory.
- ``stranded_bytes()`` / ``gpu_free_bytes()`` / ``engine_gpu_bytes(pids)``: readings for admission
  and status.
- ``gpu_orphans_at_start(pids)`` / ``wait_orphans_released(orphans, killed_at_s)``: GPU memory of
  orphans killed at the daemon's start.
- ``contribute_status(doc)``: fill its part of ``llmctl status --json``.
- ``cancel_reboot()`` / ``request_reboot(reason)`` / ``announce_reboot(action)`` / ``run_reboot(action)``:
  the reboot escalation, if this extension runs one (the executor hands it ``EscalateReboot`` and
  ``RunReboot``).
- ``drain(action)``: the memory guard takes a ``Drain`` the executor hands it.

This module imports nothing from the daemon or the supervisor: engines are passed as ``EngineSupervisor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
import anyio.abc

from probes.readings import ProcessTreeReading, SystemMemoryReading

# An engine's supervisor (``supervisord_llm.engine.supervisor.EngineSupervisor``). Not imported: this seam
# sits below the supervisor and the config (subsystems such as the heartbeat are parsed by the
# config), so importing it would close an import cycle; each extension annotates its own hooks.
EngineSupervisor = Any


class Extension:
    """**Protocol:** an optional subsystem of the daemon; every hook defaults to doing nothing."""

    name: str = "extension"

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def restore(self, saved: dict[str, Any]) -> None:
        """What :meth:`persisted` returned before the daemon restarted (``{}`` when nothing)."""

    def persisted(self) -> dict[str, Any] | None:
        """What to keep in the state file under ``name``; None keeps nothing."""
        return None

    def on_memory(self, reading: SystemMemoryReading | None) -> None:
        """A system memory reading (None while the probe fails)."""

    async def requests_settled(self) -> None:
        """Return once every request sent to an engine so far is counted in its in-flight count (the
        gateway's process confirms its notes; bounded). Called before a drain counts them."""

    def requests_in_line(self, engine: str) -> int:
        """Requests in ``engine``'s line that this extension admits (a slot taken, or waiting for one)."""
        return 0

    async def before_start(self, sup: EngineSupervisor) -> None:
        """Before ``sup``'s admission; raise an ``EngineError`` to refuse the start."""

    def on_engine_ready(self, sup: EngineSupervisor) -> None:
        """``sup`` passed its readiness canary."""

    def on_stopped_by_person(self, sup: EngineSupervisor) -> None:
        """A person stopped ``sup`` (``llmctl stop``)."""

    def on_engine_exit(self, sup: EngineSupervisor) -> None:
        """A run of ``sup`` ended (crash or stop)."""

    def on_engine_memory(self, sup: EngineSupervisor, gen: int, tree: ProcessTreeReading,
                         gpu_bytes: int | None) -> None:
        """The watchdog's full reading of ``sup``'s process tree (run ``gen``), every probe interval."""

    def stranded_bytes(self) -> int:
        """Wired memory stranded by a crashed engine (counts against the budget)."""
        return 0

    def gpu_free_bytes(self) -> dict[int, int] | None:
        """Free memory per GPU index; None when this extension does not read GPUs."""
        return None

    def engine_gpu_bytes(self, pids: Iterable[int]) -> int | None:
        """GPU memory held by these pids; None when this extension does not read GPUs."""
        return None

    async def gpu_orphans_at_start(self, pids: Iterable[int]) -> list[Any]:
        """Which of the orphans about to be killed hold GPU memory."""
        return []

    async def wait_orphans_released(self, orphans: list[Any], killed_at_s: float) -> bool:
        """Wait (bounded) until the killed orphans' GPU memory is back; True when it is."""
        return True

    def contribute_status(self, doc: dict[str, Any]) -> None:
        """Fill this extension's part of the status document."""

    def cancel_reboot(self) -> dict[str, Any] | None:
        """Cancel an announced reboot; None when this extension runs no reboot escalation."""
        return None

    def request_reboot(self, reason: str) -> bool:
        """Take the reboot path for ``reason``; False when this extension runs no reboot escalation."""
        return False

    def announce_reboot(self, action: Any) -> bool:
        """Announce the reboot of a ``policies.actions.EscalateReboot``; False when this extension runs
        no reboot escalation."""
        return False

    def run_reboot(self, action: Any) -> bool:
        """Run the reboot of a ``policies.actions.RunReboot``; False when this extension runs no reboot
        escalation."""
        return False

    def drain(self, action: Any) -> bool:
        """Drain the engine of a ``policies.actions.Drain``; False when this extension does not drain."""
        return False


__all__ = ["Extension"]
