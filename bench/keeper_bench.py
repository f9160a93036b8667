"""What an engine's keeper costs, side by side with the other ways to keep a child's exit status.

Three keepers, each the parent of a ``sleep`` standing in for the engine (the keeper's cost does
not depend on what it keeps), started the same way, eight of each at once, in one run:

- ``keeper.py`` under ``python -I -S`` (what the daemon ships; see supervisord_llm/engine/keeper.py),
- the same job written the obvious way in Python (``subprocess``, ``json``, site-packages loaded),
- a POSIX shell (``sh -c 'cmd & wait $!; echo $? > file'``).

For each: resident memory (RSS), memory of its own (USS: what one more keeper adds) and the
proportional share (PSS), and whether the recorded status tells a SIGKILL from ``exit 137``.
Then the time from asking for a spawn to knowing the engine's pid, through the keeper against a
plain ``subprocess.Popen`` of the same command, alternated.

    .venv/bin/python bench/keeper_bench.py [--quick]   # figures into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import write_section  # noqa: E402

from supervisord_llm.engine import keeper as keeper_program  # noqa: E402
from supervisord_llm.engine.process import EngineProcess, keeper_argv  # noqa: E402

TARGET_USS_BYTES = 5 * 10**6  # "a few MB per engine"

NAIVE = """
import json, subprocess, sys, time
child = subprocess.Popen(sys.argv[2:], start_new_session=True)
rc = child.wait()
with open(sys.argv[1], "w") as f:
    json.dump({"code": rc if rc >= 0 else None, "signal": -rc if rc < 0 else None, "at": time.time()}, f)
"""
SHELL = '"$@" & wait $!; echo "{\\"status\\": $?}" > "$RECORD"'


def _start(kind: str, workdir: Path, n: int, child: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    record = workdir / f"{kind}-{n}.json"
    env = {**os.environ, "RECORD": str(record)}
    if kind == "keeper.py":
        report_r, report_w = os.pipe()
        argv = keeper_argv(child, exits_dir=workdir, engine=f"{kind}-{n}", tag=f"bench/{kind}/{n}", report_fd=report_w)
        popen = subprocess.Popen(argv, pass_fds=(report_w,), start_new_session=True, env=env)
        os.close(report_w)
        pid = int(os.read(report_r, 100).split()[1])
        os.close(report_r)
        return popen, workdir / keeper_program.record_name(f"{kind}-{n}", pid)
    if kind == "python (subprocess, json)":
        return subprocess.Popen([sys.executable, "-c", NAIVE, str(record), *child], start_new_session=True), record
    return subprocess.Popen(["/bin/sh", "-c", SHELL, "sh", *child], start_new_session=True, env=env,
                            stderr=subprocess.DEVNULL), record  # sh reports "Killed" on stderr


def _child_of(keeper: subprocess.Popen[bytes]) -> psutil.Process:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(keeper.pid).children()
        if children:
            return children[0]
        time.sleep(0.01)
    raise TimeoutError("the keeper started no child")


def memory(kind: str, workdir: Path, count: int) -> dict[str, Any]:
    keepers = [_start(kind, workdir, n, ["sleep", "60"])[0] for n in range(count)]
    try:
        time.sleep(1.0)
        infos = [psutil.Process(k.pid).memory_full_info() for k in keepers]
        return {"rss_bytes": statistics.mean(i.rss for i in infos), "uss_bytes": statistics.mean(i.uss for i in infos),
                "pss_bytes": statistics.mean(i.pss for i in infos), "count": count}
    finally:
        for k in keepers:
            with_child = _child_of(k)
            with_child.kill()
            k.wait(10)


def fidelity(kind: str, workdir: Path) -> str:
    """What the keeper recorded for a SIGKILLed child and for one that exited with 137."""
    seen = []
    for n, child in ((100, ["sleep", "60"]), (101, ["sh", "-c", "sleep 0.3; exit 137"])):
        keeper, record = _start(kind, workdir, n, child)
        if n == 100:
            _child_of(keeper).kill()
        keeper.wait(15)
        seen.append(json.loads(record.read_text()))
    if kind == "keeper.py":
        return f"signal {seen[0]['signal']} / code {seen[1]['code']}"
    if kind.startswith("python"):
        return f"signal {seen[0]['signal']} / code {seen[1]['code']}"
    return f"status {seen[0]['status']} / status {seen[1]['status']} (the same)"


def spawn_latency(workdir: Path, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"through the keeper": [], "plain Popen": []}
    for n in range(runs):
        started = time.perf_counter()
        proc = EngineProcess.spawn(["sleep", "60"], env={}, cwd=None, log_path=workdir / "spawn.log",
                                   tag=f"bench/spawn/{n}", engine="spawn", exits_dir=workdir)
        times["through the keeper"].append(time.perf_counter() - started)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.popen is not None
        proc.popen.wait(10)
        started = time.perf_counter()
        plain = subprocess.Popen(["sleep", "60"], start_new_session=True)
        times["plain Popen"].append(time.perf_counter() - started)
        plain.kill()
        plain.wait()
    return times


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def render(mem: dict[str, dict[str, Any]], fid: dict[str, str], lat: dict[str, list[float]], runs: int) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    ours = mem["keeper.py"]
    verdict = "**met**" if ours["uss_bytes"] <= TARGET_USS_BYTES else "**missed**"
    lines = ["## Keeper per engine (exit status of adopted engines)", "",
             f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} at commit `{commit}` on "
             f"{platform.system()} {platform.release()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}. "
             f"{ours['count']} keepers of each kind at once, each the parent of a `sleep`; figures are per keeper.",
             "", "| keeper | RSS | USS (its own) | PSS | SIGKILL / `exit 137` recorded as |", "|---|---:|---:|---:|---|"]
    for kind, m in mem.items():
        shown = f"`{kind}` (shipped)" if kind == "keeper.py" else kind
        lines.append(f"| {shown} | {m['rss_bytes'] / 1e6:.1f} MB | {m['uss_bytes'] / 1e6:.1f} MB | "
                     f"{m['pss_bytes'] / 1e6:.1f} MB | {fid[kind]} |")
    lines += ["", f"Target: one more engine costs ≤ {TARGET_USS_BYTES / 1e6:.0f} MB of its own (USS) → {verdict}. "
              "The shell is lighter but cannot tell a SIGKILL (an OOM kill) from `exit 137`, and has no portable "
              "`setsid` (macOS ships none).", "",
              f"Time from asking for a spawn to knowing the engine's pid ({runs} runs each, alternated):", "",
              "| spawn | p50 | p95 |", "|---|---:|---:|"]
    for kind, values in lat.items():
        lines.append(f"| {kind} | {_pct(values, 50) * 1e3:.1f} ms | {_pct(values, 95) * 1e3:.1f} ms |")
    lines += ["", "Reproduce: `.venv/bin/python bench/keeper_bench.py`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="the keeper's memory and spawn time next to the alternatives")
    parser.add_argument("--quick", action="store_true", help="fewer runs; print, do not write docs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    count, runs = (3, 5) if args.quick else (8, 20)
    with tempfile.TemporaryDirectory(prefix="sl-keeper-") as tmp:
        workdir = Path(tmp)
        kinds = ("keeper.py", "python (subprocess, json)", "POSIX sh")
        mem = {kind: memory(kind, workdir, count) for kind in kinds}
        fid = {kind: fidelity(kind, workdir) for kind in kinds}
        lat = spawn_latency(workdir, runs)
    text = render(mem, fid, lat, runs)
    print(text)
    if not args.quick:
        write_section(args.out, "keeper", text)


if __name__ == "__main__":
    main()
