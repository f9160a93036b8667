"""Engine adapters: one small class per engine kind.

An adapter knows how to build the engine's command line from its config, its cheap liveness URL,
how to prove it generates (a tiny real generation through the engine's own API), where tokens/s
can be read, and how its log lines are diagnosed. It does no supervision itself.

| kind      | liveness          | proves generation                     | tokens/s from                     |
|-----------|-------------------|---------------------------------------|-----------------------------------|
| mlx_lm    | GET /health       | streaming chat completion             | usage ÷ own timing                |
| omlx      | GET /health       | streaming chat completion             | /api/status avg_generation_tps    |
| vllm      | GET /health       | POST /v1/completions (stream)         | vllm:generation_tokens_total      |
| llama_cpp | GET /health       | POST /v1/completions (stream)         | llamacpp:tokens_predicted_total   |
| ollama    | GET /api/version  | /api/generate stream                  | eval_count / eval_duration        |
| sglang    | GET /health       | GET /health_generate                  | sglang:gen_throughput             |
| command   | GET /health       | streaming chat completion             | usage ÷ own timing                |

``/health`` alone is never proof: mlx_lm.server answers 200 while loading and after its
generation thread died.

**Progress sources** (what the watchdog may take as the engine's own progress; see
``policies.health.assess_progress``). A counter that grows only when a request *finishes* says
nothing while a long answer is being generated, so it never yields a hung verdict on its own.

| kind      | counter (``progress_counter``)                            | lazy load | prefill progress           |
|-----------|-----------------------------------------------------------|-----------|----------------------------|
| mlx_lm    | none: live streams and canaries only                      | no        | log "Prompt processing progress: n/N" |
| omlx      | ``total_completion_tokens``: at completion only           | yes (non-pinned models) | —            |
| vllm      | ``vllm:generation_tokens_total``: per decode step         | no        | —                          |
| llama_cpp | ``llamacpp:tokens_predicted_total``: at completion only   | no        | (``/slots``)               |
| ollama    | none (``eval_count`` only in a request's last chunk)      | yes (``/api/ps``) | —                  |
| sglang    | ``sglang:realtime_tokens_total{mode="decode"}``: per step | no        | —                          |
| command   | none                                                      | no        | —                          |
"""

from __future__ import annotations

import re
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
    # "per_step": the token total advances every decode step (flat while requests run = silence);
    # "completion": it grows only when a request finishes (never silence evidence); None: no counter.
    progress_counter: ClassVar[str | None] = None
    # How stale the engine's running-requests gauge may be: flat counters must outlast it too.
    running_gauge_stale_s: ClassVar[float] = 0.0
    # Loads models on demand (first request after start or after its own keep-alive/TTL unloaded it).
    lazy_loads_model: ClassVar[bool] = False
    # A log line the engine writes as its prefill advances (engine-side progress of a long prompt).
    prefill_progress_re: ClassVar[re.Pattern[str] | None] = None

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
        return dict(self.config.env)

    # ---- HTTP surface ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def liveness_url(self) -> str:
        return self.base_url + self.liveness_path

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

    async def model_resident(self, client: httpx.AsyncClient) -> bool | None:
        """Whether a lazy engine has the model in memory now; None when the engine cannot tell."""
        return None

    def diagnose(self, lines: Iterable[str]) -> Diagnosis | None:
        from probes import logdiag

        return logdiag.diagnose(lines)


class MlxLmAdapter(EngineAdapter):
    kind = "mlx_lm"
    # mlx_lm/server.py (0.32) handle_completion: keepalive_callback logs
    # "Prompt processing progress: {processed}/{total}" as prefill advances (and sends the same as an
    # SSE comment, which is not a token). It has no counters endpoint.
    prefill_progress_re = re.compile(r"Prompt processing progress: (\d+)/(\d+)")

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
    # oMLX /api/status total_completion_tokens is added when a request finishes; models that are not
    # pinned load on their first request and unload after their TTL (jundot/omlx, omlx/server).
    progress_counter = "completion"
    lazy_loads_model = True

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["omlx", "serve", "--model-dir", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port)]

    def _executable_len(self) -> int:
        return 2


class VllmAdapter(EngineAdapter):
    kind = "vllm"
    counters_kind = "vllm"
    # vllm/v1/metrics/loggers.py: vllm:generation_tokens is incremented from each engine step's
    # IterationStats.num_generation_tokens, i.e. per decode step.
    progress_counter = "per_step"

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


class LlamaCppAdapter(VllmAdapter):
    kind = "llama_cpp"
    counters_kind = "llama_cpp"
    # tools/server/server.cpp: n_tokens_predicted_total is added in metrics.on_prediction(), called
    # when a slot finishes its task, so the total is completion-time; live streams and canaries rule.
    progress_counter = "completion"

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["llama-server", "-m", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port), "--metrics"]

    def _executable_len(self) -> int:
        return 1


class OllamaAdapter(EngineAdapter):
    kind = "ollama"
    liveness_path = "/api/version"
    # The model loads on the first request, before the first byte, and unloads after keep_alive
    # (default 5m); GET /api/ps lists the models in memory (ollama docs/api.md "List Running Models").
    lazy_loads_model = True

    async def model_resident(self, client: httpx.AsyncClient) -> bool | None:
        try:
            response = await client.get(self.base_url + "/api/ps", timeout=2.0)
            models = response.json().get("models") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if not isinstance(models, list):
            return None
        wanted = self.request_model or ""
        names = {m.get(k) for m in models if isinstance(m, dict) for k in ("name", "model")}
        return wanted in names or (":" not in wanted and f"{wanted}:latest" in names)

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
    # python/sglang/srt/metrics/collector.py: realtime_tokens_total{mode="decode"} is added every
    # scheduler iteration (generation_tokens_total only when a request finishes), and
    # num_running_reqs is refreshed only every 30 s while idle (decode_log_interval / idle logging).
    progress_counter = "per_step"
    running_gauge_stale_s = 30.0

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


ADAPTERS: dict[str, type[EngineAdapter]] = {
    cls.kind: cls
    for cls in (MlxLmAdapter, OmlxAdapter, VllmAdapter, LlamaCppAdapter, OllamaAdapter, SglangAdapter, CommandAdapter)
}


def adapter_for(config: EngineConfig) -> EngineAdapter:
    return ADAPTERS[config.kind](config)
