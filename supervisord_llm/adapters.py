"""Engine adapters: one small class per engine kind.

An adapter knows how to build the engine's command line from its config, its cheap liveness URL,
how to prove it generates (a tiny real generation through the engine's own API), where tokens/s
can be read, and how its log lines are diagnosed. It does no supervision itself.

| kind      | liveness          | proves generation                     | tokens/s from                     |
|-----------|-------------------|---------------------------------------|-----------------------------------|
| mlx_lm    | GET /health       | streaming chat completion             | usage ÷ own timing                |
| omlx      | GET /health       | streaming chat completion             | /api/status avg_generation_tps    |
| vllm      | GET /health       | POST /v1/completions (stream)         | vllm:generation_tokens_total      |
| llama_cpp | GET /health (503 while loading) | POST /v1/completions (stream) | llamacpp:tokens_predicted_total |
| ollama    | GET /api/version  | /api/generate stream                  | eval_count / eval_duration        |
| sglang    | GET /health       | GET /health_generate                  | sglang:gen_throughput             |
| command   | GET /health       | streaming chat completion             | usage ÷ own timing                |

``/health`` alone is never proof: mlx_lm.server answers 200 while loading and after its
generation thread died.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import httpx

from probes import canary as canary_probe
from probes.readings import CanaryReading, Diagnosis, EngineCounters
from supervisord_llm.config import EngineConfig
from supervisord_llm.process import python_executable


class EngineAdapter:
    kind: ClassVar[str] = "command"
    liveness_path: ClassVar[str] = "/health"
    supports_messages: ClassVar[bool] = False
    counters_kind: ClassVar[str | None] = None  # which engine counters probe applies

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    # ---- command line ------------------------------------------------------------------

    def base_argv(self) -> list[str]:
        raise NotImplementedError

    def argv(self) -> list[str]:
        cfg = self.config
        if cfg.kind == "command":
            return [self._fill(a) for a in cfg.command]
        head = [self._fill(a) for a in cfg.command] if cfg.command else None
        argv = self.base_argv()
        if head:
            argv = head + argv[self._executable_len():]
        return argv + [self._fill(a) for a in cfg.args]

    def _executable_len(self) -> int:
        return 1

    def _fill(self, arg: str) -> str:
        cfg = self.config
        return (arg.replace("{port}", str(cfg.port)).replace("{host}", cfg.host)
                .replace("{model}", cfg.model or "").replace("{name}", cfg.name))

    def env(self) -> dict[str, str]:
        return {**gpu_visibility_env(self.config.gpu_devices), **self.config.env}

    # ---- HTTP surface ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def liveness_url(self) -> str:
        return self.base_url + self.liveness_path

    @staticmethod
    def liveness_detail(response: httpx.Response) -> str:
        """What a failed liveness answer says, for status: ``503 Loading model`` rather than a bare code."""
        message = ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            found = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
            message = str(found or body.get("message") or body.get("status") or "")
        elif response.text:
            message = response.text.strip().splitlines()[0] if response.text.strip() else ""
        return f"{response.status_code} {message[:120]}".strip()

    @property
    def request_model(self) -> str | None:
        """The value for the ``model`` field of requests to this engine."""
        return self.config.served_model or self.config.model

    @property
    def messages_supported(self) -> bool:
        if self.config.supports_messages is not None:
            return self.config.supports_messages
        return self.supports_messages

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_chat_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s,
        )

    async def counters(self, client: httpx.AsyncClient, at_s: float) -> EngineCounters | None:
        if self.counters_kind is None:
            return None
        from probes import counters as counters_probe

        return await counters_probe.fetch_counters(client, self.base_url, self.counters_kind, at_s)

    def diagnose(self, lines: Iterable[str]) -> Diagnosis | None:
        from probes import logdiag

        return logdiag.diagnose(lines)


class MlxLmAdapter(EngineAdapter):
    kind = "mlx_lm"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return [python_executable(), "-m", "mlx_lm.server", "--model", cfg.model or "",
                "--host", cfg.host, "--port", str(cfg.port)]

    def _executable_len(self) -> int:
        return 3  # python -m mlx_lm.server

    @property
    def request_model(self) -> str | None:
        # mlx_lm.server treats the "model" field as a path to load; "default_model" means the one it
        # was started with, so a client's "model": "<engine name>" must not reach it unchanged.
        return self.config.served_model or "default_model"


class OmlxAdapter(EngineAdapter):
    kind = "omlx"
    supports_messages = True
    counters_kind = "omlx"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["omlx", "serve", "--model-dir", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port)]

    def _executable_len(self) -> int:
        return 2


class VllmAdapter(EngineAdapter):
    kind = "vllm"
    counters_kind = "vllm"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["vllm", "serve", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port)]

    def _executable_len(self) -> int:
        return 2

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_completion_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s,
        )


class LlamaCppAdapter(EngineAdapter):
    """llama.cpp's ``llama-server`` (ggml-org/llama.cpp ``tools/server``).

    Facts from the llama.cpp tree that llama-cpp-python 0.3.36 vendors (``tools/build_engines.sh``
    builds that tree), each seen on the real server in ``tests/integration/test_llama_cpp.py``:

    - ``GET /health`` answers 503 ``{"error": {"message": "Loading model", "type":
      "unavailable_error", "code": 503}}`` until the model is loaded (``server-http.cpp``,
      ``middleware_server_state``); every other API path answers the same while loading.
    - ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` serve the Anthropic Messages API
      natively (``server.cpp``: ``post_anthropic_messages``, ``post_anthropic_count_tokens``).
    - ``GET /metrics`` needs ``--metrics`` and names its series ``llamacpp:*``
      (``server-task.cpp``, ``server_task_result_metrics::to_metrics``): the counters probe's kind
      is ``"llamacpp"``. ``llamacpp:tokens_predicted_total`` grows only when a slot finishes
      (``metrics_on_prediction``); ``llamacpp:n_decode_total`` grows with every ``llama_decode``
      call (``server-context.cpp``), i.e. per step.
    """

    kind = "llama_cpp"
    supports_messages = True
    counters_kind = "llamacpp"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["llama-server", "-m", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port), "--metrics"]

    def _executable_len(self) -> int:
        return 1

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_completion_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s,
        )


class OllamaAdapter(EngineAdapter):
    kind = "ollama"
    liveness_path = "/api/version"

    def base_argv(self) -> list[str]:
        return ["ollama", "serve"]

    def env(self) -> dict[str, str]:
        cfg = self.config
        return {"OLLAMA_HOST": f"{cfg.host}:{cfg.port}", **cfg.env}

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_ollama_canary(
            client, self.base_url, model=self.request_model or "", max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s,
        )


class SglangAdapter(EngineAdapter):
    kind = "sglang"
    counters_kind = "sglang"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return [python_executable(), "-m", "sglang.launch_server", "--model-path", cfg.model or "",
                "--host", cfg.host, "--port", str(cfg.port), "--enable-metrics"]

    def _executable_len(self) -> int:
        return 3

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_sglang_canary(client, self.base_url, stall_s=stall_s, timeout_s=timeout_s)


class CommandAdapter(EngineAdapter):
    kind = "command"

    def base_argv(self) -> list[str]:
        return [self._fill(a) for a in self.config.command]


def gpu_visibility_env(gpu_devices: tuple[int, ...]) -> dict[str, str]:
    """The environment that shows an engine only its ``gpu_devices`` (NVML indices).

    NVML numbers devices in PCI bus order; CUDA's default order is "fastest first", which can
    differ on a machine with mixed GPUs, so ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes
    ``CUDA_VISIBLE_DEVICES`` name the same devices NVML (and so admission and attribution) means.
    An engine's own ``env`` in the config wins over both.
    """
    if not gpu_devices:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in gpu_devices)}


ADAPTERS: dict[str, type[EngineAdapter]] = {
    cls.kind: cls
    for cls in (MlxLmAdapter, OmlxAdapter, VllmAdapter, LlamaCppAdapter, OllamaAdapter, SglangAdapter, CommandAdapter)
}


def adapter_for(config: EngineConfig) -> EngineAdapter:
    return ADAPTERS[config.kind](config)
