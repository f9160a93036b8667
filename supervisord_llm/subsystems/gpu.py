"""NVIDIA GPUs for the daemon: readings, per-engine GPU memory, orphans, XID events.

Room: subsystems.

The sensing is ``probes.nvml`` (one reading of every device, the XID watcher thread); the XID
decisions are ``policies.reboot.decide_xid``. This module runs them for the daemon:

* every ``probes.interval`` it reads NVML in a worker thread and maps each process that holds GPU
  memory to the engine whose process tree it belongs to (status ``system.gpus``, ``memory.gpu_bytes``);
* it gives memory admission the free memory of each device (``gpu_free_bytes``);
* before every start it frees GPU memory held by processes of ours that no engine accounts for
  (an orphaned grandchild that escaped its engine's session), and waits, bounded, until NVML shows
  the memory of engines that exited as released: a new model never loads next to an old one's
  leftovers;
* XID events become actions: engines on a device that needs a reset are stopped (with the policy's
  grace) and a person is alerted; a GPU that fell off the bus (XID 79) takes the reboot path of the
  reboot escalation if the daemon runs one, otherwise it is announced (event ``gpu.reboot_required``
  and an alert);
* a GPU seen before that NVML no longer answers for is lost (``policies.reboot.gpu_lost_cause``,
  ``decide_gpu_lost``) and takes the same path as XID 79: at once when NVML says "GPU is lost", after
  ``lost_after_s`` of silence otherwise (a driver that answers late once is not a lost GPU), and never
  on a reading that failed as a whole with another error (NVML timing out, or unable to count devices);
* the ``gpu.lost`` and ``gpu.reset_required`` alert episodes, also those an earlier daemon opened,
  end on evidence from the readings that the GPU is back (``policies.reboot.gpu_episodes_over``):
  it answers NVML again, an engine serves from it, or (after a reset was required) it answers in a
  later boot;
* at the daemon's own start, the GPU memory of orphans from an earlier run (killed by the daemon) is
  waited for, bounded, before any engine starts (``gpu_orphans_at_start``, ``wait_orphans_released``).

Without NVML (a Mac, a CPU-only box, no driver) the extension emits one ``probe.unavailable`` event
and does nothing else: that is a normal machine, not an error.

NVML reports host pids. Inside a container without the host pid namespace they do not match the
processes the daemon sees, so GPU memory cannot be attributed to engines there.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import psutil
from anyio.from_thread import BlockingPortal

from policies.actions import Alert
from policies.reboot import (
    GPU_LOST,
    GPU_RESET_REQUIRED,
    NVML_FAILING_KEY,
    GpuAnswer,
    RebootLedger,
    RebootSettings,
    RebootState,
    decide_gpu_lost,
    decide_xid,
    gpu_episodes_over,
    gpu_lost_cause,
    is_reboot_step,
    nvml_failing_alert,
    reboot_needed,
)
from probes.nvml import NvmlProbe, XidWatcher, gpu_bytes_for_pids
from probes.readings import GpuReading, XidEvent
from supervisord_llm.engine.process import TAG_ENV, tree_of, wait_gone
from supervisord_llm.errors import MemoryNotReturned
from supervisord_llm.extension import Extension
from supervisord_llm.subsystems.stranded import boot_id as this_boot_id

if TYPE_CHECKING:
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.engine.supervisor import EngineSupervisor

__all__ = ["GpuExtension", "OrphanCandidate", "find_gpu_orphans", "owners_of_pids"]


@dataclass(frozen=True, slots=True)
class OrphanCandidate:
    """A process holding GPU memory that carries this daemon's tag but belongs to no live engine."""

    pid: int
    used_bytes: int
    tag: str


@dataclass(slots=True)
class _SeenDevice:
    """A GPU that answered NVML at least once; ``missing_since_s`` is set while it does not."""

    index: int
    name: str
    missing_since_s: float | None = None
    lost: bool = False


@dataclass(slots=True)
class _Departed:
    """A pid of an engine that exited, watched until NVML no longer lists it."""

    engine: str
    used_bytes: int
    since_s: float


