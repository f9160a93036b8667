"""Log diagnosis: known failure lines in an engine's output turned into a named cause and a remedy.

Each :class:`Signature` matches the stable part of a line (formats drift between versions, so
never the whole line), has a stable id (``vllm.kv_cache_too_small``), a cause and a remedy, and
captures the numbers a remedy needs (the largest ``--max-model-len`` that fits, GiB free/wanted).

:func:`diagnose` picks the most specific match: the highest ``priority``, then the earliest line
(the first error is usually the root cause; later ones are consequences). Wrapper lines defer to
a real cause: vLLM's "Engine core initialization failed. See root cause above" and Metal's
"innocent victim" line have low priority, so a real cause anywhere in the lines wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from probes.readings import Diagnosis

__all__ = ["Signature", "SIGNATURES", "diagnose", "match_line"]

# Priorities: a specific fatal cause beats a generic one, which beats a consequence or wrapper.
SPECIFIC = 100
GENERIC = 60
WARNING = 30
CONSEQUENCE = 20
WRAPPER = 10

Details = dict[str, object]


@dataclass(frozen=True)
class Signature:
    """One known failure: patterns for its stable line parts, what it means and what to do.

    ``remedy`` may use ``{name}`` fields from the patterns' named groups (after ``convert``) and from
    ``derive``; when a field is missing (a line without the numbers matched) ``remedy_fallback`` is used.
    """

    id: str
    patterns: tuple[re.Pattern[str], ...]
    cause: str
    remedy: str
    priority: int = SPECIFIC
    remedy_fallback: str | None = None
    cause_fallback: str | None = None
    convert: Mapping[str, Callable[[str], object]] = field(default_factory=dict)
    derive: Callable[[Details], Details] | None = None

    def match(self, line: str) -> Details | None:
        for pattern in self.patterns:
            found = pattern.search(line)
            if found is not None:
                details: Details = {}
                for name, value in found.groupdict().items():
                    if value is not None:
                        details[name] = self.convert.get(name, _auto)(value)
                return details
        return None

    def render(self, details: Details) -> tuple[str, str]:
        extra = dict(details)
        if self.derive is not None:
            try:
                extra.update(self.derive(details))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                pass
        try:
            remedy = self.remedy.format(**extra)
        except (KeyError, IndexError, ValueError):
            remedy = self.remedy_fallback or self.remedy.split("{", 1)[0].rstrip(" :(,")
        try:
            cause = self.cause.format(**extra)
        except (KeyError, IndexError, ValueError):
            cause = self.cause_fallback or self.cause.split("{", 1)[0].rstrip(" :(,")
        return cause, remedy


def _auto(value: str) -> object:
    """Numbers become int or float; everything else stays text."""
    if re.fullmatch(r"\d+", value):
        return int(value)
    if re.fullmatch(r"\d+\.\d*|\.\d+", value):
        return float(value)
    return value


def _re(*patterns: str, flags: int = 0) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, flags) for p in patterns)


def _gpu_util_hint(d: Details) -> Details:
    free, total = float(d["free_gib"]), float(d["total_gib"])  # type: ignore[arg-type]
    hint: Details = {"max_utilization": f"{math.floor(free / total * 100) / 100:.2f}"}
    if "device" not in d:
        hint["device"] = "the GPU"  # older vLLM named no device
    return hint


_PACKAGES = {
    "mlx_lm": "mlx-lm",
    "mlx": "mlx",
    "vllm": "vllm",
    "sglang": "sglang",
    "torch": "torch",
    "transformers": "transformers",
    "omlx": "omlx",
}


def _package_hint(d: Details) -> Details:
    module = str(d.get("module", ""))
    top = module.split(".", 1)[0]
    return {"package": _PACKAGES.get(top, top)}


SIGNATURES: tuple[Signature, ...] = (
    # ------------------------------------------------------------------ any engine
    Signature(
        id="port_in_use",
        patterns=_re(
            r"\[Errno (?:98|48)\] Address already in use",
            r"address already in use",
            r"couldn't bind HTTP server socket",
            r"bind: address already in use",
        ),
        cause="another process listens on the engine port",
        remedy="find the process holding the port (llmctl doctor names pid and command); stop it or choose another port",
        priority=SPECIFIC,
    ),
    Signature(
        id="python.module_not_found",
        patterns=_re(
            r"ModuleNotFoundError: No module named '(?P<module>[\w.]+)'",
            r"No module named (?P<module>[\w.]+)\s*$",
        ),
        cause="the engine's Python package {module} is not installed in the interpreter that runs it",
        remedy="install {package} into that environment (e.g. `python -m pip install {package}`), or point the engine command at the interpreter that has it",
        derive=_package_hint,
    ),
    Signature(
        id="model.safetensors_missing",
        patterns=_re(r"No safetensors found in (?P<path>\S+)"),
        cause="the model directory {path} has no .safetensors weights (download incomplete or wrong directory)",
        remedy="download the model again or point --model at the directory that holds the *.safetensors files; `llmctl doctor` checks the shards",
    ),
    Signature(
        id="model.file_not_found",
        patterns=_re(
            r"(?:FileNotFoundError|OSError): \[Errno 2\] No such file or directory: '(?P<path>[^']+)'",
            r"No such file or directory: '(?P<path>[^']+\.(?:safetensors|gguf|json|bin))'",
            r"failed to open (?:GGUF )?file '?(?P<path>[^'\s]+\.gguf)'?",
        ),
        cause="a model file is missing: {path}",
        remedy="check the model path; if a shard is missing, re-download the model (`llmctl doctor` lists missing shards)",
        remedy_fallback="check the model path; re-download the model if a file is missing",
    ),
    Signature(
        id="model.invalid_repo_id",
        patterns=_re(r"HFValidationError: Repo id must be in the form .*?: '(?P<path>[^']+)'"),
        cause="the model path {path} does not exist, so it was taken for a Hugging Face repo id and rejected",
        remedy="give the path of an existing local model directory (absolute path), or a valid repo id such as 'mlx-community/Qwen3-4B-4bit'",
    ),
    Signature(
        id="model.repo_not_found",
        patterns=_re(r"RepositoryNotFoundError", r"Repository Not Found for url"),
        cause="the Hugging Face repository does not exist or needs authentication",
        remedy="check the repo id spelling; for gated or private models log in (`hf auth login`) or download the model first",
    ),
    Signature(
        id="model.missing_parameters",
        patterns=_re(r"Missing (?P<count>\d+) parameters?:"),
        cause="the weights lack {count} parameters the architecture needs (a missing safetensors shard or a mismatched model)",
        remedy="re-download the model (a shard listed in model.safetensors.index.json is missing or truncated); `llmctl doctor` checks the shards",
    ),
    # ------------------------------------------------------------------ CUDA (vLLM, SGLang, llama.cpp)
    Signature(
        id="cuda.no_device",
        patterns=_re(
            r"no CUDA-capable device is detected",
            r"No CUDA GPUs are available",
            r"Found no NVIDIA driver on your system",
            r"CUDA driver initialization failed",
            r"ggml_cuda_init: failed to initialize CUDA",
        ),
        cause="no usable NVIDIA GPU: no device, no driver, or the device is not visible to this process",
        remedy="check `nvidia-smi`, CUDA_VISIBLE_DEVICES and the container's GPU access; after an XID 79 the GPU needs a reboot",
    ),
    Signature(
        id="cuda.driver_too_old",
        patterns=_re(r"The NVIDIA driver on your system is too old", r"CUDA driver version is insufficient for CUDA runtime version"),
        cause="the NVIDIA driver is older than the CUDA version the engine was built for",
        remedy="update the NVIDIA driver, or install an engine build for the CUDA version the driver supports",
    ),
    Signature(
        id="cuda.illegal_memory_access",
        patterns=_re(r"CUDA error: an illegal memory access was encountered"),
        cause="a CUDA kernel accessed invalid memory (often a CUDA graph capture problem on some versions/GPUs)",
        remedy="""add --compilation-config '{{"cudagraph_mode": "PIECEWISE"}}' (or --enforce-eager) to the vLLM command; upgrade vLLM if it persists""",
    ),
    Signature(
        id="cuda.out_of_memory",
        patterns=_re(
            r"CUDA out of memory\. Tried to allocate (?P<tried_gib>[\d.]+) GiB",
            r"torch\.(?:cuda\.)?OutOfMemoryError",
            r"CUDA error: out of memory",
        ),
        cause="the GPU ran out of memory",
        remedy="lower --gpu-memory-utilization or --max-model-len / --max-num-seqs, or free GPU memory held by other processes",
        priority=GENERIC,
    ),
    # ------------------------------------------------------------------ vLLM
    Signature(
        id="vllm.gpu_memory_insufficient",
        # vllm 0.33.0 vllm/v1/worker/utils.py (request_memory): "Free memory on device {device} (…) on
        # startup is less than desired GPU memory utilization (…)" or "… less than the engine's budget
        # after excluding external process's weights (…)"; vLLM up to ~0.10 printed it without the
        # device (v1/worker/gpu_worker.py init_device: "Free memory on device (…) on startup is …").
        patterns=_re(
            r"Free memory on device (?:(?P<device>[^\s(]+) )?\((?P<free_gib>[\d.]+)/(?P<total_gib>[\d.]+) GiB\) on startup is "
            r"less than (?:desired GPU memory utilization|the engine's budget after excluding external process's weights) "
            r"\((?P<utilization>[\d.]+), (?P<desired_gib>[\d.]+) GiB\)"
        ),
        cause="only {free_gib} GiB of {total_gib} GiB is free on {device}, but {desired_gib} GiB was wanted: other processes hold GPU memory (often an orphaned VLLM::EngineCore)",
        cause_fallback="not enough GPU memory is free at startup for the wanted --gpu-memory-utilization: other processes hold GPU memory (often an orphaned VLLM::EngineCore)",
        remedy="list GPU processes and stop orphans of earlier engines; or lower --gpu-memory-utilization to at most {max_utilization}",
        derive=_gpu_util_hint,
    ),
    Signature(
        id="vllm.no_cache_memory",
        # vllm 0.33.0 vllm/v1/core/kv_cache_planning.py _check_enough_kv_cache_memory.
        patterns=_re(r"No available memory for the cache blocks"),
        cause="after the weights and activations nothing is left for the KV cache",
        remedy="raise --gpu-memory-utilization, or use a smaller or more quantized model, or spread it over more GPUs (--tensor-parallel-size)",
    ),
    Signature(
        id="vllm.kv_cache_too_small",
        patterns=_re(
            r"max seq len \((?P<max_model_len>\d+)\).*?\((?P<needed_gib>[\d.]+) GiB KV cache is needed.*?available KV cache memory "
            r"\((?P<available_gib>[\d.]+) GiB\)(?:.*?estimated maximum model length is (?P<estimated_max_model_len>\d+))?",
            r"estimated maximum model length is (?P<estimated_max_model_len>\d+)",
            r"max seq len \((?P<max_model_len>\d+)\) is larger than the maximum number of tokens that can be stored in KV "
            r"cache \((?P<estimated_max_model_len>\d+)\)",
        ),
        cause="the context length ({max_model_len} tokens) needs {needed_gib} GiB of KV cache but only {available_gib} GiB is available",
        cause_fallback="the context length is too large for the KV cache memory",
        remedy="restart with --max-model-len {estimated_max_model_len} (the largest that fits), or raise --gpu-memory-utilization",
        remedy_fallback="restart with a smaller --max-model-len, or raise --gpu-memory-utilization",
    ),
    Signature(
        id="vllm.unsupported_architecture",
        patterns=_re(r"Model architectures \[(?P<architectures>[^\]]*)\] are not supported"),
        convert={"architectures": lambda text: ", ".join(a.strip(" '\"") for a in text.split(","))},
        cause="this vLLM version does not support the model architecture {architectures}",
        remedy="upgrade vLLM (or use an engine that supports this architecture)",
    ),
    Signature(
        id="vllm.engine_core_init_failed",
        # vllm 0.33.0 vllm/v1/engine/utils.py: "Engine core initialization failed. See root cause above."
        # or, when a frontend process died first, "Frontend process failed during engine core initialization."
        patterns=_re(r"Engine core initialization failed", r"failed during engine core initialization"),
        cause="vLLM's engine core failed to start; the real cause is logged above this line",
        remedy="read the engine log above this line for the first error (the diagnosis names it when it is known)",
        priority=WRAPPER,
    ),
    # ------------------------------------------------------------------ MLX / Metal (mlx_lm, oMLX, llama.cpp on Mac)
    Signature(
        id="mlx_lm.generation_thread_died",
        # mlx-lm 0.32 mlx_lm/server.py ResponseGenerator._run_generate logs this and keeps serving
        # HTTP: /health turns 503 and every generation answers 404 "generation thread died".
        patterns=_re(r"mlx_lm\.server generation thread died: (?P<reason>.+?)\s*$"),
        cause="mlx_lm.server's generation thread died ({reason}); the process still answers HTTP but cannot generate",
        remedy="fix the cause named in the reason (a specific cause in the lines around it is named instead when known); the engine must be restarted",
        priority=GENERIC - 10,
    ),
    Signature(
        id="metal.out_of_memory",
        patterns=_re(r"kIOGPUCommandBufferCallbackErrorOutOfMemory", r"\[METAL\] Command buffer execution failed: Insufficient Memory"),
        cause="Metal ran out of GPU memory",
        remedy="back off at least 60 s before restarting; check for stranded wired memory first; use a smaller quantization or context",
    ),
    Signature(
        id="metal.gpu_hang",
        patterns=_re(r"kIOGPUCommandBufferCallbackErrorHang", r"Caused GPU Hang Error"),
        cause="the GPU hung (Metal command buffer hang)",
        remedy="expect stranded wired memory: measure it before restarting; if it stays, only a reboot frees it (reboot escalation)",
    ),
    Signature(
        id="metal.impacting_interactivity",
        patterns=_re(r"kIOGPUCommandBufferCallbackErrorImpactingInteractivity", r"Impacting Interactivity"),
        cause="a Metal command buffer ran too long and the macOS GPU watchdog stopped it (not an out-of-memory)",
        remedy="use smaller prefill steps / batches (e.g. a lower --prefill-step-size) or a smaller model; restart after the backoff",
    ),
    Signature(
        id="metal.submissions_ignored",
        patterns=_re(r"kIOGPUCommandBufferCallbackErrorSubmissionsIgnored", r"for causing prior/excessive GPU errors"),
        cause="macOS ignores this process's GPU work after repeated GPU errors; it cannot recover",
        remedy="restart the engine after the backoff; look for the first GPU error (hang or out of memory) above this line",
        priority=CONSEQUENCE + 5,
    ),
    Signature(
        id="metal.innocent_victim",
        patterns=_re(r"kIOGPUCommandBufferCallbackErrorInnocentVictim", r"victim of GPU error/recovery"),
        cause="this process's GPU work was discarded because of another GPU error (it was an innocent victim)",
        remedy="look for the GPU hang or out-of-memory that caused it (this engine or another GPU process); restart after the backoff",
        priority=CONSEQUENCE,
    ),
    Signature(
        id="mlx.near_wired_limit",
        patterns=_re(
            r"requires (?P<required_mb>\d+) MB which is close to the maximum recommended size of (?P<recommended_mb>\d+) MB"
        ),
        cause="the model ({required_mb} MB) is close to or above the GPU wired-memory limit ({recommended_mb} MB)",
        remedy="raise the limit above {required_mb} MB (`sudo sysctl iogpu.wired_limit_mb=N`) or use a smaller quantization",
        priority=WARNING,
    ),
    # ------------------------------------------------------------------ llama.cpp
    # Texts of the llama.cpp that llama-cpp-python 0.3.36 vendors: ggml/src/ggml-cuda/ggml-cuda.cu
    # (ggml_backend_cuda_buffer_type_alloc_buffer), ggml/src/ggml-alloc.c (alloc_tensor_range),
    # src/llama-model.cpp ("unable to allocate %s buffer", the weights), src/llama-kv-cache.cpp
    # ("failed to allocate buffer for kv cache"); the fixture lines were captured from the real
    # llama-server on an H200 (tests/fixtures/llama_cpp/cuda-oom.log).
    Signature(
        id="llamacpp.cuda_out_of_memory",
        patterns=_re(
            r"allocating (?P<mib>[\d.]+) MiB on device (?P<device>\d+): cudaMalloc failed: out of memory",
            r"failed to allocate CUDA(?P<device>\d+) buffer of size (?P<bytes>\d+)",
            r"unable to allocate (?:CUDA\d* )?(?:backend )?buffer",
            r"failed to allocate buffer for kv cache",
        ),
        cause="not enough GPU memory for the weights or compute buffers ({mib} MiB could not be allocated on device {device})",
        cause_fallback="not enough GPU memory for the weights or compute buffers",
        remedy="offload fewer layers (lower -ngl), use a smaller context (-c), or free GPU memory (the failed allocation was {mib} MiB on device {device})",
        remedy_fallback="offload fewer layers (lower -ngl), use a smaller context (-c), or free GPU memory",
    ),
    Signature(
        id="llamacpp.metal_command_buffer_failed",
        # ggml/src/ggml-metal/ggml-metal-context.m: ggml_metal_synchronize logs "error: command buffer N
        # failed with status S"; ggml_metal_graph_compute logs the same without "error:".
        patterns=_re(r"ggml_metal_(?:synchronize|graph_compute): (?:error: )?command buffer (?P<buffer>\d+) "
                     r"failed with status (?P<status>\d+)"),
        cause="a Metal command buffer failed (status {status}); usually out of memory or a GPU error",
        remedy="check the next lines for the Metal error; reduce the context or offloaded layers; restart after the backoff",
        priority=GENERIC,
    ),
    # ------------------------------------------------------------------ Ollama
    # Ollama's server log is Go slog text (logutil/logutil.go: time=… level=… source=file.go:N msg="…"
    # key="…"); these are the texts of ollama commit fb30760 (server/sched.go, llm/llama_server.go,
    # llm/server.go, x/mlxrunner/client.go). The "model requires more system memory (…) than is
    # available (…)" and "llama runner process has terminated" texts of older releases are kept.
    Signature(
        id="ollama.insufficient_system_memory",
        patterns=_re(
            r"model is too large for system memory",
            r"unable to load full model on GPU",
            r"model requires (?P<required>[\d.]+ ?[KMGT]?i?B) but only (?P<available>[\d.]+ ?[KMGT]?i?B) are available",
            r"model requires more (?:system )?memory \((?P<required_gib>[\d.]+) GiB\) than is available \((?P<available_gib>[\d.]+) GiB\)",
        ),
        cause="the model needs {required_gib} GiB but only {available_gib} GiB is available",
        cause_fallback="the model does not fit in the memory Ollama can use",
        remedy="free memory (stop other models: `ollama stop`) or use a smaller model or quantization",
    ),
    Signature(
        id="ollama.runner_out_of_memory",
        patterns=_re(r"llama-server reported out-of-memory during startup: (?P<reason>[^\"]+?)\"?\s*$"),
        cause="Ollama's llama-server ran out of memory while loading the model ({reason})",
        cause_fallback="Ollama's llama-server ran out of memory while loading the model",
        remedy="use fewer GPU layers (num_gpu), a smaller num_ctx or a smaller model; stop other models first (`ollama stop`)",
    ),
    Signature(
        id="ollama.runner_terminated",
        patterns=_re(
            r"(?:llama-server|llama runner) process has terminated: (?P<reason>[^\"]+?)\"?\s*$",
            r"(?:llama-server|llama runner) process has terminated",
            r"(?:llama-server|llama runner) process no longer running",
        ),
        cause="Ollama's model runner died ({reason})",
        cause_fallback="Ollama's model runner died",
        remedy="read the runner's reason; for out of memory use fewer GPU layers (num_gpu), a smaller num_ctx or a smaller model",
        priority=SPECIFIC - 10,
    ),
)


# A traceback shows the source line that raised (`raise FileNotFoundError(f"No safetensors found
# in {model_path}")`) before the message itself; such source lines are not output to diagnose.
_SOURCE_LINE = re.compile(r"(?:^|\s)raise\s+[\w.]+\(")


def _any_of(signatures: Iterable[Signature]) -> re.Pattern[str]:
    """One pattern that matches a line exactly when some signature's pattern does.

    An engine's log is mostly lines no signature knows (access logs, progress); one search in C
    rejects them, instead of one search per pattern. It runs on the daemon's loop when an engine
    exits, over the last few hundred lines, so its cost is on the crash-to-event path.
    """
    scoped = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s"}
    parts = []
    for signature in signatures:
        for pattern in signature.patterns:
            flags = "".join(letter for flag, letter in scoped.items() if pattern.flags & flag)
            body = re.sub(r"\(\?P<\w+>", "(?:", pattern.pattern)  # group names may repeat across patterns
            parts.append(f"(?{flags}:{body})" if flags else f"(?:{body})")
    return re.compile("|".join(parts))


_ANY_SIGNATURE = _any_of(SIGNATURES)


def match_line(line: str) -> list[tuple[Signature, Details]]:
    """All signatures that match one line, with their captured details (traceback source lines match nothing)."""
    if not _ANY_SIGNATURE.search(line) or _SOURCE_LINE.search(line):
        return []
    found = []
    for signature in SIGNATURES:
        details = signature.match(line)
        if details is not None:
            found.append((signature, details))
    return found


def diagnose(lines: Iterable[str]) -> Diagnosis | None:
    """The most specific known cause in ``lines`` (an engine's output), or None when nothing is known.

    Details captured on several lines of the winning signature are merged (the first value wins);
    ``line`` is the first line of that signature that carried details, else its first line.
    """
    hits: dict[str, list[tuple[str, Details]]] = {}
    first_seen: dict[str, int] = {}
    by_id: dict[str, Signature] = {}
    for number, raw in enumerate(lines):
        line = raw.rstrip("\r\n")
        for signature, details in match_line(line):
            hits.setdefault(signature.id, []).append((line, details))
            first_seen.setdefault(signature.id, number)
            by_id[signature.id] = signature
    if not hits:
        return None
    winner = max(hits, key=lambda sid: (by_id[sid].priority, -first_seen[sid]))
    merged: Details = {}
    line_text = hits[winner][0][0]
    for line, details in hits[winner]:
        if details and not merged:
            line_text = line
        for key, value in details.items():
            merged.setdefault(key, value)
    cause, remedy = by_id[winner].render(merged)
    return Diagnosis(cause=cause, remedy=remedy, line=line_text.strip(), signature=winner, details=merged)
