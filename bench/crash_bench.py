"""Crash detection: SIGKILL the engine, time until each supervisor has recorded the exit.

Same child program for both (the OpenAI stand-in engine, ``tests/standins/openai_engine.py``).

* supervisord-llm: the exit is recorded when its ``engine.exited`` event is written to events.jsonl
  (the event's own ``at`` timestamp); we also time when ``GET /v1/events?follow=1`` (what
  ``llmctl events -f`` reads) delivered it to a client.
* supervisord: the exit is recorded when its log line ``exited: NAME (terminated by SIGKILL ...)``
  is written (the line's own timestamp); we also time when a reader polling the log every
  millisecond saw the line.

Automatic restarts of supervisord-llm are at least 60 s apart by design, so each run brings a
fresh engine with ``POST /v1/engines/NAME/start {"force": true}`` (``llmctl start NAME --force``)
once the exit is recorded; supervisord restarts its program by itself (``autorestart``). A random
0.1–0.6 s pause before each kill keeps the kill from lining up with either supervisor's loop.

    .venv/bin/python bench/crash_bench.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PYTHON,
    STANDINS,
    Daemon,
    EventFollower,
    Supervisord,
    event_wall_s,
    file_size,
    free_port,
    standin_engine_toml,
    summary,
    supervisord_log_wall_s,
    tail_until,
    wait_ready_pid,
)

TARGET_P50_MS = 10.0
TARGET_SPEEDUP = 10.0


def bench_daemon(runs: int, rng: random.Random) -> dict[str, Any]:
    d = Daemon(standin_engine_toml("crashy", free_port())).start()
    follower = EventFollower(d)
    recorded_ms: list[float] = []
    observed_ms: list[float] = []
    client_ms: list[float] = []
    events_path = d.state_dir / "events.jsonl"
    try:
        pid = wait_ready_pid(d, "crashy", None, 60)
        for _ in range(runs):
            time.sleep(rng.uniform(0.1, 0.6))
            offset = file_size(events_path)
            mono0, wall0 = time.monotonic(), time.time()
            os.kill(pid, signal.SIGKILL)
            in_file_at, line = tail_until(events_path, offset,
                                          lambda s, p=pid: '"engine.exited"' in s and f'"pid":{p},' in s, 10)
            event = json.loads(line)
            seen_at, _ = follower.wait(
                lambda e, p=pid: e.get("kind") == "engine.exited" and e.get("pid") == p, 10, after_mono=mono0)
            recorded_ms.append((event_wall_s(event) - wall0) * 1000)
            observed_ms.append((in_file_at - mono0) * 1000)
            client_ms.append((seen_at - mono0) * 1000)
            assert event.get("signal") == "SIGKILL", event
            response = d.post("/v1/engines/crashy/start", {"force": True})
            assert response.status_code == 200, response.text
            pid = wait_ready_pid(d, "crashy", pid, 60)
    finally:
        follower.close()
        d.cleanup()
    return {"recorded_ms": recorded_ms, "observed_ms": observed_ms, "client_ms": client_ms,
            "restart_method": "POST /v1/engines/crashy/start {\"force\": true} after each exit"}


def bench_supervisord(runs: int, rng: random.Random) -> dict[str, Any]:
    port = free_port()
    sv = Supervisord("crashy", [PYTHON, str(STANDINS / "openai_engine.py"), "--port", str(port)], startsecs=1)
    sv.start()
    recorded_ms: list[float] = []
    observed_ms: list[float] = []
    try:
        pid = sv.wait_running(None, 60)
        for _ in range(runs):
            time.sleep(rng.uniform(0.1, 0.6))
            offset = file_size(sv.log)
            mono0, wall0 = time.monotonic(), time.time()
            os.kill(pid, signal.SIGKILL)
            seen_at, line = tail_until(sv.log, offset, lambda s: "exited: crashy" in s, 10)
            observed_ms.append((seen_at - mono0) * 1000)
            recorded_ms.append((supervisord_log_wall_s(line) - wall0) * 1000)
            pid = sv.wait_running(pid, 60)
    finally:
        try:
            sv.rpc().supervisor.stopProcess("crashy")
        except Exception:
            pass
        sv.stop()
    return {"recorded_ms": recorded_ms, "observed_ms": observed_ms,
            "restart_method": "supervisord autorestart (startsecs=1)"}


def run(runs: int = 20, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    daemon = bench_daemon(runs, rng)
    sv = bench_supervisord(runs, rng)
    out: dict[str, Any] = {"runs": runs, "seed": seed, "child": "tests/standins/openai_engine.py",
                           "daemon": {**daemon, "recorded": summary(daemon["recorded_ms"]),
                                      "observed": summary(daemon["observed_ms"]),
                                      "client": summary(daemon["client_ms"])},
                           "supervisord": {**sv, "recorded": summary(sv["recorded_ms"]),
                                           "observed": summary(sv["observed_ms"])}}
    # The headline: the record is in the file (events.jsonl / supervisord's log), seen by the same reader.
    d50, s50 = out["daemon"]["observed"]["p50"], out["supervisord"]["observed"]["p50"]
    out["speedup_p50"] = (s50 / d50) if d50 and d50 > 0 else None
    out["target"] = {"p50_ms": TARGET_P50_MS, "speedup": TARGET_SPEEDUP}
    out["met"] = bool(d50 is not None and d50 <= TARGET_P50_MS and out["speedup_p50"]
                      and out["speedup_p50"] >= TARGET_SPEEDUP)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "observed_ms", "record in the file (events.jsonl / supervisord.log)"),
                           (axes[1], "recorded_ms", "record's own timestamp")):
        for who, colour in (("daemon", "tab:blue"), ("supervisord", "tab:orange")):
            values = sorted(max(v, 0.01) for v in result[who][key])
            ys = [(i + 1) / len(values) for i in range(len(values))]
            label = "supervisord-llm" if who == "daemon" else "supervisord"
            p50 = result[who][key.split("_")[0]]["p50"]
            ax.step(values, ys, where="post", color=colour, label=f"{label} (p50 {p50:.1f} ms)")
        ax.axvline(TARGET_P50_MS, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("ms after SIGKILL (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(f"share of {result['runs']} runs (ECDF)")
    fig.suptitle("Crash detection: SIGKILL of the same stand-in engine", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(run(args.runs), indent=1))


if __name__ == "__main__":
    main()
