"""Typed, timestamped readings. Units are in the names; ``at_s`` is monotonic seconds."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SystemMemoryReading:
    """Whole-machine memory. On macOS from vm_stat + sysctl; on Linux from /proc/meminfo."""

    at_s: float
    platform: str  # "darwin" | "linux"
    total_bytes: int
    available_bytes: int  # macOS: free + speculative + inactive + purgeable; Linux: MemAvailable
    wired_bytes: int | None = None  # macOS only ("Pages wired down")
    compressed_bytes: int | None = None  # macOS: "Pages occupied by compressor"
    wired_limit_bytes: int | None = None  # macOS iogpu.wired_limit_mb (None = system default)


@dataclass(frozen=True, slots=True)
class ProcessTreeReading:
    """Resource use of one engine's whole process tree."""

    at_s: float
    root_pid: int
    pids: tuple[int, ...]
    rss_bytes: int
    cpu_percent: float | None = None
    stopped: bool = False  # some process of the tree is in state T (SIGSTOP)
    zombie: bool = False  # the root is a zombie
    phys_footprint_bytes: int | None = None  # macOS only: summed ri_phys_footprint (counts Metal buffers)


@dataclass(frozen=True, slots=True)
class EngineMemoryReading:
    """What one engine holds: its tree's RSS, its macOS physical footprint, its GPU memory."""

    at_s: float
    rss_bytes: int
    phys_footprint_bytes: int | None = None  # macOS; None elsewhere
    gpu_bytes: int | None = None  # NVML, summed over devices; None without NVML

    @property
    def host_bytes(self) -> int:
        """Host memory the engine holds: the physical footprint where there is one (RSS misses
        Metal allocations on Apple silicon), else the tree's RSS."""
        return self.phys_footprint_bytes if self.phys_footprint_bytes is not None else self.rss_bytes


@dataclass(frozen=True, slots=True)
class GpuProcessReading:
    pid: int
    used_bytes: int


@dataclass(frozen=True, slots=True)
class GpuDeviceReading:
    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    utilization_percent: int | None
    processes: tuple[GpuProcessReading, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuReading:
    at_s: float
    available: bool
    devices: tuple[GpuDeviceReading, ...] = ()
    reason: str | None = None  # why unavailable


@dataclass(frozen=True, slots=True)
class XidEvent:
    at_s: float
    device_index: int
    xid: int
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class CanaryReading:
    """One small real generation through the engine's own API."""

    at_s: float
    ok: bool
    ttft_s: float | None = None  # time to first token (any token, <think> included)
    duration_s: float | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None  # decode rate: tokens after the first / time after the first
    error: str | None = None
    stalled: bool = False  # no token arrived within the stall time
    # The time from the first to the last token-bearing chunk, where ``tokens_per_s`` was timed from them (None:
    # the engine reported its own rate, or it is taken over the whole request).
    decode_s: float | None = None


@dataclass(frozen=True, slots=True)
class ThroughputSample:
    """A token-rate observation from any source (canary, gateway stream, engine counters): the rate of one
    request's decode, taken while the engine ran ``concurrency`` requests (itself included)."""

    at_s: float
    tokens_per_s: float
    source: str  # "canary" | "gateway" | "metrics"
    tokens: int = 0
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """Cumulative counters read from an engine's own endpoint (/metrics, /api/status)."""

    at_s: float
    generated_tokens_total: float | None = None
    requests_running: float | None = None
    tokens_per_s: float | None = None  # where the engine reports a rate itself (oMLX, SGLang)
    # A count that grows as the engine runs its model, whoever the work serves: vLLM's generation
    # token total (per decode step; not during a prefill), SGLang's realtime tokens of every mode
    # (per decode iteration and per prefill batch), llama.cpp's ``n_decode_total`` (per llama_decode
    # call, none for multimodal encoding). None where the engine has none: a total
    # that grows only when a request finishes (llama.cpp's tokens_predicted_total, oMLX's
    # total_completion_tokens) is not one.
    steps_total: float | None = None
    # Requests the engine holds in its queue, not yet given a slot: vLLM num_requests_waiting,
    # SGLang num_queue_reqs, llama.cpp requests_deferred.
    requests_waiting: float | None = None
    # The share of the engine's KV cache in use (0..1, summed over data-parallel engines), where the
    # engine reports it after every step it runs: vLLM's kv_cache_usage_perc. A prefill chunk takes
    # cache blocks, so this moves through a long prefill while vLLM's step count cannot.
    cache_usage: float | None = None
    # Prompt tokens the engine computed (cumulative), and when: vLLM counts a request's whole prompt (less
    # its prefix-cache hits, where it reports prompt tokens by source) once, in the step that makes its
    # first token, so nothing moves while a long prompt is prefilled; SGLang counts each prefill batch,
    # so every chunk of a long prompt as it runs.
    prompt_tokens_total: float | None = None
    # Requests that got their first token (cumulative): the count of the engine's time-to-first-token
    # histogram, observed once per request as its first token comes out.
    first_tokens_total: float | None = None


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A known failure signature matched in an engine's output."""

    cause: str
    remedy: str
    line: str
    signature: str  # stable id, e.g. "vllm.kv_cache_too_small"
    details: dict[str, object] = field(default_factory=dict)
