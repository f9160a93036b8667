"""Engine adapters: one small class per engine kind.

Room: engine.

An adapter knows how to build the engine's command line from its config, its cheap liveness URL,
how to prove it generates (a tiny real generation through the engine's own API), where tokens/s
can be read, and how its log lines are diagnosed. It does no supervision itself.

| kind      | liveness          | proves generation                     | tokens/s from                     | /v1/messages |
|-----------|-------------------|---------------------------------------|-----------------------------------|--------------|
| mlx_lm    | GET /health       | streaming chat completion             | usage ÷ own timing                | no           |
| omlx      | GET /health       | streaming chat completion             | /api/status avg_generation_tps    | probed       |
| vllm      | GET /health       | POST /v1/completions (stream)         | vllm:generation_tokens_total      | probed       |
| llama_cpp | GET /health (503) | POST /v1/completions (stream)         | llamacpp:tokens_predicted_total   | probed       |
| ollama    | GET /api/version  | /api/generate stream                  | eval_count / eval_duration        | probed       |
| sglang    | GET /ready        | POST /v1/completions (stream)         | sglang:gen_throughput             | probed       |
| command   | GET /health       | streaming chat completion             | usage ÷ own timing                | config       |

"probed": whether the engine serves the Anthropic Messages API natively is asked of the running
engine once it is ready (:mod:`probes.routes`), because it depends on the engine's version; the
engine config's ``supports_messages`` overrides the probe. Facts about each engine cite the upstream
file they come from; the recorded surfaces they rest on are in ``tests/contract/fixtures/``.

``/health`` alone is never proof: mlx_lm.server answers 200 while loading and while its generation
loop is wedged (503 only once that thread has died), Ollama's /api/version whatever its runner does.

**Progress sources** (what the watchdog may take as the engine's own progress; see
``policies.health.assess_progress``). A counter that grows only when a request *finishes* says
nothing while a long answer is being generated, so it never yields a hung verdict on its own.

| kind      | counter (``progress_counter``)                            | lazy load | prefill progress           |
|-----------|-----------------------------------------------------------|-----------|----------------------------|
| mlx_lm    | none: live streams and canaries only                      | no        | log "Prompt processing progress: n/N" |
| omlx      | ``total_completion_tokens``: at completion only           | yes (non-pinned models) | —            |
| vllm      | ``vllm:generation_tokens_total``: per decode step, and a rise of ``vllm:kv_cache_usage_perc`` (set after every step; moves with each prefill chunk) | no | (the cache gauge, as a counter) |
| llama_cpp | ``llamacpp:n_decode_total``: per ``llama_decode`` call (progress only, never silence) | no | (``/slots``) |
| ollama    | none (``eval_count`` only in a request's last chunk)      | yes (``/api/ps``) | —                  |
| sglang    | ``sglang:realtime_tokens_total``, every mode: per decode iteration and prefill batch | no | — |
| command   | none                                                      | no        | —                          |
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import ClassVar

import httpx

from probes import canary as canary_probe
from probes import routes as routes_probe
from probes.readings import CanaryReading, Diagnosis, EngineCounters
from supervisord_llm.config import EngineConfig
from supervisord_llm.engine.process import python_executable


class EngineAdapter:
    kind: ClassVar[str] = "command"
    liveness_path: ClassVar[str] = "/health"
    supports_messages: ClassVar[bool] = False
    # Ask the running engine at ready time whether it serves /v1/messages (version-dependent).
    probe_messages: ClassVar[bool] = False
    counters_kind: ClassVar[str | None] = None  # which engine counters probe applies
    # "per_step": the engine has a step count (EngineCounters.steps_total: flat while requests run =
    # silence, advancing = progress, also for the start check); "completion": its only total grows
    # when a request finishes (no evidence either way); None: no counter.
    progress_counter: ClassVar[str | None] = None
    # Whether that step count flat with requests running is silence evidence (see policies.health).
    counter_silence: ClassVar[bool] = True
    # Whether the engine's token total grows with each decode step (vLLM, SGLang's decode mode), so its
    # growth is a decode rate (policies.health.decode_rate_sample); not one that grows when a request ends.
    decode_token_total: ClassVar[bool] = False
    # Whether the engine counts a prompt's computed tokens per prefill chunk as it runs (SGLang), so that
    # its own counters show every long prefill of any client (policies.health.prefill_beside); vLLM counts a
    # prompt only with its first token, and the gateway's record of its long prompts in prefill fills in.
    prompt_counted_per_chunk: ClassVar[bool] = False
    # How stale the engine's running-requests gauge may be: flat counters must outlast it too.
    running_gauge_stale_s: ClassVar[float] = 0.0
    # Loads models on demand (first request after start or after its own keep-alive/TTL unloaded it).
    lazy_loads_model: ClassVar[bool] = False
    # A log line the engine writes as its prefill advances (engine-side progress of a long prompt).
    prefill_progress_re: ClassVar[re.Pattern[str] | None] = None

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # What the ready-time probe found for this run; None = not asked or no telling answer.
        self.messages_found: bool | None = None

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

    def _env_value(self, name: str) -> str | None:
        """``name`` as the engine process sees it: the engine's own env first, then the daemon's."""
        return self.env().get(name) or os.environ.get(name) or None

    def _arg_value(self, flag: str) -> str | None:
        """The value of ``flag`` in the engine's extra args (``--flag v`` or ``--flag=v``)."""
        args = list(self.config.args)
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
        return None

    # ---- credentials -------------------------------------------------------------------

    @property
    def api_key(self) -> str | None:
        """The key the engine itself requires on its API, or None when it requires none."""
        return None

    def auth_headers(self) -> dict[str, str]:
        """Headers for the daemon's own requests to the engine (canaries, counters, probes)."""
        key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

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
        """Whether the gateway may pass /v1/messages through: config, else what the engine showed, else the kind's default."""
        if self.config.supports_messages is not None:
            return self.config.supports_messages
        if self.messages_found is not None:
            return self.messages_found
        return self.supports_messages

    async def discover(self, client: httpx.AsyncClient) -> dict[str, object]:
        """Facts read from the running engine once it has generated; returns those found, for the event log.

        Never raises for an engine that does not answer: an unknown fact keeps the kind's default.
        """
        self.messages_found = None
        if not self.probe_messages or self.config.supports_messages is not None:
            return {}
        found = await routes_probe.probe_route(client, self.base_url, routes_probe.MESSAGES_PATH,
                                               headers=self.auth_headers())
        self.messages_found = found
        return {} if found is None else {"messages_native": found}

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_chat_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s, headers=self.auth_headers(),
        )

    async def counters(self, client: httpx.AsyncClient, at_s: float) -> EngineCounters | None:
        if self.counters_kind is None:
            return None
        from probes import counters as counters_probe

        return await counters_probe.fetch_counters(client, self.base_url, self.counters_kind, at_s,
                                                   headers=self.auth_headers())

    async def model_resident(self, client: httpx.AsyncClient) -> bool | None:
        """Whether a lazy engine has the model in memory now; None when the engine cannot tell."""
        return None

    def diagnose(self, lines: Iterable[str]) -> Diagnosis | None:
        from probes import logdiag

        return logdiag.diagnose(lines)


