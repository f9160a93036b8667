"""Process control for engines: spawn in an own session, notice exit at once, stop the whole tree.

Room: engine.

Every engine process is started with an environment tag ``SUPERVISORD_LLM_TAG=<daemon id>/<engine>/<spawn id>``
that its descendants inherit. That tag is how the daemon finds grandchildren that moved to their own
process group or session (and so escape ``killpg``), and orphans left by a daemon that was killed.

Exit is noticed without polling: on Linux through a pidfd that becomes readable when the process
exits; for our own children the status is then reaped with ``waitpid``. On macOS a kqueue
``NOTE_EXIT`` filter waits in a worker thread. Only where neither exists does it fall back to
polling.

Every engine is started through a keeper (``keeper.py``): a tiny process that is the engine's parent
for its whole life, outlives the daemon and writes the engine's exit status to
``<state_dir>/exits/<engine>.<pid>.json``. The daemon reads that record when the engine exits, so an
engine adopted after a daemon restart still reports its code or signal. The engine leads its own
session (its pgid is its pid) and the keeper stays outside it: stopping the engine's group never
touches the keeper, and the keeper exits as soon as its engine has.

Stop is SIGTERM to the process group, a long grace, then SIGKILL: a hard kill of a wedged Metal
process can strand wired memory until reboot, while a graceful exit returns it in seconds.

A pid is never signalled on its number alone: once the engine's root has exited and been reaped (or
an adopted engine died while no daemon watched), the kernel may hand that pid to any new process.
Before every signal the create time of the process at that pid is compared with the engine's; the
root itself is signalled through a pidfd opened and then verified, so the check cannot race a reuse.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil

from probes.process import tagged_processes as probe_tagged_processes
from supervisord_llm.engine import keeper as keeper_program
from supervisord_llm.engine import scopes
from supervisord_llm.errors import AddressNotLocal, EngineSpawnFailed
from supervisord_llm.redact import redact_argv

TAG_ENV = keeper_program.TAG_ENV
# How long after the engine's exit its keeper may take to write the record and exit (a loaded
# machine); past that the keeper is killed (its engine is already gone) and the status is unknown.
KEEPER_RECORD_WAIT_S = 10.0
# How long a new keeper may take to start the engine and report its pid.
KEEPER_REPORT_WAIT_S = 30.0


@dataclass(frozen=True)
class ExitInfo:
    code: int | None
    signal: int | None
    at_wall: float
    # Why code and signal are both None, when they are (no parent could read the status).
    unknown_because: str = "process was adopted"

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal_name}"
        if self.code is None:
            return f"exited (status unknown: {self.unknown_because})"
        return f"exited with code {self.code}"


@dataclass(frozen=True)
class StopResult:
    graceful: bool  # the root exited within the grace after SIGTERM
    killed_pids: tuple[int, ...]  # processes that needed SIGKILL (root, group or tagged leftovers)
    duration_s: float


def _findable(program: str, *, env: Mapping[str, str], cwd: str | None) -> bool:
    if os.sep in program:
        return Path(cwd or ".", program).exists()
    return shutil.which(program, path=env.get("PATH")) is not None


def _read_report(fd: int, timeout_s: float) -> str:
    """The keeper's one-line report (``pid N`` or ``error ERRNO MESSAGE``); "" at EOF or timeout."""
    data = b""
    deadline = time.monotonic() + timeout_s
    # A selector (epoll/kqueue), not select(): a busy daemon's descriptors run past FD_SETSIZE (1024).
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _child_of(pid: int, parent_pid: int) -> bool:
    try:
        return psutil.Process(pid).ppid() == parent_pid
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _exec_error(program: str, report: str) -> str:
    """What a failed exec of the engine's program means, in the words the config's author needs."""
    number, _, message = report.partition(" ")
    code = int(number) if number.isdigit() else 0
    if code == errno.ENOENT:
        return f"command not found: {program!r}; install it or fix the engine's command/kind in the config"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied executing {program!r}"
    return f"cannot execute {program!r}: {message or report}"


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def tagged_processes(tag_prefix: str) -> dict[psutil.Process, str]:
    """Every live process whose tag starts with ``tag_prefix`` (same user only), with its tag."""
    found = {}
    for pid, tag in probe_tagged_processes(TAG_ENV, tag_prefix).items():
        try:
            found[psutil.Process(pid)] = tag
        except psutil.Error:
            continue
    return found