def held_bytes_by_pid(reading: GpuReading | None, devices: Iterable[int] | None = None) -> dict[int, int]:
    """GPU memory per pid, summed over ``devices`` (default: all; a process on two GPUs counts on both)."""
    out: dict[int, int] = {}
    if reading is None or not reading.available:
        return out
    wanted = None if devices is None else set(devices)
    for device in reading.devices:
        if wanted is not None and device.index not in wanted:
            continue
        for proc in device.processes:
            out[proc.pid] = out.get(proc.pid, 0) + proc.used_bytes
    return out


def owners_of_pids(trees: Mapping[str, Iterable[int]]) -> dict[int, str]:
    """``{pid: engine}`` from each engine's process tree; a pid claimed twice stays with the first engine."""
    owners: dict[int, str] = {}
    for engine, pids in trees.items():
        for pid in pids:
            owners.setdefault(pid, engine)
    return owners


def find_gpu_orphans(reading: GpuReading, live_pids: Iterable[int], tag_prefix: str,
                     environ_tag: Any = None) -> list[OrphanCandidate]:
    """Processes listed by NVML whose tag starts with ``tag_prefix`` and that no live tree accounts for.

    ``environ_tag(pid) -> str | None`` reads a process's ``SUPERVISORD_LLM_TAG`` (default: psutil);
    None means the process is gone or not ours to read. Blocking (psutil).
    """
    read_tag = environ_tag or _environ_tag
    live = set(live_pids)
    me = os.getpid()
    out = []
    for pid, used in sorted(held_bytes_by_pid(reading).items()):
        if pid in live or pid == me:
            continue
        tag = read_tag(pid)
        if tag and tag.startswith(tag_prefix):
            out.append(OrphanCandidate(pid=pid, used_bytes=used, tag=tag))
    return out


def _environ_tag(pid: int) -> str | None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.environ().get(TAG_ENV)
    except (psutil.Error, OSError):
        return None


def _tree_pids(root_pid: int) -> list[int]:
    return [p.pid for p in tree_of(root_pid)]


_DEVICE_PROBLEM_RE = re.compile(r"^device (\d+): (.*)$")


def device_errors(reading: GpuReading) -> dict[int, str]:
    """What NVML said for each device it failed to read, ``{index: error}``; index -1: the whole reading."""
    if not reading.available:
        return {-1: reading.reason or "NVML did not answer"}
    out: dict[int, str] = {}
    for part in (reading.reason or "").split("; "):
        match = _DEVICE_PROBLEM_RE.match(part)
        if match:
            out[int(match.group(1))] = match.group(2)
    return out


