"""``llmctl status`` text: each guarded engine gets a memory line (now, peak, watermarks, flag)."""

from __future__ import annotations

from supervisord_llm.cli import render_status


def _doc(memory: dict) -> dict:
    engine = {"name": "qwen", "engine": "mlx_lm", "state": "ready", "pid": 42, "port": 8080, "for_s": 5.0,
              "restarts": 0, "memory": {"rss_bytes": 2 * 10**9, "gpu_bytes": None, **memory}}
    return {"daemon": {"version": "0", "pid": 1, "uptime_s": 1.0, "state_dir": "/s"}, "engines": [engine],
            "system": {"memory": {"available_bytes": 10**11, "total_bytes": 5 * 10**11}}, "alerts": {}}


def test_status_shows_current_peak_and_watermarks() -> None:
    """Current, peak (and a larger learned peak from earlier runs), soft and hard are on one line."""
    text = render_status(_doc({"held_bytes": 140 * 10**9, "peak_bytes": 141 * 10**9, "learned_peak_bytes": 150 * 10**9,
                               "soft_bytes": 154 * 10**9, "hard_bytes": 182 * 10**9, "guard": "ok"}))
    assert ("memory qwen: 140.0 GB now, peak 141.0 GB, learned peak 150.0 GB, soft 154.0 GB, hard 182.0 GB\n"
            in text), text


def test_status_flags_a_high_or_draining_engine() -> None:
    """Over soft the line says HIGH; over hard it says the engine is draining for a restart."""
    high = render_status(_doc({"held_bytes": 160, "peak_bytes": 160, "soft_bytes": 154, "hard_bytes": 182,
                               "guard": "high"}))
    assert "HIGH" in high
    draining = render_status(_doc({"held_bytes": 190, "peak_bytes": 190, "soft_bytes": 154, "hard_bytes": 182,
                                   "guard": "draining"}))
    assert "draining for a restart" in draining


def test_no_line_for_an_unguarded_engine_without_history() -> None:
    """An engine without watermarks or a learned peak (older daemons' status too) adds no line."""
    assert "memory qwen" not in render_status(_doc({}))


def test_an_engine_unloaded_when_idle_says_so_and_shows_no_memory() -> None:
    """A stopped engine's last memory reading is of a process that is gone: '-'; idle says why it stopped."""
    doc = _doc({"held_bytes": None})
    doc["engines"][0].update(state="stopped", state_reason="idle", pid=None)
    row = next(line for line in render_status(doc).splitlines() if line.startswith("qwen"))
    assert "unloaded when idle" in row and "2.0 GB" not in row, row
