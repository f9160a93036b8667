"""What the daemon and the gateway say to each other, without the gateway's HTTP stack.

Room: gateway.

The daemon's process imports this module (and gateway/process.py, gateway/channel.py), never
gateway/proxy.py: the server, the upstream client and their libraries load only in the gateway's
own process.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from supervisord_llm.errors import EngineError, SupervisordLLMError

__all__ = [
    "DaemonCalls",
    "EngineUnavailable",
    "GatewayBackend",
    "PassingBackend",
    "GatewayListenFailed",
    "RequestStats",
    "Upstream",
    "bind_listen",
    "listen_text",
]

# Accepted connections inherit this fixed send buffer (see bind_listen).
_CLIENT_SNDBUF_BYTES = 64 * 2**10



@dataclass(frozen=True)
class Upstream:
    """Where one request goes: an engine that is ready to serve it now.

    ``kind`` is the adapter's name (mlx_lm, omlx, vllm, llama_cpp, ollama, sglang, command);
    ``served_model`` replaces the request's ``model`` field when set (mlx_lm.server wants
    ``"default_model"`` or its model path there, never the gateway's name for it).
    ``accepts_images``: its model can see, so translated Messages requests may carry images.
    ``auth_headers`` is the engine's own API key (vLLM/SGLang ``--api-key``, oMLX ``auth.api_key``):
    when set it replaces whatever credentials the client sent, which were for the gateway.
    """

    engine: str
    base_url: str
    kind: str
    supports_messages: bool
    served_model: str | None = None
    accepts_images: bool = False
    auth_headers: tuple[tuple[str, str], ...] = ()
    # The engine's own line: requests beyond max_concurrent wait (FIFO, up to max_queue), then 429.
    max_concurrent: int = 0
    max_queue: int = 0
    # The engine's step counter shows its silence while requests run (vLLM, SGLang): a non-streamed request
    # needs no stream to be watched (policies.frontdoor.fetch_as_stream).
    steps_watched: bool = False


class EngineUnavailable(EngineError):
    """The engine for a request cannot serve it now (503) or does not exist (404).

    ``reason`` is machine-readable (``backoff``, ``failed``, ``stranded_memory``, ``unknown_model``,
    ``hold_timeout`` ...); the message is for people. ``retry_after_s`` becomes the Retry-After
    header; ``until_wall`` (Unix time) says until when the engine is expected to stay unavailable.
    """

    def __init__(
        self,
        engine: str,
        reason: str,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        until_wall: float | None = None,
        status: int = 503,
    ) -> None:
        if status not in (503, 404):
            raise ValueError(f"EngineUnavailable status must be 503 or 404, got {status}")
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.until_wall = until_wall
        self.status = status
        self.detail = message or f"unavailable ({reason})"
        super().__init__(engine, self.detail)
        if self.detail.startswith(f"engine {engine!r} "):
            self.args = (self.detail,)  # it names its engine already ("engine 'a' is stopped ..."): not twice


class GatewayListenFailed(SupervisordLLMError):
    """The gateway could not listen on its address (port in use, address not available)."""


@dataclass(frozen=True)
class QuietDecode:
    """The arrivals of a stream's tokens whose interval since the arrival before no other request's prefill
    touched (``policies.health.quiet_interval``; every token of an arrival shares its interval)."""

    tokens: int  # tokens that came in those arrivals (one per counted event)
    seconds: float  # the intervals' total time
    events: int  # every token event the stream counted (its tokens by usage may be more: several per event)
    in_flight_s: float  # requests to its engine through the gateway, integrated over those intervals


@dataclass(frozen=True)
class RequestStats:
    """One finished or ended request, as the gateway saw it."""

    engine: str
    ttft_s: float | None
    tokens: int
    decode_s: float | None
    max_gap_s: float | None
    ended: str  # "complete" | "client_disconnected" | "client_too_slow" | "upstream_error" | "stalled" |
    # "gateway_stopping" (ended by the gateway's stop) | "gateway_exited" (its process died)
    duration_s: float | None = None  # from sending to the engine to the last byte
    # Its decode where no other request's prefill touched it (gateway/prefills.py). None: not known (its
    # decode is then taken whole).
    quiet: QuietDecode | None = None
    # Its client held it back at some point (the gateway stopped reading the engine for it, its buffer full):
    # its tokens then came at the client's pace, so its decode says nothing about the engine's.
    held_back: bool = False


class DaemonCalls(Protocol):
    """Protocol: what the gateway asks and tells the daemon. Sync methods must be cheap and not block."""

    def models(self) -> list[dict]: ...

    def default_engine(self) -> str | None: ...

    async def acquire(self, model: str | None, *, may_start: bool = True) -> Upstream: ...

    def request_started(self, engine: str) -> None: ...

    def token_progress(self, engine: str, at_s: float) -> None: ...

    def engine_progress_s(self, engine: str) -> float | None: ...

    def request_finished(self, stats: RequestStats) -> None: ...

    def stall_detected(self, engine: str, phase: str, stalled_for_s: float) -> None: ...

    def prefill_changed(self, engine: str, in_prefill: int, ended_at_s: float | None) -> None:
        """The gateway has ``in_prefill`` requests with a long prompt in prefill to ``engine`` now
        (gateway/prefills.py); ``ended_at_s``: one's prefill ended then (None: one began)."""

    def line_changed(self, engine: str, occupied: int) -> None:
        """``engine``'s line in the gateway holds ``occupied`` requests now: those with a slot (running, or
        handed one a moment ago) and those waiting for one (``max_concurrent``, ``max_queue``)."""