OURS, GONE, OTHER = "ours", "gone", "other"


def pid_identity(pid: int, create_time: float) -> str:
    """Whether ``pid`` is still the process that started at ``create_time`` (OURS, a zombie included),
    is free (GONE), or now belongs to another process (OTHER)."""
    try:
        actual = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return GONE
    except psutil.AccessDenied:
        return OTHER  # not ours to signal: engines run as the daemon's user
    return OURS if abs(actual - create_time) <= 0.01 else OTHER


def _pidfd_of(pid: int, create_time: float) -> int | None:
    """A pidfd on the process that started at ``create_time``, or None once it is gone.

    The create time is checked after the pidfd is open: the fd then names that exact process,
    whatever happens to the pid number later.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if pid_identity(pid, create_time) != OURS:
        os.close(pidfd)
        return None
    return pidfd


async def wait_exit(pid: int, create_time: float) -> None:
    """Return once the process that started at ``create_time`` has exited (no polling where the OS
    can tell us: a pidfd on Linux, kqueue on macOS). A zombie counts as exited."""
    if hasattr(os, "pidfd_open"):
        pidfd = _pidfd_of(pid, create_time)
        if pidfd is None:
            return
        try:
            await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return
    if hasattr(select, "kqueue"):
        if pid_identity(pid, create_time) != OURS:
            return
        await anyio.to_thread.run_sync(_kqueue_wait, pid, abandon_on_cancel=True)
        return
    while pid_identity(pid, create_time) == OURS and not _is_zombie(pid):
        await anyio.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kqueue_wait(pid: int) -> None:
    kqueue: Any = select  # kqueue exists only on BSD/macOS, so typeshed hides it when checking for Linux
    kq = kqueue.kqueue()
    try:
        ev = kqueue.kevent(pid, filter=kqueue.KQ_FILTER_PROC, flags=kqueue.KQ_EV_ADD | kqueue.KQ_EV_ONESHOT,
                           fflags=kqueue.KQ_NOTE_EXIT)
        try:
            kq.control([ev], 1, None)
        except ProcessLookupError:
            return
    finally:
        kq.close()


@dataclass
class Keeper:
    """The engine's keeper process (see keeper.py) and where it writes the engine's exit record."""

    pid: int
    create_time: float
    record_path: Path
    popen: subprocess.Popen[bytes] | None  # None when adopted: a previous daemon started it
    lost: bool = False  # it exited (was killed) while its engine still ran: nobody records the status

    def reap(self) -> None:
        """Collect the keeper's own exit status if it is this process's child (no zombie is left)."""
        if self.popen is not None:
            self.popen.poll()
            return
        # Adopted keepers are our children only after the daemon re-executed itself in place.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def kill(self) -> None:
        """SIGKILL the keeper (only ever once its engine is gone), through a verified pidfd."""
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            pidfd = _pidfd_of(self.pid, self.create_time)
            if pidfd is None:
                return
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            finally:
                os.close(pidfd)
        elif pid_identity(self.pid, self.create_time) == OURS:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)


def keeper_argv(argv: Sequence[str], *, exits_dir: Path, engine: str, tag: str, report_fd: int) -> list[str]:
    """The keeper's command line: a bare interpreter (``-I -S``: no site-packages, no environment
    variables of Python's own) running keeper.py, then the engine's argv after ``--``."""
    return [python_executable(), "-I", "-S", keeper_program.__file__, keeper_program.REPORT_FD_FLAG, str(report_fd),
            "--exits", str(exits_dir), "--name", engine, "--tag", tag, "--", *argv]


def find_keeper(pid: int, tag: str | None) -> Keeper | None:
    """The keeper of the running engine ``pid`` (its parent, started for that exact ``tag``; for any
    tag when ``tag`` is None), if alive."""
    try:
        parent = psutil.Process(pid).parent()
        if parent is None:
            return None
        cmdline = parent.cmdline()
        created = parent.create_time()
    except psutil.Error:
        return None
    script = os.path.basename(keeper_program.__file__)
    start = next((i for i, arg in enumerate(cmdline) if os.path.basename(arg) == script), None)
    if start is None or "--" not in cmdline[start:]:
        return None
    head = cmdline[start + 1:cmdline.index("--", start)]
    options = dict(zip(head[0::2], head[1::2], strict=False))
    if (tag is not None and options.get("--tag") != tag) or "--exits" not in options or "--name" not in options:
        return None
    record = Path(options["--exits"]) / keeper_program.record_name(options["--name"], pid)
    return Keeper(pid=parent.pid, create_time=created, record_path=record, popen=None)


def reap_keepers(keepers: Sequence[Keeper], timeout_s: float = KEEPER_RECORD_WAIT_S) -> None:
    """Once their engines are gone: wait (blocking, up to ``timeout_s``) for these keepers to exit,
    reap the ones that are this process's children (no zombie is left; after a re-exec the keepers
    of orphans are), kill the ones that do not end, and remove the exit records they wrote: nobody
    reads them (their engines were orphans this daemon killed, not engines it supervises)."""
    procs: list[psutil.Process] = []
    for keeper in keepers:
        try:
            proc = psutil.Process(keeper.pid)
            if abs(proc.create_time() - keeper.create_time) <= 0.01:
                procs.append(proc)
        except psutil.Error:
            pass
    stuck = {p.pid for p in wait_gone(procs, timeout_s)}
    for keeper in keepers:
        if keeper.pid in stuck:
            keeper.kill()  # its engine is gone: a keeper that cannot finish must not stay behind
    wait_gone([p for p in procs if p.pid in stuck], 5)
    for keeper in keepers:
        keeper.reap()  # wait_gone counts a zombie as gone: one that turned zombie after its last reap
        with contextlib.suppress(OSError):
            keeper.record_path.unlink()


def reap_zombie_children() -> list[int]:
    """Reap this process's children that have already exited (blocking; psutil). After a re-exec the
    keepers of engines that ended meanwhile are such children, and nobody else will wait for them.
    Only zombies are reaped, so no live child's exit status is taken from its owner."""
    reaped: list[int] = []
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return reaped
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            pid, _ = os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue
        if pid:
            reaped.append(pid)
    return reaped


