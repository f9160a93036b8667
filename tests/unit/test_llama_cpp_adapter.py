"""The llama_cpp adapter against llama-server's real surfaces (recorded in tests/fixtures/llama_cpp/)."""

from __future__ import annotations

import json

import httpx
import pytest

from probes.counters import COUNTER_KINDS, parse_prometheus_counters
from supervisord_llm.config import EngineConfig
from supervisord_llm.engine.adapters import ADAPTERS, EngineAdapter, LlamaCppAdapter, adapter_for, gpu_visibility_env
from tests.helpers import FIXTURES

LLAMA = FIXTURES / "llama_cpp"


@pytest.mark.parametrize("kind", sorted(k for k, cls in ADAPTERS.items() if cls.counters_kind))
def test_every_adapters_counters_kind_is_one_the_counters_probe_reads(kind: str) -> None:
    """An engine's counters are actually read: its adapter names a kind the counters probe knows."""
    assert ADAPTERS[kind].counters_kind in COUNTER_KINDS


def test_llama_server_serves_the_messages_api_natively() -> None:
    """The gateway forwards /v1/messages to llama-server instead of refusing it."""
    assert LlamaCppAdapter.supports_messages is True


def test_recorded_metrics_of_the_real_llama_server_parse() -> None:
    """The /metrics text recorded from the real llama-server gives its token counter and running requests."""
    counters = parse_prometheus_counters((LLAMA / "metrics.txt").read_text(), LlamaCppAdapter.counters_kind or "")
    assert counters.generated_tokens_total == 20.0 and counters.requests_running == 0.0


def test_loading_answer_is_shown_by_its_message() -> None:
    """llama-server's recorded 503 while loading reads as "503 Loading model" in status, not a bare code."""
    body = json.loads((LLAMA / "health-loading.json").read_text())["body"]
    response = httpx.Response(503, json=body)
    assert EngineAdapter.liveness_detail(response) == "503 Loading model"
    assert EngineAdapter.liveness_detail(httpx.Response(502, text="<html>Bad Gateway</html>\n")) == \
        "502 <html>Bad Gateway</html>"


def test_gpu_devices_restrict_what_the_engine_sees_in_nvml_order() -> None:
    """gpu_devices = [1] shows the engine only NVML's device 1 (PCI bus order); an explicit env wins."""
    assert gpu_visibility_env(()) == {}
    assert gpu_visibility_env((1,)) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    cfg = EngineConfig(name="a", kind="llama_cpp", model="/m.gguf", port=1, gpu_devices=(0, 1),
                       env={"CUDA_VISIBLE_DEVICES": "GPU-abc"})
    env = adapter_for(cfg).env()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-abc" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_llama_server_key_is_taken_from_its_own_flag_env_or_key_file(tmp_path) -> None:
    """Canaries and /metrics get llama-server's key from --api-key, LLAMA_API_KEY or --api-key-file (not vLLM's variable)."""
    def key(**kw: object) -> str | None:
        return adapter_for(EngineConfig(name="l", kind="llama_cpp", model="/m.gguf", port=1, **kw)).api_key  # type: ignore[arg-type]

    assert key(args=("--api-key", "k1,k2")) == "k1"
    assert key(env={"LLAMA_API_KEY": "k3"}) == "k3"
    assert key(env={"VLLM_API_KEY": "not-mine"}) is None
    keys = tmp_path / "keys"
    keys.write_text("# comment\nk4\n")
    assert key(args=("--api-key-file", str(keys))) == "k4"
