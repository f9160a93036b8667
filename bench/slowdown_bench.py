"""Slowdown detection: duty-cycle a real mlx_lm.server to ~40% speed and time until `degraded`.

The daemon learns a throughput baseline from real streams through its gateway (a client keeps
one streaming request going at all times), then the engine is slowed by a SIGSTOP/SIGCONT duty
cycle (run 40 ms, stop 60 ms: each stop is far shorter than the 1 s a stop must last to read as
a hang). The target is `degraded` within the configured windows (``windows`` x ``window``) of the
slowdown's start.

    .venv/bin/python bench/slowdown_bench.py
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
    tiny_model_dir,
    wait_ready_pid,
    wait_until,
)

WINDOW_S = 4.0
WINDOWS = 3
SHARE = 0.5
RUN_MS, STOP_MS = 40, 60


def config(engine_port: int, gateway_port: int) -> str:
    return (mlx_engine_toml("tiny", engine_port, tiny_model_dir(), default=True, canary_interval="1h")
            + f'\n[gateway]\nlisten = "127.0.0.1:{gateway_port}"\ndecode_stall_s = "30s"\n'
            + f'\n[policies.degraded]\nwindow = "{WINDOW_S:g}s"\nwindows = {WINDOWS}\nshare = {SHARE}\n'
            + '\n[policies.restart]\nhang_restart_after = "1h"\n')


class Traffic:
    """One streaming request after another through the gateway (the default engine: no "model" field)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rates: list[tuple[float, float]] = []  # (monotonic end, client-side tokens/s)
        self.errors = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {"stream": True, "max_tokens": 150, "temperature": 1.0,
                "messages": [{"role": "user", "content": "tell me a very long story"}]}
        while not self._stop:
            try:
                tokens, first = 0, None
                with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"content"' in line:
                            tokens += 1
                            first = first or time.monotonic()
                if first and tokens > 5:
                    self.rates.append((time.monotonic(), (tokens - 1) / max(1e-6, time.monotonic() - first)))
            except httpx.HTTPError:
                self.errors += 1
                time.sleep(0.2)

    def mean_rate(self, since: float, until: float) -> float | None:
        values = sorted(r for t, r in self.rates if since < t <= until)
        return values[len(values) // 2] if values else None  # the median: chunk bursts make outliers

    def close(self) -> None:
        self._stop = True
        self._thread.join(30)


class DutyCycle:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            time.sleep(RUN_MS / 1000)
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(STOP_MS / 1000)
            os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        os.kill(self.pid, signal.SIGCONT)


def run() -> dict[str, Any]:
    gateway_port = free_port()
    d = Daemon(config(free_port(), gateway_port)).start()
    follower = EventFollower(d)
    traffic = None
    try:
        pid = wait_ready_pid(d, "tiny", None, 120)
        traffic = Traffic(f"http://127.0.0.1:{gateway_port}")
        learn_started = time.monotonic()
        baseline = wait_until(lambda: d.engine("tiny")["baseline_tokens_per_s"], 120, "a learned baseline", 0.5)
        learned_s = time.monotonic() - learn_started
        # Start the slowdown from a healthy engine: `ready` for a whole window. Noise on 2 busy
        # cores can dip below the threshold by itself; such false `degraded` episodes are counted.
        def steady() -> bool:
            started = time.monotonic()
            while time.monotonic() - started < WINDOW_S:
                if d.engine("tiny")["state"] != "ready":
                    return False
                time.sleep(0.2)
            return True

        wait_until(steady, 300, "a whole healthy window", 0.5)
        false_degraded = sum(1 for _, e in follower.events if state_event("tiny", "degraded")(e))
        healthy_end = time.monotonic()
        t0 = time.monotonic()
        duty = DutyCycle(pid)
        try:
            seen_at, event = follower.wait(state_event("tiny", "degraded"), 20 * WINDOWS * WINDOW_S, after_mono=t0)
        finally:
            duty.close()
        detect_s = seen_at - t0
        status = d.engine("tiny")
        healthy_rate = traffic.mean_rate(learn_started, healthy_end)
        slowed_rate = traffic.mean_rate(t0 + 1.0, seen_at)
        recovered = follower.wait(state_event("tiny", "ready"), 20 * WINDOW_S, after_mono=seen_at)
    finally:
        if traffic is not None:
            traffic.close()
        follower.close()
        d.cleanup()
    target_s = WINDOWS * WINDOW_S
    return {
        "settings": {"window_s": WINDOW_S, "windows": WINDOWS, "share": SHARE, "duty_cycle_run_ms": RUN_MS,
                     "duty_cycle_stop_ms": STOP_MS},
        "baseline_tokens_per_s": baseline,
        "baseline_learned_after_s": round(learned_s, 1),
        "client_tokens_per_s_healthy_median": healthy_rate,
        "client_tokens_per_s_slowed_median": slowed_rate,
        "speed_ratio": (slowed_rate / healthy_rate) if slowed_rate and healthy_rate else None,
        "detect_s": detect_s,
        "reason": event.get("reason"),
        "tokens_per_s_at_detection": status.get("tokens_per_s"),
        "recovered_after_s": recovered[0] - seen_at,
        "false_degraded_before_slowdown": false_degraded,
        "hung_during_slowdown": sum(1 for at, e in follower.events if t0 <= at <= seen_at
                                    and state_event("tiny", "hung")(e)),
        "target_s": target_s,
        "met": detect_s <= target_s,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(json.dumps(run(), indent=1))


if __name__ == "__main__":
    main()
