"""``llmctl doctor`` on memory caps: an engine should bound its own cache or have watermarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisord_llm.config import load_config
from supervisord_llm.doctor import check_memory_cap


def _engine(tmp_path: Path, kind: str, extra: str = "", guard: str = ""):
    text = f'[[engine]]\nname = "e"\nkind = "{kind}"\nmodel = "/models/m"\nfootprint = "100GB"\n{extra}{guard}'
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(path)
    return config.engines[0], config


@pytest.mark.parametrize(
    ("kind", "args", "level", "text"),
    [
        ("mlx_lm", '["--prompt-cache-bytes", "16GB"]', "ok", "--prompt-cache-bytes"),
        ("mlx_lm", '["--max-kv-size", "65536"]', "error", "has no --max-kv-size"),
        ("llama_cpp", '["-c", "8192"]', "ok", "-c"),
        ("llama_cpp", '["--ctx-size=8192"]', "ok", "--ctx-size"),
        ("vllm", '["--gpu-memory-utilization", "0.85"]', "ok", "--gpu-memory-utilization"),
        ("mlx_lm", "[]", "warn", "no engine-side cache cap"),
        ("vllm", '["--max-model-len", "8192"]', "warn", "no engine-side cache cap"),
        ("ollama", "[]", "warn", "no engine-side cache cap"),
    ],
)
def test_doctor_warns_when_neither_a_cache_cap_nor_watermarks_are_set(tmp_path, kind, args, level, text) -> None:
    """A cap in the engine's args passes; without one (and without watermarks) doctor warns with the fix."""
    engine, config = _engine(tmp_path, kind, f"args = {args}\n")
    finding = check_memory_cap(engine, config)
    assert finding.level == level and text in finding.message, finding
    if level == "warn":
        assert "memory_soft" in finding.fix
        if kind == "mlx_lm":
            assert "--prompt-cache-bytes" in finding.fix


def test_watermarks_are_enough(tmp_path) -> None:
    """Explicit watermarks satisfy the check for an engine without a cap flag."""
    engine, config = _engine(tmp_path, "mlx_lm", 'memory_hard = "130GB"\n')
    finding = check_memory_cap(engine, config)
    assert finding.level == "ok" and "130.0 GB" in finding.message


def test_a_disabled_guard_is_named(tmp_path) -> None:
    """With the guard off and no cap, the warning says the guard is off."""
    engine, config = _engine(tmp_path, "mlx_lm", guard="[policies.memory_guard]\nenabled = false\n")
    finding = check_memory_cap(engine, config)
    assert finding.level == "warn" and "guard is off" in finding.message