class MlxLmAdapter(EngineAdapter):
    # mlx-lm 0.32 mlx_lm/server.py APIHandler.do_POST routes only /v1/completions,
    # /v1/chat/completions and /chat/completions (404 otherwise): no /v1/messages, so the gateway
    # translates. handle_health_check answers 503 only once its generation thread has died.
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
    """oMLX (github.com/jundot/omlx): a multi-model server over a folder of model folders.

    ``model`` in the engine config is one model's folder. oMLX gets its parent as the model
    directory and the folder's name is the request ``model`` (omlx/cli.py serve --model-dir help:
    "Models are discovered from subdirectories of --model-dir", model_id = subdirectory name).

    Host, port and model directory go in as ``OMLX_HOST``/``OMLX_PORT``/``OMLX_MODEL_DIR``
    (omlx/settings.py ``_apply_env_overrides``), never as flags: ``omlx serve`` with any of those
    flags saves them into the user's ``settings.json`` (omlx/cli.py ``_has_cli_overrides`` then
    ``settings.save()``), which would rewrite the settings of the user's own oMLX.
    """

    kind = "omlx"
    # omlx/server.py module docstring and routes: POST /v1/messages (Anthropic Messages API).
    supports_messages = True
    probe_messages = True
    counters_kind = "omlx"
    # oMLX /api/status total_completion_tokens is added when a request finishes; models that are not
    # pinned load on their first request and unload after their TTL (jundot/omlx, omlx/server).
    progress_counter = "completion"
    lazy_loads_model = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._settings_path: Path | None = None
        self._settings_key: tuple[tuple[int, int], str | None] | None = None

    def base_argv(self) -> list[str]:
        return ["omlx", "serve"]

    def _executable_len(self) -> int:
        return 2

    def _model_path(self) -> Path:
        # Not resolved: a symlinked model folder keeps the name it has in the user's model directory,
        # which is the name oMLX lists it under.
        return Path(os.path.abspath(os.path.expanduser(self.config.model or "")))

    def env(self) -> dict[str, str]:
        cfg = self.config
        return {"OMLX_HOST": cfg.host, "OMLX_PORT": str(cfg.port),
                "OMLX_MODEL_DIR": str(self._model_path().parent), **cfg.env}

    @property
    def request_model(self) -> str | None:
        return self.config.served_model or self._model_path().name

    def settings_file(self) -> Path:
        """oMLX's settings.json (omlx/settings.py resolve_default_base_path: ``OMLX_BASE_PATH``,
        else the macOS app's bootstrap file, else ``~/.omlx``)."""
        if self._settings_path is None:
            base = self._env_value("OMLX_BASE_PATH")
            if not base:
                bootstrap = Path.home() / "Library" / "Application Support" / "oMLX" / "base-path"
                try:
                    base = bootstrap.read_text(encoding="utf-8").strip() or None
                except OSError:
                    base = None
            self._settings_path = Path(os.path.expanduser(base or "~/.omlx")) / "settings.json"
        return self._settings_path

    @property
    def api_key(self) -> str | None:
        # omlx/settings.py: OMLX_API_KEY overrides settings.json auth.api_key; server.py
        # verify_api_key then wants it as a Bearer token (or x-api-key) on /v1 and /api/status.
        key = self._env_value("OMLX_API_KEY")
        if key:
            return key
        # The gateway asks for the key on every request: the file is read again only when it changed.
        path = self.settings_file()
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._settings_key is None or self._settings_key[0] != stamp:
            self._settings_key = (stamp, self._read_settings_key(path))
        return self._settings_key[1]

    @staticmethod
    def _read_settings_key(path: Path) -> str | None:
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        auth = settings.get("auth") if isinstance(settings, Mapping) else None
        value = auth.get("api_key") if isinstance(auth, Mapping) else None
        return value if isinstance(value, str) and value else None


