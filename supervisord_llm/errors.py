"""The project's errors, all under one root.

    SupervisordLLMError
    ├── ConfigError                  a config file is missing, unreadable or invalid (names file, key, valid values)
    ├── StateError                   the state dir or a state file cannot be used
    │   └── DaemonAlreadyRunning     another daemon holds the state dir (names its pid)
    ├── EngineError                  something about one engine (carries .engine)
    │   ├── UnknownEngine            no engine of that name is configured
    │   ├── PortInUse                a foreign process listens on the engine's port (names pid, command)
    │   ├── EngineSpawnFailed        the command could not be executed at all
    │   ├── EngineStartTimeout       no successful generation within start_timeout_s
    │   ├── EngineExitedDuringStart  the process exited before it became ready
    │   ├── EngineBusy               an operation is already in progress for this engine
    │   ├── StartRefused             a policy refused the start (backoff, memory, stranded memory)
    │   ├── EngineUnavailable        (gateway) the engine cannot serve a request now: 503 / 404
    │   └── MemoryNotReturned        memory did not come back after a stop within the bound
    ├── SwapError                    a model swap failed (rolled back or aborted)
    │   └── SwapInProgress           another swap is running; the request was refused
    ├── ControlError                 the control API refused or failed a request
    │   └── DaemonNotRunning         llmctl found no daemon on the socket
    ├── GatewayListenFailed          (gateway) the gateway cannot listen on its address
    └── ProbeError                   a probe could not produce a reading (parse errors included)
        └── ProbeUnavailable         the probe cannot run on this machine (no NVML, no vm_stat)

``probes`` cannot import this package, so its own ``probes.errors.ProbeError`` (with
``ProbeUnavailable`` and ``ProbeParseError``) is a separate root that the daemon catches at the
probe boundary and reports as events; the classes below keep the names for the daemon's own use.

Library exceptions are mapped to these at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class SupervisordLLMError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(SupervisordLLMError):
    """A config file is missing, unreadable or invalid."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ""
        if file:
            where = f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class StateError(SupervisordLLMError):
    """The state dir or a state file cannot be used."""


class DaemonAlreadyRunning(StateError):
    """Another daemon holds the state dir."""

    def __init__(self, state_dir: str, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another supervisord-llm daemon ({who}) already runs on state dir {state_dir}; "
            "stop it first or use a different state_dir"
        )


class EngineError(SupervisordLLMError):
    """Something about one engine."""

    def __init__(self, engine: str, message: str) -> None:
        self.engine = engine
        super().__init__(f"engine {engine!r}: {message}")


class UnknownEngine(EngineError):
    def __init__(self, engine: str, known: list[str]) -> None:
        super().__init__(engine, f"no such engine; configured engines: {', '.join(known) or '(none)'}")


class PortInUse(EngineError):
    def __init__(self, engine: str, host: str, port: int, pid: int | None, command: str | None) -> None:
        self.port = port
        self.pid = pid
        self.command = command
        holder = f"pid {pid} ({command})" if pid else "a process this user cannot see"
        super().__init__(
            engine,
            f"port {host}:{port} is already in use by {holder}; stop it or choose another port",
        )


class AddressNotLocal(EngineError):
    """The engine's host is no address of this machine: nothing could listen there (not a busy port)."""

    def __init__(self, engine: str, host: str, port: int, reason: str) -> None:
        self.host = host
        super().__init__(
            engine,
            f"cannot listen on {host}:{port}: {reason}; set the engine's host to an address of this machine, "
            "such as 127.0.0.1 (the default), ::1 or 0.0.0.0",
        )


class EngineSpawnFailed(EngineError):
    pass


class EngineStartTimeout(EngineError):
    pass


class EngineExitedDuringStart(EngineError):
    pass


class EngineBusy(EngineError):
    pass


class StartRefused(EngineError):
    """A policy refused the start; ``reason`` is machine-readable, the message is for people."""

    def __init__(self, engine: str, reason: str, message: str, until_s: float | None = None) -> None:
        self.reason = reason
        self.until_s = until_s
        self.detail = message  # the policy's own sentence, without the "engine 'x': " prefix
        super().__init__(engine, message)


class MemoryNotReturned(EngineError):
    pass


class SwapError(SupervisordLLMError):
    pass


class SwapInProgress(SwapError):
    def __init__(self, current: str) -> None:
        self.current = current
        super().__init__(f"a swap to {current!r} is already in progress; retry when it has finished")


class ControlError(SupervisordLLMError):
    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class DaemonNotRunning(ControlError):
    def __init__(self, socket_path: str) -> None:
        super().__init__(f"no supervisord-llm daemon is running (nothing answers on {socket_path})", 503)


class ProbeError(SupervisordLLMError):
    pass


class ProbeUnavailable(ProbeError):
    pass
