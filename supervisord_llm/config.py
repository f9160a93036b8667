"""The config: TOML, validated into frozen objects.

Room: config.

Resolution: ``--config PATH``, else ``$SUPERVISORD_LLM_CONFIG``, else ``<platform config dir>/config.toml``.
State dir: ``[daemon] state_dir``, else ``$SUPERVISORD_LLM_STATE_DIR``, else the platform state dir.

Every error names the file, the key and what would be valid; a daemon never starts on a bad config.
Every section is read with the one table reader (``configtable.Table``); the sections owned by
other modules (``[gateway]`` in ``gateway.settings``, ``[alerts]`` in ``alerts.delivery``) are read
there, called from here, so one ``load_config`` call checks the whole file. Where a policy has a
settings object (backoff, health, memory guard, swap, stranded, reboot), the config builds that
object itself: there is no second class to copy it from.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from policies import reboot as reboot_policy
from policies import stranded as stranded_policy
from policies.backoff import BackoffSettings
from policies.frontdoor import (
    SwapPermission,
    host_check_applies,
    hosts_admitting_any_site,
    key_needed_to_use,
    origins_admitting_any_site,
)
from policies.health import HealthSettings
from policies.memory_guard import GuardSettings
from policies.swap import SwapSettings
from supervisord_llm.alerts.delivery import AlertSettings
from supervisord_llm.configtable import Table
from supervisord_llm.convert import DURATION_HELP, SIZE_HELP, format_bytes
from supervisord_llm.errors import ConfigError
from supervisord_llm.gateway.settings import GatewaySettings, is_loopback, parse_listen, read_gateway

ENGINE_KINDS = ("mlx_lm", "omlx", "vllm", "llama_cpp", "ollama", "sglang", "command")
APP_NAME = "supervisord-llm"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOSTNAME_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_host(text: str) -> bool:
    """An IP address (v4 or v6) or a host name (RFC 1123 labels)."""
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    return 0 < len(text) <= 253 and all(_HOSTNAME_LABEL_RE.match(label) for label in text.rstrip(".").split("."))


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP_NAME))


@dataclass(frozen=True)
class EngineConfig:
    name: str
    kind: str
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()  # kind=command: the argv; other kinds: override the executable part
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    footprint_bytes: int | None = None  # None = auto (weights on disk × footprint_factor)
    exclusive: bool = False
    default: bool = False
    aliases: tuple[str, ...] = ()
    served_model: str | None = None  # the model id the engine expects in requests
    model_as_written: str | None = None  # ``model`` as the config writes it (a relative path): a name clients use too
    start_timeout_s: float = 900.0
    stop_grace_s: float = 60.0
    autostart: bool = True
    canary_interval_s: float = 60.0
    canary_timeout_s: float = 30.0
    stall_s: float = 15.0
    # Lazy engines (Ollama, oMLX): how long a model load may keep the first token waiting.
    load_timeout_s: float = 600.0
    canary_max_tokens: int = 16
    gpu_devices: tuple[int, ...] = ()
    supports_messages: bool | None = None  # None = the adapter's default
    # GPU memory the engine holds on each of its gpu_devices (weights, KV cache, CUDA context);
    # None = footprint split evenly over them. With it set, footprint is host RAM only.
    gpu_footprint_bytes: int | None = None
    # Every exit the daemon did not ask for opens a warning alert episode (raised to critical in a
    # crash loop); false leaves only the crash-loop alert.
    alert_on_exit: bool = True
    # Memory guard watermarks on what the engine's process tree holds; None = footprint x the factors.
    memory_soft_bytes: int | None = None
    memory_hard_bytes: int | None = None
    # The gateway's line in front of the engine: this many requests at once, then a FIFO of
    # max_queue waiting, then 429 with Retry-After (0 = no limit).
    max_concurrent: int = 64
    max_queue: int = 256
    # Stop the engine gracefully after this long without a real request (canaries do not count);
    # the next request starts it again. None = never.
    idle_unload_s: float | None = None
    # The model takes images: /v1/messages image blocks are translated for it (OpenAI image_url
    # parts) instead of refused. Only read where the gateway translates the Messages API.
    vision: bool = False

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else host
        if ":" in host and not host.startswith("["):  # an IPv6 address ("::1"): bracketed in a URL (RFC 3986)
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class RestartSettings:
    """``[policies.restart]``: the backoff policy's own settings object, plus when a hang is restarted."""

    backoff: BackoffSettings = BackoffSettings(max_s=900.0)
    hang_restart_after_s: float = 30.0

    # The config's names for the backoff settings (read-only views of the one settings object).
    @property
    def min_interval_s(self) -> float:
        return self.backoff.min_interval_s

    @property
    def initial_backoff_s(self) -> float:
        return self.backoff.initial_s

    @property
    def factor(self) -> float:
        return self.backoff.factor

    @property
    def max_backoff_s(self) -> float:
        return self.backoff.max_s

    @property
    def reset_after_ready_s(self) -> float:
        return self.backoff.reset_after_ready_s

    @property
    def max_failures(self) -> int:
        return self.backoff.max_failures

    @property
    def failure_window_s(self) -> float:
        return self.backoff.failure_window_s