class GpuExtension(Extension):
    """The daemon's NVIDIA subsystem (see the module docstring). Hooks are those of ``extensions``."""

    name = "gpu"

    def __init__(self, daemon: Daemon, *, nvml_module: Any | None = None, first_read_timeout_s: float = 10.0,
                 orphan_grace_s: float = 3.0, release_poll_s: float = 0.1, xid_wait_timeout_ms: int = 500,
                 stop_grace_s: float = 30.0, lost_after_s: float = 10.0, boot_id: str | None = None) -> None:
        if orphan_grace_s < 0 or release_poll_s <= 0 or first_read_timeout_s <= 0:
            raise ValueError("GpuExtension: orphan_grace_s must be >= 0 s, release_poll_s and first_read_timeout_s "
                             f"> 0 s; got {orphan_grace_s!r}, {release_poll_s!r}, {first_read_timeout_s!r}")
        if stop_grace_s < 0 or lost_after_s <= 0:
            raise ValueError("GpuExtension: stop_grace_s must be >= 0 s and lost_after_s > 0 s; "
                             f"got {stop_grace_s!r}, {lost_after_s!r}")
        self.daemon = daemon
        self.probe = NvmlProbe(nvml_module)
        self.first_read_timeout_s = first_read_timeout_s
        # An orphan serves no engine any more; it only holds memory the next start needs, and on
        # NVIDIA a SIGKILL gives device memory back (unlike a wedged Metal process), so its grace is short.
        self.orphan_grace_s = orphan_grace_s
        self.release_poll_s = release_poll_s
        self.xid_wait_timeout_ms = xid_wait_timeout_ms
        # Engines on a GPU that needs a reset or is gone are stopped with this grace (the policy's
        # Stop.grace_s), not their own: a long Metal-style grace only keeps a broken GPU busy.
        self.stop_grace_s = stop_grace_s
        self.lost_after_s = lost_after_s
        self._nvml_failing_since_s: float | None = None  # every reading has failed since (None: NVML answers)
        self._nvml_failing_raised: bool | None = None  # None: not yet read from the alert outbox
        self.reading: GpuReading | None = None
        self.available = False
        self.unavailable_reason: str | None = None
        self.failing: str | None = None  # the problem of the last reading, while it lasts
        self.watcher: XidWatcher | None = None
        self.xid_events: deque[XidEvent] = deque(maxlen=20)
        self.xid_count = 0
        self._owners: dict[int, str] = {}
        self._departed: dict[int, _Departed] = {}
        self._held_seen: dict[int, int] = {}
        # Engines holding memory on each device in the last reading that listed it: a device that
        # disappears from NVML keeps the holders it had, so its engines are still found.
        self._holders: dict[int, frozenset[str]] = {}
        self._seen: dict[str, _SeenDevice] = {}  # by uuid: indexes can shift when a device vanishes
        self._acted_lost: set[int] = set()  # devices whose loss (XID 79 or silence) was acted on
        # GPUs (uuid) answering NVML that this daemon had not seen answer until the latest reading: new to
        # it, or back after it lost them. Evidence for the end of their episodes; taken by _end_gpu_episodes.
        self._answering_again: set[str] = set()
        # This boot, written into a GPU's episodes: a later boot's reading of the GPU ends a reset_required one.
        self.boot_id = boot_id or this_boot_id()
        self._portal: BlockingPortal | None = None
        # The XID policy's own reboot state; the reboot itself belongs to the reboot escalation.
        self._reboot_state = RebootState()

    # ---- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        daemon = self.daemon
        reading: GpuReading | None = None
        with anyio.move_on_after(self.first_read_timeout_s):
            reading = await anyio.to_thread.run_sync(self._poll_blocking, self._live_roots(),
                                                     abandon_on_cancel=True)
        if reading is None or not reading.available:
            self.unavailable_reason = (reading.reason if reading is not None else
                                       f"NVML did not answer within {self.first_read_timeout_s:.0f}s")
            daemon.events.emit("probe.unavailable", probe="nvml", reason=self.unavailable_reason)
            task_status.started()
            return
        self.available = True
        self._newly_lost(reading)  # nothing seen yet: notes every device, each one new to this daemon
        self._end_gpu_episodes(reading)  # episodes an earlier daemon left open, e.g. before a reboot
        async with BlockingPortal() as portal:
            self._portal = portal
            self.watcher = XidWatcher(self.probe.module, self._on_xid_from_thread,
                                      wait_timeout_ms=self.xid_wait_timeout_ms, clock=daemon.clock.now)
            watching = await anyio.to_thread.run_sync(self.watcher.start)
            if not watching:
                daemon.events.emit("probe.unavailable", probe="xid", reason=self.watcher.reason)
            daemon.events.emit("gpu.probe_started", devices=[{"index": d.index, "name": d.name, "uuid": d.uuid,
                                                              "total_bytes": d.total_bytes} for d in reading.devices],
                               xid_devices=list(self.watcher.registered_devices))
            task_status.started()
            try:
                while True:
                    await anyio.sleep(daemon.config.probes.interval_s)
                    try:
                        await self.poll()
                    except Exception as exc:  # a probe bug must not take the daemon down
                        daemon.log.exception("gpu.poll_failed", error=str(exc))
            finally:
                with anyio.CancelScope(shield=True):
                    watcher = self.watcher
                    await anyio.to_thread.run_sync(watcher.stop)
                    await anyio.to_thread.run_sync(self.probe.close)
                    self._portal = None

    def _live_roots(self) -> dict[str, int]:
        """Engines with a running process, ``{engine: root pid}`` (read on the loop)."""
        return {sup.name: sup.proc.pid for sup in self.daemon.supervisors.values()
                if sup.proc is not None and sup.proc.running}

    def _poll_blocking(self, roots: Mapping[str, int]) -> GpuReading:
        """One NVML reading and the engines' current trees (worker thread)."""
        reading = self.probe.read(self.daemon.clock.now())
        owners = owners_of_pids({name: _tree_pids(pid) for name, pid in roots.items()})
        # The most each engine pid was seen holding: a reading taken while a killed process is being
        # torn down shows only a sliver of what it held, and the release event should name the whole.
        held = held_bytes_by_pid(reading)
        seen = {pid: b for pid, b in self._held_seen.items() if pid in owners or pid in self._departed}
        for pid in owners:
            if pid in held:
                seen[pid] = max(seen.get(pid, 0), held[pid])
        self._held_seen = seen
        holders = dict(self._holders)
        for device in reading.devices:
            holders[device.index] = frozenset(owners[p.pid] for p in device.processes if p.pid in owners)
        self._holders = holders
        self._owners = owners
        self.reading = reading
        return reading

    async def poll(self) -> GpuReading:
        """Read NVML now (worker thread); note failures and recoveries once, settle released memory."""
        reading = await anyio.to_thread.run_sync(self._poll_blocking, self._live_roots())
        events = self.daemon.events
        problem = reading.reason if (not reading.available or reading.reason) else None
        if problem != self.failing:
            if problem is not None:
                events.emit("probe.failed", probe="nvml", error=problem)
            else:
                events.emit("probe.recovered", probe="nvml")
            self.failing = problem
        self._settle(reading)
        now = self.daemon.clock.now()
        if reading.available:
            self._nvml_failing_since_s = None
        elif self._nvml_failing_since_s is None:
            self._nvml_failing_since_s = now
        if self._nvml_failing_raised is None:  # an episode an earlier daemon raised is this one's to resolve
            outbox = self.daemon.alerts_outbox
            self._nvml_failing_raised = outbox is not None and NVML_FAILING_KEY in outbox.open_episode_details()
        alert = nvml_failing_alert(failing_since_s=self._nvml_failing_since_s, now_s=now, error=reading.reason,
                                   devices_seen=len(self._seen), raised=self._nvml_failing_raised)
        if alert is not None:
            self._nvml_failing_raised = not alert.resolved
            self.daemon.apply(alert)
        for seen, cause in self._newly_lost(reading):
            await self.handle_gpu_lost(seen.index, cause)
        self._end_gpu_episodes(reading)
        return reading

    def _newly_lost(self, reading: GpuReading) -> list[tuple[_SeenDevice, str]]:
        """Devices seen before that this reading shows lost; a device back in NVML is noted once."""
        now = self.daemon.clock.now()
        errors = device_errors(reading)
        present = {d.uuid: d for d in reading.devices} if reading.available else {}
        out = []
        for uuid, seen in self._seen.items():
            device = present.get(uuid)
            if device is not None:
                seen.index, seen.name = device.index, device.name
                if seen.lost:
                    self.daemon.events.emit("gpu.device_back", device_index=seen.index, uuid=uuid, name=seen.name,
                                            missing_s=round(now - (seen.missing_since_s or now), 1))
                    self._acted_lost.discard(seen.index)
                    self._answering_again.add(uuid)
                seen.missing_since_s, seen.lost = None, False
                continue
            if seen.missing_since_s is None and reading.available:
                seen.missing_since_s = now  # missed while NVML answered: a failed reading shows nothing of it
            if seen.lost:
                continue
            cause = gpu_lost_cause(
                seen.index, seen.name, lost_after_s=self.lost_after_s, device_error=errors.get(seen.index),
                probe_error=errors.get(-1), missing_s=None if seen.missing_since_s is None else now - seen.missing_since_s)
            if cause is None:
                continue
            if seen.missing_since_s is None:
                seen.missing_since_s = now  # lost on a failed reading: gone from now, for gpu.device_back
            seen.lost = True
            out.append((seen, cause))
        for device in present.values():
            if device.uuid not in self._seen:
                self._seen[device.uuid] = _SeenDevice(device.index, device.name)
                self._answering_again.add(device.uuid)
        return out

    def _end_gpu_episodes(self, reading: GpuReading) -> None:
        """Resolve the open ``gpu.lost``/``gpu.reset_required`` episodes this reading shows over
        (``policies.reboot.gpu_episodes_over``); the outbox keeps an earlier daemon's open episodes too."""
        again, self._answering_again = self._answering_again, set()
        daemon = self.daemon
        outbox = daemon.alerts_outbox
        if outbox is None or not reading.available:
            return
        open_episodes = {key: details for key, details in outbox.open_episode_details().items()
                         if key.partition(":")[0] in (GPU_LOST, GPU_RESET_REQUIRED)}
        if not open_episodes:
            return
        owners = self._owners
        answering = []
        for device in reading.devices:
            serving = sorted({owners[p.pid] for p in device.processes if p.pid in owners
                              and (sup := daemon.supervisors.get(owners[p.pid])) is not None and sup.serving})
            answering.append(GpuAnswer(device.index, device.uuid, device.name, again=device.uuid in again,
                                       serving=tuple(serving)))
        alerts = gpu_episodes_over(open_episodes, answering, self.boot_id)
        if not alerts:
            return
        daemon.events.emit("policy.decided", policy="gpu_episodes", engine=None,
                           decision="resolve " + ",".join(a.key for a in alerts), open_episodes=sorted(open_episodes),
                           answering_again=sorted(again), boot_id=self.boot_id)
        for alert in alerts:
            daemon.apply(alert)

    def _settle(self, reading: GpuReading) -> list[str]:
        """Forget departed pids NVML no longer lists; one event per engine whose memory came back."""
        if not reading.available or not self._departed:
            return []
        held = held_bytes_by_pid(reading)
        now = self.daemon.clock.now()
        released: dict[str, list[tuple[int, _Departed]]] = {}
        for pid, dep in list(self._departed.items()):
            if pid in self._owners:  # the pid now belongs to a live engine (reused): not a leftover
                del self._departed[pid]
                continue
            if pid in held:
                dep.used_bytes = max(dep.used_bytes, held[pid])
                continue
            del self._departed[pid]
            released.setdefault(dep.engine, []).append((pid, dep))
        for engine, items in released.items():
            total = sum(d.used_bytes for _, d in items)
            if total > 0:
                self.daemon.events.emit("gpu.memory_released", engine=engine,
                                        pids=[pid for pid, d in items if d.used_bytes > 0], bytes=total,
                                        after_exit_s=round(max(now - d.since_s for _, d in items), 3))
        return list(released)

    # ---- hooks --------------------------------------------------------------------------------

    def gpu_free_bytes(self) -> dict[int, int] | None:
        """Free memory per device index from the latest reading; None without NVML."""
        if not self.available or self.reading is None or not self.reading.available:
            return None
        return {d.index: d.free_bytes for d in self.reading.devices}

    def engine_gpu_bytes(self, pids: Iterable[int]) -> int | None:
        """GPU memory held by an engine's process tree (all devices); None without NVML."""
        if not self.available or self.reading is None or not self.reading.available:
            return None
        return gpu_bytes_for_pids(self.reading, pids)

    def on_engine_exit(self, sup: EngineSupervisor) -> None:
        """Watch every pid the engine had until NVML shows its memory released."""
        if not self.available:
            return
        pids = {pid for pid, engine in self._owners.items() if engine == sup.name}
        if sup.proc is not None:
            pids.add(sup.proc.pid)
            pids.update(pid for pid, _ in sup.proc.known_descendants)
        held = held_bytes_by_pid(self.reading)
        now = self.daemon.clock.now()
        for pid in pids:
            if pid not in self._departed:
                self._departed[pid] = _Departed(sup.name, max(held.get(pid, 0), self._held_seen.get(pid, 0)), now)

    async def before_start(self, sup: EngineSupervisor) -> None:
        """Free GPU memory of our orphans, then wait (bounded) until departed engines' memory is back.

        Raises MemoryNotReturned when NVML still lists it after ``memory.return_wait``: starting
        then would load a model next to what the old one still holds.
        """
        if not self.available:
            return
        daemon = self.daemon
        prefix = daemon.daemon_id + "/"
        roots = self._live_roots()

        def scan() -> tuple[GpuReading, list[OrphanCandidate]]:
            reading = self._poll_blocking(roots)
            if not reading.available:
                return reading, []
            live: set[int] = set(self._owners)
            for s in daemon.supervisors.values():
                if s.proc is not None and s.proc.running:
                    live.update(pid for pid, _ in s.proc.known_descendants)
            return reading, find_gpu_orphans(reading, live, prefix)

        _, orphans = await anyio.to_thread.run_sync(scan)
        if orphans:
            await self._free_orphans(sup, orphans)
        await self._wait_released(sup)

    async def _free_orphans(self, sup: EngineSupervisor, orphans: list[OrphanCandidate]) -> None:
        daemon = self.daemon
        started = daemon.clock.now()
        grace_s = self.orphan_grace_s

        def kill() -> list[int]:
            procs = []
            for o in orphans:
                try:
                    procs.append(psutil.Process(o.pid))
                except psutil.Error:
                    continue
            for p in procs:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            alive = wait_gone(procs, grace_s)
            sigkilled = []
            for p in alive:
                try:
                    p.kill()
                    sigkilled.append(p.pid)
                except psutil.Error:
                    pass
            wait_gone(alive, 5.0)
            return sigkilled

        sigkilled = await anyio.to_thread.run_sync(kill)
        released = await self._wait_pids_gone({o.pid for o in orphans}, daemon.config.memory.return_wait_s)
        daemon.events.emit("gpu.orphans_freed", engine=sup.name, pids=[o.pid for o in orphans],
                           bytes=sum(o.used_bytes for o in orphans),
                           per_pid={str(o.pid): o.used_bytes for o in orphans},
                           tags=[o.tag for o in orphans], sigkilled=sigkilled, memory_released=released,
                           took_s=round(daemon.clock.now() - started, 3))

    # ---- orphans found at the daemon's start ---------------------------------------------------

    async def gpu_orphans_at_start(self, pids: Iterable[int]) -> list[OrphanCandidate]:
        """Which of ``pids`` (orphans the daemon is about to kill) NVML lists now, with their memory and tag.

        Runs before the poll loop (``run``), so it reads NVML itself; [] without NVML or when none of
        them holds GPU memory. Bounded by ``first_read_timeout_s``.
        """
        wanted = set(pids)

        def scan() -> list[OrphanCandidate]:
            reading = self.probe.read(self.daemon.clock.now())
            held = held_bytes_by_pid(reading)
            return [OrphanCandidate(pid=pid, used_bytes=held[pid], tag=_environ_tag(pid) or "")
                    for pid in sorted(wanted) if pid in held]

        found: list[OrphanCandidate] = []
        with anyio.move_on_after(self.first_read_timeout_s):
            found = await anyio.to_thread.run_sync(scan, abandon_on_cancel=True)
        return found

    async def wait_orphans_released(self, orphans: list[OrphanCandidate], killed_at_s: float) -> bool:
        """After the daemon killed ``orphans`` at its start: wait (``memory.return_wait``) until NVML lists none.

        One ``gpu.orphans_released`` event says how long it took (``took_s`` since the kill began,
        ``waited_s`` of it spent here) and whether the memory came back. Memory still listed then is
        remembered like a departed engine's, so the first start waits for it again and is refused
        (``MemoryNotReturned``) rather than loading a model next to it.
        """
        daemon = self.daemon
        pids = {o.pid for o in orphans}
        started = daemon.clock.now()
        deadline = started + daemon.config.memory.return_wait_s
        still: set[int] = set(pids)
        while True:
            reading: GpuReading | None = None
            with anyio.move_on_after(self.first_read_timeout_s):
                reading = await anyio.to_thread.run_sync(self.probe.read, daemon.clock.now(), abandon_on_cancel=True)
            if reading is None or not reading.available:
                break  # NVML itself failed: the poll loop reports it; nothing here to wait on
            still = pids & set(held_bytes_by_pid(reading))
            if not still or daemon.clock.now() >= deadline:
                break
            await anyio.sleep(self.release_poll_s)
        now = daemon.clock.now()
        released = not still
        daemon.events.emit("gpu.orphans_released", pids=sorted(pids), bytes=sum(o.used_bytes for o in orphans),
                           per_pid={str(o.pid): o.used_bytes for o in orphans}, memory_released=released,
                           still_listed=sorted(still), took_s=round(now - killed_at_s, 3),
                           waited_s=round(now - started, 3))
        for o in orphans:
            if o.pid in still:
                parts = o.tag.split("/")
                engine = parts[1] if len(parts) >= 3 and parts[1] else "orphan"
                self._departed[o.pid] = _Departed(engine, o.used_bytes, killed_at_s)
        return released

    async def _wait_pids_gone(self, pids: set[int], bound_s: float, devices: Iterable[int] | None = None) -> bool:
        """Poll NVML until none of ``pids`` holds memory (on ``devices``); False if they still do after ``bound_s``."""
        deadline = self.daemon.clock.now() + bound_s
        while True:
            reading = self.reading
            if reading is None or not reading.available:
                return True  # nothing to wait on: the probe failure is reported by the poll loop
            if not ((pids - set(self._owners)) & set(held_bytes_by_pid(reading, devices))):
                self._settle(reading)
                return True
            if self.daemon.clock.now() >= deadline:
                return False
            await anyio.sleep(self.release_poll_s)
            await anyio.to_thread.run_sync(self._poll_blocking, self._live_roots())

    async def _wait_released(self, sup: EngineSupervisor) -> None:
        if not self._departed:
            return
        daemon = self.daemon
        bound_s = daemon.config.memory.return_wait_s
        started = daemon.clock.now()
        # Only memory on the devices the engine runs on matters (all devices when it names none):
        # a GPU that fell off the bus elsewhere must not block engines on healthy GPUs.
        devices = sup.config.gpu_devices or None
        if await self._wait_pids_gone(set(self._departed), bound_s, devices):
            return
        held = held_bytes_by_pid(self.reading, devices)
        stuck = {pid: d for pid, d in self._departed.items() if pid in held}
        short = sum(held[pid] for pid in stuck)
        msg = (f"GPU memory of {', '.join(sorted({d.engine for d in stuck.values()}))} "
               f"({short / 1e9:.1f} GB held by pid {', '.join(map(str, sorted(stuck)))}) was not released within "
               f"{bound_s:.0f}s of its exit; not starting {sup.name} next to it. Check `nvidia-smi` for the "
               "process; a GPU reset or reboot frees memory the driver no longer gives back")
        daemon.events.emit("gpu.memory_not_returned", engine=sup.name, pids=sorted(stuck), bytes=short,
                           waited_s=round(daemon.clock.now() - started, 1))
        daemon.apply(Alert(key=f"gpu.memory_not_returned:{sup.name}", severity="critical", summary=msg,
                           details={"pids": sorted(stuck), "bytes": short}))
        raise MemoryNotReturned(sup.name, msg)

    # ---- XID ----------------------------------------------------------------------------------

    def _on_xid_from_thread(self, event: XidEvent) -> None:
        """Runs in the watcher thread: hand the event to the loop without waiting for it to be handled."""
        portal = self._portal
        if portal is None:
            raise RuntimeError("XID event after the GPU subsystem stopped")
        portal.start_task_soon(self.handle_xid, event)

    def engines_on_device(self, index: int) -> list[str]:
        """Resident engines configured on GPU ``index`` or holding memory on it (any GPU for index -1)."""
        holders: set[str] = set()
        for device_index, names in self._holders.items():
            if index < 0 or device_index == index:
                holders.update(names)
        out = []
        for sup in self.daemon.supervisors.values():
            if not sup.resident:
                continue
            configured = bool(sup.config.gpu_devices) if index < 0 else index in sup.config.gpu_devices
            if configured or sup.name in holders:
                out.append(sup.name)
        return out

    def _uuid_of(self, index: int) -> str | None:
        """The uuid of the GPU last seen at ``index`` (a lost one keeps the index it had)."""
        return next((uuid for uuid, seen in self._seen.items() if seen.index == index), None)

    async def handle_xid(self, event: XidEvent) -> None:
        """Carry out what ``decide_xid`` answers for one XID event."""
        try:
            await self._handle_xid(event)
        except Exception as exc:  # the daemon outlives a failure to act; the event says what went wrong
            self.daemon.events.emit("gpu.xid_failed", device_index=event.device_index, xid=event.xid,
                                    error=f"{type(exc).__name__}: {exc}")

    async def _handle_xid(self, event: XidEvent) -> None:
        daemon = self.daemon
        self.xid_events.append(event)
        self.xid_count += 1
        engines = self.engines_on_device(event.device_index)
        daemon.events.emit("gpu.xid", device_index=event.device_index, xid=event.xid, engines=engines)
        if event.xid == 79:
            self._acted_lost.add(event.device_index)  # NVML will then say "GPU is lost": one episode, not two
        # The policy is asked with reboots off: carrying out a reboot belongs to the reboot escalation.
        self._reboot_state, actions = decide_xid(
            event.xid, event.device_index, engines, self._reboot_state, RebootLedger(), RebootSettings(),
            daemon.clock.now(), daemon.clock.wall(), stop_grace_s=self.stop_grace_s,
            uuid=self._uuid_of(event.device_index), boot_id=self.boot_id)
        await self._carry_out(actions, event.device_index, event.xid, _reboot_cause(event))

    async def handle_gpu_lost(self, device_index: int, cause: str) -> None:
        """A GPU NVML no longer answers for: what ``decide_gpu_lost`` answers, as for XID 79 (once per loss)."""
        daemon = self.daemon
        engines = self.engines_on_device(device_index)
        acted = device_index in self._acted_lost
        daemon.events.emit("gpu.lost", device_index=device_index, cause=cause, engines=engines,
                           already_handled=acted)
        if acted:
            return
        self._acted_lost.add(device_index)
        try:
            self._reboot_state, actions = decide_gpu_lost(
                device_index, engines, self._reboot_state, RebootLedger(), RebootSettings(), daemon.clock.now(),
                daemon.clock.wall(), stop_grace_s=self.stop_grace_s, cause=cause,
                uuid=self._uuid_of(device_index), boot_id=self.boot_id)
            await self._carry_out(actions, device_index, None, cause)
        except Exception as exc:  # as for XIDs: the daemon outlives a failure to act, and says so
            daemon.events.emit("gpu.lost_failed", device_index=device_index, error=f"{type(exc).__name__}: {exc}")

    async def _carry_out(self, actions: Iterable[Any], device_index: int, xid: int | None, cause: str) -> None:
        daemon = self.daemon
        actions = tuple(actions)
        for action in actions:
            daemon.decided("xid" if xid is not None else "gpu_lost", getattr(action, "engine", None), action,
                           device_index=device_index, xid=xid, cause=cause)
            if is_reboot_step(action):
                continue  # the reboot escalation takes these (below), once
            try:
                await daemon.execute(action)
            except Exception as exc:  # report; the other actions still run
                daemon.events.emit("gpu.stop_failed", engine=getattr(action, "engine", None), error=str(exc))
        reboot_reason = reboot_needed(actions, cause)
        if reboot_reason is not None:
            self._reboot(reboot_reason, device_index, xid)

    def _reboot(self, reason: str, device_index: int, xid: int | None) -> None:
        daemon = self.daemon
        if daemon.request_reboot(reason):
            return
        daemon.events.emit("gpu.reboot_required", device_index=device_index, xid=xid, reason=reason)
        daemon.apply(Alert(key="reboot.required", severity="critical",
                           summary=f"reboot required ({reason}); this daemon runs no reboot escalation, "
                                   "reboot the machine by hand",
                           details={"device_index": device_index, "xid": xid}))

    # ---- status -------------------------------------------------------------------------------

    def contribute_status(self, doc: dict[str, Any]) -> None:
        system = doc["system"]
        reading = self.reading
        gpus = []
        if self.available and reading is not None and reading.available:
            for d in reading.devices:
                gpus.append({
                    "index": d.index, "name": d.name, "uuid": d.uuid, "total_bytes": d.total_bytes,
                    "used_bytes": d.used_bytes, "free_bytes": d.free_bytes,
                    "utilization_percent": d.utilization_percent,
                    "processes": [{"pid": p.pid, "used_bytes": p.used_bytes, "engine": self._owners.get(p.pid)}
                                  for p in d.processes],
                })
        system["gpus"] = gpus
        watcher = self.watcher
        last = self.xid_events[-1] if self.xid_events else None
        system["gpu_probe"] = {
            "available": self.available,
            "reason": self.unavailable_reason if not self.available else self.failing,
            "xid": {
                "running": bool(watcher and watcher.running),
                "registered_devices": list(watcher.registered_devices) if watcher else [],
                "reason": watcher.reason if watcher else None,
                "last_error": watcher.last_error if watcher else None,
                "events": self.xid_count,
                "last": {"device_index": last.device_index, "xid": last.xid} if last else None,
            },
            "awaiting_release": sorted(self._departed),
            "lost_devices": sorted(d.index for d in self._seen.values() if d.lost),
        }


def _reboot_cause(event: XidEvent) -> str:
    if event.xid == 79:
        return f"GPU {event.device_index} fell off the bus (XID 79)"
    return f"GPU {event.device_index} reported XID {event.xid}"
