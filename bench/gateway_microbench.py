"""A ~30 s look at the gateway's own cost, for working on its hot path (not for docs/benchmarks.md).

The real daemon (``supervisord-llm run``) with its gateway in front of the OpenAI stand-in engine
(tests/standins/openai_engine.py, a real process streaming fast), against the same engine direct:

- TTFB p50 of streamed chat completions with ``max_tokens`` 1, interleaved direct / gateway;
- CPU per streamed token (psutil ``cpu_times`` of the daemon's process and of its gateway process)
  over rounds of 16 concurrent 128-token streams through the gateway.

The stand-in is not mlx_lm.server: the absolute figures say nothing about a real engine; compare
runs of this script before and after a change. ``bench/gateway_bench.py`` is the reference run.

    .venv/bin/python bench/gateway_microbench.py [--rounds 40] [--stream-rounds 4] [--pause-s 10]

``--pause-s`` keeps the daemon up that long (the gateway's pid printed) before the stream rounds,
for a profiler: ``py-spy record --pid PID``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Daemon, free_port, standin_engine_toml  # noqa: E402
from gateway_bench import ttfb_once  # noqa: E402

PROMPT = [{"role": "user", "content": "hello"}]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> int:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            tokens += chunk.count(b'"content"')
    return tokens


async def run(args: argparse.Namespace, direct: str, gateway: str, daemon_pid: int, gateway_pid: int) -> None:
    procs = {"daemon": psutil.Process(daemon_pid), "gateway": psutil.Process(gateway_pid)}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        ttfb: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(5):
            await ttfb_once(client, direct, "x")
            await ttfb_once(client, gateway, "fast")
        for i in range(args.rounds):
            order = [("direct", direct, "x"), ("gateway", gateway, "fast")]
            for name, url, model in order if i % 2 else order[::-1]:
                ttfb[name].append(await ttfb_once(client, url, model))
        p50 = {n: statistics.median(v) * 1e3 for n, v in ttfb.items()}
        print(f"TTFB p50 direct {p50['direct']:.2f} ms, gateway {p50['gateway']:.2f} ms, "
              f"added {p50['gateway'] - p50['direct']:+.2f} ms ({args.rounds} each)")
        if args.pause_s:
            print(f"gateway pid {gateway_pid} (daemon {daemon_pid}); stream rounds start in {args.pause_s:g}s",
                  flush=True)
            await asyncio.sleep(args.pause_s)
        for label, url, model, pid_cpu in (("direct", direct, "x", False), ("gateway", gateway, "fast", True)):
            tokens = 0
            wall_s = 0.0
            cpu_s = {name: 0.0 for name in procs}
            for _ in range(args.stream_rounds):
                before = {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}
                started = time.perf_counter()
                counts = await asyncio.gather(*(one_stream(client, url, model, args.max_tokens)
                                                for _ in range(args.streams)))
                wall_s += time.perf_counter() - started
                for name, proc in procs.items():
                    cpu_s[name] += sum(proc.cpu_times()[:2]) - before[name]
                tokens += sum(counts)
            line = f"{args.streams} streams x {args.max_tokens} tokens {label}: {tokens / wall_s:.0f} tok/s"
            if pid_cpu:
                line += (f", CPU {sum(cpu_s.values()) / tokens * 1e6:.1f} us/token (gateway process "
                         f"{cpu_s['gateway'] / tokens * 1e6:.1f}, daemon {cpu_s['daemon'] / tokens * 1e6:.1f})")
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--stream-rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tps", type=float, default=1000.0)
    parser.add_argument("--pause-s", type=float, default=0.0)
    args = parser.parse_args()
    engine_port, gateway_port = free_port(), free_port()
    config = standin_engine_toml("fast", engine_port, "--tps", str(args.tps), default=True)
    config += f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
    d = Daemon(config).start()
    try:
        d.wait_state("fast", "ready", 60)
        assert d.proc is not None
        asyncio.run(run(args, f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}", d.proc.pid,
                        d.status()["gateway"]["pid"]))
    finally:
        d.stop()
        d.cleanup()


if __name__ == "__main__":
    main()
