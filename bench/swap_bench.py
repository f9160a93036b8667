"""Swap overhead: what a model swap costs beyond its unavoidable parts.

Two exclusive engines (real ``mlx_lm.server`` on the tiny model, two ports) are swapped back and
forth with ``POST /v1/switch`` (``llmctl switch``). From each ``swap.finished`` event:

    overhead = total_s - (stop_s + start_s + memory_wait_s)

i.e. the swap's time minus stopping the old engine, the new one becoming ready (a real
generation) and the wait for memory to come back. The drain of in-flight requests (none here)
is counted as overhead, not excused. Target: at most 1 s.

    .venv/bin/python bench/swap_bench.py [--swaps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Daemon, free_port, mlx_engine_toml, summary, tiny_model_dir, wait_ready_pid  # noqa: E402

TARGET_OVERHEAD_S = 1.0


def run(swaps: int = 6) -> dict[str, Any]:
    model = tiny_model_dir()
    d = Daemon(mlx_engine_toml("a", free_port(), model, exclusive=True, default=True)
               + mlx_engine_toml("b", free_port(), model, exclusive=True)).start()
    rows = []
    try:
        wait_ready_pid(d, "a", None, 120)
        for i in range(swaps):
            target = "b" if i % 2 == 0 else "a"
            response = d.post("/v1/switch", {"name": target}, timeout=300)
            assert response.status_code == 200, response.text
            event = [e for e in d.events() if e["kind"] == "swap.finished" and e["target"] == target][-1]
            parts = {k: float(event.get(k) or 0.0) for k in ("total_s", "drain_s", "stop_s", "memory_wait_s",
                                                              "start_s")}
            parts["overhead_s"] = parts["total_s"] - (parts["stop_s"] + parts["start_s"] + parts["memory_wait_s"])
            resident = [e["name"] for e in d.status()["engines"] if e["pid"]]
            parts["resident_after"] = resident
            rows.append({"target": target, **parts})
            assert resident == [target], f"after the swap to {target} resident: {resident}"
    finally:
        d.cleanup()
    overheads = [r["overhead_s"] for r in rows]
    return {"swaps": rows, "overhead": summary(overheads), "total": summary([r["total_s"] for r in rows]),
            "target_s": TARGET_OVERHEAD_S, "met": max(overheads) <= TARGET_OVERHEAD_S}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=6)
    args = p.parse_args()
    print(json.dumps(run(args.swaps), indent=1))


if __name__ == "__main__":
    main()
