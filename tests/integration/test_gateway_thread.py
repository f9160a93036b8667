"""Supervision is untouched by traffic: the gateway runs on its own thread and loop (gateway.bridge).

A real daemon supervises a real mlx_lm.server on the tiny model. An import hook on the daemon's
``PYTHONPATH`` (tests/standins/gateway_probe) records which thread runs the gateway's request
handling and its token meter, and can wedge the gateway's loop with a blocking sleep: a fault a
blocking call in the gateway would make. Nothing here times anything: each check is whether
something happened while the gateway was busy or blocked.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import REPO, Daemon, free_port, mlx_engine_toml, short_tmpdir

pytestmark = pytest.mark.slow

HOOK_DIR = REPO / "tests" / "standins" / "gateway_probe"
STREAMS = 32


@pytest.fixture
def probed(daemon_factory, tiny_model: Path):
    """A daemon with the gateway on and the probe hook loaded; (daemon, gateway url, probe dir)."""
    probe_dir = short_tmpdir("gwprobe-")
    gw = free_port()
    env = {"GATEWAY_PROBE_DIR": str(probe_dir),
           "PYTHONPATH": os.pathsep.join([str(HOOK_DIR), os.environ.get("PYTHONPATH", "") or str(REPO)])}
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model, default=True, canary_interval="10m")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n', env=env).start()
    d.wait_state("tiny", "ready", 90)
    yield d, f"http://127.0.0.1:{gw}", probe_dir
    (probe_dir / "release").touch()  # never leave a blocked gateway behind


def _threads(probe_dir: Path) -> list[dict]:
    path = probe_dir / "threads.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _control_status(d: Daemon) -> dict:
    """``GET /v1/status`` on the control socket, as llmctl sends it; a wedged daemon fails it (timeout)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://daemon", timeout=15) as c:
        response = c.get("/v1/status")
    response.raise_for_status()
    return response.json()


def test_live_streams_are_handled_off_the_daemons_loop(probed) -> None:
    """With 32 streams live through the gateway, their requests and every token read from the engine
    are handled on the gateway's own thread, never on the daemon's loop, and llmctl status answers."""
    d, url, probe_dir = probed
    started = threading.Barrier(STREAMS + 1, timeout=60)
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        body = {"model": "tiny", "max_tokens": 4000, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
                response.raise_for_status()
                lines = response.iter_lines()
                while not next(lines).startswith("data:"):
                    pass
                started.wait()
                for _ in lines:
                    if stop.is_set():
                        return
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    try:
        started.wait()  # every stream has had a token from the engine and is still live
        doc = _control_status(d)
        assert doc["gateway"]["in_flight"] == STREAMS
        assert d.llmctl("status").returncode == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    seen = _threads(probe_dir)
    assert {s["fn"] for s in seen} == {"forward", "feed"}, seen
    assert all(not s["main"] and s["thread"] == "gateway" for s in seen), seen


def test_a_blocked_gateway_blocks_neither_status_nor_crash_recording(probed) -> None:
    """While the gateway's loop is wedged by a blocking call, llmctl status answers and a SIGKILLed
    engine's exit is recorded in the event log; the gateway serves again once unblocked."""
    d, url, probe_dir = probed
    answers: list[int] = []

    def blocked_request() -> None:
        body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        answers.append(httpx.post(url + "/v1/chat/completions", json=body, headers={"x-probe-block": "1"},
                                  timeout=120).status_code)

    blocker = threading.Thread(target=blocked_request, daemon=True)
    blocker.start()
    deadline = time.monotonic() + 30
    while not (probe_dir / "blocked").exists():
        assert time.monotonic() < deadline, "the probe never blocked the gateway"
        time.sleep(0.05)

    doc = _control_status(d)
    engine = next(e for e in doc["engines"] if e["name"] == "tiny")
    assert engine["state"] == "ready"
    assert d.llmctl("status").returncode == 0
    os.kill(engine["pid"], signal.SIGKILL)
    exited = None
    deadline = time.monotonic() + 15
    while exited is None and time.monotonic() < deadline:
        exited = next((e for e in d.events() if e["kind"] == "engine.exited" and e.get("pid") == engine["pid"]),
                      None)
        time.sleep(0.05)
    assert exited is not None and exited.get("signal") == "SIGKILL", "the exit was not recorded"
    assert blocker.is_alive() and not answers  # all of it happened while the gateway was still blocked

    (probe_dir / "release").touch()
    blocker.join(60)
    assert answers and answers[0] in (502, 503), answers  # the engine it was held for is gone: a clear error
    models = httpx.get(url + "/v1/models", timeout=30)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"


def test_a_daemon_whose_gateway_is_wedged_still_stops_its_engine_and_exits(probed) -> None:
    """SIGTERM while a blocking call wedges the gateway's loop: the engine is stopped, the daemon logs
    gateway.stop_timeout and exits instead of waiting forever for the gateway's thread."""
    d, url, probe_dir = probed
    engine_pid = d.engine("tiny")["pid"]
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}

    def blocked_request() -> None:
        try:
            httpx.post(url + "/v1/chat/completions", json=body, headers={"x-probe-block": "1"}, timeout=120)
        except httpx.HTTPError:
            pass  # the daemon exits under it: its connection is reset

    threading.Thread(target=blocked_request, daemon=True).start()
    deadline = time.monotonic() + 30
    while not (probe_dir / "blocked").exists():
        assert time.monotonic() < deadline, "the probe never blocked the gateway"
        time.sleep(0.05)
    assert d.proc is not None
    d.proc.terminate()
    code = d.proc.wait(60)  # the probe holds the gateway for 90 s: exiting before that is the point
    assert not (probe_dir / "release").exists()
    assert code == 0, d.stderr()
    assert "gateway.stop_timeout" in d.stderr()
    assert not psutil.pid_exists(engine_pid) or psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE
