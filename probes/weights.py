"""Where a model's weights are and how many bytes they take, for ``footprint = "auto"``.

A model is named in one of three ways, and each is looked up where its engine would find it:

* a local directory (mlx_lm, vLLM, SGLang, oMLX's folder of model folders) or file (a GGUF for
  llama-server): the weight files under it;
* a Hugging Face repo id (``mlx-community/Llama-3.2-1B-Instruct-4bit``, a vLLM/SGLang model id): the
  snapshot in the local hub cache, laid out by huggingface_hub as
  ``<cache>/models--<org>--<name>/snapshots/<revision>/`` with ``refs/main`` naming the revision
  (huggingface_hub ``file_download.py``/``constants.py``: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``);
* an Ollama tag (``llama3.1:70b``, ``user/model``): the sizes of the layers in its manifest,
  ``<models>/manifests/<host>/<namespace>/<model>/<tag>`` (ollama ``types/model/name.go``: host
  ``registry.ollama.ai``, namespace ``library`` and tag ``latest`` by default; ``envconfig``:
  ``OLLAMA_MODELS``, else ``~/.ollama/models``; the Linux service keeps them under
  ``/usr/share/ollama/.ollama/models``).

None means the size cannot be known here (not downloaded yet, a typo): the caller must not guess 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth")


@dataclass(frozen=True, slots=True)
class WeightsReading:
    """How big a model's weights are, and where they were found (for messages)."""

    bytes: int
    source: str  # "directory" | "file" | "hf_cache" | "ollama"
    path: str


def hf_hub_cache(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    xdg = environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def ollama_model_dirs(environ: Mapping[str, str]) -> list[Path]:
    if environ.get("OLLAMA_MODELS"):
        return [Path(environ["OLLAMA_MODELS"]).expanduser()]
    return [Path("~/.ollama/models").expanduser(), Path("/usr/share/ollama/.ollama/models")]


def _weights_under(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                try:
                    total += (Path(root) / name).stat().st_size  # follows the hub cache's blob links
                except OSError:
                    pass
    return total


def _hf_snapshot(repo_id: str, environ: Mapping[str, str]) -> Path | None:
    repo = hf_hub_cache(environ) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def ollama_manifest_path(name: str, models_dir: Path) -> Path:
    """The manifest file of an Ollama model name such as ``llama3.1:70b`` or ``host/ns/model:tag``."""
    base, _, tag = name.partition(":")
    if base.count("/") >= 2:
        host, namespace, model = base.split("/", 2)
    elif "/" in base:
        host, (namespace, model) = "registry.ollama.ai", base.split("/", 1)
    else:
        host, namespace, model = "registry.ollama.ai", "library", base
    return models_dir / "manifests" / host / namespace / model / (tag or "latest")


def _ollama_bytes(name: str, environ: Mapping[str, str]) -> WeightsReading | None:
    for models_dir in ollama_model_dirs(environ):
        path = ollama_manifest_path(name, models_dir)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            continue
        total = sum(int(layer.get("size", 0)) for layer in layers
                    if isinstance(layer, dict) and isinstance(layer.get("size"), int))
        if total > 0:
            return WeightsReading(total, "ollama", str(path))
    return None


def read_weights(model: str | None, kind: str, environ: Mapping[str, str] | None = None) -> WeightsReading | None:
    """The size of ``model``'s weights as ``kind`` would load them; None when it cannot be known."""
    if not model:
        return None
    environ = os.environ if environ is None else environ
    if kind == "ollama":
        return _ollama_bytes(model, environ)
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return WeightsReading(path.stat().st_size, "file", str(path))
    if path.is_dir():
        total = _weights_under(path)
        return WeightsReading(total, "directory", str(path)) if total else None
    if model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        snapshot = _hf_snapshot(model, environ)
        if snapshot is not None:
            total = _weights_under(snapshot)
            if total:
                return WeightsReading(total, "hf_cache", str(snapshot))
    return None


def where_looked(model: str, kind: str, environ: Mapping[str, str] | None = None) -> str:
    """Where ``read_weights`` looked, for an error message."""
    environ = os.environ if environ is None else environ
    if kind == "ollama":
        return "Ollama's manifests in " + " and ".join(str(ollama_manifest_path(model, d))
                                                      for d in ollama_model_dirs(environ))
    places = [f"a local directory or file {os.path.expanduser(model)!r}"]
    if model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        places.append(f"the Hugging Face cache {hf_hub_cache(environ)}")
    return " or ".join(places)


__all__ = ["WeightsReading", "hf_hub_cache", "ollama_manifest_path", "read_weights", "where_looked"]
