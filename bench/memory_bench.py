"""Engine grows past its footprint: supervisord-llm's memory guard next to supervisord + superlance memmon.

Same child for both: the stand-in engine (``tests/standins/openai_engine.py --grow-mb 30 --tps 40``),
which allocates and touches 30 MB per request and never frees it (mlx_lm.server's prompt cache before
a cap). Same limit for both: 150 MB of the engine's process-tree RSS (supervisord-llm ``memory_hard``;
memmon ``-c -p grow=150MB`` on ``TICK_5``). Both run on their defaults otherwise (the daemon's memory
probe every 5 s). Each run: a 400-token stream is in flight (40 tok/s, 10 s; through the gateway for
supervisord-llm, straight to the engine for supervisord, which has no front), then requests grow the
engine until a 20 ms sampler sees it over the limit. Measured:

* limit crossed (sampler) → the supervisor decided (supervisord-llm: its ``policy.decided`` event;
  memmon: the engine's SIGTERM, seen as the process leaving);
* limit crossed → the engine's process gone;
* tokens the in-flight stream received (of 400): a drain lets it finish, a plain restart cuts it;
* the most the engine held past the limit;
* the engine's stop → the next spawn (the 60 s floor: a restart right after an OOM crashes again).

    .venv/bin/python bench/memory_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BIN,
    PYTHON,
    STANDINS,
    Daemon,
    Supervisord,
    event_wall_s,
    free_port,
    standin_engine_toml,
    summary,
    wait_until,
)

LIMIT_BYTES = 150 * 10**6
GROW_MB = 30
STREAM_TOKENS = 400  # 10 s at 40 tok/s: longer than the probes' tick, so it is in flight at the decision
TPS = 40


class Sampler:
    """RSS of one process tree every 20 ms: when it first went over the limit, its peak, when it left."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.crossed_wall: float | None = None
        self.gone_wall: float | None = None
        self.peak_bytes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            self.gone_wall = time.time()
            return
        while not self._stop:
            try:
                if root.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                self.gone_wall = time.time()
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            if rss > LIMIT_BYTES and self.crossed_wall is None:
                self.crossed_wall = time.time()
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop = True


def _stream(url: str, model: str | None, out: dict[str, Any]) -> None:
    body: dict[str, Any] = {"stream": True, "max_tokens": STREAM_TOKENS,
                            "messages": [{"role": "user", "content": "long"}]}
    if model:
        body["model"] = model
    tokens = 0
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                    tokens += 1
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    out["tokens"] = tokens


def _grow_until_over(url: str, model: str | None, sampler: Sampler) -> None:
    body: dict[str, Any] = {"max_tokens": 1, "messages": [{"role": "user", "content": "grow"}]}
    if model:
        body["model"] = model
    deadline = time.monotonic() + 30
    while sampler.crossed_wall is None and time.monotonic() < deadline:
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    if sampler.crossed_wall is None:
        raise TimeoutError("the engine never went over the limit")


def _one_run(url: str, model: str | None, pid: int) -> tuple[Sampler, dict[str, Any], threading.Thread]:
    sampler = Sampler(pid)
    streamed: dict[str, Any] = {}
    t = threading.Thread(target=_stream, args=(url, model, streamed), daemon=True)
    t.start()
    time.sleep(0.3)
    _grow_until_over(url, model, sampler)
    return sampler, streamed, t


