"""Faults injected into the daemon's surroundings: webhooks down, broken files, full disk, floods of
requests (valid and malformed), a garbage vm_stat, no NVML. The daemon must keep running and lose nothing."""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import STANDINS, free_port, short_tmpdir, standin_engine_toml, wait_for

pytestmark = [pytest.mark.slow]


def kinds(d, kind: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in d.events() if e["kind"] == kind]


# ---- webhook receiver down ----------------------------------------------------------------

class Receiver:
    """A real webhook receiver on 127.0.0.1 that can be down (not listening) and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.bodies: list[dict] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("content-length", "0"))
                bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _alerts_toml(url: str) -> str:
    return (f'\n[alerts]\ninitial_backoff = "1s"\nmax_backoff = "2s"\n'
            f'[[alerts.webhook]]\nname = "hook"\nurl = "{url}"\nformat = "json"\n')


def _webhook_outage(daemon_factory, outcome, outage_s: float, restart_daemon: bool) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver()
    d = daemon_factory(standin_engine_toml("e", free_port()) + _alerts_toml(receiver.url)).start()
    try:
        for _ in range(3):
            assert d.post("/v1/alerts/test").status_code == 200
            time.sleep(1.05)  # a test alert's key carries the second: one per second is a new alert
        # Each test alert is resolved at once: 3 firings and 3 resolves, 6 deliveries.
        wait_for(lambda: d.status()["alerts"]["pending"] == 6, 10, "six pending deliveries")
        time.sleep(outage_s / 2)
        if restart_daemon:
            d.kill()  # the daemon dies during the outage
            d.start()
            assert d.status()["alerts"]["pending"] == 6
        time.sleep(outage_s / 2)
        receiver.start()
        wait_for(lambda: d.status()["alerts"]["delivered"] == 6, 30, "all six delivered")
        time.sleep(1.0)  # nothing more may arrive
        ids = Counter(b.get("alert_id") for b in receiver.bodies)
        assert len(ids) == 6 and set(ids.values()) == {1}, ids
        outcome.observed = (f"3 alerts, each fired and resolved (6 deliveries), pending through a {outage_s:.0f} s "
                            f"outage{' and a daemon SIGKILL + restart' if restart_daemon else ''}; all 6 delivered "
                            "exactly once after recovery")
        outcome.lost = "nothing (0 lost, 0 duplicated)"
    finally:
        receiver.stop()


@pytest.mark.long_wait
@pytest.mark.chaos
def test_webhook_receiver_down_briefly_loses_no_alert(daemon_factory, outcome) -> None:
    """Alerts raised while the webhook receiver is down are all delivered, once each, when it is back."""
    outcome.scenario = "webhook receiver down (short outage, 4 s)"
    outcome.expected = "alerts stay pending, then each is delivered exactly once"
    _webhook_outage(daemon_factory, outcome, 4.0, restart_daemon=False)


@pytest.mark.chaos_full
def test_webhook_receiver_down_long_across_a_daemon_restart(daemon_factory, outcome) -> None:
    """A 40 s outage with the daemon SIGKILLed and restarted in the middle: every alert still arrives once."""
    outcome.scenario = "webhook receiver down (long outage, 40 s, daemon SIGKILLed and restarted meanwhile)"
    outcome.expected = "pending alerts survive the daemon restart; each delivered exactly once"
    _webhook_outage(daemon_factory, outcome, 40.0, restart_daemon=True)


# ---- broken files ---------------------------------------------------------------------------

@pytest.mark.chaos
def test_events_file_replaced_by_a_directory(daemon_factory, outcome) -> None:
    """events.jsonl unwritable (a directory in its place): the daemon keeps working; once fixed, no event is missing."""
    outcome.scenario = "events file unwritable (a directory in its place)"
    outcome.expected = ("daemon keeps running; events still on the control API; once fixed, the events of the "
                        "outage are written, in order")
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    path = d.state_dir / "events.jsonl"
    last_before = d.events()[-1]["seq"]
    path.unlink()
    path.mkdir()
    assert d.llmctl("stop", "e").returncode == 0
    d.wait_state("e", "stopped", 30)
    with d.client() as c:
        api = c.get("/v1/events", params={"lines": "1000"}).json()["events"]
    assert "engine.stopped" in [e["kind"] for e in api]
    during = [e["seq"] for e in api if e["seq"] > last_before]
    path.rmdir()
    assert d.post("/v1/engines/e/start").status_code == 200
    d.wait_state("e", "ready", 30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "engine.spawned" not in [e["kind"] for e in d.events()]:
        time.sleep(0.05)
    on_disk = d.events()
    seqs = [e["seq"] for e in on_disk]
    assert seqs == sorted(set(seqs)), seqs  # in order, each once
    assert set(during) <= set(seqs), (during, seqs)
    assert seqs[0] == during[0] and "engine.stopped" in [e["kind"] for e in on_disk]
    outcome.observed = (f"stop handled while unwritable; the {len(during)} events of the outage were written, in "
                        "order, once the directory was removed, followed by the new ones")
    outcome.lost = "nothing (the events of the outage were queued in memory and written late)"


@pytest.mark.chaos
def test_disk_full_state_dir(daemon_factory, outcome) -> None:
    """State dir on a full 64 KiB tmpfs: the daemon keeps supervising and writes again once space is back."""
    outcome.scenario = "disk full (state dir on a 64 KiB tmpfs, filled)"
    outcome.expected = "daemon keeps running and answering; engine keeps being supervised; writes resume"
    mount = short_tmpdir("full-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        state = mount / "s"
        state.mkdir()
        d = daemon_factory(standin_engine_toml("e", free_port()), state_dir=state)
        d.stderr_path = short_tmpdir("full-log-") / "daemon.stderr"  # the daemon's own stderr is not the state dir
        d.start()
        d.wait_state("e", "ready", 30)
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        before = len(d.events())
        assert d.llmctl("stop", "e").returncode == 0
        d.wait_state("e", "stopped", 30)
        assert d.post("/v1/engines/e/start").status_code == 200
        d.wait_state("e", "ready", 30)
        during = len(d.events())
        filler.unlink()
        assert d.llmctl("stop", "e").returncode == 0
        d.wait_state("e", "stopped", 30)
        with d.client() as c:
            last_seq = c.get("/v1/events", params={"lines": "1"}).json()["events"][-1]["seq"]
        deadline = time.monotonic() + 10  # the queued events go out on the writer's next retry (≤ 1 s)
        while time.monotonic() < deadline and (not d.events() or d.events()[-1]["seq"] < last_seq):
            time.sleep(0.05)
        after = d.events()
        assert after[-1]["kind"] in ("engine.state_changed", "engine.stopped")
        assert any(e["kind"] == "engine.stopped" for e in after[during:])
        seqs = [e["seq"] for e in after]
        assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[-1] + 1)), seqs  # no gap
        outcome.observed = (f"stop and start handled while full ({during - before} of the events fitted on disk); "
                            f"after space came back the queued events were written, in order, without a gap "
                            f"(seq {seqs[0]}..{seqs[-1]})")
        outcome.lost = "nothing (the events of the outage were queued in memory and written late)"
        d.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


# ---- request floods -------------------------------------------------------------------------

@pytest.mark.chaos
def test_a_thousand_concurrent_control_requests(daemon_factory, outcome) -> None:
    """1,000 concurrent control requests (status, start, stop, bad names): every one answered, state consistent."""
    outcome.scenario = "1,000 concurrent control requests"
    outcome.expected = "every request answered with 200/404/409 JSON; daemon up; at most one process per engine"
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    rng = random.Random(1000)

    async def flood() -> Counter[int]:
        transport = httpx.AsyncHTTPTransport(uds=str(d.socket), limits=httpx.Limits(max_connections=1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon", timeout=120) as c:
            async def one(i: int) -> int:
                pick = rng.random()
                if pick < 0.8:
                    r = await c.get("/v1/status")
                elif pick < 0.88:
                    r = await c.post("/v1/engines/e/start", json={})
                elif pick < 0.94:
                    r = await c.post("/v1/engines/e/stop", json={})
                else:
                    r = await c.post("/v1/engines/nope/start", json={})
                r.json()
                return r.status_code

            return Counter(await asyncio.gather(*(one(i) for i in range(1000))))

    t0 = time.monotonic()
    codes = asyncio.run(flood())
    took = time.monotonic() - t0
    assert sum(codes.values()) == 1000 and set(codes) <= {200, 404, 409}, codes
    assert d.status()["daemon"]["pid"] == d.proc.pid
    daemon_id = (d.state_dir / "daemon-id").read_text().strip()
    from tests.helpers import pids_with_tag_prefix

    final = wait_for(lambda: (e := d.engine("e"))["state"] in ("ready", "stopped", "backoff") and e, 30, "settled")
    assert len(pids_with_tag_prefix(daemon_id + "/")) <= 1
    outcome.observed = f"1,000 answered in {took:.1f} s ({dict(codes)}); engine settled {final['state']}; ≤ 1 process"
    outcome.lost = "nothing"


def _malformed(rng: random.Random, host: str) -> bytes:
    """One random malformed (or hostile) HTTP/1.1 request."""
    paths = ["/v1/status", "/v1/engines/e/start", "/v1/switch", "/v1/events", "/v1/chat/completions",
             "/v1/messages", "/v1/completions", "/../../etc/passwd", "/" + "a" * rng.randint(1, 9000), "*", ""]
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "BREW", "", "G\x00T", "POST" * 50]
    kind = rng.randrange(10)
    path = rng.choice(paths)
    method = rng.choice(methods)
    body = rng.choice([b"", b"{", b"[]", b"null", b'{"name": 5}', b'{"force": "yes"}', b'{"messages": 1}',
                       b'{"model": {"x": 1}, "messages": []}', b'{"stream": true, "max_tokens": -1}',
                       os.urandom(rng.randint(1, 2048)), b'{"a":' * 500])
    if kind == 0:
        return os.urandom(rng.randint(1, 4096))
    if kind == 1:
        return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(errors="replace")
    if kind == 2:  # lying content-length
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {rng.choice([-1, 10**12, 'x', 99999])}"
                f"\r\n\r\n").encode() + body
    if kind == 3:  # bad chunked encoding
        return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n".encode() + body
    if kind == 4:  # header flood
        return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + "X-A: b\r\n" * rng.randint(100, 2000) + "\r\n").encode()
    if kind == 5:  # wrong protocol version / no version
        return rng.choice([f"GET {path}\r\n\r\n", f"GET {path} HTTP/9.9\r\n\r\n", "\r\n\r\n", "GET"]).encode()
    if kind == 6:  # valid framing, hostile JSON
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if kind == 7:  # truncated body
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode() + body
    if kind == 8:  # non-ASCII header bytes
        return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: \xff\xfe\r\nX: \x00\x01\r\n\r\n"
    return (f"{method} {path}?lines={rng.choice(['x', '-5', '9' * 30])}&follow=0 HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n").encode(errors="replace")


def _send_raw(address: object, family: int, payload: bytes) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(address)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            return s.recv(65536)
        except OSError:
            return b""


def _malformed_flood(daemon_factory, outcome, count: int) -> None:  # type: ignore[no-untyped-def]
    gateway_port = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True)
                       + f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n').start()
    d.wait_state("e", "ready", 30)
    rng = random.Random(10_000)
    answered = Counter()
    server_errors = 0
    t0 = time.monotonic()
    targets = [(str(d.socket), socket.AF_UNIX, "daemon"), (("127.0.0.1", gateway_port), socket.AF_INET, "gateway")]
    for i in range(count):
        address, family, label = targets[i % 2]
        reply = _send_raw(address, family, _malformed(rng, "127.0.0.1"))
        status = reply[9:12].decode(errors="replace") if reply.startswith(b"HTTP/1.") else "closed"
        answered[f"{label}:{status[0] if status[0].isdigit() else status}xx" if status != "closed" else f"{label}:closed"] += 1
        if status.startswith("5") and status != "503":
            server_errors += 1
    took = time.monotonic() - t0
    assert d.proc.poll() is None, d.stderr()
    assert d.status()["daemon"]["pid"] == d.proc.pid
    assert d.engine("e")["state"] == "ready"
    ok = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/chat/completions", timeout=30,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    assert server_errors == 0, answered
    outcome.observed = (f"{count:,} sent in {took:.0f} s; answers {dict(sorted(answered.items()))}; no 5xx; "
                        "daemon up, engine ready, a valid request still served")
    outcome.lost = "nothing"


@pytest.mark.chaos
def test_a_thousand_malformed_requests(daemon_factory, outcome) -> None:
    """1,000 random malformed requests on the control socket and the gateway: no crash, no 5xx, still serving."""
    outcome.scenario = "1,000 random malformed control and gateway requests (seeded, raw sockets)"
    outcome.expected = "4xx or a closed connection for each; no 5xx; daemon and engine unaffected"
    _malformed_flood(daemon_factory, outcome, 1000)


@pytest.mark.chaos_full
def test_ten_thousand_malformed_requests(daemon_factory, outcome) -> None:
    """10,000 random malformed requests on the control socket and the gateway: no crash, no 5xx, still serving."""
    outcome.scenario = "10,000 random malformed control and gateway requests (seeded, raw sockets)"
    outcome.expected = "4xx or a closed connection for each; no 5xx; daemon and engine unaffected"
    _malformed_flood(daemon_factory, outcome, 10_000)


# ---- probes -------------------------------------------------------------------------------

@pytest.mark.chaos
def test_vm_stat_printing_garbage(daemon_factory, outcome, tmp_path: Path) -> None:
    """A vm_stat that prints garbage: the memory probe reports a clear error and the engine still runs."""
    outcome.scenario = "vm_stat printing garbage (platform darwin)"
    outcome.expected = "probe.failed naming the problem; status memory.error set; daemon and engine keep running"
    script = tmp_path / "vm_stat"
    script.write_text("#!/bin/sh\nprintf 'Mach Virtual Memory Statistics: (page size of banana bytes)\\n"
                      "Pages free: lots.\\n\\x01\\x02garbage\\n'\n")
    script.chmod(0o755)
    d = daemon_factory(standin_engine_toml("e", free_port())
                       + f'\n[probes]\nplatform = "darwin"\nvm_stat = "{script}"\nsysctl = "{STANDINS / "sysctl"}"\n',
                       env={"STANDIN_HW_MEMSIZE": str(64 * 2**30)}).start()
    d.wait_state("e", "ready", 30)
    failed = wait_for(lambda: kinds(d, "probe.failed"), 10, "probe.failed")
    error = d.status()["system"]["memory"]["error"]
    assert error and failed[0]["probe"] == "memory"
    outcome.observed = f"probe.failed: {error[:120]}; engine ready; daemon up"
    outcome.lost = "nothing (memory readings unavailable while it lasts)"


@pytest.mark.chaos
def test_nvml_library_missing(daemon_factory, outcome) -> None:
    """No NVML library on the machine: the daemon runs normally and doctor says GPU probing is unavailable."""
    outcome.scenario = "NVML library missing"
    outcome.expected = "daemon runs, engine ready, no GPUs in status; doctor reports 'unavailable' calmly"
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("an NVML library is installed on this machine")
    # An engine pinned to GPU 0 makes the daemon (and doctor) want NVML.
    d = daemon_factory(standin_engine_toml("e", free_port(), gpu_devices=[0]) + "\n[probes]\nnvml = true\n").start()
    d.wait_state("e", "ready", 30)
    assert d.status()["system"]["gpus"] == []
    doctor = d.llmctl("--config", str(d.config_path), "doctor")
    assert "Traceback" not in doctor.stderr + doctor.stdout
    line = next((ln for ln in (doctor.stdout + doctor.stderr).splitlines() if "nvml" in ln.lower() or "NVIDIA" in ln), "")
    assert "unavailable" in line, doctor.stdout + doctor.stderr
    outcome.observed = f"engine ready, gpus []; doctor: {line.strip()[:120]}"
    outcome.lost = "nothing"