def _swap_settings(return_wait_s: float) -> SwapSettings:
    return SwapSettings(memory_wait_s=return_wait_s, poll_interval_s=min(1.0, return_wait_s))


@dataclass(frozen=True)
class MemorySettings:
    """``[policies.memory]``; ``swap`` is the swap policy's own settings object (``return_wait``)."""

    headroom_bytes: int = 4 * 10**9
    budget_bytes: int | None = None  # None = total memory minus headroom
    auto_factor: float = 1.2
    admission_wait_s: float = 300.0
    swap: SwapSettings = _swap_settings(300.0)
    swap_drain_s: float = 30.0  # a swap waits this long for in-flight requests on engines it stops

    @property
    def return_wait_s(self) -> float:
        """How long a stop waits for the engine's memory to come back (``return_wait``)."""
        return self.swap.memory_wait_s


@dataclass(frozen=True)
class MemoryGuardConfig:
    """``[policies.memory_guard]``: on or off, and the guard policy's own settings object."""

    enabled: bool = True
    guard: GuardSettings = GuardSettings()

    # The config's names for the guard's settings (read-only views of the one settings object).
    @property
    def soft_factor(self) -> float:
        return self.guard.soft_factor

    @property
    def hard_factor(self) -> float:
        return self.guard.hard_factor

    @property
    def drain_grace_s(self) -> float:
        return self.guard.drain_grace_s


# ``[policies.stranded]`` and ``[policies.reboot]`` are the policies' own settings objects.
StrandedSettings = stranded_policy.StrandedSettings
DEFAULT_REBOOT_ARGV = ("sudo", "-n", "shutdown", "-r", "now")
RebootConfig = reboot_policy.RebootSettings


@dataclass(frozen=True)
class ProbeSettings:
    interval_s: float = 5.0
    process_interval_s: float = 1.0
    vm_stat: str = "vm_stat"
    sysctl: str = "sysctl"
    nvml: bool = True
    platform: str = "auto"  # which memory probe: "auto" (this OS), "darwin" (vm_stat) or "linux"


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    control_socket: Path
    log_level: str = "info"
    log_max_bytes: int = 20 * 10**6
    metrics_listen: str | None = None
    stop_engines_on_exit: bool = True  # SIGTERM to the daemon stops engines gracefully; a crash leaves them


@dataclass(frozen=True)
class Config:
    file: str
    daemon: DaemonConfig
    engines: tuple[EngineConfig, ...]
    restart: RestartSettings = RestartSettings()
    memory: MemorySettings = MemorySettings()
    stranded: stranded_policy.StrandedSettings = stranded_policy.StrandedSettings()
    reboot: reboot_policy.RebootSettings = reboot_policy.RebootSettings(argv=DEFAULT_REBOOT_ARGV)
    degraded: HealthSettings = HealthSettings()  # [policies.degraded]: the health policy's own settings
    probes: ProbeSettings = ProbeSettings()
    memory_guard: MemoryGuardConfig = MemoryGuardConfig()
    gateway: GatewaySettings | None = None  # None when off
    alerts: AlertSettings | None = None

    def engine(self, name: str) -> EngineConfig:
        for engine in self.engines:
            if engine.name == name:
                return engine
        from supervisord_llm.errors import UnknownEngine

        raise UnknownEngine(name, [e.name for e in self.engines])

    @property
    def default_engine(self) -> EngineConfig | None:
        for engine in self.engines:
            if engine.default:
                return engine
        return self.engines[0] if self.engines else None


_ENGINE_KEYS = frozenset({
    "name", "kind", "model", "host", "port", "args", "command", "env", "cwd", "footprint", "exclusive",
    "default", "aliases", "served_model", "start_timeout", "stop_grace", "autostart", "canary_interval",
    "canary_timeout", "stall", "load_timeout", "canary_max_tokens", "gpu_devices", "supports_messages", "gpu_footprint",
    "alert_on_exit",
    "memory_soft", "memory_hard",
    "max_concurrent", "max_queue", "idle_unload", "preload",
    "vision",
})


# `omlx serve` saves any of these flags into the user's settings.json (omlx/cli.py
# _has_cli_overrides then settings.save(), jundot/omlx commit 01496518); the daemon passes host, port
# and model folder as OMLX_* environment variables instead, which oMLX reads without saving.
_OMLX_SAVING_FLAGS = ("--model-dir", "--port", "--host", "--max-model-memory", "--max-process-memory", "--log-level",
                      "--mcp-config", "--hf-endpoint", "--ms-endpoint", "--http-proxy", "--https-proxy", "--no-proxy",
                      "--ca-bundle")


def _check_omlx_args(t: Table) -> None:
    for arg in t.str_list("args"):
        flag = arg.split("=", 1)[0]
        if flag in _OMLX_SAVING_FLAGS:
            raise t.error("args", f"{flag} makes `omlx serve` rewrite the user's settings.json; use the engine's "
                                  "model/host/port keys, or env OMLX_* variables (e.g. OMLX_MAX_CONCURRENT_REQUESTS), "
                                  f"instead of any of {', '.join(_OMLX_SAVING_FLAGS)}")


