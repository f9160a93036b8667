"""Shared test helpers: real processes only (the tiny model, a real mlx_lm.server, free ports)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir() -> Path:
    """The tiny model, made once per machine (deterministic) under the pytest cache dir."""
    from supervisord_llm.tinymodel import is_complete

    directory = Path(os.environ.get("SUPERVISORD_LLM_TEST_MODEL", REPO / ".pytest_cache" / "tiny-model"))
    if not is_complete(directory):
        subprocess.run([PYTHON, "-m", "supervisord_llm.tinymodel", str(directory)], check=True)
    return directory


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
