"""Hang detection: SIGSTOP a real mlx_lm.server (tiny model) and time until the daemon says `hung`.

Two cases, alternated, on one daemon with the gateway on:

* idle: no request in flight; detection comes from the process state (a stopped process) or the
  canary. Target: within canary_interval + canary_timeout.
* live stream: a streaming chat completion through the gateway is producing tokens when the engine
  is stopped. Target: within the stall time (the gateway's ``decode_stall_s``) + 2 s.

The engine is woken with SIGCONT after each run and must come back to `ready` by itself (the
hang restart is set far out so that no restart, and no 60 s spacing, gets in the way).

    .venv/bin/python bench/hang_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import (  # noqa: E402
    Daemon,
    EventFollower,
    free_port,
    mlx_engine_toml,
    state_event,
    summary,
    tiny_model_dir,
    wait_ready_pid,
)

CANARY_INTERVAL_S = 10.0
CANARY_TIMEOUT_S = 5.0
STALL_S = 5.0
DECODE_STALL_S = 3.0


def config(engine_port: int, gateway_port: int) -> str:
    return (mlx_engine_toml("tiny", engine_port, tiny_model_dir(), default=True,
                            canary_interval=f"{CANARY_INTERVAL_S:g}s", canary_timeout=f"{CANARY_TIMEOUT_S:g}s",
                            stall=f"{STALL_S:g}s")
            + f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\ndecode_stall_s = "{DECODE_STALL_S:g}s"\n'
            + '\n[policies.restart]\nhang_restart_after = "1h"\n')


class Stream:
    """A long streaming request through the gateway, in a thread; ``first_token`` is set on the first token."""

    def __init__(self, gateway_url: str) -> None:
        self.first_token = threading.Event()
        self.tokens = 0
        self.error: str | None = None
        self.open = False
        self._url = gateway_url
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # No "model" field: the default engine. (Naming the engine, "model": "tiny", is forwarded to
        # mlx_lm.server unchanged, which then tries to load a model called "tiny"; see the report.)
        body = {"stream": True, "max_tokens": 100000, "temperature": 1.0,
                "messages": [{"role": "user", "content": "tell me a very long story"}]}
        try:
            with httpx.stream("POST", self._url + "/v1/chat/completions", json=body,
                              timeout=httpx.Timeout(120.0)) as r:
                self.open = True
                for line in r.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("data: {"):
                        self.tokens += 1
                        if self.tokens >= 3:
                            self.first_token.set()
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.open = False
            self.first_token.set()

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)


def run(runs: int = 5) -> dict[str, Any]:
    gateway_port = free_port()
    d = Daemon(config(free_port(), gateway_port)).start()
    follower = EventFollower(d)
    cases: dict[str, list[dict[str, Any]]] = {"idle": [], "stream": []}
    try:
        pid = wait_ready_pid(d, "tiny", None, 120)
        for i in range(runs):
            for case in ("idle", "stream"):
                stream = None
                if case == "stream":
                    # The tiny random model may end a reply early (end of sequence): take the first
                    # stream that is still producing tokens.
                    for _attempt in range(20):
                        stream = Stream(f"http://127.0.0.1:{gateway_port}")
                        stream.first_token.wait(60)
                        time.sleep(0.2)
                        if stream.open and stream.tokens >= 3:
                            break
                        stream.close()
                    else:
                        raise RuntimeError(f"no live stream could be started: {stream.error}")
                else:
                    time.sleep(0.5 + 0.3 * i)  # varied phase against the 1 s process probe
                live = stream.open if stream else False
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                try:
                    seen_at, event = follower.wait(state_event("tiny", "hung"), 60, after_mono=t0)
                finally:
                    os.kill(pid, signal.SIGCONT)
                cases[case].append({"detect_s": seen_at - t0, "reason": event.get("reason"),
                                    "stream_open_at_stop": live,
                                    "stream_chunks_before": stream.tokens if stream else None})
                if stream is not None:
                    stream.close()
                follower.wait(state_event("tiny", "ready"), 60, after_mono=seen_at)
                assert d.engine("tiny")["pid"] == pid, "the engine was restarted; the bench expects SIGCONT recovery"
    finally:
        follower.close()
        d.cleanup()
    idle = [c["detect_s"] for c in cases["idle"]]
    live = [c["detect_s"] for c in cases["stream"]]
    targets = {"idle_s": CANARY_INTERVAL_S + CANARY_TIMEOUT_S, "stream_s": DECODE_STALL_S + 2.0}
    return {
        "runs": runs,
        "settings": {"canary_interval_s": CANARY_INTERVAL_S, "canary_timeout_s": CANARY_TIMEOUT_S,
                     "engine_stall_s": STALL_S, "gateway_decode_stall_s": DECODE_STALL_S,
                     "process_interval_s": 1.0},
        "idle": {"samples": cases["idle"], **summary(idle)},
        "stream": {"samples": cases["stream"], **summary(live)},
        "target": targets,
        "met": bool(idle and live and max(idle) <= targets["idle_s"] and max(live) <= targets["stream_s"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    print(json.dumps(run(args.runs), indent=1))


if __name__ == "__main__":
    main()
