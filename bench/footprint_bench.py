"""Footprint and status: the supervisor's own RSS and CPU while it supervises a real, idle engine,
and the wall time of `llmctl status` against `supervisorctl status` in the same run.

supervisord-llm runs with every probe on (process tree every 1 s, memory every 5 s, canaries every
60 s, the gateway listening); supervisord runs the same ``mlx_lm.server`` command on the tiny model.
Both run side by side for the same period (5 minutes, or 60 s with ``--quick``); RSS is sampled
every second, CPU is the supervisor process's own user+system time over the period.

    .venv/bin/python bench/footprint_bench.py [--quick] [--status-runs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from common import (  # noqa: E402
    BIN,
    Daemon,
    Supervisord,
    free_port,
    mlx_argv,
    mlx_engine_toml,
    summary,
    tiny_model_dir,
    wait_ready_pid,
)

TARGET_RSS_BYTES = 60 * 10**6
TARGET_CPU_PERCENT = 0.5


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(procs: dict[str, psutil.Process], duration_s: float) -> dict[str, Any]:
    rss: dict[str, list[int]] = {k: [] for k in procs}
    cpu0 = {k: _cpu_s(p) for k, p in procs.items()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < duration_s:
        for k, p in procs.items():
            rss[k].append(p.memory_info().rss)
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    out = {}
    for k, p in procs.items():
        cpu = _cpu_s(p) - cpu0[k]
        out[k] = {"rss_max_bytes": max(rss[k]), "rss_mean_bytes": sum(rss[k]) / len(rss[k]),
                  "cpu_s": cpu, "cpu_percent": 100 * cpu / elapsed}
    out["duration_s"] = elapsed
    return out


def time_command(argv: list[str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr or done.stdout}")
    return took


def run(quick: bool = False, status_runs: int = 20) -> dict[str, Any]:
    duration_s = 60.0 if quick else 300.0
    model = tiny_model_dir()
    d = Daemon(mlx_engine_toml("tiny", free_port(), model, default=True)
               + f'\n[gateway]\nlisten = "127.0.0.1:{free_port()}"\n').start()
    sv_port = free_port()
    sv = Supervisord("tiny", mlx_argv(model, sv_port), startsecs=3)
    try:
        sv.start()
        wait_ready_pid(d, "tiny", None, 120)
        sv.wait_running(None, 120)
        time.sleep(5)  # both settled
        # The gateway runs in a process of its own: measured beside the daemon's, never hidden.
        procs = {"daemon": psutil.Process(d.proc.pid), "gateway": psutil.Process(d.status()["gateway"]["pid"]),
                 "supervisord": psutil.Process(sv.proc.pid)}
        footprint = measure(procs, duration_s)
        engine_state = d.engine("tiny")["state"]
        llmctl = [str(BIN / "llmctl"), "--socket", str(d.socket), "status"]
        supervisorctl = [str(BIN / "supervisorctl"), "-c", str(sv.conf), "status"]
        times: dict[str, list[float]] = {"llmctl": [], "supervisorctl": []}
        for _ in range(status_runs):  # alternated, same run
            times["llmctl"].append(time_command(llmctl))
            times["supervisorctl"].append(time_command(supervisorctl))
    finally:
        try:
            sv.rpc().supervisor.stopProcess("tiny")
        except Exception:
            pass
        sv.stop()
        d.cleanup()
    status = {k: summary(v) for k, v in times.items()}
    daemon = footprint["daemon"]
    return {
        "mode": "quick (60 s)" if quick else "full (5 min)",
        "duration_s": footprint["duration_s"],
        "engine": "mlx_lm.server, tiny model",
        "engine_state_after": engine_state,
        "daemon": daemon,
        "gateway": footprint["gateway"],
        "supervisord": footprint["supervisord"],
        "side_by_side": "both supervisors ran at the same time on the same machine, each with its own engine",
        "status": status,
        "status_runs": status_runs,
        "target": {"rss_bytes": TARGET_RSS_BYTES, "cpu_percent": TARGET_CPU_PERCENT,
                   "status": "llmctl p50 <= supervisorctl p50"},
        "met": {"rss": daemon["rss_max_bytes"] <= TARGET_RSS_BYTES,
                "cpu": daemon["cpu_percent"] <= TARGET_CPU_PERCENT,
                "status": status["llmctl"]["p50"] <= status["supervisorctl"]["p50"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="60 s instead of 5 minutes")
    p.add_argument("--status-runs", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(run(args.quick, args.status_runs), indent=1))


if __name__ == "__main__":
    main()