def read_exit_record(path: Path, *, pid: int, tag: str) -> ExitInfo | None:
    """The exit a keeper recorded for ``pid`` of the spawn ``tag``; None if there is none (or it is
    another spawn's: pids are reused). A record that was read is removed: it has been handed over."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("pid") != pid or data.get("tag") != tag:
        return None
    code, sig, at = data.get("code"), data.get("signal"), data.get("at")
    if not (code is None or isinstance(code, int)) or not (sig is None or isinstance(sig, int)) \
            or not isinstance(at, (int, float)) or (code is None) == (sig is None):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    return ExitInfo(code=code, signal=sig, at_wall=float(at))


def claim_exit_records(exits_dir: Path, *, recorded: Mapping[str, tuple[int, str]],
                       keep: set[Path]) -> dict[str, ExitInfo]:
    """At daemon start: the exits of engines that ended while no daemon ran, and a clean directory.

    ``recorded`` is each engine's last (pid, tag) from the state file; their records are read (and
    so removed). Every other record or temporary file is stale and removed too, except ``keep``:
    the records adopted engines' keepers will write.
    """
    found: dict[str, ExitInfo] = {}
    for name, (pid, tag) in recorded.items():
        info = read_exit_record(exits_dir / keeper_program.record_name(name, pid), pid=pid, tag=tag)
        if info is not None:
            found[name] = info
    try:
        leftovers = [p for p in exits_dir.iterdir() if p not in keep]
    except OSError:
        return found
    for path in leftovers:
        with contextlib.suppress(OSError):
            path.unlink()
    return found


def tree_of(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


class EngineProcess:
    """One spawned (or adopted) engine process and what it left in the process table."""

    def __init__(self, pid: int, create_time: float, argv: Sequence[str], tag: str, *,
                 popen: subprocess.Popen[bytes] | None, log_path: Path | None, keeper: Keeper | None = None) -> None:
        self.pid = pid
        self.create_time = create_time
        self.argv = list(argv)
        self.tag = tag
        # This daemon's child: the engine's keeper when there is one, else the engine itself.
        self.popen = popen
        self.log_path = log_path
        self.keeper = keeper
        self.adopted = popen is None
        self.exit: ExitInfo | None = None
        self._exited = anyio.Event()
        # Descendants seen while running, as (pid, create_time): they outlive the root if they
        # daemonised, and a pid alone could have been reused by the time we stop.
        self.known_descendants: set[tuple[int, float]] = set()

    @classmethod
    def spawn(cls, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, log_path: Path,
              tag: str, engine: str, inherit: Mapping[str, str] | None = None,
              exits_dir: Path | None = None) -> EngineProcess:
        """Start ``argv`` through its keeper, in its own session, with stdout/stderr appended to ``log_path``.

        The engine writes to the log file itself (not through a pipe to the daemon), so a daemon
        restart never breaks its output and an adopted engine keeps logging. ``inherit`` is the
        environment passed on (default: the daemon's own); ``env`` is added on top. The keeper
        writes the engine's exit record to ``exits_dir`` (default: ``exits`` next to the log).
        Blocks until the keeper reports the engine's pid (milliseconds): call it from a worker thread.
        """
        full_env = {**(os.environ if inherit is None else inherit), **env}
        full_env.pop(TAG_ENV, None)  # the keeper adds the tag for the engine only: see keeper.py
        # Under systemd the engine gets a scope unit of its own, so the daemon's death (a crash,
        # a watchdog kill, an upgrade) does not take the engine with it; see scopes.py.
        launcher = scopes.launcher()
        if launcher.enabled and not _findable(argv[0], env=full_env, cwd=cwd):
            # systemd-run would report a missing program only as an exit status; say it here.
            raise EngineSpawnFailed(engine, f"command not found: {argv[0]!r}; install it or fix the engine's "
                                            "command/kind in the config")
        exits_dir = exits_dir or log_path.parent / "exits"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            exits_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EngineSpawnFailed(engine, f"cannot open its log file {log_path} or its exit records in "
                                            f"{exits_dir}: {exc.strerror or exc}") from exc
        report_r, report_w = os.pipe()
        command = launcher.wrap(keeper_argv(argv, exits_dir=exits_dir, engine=engine, tag=tag, report_fd=report_w),
                                engine=engine, spawn_id=tag.rsplit("/", 1)[-1])
        try:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
                pass_fds=(report_w,),
            )
        except FileNotFoundError as exc:
            os.close(report_r)
            if cwd is not None and exc.filename == cwd:
                raise EngineSpawnFailed(engine, f"working directory {cwd!r} does not exist") from exc
            raise EngineSpawnFailed(engine, f"command not found: {exc.filename!r}") from exc
        except NotADirectoryError as exc:
            os.close(report_r)
            raise EngineSpawnFailed(engine, f"working directory {cwd!r} is not a directory") from exc
        except OSError as exc:
            os.close(report_r)
            raise EngineSpawnFailed(engine, f"cannot start the engine's keeper: {exc}") from exc
        finally:
            os.close(log_fd)
            os.close(report_w)
        try:
            report = _read_report(report_r, KEEPER_REPORT_WAIT_S)
        except BaseException:
            # Never leave a keeper and engine running that nobody tracks (it would hold the port).
            popen.kill()
            popen.wait()
            raise
        finally:
            os.close(report_r)
        keeper_created = process_create_time(popen.pid) or time.time()
        kind, _, rest = report.partition(" ")
        if kind != "pid" or not rest.strip().isdigit():
            popen.kill()
            popen.wait()
            if kind == "error":
                raise EngineSpawnFailed(engine, _exec_error(argv[0], rest))
            raise EngineSpawnFailed(engine, f"its keeper did not report the engine's pid within "
                                            f"{KEEPER_REPORT_WAIT_S:.0f}s (exit {popen.returncode}); see {log_path}")
        pid = int(rest)
        # The keeper reaps its engine at once: an engine that already exited may have freed its pid for
        # another process. Only the keeper's own child has the engine's create time; otherwise record
        # one that matches no process, so a later stop can never signal a stranger.
        create_time = (process_create_time(pid) if _child_of(pid, popen.pid) else None) or 0.0
        keeper = Keeper(pid=popen.pid, create_time=keeper_created, popen=popen,
                        record_path=exits_dir / keeper_program.record_name(engine, pid))
        return cls(pid, create_time, argv, tag, popen=popen, log_path=log_path, keeper=keeper)

    @classmethod
    def adopt(cls, pid: int, create_time: float, argv: Sequence[str], tag: str,
              log_path: Path | None) -> EngineProcess | None:
        """Re-attach to an engine a previous daemon started; None if that exact process is gone.

        The create time must match to the hundredth of a second: a reused pid is never adopted.
        Its keeper, when still alive, is found as its parent and will hand over its exit status.
        """
        actual = process_create_time(pid)
        if actual is None or abs(actual - create_time) > 0.01:
            return None
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # ours after a re-exec: do not leave it a zombie
                return None
        except psutil.Error:
            return None
        return cls(pid, create_time, argv, tag, popen=None, log_path=log_path, keeper=find_keeper(pid, tag))

    @staticmethod
    def new_tag(daemon_id: str, engine: str) -> str:
        return f"{daemon_id}/{engine}/{uuid.uuid4().hex[:12]}"

    # ---- exit -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.exit is None

    async def wait(self) -> ExitInfo:
        """Return when the process has exited (no polling where the OS can tell us)."""
        if self.exit is not None:
            return self.exit
        async with anyio.create_task_group() as tg:
            if self.keeper is not None:
                tg.start_soon(self._watch_keeper, self.keeper)
            await wait_exit(self.pid, self.create_time)
            tg.cancel_scope.cancel()
        info = await self._collect_status()
        if self.exit is None:
            self.exit = info
            self._exited.set()
        return self.exit

    async def _watch_keeper(self, keeper: Keeper) -> None:
        """A keeper that dies before its engine (SIGKILLed) is reaped at once, not left a zombie."""
        await wait_exit(keeper.pid, keeper.create_time)
        if pid_identity(self.pid, self.create_time) == OURS and not _is_zombie(self.pid):
            keeper.lost = True
            keeper.reap()

    async def _collect_status(self) -> ExitInfo:
        keeper = self.keeper
        if keeper is not None:
            # The keeper reaps the engine, writes the record, then exits: its exit means the record is there.
            with anyio.move_on_after(KEEPER_RECORD_WAIT_S):
                await wait_exit(keeper.pid, keeper.create_time)
            if pid_identity(keeper.pid, keeper.create_time) == OURS and not _is_zombie(keeper.pid):
                keeper.kill()  # its engine is gone: a keeper that cannot finish must not stay behind
                await wait_exit(keeper.pid, keeper.create_time)
            keeper.reap()
            recorded = read_exit_record(keeper.record_path, pid=self.pid, tag=self.tag)
            if recorded is not None:
                return recorded
            why = "its keeper process was killed" if keeper.lost else "its keeper recorded no exit status"
            return ExitInfo(code=None, signal=None, at_wall=time.time(), unknown_because=why)
        return self._reap_status()

    def _reap_status(self) -> ExitInfo:
        """The exit status of an engine without a keeper, where this process is its parent."""
        now = time.time()
        if self.popen is not None:
            rc = self.popen.wait()
            if rc < 0:
                return ExitInfo(code=None, signal=-rc, at_wall=now)
            return ExitInfo(code=rc, signal=None, at_wall=now)
        # An adopted engine without a keeper (started before keepers existed) can still be our own
        # child: a daemon that re-executed itself in place (SIGHUP, ``llmctl daemon restart``) has
        # the same pid. Reap it then, so its real status is known and it does not linger as a zombie.
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == self.pid:
            if os.WIFSIGNALED(status):
                return ExitInfo(code=None, signal=os.WTERMSIG(status), at_wall=now)
            if os.WIFEXITED(status):
                return ExitInfo(code=os.WEXITSTATUS(status), signal=None, at_wall=now)
        return ExitInfo(code=None, signal=None, at_wall=now)

    # ---- tree -------------------------------------------------------------------------------

    def remember_descendants(self) -> None:
        """Record the current descendants (called from the probe loop, in a worker thread)."""
        if pid_identity(self.pid, self.create_time) != OURS:
            return  # the root is gone: the tree at that pid would be another process's
        for proc in tree_of(self.pid)[1:]:
            try:
                self.known_descendants.add((proc.pid, proc.create_time()))
            except psutil.Error:
                pass

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this engine still alive: known descendants and anything carrying its tag."""
        found: dict[int, psutil.Process] = {}
        for pid, created in self.known_descendants:
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) <= 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = proc
            except psutil.Error:
                continue
        for proc in tagged_processes(self.tag):
            found[proc.pid] = proc
        return list(found.values())

    # ---- stop -------------------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        identity = pid_identity(self.pid, self.create_time)
        if identity == OTHER:
            # The pid (and so the group id) now names another process: its group is not ours. Our
            # leftovers, if any, are found by descendant create times and tag in leftovers().
            return
        # The engine leads its own session, so its pgid is its pid. With the root gone, a live group of
        # that id can only be the engine's: the kernel does not reuse a pid still in use as a pgid.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if self.exit is None and identity == OURS:
            self._signal_root(sig)

    def _signal_root(self, sig: int) -> None:
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            pidfd = _pidfd_of(self.pid, self.create_time)
            if pidfd is None:
                return
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except (ProcessLookupError, PermissionError):
                pass
            finally:
                os.close(pidfd)
            return
        try:
            os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def send_signal(self, sig: int) -> None:
        self._signal_group(sig)

    async def stop(self, grace_s: float) -> StopResult:
        """SIGTERM the group, wait up to ``grace_s``, SIGKILL what is left, then sweep the tree.

        Returns only when no process of the engine is left (verified with psutil).
        """
        started = time.monotonic()
        await anyio.to_thread.run_sync(self.remember_descendants)
        killed: list[int] = []
        graceful = True
        if self.exit is None:
            # A stopped (SIGSTOP) process cannot act on SIGTERM; wake it so it can exit cleanly.
            self._signal_group(signal.SIGTERM)
            self._signal_group(signal.SIGCONT)
            # Only the engine's own exit is bounded by the grace: collecting its status from the keeper
            # afterwards (a record fsynced to disk) must not turn a clean stop into a kill.
            with anyio.move_on_after(grace_s):
                await wait_exit(self.pid, self.create_time)
            if self.exit is None and pid_identity(self.pid, self.create_time) == OURS and not _is_zombie(self.pid):
                graceful = False
                self._signal_group(signal.SIGKILL)
                killed.append(self.pid)
                # No bound here: a process in uninterruptible sleep outlives SIGKILL for a while, and
                # until it is gone it still holds its memory, so the engine stays "stopping".
            await self.wait()
        else:
            self._signal_group(signal.SIGTERM)
        # Leftovers: the group (if the root was the only one to exit), moved-away grandchildren, tagged.
        leftovers = await anyio.to_thread.run_sync(self.leftovers)
        if leftovers:
            for proc in leftovers:
                try:
                    proc.terminate()
                except psutil.Error:
                    pass
            _, alive = await anyio.to_thread.run_sync(lambda: psutil.wait_procs(leftovers, timeout=min(grace_s, 5)))
            for proc in alive:
                try:
                    proc.kill()
                    killed.append(proc.pid)
                except psutil.Error:
                    pass
            await anyio.to_thread.run_sync(lambda: psutil.wait_procs(alive, timeout=5))
        return StopResult(graceful=graceful, killed_pids=tuple(killed), duration_s=time.monotonic() - started)


