"""`llmctl doctor`: a preflight that names what is wrong and how to fix it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers import PYTHON, free_port


def _model_dir(tmp_path: Path, shards: dict[str, int]) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weight_map = {f"layer{i}": name for i, name in enumerate(shards)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name, size in shards.items():
        if size >= 0:
            (model / name).write_bytes(b"\0" * size)
    return model


def _doctor(tmp_path: Path, model: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[[engine]]\nname = "big"\nkind = "mlx_lm"\n'
                      f'model = "{model}"\nport = {free_port()}\nfootprint = "1GB"\n')
    return subprocess.run([PYTHON, "-m", "supervisord_llm.cli", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_doctor_names_a_missing_shard(tmp_path: Path) -> None:
    """A shard listed in the index but absent is named, with a fix; exit code 1."""
    model = _model_dir(tmp_path, {"model-00001-of-00003.safetensors": 10, "model-00002-of-00003.safetensors": -1,
                                  "model-00003-of-00003.safetensors": 10})
    done = _doctor(tmp_path, model)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing" in done.stdout
    assert "fix: the download is incomplete" in done.stdout


def test_doctor_names_an_empty_shard(tmp_path: Path) -> None:
    """A zero-byte shard (interrupted download) is an error too."""
    model = _model_dir(tmp_path, {"a.safetensors": 10, "b.safetensors": 0})
    done = _doctor(tmp_path, model)
    assert done.returncode == 1
    assert "shard b.safetensors" in done.stdout and "is empty (0 bytes)" in done.stdout


def test_doctor_passes_a_complete_setup(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny model with a free port and a fitting footprint: no errors, exit 0."""
    done = _doctor(tmp_path, tiny_model)
    assert done.returncode == 0, done.stdout
    assert "0 error(s)" in done.stdout
    assert "is free" in done.stdout
