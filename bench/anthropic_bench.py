"""What the Messages translation costs per token, next to the gateway's plain passthrough.

One run starts a real ``mlx_lm.server`` on the tiny model and the gateway in its own process (the
same trivial backend as bench/gateway_bench.py), then alternates rounds of

- ``POST /v1/chat/completions`` streamed through the gateway (passthrough, token watching on), and
- ``POST /v1/messages`` streamed through the gateway (translated to chat completions and back),

with the same prompt and max_tokens, and reports the gateway process's CPU time per token on each
side. It also records one real engine stream and replays it through the translator alone
(``StreamTranslator.feed``) in this process, which isolates the translation's own CPU per token
from the HTTP work both sides share. Figures go into docs/benchmarks.md between
``<!-- anthropic:start -->`` and ``<!-- anthropic:end -->`` (right after the gateway section).

    .venv/bin/python bench/anthropic_bench.py            # full run, writes docs/benchmarks.md
    .venv/bin/python bench/anthropic_bench.py --quick    # fewer rounds, prints only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import httpx  # noqa: E402
from common import machine_info, write_section  # noqa: E402
from gateway_bench import cpu_s  # noqa: E402

PROMPT = "hello"


def openai_stream(client: httpx.Client, url: str, max_tokens: int) -> int:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                tokens += 1
    return tokens


def messages_stream(client: httpx.Client, url: str, max_tokens: int) -> int:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0}
    tokens = 0
    with client.stream("POST", url + "/v1/messages", json=body,
                       headers={"anthropic-version": "2023-06-01"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "event: content_block_delta":
                tokens += 1
    return tokens


def gateway_rounds(url: str, pid: int, rounds: int, max_tokens: int) -> dict[str, dict[str, float]]:
    sides = {"passthrough": openai_stream, "translated": messages_stream}
    cpu = {name: 0.0 for name in sides}
    tokens = {name: 0 for name in sides}
    wall = {name: 0.0 for name in sides}
    with httpx.Client(timeout=120) as client:
        for fn in sides.values():  # warm both paths once
            fn(client, url, 8)
        for _ in range(rounds):
            for name, fn in sides.items():
                before_cpu, before_wall = cpu_s(pid), time.perf_counter()
                tokens[name] += fn(client, url, max_tokens)
                cpu[name] += cpu_s(pid) - before_cpu
                wall[name] += time.perf_counter() - before_wall
    return {name: {"cpu_us_per_token": cpu[name] / tokens[name] * 1e6, "tokens": tokens[name],
                   "tokens_per_s": tokens[name] / wall[name]} for name in sides}


def translator_alone(engine_url: str, max_tokens: int, repeats: int) -> dict[str, float]:
    """Replay one real engine stream through the translator and through the passthrough meter."""
    from supervisord_llm.gateway.anthropic import StreamTranslator, events_bytes
    from supervisord_llm.gateway.proxy import TokenMeter

    body = {"model": "default_model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    chunks: list[bytes] = []
    with httpx.Client(timeout=120) as client, client.stream(
        "POST", engine_url + "/v1/chat/completions", json=body
    ) as response:
        chunks = list(response.iter_raw())
    meter = TokenMeter(anthropic=False)
    for chunk in chunks:
        meter.feed(chunk, 0.0)
    tokens = meter.tokens

    def translate() -> None:
        translator = StreamTranslator(model="tiny")
        events_bytes(translator.start())
        for chunk in chunks:
            events_bytes(translator.feed(chunk))
        events_bytes(translator.finish())

    def meter_only() -> None:
        m = TokenMeter(anthropic=False)
        for chunk in chunks:
            m.feed(chunk, 0.0)

    out: dict[str, float] = {"tokens": tokens, "chunks": len(chunks)}
    for name, fn in (("meter", meter_only), ("translate", translate)):
        fn()
        started = time.process_time()
        for _ in range(repeats):
            fn()
        out[f"{name}_us_per_token"] = (time.process_time() - started) / (repeats * tokens) * 1e6
    return out


def render(alone: dict[str, float], through: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    p, t = through["passthrough"], through["translated"]
    lines = [
        "## Anthropic Messages translation",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} at commit `{commit}`. The same requests "
        f"(prompt \"{PROMPT}\", max_tokens {args.max_tokens}, greedy) streamed through the gateway to a real "
        "`mlx_lm.server`, alternating OpenAI passthrough and translated `/v1/messages` rounds; the CPU "
        "time is the gateway process's own.",
        "",
        "| path through the gateway | gateway CPU per token | tokens | tok/s (client) |",
        "|---|---:|---:|---:|",
        f"| `/v1/chat/completions` passthrough | {p['cpu_us_per_token']:.0f} µs | {p['tokens']:.0f} | "
        f"{p['tokens_per_s']:.0f} |",
        f"| `/v1/messages` translated | {t['cpu_us_per_token']:.0f} µs | {t['tokens']:.0f} | "
        f"{t['tokens_per_s']:.0f} |",
        f"| difference | {t['cpu_us_per_token'] - p['cpu_us_per_token']:+.0f} µs | | |",
        "",
        f"The translation alone, replaying one recorded engine stream ({alone['tokens']:.0f} tokens in "
        f"{alone['chunks']:.0f} reads) {args.repeats} times in one process:",
        "",
        "| step | CPU per token |",
        "|---|---:|",
        f"| token meter (passthrough does this too) | {alone['meter_us_per_token']:.1f} µs |",
        f"| `StreamTranslator` (parse chunks, build and serialise events) | {alone['translate_us_per_token']:.1f} µs |",
        "",
        f"Rounds: {args.rounds} per side. Machine: {machine_info()}; load average (1 min) "
        f"{args.load_before:.2f} before and {args.load_after:.2f} after. The engine, the gateway and the client "
        "share these CPUs, so the end-to-end difference is noisy; the replay figure is the steadier one.",
        "",
        "Reproduce: `.venv/bin/python bench/anthropic_bench.py`",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Messages translation: CPU per token next to passthrough")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; print, do not write docs")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 4, 50

    from tests.helpers import MlxServer, free_port, tiny_model_dir, wait_http

    engine = MlxServer(tiny_model_dir())
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "gateway_bench.py"), "--serve-gateway", engine.base_url,
         "--port", str(port)],
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/gateway/status", timeout_s=30)
        args.load_before = os.getloadavg()[0]
        alone = translator_alone(engine.base_url, args.max_tokens, args.repeats)
        through = gateway_rounds(url, gateway.pid, args.rounds, args.max_tokens)
        args.load_after = os.getloadavg()[0]
    finally:
        gateway.terminate()
        gateway.wait(15)
        engine.close()
    text = render(alone, through, args)
    print(text)
    if not args.quick:
        write_section(args.out, "anthropic", text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