class GatewayBackend(DaemonCalls, Protocol):
    """Protocol: what the gateway needs from the daemon (its process's end of the channel)."""

    def engine_for(self, model: str | None) -> str | None:
        """The engine a request naming ``model`` reaches (by its name, an alias or the name its model is
        served under; the default engine for none), or None for a name no engine answers to."""

    def try_pass(self, model: str | None) -> Upstream | None:
        """The engine for ``model`` when the daemon has said that requests for it go straight on (a
        pass, ``policies.frontdoor.gateway_may_pass``), counted as let through; None when the
        request must ``acquire`` (the daemon decides: a swap, a start, a refusal, an unknown name)."""


class PassingBackend(DaemonCalls, Protocol):
    """Protocol: the daemon's side of the process split, which also hands the gateway its passes."""

    def routes(self) -> dict[str, str]:
        """Every model name a request may give (engine names, aliases, served model names), and the
        engine it reaches; a request that names none goes to ``default_engine()``."""

    def passes(self) -> dict[str, Upstream]:
        """The engines whose requests may go straight on now, per ``gateway_may_pass``."""

    def let_through(self, engine: str) -> None:
        """The gateway let a request through to ``engine`` on its pass: it is on its way there."""


def bind_listen(host: str, port: int, *, setting: str = "[gateway] listen") -> socket.socket:
    """The gateway's listening socket (GatewayListenFailed with the reason when it cannot be had); ``setting``
    names the config key that chose the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle and delayed ACKs add ~40 ms to every response sent in two writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this fixed send buffer. Left to autotuning, the kernel takes
        # megabytes from us for a client that reads nothing, so the gateway would see that client
        # "drain" for minutes and never cut it; 64 KiB (doubled by Linux) still streams at full speed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CLIENT_SNDBUF_BYTES)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise GatewayListenFailed(
            f"the {'gateway' if setting == '[gateway] listen' else 'daemon'} cannot listen on {host}:{port}: "
            f"{exc.strerror or exc}; choose another {setting} address or stop what holds it"
        ) from exc
    sock.setblocking(False)
    return sock


def listen_text(sock: socket.socket) -> str:
    """``host:port`` of a listening socket (``[host]:port`` for IPv6)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
