"""The README's pictures, from real runs: the status page in headless Chromium, and a hang episode.

* ``docs/status-page.png``: the status page test (tests/integration/test_status_page.py) run with
  ``SUPERVISORD_LLM_PICTURES_DIR=docs`` against `supervisord-llm demo`; it takes the screenshot.
* ``docs/hang-episode.png``: a real mlx_lm.server (tiny model) under the daemon with streamed
  traffic through the gateway; the engine is SIGSTOPped, the daemon says `hung`, restarts it after
  `hang_restart_after` and it is `ready` again. Plotted: the daemon's tokens/s for the engine over
  time and the client's own tokens/s, with each state change the daemon logged marked.

    .venv/bin/python bench/pictures.py [--only status|hang]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import Daemon, free_port, mlx_engine_toml, tiny_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def status_page() -> None:
    env = {**os.environ, "SUPERVISORD_LLM_PICTURES_DIR": str(DOCS)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/integration/test_status_page.py", "-k",
                    "follows_a_hang"], cwd=REPO, env=env, check=True)
    print(f"wrote {DOCS / 'status-page.png'}")


def hang_episode() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gateway = free_port()
    config = (mlx_engine_toml("tiny", free_port(), tiny_model_dir()) +
              f'\n[gateway]\nlisten = "127.0.0.1:{gateway}"\n\n[policies.restart]\nhang_restart_after = "10s"\n')
    d = Daemon(config).start()
    samples: list[tuple[float, str, float | None]] = []
    client_tokens: list[float] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{gateway}/v1/chat/completions", timeout=120,
                                  json={"messages": [{"role": "user", "content": "count"}], "max_tokens": 200,
                                        "stream": True}) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            client_tokens.append(time.time())
            except httpx.HTTPError:
                time.sleep(0.5)

    try:
        d.wait_state("tiny", "ready", 90)
        started = time.time()
        threading.Thread(target=traffic, daemon=True).start()
        stopped_at = None
        while time.time() - started < 170:
            engine = d.engine("tiny")
            samples.append((time.time(), engine["state"], engine.get("tokens_per_s")))
            if stopped_at is None and time.time() - started > 45:
                os.kill(engine["pid"], signal.SIGSTOP)
                stopped_at = time.time()
            time.sleep(0.5)
        stop.set()
        events = [e for e in d.events() if e.get("kind") == "engine.state_changed" and e.get("engine") == "tiny"]
    finally:
        d.cleanup()

    t0 = started
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    xs = [t - t0 for t, _, _ in samples]
    # The daemon's rolling rate means something only while the engine serves; elsewhere it is not drawn.
    ax.plot(xs, [v if v is not None and state in ("ready", "degraded") else float("nan") for _, state, v in samples],
            label="daemon: tokens/s (rolling, while ready)", color="#1f6feb", linewidth=2)
    if client_tokens:
        buckets: dict[int, int] = {}
        for t in client_tokens:
            buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        seconds = list(range(0, int(xs[-1]) + 1))
        ax.plot(seconds, [buckets.get(s, 0) for s in seconds], label="client: tokens received per second",
                color="#8b949e", linewidth=1, alpha=0.8)
    colours = {"hung": "#d1242f", "stopping": "#9a6700", "starting": "#0969da", "ready": "#1a7f37", "backoff": "#8250df"}
    for event in events:
        at = _event_time(event) - t0
        if at < 0:
            continue
        ax.axvline(at, color=colours.get(event["to"], "#444"), linestyle="--", linewidth=1)
        if event["to"] in ("hung", "backoff", "starting", "ready"):
            ax.text(at + 0.8, ax.get_ylim()[1] * 0.97, event["to"], rotation=90, va="top", fontsize=8,
                    color=colours.get(event["to"], "#444"))
    if stopped_at is not None:
        ax.axvspan(stopped_at - t0, stopped_at - t0 + 0.3, color="#d1242f", alpha=0.6)
        ax.text(stopped_at - t0 - 1, ax.get_ylim()[1] * 0.5, "SIGSTOP", rotation=90, ha="right", fontsize=8, color="#d1242f")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s")
    ax.set_title("A hang on a real mlx_lm.server: detected, restarted (after the backoff), ready again")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "hang-episode.png")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "hang-episode.json").write_text(json.dumps(
        {"started_wall": started, "sigstop_wall": stopped_at, "samples": samples, "state_changes": events}, indent=1))
    print(f"wrote {DOCS / 'hang-episode.png'}")


def _event_time(event: dict) -> float:
    from datetime import datetime

    at = event.get("at") or event.get("ts")
    if isinstance(at, (int, float)):
        return float(at)
    return datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["status", "hang"])
    args = parser.parse_args()
    if args.only in (None, "status"):
        status_page()
    if args.only in (None, "hang"):
        hang_episode()


if __name__ == "__main__":
    main()
