"""What the gateway costs, and whether traffic through it slows supervision: one run, side by side.

One ``supervisord-llm run`` (the real daemon, from a config) supervises a real ``mlx_lm.server`` on
the tiny local model with its gateway on; an nginx from the distribution's package (run as this
user, its own prefix in a temp dir, ``proxy_buffering off``) proxies the same engine. The same
requests then go three ways, rounds interleaved so all three see the same machine state:

- direct to the engine, through nginx, through the gateway: streamed chat, ``max_tokens`` 1, time
  to first body byte (p50/p90). mlx_lm.server answers HTTP/1.0 (a new connection per request, on
  every path); so the same is measured against an HTTP/1.1 engine too, the real llama-server (the
  tiny GGUF ``make engines`` builds) as a second engine of the same daemon, with its own nginx.
  llama-server keeps connections for plain answers but closes one after every streamed response
  (while its head says ``Keep-Alive``: see gateway/upstream.py), so every path connects anew for
  these requests too. A request of the direct client or nginx that gets no answer because it went
  out on a connection the engine had just closed is sent again and counted (``resent``; never on
  the gateway's path, where any failure fails the run);
- 16 and 32 concurrent streams of 128 tokens each way: tokens/s against direct; the CPU per token
  through the gateway (psutil ``cpu_times`` of the daemon and its gateway process over the gateway's
  rounds / their tokens), and nginx's for comparison. Each round is kept on its own (tokens, wall time,
  the client's and the engine's CPU, every stream's send, first token and end, and llama-server's own
  timing of it): the table gives each path's lowest and highest round and a 90% interval of the ratio
  from resampling the rounds, so a ratio below the target can be told from the rounds' noise.

Supervision under load, idle against 32 live streams through the gateway (a separate load process,
so its own work does not share the measuring process's interpreter):

- ``llmctl status``: the control request it sends (``GET /v1/status`` on the control socket), p50
  and max; and the whole ``llmctl status --json`` command;
- a SIGKILL of the engine until ``engine.exited`` is in events.jsonl (the event's own time, and
  when a reader polling the file saw it). A fresh engine after each kill comes from
  ``POST /v1/engines/tiny/start {"force": true}`` (automatic restarts are 60 s apart by design).

Where nginx is missing the bench says so and measures the rest. The figures go into
docs/benchmarks.md between ``<!-- gateway:start -->`` and ``<!-- gateway:end -->`` with the date and
commit of the run; raw numbers in bench/results/gateway.json.

    .venv/bin/python bench/gateway_bench.py            # full run (~5 min), writes docs/benchmarks.md
    .venv/bin/python bench/gateway_bench.py --quick    # fewer rounds, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BIN,
    REPO,
    Daemon,
    event_wall_s,
    file_size,
    free_port,
    machine_info,
    mlx_engine_toml,
    short_tmpdir,
    tail_until,
    tiny_model_dir,
    wait_ready_pid,
    wait_until,
    write_section,
)

from tests.llama_cpp_engine import llama_engine_toml, llama_server_binary, tiny_gguf  # noqa: E402

TARGET_ADDED_TTFB_P50_MS = 1.0
TARGET_NGINX_MULTIPLE = 3.0
TARGET_RATE_RATIO = 0.98
TARGET_STATUS_MULTIPLE = 1.5
TARGET_EXIT_MULTIPLE = 2.0
ENGINE = "tiny"
LLAMA_ENGINE = "tinyllama"
# mlx_lm.server listens with a backlog of 5 and drops connections of a burst (direct clients then
# fail; the gateway retries them), so the streams of a round start this far apart on every path.
STAGGER_S = 0.015
PROMPT = [{"role": "user", "content": "hello"}]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# ---- nginx ----------------------------------------------------------------------------------


class Nginx:
    """nginx from the distribution, as this user, with its own prefix and config in a temp dir."""

    def __init__(self, upstream_port: int) -> None:
        exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                            if os.path.exists(p)), None)
        if exe is None:
            raise FileNotFoundError("nginx is not installed (Debian/Ubuntu: apt-get install nginx)")
        self.exe = exe
        self.prefix = short_tmpdir("ngx-")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # Run as root (CI containers), nginx would switch its worker to "nobody": keep it this user.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.getuid() == 0 else ""
        temp = "\n".join(f"    {k}_temp_path {self.prefix}/{k};" for k in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.prefix / "nginx.conf").write_text(f"""{user}
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    # Closes a kept-alive connection before the engine would (llama-server: after 100 requests or 5 s
    # idle): a POST sent on a connection the engine just closed is a 502, not retried.
    upstream engine {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 90;
                       keepalive_timeout 4s; }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
        self.version = subprocess.run([exe, "-v"], capture_output=True, text=True).stderr.strip()
        self.proc = subprocess.Popen([exe, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(lambda: _accepts(self.port), 10, "nginx listening")

    def pids(self) -> list[int]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- the client side --------------------------------------------------------------------------


# How long a pre-opened connection waits before its request is timed (``ttfb_preopened``).
PREOPEN_SETTLE_S = 0.005
# Sends of one request, at most, when it got no answer at all (see ``ttfb_once``).
TTFB_SENDS = 3


async def ttfb_once(client: httpx.AsyncClient, url: str, model: str, resent: list[int] | None = None,
                    *, proxy_502: bool = False) -> float:
    """Time to the first body byte of one streamed request.

    With ``resent`` (the direct and nginx paths, never the gateway's: its failures fail the run), a
    request that got no response head because it went out on a pooled connection the engine had
    just closed (llama-server closes one after every stream) is sent again, timed from the new
    send, and counted in ``resent[0]``; with ``proxy_502`` (nginx) so is nginx's 502 for the same
    on its side. Anything after the head is never resent."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 1, "stream": True}
    for attempt in range(TTFB_SENDS):
        last = resent is None or attempt + 1 == TTFB_SENDS
        started = time.perf_counter()
        first: float | None = None
        head = False
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code == 502 and proxy_502 and not last:
                    raise httpx.RemoteProtocolError("502 from nginx: the engine gave it no answer")
                head = True
                response.raise_for_status()
                async for _ in response.aiter_raw():
                    if first is None:
                        first = time.perf_counter() - started
        except httpx.RemoteProtocolError:
            if head or last:
                raise
            assert resent is not None
            resent[0] += 1
            continue
        assert first is not None
        return first
    raise AssertionError("unreachable")


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int,
                     resent: list[int] | None = None, *, proxy_502: bool = False,
                     record: list[list[Any]] | None = None) -> int:
    """The content tokens of one streamed completion. With ``resent`` (direct and nginx, never the
    gateway), a stream whose connection failed before its response head (mlx_lm.server's listen
    backlog of 5 drops connections of a burst; a connection llama-server had just closed) is sent
    again and counted in ``resent[0]``, and with ``proxy_502`` (nginx) so is nginx's 502 for the
    same on its side; the failed attempt stays in the round's wall time. Any other answer than 200
    fails the run, naming the path and the answer.

    With ``record``, one row is appended: [sent, first content token, end] (``time.perf_counter``; sent is
    the first attempt's), the tokens, and the engine's own ``prompt_ms`` and ``predicted_ms`` from the
    ``timings`` of its last chunk (llama-server; None where the engine gives none)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    sent = time.perf_counter()
    for attempt in range(TTFB_SENDS):
        tokens = 0
        first: float | None = None
        timings: dict[str, Any] = {}
        head = False
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code == 502 and proxy_502 and resent is not None and attempt + 1 < TTFB_SENDS:
                    resent[0] += 1
                    continue
                head = True
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise RuntimeError(f"{url}: HTTP {response.status_code} for a stream: {text.strip()[:300]}")
                async for line in response.aiter_lines():
                    if line.startswith("data:") and '"content":' in line and '"content": ""' not in line:
                        tokens += 1
                        if first is None:
                            first = time.perf_counter()
                    elif record is not None and '"timings"' in line and line.startswith("data:"):
                        try:
                            timings = json.loads(line[5:]).get("timings") or {}
                        except ValueError:
                            pass
        except httpx.TransportError:
            if head or resent is None or attempt + 1 == TTFB_SENDS:
                raise
            resent[0] += 1
            continue
        if record is not None:
            record.append([sent, first, time.perf_counter(), tokens, timings.get("prompt_ms"),
                           timings.get("predicted_ms")])
        return tokens
    raise AssertionError("unreachable")


async def streams_round(client: httpx.AsyncClient, url: str, model: str, streams: int,
                        max_tokens: int, resent: list[int] | None = None, *, proxy_502: bool = False,
                        record: list[list[Any]] | None = None) -> tuple[int, float]:
    """One round of ``streams`` concurrent streams, started ``STAGGER_S`` apart: (tokens, wall time). With
    ``record``, each stream's row (see ``one_stream``), its times made relative to the round's start."""
    rows: list[list[Any]] | None = [] if record is not None else None

    async def staggered(i: int) -> int:
        await asyncio.sleep(i * STAGGER_S)
        return await one_stream(client, url, model, max_tokens, resent, proxy_502=proxy_502, record=rows)

    started = time.perf_counter()
    counts = await asyncio.gather(*(staggered(i) for i in range(streams)))
    wall_s = time.perf_counter() - started
    if record is not None and rows is not None:
        for sent, first, end, tokens, prompt_ms, predicted_ms in rows:
            record.append([round(sent - started, 5), None if first is None else round(first - started, 5),
                           round(end - started, 5), tokens, prompt_ms, predicted_ms])
    return sum(counts), wall_s


def llama_server() -> tuple[Path, Path] | None:
    """The real llama-server and its tiny GGUF, where ``make engines`` built them."""
    binary, model = llama_server_binary(), tiny_gguf()
    return (binary, model) if binary is not None and binary.is_file() and model.is_file() else None


async def measure_ttfb(paths: dict[str, tuple[str, str]], rounds: int) -> dict[str, Any]:
    """TTFB rounds only, interleaved across the paths (each warmed first)."""
    ttfb: dict[str, list[float]] = {n: [] for n in paths}
    resent: dict[str, list[int]] = {n: [0] for n in paths}
    names = list(paths)
    async with httpx.AsyncClient(timeout=120) as client:
        for name, (url, model) in paths.items():
            for _ in range(3):
                await ttfb_once(client, url, model, **_resends(name, [0]))
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                url, model = paths[name]
                ttfb[name].append(await ttfb_once(client, url, model, **_resends(name, resent[name])))
    return _ttfb_figures(ttfb, resent)


def ttfb_preopened(port: int, model: str, resent: list[int] | None = None, *, proxy_502: bool = False) -> float:
    """Time to the first body byte of one streamed request on a connection opened (and accepted) before the
    clock: no path's figure holds its client's connect, while a proxy's own connect to the engine is in its
    figure, as for a client that keeps its connection to the proxy open (an SDK's pool). The request is
    written with one send, as a raw HTTP/1.1 request with ``Connection: close``: one request per connection,
    which is also all llama-server gives a streamed request.

    With ``resent`` (direct and nginx, never the gateway: its failures fail the run), a request whose
    connection closed before any answer, or (``proxy_502``) that nginx answered 502 because it went out on an
    upstream connection the engine had just closed, is sent again on a new pre-opened connection, timed from
    that send, and counted in ``resent[0]``."""
    import socket

    body = json.dumps({"model": model, "messages": PROMPT, "max_tokens": 1, "stream": True}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    for attempt in range(TTFB_SENDS):
        retry_ok = resent is not None and attempt + 1 < TTFB_SENDS
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            time.sleep(PREOPEN_SETTLE_S)  # time for the server to accept it (the kernel did the handshake) first
            started = time.perf_counter()
            sock.sendall(request)
            seen = b""
            first: float | None = None
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                seen += data
                end = seen.find(b"\r\n\r\n")
                if end >= 0 and len(seen) > end + 4:
                    first = time.perf_counter() - started
                    break
            if not seen and retry_ok:
                assert resent is not None
                resent[0] += 1
                continue
            if seen[9:12] == b"502" and proxy_502 and retry_ok:
                assert resent is not None
                resent[0] += 1
                continue
            if first is None:
                raise RuntimeError(f"port {port}: the connection closed before a body byte: {seen[:200]!r}")
            if not seen.startswith(b"HTTP/1.") or seen[9:12] != b"200":
                raise RuntimeError(f"port {port}: {seen[:300]!r}")
            while sock.recv(65536):  # read to the end, so the next request finds the engine idle
                pass
        return first
    raise AssertionError("unreachable")


def measure_ttfb_preopened(paths: dict[str, tuple[str, str]], rounds: int) -> dict[str, Any]:
    """``ttfb_preopened`` rounds, interleaved across the paths (each warmed first)."""
    ports = {n: (int(url.rsplit(":", 1)[1]), model) for n, (url, model) in paths.items()}
    ttfb: dict[str, list[float]] = {n: [] for n in ports}
    resent: dict[str, list[int]] = {n: [0] for n in ports}
    for name, (port, model) in ports.items():
        for _ in range(3):
            ttfb_preopened(port, model, **_resends(name, [0]))
    names = list(ports)
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            ttfb[name].append(ttfb_preopened(*ports[name], **_resends(name, resent[name])))
    return _ttfb_figures(ttfb, resent)


def _resends(path: str, counter: list[int]) -> dict[str, Any]:
    """``ttfb_once``'s resend arguments for a path: none for the gateway's."""
    if path == "gateway":
        return {}
    return {"resent": counter, "proxy_502": path == "nginx"}


def _ttfb_figures(ttfb: dict[str, list[float]], resent: dict[str, list[int]]) -> dict[str, Any]:
    return {n: {"p50": pct(v, 0.5) * 1e3, "p90": pct(v, 0.9) * 1e3, "n": len(v), "resent": resent[n][0]}
            for n, v in ttfb.items()}


async def measure_paths(paths: dict[str, tuple[str, str]], cpu_pids: dict[str, list[int]],
                        args: argparse.Namespace, engine_pids: list[int] | None = None) -> dict[str, Any]:
    """TTFB rounds and concurrent-stream rounds, interleaved across the paths. Each stream round is also
    kept on its own (``rounds``): its tokens and wall time, the path's CPU, the client's (this process's)
    and the engine's (``engine_pids``) CPU, and each stream's times (see ``streams_round``)."""
    names = list(paths)
    ttfb: dict[str, list[float]] = {n: [] for n in names}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for name, (url, model) in paths.items():  # warm every path
            for _ in range(3):
                await ttfb_once(client, url, model, **_resends(name, [0]))
        for i in range(args.ttfb_rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                url, model = paths[name]
                ttfb[name].append(await ttfb_once(client, url, model))
        streams: dict[int, dict[str, dict[str, Any]]] = {}
        for n_streams in (16, 32):
            per: dict[str, dict[str, Any]] = {n: {"tokens": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "resent": 0,
                                                  "rounds": []} for n in names}
            for name, (url, model) in paths.items():
                await streams_round(client, url, model, n_streams, 8, **_resends(name, [0]))
            for i in range(args.stream_rounds):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    url, model = paths[name]
                    resends = _resends(name, [0])
                    resent = resends.get("resent")
                    rows: list[list[Any]] = []
                    before = cpu_s(cpu_pids.get(name, []))
                    engine_before = cpu_s(engine_pids or [])
                    client_before = time.process_time()
                    tokens, wall_s = await streams_round(client, url, model, n_streams, args.max_tokens, **resends,
                                                         record=rows)
                    client_cpu = time.process_time() - client_before
                    engine_cpu = cpu_s(engine_pids or []) - engine_before
                    used = cpu_s(cpu_pids.get(name, [])) - before
                    per[name]["cpu_s"] += used
                    per[name]["tokens"] += tokens
                    per[name]["wall_s"] += wall_s
                    per[name]["resent"] += resent[0] if resent else 0
                    # Each round on its own: its spread tells the rounds' noise from a path's overhead.
                    per[name]["rounds"].append({
                        "order": i, "tokens": tokens, "wall_s": round(wall_s, 5), "cpu_s": round(used, 3),
                        "client_cpu_s": round(client_cpu, 4),
                        "engine_cpu_s": round(engine_cpu, 3) if engine_pids else None, "streams": rows})
            streams[n_streams] = per
    return {
        "ttfb_ms": {n: {"p50": pct(v, 0.5) * 1e3, "p90": pct(v, 0.9) * 1e3, "n": len(v)} for n, v in ttfb.items()
                    if v},
        "streams": {
            k: {n: {**p, "tokens_per_s": p["tokens"] / p["wall_s"],
                    "cpu_us_per_token": p["cpu_s"] / p["tokens"] * 1e6 if p["tokens"] else None}
                for n, p in per.items()}
            for k, per in streams.items()
        },
    }


# ---- load: 32 live streams, from a separate process ------------------------------------------


def run_load(url: str, model: str, streams: int, flowing_file: Path) -> None:
    """Keep ``streams`` streams live through ``url`` until SIGTERM (errors are retried: the engine is
    killed under this load). ``flowing_file`` holds the count of stream lines read so far."""

    async def main() -> None:
        tokens = 0
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams * 2)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5), limits=limits) as client:
            async def worker(i: int) -> None:
                nonlocal tokens
                await asyncio.sleep(i * STAGGER_S)
                body = {"model": model, "messages": PROMPT, "max_tokens": 100000, "stream": True}
                while not stopping.is_set():
                    try:
                        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                            async for line in r.aiter_lines():
                                if line.startswith("data:"):
                                    tokens += 1
                                if stopping.is_set():
                                    return
                    except httpx.HTTPError:
                        await asyncio.sleep(0.2)

            async def report() -> None:
                while not stopping.is_set():
                    await asyncio.to_thread(flowing_file.write_text, str(tokens))
                    await asyncio.sleep(0.2)

            await asyncio.gather(report(), *(worker(i) for i in range(streams)))

    asyncio.run(main())


class Load:
    def __init__(self, url: str, model: str, streams: int) -> None:
        self.dir = short_tmpdir("gwload-")
        self.flowing = self.dir / "tokens"
        self.proc = subprocess.Popen([sys.executable, __file__, "--load", url, "--load-model", model,
                                      "--load-streams", str(streams),
                                      "--load-dir", str(self.dir)], start_new_session=True)

    def tokens(self) -> int:
        try:
            return int(self.flowing.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def wait_flowing(self, timeout_s: float = 60) -> None:
        start = self.tokens()
        wait_until(lambda: self.tokens() > start + 500, timeout_s, "streams flowing through the gateway")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def status_latencies(d: Daemon, samples: int, cli_samples: int) -> dict[str, list[float]]:
    request_ms: list[float] = []
    for _ in range(samples):
        with d.client() as c:  # a new connection each time, as llmctl makes
            started = time.perf_counter()
            assert c.get("/v1/status").status_code == 200
            request_ms.append((time.perf_counter() - started) * 1e3)
        time.sleep(0.05)
    cli_ms: list[float] = []
    env = {**os.environ, "SUPERVISORD_LLM_STATE_DIR": str(d.state_dir)}
    for _ in range(cli_samples):
        started = time.perf_counter()
        subprocess.run([str(BIN / "llmctl"), "status", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
        cli_ms.append((time.perf_counter() - started) * 1e3)
    return {"request_ms": request_ms, "cli_ms": cli_ms}


def kill_to_exit_ms(d: Daemon, engine: str, pid: int) -> tuple[float, float, int]:
    """SIGKILL the engine; (kill → event's own time, kill → seen in events.jsonl, the next pid)."""
    events_path = d.state_dir / "events.jsonl"
    offset = file_size(events_path)
    mono0, wall0 = time.monotonic(), time.time()
    os.kill(pid, signal.SIGKILL)
    seen_at, line = tail_until(events_path, offset,
                               lambda s: '"engine.exited"' in s and f'"pid":{pid},' in s, 30)
    recorded_ms = (event_wall_s(json.loads(line)) - wall0) * 1e3
    observed_ms = (seen_at - mono0) * 1e3
    response = d.post(f"/v1/engines/{engine}/start", {"force": True})
    assert response.status_code == 200, response.text
    return recorded_ms, observed_ms, wait_ready_pid(d, engine, pid, 120)


def process_cpu(pids: dict[str, int], window_s: float) -> dict[str, float]:
    """CPU seconds per second over ``window_s`` of each named process (the daemon, where supervision
    runs, and its gateway process)."""
    before = {name: cpu_s([pid]) for name, pid in pids.items()}
    time.sleep(window_s)
    return {name: (cpu_s([pid]) - before[name]) / window_s for name, pid in pids.items()}


def measure_supervision(d: Daemon, engine: str, gateway_url: str, engine_url: tuple[str, str],
                        args: argparse.Namespace) -> dict[str, Any]:
    """Idle; 32 live streams through the gateway ("load"); the same 32 streams straight to the engine
    ("direct"): the machine as busy, but no traffic through the daemon, which tells the gateway's
    share from the machine's."""
    pids = {"daemon": d.proc.pid, "gateway": d.status()["gateway"]["pid"]}  # type: ignore[union-attr]
    loads = {"idle": None, "load": (gateway_url, engine), "direct": engine_url}
    out: dict[str, Any] = {phase: {} for phase in loads}
    for phase, target in loads.items():
        load = Load(*target, 32) if target else None
        try:
            if load is not None:
                load.wait_flowing()
            out[phase]["cpu"] = process_cpu(pids, args.cpu_window_s)
            out[phase].update(status_latencies(d, args.status_samples, args.cli_samples))
        finally:
            if load is not None:
                load.close()
    engine_pid = d.engine(engine)["pid"]
    for phase, target in loads.items():
        recorded, observed = [], []
        for _ in range(args.kills):
            load = Load(*target, 32) if target else None
            try:
                if load is not None:
                    load.wait_flowing()
                time.sleep(0.3)
                r, o, engine_pid = kill_to_exit_ms(d, engine, engine_pid)
                recorded.append(r)
                observed.append(o)
            finally:
                if load is not None:
                    load.close()
        out[phase]["exit_recorded_ms"] = recorded
        out[phase]["exit_observed_ms"] = observed
    return out


# ---- the report ---------------------------------------------------------------------------------


BOOTSTRAP_RESAMPLES = 2000


def ratio_interval(path: dict[str, Any], direct: dict[str, Any], q: float = 0.90) -> tuple[float, float]:
    """The ``q`` interval of a path's tokens/s ratio to direct (every token over every round's wall time, as
    the table's ratio), from resampling the rounds with replacement: round i of the path with round i of
    direct (rounds are interleaved, so the two ran next to each other). Seeded: the same run renders the same
    text."""
    import random

    pairs = [(p["tokens"], p["wall_s"], d["tokens"], d["wall_s"]) for p, d in zip(path["rounds"], direct["rounds"],
                                                                              strict=True)]
    rng = random.Random(15)
    ratios = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        ratios.append((sum(x[0] for x in sample) / sum(x[1] for x in sample))
                      / (sum(x[2] for x in sample) / sum(x[3] for x in sample)))
    return pct(ratios, (1 - q) / 2), pct(ratios, 1 - (1 - q) / 2)


def round_rows(streams: dict[Any, dict[str, dict[str, Any]]]) -> list[str]:
    """The rows of the rounds' table (see ``render``): medians over each path's rounds."""
    def med(values: list[float]) -> float:
        return pct(values, 0.5)

    rows = []
    for k, per in streams.items():
        for name, p in per.items():
            walls, ttft50, ttftmax, gen, eng, tail, client, engine = [], [], [], [], [], [], [], []
            for rnd in p["rounds"]:
                rows_ = [s for s in rnd["streams"] if s[1] is not None]
                walls.append(rnd["wall_s"] * 1e3)
                client.append(rnd["client_cpu_s"] / rnd["wall_s"])
                if rnd.get("engine_cpu_s") is not None:
                    engine.append(rnd["engine_cpu_s"] / rnd["wall_s"])
                if not rows_:
                    continue
                firsts = [(s[1] - s[0]) * 1e3 for s in rows_]
                ttft50.append(med(firsts))
                ttftmax.append(max(firsts))
                gen.append(med([(s[2] - s[1]) * 1e3 for s in rows_]))
                if all(s[5] is not None for s in rows_):
                    eng.append(med([s[5] for s in rows_]))
                ends = [s[2] for s in rows_]
                tail.append((max(ends) - min(ends)) * 1e3)
            cells = [f"{med(walls):.0f} ms",
                     f"{med(ttft50):.1f} / {med(ttftmax):.1f} ms" if ttft50 else "",
                     f"{med(gen):.0f} ms" if gen else "", f"{med(eng):.0f} ms" if eng else "",
                     f"{med(tail):.0f} ms" if tail else "", f"{med(client):.2f}",
                     f"{med(engine):.2f}" if engine else ""]
            rows.append(f"| {k} | {name} | " + " | ".join(cells) + " |")
    return rows


def commit() -> str:
    if os.environ.get("SUPERVISORD_LLM_BENCH_COMMIT"):  # a copy of the tree without its .git (a GPU machine)
        return os.environ["SUPERVISORD_LLM_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ttfb_rows(figures: dict[str, Any], *, resent: bool) -> list[str]:
    """A TTFB table's rows: each path's p50 and p90, its time added to the direct path's p50, and (``resent``)
    how many of its requests were sent again."""
    base = figures["direct"]["p50"]
    rows = []
    for name, t in figures.items():
        added = "" if name == "direct" else f"{t['p50'] - base:+.2f} ms"
        rows.append(f"| {name} | {t['p50']:.2f} ms | {t['p90']:.2f} ms | {added} |"
                    + (f" {t.get('resent', 0)} |" if resent else ""))
    return rows


def _ttfb_target(label: str, figures: dict[str, Any]) -> str:
    """The TTFB target line for a table with an nginx path: the gateway's added p50 against the absolute
    limit and against the multiple of nginx's."""
    added = figures["gateway"]["p50"] - figures["direct"]["p50"]
    nginx = figures["nginx"]["p50"] - figures["direct"]["p50"]
    return (f"- {label}added TTFB p50 through the gateway {added:+.2f} ms: ≤ {TARGET_ADDED_TTFB_P50_MS} ms "
            f"{met(added <= TARGET_ADDED_TTFB_P50_MS)}; ≤ {TARGET_NGINX_MULTIPLE:g}× nginx's {nginx:+.2f} ms "
            f"{met(added <= TARGET_NGINX_MULTIPLE * max(nginx, 0.0))}.")


def render(r: dict[str, Any]) -> str:
    ttfb, streams, sup = r["paths"]["ttfb_ms"], r["paths"]["streams"], r["supervision"]
    has_nginx = "nginx" in ttfb
    d50 = ttfb["direct"]["p50"]
    alone = r.get("engine") == "llama"  # --engine llama: llama-server is the one engine
    gpus = r.get("gpus") or []
    if alone:
        engine = (f"the real llama.cpp `llama-server` (`{r['llama_args']}`; a GGUF of "
                  f"{r['model_bytes'] / 1e6:.0f} MB)" + (f" on {', '.join(gpus)}" if gpus else ""))
    else:
        engine = "a real `mlx_lm.server` (tiny model)"
    lines = [
        "## Gateway overhead and supervision under load" + (": llama-server" if alone else ""),
        "",
        f"_Run {r['when']} at commit `{r['commit']}` ({r['took_s']:.0f} s)._",
        "",
        f"One `supervisord-llm run` supervises {engine} with its gateway on; "
        + (f"{r['nginx_version']} (`proxy_buffering off`, upstream keepalive) proxies the same engine. "
           if has_nginx else f"nginx was not run: {r['nginx_missing']}. ")
        + "Streamed chat completions, rounds interleaved so every path sees the same machine state.",
        "",
        f"Time to first body byte, `max_tokens` 1, {ttfb['direct']['n']} requests per path"
        + (". llama-server closes its connection after every streamed response (its head says `Keep-Alive` all "
           "the same), so each path connects to it per request; a request the direct client or nginx sent on a "
           "connection the engine had just closed got no answer and was sent again, timed from that send "
           "(`resent`); the gateway path is never resent (a failure there fails the run):" if alone else ":"),
        "",
        "| path | TTFB p50 | TTFB p90 | added p50 |" + (" resent |" if alone else ""),
        "|---|---:|---:|---:|" + ("---:|" if alone else ""),
    ]
    lines += _ttfb_rows(ttfb, resent=alone)
    llama = r.get("llama")
    if llama is not None:
        lines += ["", "mlx_lm.server answers HTTP/1.0: every request on every path opens a connection to it (the "
                  "direct client's own connect is in its figure; nginx and the gateway keep the client's "
                  "connection). The same against an HTTP/1.1 engine, the real llama-server (tiny GGUF) as a "
                  f"second engine of the same daemon, behind its own nginx, {llama['direct']['n']} requests "
                  "per path. llama-server closes its connection after every streamed response (its head says "
                  "`Keep-Alive` all the same), so here too each path connects to it per request. A request "
                  "the direct client or nginx sent on a connection the engine had just closed got no answer "
                  "and was sent again, timed from that send (`resent`); the gateway path is never resent "
                  "(a failure there fails the run), and the gateway's own resend of such a request, should "
                  "one happen, is inside its figure:", "",
                  "| path | TTFB p50 | TTFB p90 | added p50 | resent |", "|---|---:|---:|---:|---:|",
                  *_ttfb_rows(llama, resent=True)]
    elif "llama_missing" in r:
        lines += ["", f"The llama-server comparison was not made: {r['llama_missing']}."]
    pre = r.get("preopened")
    if pre is not None:
        pre_resent = alone and any(t.get("resent") for t in pre.values())
        lines += ["", ("The same llama-server" if alone else "The same mlx_lm.server")
                  + " with each client's connection opened (and accepted) before the clock, "
                  "one raw HTTP/1.1 request per connection, written with one send: no path's figure holds its "
                  "client's connect, while nginx's and the gateway's connects to the engine"
                  + (", where they make one (the gateway may have a spare connection open already)," if alone
                     else "") + " are inside theirs. "
                  f"{pre['direct']['n']} requests per path, interleaved:", "",
                  "| path | TTFB p50 | TTFB p90 | added p50 |" + (" resent |" if pre_resent else ""),
                  "|---|---:|---:|---:|" + ("---:|" if pre_resent else ""), *_ttfb_rows(pre, resent=pre_resent)]
    rounds_kept = all("rounds" in p for per in streams.values() for p in per.values())
    lines += ["", f"Concurrent streams of {r['max_tokens']} tokens, {r['stream_rounds']} rounds per path; "
              "tokens/s is every token of every stream over the rounds' wall time; CPU is the daemon's and its "
              "gateway process's together, or all nginx processes', over that path's rounds"
              + ("; per round: the lowest and highest of the path's tokens/s in one round; the ratio's 90% "
                 f"interval: the 5th to 95th percentile of the same ratio over {BOOTSTRAP_RESAMPLES} resamples "
                 "of the rounds (with replacement, each path's round with the direct round of the same "
                 "index, run next to it), the noise from round to round:" if rounds_kept else ":"), "",
              "| streams | path | tokens/s | per round | ratio to direct | ratio's 90% interval | CPU per token |"
              if rounds_kept else "| streams | path | tokens/s | ratio to direct | CPU per token |",
              "|---:|---|---:|---:|---:|---:|---:|" if rounds_kept else "|---:|---|---:|---:|---:|"]
    for k, per in streams.items():
        direct_rate = per["direct"]["tokens_per_s"]
        for name, p in per.items():
            cpu = f"{p['cpu_us_per_token']:.0f} µs" if p.get("cpu_us_per_token") and name != "direct" else ""
            ratio = f"{p['tokens_per_s'] / direct_rate:.3f}"
            if rounds_kept:
                rates = [x["tokens"] / x["wall_s"] for x in p["rounds"]]
                spread = f"{min(rates):.0f}–{max(rates):.0f}"
                interval = "" if name == "direct" else "{:.3f}–{:.3f}".format(*ratio_interval(p, per["direct"]))
                lines.append(f"| {k} | {name} | {p['tokens_per_s']:.0f} | {spread} | {ratio} | {interval} | {cpu} |")
            else:
                lines.append(f"| {k} | {name} | {p['tokens_per_s']:.0f} | {ratio} | {cpu} |")
    if rounds_kept:
        top = max(int(k) for k in streams)
        lines += ["", "How the rounds went, each figure the median over a path's rounds: a round's streams start "
                  f"{STAGGER_S * 1e3:g} ms apart (the last {STAGGER_S * 1e3 * (top - 1):.0f} ms after the "
                  f"first at {top} streams) and the round ends with its last stream. First token: from a stream's send "
                  "to its first content token, the median and the slowest stream of the round; generation: from "
                  "a stream's first to its last token as the client saw it, and as the engine timed it "
                  "(`predicted_ms` of its last chunk); client CPU: this process's CPU over the round's wall time "
                  "(1.00 would be one core, all its client can use); engine CPU: the engine process's:", "",
                  "| streams | path | round wall | first token p50 / max | generation, client | generation, "
                  "engine | last stream ends after the first by | client CPU | engine CPU |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
                  *round_rows(streams)]
    resends = [f"{name} {p['resent']} at {k} streams" for k, per in streams.items() for name, p in per.items()
               if p.get("resent")]
    lines += ["", "Streams whose connection failed before a response head ("
              + ("a connection the engine had just closed" if alone else "mlx_lm.server's listen backlog of 5")
              + ") and were sent again (direct and nginx only; the failed attempt stays in the round's time): "
              + (", ".join(resends) if resends else "none") + "."]
    ri, rl = sup["idle"], sup["load"]
    phases = [sup[p] for p in ("idle", "load", "direct") if p in sup]

    def row(label: str, key: str, fmt: str = ".1f", unit: str = "ms") -> str:
        cells = [f"{pct(ph[key], .5):{fmt}} / {max(ph[key]):{fmt}} {unit}" for ph in phases]
        return f"| {label} | " + " | ".join(cells) + " |"

    def cpu_row(label: str, key: str) -> str:
        return f"| {label} | " + " | ".join(f"{ph['cpu'][key] * 1e3:.0f} ms/s" for ph in phases) + " |"

    lines += [
        "", "Supervision: idle; with 32 live streams through the gateway (a separate load process); and with the "
        "same 32 streams straight to the engine (the machine as busy, no traffic through the daemon):", "",
        "| measure (p50 / max) | idle | 32 streams through the gateway | 32 streams direct to the engine |",
        "|---|---:|---:|---:|",
        row(f"`llmctl status` request (`GET /v1/status` on the control socket), {len(ri['request_ms'])} samples",
            "request_ms"),
        row(f"`llmctl status --json` command (process start included), {len(ri['cli_ms'])} runs", "cli_ms", ".0f"),
        row(f"SIGKILL of the engine → `engine.exited` recorded (event time), {len(ri['exit_recorded_ms'])} kills",
            "exit_recorded_ms"),
        row("SIGKILL → the line seen in events.jsonl by a reader polling every ms", "exit_observed_ms"),
        cpu_row(f"CPU of the daemon's process (supervision), over {r['cpu_window_s']:g} s", "daemon"),
        cpu_row("CPU of the gateway's process (the traffic)", "gateway"),
        "",
        "Targets (issue 15):",
        "",
    ]
    g_added = ttfb["gateway"]["p50"] - d50
    if has_nginx:
        lines.append(_ttfb_target("", ttfb))
    else:
        lines.append(f"- added TTFB p50 through the gateway {g_added:+.2f} ms: ≤ {TARGET_ADDED_TTFB_P50_MS} ms "
                     f"{met(g_added <= TARGET_ADDED_TTFB_P50_MS)}; the nginx comparison was not made.")
    if pre is not None and "nginx" in pre:
        lines.append(_ttfb_target("connections opened before the clock: ", pre))
    if llama is not None and "nginx" in llama:
        lines.append(_ttfb_target("llama-server: ", llama))
    for k, per in streams.items():
        ratio = per["gateway"]["tokens_per_s"] / per["direct"]["tokens_per_s"]
        noise = ""
        if rounds_kept:
            lo, hi = ratio_interval(per["gateway"], per["direct"])
            where = ("above it beyond the round-to-round noise" if lo >= TARGET_RATE_RATIO else
                     "below it beyond the round-to-round noise" if hi < TARGET_RATE_RATIO else
                     f"{TARGET_RATE_RATIO} inside it: not told apart from the noise")
            noise = f" (90% interval {lo:.3f}–{hi:.3f}: {where}"
            if "nginx" in per:
                nlo, nhi = ratio_interval(per["nginx"], per["direct"])
                noise += (f"; nginx {per['nginx']['tokens_per_s'] / per['direct']['tokens_per_s']:.3f}, "
                          f"{nlo:.3f}–{nhi:.3f}")
            noise += ")"
        lines.append(f"- {k} streams: gateway tokens/s ratio {ratio:.3f} ≥ {TARGET_RATE_RATIO} {met(ratio >= TARGET_RATE_RATIO)}"
                     f"{noise}; daemon and gateway CPU per token {per['gateway']['cpu_us_per_token']:.0f} µs"
                     + (f" (nginx {per['nginx']['cpu_us_per_token']:.0f} µs)" if rounds_kept and per.get(
                         "nginx", {}).get("cpu_us_per_token") else "") + ".")
    s_ratio = pct(rl["request_ms"], .5) / pct(ri["request_ms"], .5)
    e_ratio = pct(rl["exit_recorded_ms"], .5) / pct(ri["exit_recorded_ms"], .5)
    lines += [
        f"- `llmctl status` request p50 under load {s_ratio:.2f}× idle (≤ {TARGET_STATUS_MULTIPLE}×: "
        f"{met(s_ratio <= TARGET_STATUS_MULTIPLE)}).",
        f"- crash → exit event p50 under load {e_ratio:.2f}× idle (≤ {TARGET_EXIT_MULTIPLE:g}×: "
        f"{met(e_ratio <= TARGET_EXIT_MULTIPLE)}).",
    ]
    if "direct" in sup:
        rd = sup["direct"]
        d_ratio = pct(rd["request_ms"], .5) / pct(ri["request_ms"], .5)
        de_ratio = pct(rd["exit_recorded_ms"], .5) / pct(ri["exit_recorded_ms"], .5)
        lines += [
            "",
            f"Reading: with the same 32 streams straight to the engine, where no byte passes through the daemon, "
            f"the `llmctl status` request p50 was {d_ratio:.2f}× idle and crash → exit event {de_ratio:.2f}× idle: "
            "that much is the machine's (its CPUs busy with the engine and the load). The gateway runs in its own "
            "process, so traffic takes neither the daemon's event loop nor its interpreter lock: under the "
            f"gateway's load the daemon's process did {rl['cpu']['daemon'] * 1e3:.0f} ms/s of work against "
            f"{ri['cpu']['daemon'] * 1e3:.0f} ms/s idle, while the gateway's process spent "
            f"{rl['cpu']['gateway'] * 1e3:.0f} ms/s.",
        ]
    machine = f"Machine: {r['machine']['cpu']}, {r['machine']['logical_cpus']} CPUs"
    if alone:
        lines += [
            "",
            machine + (f", {len(gpus)} × {gpus[0]}" if gpus else "") + f", Python {r['machine']['python']}; the "
            "engine's host side, the daemon, nginx and the clients share these CPUs (load average 1 min "
            f"{r['load_before']:.2f} before, {r['load_after']:.2f} after).",
            "",
            "Reproduce: `SUPERVISORD_LLM_LLAMA_SERVER=… SUPERVISORD_LLM_LLAMA_MODEL=… .venv/bin/python "
            f"bench/gateway_bench.py --engine llama --llama-args \"{r['llama_args']}\"` (nginx from the "
            "distribution's package, where there is one).",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "",
        machine + f", Python {r['machine']['python']}; "
        "the engine, the daemon, nginx and the clients share these CPUs, and other work ran on the machine "
        f"(load average 1 min {r['load_before']:.2f} before, {r['load_after']:.2f} after), so each figure is "
        "noisy: compare within the run, not across runs.",
        "",
        "Reproduce: `make bench-gateway` (or `.venv/bin/python bench/gateway_bench.py`; nginx from the "
        "distribution's package, e.g. `apt-get install nginx`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="gateway overhead (direct / nginx / gateway) and supervision "
                                                 "under load, through the real daemon")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; print, do not write docs")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--ttfb-rounds", type=int, default=120)
    parser.add_argument("--stream-rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--status-samples", type=int, default=60)
    parser.add_argument("--cli-samples", type=int, default=10)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--cpu-window-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--engine", choices=("mlx", "llama"), default="mlx",
                        help="the engine measured: mlx_lm.server (with llama-server's TTFB beside it, the "
                             "default), or llama-server alone (e.g. a CUDA build on a GPU machine: "
                             "SUPERVISORD_LLM_LLAMA_SERVER and SUPERVISORD_LLM_LLAMA_MODEL name it); its "
                             "section of the doc is gateway-llama")
    parser.add_argument("--llama-args", default="",
                        help="extra llama-server arguments with --engine llama, e.g. \"-ngl 99 -np 32 -c 65536\"")
    parser.add_argument("--footprint", default="8GB",
                        help="the llama-server engine's footprint with --engine llama (a CUDA build keeps "
                             "pinned host buffers: more than the CPU build's resident memory)")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--load-model", default=ENGINE, help=argparse.SUPPRESS)
    parser.add_argument("--load-streams", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--load-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        run_load(args.load, args.load_model, args.load_streams, args.load_dir / "tokens")
        return
    if args.quick:
        args.ttfb_rounds, args.stream_rounds, args.status_samples, args.cli_samples, args.kills = 20, 1, 20, 3, 2
        args.cpu_window_s = 2.0
        args.no_write = True

    began = time.monotonic()
    engine_port, gateway_port = free_port(), free_port()
    llama = llama_server()
    llama_port = free_port()
    if args.engine == "llama":
        if llama is None:
            sys.exit("gateway_bench: --engine llama needs llama-server and its model (run `make engines`, or set "
                     "SUPERVISORD_LLM_LLAMA_SERVER and SUPERVISORD_LLM_LLAMA_MODEL)")
        measure_llama_alone(args, llama, engine_port, gateway_port, began)
        return
    config = mlx_engine_toml(ENGINE, engine_port, tiny_model_dir(), default=True, canary_interval="30s")
    if llama is not None:
        # Not started until its own rounds: the mlx_lm.server rounds run with that engine alone.
        config += "\n" + llama_engine_toml(LLAMA_ENGINE, llama_port, *llama, canary_interval="30s",
                                            preload=False)
    config += f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
    d = Daemon(config).start()
    nginx: Nginx | None = None
    nginx_llama: Nginx | None = None
    result: dict[str, Any] = {"max_tokens": args.max_tokens, "stream_rounds": args.stream_rounds,
                              "cpu_window_s": args.cpu_window_s}
    try:
        wait_ready_pid(d, ENGINE, None, 120)
        engine_url = f"http://127.0.0.1:{engine_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        paths, cpu_pids, nginx = three_paths(d, ENGINE, engine_port, gateway_port, "default_model", result)
        result["load_before"] = os.getloadavg()[0]
        result["paths"] = asyncio.run(measure_paths(paths, cpu_pids, args))
        result["preopened"] = measure_ttfb_preopened(paths, args.ttfb_rounds)
        result["supervision"] = measure_supervision(d, ENGINE, gateway_url, (engine_url, "default_model"), args)
        if llama is not None:
            d.post(f"/v1/engines/{LLAMA_ENGINE}/start").raise_for_status()
            wait_ready_pid(d, LLAMA_ENGINE, None, 120)
            llama_paths: dict[str, tuple[str, str]] = {"direct": (f"http://127.0.0.1:{llama_port}", "tiny-llama")}
            if "nginx" in paths:
                nginx_llama = Nginx(llama_port)
                llama_paths["nginx"] = (nginx_llama.base_url, "tiny-llama")
            llama_paths["gateway"] = (gateway_url, LLAMA_ENGINE)
            result["llama"] = asyncio.run(measure_ttfb(llama_paths, args.ttfb_rounds))
        else:
            result["llama_missing"] = "llama-server or its model is missing (run `make engines`)"
        result["load_after"] = os.getloadavg()[0]
    finally:
        for proxy in (nginx, nginx_llama):
            if proxy is not None:
                proxy.close()
        d.stop()
    result.update(when=datetime.now(UTC).isoformat(timespec="seconds"), commit=commit(),
                  took_s=time.monotonic() - began, machine=machine_info())
    report(result, args, "gateway")


def report(result: dict[str, Any], args: argparse.Namespace, name: str) -> None:
    """Print the run's text; raw figures to bench/results/NAME(-quick).json; the doc's section NAME."""
    text = render(result)
    print(text)
    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / (f"{name}-quick.json" if args.no_write else f"{name}.json")).write_text(
        json.dumps(result, indent=1, default=str))
    if not args.no_write:
        write_section(args.out, name, text)
        print(f"wrote {args.out}")


def three_paths(d: Daemon, engine: str, engine_port: int, gateway_port: int, direct_model: str,
                result: dict[str, Any]) -> tuple[dict[str, tuple[str, str]], dict[str, list[int]], Nginx | None]:
    """Direct, nginx (where it is installed; ``result`` says which) and gateway paths to one engine,
    the pids whose CPU each path costs, and the nginx to close."""
    paths: dict[str, tuple[str, str]] = {"direct": (f"http://127.0.0.1:{engine_port}", direct_model)}
    # The traffic's cost is the gateway process's, plus what the daemon does to answer it.
    cpu_pids: dict[str, list[int]] = {"gateway": [d.proc.pid, d.status()["gateway"]["pid"]]}  # type: ignore[union-attr]
    nginx: Nginx | None = None
    try:
        nginx = Nginx(engine_port)
        paths["nginx"] = (nginx.base_url, direct_model)
        cpu_pids["nginx"] = nginx.pids()
        result["nginx_version"] = nginx.version
    except FileNotFoundError as exc:
        print(f"gateway_bench: {exc}; measuring direct and gateway only", file=sys.stderr)
        result["nginx_missing"] = str(exc)
    paths["gateway"] = (f"http://127.0.0.1:{gateway_port}", engine)
    return paths, cpu_pids, nginx


def measure_llama_alone(args: argparse.Namespace, llama: tuple[Path, Path], engine_port: int, gateway_port: int,
                        began: float) -> None:
    """``--engine llama``: the same rounds with llama-server as the daemon's one engine."""
    config = llama_engine_toml(LLAMA_ENGINE, engine_port, *llama, *shlex.split(args.llama_args), default=True,
                               canary_interval="30s", footprint=args.footprint)
    config += f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
    d = Daemon(config).start()
    nginx: Nginx | None = None
    result: dict[str, Any] = {"engine": "llama", "llama_args": args.llama_args, "max_tokens": args.max_tokens,
                              "stream_rounds": args.stream_rounds, "cpu_window_s": args.cpu_window_s,
                              "model_bytes": llama[1].stat().st_size}
    try:
        wait_ready_pid(d, LLAMA_ENGINE, None, 180)
        engine_url = f"http://127.0.0.1:{engine_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        paths, cpu_pids, nginx = three_paths(d, LLAMA_ENGINE, engine_port, gateway_port, "tiny-llama", result)
        result["load_before"] = os.getloadavg()[0]
        # llama-server closes a connection after each stream: the TTFB rounds that resend (see ttfb_once).
        ttfb = asyncio.run(measure_ttfb(paths, args.ttfb_rounds))
        # Each client's connection opened before the clock (one request per connection, as llama-server gives
        # a stream anyway): no path's figure holds its client's connect, so nginx's added time is its own.
        result["preopened"] = measure_ttfb_preopened(paths, args.ttfb_rounds)
        engine_pid = d.engine(LLAMA_ENGINE)["pid"]
        result["paths"] = asyncio.run(measure_paths(paths, cpu_pids, argparse.Namespace(**{**vars(args),
                                                                                           "ttfb_rounds": 0}),
                                                    engine_pids=[engine_pid] if engine_pid else None))
        result["paths"]["ttfb_ms"] = ttfb
        result["supervision"] = measure_supervision(d, LLAMA_ENGINE, gateway_url, (engine_url, "tiny-llama"), args)
        result["load_after"] = os.getloadavg()[0]
    finally:
        if nginx is not None:
            nginx.close()
        d.stop()
    result.update(when=datetime.now(UTC).isoformat(timespec="seconds"), commit=commit(),
                  took_s=time.monotonic() - began, machine=machine_info(), gpus=gpu_names())
    report(result, args, "gateway-llama")


def gpu_names() -> list[str]:
    """The machine's NVIDIA GPUs by name (none where NVML does not answer)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else name)
        return names
    finally:
        pynvml.nvmlShutdown()


if __name__ == "__main__":
    main()