def _config_dir(t: Table) -> Path:
    """Where a relative path in the config is read from: the config file's directory (the daemon's working
    directory is launchd's or systemd's, llmctl's any shell's)."""
    return Path(t.file).parent if t.file and Path(t.file).is_absolute() else Path.cwd()


def _near_config(t: Table, model: str | None) -> str | None:
    """A relative ``model`` that names a file or directory beside the config is that one; one that does not is
    kept as written: a model id (``mlx-community/Qwen3-8B-4bit``, an Ollama name) the engine resolves."""
    if not model:
        return model
    path = Path(os.path.expanduser(model))
    if path.is_absolute():
        return str(path) if model.startswith("~") else model
    near = _config_dir(t) / path
    return str(near) if near.exists() else model


def _engine_host(t: Table) -> str:
    host = t.str("host", "127.0.0.1") or "127.0.0.1"
    if not _is_host(host):
        raise t.error("host", f"{host!r} is not an address or host name; the address the engine listens on, such "
                              "as 127.0.0.1 (the default), ::1, 0.0.0.0 or localhost")
    return host


def _parse_engine(t: Table) -> EngineConfig:
    t.check_unknown(_ENGINE_KEYS)
    name = t.str("name", required=True)
    assert name is not None
    if not _NAME_RE.match(name):
        raise t.error("name", f"{name!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'")
    kind = t.str("kind", required=True, choices=ENGINE_KINDS)
    assert kind is not None
    command = t.str_list("command")
    model_as_written = t.str("model")
    model = _near_config(t, model_as_written)
    if kind == "command":
        if not command:
            raise t.error("command", 'is required for kind "command": the argv, e.g. ["my-server", "--port", "{port}"]')
    elif not model:
        raise t.error("model", f'is required for kind {kind!r}: a model directory or id')
    port = t.int("port", 8080, min_value=1, max_value=65535)
    if kind == "omlx":
        _check_omlx_args(t)
    gpu_devices = t._get("gpu_devices", [], False)
    if not isinstance(gpu_devices, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in gpu_devices):
        raise t.error("gpu_devices", f"expected a list of GPU indices such as [0, 1], got {gpu_devices!r}")
    if len(set(gpu_devices)) != len(gpu_devices):
        raise t.error("gpu_devices", f"names a GPU more than once: {gpu_devices!r}; list each index once, e.g. [0, 1]")
    supports_messages = t._get("supports_messages", None, False)
    if supports_messages is not None and not isinstance(supports_messages, bool):
        raise t.error("supports_messages", f"expected true or false, got {supports_messages!r}")
    cwd = t.str("cwd")
    gpu_footprint_bytes = t.size_bytes("gpu_footprint", None)
    if gpu_footprint_bytes is not None and not gpu_devices:
        raise t.error("gpu_footprint", "is per GPU device and needs gpu_devices, the GPU indices it applies to, "
                                       "e.g. gpu_devices = [0]")
    memory_soft_bytes = t.size_bytes("memory_soft", "auto", allow_auto=True)
    memory_hard_bytes = t.size_bytes("memory_hard", "auto", allow_auto=True)
    if memory_soft_bytes is not None and memory_hard_bytes is not None and memory_soft_bytes >= memory_hard_bytes:
        raise t.error("memory_soft", f"must be below memory_hard ({memory_hard_bytes} bytes), got {memory_soft_bytes} "
                                     'bytes; e.g. memory_soft = "110GB", memory_hard = "130GB"')

    footprint_bytes = t.size_bytes("footprint", "auto", allow_auto=True, positive=True)
    if memory_hard_bytes is not None and footprint_bytes is not None and memory_hard_bytes <= footprint_bytes:
        # At its normal size the engine would be over its hard watermark: drained and restarted, again and again.
        raise t.error("memory_hard", f"must be above the engine's footprint ({format_bytes(footprint_bytes)}), got "
                                     f"{format_bytes(memory_hard_bytes)}: at its normal size the engine would be "
                                     f"drained and restarted; e.g. memory_hard = \"{_example_size(footprint_bytes * 1.3)}\" "
                                     "(or leave it out: footprint × policies.memory_guard.hard_factor)")
    # preload is the explicit name of autostart: start the engine when the daemon starts.
    preload = t.bool("preload", True) if "preload" in t.data else t.bool("autostart", True)
    if "preload" in t.data and "autostart" in t.data and t.bool("autostart", True) != preload:
        raise t.error("preload", "and autostart say different things (preload is autostart's name); set only preload")
    idle_unload_s = None
    idle = t.data.get("idle_unload")
    if idle is not None and idle is not False and idle != "off":
        wanted = f'expected a duration of at least 10s such as "30m" (or seconds, 1800), or "off" (the default: never ' \
                 f'unloaded), got {idle!r}'
        if isinstance(idle, bool) or not isinstance(idle, str | int | float) or (
                isinstance(idle, float) and not math.isfinite(idle)):
            raise t.error("idle_unload", wanted)
        try:
            idle_unload_s = t.duration_s("idle_unload", "0s", min_s=10,
                                         why="an unload and reload costs the model's load time")
        except ConfigError as exc:
            raise t.error("idle_unload", wanted) from exc
    return EngineConfig(
        name=name,
        kind=kind,
        model=model,
        host=_engine_host(t),
        port=port or 8080,
        args=t.str_list("args"),
        command=command,
        env=t.str_map("env"),
        cwd=str(_config_dir(t) / os.path.expanduser(cwd)) if cwd else None,
        footprint_bytes=footprint_bytes,
        exclusive=t.bool("exclusive", False),
        default=t.bool("default", False),
        aliases=t.str_list("aliases"),
        served_model=t.str("served_model"),
        model_as_written=model_as_written if model_as_written != model else None,
        start_timeout_s=t.duration_s("start_timeout", "15m", min_s=1),
        stop_grace_s=t.duration_s("stop_grace", "60s"),
        autostart=preload,
        canary_interval_s=t.duration_s("canary_interval", "60s", min_s=1),
        canary_timeout_s=t.duration_s("canary_timeout", "30s", min_s=0.5),
        stall_s=t.duration_s("stall", "15s", min_s=0.5),
        load_timeout_s=t.duration_s("load_timeout", "10m", min_s=1),
        canary_max_tokens=t.int("canary_max_tokens", 16, min_value=1, max_value=4096) or 16,
        gpu_devices=tuple(gpu_devices),
        supports_messages=supports_messages,
        gpu_footprint_bytes=gpu_footprint_bytes,
        alert_on_exit=t.bool("alert_on_exit", True),
        memory_soft_bytes=memory_soft_bytes,
        memory_hard_bytes=memory_hard_bytes,
        max_concurrent=t.int("max_concurrent", 64, min_value=0) or 0,
        max_queue=t.int("max_queue", 256, min_value=0) or 0,
        idle_unload_s=idle_unload_s,
        vision=t.bool("vision", False),
    )


