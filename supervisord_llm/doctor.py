"""``llmctl doctor``: a preflight a user runs before trusting the setup.

Each check yields findings (ok / warn / error), each problem with the fix. It reads the config and
the machine directly, so it works with or without a running daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisord_llm.config import Config, EngineConfig, load_config
from supervisord_llm.convert import format_bytes
from supervisord_llm.errors import ConfigError, SupervisordLLMError
from supervisord_llm.redact import redact_argv


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "warn" | "error"
    subject: str
    message: str
    fix: str = ""


def check_model_dir(engine: EngineConfig) -> list[Finding]:
    """Every shard named in ``model.safetensors.index.json`` exists and is not empty."""
    subject = f"engine {engine.name}: model"
    if not engine.model:
        return []
    path = Path(os.path.expanduser(engine.model))
    if engine.kind in ("ollama",) or (not path.exists() and "/" in engine.model and not engine.model.startswith(("/", "~", "."))):
        return [Finding("ok", subject, f"{engine.model} is a model id (not a local directory); not checked")]
    if not path.exists():
        return [Finding("error", subject, f"{path} does not exist",
                        "download the model there, or fix engine.model in the config")]
    if path.is_file():
        if path.stat().st_size == 0:
            return [Finding("error", subject, f"{path} is empty", "download it again")]
        return [Finding("ok", subject, f"{path} ({format_bytes(path.stat().st_size)})")]
    findings: list[Finding] = []
    if engine.kind in ("mlx_lm", "vllm", "sglang", "omlx") and not (path / "config.json").exists() \
            and engine.kind != "omlx":
        findings.append(Finding("error", subject, f"{path / 'config.json'} is missing",
                                "the model directory is incomplete; download it again"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return findings + [Finding("error", subject, f"{index} is unreadable or not an index ({exc})",
                                       "download the model again")]
        missing = [s for s in shards if not (path / s).exists()]
        empty = [s for s in shards if (path / s).exists() and (path / s).stat().st_size == 0]
        for shard in missing:
            findings.append(Finding("error", subject, f"shard {shard} named in model.safetensors.index.json is missing "
                                                      f"from {path}", "the download is incomplete; resume it"))
        for shard in empty:
            findings.append(Finding("error", subject, f"shard {shard} in {path} is empty (0 bytes)",
                                    "the download is incomplete; download that file again"))
        if not missing and not empty:
            total = sum((path / s).stat().st_size for s in shards)
            findings.append(Finding("ok", subject, f"all {len(shards)} shards present ({format_bytes(total)})"))
    else:
        weights = list(path.glob("*.safetensors")) + list(path.glob("*.gguf"))
        if not weights and engine.kind not in ("omlx",):
            findings.append(Finding("warn", subject, f"no *.safetensors or *.gguf files in {path}",
                                    "check that engine.model points at the model directory"))
        for w in weights:
            if w.stat().st_size == 0:
                findings.append(Finding("error", subject, f"{w.name} is empty (0 bytes)", "download it again"))
        if weights and not any(f.level == "error" for f in findings):
            findings.append(Finding("ok", subject, f"{len(weights)} weight file(s) present"))
    return findings


def check_command(engine: EngineConfig) -> Finding:
    from supervisord_llm.engine.adapters import adapter_for

    if engine.cwd is not None and not Path(engine.cwd).is_dir():
        return Finding("error", f"engine {engine.name}: cwd", f"{engine.cwd} is not a directory: the engine cannot "
                       "be started in it", "create it, or set cwd to a directory (or leave it out)")
    argv = adapter_for(engine).argv()
    exe = argv[0]
    subject = f"engine {engine.name}: command"
    found = shutil.which(exe) if os.sep not in exe else (exe if os.access(exe, os.X_OK) else None)
    if not found:
        return Finding("error", subject, f"{exe!r} not found", f"install {engine.kind} or set engine.command")
    if exe == sys.executable and len(argv) > 2 and argv[1] == "-m":
        import importlib.util

        module = argv[2]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return Finding("error", subject, f"python module {module} is not installed in {sys.executable}",
                           f"pip install {module.split('.')[0].replace('_', '-')} (for mlx_lm: pip install "
                           "'supervisord-llm[mlx]')")
    shown = redact_argv(argv)
    return Finding("ok", subject, " ".join(shown[:4]) + (" ..." if len(shown) > 4 else ""))


def check_port(engine: EngineConfig, running_pid: int | None = None) -> Finding:
    """Free, or held by this engine as the running daemon runs it; anything else is a warning."""
    from supervisord_llm.engine.process import port_holder, tree_of
    from supervisord_llm.errors import AddressNotLocal

    subject = f"engine {engine.name}: port"
    try:
        holder = port_holder(engine.host, engine.port, engine.name)
    except AddressNotLocal as exc:
        return Finding("error", subject, str(exc), "set the engine's host to an address of this machine")
    if holder is None:
        return Finding("ok", subject, f"{engine.host}:{engine.port} is free")
    pid, command = holder
    if running_pid is not None and pid is not None and pid in {p.pid for p in tree_of(running_pid)}:
        return Finding("ok", subject, f"{engine.host}:{engine.port} is served by this engine (pid {running_pid}) "
                                      "under the running daemon")
    return Finding("warn", subject, f"{engine.host}:{engine.port} is in use by "
                                    f"{f'pid {pid} ({command})' if pid else 'another process'}",
                   "if that is not this engine already running under the daemon, stop it or pick another port")


def check_memory(config: Config) -> list[Finding]:
    from probes.errors import ProbeError
    from probes.memory import read_system_memory

    p = config.probes
    platform = sys.platform if p.platform == "auto" else p.platform
    try:
        mem = read_system_memory(0.0, platform=platform, vm_stat_cmd=p.vm_stat, sysctl_cmd=p.sysctl)
    except ProbeError as exc:
        return [Finding("error", "memory", f"cannot read memory: {exc}", "check probes.vm_stat / probes.sysctl")]
    findings = [Finding("ok", "memory", f"{format_bytes(mem.available_bytes)} available of "
                                        f"{format_bytes(mem.total_bytes)}")]
    from probes.weights import read_weights

    for engine in config.engines:
        footprint = engine.footprint_bytes
        if footprint is None:
            weights = read_weights(engine.model, engine.kind)
            footprint = int(weights.bytes * config.memory.auto_factor) if weights else None
        subject = f"engine {engine.name}: footprint"
        if footprint is None:
            findings.append(Finding("warn", subject, "unknown (footprint = \"auto\" but no weights found on disk)",
                                    'set engine.footprint, e.g. footprint = "140GB"'))
            continue
        need = footprint + config.memory.headroom_bytes
        if need > mem.total_bytes:
            findings.append(Finding("error", subject, f"{format_bytes(footprint)} + {format_bytes(config.memory.headroom_bytes)} "
                                                      f"headroom exceeds the machine's {format_bytes(mem.total_bytes)}",
                                    "use a smaller quantization or lower the footprint if it is overstated"))
        elif need > mem.available_bytes:
            findings.append(Finding("warn", subject, f"{format_bytes(need)} needed, {format_bytes(mem.available_bytes)} "
                                                     "available right now", "stop other memory users before starting it"))
        else:
            findings.append(Finding("ok", subject, f"{format_bytes(footprint)} fits"))
        if mem.wired_limit_bytes is not None and footprint > mem.wired_limit_bytes:
            findings.append(Finding("warn", f"engine {engine.name}: iogpu.wired_limit_mb",
                                    f"the footprint {format_bytes(footprint)} exceeds the GPU wired limit "
                                    f"{format_bytes(mem.wired_limit_bytes)}",
                                    f"sudo sysctl iogpu.wired_limit_mb={int(mem.total_bytes * 0.9 / 2**20)}"))
    if platform == "darwin" and mem.wired_limit_bytes is None:
        findings.append(Finding("ok", "iogpu.wired_limit_mb", "system default (about 2/3-3/4 of memory for the GPU)",
                                "for models near the limit: sudo sysctl iogpu.wired_limit_mb=<MB>"))
    return findings


def check_memory_cap(engine: EngineConfig, config: Config) -> Finding:
    """A cache the engine bounds itself, or watermarks the guard enforces; warn when neither is set."""
    from supervisord_llm.subsystems.memory_guard import CACHE_CAP_FLAGS, cache_cap_flag

    subject = f"engine {engine.name}: memory cap"
    argv = (*engine.command, *engine.args)
    if engine.kind == "mlx_lm" and any(a.split("=", 1)[0] == "--max-kv-size" for a in argv):
        return Finding("error", subject, "mlx_lm.server has no --max-kv-size (that flag is mlx_lm.generate's); "
                                         "the server exits at start with 'unrecognized arguments'",
                       'bound its cache with --prompt-cache-bytes instead, e.g. args = ["--prompt-cache-bytes", "16GB"]')
    cap = cache_cap_flag(engine.kind, argv)
    if cap is not None:
        return Finding("ok", subject, f"the engine bounds its own cache ({cap})")
    if engine.memory_soft_bytes is not None or engine.memory_hard_bytes is not None:
        return Finding("ok", subject, f"memory guard watermarks: soft {format_bytes(engine.memory_soft_bytes)}, "
                                      f"hard {format_bytes(engine.memory_hard_bytes)}")
    flags = CACHE_CAP_FLAGS.get(engine.kind)
    watermarks = f"set engine.memory_soft / engine.memory_hard ({_watermark_example(engine, config)})"
    fix = f"add an engine-side cap to engine.args ({' or '.join(flags)}), or {watermarks}" if flags else watermarks
    guard = ("the guard only acts at its default watermarks (footprint x "
             f"{config.memory_guard.soft_factor:g} / x {config.memory_guard.hard_factor:g}), after the cache has grown"
             if config.memory_guard.enabled else "the memory guard is off ([policies.memory_guard] enabled = false)")
    return Finding("warn", subject, f"no engine-side cache cap and no watermarks of its own (memory_soft / "
                                    f"memory_hard): a cache that grows without a bound takes the machine's memory; "
                                    f"{guard}", fix)


def nvidia_device_present(dev: Path = Path("/dev"), proc: Path = Path("/proc/driver/nvidia")) -> bool:
    """An NVIDIA GPU's device node, or the driver's proc entry, exists (Linux): NVML failing there is a driver
    problem worth a warning; elsewhere there is simply no NVIDIA GPU."""
    return proc.exists() or any(dev.glob("nvidia[0-9]*"))


def _watermark_example(engine: EngineConfig, config: Config) -> str:
    """Watermarks to suggest: the guard's own factors over the engine's footprint, as config sizes."""
    footprint = engine.footprint_bytes

    def size(n: float) -> str:
        return f'"{n / 1e9:.0f}GB"' if n >= 10e9 else f'"{n / 1e9:.1f}GB"' if n >= 1e9 else f'"{n / 1e6:.0f}MB"'

    if not footprint:
        return 'e.g. "110GB" / "130GB" for a 100 GB model'
    return (f"e.g. {size(footprint * config.memory_guard.soft_factor)} / "
            f"{size(footprint * config.memory_guard.hard_factor)} for its {size(footprint)} footprint")


def check_nvml(config: Config) -> list[Finding]:
    if not any(e.kind in ("vllm", "sglang", "llama_cpp", "ollama") or e.gpu_devices for e in config.engines):
        return []
    if not config.probes.nvml:
        return [Finding("warn", "nvml", "NVML probing is off (probes.nvml = false)", "")]
    from probes.nvml import NvmlProbe

    probe = NvmlProbe()
    reading = probe.read(0.0)
    if not reading.available:
        if not nvidia_device_present() and not any(e.gpu_devices for e in config.engines):
            # A CPU-only machine, a Mac, another vendor's GPU, and no engine pinned to a GPU: nothing to install.
            return [Finding("ok", "nvml", "NVIDIA GPU probing unavailable: no NVIDIA GPU on this machine; GPU "
                                          "memory admission and XID alerts are off, admission counts its memory")]
        return [Finding("warn", "nvml", f"NVIDIA GPU probing unavailable: {reading.reason}",
                        "install the NVIDIA driver (libnvidia-ml) to get GPU memory admission and XID alerts")]
    return [Finding("ok", "nvml", f"{len(reading.devices)} GPU(s): " +
                    ", ".join(f"{d.name} {format_bytes(d.free_bytes)} free" for d in reading.devices))]


def restart_refusal(config: Config) -> str | None:
    """Why a restart in place (SIGHUP, ``llmctl daemon restart``) would end supervision, or None: the new daemon
    reads the same config file and would stop at once on it, leaving the engines to no one, if it no longer
    loads, moves the state dir (the engines' records stay behind: the new daemon would start second copies
    beside them), or names an address the new daemon cannot take (a gateway or metrics port another process
    holds, a control socket path that is a file or another daemon's)."""
    refused = "the restart is refused, this daemon runs on: "
    try:
        new = load_config(config.file)
    except ConfigError as exc:
        return (f"{refused}the config no longer loads ({exc}); fix it (`supervisord-llm check-config --config "
                f"{config.file}`), then restart again")
    if new.daemon.state_dir != config.daemon.state_dir:
        return (f"{refused}the config moves the state dir from {config.daemon.state_dir} to {new.daemon.state_dir}, "
                "where the new daemon would not find its engines; stop the daemon (it stops them), then start it")
    def listen(c: Config) -> tuple[str, int] | None:
        return (c.gateway.host, c.gateway.port) if c.gateway is not None and c.gateway.enabled else None

    # What this daemon holds now is the new one's (it gets the sockets with the re-exec): only changes are checked.
    errors = [f for f in check_daemon_addresses(new, gateway=listen(new) != listen(config),
                                                metrics=new.daemon.metrics_listen != config.daemon.metrics_listen,
                                                control_socket=new.daemon.control_socket != config.daemon.control_socket)
              if f.level == "error"]
    if errors:
        return refused + "; ".join(f"{f.subject}: {f.message}" for f in errors)
    return None


def _recorded_gateway(config: Config) -> tuple[int, float] | None:
    """The gateway process the state file records (pid, create time): the one `run` ends before it listens
    (``GatewayProcess._end_previous``). Read only: a doctor moves no state file aside."""
    import json

    try:
        record = json.loads((config.daemon.state_dir / "state.json").read_text()).get("gateway")
        return int(record["pid"]), float(record["create_time"])
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return None


def check_daemon_addresses(config: Config, *, gateway: bool = True, metrics: bool = True,
                           control_socket: bool = True) -> list[Finding]:
    """With no daemon running: the addresses ``run`` will take (the gateway's, the metrics port, the control
    socket; each where asked) can be had; a port held by another process or a file where the socket goes
    stops ``run``."""
    import socket
    import stat

    import psutil

    from supervisord_llm.gateway.protocol import GatewayListenFailed, bind_listen
    from supervisord_llm.gateway.settings import parse_listen

    findings = []
    wanted: list[tuple[str, str, int]] = []
    if gateway and config.gateway is not None and config.gateway.enabled:
        wanted.append(("[gateway] listen", config.gateway.host, config.gateway.port))
    if metrics and config.daemon.metrics_listen:
        host, port = parse_listen(config.daemon.metrics_listen)
        wanted.append(("[daemon] metrics_listen", host, port))
    for setting, host, port in wanted:
        try:
            bind_listen(host, port, setting=setting).close()
        except GatewayListenFailed as exc:
            from supervisord_llm.engine.process import port_holder
            from supervisord_llm.gateway.process import WORKER_MODULE

            try:
                holder = port_holder(host, port)
                previous_gateway = False
                if holder is not None and holder[0] is not None:
                    proc = psutil.Process(holder[0])
                    recorded = _recorded_gateway(config)
                    previous_gateway = (WORKER_MODULE in proc.cmdline() and recorded is not None
                                        and recorded[0] == proc.pid and abs(recorded[1] - proc.create_time()) < 1.0)
            except (SupervisordLLMError, psutil.Error):
                holder, previous_gateway = None, False
            if holder is not None and previous_gateway:
                # A gateway an earlier daemon on this state dir left (it died; its gateway drains on): `run` ends
                # it first. Another daemon's gateway (another state dir) is another process's port: an error.
                findings.append(Finding("warn", setting, f"{host}:{port} is held by the gateway of an earlier "
                                        f"daemon (pid {holder[0]}), which `run` ends before it listens"))
            else:
                findings.append(Finding("error", setting, str(exc)))
        else:
            findings.append(Finding("ok", setting, f"{host}:{port} is free"))
    path = config.daemon.control_socket
    try:
        mode = os.lstat(path).st_mode if control_socket else None
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        findings.append(Finding("error", "[daemon] control_socket", f"{path} exists and is not a socket: `run` "
                                "refuses to replace it", "set control_socket to a path of its own"))
    elif mode is not None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # a dead daemon's: `run` replaces it
            except OSError as exc:  # as `run` sees it: a live daemon's, perhaps (a full backlog)
                findings.append(Finding("error", "[daemon] control_socket", f"cannot tell whether another daemon "
                                        f"uses the socket {path}: {exc.strerror or exc}",
                                        "set control_socket to a path of its own"))
            else:
                findings.append(Finding("error", "[daemon] control_socket", f"another daemon listens on {path}",
                                        "set control_socket to a path of its own, or stop that daemon"))
    return findings


def diagnose_setup(config: Config, running: dict[str, Any] | None = None) -> list[Finding]:
    """Every check; ``running`` is the running daemon's status when there is one (its engines'
    ports are then expected to be in use by those engines)."""
    findings = [Finding("ok", "config", f"{config.file} is valid ({len(config.engines)} engine(s))")]
    pids: dict[str, int] = {}
    if running is not None:
        daemon = running.get("daemon", {})
        findings.append(Finding("ok", "daemon", f"running (pid {daemon.get('pid')}, state dir {daemon.get('state_dir')})"))
        pids = {e["name"]: e["pid"] for e in running.get("engines", []) if e.get("pid")}
    else:
        findings.extend(check_daemon_addresses(config))
    if not config.engines:
        findings.append(Finding("warn", "config", "no [[engine]] configured", "add an [[engine]] table"))
    for engine in config.engines:
        findings.append(check_command(engine))
        findings.extend(check_model_dir(engine))
        findings.append(check_port(engine, pids.get(engine.name)))
        findings.append(check_memory_cap(engine, config))
    findings.extend(check_memory(config))
    findings.extend(check_nvml(config))
    return findings


def _Console() -> Any:  # noqa: N802 (a class made at call time: rich is imported only when doctor runs)
    from rich.console import Console

    class ReaderGoneConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 when the reader leaves (`llmctl doctor | head`): a failed preflight to a script, also
            # where every check passed. The output goes nowhere from here on, and the checks run to their end:
            # the exit status is theirs (0, or 1 with errors).
            self.quiet = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    return ReaderGoneConsole()


def run_doctor(config_path: str | None, running: dict[str, Any] | None = None) -> int:
    """``running``: the status of the daemon found on the control socket; its config is the one
    checked unless a config was named explicitly."""
    from rich.markup import escape

    # Findings name TOML tables ("[[engine]]", "[policies.memory_guard]"): escaped, or rich reads them as markup
    # and prints "no [] configured".
    console = _Console()
    if config_path is None and running is not None and running.get("daemon", {}).get("config"):
        config_path = str(running["daemon"]["config"])
        console.print(f"using the running daemon's config: {escape(config_path)}", highlight=False)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        console.print(f"[bold red]error[/] config: {escape(str(exc))}", highlight=False)
        return 2
    findings = diagnose_setup(config, running)
    style = {"ok": "green", "warn": "yellow", "error": "bold red"}
    for f in findings:
        console.print(f"[{style[f.level]}]{f.level:5}[/] {escape(f.subject)}: {escape(f.message)}", highlight=False)
        if f.fix and f.level != "ok":
            console.print(f"      fix: {escape(f.fix)}", highlight=False)
    errors = sum(1 for f in findings if f.level == "error")
    warns = sum(1 for f in findings if f.level == "warn")
    console.print(f"{errors} error(s), {warns} warning(s)")
    return 1 if errors else 0