def _daemon_run() -> dict[str, Any]:
    gw = free_port()
    cfg = standin_engine_toml("grow", free_port(), "--grow-mb", str(GROW_MB), "--tps", str(TPS),
                              footprint="100MB", memory_soft="120MB", memory_hard="150MB")
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    d = Daemon(cfg).start()
    try:
        pid = wait_until(lambda: d.engine("grow")["state"] == "ready" and d.engine("grow")["pid"], 30,
                         "engine ready")
        sampler, streamed, t = _one_run(f"http://127.0.0.1:{gw}", "grow", pid)
        wait_until(lambda: sampler.gone_wall, 60, "engine stopped")
        t.join(30)
        sampler.stop()
        engine = wait_until(lambda: (e := d.engine("grow"))["state"] == "backoff" and e, 30, "backoff")
        decided = next(e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "memory_guard"
                       and e.get("decision") == "over")
        assert sampler.crossed_wall is not None and sampler.gone_wall is not None
        return {
            "decided_s": event_wall_s(decided) - sampler.crossed_wall,
            "gone_s": sampler.gone_wall - sampler.crossed_wall,
            "stream_tokens": streamed.get("tokens", 0),
            "over_limit_peak_bytes": max(0, sampler.peak_bytes - LIMIT_BYTES),
            "next_spawn_after_stop_s": engine["next_start_at"] - sampler.gone_wall,
        }
    finally:
        d.cleanup()


def bench_daemon(runs: int) -> dict[str, Any]:
    samples = [_daemon_run() for _ in range(runs)]
    return {"samples": samples, **_summaries(samples),
            "setup": "memory_hard = 150MB (footprint 100MB, soft 120MB), probes.interval 5 s (default), "
                     "drain_grace 30 s (default), requests through the gateway"}


def _supervisord_run() -> dict[str, Any]:
    port = free_port()
    argv = [PYTHON, str(STANDINS / "openai_engine.py"), "--port", str(port), "--grow-mb", str(GROW_MB),
            "--tps", str(TPS)]
    sv = Supervisord("grow", argv, extra=f"""
[eventlistener:memmon]
command={BIN / "memmon"} -c -p grow={LIMIT_BYTES // 10**6}MB
events=TICK_5
stdout_logfile=NONE
""").start()
    try:
        pid = sv.wait_running()
        wait_until(lambda: _answers(port), 20, "engine answering")
        sampler, streamed, t = _one_run(f"http://127.0.0.1:{port}", None, pid)
        wait_until(lambda: sampler.gone_wall, 60, "engine stopped")
        t.join(30)
        sampler.stop()
        sv.wait_running(not_pid=pid)
        respawned = time.time()
        assert sampler.crossed_wall is not None and sampler.gone_wall is not None
        return {
            "decided_s": sampler.gone_wall - sampler.crossed_wall,  # memmon's decision is its stopProcess
            "gone_s": sampler.gone_wall - sampler.crossed_wall,
            "stream_tokens": streamed.get("tokens", 0),
            "over_limit_peak_bytes": max(0, sampler.peak_bytes - LIMIT_BYTES),
            "next_spawn_after_stop_s": respawned - sampler.gone_wall,
        }
    finally:
        sv.stop()


def bench_supervisord(runs: int) -> dict[str, Any]:
    samples = [_supervisord_run() for _ in range(runs)]
    return {"samples": samples, **_summaries(samples),
            "setup": "superlance memmon -c -p grow=150MB on TICK_5 (its shortest tick), requests straight to the engine"}


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _summaries(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("decided_s", "gone_s", "stream_tokens", "over_limit_peak_bytes", "next_spawn_after_stop_s")
    return {k: summary([float(s[k]) for s in samples]) for k in keys}


def run(runs: int = 3) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    daemon = bench_daemon(runs)
    supervisord = bench_supervisord(runs)
    met = (daemon["stream_tokens"]["min"] == STREAM_TOKENS and daemon["next_spawn_after_stop_s"]["min"] >= 59.0
           and daemon["gone_s"]["max"] is not None and daemon["gone_s"]["max"] <= 5 + 30 + 5)
    return {"runs": runs, "commit": commit, "limit_bytes": LIMIT_BYTES, "grow_mb": GROW_MB,
            "stream_tokens": STREAM_TOKENS, "daemon": daemon, "supervisord": supervisord, "met": met,
            "target": "the in-flight stream finishes (all 400 tokens), the next spawn is >= 60 s after the stop, "
                      "and the engine is gone within probe interval + drain grace + 5 s"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print(json.dumps(run(args.runs), indent=1))


if __name__ == "__main__":
    main()