def _parse_memory_guard(t: Table) -> MemoryGuardConfig:
    t.check_unknown({"enabled", "soft_factor", "hard_factor", "drain_grace"})
    soft = t.float("soft_factor", 1.1, min_value=1.0, max_value=4.0)
    hard = t.float("hard_factor", 1.3, min_value=1.0, max_value=4.0)
    if soft >= hard:
        raise t.error("soft_factor", f"must be below hard_factor ({hard:g}), got {soft:g}; e.g. soft_factor = 1.1, "
                                     "hard_factor = 1.3")
    guard = t.construct(GuardSettings, {"soft_factor": "soft_factor", "hard_factor": "hard_factor",
                                        "drain_grace_s": "drain_grace"},
                        soft_factor=soft, hard_factor=hard, drain_grace_s=t.duration_s("drain_grace", "30s"))
    return MemoryGuardConfig(enabled=t.bool("enabled", True), guard=guard)


# The config's key for each field of the backoff policy's settings object (for the errors it raises).
_BACKOFF_KEYS = {"min_interval_s": "min_interval", "initial_s": "initial_backoff", "factor": "factor",
                 "max_s": "max_backoff", "reset_after_ready_s": "reset_after", "max_failures": "max_failures",
                 "failure_window_s": "failure_window"}


