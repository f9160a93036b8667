"""Supervision is untouched by traffic: the gateway runs in its own process (gateway.worker), which
the daemon starts, answers and restarts (gateway.process).

A real daemon supervises a real mlx_lm.server on the tiny model. An import hook on the daemon's
``PYTHONPATH`` (tests/standins/gateway_probe) records which process and thread run the gateway's
request handling and its token meter, and can wedge the gateway's loop with a blocking sleep: a
fault a blocking call in the gateway would make. Nothing here times anything: each check is whether
something happened while the gateway was busy, blocked or gone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, Daemon, free_port, mlx_engine_toml, short_tmpdir, standin_engine_toml, wait_for

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


def test_live_streams_are_handled_in_the_gateways_own_process(probed) -> None:
    """With 32 streams live through the gateway, their requests and every token read from the engine
    are handled in the gateway's own process, never in the daemon's, and llmctl status answers."""
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
    gateway_pid = doc["gateway"]["pid"]
    assert gateway_pid and gateway_pid != doc["daemon"]["pid"]
    assert all(s["pid"] == gateway_pid for s in seen), seen


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


def test_a_paused_gateway_process_is_not_the_engines_silence(daemon_factory) -> None:
    """The gateway's process stopped (SIGSTOP) for longer than the decode stall limit while it streams: the
    engine's tokens wait unread in the socket. When it goes on, the stream goes on; the engine is not hung and
    nothing is reported stalled (before: the client got an `engine_stalled` error, the engine `hung` with a
    critical alert, on the gateway's own silence)."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "50", default=True, canary_interval="10m")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\ndecode_stall_s = 2\n').start()
    d.wait_state("e", "ready", 30)
    gateway_pid = d.status()["gateway"]["pid"]
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60, json={
                "model": "e", "stream": True, "max_tokens": 400,
                "messages": [{"role": "user", "content": "hi"}]}) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    os.kill(gateway_pid, signal.SIGSTOP)
    try:
        time.sleep(5)  # 2.5 times the decode stall limit
    finally:
        os.kill(gateway_pid, signal.SIGCONT)
    reader.join(60)
    assert "data: [DONE]" in lines and not [line for line in lines if "engine_stalled" in line], lines[-3:]
    states = [e["to"] for e in d.events() if e["kind"] == "engine.state_changed" and e.get("engine") == "e"]
    assert "hung" not in states, states
    assert not [e for e in d.events() if e["kind"] == "gateway.stall_detected"]
    assert d.status()["gateway"]["pid"] == gateway_pid


