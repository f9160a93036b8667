"""`footprint = "auto"` measures the weights where the engine finds them: a local directory or file,
the Hugging Face hub cache for a repo id, Ollama's manifests for a tag; a size that cannot be known
refuses the config (check-config and start) instead of counting 0 bytes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from probes.weights import read_weights
from supervisord_llm.config import load_config
from supervisord_llm.errors import ConfigError
from tests.helpers import PYTHON

GB = 10**9


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: the size is real to stat(), no disk is used


def _hf_cache(root: Path, repo_id: str, shards: list[int]) -> Path:
    """A hub cache laid out as huggingface_hub writes it: blobs, a snapshot of links, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, size in enumerate(shards):
        blob = repo / "blobs" / f"sha{i}"
        _sparse(blob, size)
        (snapshot / f"model-0000{i}.safetensors").symlink_to(Path("../../blobs") / f"sha{i}")
    (snapshot / "config.json").write_text("{}")
    return root


def _ollama(root: Path, manifest_rel: str, sizes: list[int]) -> Path:
    path = root / "manifests" / manifest_rel
    path.parent.mkdir(parents=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{i}", "size": s}
              for i, s in enumerate(sizes)]
    path.write_text(json.dumps({"schemaVersion": 2, "config": {"size": 500}, "layers": layers}))
    return root


def test_hf_repo_id_is_measured_in_the_hub_cache(tmp_path) -> None:
    """An `org/name` id counts its cached snapshot's shards (through the blob links)."""
    cache = _hf_cache(tmp_path / "hub", "mlx-community/Big-Model-4bit", [5 * GB, 4 * GB])
    reading = read_weights("mlx-community/Big-Model-4bit", "mlx_lm", {"HF_HUB_CACHE": str(cache)})
    assert reading is not None and reading.bytes == 9 * GB and reading.source == "hf_cache"
    via_home = read_weights("mlx-community/Big-Model-4bit", "vllm", {"HF_HOME": str(tmp_path)})
    assert via_home is not None and via_home.bytes == 9 * GB


@pytest.mark.parametrize(("tag", "manifest"), [
    ("llama3.1:70b", "registry.ollama.ai/library/llama3.1/70b"),
    ("qwen3", "registry.ollama.ai/library/qwen3/latest"),
    ("someone/model:q4", "registry.ollama.ai/someone/model/q4"),
])
def test_ollama_tag_is_measured_from_its_manifest(tmp_path, tag, manifest) -> None:
    """An Ollama tag counts the layer sizes of its manifest (default host, namespace and tag filled in)."""
    models = _ollama(tmp_path / "models", manifest, [40 * GB, 2 * GB])
    reading = read_weights(tag, "ollama", {"OLLAMA_MODELS": str(models)})
    assert reading is not None and reading.bytes == 42 * GB and reading.source == "ollama"


def test_gguf_file_and_model_directory_are_measured(tmp_path) -> None:
    """A GGUF path is its file's size; a model directory sums its weight files, nested ones too."""
    _sparse(tmp_path / "m.gguf", 7 * GB)
    _sparse(tmp_path / "dir" / "a.safetensors", 2 * GB)
    _sparse(tmp_path / "dir" / "sub" / "b.safetensors", 1 * GB)
    (tmp_path / "dir" / "tokenizer.json").write_text("{}")
    assert read_weights(str(tmp_path / "m.gguf"), "llama_cpp", {}).bytes == 7 * GB  # type: ignore[union-attr]
    assert read_weights(str(tmp_path / "dir"), "mlx_lm", {}).bytes == 3 * GB  # type: ignore[union-attr]


def _config(tmp_path: Path, kind: str, model: str, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[[engine]]\nname = "big"\nkind = "{kind}"\n'
                    f'model = "{model}"\nport = 8123\n{extra}')
    return path


@pytest.mark.parametrize(("kind", "model", "words"), [
    ("mlx_lm", "mlx-community/Not-Downloaded", "Hugging Face cache"),
    ("ollama", "llama3.1:405b", "Ollama"),
    ("llama_cpp", "/nowhere/model.gguf", "/nowhere/model.gguf"),
])
def test_auto_footprint_of_an_unknown_size_is_refused_naming_the_key(tmp_path, kind, model, words) -> None:
    """An id whose weights are nowhere here: the config error names engine[0].footprint and asks for a size."""
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "OLLAMA_MODELS": str(tmp_path / "empty")}
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, kind, model), environ=env)
    text = str(err.value)
    assert "engine[0].footprint" in text and 'footprint = "' in text and words in text
    assert load_config(_config(tmp_path, kind, model, 'footprint = "40GB"\n'), environ=env).engines[0] \
        .footprint_bytes == 40 * GB


def test_check_config_refuses_an_unmeasurable_auto_footprint(tmp_path) -> None:
    """`supervisord-llm check-config` exits 2 and names the key when the model's size cannot be known."""
    path = _config(tmp_path, "vllm", "org/not-here")
    done = subprocess.run([PYTHON, "-m", "supervisord_llm.main", "check-config", "--config", str(path)],
                          capture_output=True, text=True, env={"HF_HUB_CACHE": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "footprint" in done.stderr and "org/not-here" in done.stderr


def test_daemon_counts_an_hf_id_engine_at_its_cached_size(tmp_path, monkeypatch) -> None:
    """The admission footprint of an `org/name` engine is its cached weights × footprint_factor, not 0."""
    import io

    import structlog

    from supervisord_llm.daemon import Daemon

    cache = _hf_cache(tmp_path / "hub", "org/big", [100 * GB])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    daemon = Daemon(load_config(_config(tmp_path, "mlx_lm", "org/big")),
                    logger=structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    daemon.open()
    try:
        sup = daemon.supervisors["big"]
        assert daemon.footprint_bytes(sup) == int(100 * GB * daemon.config.memory.auto_factor)
    finally:
        daemon.close()