def _parse_policies(t: Table) -> tuple[RestartSettings, MemorySettings, StrandedSettings, RebootConfig,
                                        HealthSettings]:
    t.check_unknown({"restart", "memory", "stranded", "reboot", "degraded", "memory_guard"})
    r = t.sub("restart")
    r.check_unknown({"min_interval", "initial_backoff", "factor", "max_backoff", "reset_after", "max_failures",
                     "failure_window", "hang_restart_after"})
    why_60 = ("two automatic spawns closer than 60s turn a Metal OOM into a crash loop; "
              "launchd needs ThrottleInterval >= 60 for the same reason")
    min_interval = r.duration_s("min_interval", "60s", min_s=60, why=why_60)
    initial_backoff_s = r.duration_s("initial_backoff", "60s", min_s=60, why=why_60)
    max_backoff_s = r.duration_s("max_backoff", "15m", min_s=60, why=why_60)
    if max_backoff_s < initial_backoff_s:
        raise r.error("max_backoff", f"must be at least initial_backoff ({initial_backoff_s:g}s), got {max_backoff_s:g}s")
    restart = RestartSettings(
        backoff=r.construct(
            BackoffSettings, _BACKOFF_KEYS,
            min_interval_s=min_interval,
            initial_s=initial_backoff_s,
            factor=r.float("factor", 2.0, min_value=1.0, max_value=10.0),
            max_s=max_backoff_s,
            reset_after_ready_s=r.duration_s("reset_after", "10m", min_s=1),
            max_failures=r.int("max_failures", 5, min_value=1) or 5,
            failure_window_s=r.duration_s("failure_window", "30m", min_s=60),
        ),
        hang_restart_after_s=r.duration_s("hang_restart_after", "30s"),
    )
    m = t.sub("memory")
    m.check_unknown({"headroom", "budget", "auto_factor", "admission_wait", "return_wait", "swap_drain"})
    memory = MemorySettings(
        headroom_bytes=m.size_bytes("headroom", "4GB") or 0,
        budget_bytes=m.size_bytes("budget", "auto", allow_auto=True, positive=True),
        auto_factor=m.float("auto_factor", 1.2, min_value=1.0, max_value=4.0),
        admission_wait_s=m.duration_s("admission_wait", "5m"),
        swap=m.construct(_swap_settings, {"memory_wait_s": "return_wait", "poll_interval_s": "return_wait"},
                         return_wait_s=m.duration_s("return_wait", "5m", positive=True)),
        swap_drain_s=m.duration_s("swap_drain", "30s"),
    )
    s = t.sub("stranded")
    s.check_unknown({"threshold", "reclaim_window"})
    threshold_bytes = s.size_bytes("threshold", "32GB") or 0
    drift_bytes = stranded_policy.StrandedSettings().tolerance_bytes
    if threshold_bytes <= drift_bytes:
        raise s.error("threshold", f"must be above {drift_bytes / 1e9:g}GB (idle wired memory drifts by that much), "
                                   f"got {threshold_bytes / 1e9:g}GB")
    stranded = s.construct(
        stranded_policy.StrandedSettings, {"threshold_bytes": "threshold", "reclaim_window_s": "reclaim_window"},
        threshold_bytes=threshold_bytes,
        reclaim_window_s=s.duration_s("reclaim_window", "2m"),
    )
    rb = t.sub("reboot")
    rb.check_unknown({"enabled", "grace", "cooldown", "argv"})
    argv_raw = rb._get("argv", None, False)
    if argv_raw is not None and isinstance(argv_raw, str):
        raise rb.error("argv", "must be a list of strings (it runs without a shell), "
                               'e.g. ["sudo", "-n", "shutdown", "-r", "now"]')
    argv = rb.str_list("argv", list(DEFAULT_REBOOT_ARGV))
    if not argv:
        raise rb.error("argv", 'must not be empty, e.g. ["sudo", "-n", "shutdown", "-r", "now"]')
    if not all(argv):
        raise rb.error("argv", f"must not contain empty strings, got {list(argv)!r}")
    reboot = rb.construct(
        reboot_policy.RebootSettings, {"enabled": "enabled", "grace_s": "grace", "cooldown_s": "cooldown", "argv": "argv"},
        enabled=rb.bool("enabled", False),
        grace_s=rb.duration_s("grace", "5m", min_s=30, why="a reboot is announced first so a person has time to run `llmctl reboot cancel`"),
        cooldown_s=rb.duration_s("cooldown", "6h", min_s=3600,
                                 why="a condition that comes back after every boot must not become a reboot loop"),
        argv=argv,
    )
    d = t.sub("degraded")
    d.check_unknown({"share", "windows", "window", "restart_when_idle"})
    degraded = d.construct(
        HealthSettings, {"degraded_share": "share", "degraded_windows": "windows", "window_s": "window",
                         "restart_when_idle": "restart_when_idle"},
        degraded_share=d.float("share", 0.5, min_value=0.01, max_value=0.99),
        degraded_windows=d.int("windows", 3, min_value=1, max_value=100) or 3,
        window_s=d.duration_s("window", "30s", min_s=1),
        restart_when_idle=d.bool("restart_when_idle", False),
    )
    return restart, memory, stranded, reboot, degraded


def _parse_probes(t: Table) -> ProbeSettings:
    t.check_unknown({"interval", "process_interval", "vm_stat", "sysctl", "nvml", "platform"})
    return ProbeSettings(
        interval_s=t.duration_s("interval", "5s", min_s=0.2),
        process_interval_s=t.duration_s("process_interval", "1s", min_s=0.1),
        vm_stat=t.str("vm_stat", "vm_stat") or "vm_stat",
        sysctl=t.str("sysctl", "sysctl") or "sysctl",
        nvml=t.bool("nvml", True),
        platform=t.str("platform", "auto", choices=("auto", "darwin", "linux")) or "auto",
    )


_TOP_KEYS = {"daemon", "engine", "policies", "probes", "gateway", "alerts"}


def _state_and_socket(d: Table, environ: Mapping[str, str]) -> tuple[Path, Path]:
    """The [daemon] table's state directory and control socket."""
    # A relative path is read from the config file's directory, the same for the daemon (whose working
    # directory is launchd's or systemd's) and for llmctl run from any shell.
    base = _config_dir(d)
    state_dir_raw = d.str("state_dir")
    if state_dir_raw:
        state_dir = base / os.path.expanduser(state_dir_raw)
    elif environ.get("SUPERVISORD_LLM_STATE_DIR"):
        state_dir = Path.cwd() / os.path.expanduser(environ["SUPERVISORD_LLM_STATE_DIR"])
    else:
        state_dir = default_state_dir()
    socket_raw = d.str("control_socket")
    control_socket = base / os.path.expanduser(socket_raw) if socket_raw else state_dir / "control.sock"
    if len(str(control_socket).encode()) > 100:
        raise d.error("control_socket", f"the path {str(control_socket)!r} is too long for a Unix socket "
                                        "(at most 100 bytes); set a shorter daemon.control_socket or state_dir")
    return state_dir, control_socket