class LogTail:
    """Follows an engine's log file: keeps the last lines in memory and caps the file's size.

    The cap is enforced copy-then-truncate (the engine holds its fd open in append mode, so the
    file cannot be renamed under it): the old content goes to ``<log>.1``.
    """

    def __init__(self, path: Path, *, max_bytes: int, keep_lines: int = 400) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self._offset = 0
        self._partial = b""

    def start_at_end(self) -> None:
        try:
            self._offset = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = 0

    def poll(self) -> list[str]:
        """Read what was appended since the last call (blocking I/O: run in a worker thread)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:  # truncated by us or by someone else
            self._offset = 0
        new: list[str] = []
        if size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(min(size - self._offset, 4 * 1024 * 1024))
                self._offset = f.tell()
            data = self._partial + chunk
            parts = data.split(b"\n")
            self._partial = parts.pop()
            if len(self._partial) > 64 * 1024:
                parts.append(self._partial)
                self._partial = b""
            new = [p.decode("utf-8", "replace").rstrip("\r") for p in parts]
            self.lines.extend(new)
        if size > self.max_bytes:
            self._rotate()
        return new

    def _rotate(self) -> None:
        rotated = self.path.with_name(self.path.name + ".1")
        try:
            with open(self.path, "rb") as src, open(rotated, "wb") as dst:
                while chunk := src.read(1024 * 1024):
                    dst.write(chunk)
            os.truncate(self.path, 0)
            self._offset = 0
        except OSError:
            pass


def read_log_lines(path: Path, max_lines: int) -> list[str]:
    """The last ``max_lines`` lines of a log (and its rotated predecessor if needed)."""
    lines: list[str] = []
    for p in (path.with_name(path.name + ".1"), path):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 512 * 1024))
                lines.extend(f.read().decode("utf-8", "replace").splitlines())
        except OSError:
            continue
    return lines[len(lines) - max_lines:] if max_lines > 0 else []


def port_holder(host: str, port: int, engine: str = "") -> tuple[int | None, str | None] | None:
    """Who listens on (host, port): (pid, command) or (None, None) if unknown; None if free.

    AddressNotLocal where nothing could listen there at all: ``host`` is not one of this machine's
    addresses (or no name that resolves), so no process is to blame."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    # First whether the address is this machine's at all (a port of its own, any): a connect alone would
    # take another machine's open port (or a network that accepts every connect) for a local holder.
    problem = _try_bind(host, 0, family)
    if problem is not None and (isinstance(problem, socket.gaierror) or problem.errno == errno.EADDRNOTAVAIL):
        raise AddressNotLocal(engine, host, port, problem.strerror or str(problem)) from problem
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect((probe_host, port))
        except OSError:
            problem = _try_bind(host, port, family)
            if problem is None:
                return None
            if isinstance(problem, socket.gaierror) or problem.errno == errno.EADDRNOTAVAIL:
                raise AddressNotLocal(engine, host, port, problem.strerror or str(problem)) from problem
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return (None, None)
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                proc = psutil.Process(conn.pid)
                return conn.pid, " ".join(redact_argv(proc.cmdline()))[:200] or proc.name()
            except psutil.Error:
                return conn.pid, None
    return (None, None)


def _try_bind(host: str, port: int, family: int) -> OSError | None:
    """Why (host, port) cannot be bound; None when it can."""
    import socket

    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
            return None
        except OSError as exc:
            return exc


def python_executable() -> str:
    return sys.executable


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until the processes are gone; the ones still running after ``timeout_s`` (blocking).

    A zombie counts as gone: its GPU memory is already released, and an orphan's zombie waits
    for init (or a subreaper) to reap it, which can take seconds the next start need not wait.
    """
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while True:
        still = []
        for p in alive:
            try:
                os.waitpid(p.pid, os.WNOHANG)  # reap it if it happens to be our child
            except ChildProcessError:
                pass
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.NoSuchProcess:
                pass
            except psutil.Error:
                still.append(p)
        alive = still
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
