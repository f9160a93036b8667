"""Shared test helpers: real processes only (the tiny model, a real mlx_lm.server, free ports)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
PYTHON = sys.executable


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this test process handed out before (a config with many
    engines asks several times before anything binds).

    Taken below the kernel's ephemeral range (Linux 32768-60999, macOS 49152-65535), where no outgoing
    connection's source port and no other process's bind to port 0 lands, and from a slice of its own for
    each pytest process that `make test` runs at the same time (``SUPERVISORD_LLM_TEST_PORT_SLICE``: 0 or 1,
    plus the pytest-xdist worker's number: gw0 adds 0, gw1 adds 1): a port one of them picked cannot be
    taken by another before its daemon binds it."""
    import random

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(os.environ.get("SUPERVISORD_LLM_TEST_PORT_SLICE", "0") or 0) + (int(worker) if worker.isdigit() else 0)
    lo = 20000 + 4000 * index
    if lo + 4000 > 32768:
        raise RuntimeError(f"port slice {index} reaches the ephemeral range (32768 and up): at most 3 slices, 0-2")
    while True:
        port = random.randrange(lo, lo + 4000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def tiny_model_dir() -> Path:
    """The tiny model, made once per machine (deterministic) under the pytest cache dir."""
    from supervisord_llm.tinymodel import is_complete

    directory = Path(os.environ.get("SUPERVISORD_LLM_TEST_MODEL", REPO / ".pytest_cache" / "tiny-model"))
    if not is_complete(directory):
        subprocess.run([PYTHON, "-m", "supervisord_llm.tinymodel", str(directory)], check=True)
    return directory


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``predicate()``'s first true value, checked every 50 ms; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@contextlib.contextmanager
def engine_process(argv: list[str], port: int, *, env: dict[str, str] | None = None,
                   quiet: bool = True) -> Iterator[str]:
    """A stand-in engine run as a real process (its own session), listening on ``port``: its base URL once
    ``/health`` answers; terminated afterwards."""
    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(argv, env=env, stdout=output, stderr=output, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_http(base_url + "/health", timeout_s=20)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(10)


class MlxServer:
    """A real ``mlx_lm.server`` on the tiny model, in its own process group."""

    def __init__(self, model: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_http(self.base_url + "/health")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 18)  # SIGCONT in case a test left it stopped
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


STANDINS = REPO / "tests" / "standins"


def short_tmpdir(prefix: str = "sl-") -> Path:
    """A short directory (Unix socket paths are limited to ~100 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def standin_engine_toml(name: str, port: int, *extra: str, **keys: object) -> str:
    """An [[engine]] table running the OpenAI stand-in with extra flags."""
    argv = [PYTHON, str(STANDINS / "openai_engine.py"), "--port", "{port}", *extra]
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "command"', f"port = {port}",
             "command = [" + ", ".join(json.dumps(a) for a in argv) + "]"]  # JSON strings are TOML strings
    keys.setdefault("footprint", "100MB")
    keys.setdefault("stop_grace", "5s")
    keys.setdefault("start_timeout", "30s")
    for k, v in keys.items():
        lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def mlx_engine_toml(name: str, port: int, model: Path, **keys: object) -> str:
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "mlx_lm"', f'model = "{model}"', f"port = {port}"]
    keys.setdefault("footprint", "200MB")
    keys.setdefault("stop_grace", "10s")
    keys.setdefault("start_timeout", "60s")
    for k, v in keys.items():
        lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


class Daemon:
    """A real ``supervisord-llm run`` process on its own state dir, plus a control client."""

    def __init__(self, config_text: str, *, state_dir: Path | None = None, env: dict[str, str] | None = None,
                 open_files: int | None = None) -> None:
        self.open_files = open_files  # the soft limit on open files the daemon starts with (launchd's: 256)
        self.state_dir = state_dir or short_tmpdir()
        self.config_path = self.state_dir / "config.toml"
        head = f'[daemon]\nstate_dir = "{self.state_dir}"\n'
        if not config_text.lstrip().startswith("[daemon]"):
            config_text = head + config_text
        elif "state_dir" not in config_text.split("\n[", 1)[0]:  # a [daemon] table of its own: it gets the test's state_dir
            config_text = config_text.replace("[daemon]\n", head, 1)
        self.config_path.write_text(config_text)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = self.state_dir / "control.sock"
        self.stderr_path = self.state_dir / "daemon.stderr"

    def start(self, wait: bool = True) -> Daemon:
        # The daemon gets its own copy of the descriptor; ours is closed at once.
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen([PYTHON, "-m", "supervisord_llm.main", "run", "--config", str(self.config_path)],
                                         stdout=stderr, stderr=stderr, env=self.env, start_new_session=True,
                                         preexec_fn=None if self.open_files is None else self._limit_open_files)
        if wait:
            self.wait_up()
        return self

    def _limit_open_files(self) -> None:
        """In the daemon's process, before it runs: its soft limit on open files (the hard one stays)."""
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    def wait_up(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.stderr()}")
            if not self._accepts():
                time.sleep(0.1)
                continue
            try:
                with self.client() as c:
                    if c.get("/v1/status").status_code == 200:
                        return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon did not answer within {timeout_s}s: {self.stderr()}")

    def _accepts(self) -> bool:
        """Whether the control socket accepts a connection. httpcore leaks the socket of a failed
        Unix-socket connect, so polling a daemon that is not up yet goes through this first."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-4000:]
        except OSError:
            return ""

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://daemon", timeout=60)

    def status(self) -> dict:
        if not self._accepts():  # a daemon restarting or gone (see _accepts for why not through httpx)
            raise ConnectionRefusedError(f"the control socket {self.socket} does not accept connections")
        with self.client() as c:
            return c.get("/v1/status").json()

    def engine(self, name: str) -> dict:
        return next(e for e in self.status()["engines"] if e["name"] == name)

    def post(self, path: str, body: dict | None = None, timeout: float = 60) -> httpx.Response:
        with self.client() as c:
            return c.post(path, json=body or {}, timeout=timeout)

    def events(self) -> list[dict]:
        """The durable event log (events.jsonl). Its writer thread may land a line a moment after the
        daemon emitted it: when the daemon is up, this waits (at most 3 s) until the file holds every
        event the daemon had emitted when it was asked, so a test reads what it just caused."""
        out = self._events_on_disk()
        emitted = self._newest_seq()
        deadline = time.monotonic() + 3.0
        while emitted is not None and (not out or out[-1].get("seq", 0) < emitted) and time.monotonic() < deadline:
            time.sleep(0.02)
            out = self._events_on_disk()
        return out

    def _events_on_disk(self) -> list[dict]:
        out = []
        try:
            for line in (self.state_dir / "events.jsonl").read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        except OSError:
            pass
        return out

    def _newest_seq(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None or not self._accepts():
            return None
        try:
            with self.client() as c:
                recent = c.get("/v1/events", params={"lines": 1}, timeout=5).json().get("events") or []
        except (httpx.HTTPError, ValueError):
            return None
        seq = recent[-1].get("seq") if recent else None
        return seq if isinstance(seq, int) else None

    def wait_state(self, name: str, states: str | set[str], timeout_s: float = 60.0) -> dict:
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        engine: dict = {}
        while time.monotonic() < deadline:
            engine = self.engine(name)
            if engine["state"] in wanted:
                return engine
            time.sleep(0.05)
        raise TimeoutError(f"{name} not in {wanted} after {timeout_s}s: {engine}\n{self.stderr()}")

    def llmctl(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "supervisord_llm.cli", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})})

    def wait_events(self, check: Callable[[dict], bool], timeout_s: float = 10.0) -> list[dict]:
        """The events ``check`` accepts, once there is one. The event log's writer may land a line a
        moment after the state it records is visible in the status."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.events() if check(e)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def gateway_counters(self, check: Callable[[dict], bool], timeout_s: float = 5.0) -> dict:
        """The gateway's part of the status once ``check`` holds for it. Its counters come from the
        gateway's own process and reach the daemon within tens of milliseconds, so a test that has
        just seen a refusal waits for the count instead of reading it at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            gateway = self.status()["gateway"]
            if check(gateway) or time.monotonic() > deadline:
                return gateway
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the daemon only (engines are in their own sessions and survive)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 60) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        """Stop the daemon gracefully (it stops engines), then kill anything carrying our tag."""
        import psutil

        self.stop()
        try:
            daemon_id = (self.state_dir / "daemon-id").read_text().strip()
        except OSError:
            return
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("SUPERVISORD_LLM_TAG", "").startswith(daemon_id + "/"):
                    proc.send_signal(18)
                    proc.kill()
            except (psutil.Error, OSError):
                pass


def pids_with_tag_prefix(prefix: str) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("SUPERVISORD_LLM_TAG", "").startswith(prefix) and proc.status() != "zombie":
                out.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def chromium_driver(*flags: str):
    """Headless Chromium (Debian's chromium and chromium-driver) through Selenium; the test is skipped
    where they are missing. ``flags``: more command-line switches."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", *flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class JsonWebhookReceiver:
    """A JSON webhook receiver on 127.0.0.1 (``url``) that answers 200 and keeps every body it is sent (``bodies``)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def tight_vm_stat_sample(tmp_path: Path) -> Path:
    """The idle 512 GB Studio's ``vm_stat`` sample (tests/fixtures/vm_stat) with most of its free pages gone:
    ~31 GB available, wired unchanged (nothing stranded: a refusal is plain memory pressure)."""
    import re

    text = (REPO / "tests" / "fixtures" / "vm_stat" / "studio-512gb-idle.txt").read_text()
    tight = re.sub(r"^Pages free:\s+\d+\.$", "Pages free:                               800000.", text,
                   flags=re.MULTILINE)
    assert tight != text
    path = tmp_path / "tight.txt"
    path.write_text(tight)
    return path