def _parse_daemon(d: Table, environ: Mapping[str, str]) -> DaemonConfig:
    d.check_unknown({"state_dir", "control_socket", "log_level", "log_max_bytes", "metrics_listen",
                     "stop_engines_on_exit"})
    state_dir, control_socket = _state_and_socket(d, environ)
    metrics_listen = d.str("metrics_listen")
    if metrics_listen is not None:
        _parse_listen(metrics_listen, d, "metrics_listen")
    return DaemonConfig(
        state_dir=state_dir,
        control_socket=control_socket,
        log_level=d.str("log_level", "info", choices=("debug", "info", "warning", "error")) or "info",
        log_max_bytes=d.size_bytes("log_max_bytes", "20MB") or 20 * 10**6,
        metrics_listen=metrics_listen,
        stop_engines_on_exit=d.bool("stop_engines_on_exit", True),
    )


def parse_config(data: Mapping[str, Any], file: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document into a Config."""
    environ = os.environ if environ is None else environ
    root = Table(data, file, "")
    root.check_unknown(_TOP_KEYS)
    d = root.sub("daemon")
    daemon = _parse_daemon(d, environ)
    metrics_listen = daemon.metrics_listen

    engines_raw = data.get("engine", [])
    if not isinstance(engines_raw, list):
        raise ConfigError("expected [[engine]] tables (an array of tables)", file=file, key="engine")
    engines: list[EngineConfig] = []
    seen: dict[str, tuple[str, str]] = {}  # a name or an alias -> ("name" or "alias", the engine that has it)
    for i, raw in enumerate(engines_raw):
        engine = _parse_engine(Table(raw, file, f"engine[{i}]"))
        _check_unique_labels(engine, i, seen, file)
        engines.append(engine)
    for i, engine in enumerate(engines):
        # The same port on addresses that cannot both be bound (localhost is 127.0.0.1; 0.0.0.0 covers every one).
        for other in engines[:i]:
            if _same_listen((other.host, other.port), (engine.host, engine.port)):
                raise ConfigError(f"port {engine.port} is already used by engine {other.name!r} "
                                  f"({other.host}:{other.port}); each engine needs its own port",
                                  file=file, key=f"engine[{i}].port")
    if metrics_listen is not None:
        # The daemon binds metrics_listen before it starts any engine: an engine on its port could never start.
        for engine in engines:
            if _same_listen(parse_listen(metrics_listen), (engine.host, engine.port)):
                raise d.error("metrics_listen", f"{metrics_listen} would take the port of engine {engine.name!r} "
                                                f"({engine.host}:{engine.port}), which could then never start; give the "
                                                'metrics server another port, e.g. "127.0.0.1:9464"')
    defaults = [e.name for e in engines if e.default]
    if len(defaults) > 1:
        raise ConfigError(f"more than one engine is marked default ({', '.join(defaults)}); mark at most one",
                          file=file, key="engine.default")

    restart, memory, stranded, reboot, degraded = _parse_policies(root.sub("policies"))
    probes = _parse_probes(root.sub("probes"))
    memory_guard = _parse_memory_guard(root.sub("policies").sub("memory_guard"))
    for i, engine in enumerate(engines):
        soft, hard, footprint = engine.memory_soft_bytes, engine.memory_hard_bytes, engine.footprint_bytes
        if memory_guard.enabled and soft is not None and hard is None and footprint is not None:
            derived = round(footprint * memory_guard.guard.hard_factor)  # policies.memory_guard.watermarks
            if soft >= derived:
                raise ConfigError(
                    f"must be below memory_hard, which is \"auto\" here: footprint {format_bytes(footprint)} × "
                    f"policies.memory_guard.hard_factor {memory_guard.guard.hard_factor:g} = {format_bytes(derived)}; "
                    f"got {format_bytes(soft)}; set memory_hard above it, "
                    f"e.g. memory_hard = \"{_example_size(soft * 1.2)}\", or a lower memory_soft",
                    file=file, key=f"engine[{i}].memory_soft")

    gateway = None
    if "gateway" in data:
        settings = read_gateway(root.sub("gateway"), environ)
        if settings.enabled and metrics_listen and _same_listen(parse_listen(metrics_listen),
                                                                (settings.host, settings.port)):
            raise ConfigError(f"the gateway ({settings.listen}) and daemon.metrics_listen ({metrics_listen}) would "
                              "listen on the same port of the same address; give one of them another port",
                              file=file, key="gateway.listen")
        gateway = settings if settings.enabled else None
        if gateway is not None:
            for engine in engines:
                if _same_listen((settings.host, settings.port), (engine.host, engine.port)):
                    raise ConfigError(f"the gateway port {settings.port} is engine {engine.name!r}'s port "
                                      f"({engine.host}:{engine.port}); give one of them another port",
                                      file=file, key="gateway.listen")

    alerts = None
    if "alerts" in data:
        alerts = AlertSettings.from_toml(root.sub("alerts").data, file=file, key="alerts", environ=environ)

    # Last: every other mistake is named first, and this is the one check that reads the disk.
    for i, engine in enumerate(engines):
        if engine.footprint_bytes is None and engine.gpu_footprint_bytes is None:
            _require_known_weights(Table(engines_raw[i], file, f"engine[{i}]"), engine.kind, engine.model, environ)

    return Config(
        file=file,
        daemon=daemon,
        engines=tuple(engines),
        restart=restart,
        memory=memory,
        stranded=stranded,
        reboot=reboot,
        degraded=degraded,
        probes=probes,
        memory_guard=memory_guard,
        gateway=gateway,
        alerts=alerts,
    )


def _check_unique_labels(engine: EngineConfig, i: int, seen: dict[str, tuple[str, str]], file: str) -> None:
    """The engine's name and aliases are new: each clash is named at the key that holds it (name or aliases)."""
    labels = [("name", engine.name)] + [("alias", alias) for alias in engine.aliases]
    for what, label in labels:
        key = f"engine[{i}].{'name' if what == 'name' else 'aliases'}"
        if label in seen:
            had_as, owner = seen[label]
            if owner == engine.name and what == "alias":
                problem = "the engine's own name" if had_as == "name" else "listed twice in aliases"
            else:
                problem = f"already {'the name' if had_as == 'name' else 'an alias'} of engine {owner!r}"
            raise ConfigError(f"duplicate engine name or alias {label!r}: {problem}; names and aliases must be unique",
                              file=file, key=key)
        seen[label] = (what, engine.name)


def _require_known_weights(t: Table, kind: str, model: str | None, environ: Mapping[str, str] | None) -> None:
    """``footprint = "auto"`` is the weights' size times memory.footprint_factor; a size that cannot
    be known must not count as 0 (two big engines would pass admission together, and a resident
    engine's memory would count as stranded)."""
    from probes.weights import read_weights, where_looked

    if not model:
        raise t.error("footprint", 'is "auto" (the default) but this engine names no model to measure; '
                                   'set footprint to what it holds while resident, e.g. footprint = "140GB"')
    if read_weights(model, kind, environ) is None:
        raise t.error("footprint", f'is "auto" (the default) but the size of model {model!r} cannot be known: '
                                   f"no weights found in {where_looked(model, kind, environ)} (not downloaded "
                                   'yet?); set footprint explicitly, e.g. footprint = "140GB", or download '
                                   "the model first")


def _parse_listen(value: str, t: Table, key: str) -> tuple[str, int]:
    # The same parser the listener uses at start: what passes here also binds (IPv6 in brackets).
    try:
        host, port = parse_listen(value)
    except ValueError as exc:
        raise t.error(key, str(exc)) from exc
    if not 0 < port < 65536:
        raise t.error(key, f"expected HOST:PORT such as \"127.0.0.1:9464\" or \"[::1]:9464\", got {value!r}")
    return host, port


def _example_size(n: float) -> str:
    """A size as a config would write it, rounded up: 130000000000 -> "130GB"."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{math.ceil(n / factor)}{unit}"
    return f"{math.ceil(n)}B"


def _same_listen(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two listen addresses that cannot both be bound: the same port on the same host, or on a host and the
    wildcard address that covers it (0.0.0.0 or ::)."""
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a != port_b or port_a == 0:  # (port 0: each gets a free port of its own)
        return False
    host_a, host_b = ("127.0.0.1" if h == "localhost" else h for h in (host_a, host_b))
    return host_a == host_b or {host_a, host_b} & {"0.0.0.0", "::", ""} != set()


def resolve_config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file, as an absolute path: the daemon records it (status, ``llmctl doctor``, ``service
    install``), and those run from other directories."""
    environ = os.environ if environ is None else environ
    if explicit:
        chosen = os.fspath(explicit)
    elif environ.get("SUPERVISORD_LLM_CONFIG"):
        chosen = environ["SUPERVISORD_LLM_CONFIG"]
    else:
        return default_config_path()
    return Path(os.path.abspath(os.path.expanduser(chosen)))


def config_notes(config: Config) -> list[str]:
    """What a valid config does that its author may not expect (``check-config`` prints these)."""
    notes = []
    if not config.engines:
        # Valid: the daemon runs its memory watch, reboot escalation and alerts without engines; but a config
        # without one is most often a mistake ([engine] for [[engine]] is refused; a forgotten table is not).
        gateway_says = (', and the gateway answers every request with 404 "no engines are configured"'
                        if config.gateway is not None and config.gateway.enabled else "")
        notes.append(f"engine: no [[engine]] table: the daemon will start and supervise nothing{gateway_says}; add "
                     'one, e.g. [[engine]] name = "qwen", kind = "mlx_lm", model = "/path/to/model", port = 8081')
    gateway = config.gateway
    if gateway is not None and gateway.enabled and gateway.swaps == "with_key" and is_loopback(gateway.host):
        notes.append('gateway.swaps: with "with_key" on loopback the api_key guards starting and swapping engines '
                     "only: a local client without it uses the engines that are resident; if a tunnel or a reverse "
                     'proxy lets others reach this gateway, use "allowed" or "never", where the key guards every request')
    if gateway is not None and gateway.enabled:
        open_to = origins_admitting_any_site(gateway.allowed_origins)
        keyless = not key_needed_to_use(SwapPermission(gateway.swaps), has_key=gateway.api_key is not None,
                                        loopback=is_loopback(gateway.host))
        if open_to and keyless:
            notes.append(f"gateway.allowed_origins: {', '.join(repr(o) for o in open_to)} lets a page of any site the "
                         "user opens use the models through this gateway without its api_key (\"null\" is what any "
                         "site's sandboxed frame sends); list the sites instead, or require the key for every request")
        broad_hosts = hosts_admitting_any_site(gateway.allowed_hosts)
        if broad_hosts and keyless and is_loopback(gateway.host):
            notes.append(f"gateway.allowed_hosts: {', '.join(repr(h) for h in broad_hosts)} answers under any site's "
                         "name: a page of a site whose name points at 127.0.0.1 (DNS rebinding) reads the status page "
                         "and the model list; list the names themselves, or give the gateway an api_key")
        if keyless and gateway.allowed_hosts and not broad_hosts:
            notes.append("gateway.allowed_hosts: whoever reaches this gateway under these names (a tunnel, a reverse "
                         "proxy) uses the models without a key; give the gateway an api_key if others can")
        if gateway.allowed_hosts and not host_check_applies(loopback=is_loopback(gateway.host), key_needed=not keyless):
            notes.append("gateway.allowed_hosts: every request to this gateway needs its api_key, so it answers under "
                         "any name and the list is not used")
    if gateway is not None and gateway.enabled and gateway.hold_s == 0 and gateway.swaps != "never":
        # A request starts (or swaps in) its engine by waiting for it; with no wait it only gets the 503.
        waiting = [e.name for e in config.engines if not e.autostart or e.idle_unload_s is not None]
        if waiting or any(e.exclusive for e in config.engines):
            notes.append("gateway.hold_s: 0 means no request waits, so none starts or swaps in its engine either: "
                         "a stopped engine (not preloaded, unloaded when idle, swapped out) gets a 503 until an "
                         "operator starts it (llmctl start / llmctl switch); give hold_s a value (e.g. 120) for "
                         "requests to start it")
    for engine in config.engines:
        if engine.idle_unload_s is None:
            continue
        if config.gateway is None or not config.gateway.enabled:
            notes.append(f"engine[{engine.name}].idle_unload: no gateway is on, so no request starts {engine.name} again "
                         f"once it is unloaded; only an operator does (llmctl start {engine.name})")
        elif config.gateway.swaps == "never":
            notes.append(f"engine[{engine.name}].idle_unload: with gateway.swaps = \"never\" no request starts "
                         f"{engine.name} again once it is unloaded; only an operator does (llmctl start {engine.name})")
    return notes


def load_config(path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the config; raise ConfigError naming file, key and what is valid."""
    data, file = _read_document(path, environ)
    return parse_config(data, file, environ=environ)


def control_socket_of(path: str | os.PathLike[str] | None = None, *,
                      environ: Mapping[str, str] | None = None) -> Path:
    """The control socket the config gives the daemon, read from its [daemon] table alone: a client (llmctl)
    needs nothing else, and must not fail where the daemon's secrets (api_key_env, url_env) are not in its
    environment. ConfigError as load_config for a file that cannot be read or a [daemon] table that is wrong
    (any key of it, as the daemon reads it: a typo there is named, not passed over)."""
    data, file = _read_document(path, environ)
    root = Table(data, file, "")
    return _parse_daemon(root.sub("daemon"), os.environ if environ is None else environ).control_socket


def _read_document(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None) -> tuple[dict[str, Any], str]:
    resolved = resolve_config_path(path, environ)
    file = str(resolved)
    try:
        raw = resolved.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError("no such file; pass --config PATH or set SUPERVISORD_LLM_CONFIG", file=file) from exc
    except IsADirectoryError as exc:
        raise ConfigError("is a directory, expected a TOML file", file=file) from exc
    except PermissionError as exc:
        raise ConfigError("cannot be read (permission denied)", file=file) from exc
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror}", file=file) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not UTF-8 text (byte {exc.start})", file=file) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from exc
    return data, file


__all__ = [
    "Config", "ConfigError", "DaemonConfig", "EngineConfig", "ENGINE_KINDS", "Table", "control_socket_of", "load_config",
    "parse_config", "resolve_config_path", "DURATION_HELP", "SIZE_HELP",
]