def test_a_killed_gateway_process_is_started_again_and_the_engine_is_untouched(probed) -> None:
    """SIGKILL of the gateway process (an out-of-memory kill, a crash) mid-stream: the daemon records
    it, starts a new gateway on the same port, the engine keeps running, and clients are served again."""
    d, url, _ = probed
    doc = _control_status(d)
    gateway_pid = doc["gateway"]["pid"]
    engine_pid = d.engine("tiny")["pid"]
    body = {"model": "tiny", "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    cut: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError as exc:
            cut.append(exc)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    wait_for(lambda: _control_status(d)["gateway"]["in_flight"] == 1, 30, "the stream in flight")
    os.kill(gateway_pid, signal.SIGKILL)
    exited = wait_for(lambda: next((e for e in d.events() if e["kind"] == "gateway.exited"), None), 30,
                      "gateway.exited in the event log")
    assert exited["pid"] == gateway_pid and exited["exit"] == "killed by SIGKILL" and exited["restarts"] == 1
    streamer.join(30)
    assert cut, "the stream through the killed gateway did not end with an error"
    ok = httpx.post(url + "/v1/chat/completions", timeout=60,
                    json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text
    doc = _control_status(d)
    assert doc["gateway"]["pid"] not in (None, gateway_pid) and doc["gateway"]["restarts"] == 1
    engine = next(e for e in doc["engines"] if e["name"] == "tiny")
    assert engine["pid"] == engine_pid and engine["state"] == "ready"  # the model was not reloaded
    assert not [e for e in d.events() if e["kind"] == "engine.exited"]
    # The request that died with the gateway no longer counts as in flight on the engine.
    wait_for(lambda: _control_status(d)["gateway"]["in_flight"] == 0, 30, "no request in flight")


def test_the_gateway_process_ends_with_the_daemon(probed) -> None:
    """A daemon killed with SIGKILL leaves no gateway process behind holding the port."""
    import psutil

    d, url, _ = probed
    gateway_pid = _control_status(d)["gateway"]["pid"]
    assert psutil.pid_exists(gateway_pid)
    d.kill()

    def gone() -> bool:
        try:
            return psutil.Process(gateway_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 30, "the gateway process to end after the daemon's death")


def _wedge_gateway(url: str, probe_dir: Path) -> None:
    """Send a request that makes the probe block the gateway's loop, and wait until it does."""

    def blocked_request() -> None:
        try:
            httpx.post(url + "/v1/chat/completions", headers={"x-probe-block": "1"}, timeout=120,
                       json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        except httpx.HTTPError:
            pass  # cut when the gateway is killed

    threading.Thread(target=blocked_request, daemon=True).start()
    wait_for(lambda: (probe_dir / "blocked").exists(), 30, "the probe to block the gateway")


@pytest.mark.long_wait
def test_a_daemon_stopping_does_not_wait_forever_on_a_wedged_gateway(probed) -> None:
    """SIGTERM to the daemon while the gateway's loop is wedged: the engines stop, the gateway gets its
    grace and is then killed, and the daemon exits; nothing of the gateway is left."""
    import psutil

    d, url, probe_dir = probed
    gateway_pid = _control_status(d)["gateway"]["pid"]

    _wedge_gateway(url, probe_dir)
    d.proc.terminate()  # type: ignore[union-attr]
    assert d.proc.wait(60) == 0  # type: ignore[union-attr]  # grace 5 s + 5 s margin, then killed
    assert not psutil.pid_exists(gateway_pid) or psutil.Process(gateway_pid).status() == psutil.STATUS_ZOMBIE
    assert "gateway.stop_timeout" in d.stderr()
    assert [e for e in d.events() if e["kind"] == "engine.stopped"], "the engines were not stopped first"


@pytest.mark.long_wait
def test_a_restarted_daemon_ends_the_wedged_gateway_its_killed_predecessor_left(probed) -> None:
    """The daemon is SIGKILLed while its gateway is wedged (so the gateway cannot notice and leave):
    the next daemon ends that gateway and takes the port, instead of failing its start."""
    import psutil

    d, url, probe_dir = probed
    old_pid = _control_status(d)["gateway"]["pid"]

    _wedge_gateway(url, probe_dir)
    d.kill()
    assert psutil.pid_exists(old_pid)  # wedged: it did not notice its daemon's death
    (probe_dir / "blocked").unlink()
    d.start()
    wait_for(lambda: _control_status(d)["gateway"]["pid"] not in (None, old_pid), 30, "a new gateway process")
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    models = httpx.get(url + "/v1/models", timeout=30)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"


@pytest.mark.long_wait
def test_a_gateway_that_keeps_dying_is_alerted_and_not_ready_until_it_runs_a_minute(daemon_factory) -> None:
    """The gateway process dies three times in a row, each soon after its start: a critical gateway.down alert
    and /readyz 503 with gateway_ok false (before, each death was only an event, and /readyz said ready while no
    client was served). Once a process has run for a minute the alert resolves, also when a restarted daemon's
    process does, and /readyz is 200 again."""
    gw, metrics = free_port(), free_port()
    d = daemon_factory(f'[daemon]\nmetrics_listen = "127.0.0.1:{metrics}"\n' + standin_engine_toml("e", free_port())
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
                       # A receiver nobody answers: the outbox keeps the episode open across the daemon's restart.
                       + '[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:9/hook"\nformat = "json"\n'
                       ).start()
    d.wait_state("e", "ready", 30)
    ready = f"http://127.0.0.1:{metrics}/readyz"
    assert httpx.get(ready, timeout=10).json() == {"ready": True, "engines_not_ok": [], "gateway_ok": True}
    for death in range(1, 4):
        pid = wait_for(lambda: _control_status(d)["gateway"]["pid"], 30, "a gateway process")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda n=death: len([e for e in d.events() if e["kind"] == "gateway.exited"]) >= n, 30,
                 f"gateway.exited #{death}")
        raised = [e for e in d.events() if e["kind"] == "alert.raised" and e.get("key") == "gateway.down"
                  and not e.get("resolved")]
        assert bool(raised) is (death == 3), (death, raised)
    assert "died 3 times in a row" in raised[0]["summary"] and raised[0]["severity"] == "critical", raised
    not_ready = httpx.get(ready, timeout=10)
    assert not_ready.status_code == 503 and not_ready.json()["gateway_ok"] is False, not_ready.text
    # Started again (after 2 s), it serves. The daemon itself is restarted meanwhile (`llmctl daemon restart`):
    # the new daemon's gateway, once it has run for a minute, ends the episode the old one raised.
    ok = wait_for(lambda: _served(gw), 30, "a request served by the restarted gateway")
    assert ok
    assert d.llmctl("daemon", "restart", timeout=90).returncode == 0
    wait_for(lambda: [e for e in d.events() if e["kind"] == "alert.raised" and e.get("key") == "gateway.down"
                      and e.get("resolved")], 100, "gateway.down resolved")
    assert httpx.get(ready, timeout=10).status_code == 200


def _served(port: int) -> bool:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                          json={"model": "e", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                          ).status_code == 200
    except httpx.HTTPError:
        return False
