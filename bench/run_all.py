"""Run every side-by-side benchmark and write the figures to docs/benchmarks.md (and the crash plot).

    .venv/bin/python bench/run_all.py            # full: footprint over 5 minutes
    .venv/bin/python bench/run_all.py --quick    # footprint over 60 s (CI); the doc says which
    .venv/bin/python bench/run_all.py --only crash,swap

Each benchmark's section lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in
docs/benchmarks.md; other sections (the gateway's) are left as they are. The raw results, with the
machine and the command, go to bench/results/latest.json. A figure that misses its target says so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = common.REPO
DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "crash-detection.png"
RESULTS = REPO / "bench" / "results" / "latest.json"
ORDER = ("crash", "hang", "slowdown", "footprint", "swap", "memory", "fault_matrix")  # footprint also times status


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} ms"


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.1f} MB"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def render_run(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return "\n".join([
        "### Run", "",
        f"- when: {meta['finished_at']}  (took {meta['took_s']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_bytes'] / 1e9:.1f} GB RAM, "
        f"{m['platform']}",
        f"- versions: Python {m['python']}, supervisord-llm {m['supervisord_llm']}, supervisor {m['supervisor']}, "
        f"mlx {m['mlx']}",
    ]) + "\n"


def render_crash(r: dict[str, Any]) -> str:
    d, s = r["daemon"], r["supervisord"]
    speed = r["speedup_p50"]
    return "\n".join([
        "### Crash detection (SIGKILL of the engine)", "",
        f"Same child for both: the stand-in engine (`{r['child']}`), {r['runs']} runs each. supervisord-llm: "
        f"a fresh engine after each run via `{d['restart_method'].split(' after')[0]}` (automatic restarts are "
        f"≥ 60 s apart by design); supervisord: {s['restart_method']}. A random 0.1–0.6 s pause precedes each kill.",
        "", "| measure | supervisord-llm p50 / p95 | supervisord p50 / p95 |", "|---|---|---|",
        f"| record in the file, seen by a 1 ms poller (events.jsonl / supervisord.log) | "
        f"{_ms(d['observed']['p50'])} / {_ms(d['observed']['p95'])} | "
        f"{_ms(s['observed']['p50'])} / {_ms(s['observed']['p95'])} |",
        f"| the record's own timestamp (event `at` / log line time) | {_ms(d['recorded']['p50'])} / "
        f"{_ms(d['recorded']['p95'])} | {_ms(s['recorded']['p50'])} / {_ms(s['recorded']['p95'])} |",
        f"| delivered to a client (`llmctl events -f` stream) | {_ms(d['client']['p50'])} / "
        f"{_ms(d['client']['p95'])} | — |",
        "",
        f"Target: p50 ≤ {r['target']['p50_ms']:.0f} ms and ≥ {r['target']['speedup']:.0f}× faster than supervisord. "
        f"Observed: p50 {_ms(d['observed']['p50'])}, {speed:.2f}× supervisord's p50 → {_verdict(r['met'])}.",
        "", "![crash detection](crash-detection.png)", "",
    ])


def render_hang(r: dict[str, Any]) -> str:
    st = r["settings"]
    rows = ["### Hang detection (SIGSTOP of a real mlx_lm.server, tiny model)", "",
            f"{r['runs']} runs per case on one daemon; canary every {st['canary_interval_s']:g} s "
            f"(timeout {st['canary_timeout_s']:g} s), engine stall {st['engine_stall_s']:g} s, gateway "
            f"decode stall {st['gateway_decode_stall_s']:g} s, process probe every {st['process_interval_s']:g} s. "
            "Time from SIGSTOP to the `hung` state change seen on the event stream; SIGCONT brings it back to "
            "`ready` without a restart.", "",
            "| case | p50 | p95 | max | detected by | target | verdict |", "|---|---|---|---|---|---|---|"]
    for case, label, target in (("idle", "no request in flight", r["target"]["idle_s"]),
                                ("stream", "live stream through the gateway", r["target"]["stream_s"])):
        c = r[case]
        reasons = sorted({s["reason"] for s in c["samples"]})
        rows.append(f"| {label} | {_s(c['p50'])} | {_s(c['p95'])} | {_s(c['max'])} | {'; '.join(reasons)} | "
                    f"≤ {target:g} s | {_verdict(c['max'] is not None and c['max'] <= target)} |")
    return "\n".join(rows) + "\n"


def render_slowdown(r: dict[str, Any]) -> str:
    st = r["settings"]
    ratio = r["speed_ratio"]
    return "\n".join([
        "### Slowdown detection (SIGSTOP/SIGCONT duty cycle of a real mlx_lm.server)", "",
        f"Degraded settings: window {st['window_s']:g} s, {st['windows']} windows, share {st['share']}. "
        f"Traffic: one streaming request after another through the gateway. Baseline learned after "
        f"{r['baseline_learned_after_s']:.0f} s: {r['baseline_tokens_per_s']} tok/s. Duty cycle run "
        f"{st['duty_cycle_run_ms']} ms / stop {st['duty_cycle_stop_ms']} ms → client-side speed "
        f"{'—' if ratio is None else f'{ratio * 100:.0f}%'} of healthy.", "",
        "| measure | value |", "|---|---|",
        f"| slowdown start → `degraded` | {_s(r['detect_s'])} |",
        f"| reason | {r['reason']} |",
        f"| duty cycle off → `ready` again | {_s(r['recovered_after_s'])} |",
        f"| false `degraded` before the slowdown | {r['false_degraded_before_slowdown']} |",
        f"| `hung` episodes during the slowdown | {r['hung_during_slowdown']} |",
        "",
        *_baseline_note(r),
        f"Target: `degraded` within the configured windows ({st['windows']} × {st['window_s']:g} s = "
        f"{r['target_s']:g} s) → {_verdict(r['met'])}.", "",
    ])


def _baseline_note(r: dict[str, Any]) -> list[str]:
    """Say so when the baseline the detection used is far from the one learned first."""
    import re

    found = re.search(r"of the ([0-9.]+) tok/s baseline", r.get("reason") or "")
    learned = r.get("baseline_tokens_per_s")
    if not found or not learned or float(found.group(1)) < 2 * float(learned):
        return []
    client = r.get("client_tokens_per_s_healthy_median")
    seen = f" while the client measured a median of {client:.0f} tok/s per stream" if client else ""
    return [f"Note: the baseline rose from {learned} tok/s (first learned) to {found.group(1)} tok/s by the time "
            f"of detection, during healthy traffic{seen}. A p90 baseline that far above what the engine delivers "
            "(suspected: outlier rates from gateway stream samples) would flag a healthy engine as degraded too; "
            "the slowed rate was below 50% of the first baseline as well.", ""]


def render_footprint(r: dict[str, Any]) -> str:
    d, s = r["daemon"], r["supervisord"]
    g = r.get("gateway")
    st = r["status"]
    gateway_rows = [] if g is None else [
        f"| its gateway process: RSS max | {_mb(g['rss_max_bytes'])} | | | |",
        f"| its gateway process: CPU (of one core) | {g['cpu_percent']:.3f}% | | | |",
        f"| daemon and gateway: RSS max, summed | {_mb(d['rss_max_bytes'] + g['rss_max_bytes'])} | | | |",
    ]
    return "\n".join([
        f"### Footprint ({r['mode']}) and status", "",
        f"Each supervisor supervising a real idle {r['engine']} for {r['duration_s']:.0f} s; {r['side_by_side']}. "
        "supervisord-llm with every probe on (process tree 1 s, memory 5 s, canary 60 s, gateway listening). "
        f"Engine state afterwards: {r['engine_state_after']}.", "",
        "| | supervisord-llm | supervisord | target (the daemon's process) | verdict |", "|---|---|---|---|---|",
        f"| RSS max | {_mb(d['rss_max_bytes'])} | {_mb(s['rss_max_bytes'])} | ≤ {_mb(r['target']['rss_bytes'])} | "
        f"{_verdict(r['met']['rss'])} |",
        f"| RSS mean | {_mb(d['rss_mean_bytes'])} | {_mb(s['rss_mean_bytes'])} | | |",
        f"| CPU (of one core) | {d['cpu_percent']:.3f}% | {s['cpu_percent']:.3f}% | ≤ {r['target']['cpu_percent']}% | "
        f"{_verdict(r['met']['cpu'])} |",
        *gateway_rows,
        "",
        f"`llmctl status` against `supervisorctl status`, {r['status_runs']} runs each, alternated, same run "
        "(each a fresh CLI process):", "",
        "| | p50 | p95 |", "|---|---|---|",
        f"| llmctl status | {_ms(st['llmctl']['p50'] * 1000)} | {_ms(st['llmctl']['p95'] * 1000)} |",
        f"| supervisorctl status | {_ms(st['supervisorctl']['p50'] * 1000)} | "
        f"{_ms(st['supervisorctl']['p95'] * 1000)} |",
        "", f"Target: not slower → {_verdict(r['met']['status'])}.", "",
    ])


def render_swap(r: dict[str, Any]) -> str:
    rows = ["### Swap overhead", "",
            "Two exclusive real mlx_lm.server engines (tiny model) swapped back and forth with `POST /v1/switch`. "
            "overhead = total − (stop + new ready + memory-return wait), from each `swap.finished` event; "
            "the drain of in-flight requests counts as overhead.", "",
            "| # | to | total | stop | memory wait | new ready | drain | overhead |", "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(r["swaps"], 1):
        rows.append(f"| {i} | {s['target']} | {_s(s['total_s'])} | {_s(s['stop_s'])} | {_s(s['memory_wait_s'])} | "
                    f"{_s(s['start_s'])} | {_s(s['drain_s'])} | {_s(s['overhead_s'])} |")
    rows += ["", f"Overhead p50 {_s(r['overhead']['p50'])}, max {_s(r['overhead']['max'])}; target ≤ "
                 f"{r['target_s']:g} s → {_verdict(r['met'])}. After every swap exactly one engine was resident.", ""]
    return "\n".join(rows)


def render_fault_matrix(r: dict[str, Any]) -> str:
    import fault_matrix

    return fault_matrix.render(r)


def render_memory(r: dict[str, Any]) -> str:
    d, s = r["daemon"], r["supervisord"]

    def row(label: str, key: str, fmt: Any) -> str:
        return (f"| {label} | {fmt(d[key]['p50'])} / {fmt(d[key]['max'])} | "
                f"{fmt(s[key]['p50'])} / {fmt(s[key]['max'])} |")

    def tokens(v: float | None) -> str:
        return "—" if v is None else f"{v:.0f} of {r['stream_tokens']}"

    return "\n".join([
        "### Engine grows past its footprint (memory guard)", "",
        f"Same child for both: the stand-in engine, which allocates and touches {r['grow_mb']} MB per request and "
        f"never frees it; limit {_mb(r['limit_bytes'])} of the process tree's RSS; {r['runs']} runs each "
        f"(commit {r['commit']}). supervisord-llm: {d['setup']}. supervisord: {s['setup']}. A "
        f"{r['stream_tokens']}-token stream is in flight when the engine crosses the limit; a 20 ms sampler times it.",
        "", "| measure | supervisord-llm p50 / max | supervisord + memmon p50 / max |", "|---|---|---|",
        row("limit crossed → decided", "decided_s", _s),
        row("limit crossed → engine gone", "gone_s", _s),
        row("in-flight stream received", "stream_tokens", tokens),
        row("held past the limit (peak)", "over_limit_peak_bytes", _mb),
        row("engine gone → next spawn", "next_spawn_after_stop_s", _s),
        "",
        f"Target: {r['target']} → {_verdict(r['met'])}."
        + (" memmon stopped the engine with the stream still running (the client got a cut answer) and "
           "restarted it at once; the guard drained first and kept the 60 s floor (a restart right after an "
           "out-of-memory crash crashes again)." if (s["stream_tokens"]["min"] or 0) < r["stream_tokens"] else ""),
        "",
    ])


RENDER = {"crash": render_crash, "hang": render_hang, "slowdown": render_slowdown, "footprint": render_footprint,
          "swap": render_swap, "memory": render_memory,
          "fault_matrix": render_fault_matrix}


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(DOC.parent.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(body: str, when: str, commit: str) -> str:
    """A section's body with the run it came from: sections of different runs share the doc, so
    each one says its own date and commit (the doc never shows a figure of unknown origin)."""
    head, _, rest = body.partition("\n")
    return f"{head}\n\n_Run {when} at commit `{commit}`._\n{rest}"


def write_doc(results: dict[str, Any], meta: dict[str, Any]) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else (
        "# Benchmarks\n\nSide-by-side figures, written by `make bench` (`bench/run_all.py`). "
        "Each section says how it was measured and whether its target was met.\n")
    text = common.replace_section(text, "bench-run", render_run(meta))
    for name in ORDER:
        if name in results:
            r = results[name]
            body = RENDER[name](r) if "error" not in r else f"### {name}\n\nThe benchmark failed: `{r['error']}`\n"
            text = common.replace_section(text, name, stamp(body, meta["finished_at"], meta.get("commit") or _commit()))
    DOC.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="footprint over 60 s instead of 5 minutes")
    p.add_argument("--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--runs", type=int, default=20, help="crash runs per supervisor (at least 20 for the figure)")
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from bench/results/latest.json")
    args = p.parse_args()
    if args.render_only:
        saved = json.loads(RESULTS.read_text())
        write_doc({k: v for k, v in saved.items() if k in ORDER}, saved["meta"])
        print(f"wrote {DOC}")
        return
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(ORDER)
    if unknown:
        p.error(f"unknown benchmark {sorted(unknown)[0]!r}; valid: {', '.join(ORDER)}")
    import crash_bench
    import fault_matrix
    import footprint_bench
    import hang_bench
    import memory_bench
    import slowdown_bench
    import swap_bench

    runners = {"crash": lambda: crash_bench.run(args.runs), "hang": lambda: hang_bench.run(5),
               "slowdown": slowdown_bench.run, "footprint": lambda: footprint_bench.run(args.quick),
               "swap": lambda: swap_bench.run(6), "memory": lambda: memory_bench.run(3),
               "fault_matrix": fault_matrix.run}
    started = time.monotonic()
    results: dict[str, Any] = {}
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = runners[name]()
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"   {time.monotonic() - t0:.0f} s", flush=True)
    meta = {"machine": common.machine_info(), "command": " ".join(shlex.quote(a) for a in
                                                                    ["bench/run_all.py", *sys.argv[1:]]),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "took_s": time.monotonic() - started,
            "quick": args.quick, "commit": _commit()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**previous, **results, "meta": meta}, indent=1))
    if "crash" in results and "error" not in results["crash"]:
        import crash_bench as cb

        cb.plot(results["crash"], PLOT)
    write_doc(results, meta)
    for name, r in results.items():
        print(f"{name}: {'error ' + r['error'] if 'error' in r else 'met' if r.get('met') is True else r.get('met')}")
    print(f"wrote {DOC} and {RESULTS}")


if __name__ == "__main__":
    main()
