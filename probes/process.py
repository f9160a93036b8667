"""One engine's process tree: memory, SIGSTOP state, zombie root; and tagged processes anywhere.

Blocking (psutil reads /proc or calls sysctl): the daemon calls these in a worker thread.

An engine can leave processes outside its tree: vLLM's ``VLLM::EngineCore`` or a llama.cpp
runner whose parent died is re-parented to init (or a subreaper) and no longer shows up as a
descendant. The daemon therefore tags every engine it spawns with an environment variable
(``TAG=value``) that children inherit, and :func:`find_tagged_processes` finds them by that tag.
"""

from __future__ import annotations

import os

import psutil

from probes.errors import ProbeError
from probes.footprint import read_tree_phys_footprint_bytes
from probes.readings import ProcessTreeReading

__all__ = ["ProcessGone", "read_process_tree", "find_tagged_processes", "tagged_processes"]

_STOPPED = {psutil.STATUS_STOPPED, getattr(psutil, "STATUS_TRACING_STOP", "tracing-stop")}


class ProcessGone(ProbeError):
    """The root process of the tree no longer exists."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        super().__init__(f"process {pid} does not exist (it exited and was reaped)")


def _status(proc: psutil.Process) -> str | None:
    try:
        return proc.status()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _rss_bytes(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        # A process that exited between listing and reading holds no memory worth counting.
        return 0


def read_process_tree(root_pid: int, at_s: float) -> ProcessTreeReading:
    """RSS summed over ``root_pid`` and all its descendants, whether any of them is stopped, and a zombie root.

    Raises :class:`ProcessGone` when the root does not exist. Descendants that vanish while they are
    read are skipped.
    """
    try:
        root = psutil.Process(root_pid)
        root_status = root.status()
    except psutil.NoSuchProcess as exc:
        raise ProcessGone(root_pid) from exc
    except psutil.AccessDenied as exc:
        raise ProbeError(f"process {root_pid} belongs to another user; cannot read it") from exc
    zombie = root_status == psutil.STATUS_ZOMBIE
    try:
        children = [] if zombie else root.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    pids = [root_pid]
    rss_bytes = _rss_bytes(root) if not zombie else 0
    stopped = root_status in _STOPPED
    for child in children:
        status = _status(child)
        if status is None:
            continue
        pids.append(child.pid)
        rss_bytes += _rss_bytes(child)
        stopped = stopped or status in _STOPPED
    return ProcessTreeReading(
        at_s=at_s,
        root_pid=root_pid,
        pids=tuple(pids),
        rss_bytes=rss_bytes,
        stopped=stopped,
        zombie=zombie,
        phys_footprint_bytes=None if zombie else read_tree_phys_footprint_bytes(pids),
    )


def tagged_processes(tag_env: str, prefix: str) -> dict[int, str]:
    """Live processes whose environment has ``tag_env`` starting with ``prefix``: pid -> tag value.

    Processes of other users (AccessDenied) and those that exit while they are read are skipped;
    zombies are skipped too (they hold no resources and their environment is gone).
    """
    if not tag_env or "=" in tag_env or "\0" in tag_env:
        raise ValueError(f"tag_env {tag_env!r} is not an environment variable name; expected e.g. 'SUPERVISORD_LLM_ENGINE'")
    if not prefix:
        raise ValueError("the tag value must be a non-empty string (an empty tag would match unrelated processes)")
    my_uid = os.getuid() if hasattr(os, "getuid") else None
    me = os.getpid()
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["uids"]):
        if proc.pid == me:
            continue
        try:
            uids = proc.info.get("uids")
            # environ() of another user's process is denied anyway; skipping saves a syscall each.
            if my_uid not in (None, 0) and uids is not None and uids.real != my_uid:
                continue
            tag = proc.environ().get(tag_env)
            if tag is not None and tag.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = tag
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def find_tagged_processes(tag_env: str, value: str) -> list[int]:
    """Pids (sorted) of live processes whose environment has exactly ``tag_env=value``."""
    return sorted(pid for pid, tag in tagged_processes(tag_env, value).items() if tag == value)