class VllmAdapter(EngineAdapter):
    kind = "vllm"
    # vllm 0.33.0 vllm/entrypoints/anthropic/api_router.py: POST /v1/messages; older releases lack it.
    supports_messages = True
    probe_messages = True
    counters_kind = "vllm"
    # vllm/v1/metrics/loggers.py: vllm:generation_tokens is incremented from each engine step's
    # IterationStats.num_generation_tokens, i.e. per decode step; not during a prefill, where its KV
    # cache gauge (set from the stats every step returns) moves instead (probes/counters.py).
    progress_counter = "per_step"
    decode_token_total = True

    @property
    def api_key(self) -> str | None:
        # vllm 0.33.0 vllm/entrypoints/serve/middleware/register.py: --api-key wins over VLLM_API_KEY;
        # authenticate.py guards /v1, /v2, /inference, /cohere (not /health, not /metrics).
        return self._arg_value("--api-key") or self._env_value("VLLM_API_KEY")

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["vllm", "serve", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port)]

    def _executable_len(self) -> int:
        return 2

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_completion_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s, headers=self.auth_headers(),
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
      call (``server-context.cpp``, ``metrics_post_decode``) for any slot, multimodal encoding and
      speculative drafts excepted. It is the watchdog's step count, as progress only: with every
      slot busy with other clients, a canary waits (``requests_deferred``) and gets no token, while
      ``n_decode_total`` shows the engine working (seen on the real server,
      tests/integration/test_llama_cpp_busy.py).
    """

    kind = "llama_cpp"
    supports_messages = True
    # An older llama-server (before the Anthropic routes) answers 404: the ready-time probe finds out.
    probe_messages = True
    counters_kind = "llamacpp"
    # tools/server/server-context.cpp: tokens_predicted_total is added in metrics_on_prediction(),
    # called when a slot finishes its task, so the token total is completion-time; but
    # n_decode_total (metrics_post_decode, after every llama_decode call) is a step count.
    progress_counter = "per_step"
    # It is progress, never silence: the server answers /metrics while a decode runs (server-context.cpp,
    # queue_tasks.yield_to_queue "so we can still handle metrics tasks while decoding"), and one decode
    # of a prefill batch (n_batch tokens of a large model) or a multimodal encoding (not counted) can
    # outlast the stall time with a request running. Canaries and streams judge silence.
    counter_silence = False

    @property
    def api_key(self) -> str | None:
        # common/arg.cpp: --api-key (comma-separated keys), else the LLAMA_API_KEY env var; server-http.cpp
        # exempts only /health and /v1/health, so /metrics and the canary need it.
        keys = self._arg_value("--api-key") or self._env_value("LLAMA_API_KEY")
        if keys:
            return next((k.strip() for k in keys.split(",") if k.strip()), None)
        key_file = self._arg_value("--api-key-file")
        if key_file:
            try:
                lines = Path(key_file).expanduser().read_text(encoding="utf-8").splitlines()
            except OSError:
                return None
            return next((line for line in lines if line and not line.startswith("#")), None)
        return None

    def base_argv(self) -> list[str]:
        cfg = self.config
        return ["llama-server", "-m", cfg.model or "", "--host", cfg.host, "--port", str(cfg.port), "--metrics"]

    def _executable_len(self) -> int:
        return 1

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        return await canary_probe.run_openai_completion_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s, headers=self.auth_headers(),
        )


class OllamaAdapter(EngineAdapter):
    kind = "ollama"
    # ollama server/routes.go: GET /api/version answers while the server runs, whatever its runners do.
    liveness_path = "/api/version"
    # ollama server/routes.go: POST /v1/messages (middleware/anthropic.go), since v0.14.0 (commit
    # 2b2cda7a2); an older Ollama answers 404, which the ready-time probe turns into translation.
    supports_messages = True
    probe_messages = True
    # The model loads on the first request, before the first byte, and unloads after keep_alive
    # (default 5m); GET /api/ps lists the models in memory (ollama docs/api.md "List Running Models").
    lazy_loads_model = True

    # Wall-clock time (Unix seconds) at which Ollama will unload the model, from /api/ps expires_at.
    expires_at_wall: float | None = None

    async def model_resident(self, client: httpx.AsyncClient) -> bool | None:
        self.expires_at_wall = None
        try:
            response = await client.get(self.base_url + "/api/ps", timeout=2.0)
            models = response.json().get("models") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if not isinstance(models, list):
            return None
        wanted = self.request_model or ""
        for m in models:
            if isinstance(m, dict) and wanted in (m.get("name"), m.get("model"), f"{m.get('name')}".removesuffix(":latest")):
                self.expires_at_wall = _parse_rfc3339(m.get("expires_at"))
                return True
        return False

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        # A canary passes what is left of the model's keep-alive, so probing never keeps a model
        # resident that Ollama would otherwise unload (it resets the timer on every request).
        keep_alive_s = None
        if self.expires_at_wall is not None:
            keep_alive_s = int(max(1.0, self.expires_at_wall - time.time()))
        return await canary_probe.run_ollama_canary(
            client, self.base_url, model=self.request_model or "", max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s, headers=self.auth_headers(), keep_alive_s=keep_alive_s,
        )

    def base_argv(self) -> list[str]:
        return ["ollama", "serve"]

    def env(self) -> dict[str, str]:
        cfg = self.config
        return {"OLLAMA_HOST": f"{cfg.host}:{cfg.port}", **cfg.env}



class SglangAdapter(EngineAdapter):
    kind = "sglang"
    # sglang 0.5.23 srt/entrypoints/http_server.py: /health and /health_generate are one handler that
    # runs a generation (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION defaults to true) and passes on any
    # scheduler output after sleeping >= 1 s, so it is neither a cheap liveness check nor a canary.
    # /ready answers from state alone (503 while starting, paused or shutting down) and
    # srt/utils/auth.py lets /health*, /ready and /metrics through without the API key.
    liveness_path = "/ready"
    # http_server.py: POST /v1/messages and /v1/messages/count_tokens; older releases lack them.
    supports_messages = True
    probe_messages = True
    counters_kind = "sglang"
    # python/sglang/srt/metrics/collector.py: realtime_tokens_total{mode="decode"} is added every
    # scheduler iteration and its prefill modes every prefill batch (generation_tokens_total only when
    # a request finishes): the step count is all modes, the token rate the decode mode's;
    # num_running_reqs is refreshed only every 30 s while idle (decode_log_interval / idle logging).
    progress_counter = "per_step"
    decode_token_total = True
    running_gauge_stale_s = 30.0
    # its realtime_tokens_total{mode="prefill_compute"} grows with each prefill batch (log_prefill_stats)
    prompt_counted_per_chunk = True

    def base_argv(self) -> list[str]:
        cfg = self.config
        return [python_executable(), "-m", "sglang.launch_server", "--model-path", cfg.model or "",
                "--host", cfg.host, "--port", str(cfg.port), "--enable-metrics"]

    def _executable_len(self) -> int:
        return 3

    @property
    def api_key(self) -> str | None:
        # sglang srt/arg_groups/fields/serving.py: --api-key; auth.py wants it as a Bearer token.
        return self._arg_value("--api-key")

    async def canary(self, client: httpx.AsyncClient, *, stall_s: float, timeout_s: float) -> CanaryReading:
        # A tiny streamed completion through the OpenAI route: its tokens are this request's own.
        return await canary_probe.run_openai_completion_canary(
            client, self.base_url, model=self.request_model, max_tokens=self.config.canary_max_tokens,
            stall_s=stall_s, timeout_s=timeout_s, headers=self.auth_headers(),
        )


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


def _parse_rfc3339(value: object) -> float | None:
    """Unix seconds of an RFC 3339 time as Go writes it (nanoseconds, "Z" or an offset); None if not one."""
    from datetime import datetime

    if not isinstance(value, str):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


ADAPTERS: dict[str, type[EngineAdapter]] = {
    cls.kind: cls
    for cls in (MlxLmAdapter, OmlxAdapter, VllmAdapter, LlamaCppAdapter, OllamaAdapter, SglangAdapter, CommandAdapter)
}


def adapter_for(config: EngineConfig) -> EngineAdapter:
    return ADAPTERS[config.kind](config)
