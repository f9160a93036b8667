"""Where the real llama.cpp ``llama-server`` and its tiny GGUF are (``make engines`` builds both)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO, _toml


def llama_server_binary() -> Path | None:
    """``$SUPERVISORD_LLM_LLAMA_SERVER``, else the one ``make engines`` built, else ``llama-server`` on PATH."""
    explicit = os.environ.get("SUPERVISORD_LLM_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    built = REPO / ".engines" / "llama.cpp" / "bin" / "llama-server"
    if built.is_file():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def tiny_gguf() -> Path:
    return Path(os.environ.get("SUPERVISORD_LLM_LLAMA_MODEL", REPO / ".engines" / "models" / "tiny-llama.gguf"))


def require_llama_server() -> tuple[Path, Path]:
    """The binary and the model, or a skip (a failure under ``make test``, which builds them first)."""
    binary, model = llama_server_binary(), tiny_gguf()
    if binary is not None and binary.is_file() and model.is_file():
        return binary, model
    why = f"llama-server ({binary}) or its model ({model}) is missing: run `make engines`"
    if os.environ.get("SUPERVISORD_LLM_REQUIRE_ENGINES") == "1":
        pytest.fail(why)
    pytest.skip(why)


def llama_engine_toml(name: str, port: int, binary: Path, model: Path, *args: str, **keys: object) -> str:
    """An [[engine]] table of kind llama_cpp running the real llama-server."""
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "llama_cpp"', f'model = "{model}"', f"port = {port}",
             f"command = [{_toml(str(binary))}]", f"args = [{', '.join(_toml(a) for a in args)}]"]
    keys.setdefault("footprint", "300MB")
    keys.setdefault("stop_grace", "10s")
    keys.setdefault("start_timeout", "60s")
    for k, v in keys.items():
        lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"
