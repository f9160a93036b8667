"""Shared parts of the side-by-side benchmarks: real daemons, a real supervisord, an event follower.

Everything here drives real processes: ``supervisord-llm run`` (through the test harness's
:class:`tests.helpers.Daemon`), ``supervisord -n`` from the ``supervisor`` package, the OpenAI
stand-in engine and a real ``mlx_lm.server`` on the tiny local model.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from tests.helpers import (  # noqa: E402,F401  (re-exported for the benchmarks)
    PYTHON,
    STANDINS,
    Daemon,
    free_port,
    mlx_engine_toml,
    short_tmpdir,
    standin_engine_toml,
    tiny_model_dir,
)

BIN = Path(PYTHON).parent


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "min": min(values) if values else None, "max": max(values) if values else None}


def event_wall_s(event: dict[str, Any]) -> float:
    """The wall time an event was recorded at (the daemon writes ISO 8601 UTC, millisecond precision)."""
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail_until(path: Path, offset: int, match: Callable[[str], bool], timeout_s: float) -> tuple[float, str]:
    """Poll ``path`` every millisecond from byte ``offset`` until a line ``match``es.

    Returns (monotonic time it was seen, the line): the same reader for both supervisors' records.
    """
    deadline = time.monotonic() + timeout_s
    partial = b""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        if chunk:
            now = time.monotonic()
            offset += len(chunk)
            data = partial + chunk
            lines = data.split(b"\n")
            partial = lines.pop()
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if match(line):
                    return now, line
        time.sleep(0.001)
    raise TimeoutError(f"no matching line in {path} within {timeout_s:.0f}s")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        supervisor_version = version("supervisor")
        mlx_version = version("mlx")
    except Exception:  # pragma: no cover - informational only
        supervisor_version = mlx_version = "?"
    from supervisord_llm import __version__

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "supervisord_llm": __version__,
        "supervisor": supervisor_version,
        "mlx": mlx_version,
    }


# ---- the daemon side ------------------------------------------------------------------------

class EventFollower:
    """Follows ``GET /v1/events?follow=1`` (what ``llmctl events -f`` reads) in a thread.

    Each event is kept with the monotonic time it arrived here, so a benchmark can measure
    "fault injected" to "event seen by a client", which includes the daemon's delivery.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                with self.daemon.client() as c, c.stream("GET", "/v1/events", params={"follow": "1", "lines": "1"},
                                                         timeout=httpx.Timeout(5.0, read=None)) as r:
                    for line in r.iter_lines():
                        if self._stop:
                            return
                        if not line.strip():
                            continue
                        now = time.monotonic()
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue
                        with self._cond:
                            self.events.append((now, event))
                            self._cond.notify_all()
            except (httpx.HTTPError, OSError):
                time.sleep(0.1)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
             after_mono: float = 0.0) -> tuple[float, dict[str, Any]]:
        """The first event (arrival time, event) matching ``predicate`` that arrived after ``after_mono``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for at, event in self.events:
                    if at >= after_mono and predicate(event):
                        return at, event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching event within {timeout_s:.0f}s; last: "
                                       f"{[e['kind'] for _, e in self.events[-5:]]}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop = True


def state_event(engine: str, to: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("kind") == "engine.state_changed" and e.get("engine") == engine and e.get("to") == to


def wait_ready_pid(d: Daemon, name: str, not_pid: int | None, timeout_s: float = 60) -> int:
    def check() -> int | None:
        e = d.engine(name)
        return e["pid"] if e["state"] == "ready" and e["pid"] and e["pid"] != not_pid else None

    return wait_until(check, timeout_s, f"{name} ready with a new pid")


# ---- the supervisord side -------------------------------------------------------------------

class Supervisord:
    """A real ``supervisord -n`` with one program, and its XML-RPC interface on a Unix socket."""

    def __init__(self, name: str, argv: list[str], *, startsecs: int = 1, autorestart: bool = True,
                 extra: str = "") -> None:
        """``extra``: more config sections (an event listener such as superlance's memmon)."""
        self.dir = short_tmpdir("sv-")
        self.name = name
        self.socket = self.dir / "supervisor.sock"
        self.log = self.dir / "supervisord.log"
        self.conf = self.dir / "supervisord.conf"
        command = " ".join(_quote(a) for a in argv)
        self.conf.write_text(f"""[unix_http_server]
file={self.socket}
chmod=0700

[supervisord]
logfile={self.log}
logfile_maxbytes=0
pidfile={self.dir}/supervisord.pid
childlogdir={self.dir}
loglevel=info
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.socket}

[program:{name}]
command={command}
autostart=true
autorestart={'true' if autorestart else 'false'}
startsecs={startsecs}
startretries=1000
stopasgroup=true
killasgroup=true
stopwaitsecs=10
redirect_stderr=true
stdout_logfile={self.dir}/{name}.log
{extra}""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Supervisord:
        exe = shutil.which("supervisord", path=str(BIN)) or str(BIN / "supervisord")
        self.proc = subprocess.Popen([exe, "-n", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.socket.exists(), 20, "supervisord's socket")
        return self

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self) -> dict[str, Any]:
        return self.rpc().supervisor.getProcessInfo(self.name)

    def wait_running(self, not_pid: int | None = None, timeout_s: float = 60) -> int:
        def check() -> int | None:
            try:
                info = self.info()
            except (OSError, xmlrpc.client.Fault):
                return None
            return info["pid"] if info["statename"] == "RUNNING" and info["pid"] != not_pid else None

        return wait_until(check, timeout_s, f"supervisord's {self.name} RUNNING", interval_s=0.05)

    def log_lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def supervisord_log_wall_s(line: str) -> float:
    """supervisord's log timestamp ("2024-05-01 10:00:00,123", local time) as Unix time."""
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def mlx_argv(model: Path, port: int) -> list[str]:
    """The command the daemon's mlx_lm adapter runs, for supervisord to run the same engine."""
    return [PYTHON, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]


def kill_tree_of(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` set to ``body``
    (appended when the doc has none yet): each bench owns its own section of docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(path: Path, name: str, body: str) -> None:
    """Set one bench's section of a doc (see ``replace_section``)."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(replace_section(current, name, body))


__all__ = [name for name in dir() if not name.startswith("_")] + ["os"]
