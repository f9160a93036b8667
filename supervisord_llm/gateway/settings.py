"""The gateway's settings: the ``[gateway]`` table, read with the config's one table reader.

Room: gateway.

Every key is read by :class:`supervisord_llm.configtable.Table`, so a mistake names the file, the
key and what would be valid, as in every other section. A new key is one entry in ``_READERS``
(the TOML key, and how its value is read) plus its field on :class:`GatewaySettings`; a key whose
field has another name (``listen``, ``api_key_env``) is read in :func:`read_gateway`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.frontdoor import SwapPermission, host_name_error, origin_pattern_error
from supervisord_llm.configtable import Table
from supervisord_llm.errors import ConfigError
from supervisord_llm.gateway.anthropic import THINK_MODES

_LISTEN_HELP = 'an address "HOST:PORT" such as "127.0.0.1:8000" or "[::1]:8000" (port 0-65535)'


def parse_listen(value: object) -> tuple[str, int]:
    """``"127.0.0.1:8000"`` → ``("127.0.0.1", 8000)``; ValueError names what is valid."""
    if not isinstance(value, str):
        raise ValueError(f"expected {_LISTEN_HELP}, got {type(value).__name__} {value!r}")
    match = re.fullmatch(r"\s*(?:\[([0-9a-fA-F:.]+)\]|([^:\s\[\]]+)):(\d{1,5})\s*", value)
    if not match:
        raise ValueError(f"expected {_LISTEN_HELP}, got {value!r}")
    host = match.group(1) or match.group(2)
    port = int(match.group(3))
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port} in {value!r}")
    return host, port


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's settings; values validate themselves when constructed (ValueError)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    hold_s: float = 120.0
    max_body_bytes: int = 32 * 2**20
    prefill_stall_s: float = 300.0
    # A long prompt earns a longer prefill deadline: seconds per MiB of request body on top of
    # prefill_stall_s (hundreds of thousands of prompt tokens take many minutes on a Mac).
    prefill_per_mib_s: float = 512.0
    decode_stall_s: float = 60.0
    client_timeout_s: float = 300.0
    client_buffer_bytes: int = 2**20
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    max_upstream_connections: int = 512
    shutdown_grace_s: float = 5.0
    # Who may make the daemon start or swap an engine by naming a model (policies.frontdoor).
    swaps: str = "allowed"
    # Requests handled at once by the whole gateway; beyond it a JSON 503 (each proxied stream holds
    # two file descriptors: the gateway raises its soft limit on open files to match, gateway/worker.py).
    max_connections: int = 512
    # A client must have sent its whole request body within this long (a slow or stuck upload
    # would otherwise hold a connection and a buffer indefinitely).
    body_timeout_s: float = 60.0
    # What <think>…</think> from reasoning models becomes in translated Messages responses:
    # "text" (kept in the text as emitted), "thinking" (thinking blocks), "auto" (thinking blocks
    # when the request enables thinking).
    think_tags: str = "text"
    # A plain non-streamed chat or text completion for an engine without a step counter is fetched as a
    # stream and rebuilt, so the watchdog sees its tokens (policies.frontdoor.fetch_as_stream).
    watch_non_streamed: bool = True
    # A client must have sent a request's headers within this long of opening the connection (or of
    # its previous response); else 408 and the connection is closed (gateway/headers.py).
    header_timeout_s: float = 10.0
    # A streaming request held while its engine loads gets an SSE comment this often (gateway/hold.py).
    hold_keepalive_s: float = 5.0
    # Web pages (browser origins) that may use the gateway besides those served from this machine
    # (policies.frontdoor.DEFAULT_ALLOWED_ORIGINS); "*": any site.
    allowed_origins: tuple[str, ...] = ()
    # Host names a gateway on loopback answers besides IP addresses, localhost, *.localhost, *.local,
    # *.internal and this machine's name (policies.frontdoor.host_allowed): a proxy's or a tunnel's; "*": any.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.think_tags not in THINK_MODES:
            raise ValueError(
                f"think_tags must be one of {', '.join(repr(m) for m in THINK_MODES)}, got {self.think_tags!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError(
                "api_key must not be empty; leave it out to accept requests without a key"
            )
        for name in (
            "prefill_stall_s",
            "decode_stall_s",
            "client_timeout_s",
            "upstream_connect_timeout_s",
            "upstream_read_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        if self.hold_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("hold_s and shutdown_grace_s cannot be negative")
        if self.prefill_per_mib_s < 0:
            raise ValueError(
                f"prefill_per_mib_s must be 0 or more seconds per MiB, got {self.prefill_per_mib_s!r}"
            )
        if self.client_buffer_bytes < MIN_CLIENT_BUFFER_BYTES:
            raise ValueError(
                f"client_buffer_bytes must be at least 4096 (4KiB), got {self.client_buffer_bytes}"
            )
        if self.max_body_bytes < MIN_BODY_BYTES:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.swaps not in tuple(SwapPermission):
            raise ValueError(f"swaps must be one of {', '.join(repr(p.value) for p in SwapPermission)}, got {self.swaps!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("body_timeout_s", "header_timeout_s", "hold_keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        for pattern in self.allowed_origins:
            problem = origin_pattern_error(pattern)
            if problem is not None:
                raise ValueError(f"allowed_origins: {pattern!r}: {problem}")
        for name in self.allowed_hosts:
            problem = host_name_error(name)
            if problem is not None:
                raise ValueError(f"allowed_hosts: {problem}")
        if self.max_upstream_connections < 1:
            raise ValueError(
                f"max_upstream_connections must be at least 1, got {self.max_upstream_connections}"
            )

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_toml(
        cls,
        table: Mapping[str, Any],
        *,
        file: str | None,
        key: str = "gateway",
        environ: Mapping[str, str] | None = None,
    ) -> GatewaySettings:
        """Build from the ``[gateway]`` TOML table; every error names the file, the key and what is valid.

        Keys: ``enabled``, ``listen``, ``api_key`` or ``api_key_env`` (name of an environment
        variable holding the key), ``hold_s``, ``max_body_bytes``, ``prefill_stall_s``,
        ``decode_stall_s``, ``prefill_per_mib_s``, ``client_timeout_s``, ``client_buffer_bytes``,
        ``upstream_connect_timeout_s``, ``upstream_read_timeout_s``, ``max_upstream_connections``,
        ``max_connections``, ``body_timeout_s``, ``shutdown_grace_s``, ``swaps``, ``think_tags``,
        ``header_timeout_s``, ``hold_keepalive_s``, ``allowed_origins``, ``allowed_hosts``,
        ``watch_non_streamed``.
        Durations are ``"60s"``/``"5m"`` or seconds; sizes are ``"32MiB"`` or bytes.
        """
        return read_gateway(Table(table, file, key), os.environ if environ is None else environ)


MIN_CLIENT_BUFFER_BYTES = 4096
MIN_BODY_BYTES = 1024


def _size_at_least(minimum: int, unit_help: str) -> Callable[[Table, str], int]:
    def read(t: Table, name: str) -> int:
        value = t.size_bytes(name, 0) or 0
        if value < minimum:
            raise t.error(name, f"must be at least {minimum} ({unit_help}), got {t.data[name]!r}")
        return value
    return read


def _whole_at_least_1(t: Table, name: str) -> int:
    value = t.int(name, 1, min_value=1)
    assert value is not None  # it has a default
    return value


def _seconds_per_mib(t: Table, name: str) -> float:
    value = t.data[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise t.error(name, f"expected 0 or more seconds per MiB as a number such as 512, got {value!r}")
    return float(value)


def _origins(t: Table, name: str) -> tuple[str, ...]:
    value = t.data[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise t.error(name, f'expected a list of origins such as ["https://chat.example.com", "http://my-box.local:*"], '
                            f"got {value!r}")
    for pattern in value:
        problem = origin_pattern_error(pattern)
        if problem is not None:
            raise t.error(name, f"{pattern!r}: {problem}")
    return tuple(value)


def _host_names(t: Table, name: str) -> tuple[str, ...]:
    value = t.data[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise t.error(name, f'expected a list of host names such as ["llm.example.com"], got {value!r}')
    for host in value:
        problem = host_name_error(host)
        if problem is not None:
            raise t.error(name, problem)
    return tuple(value)


def _choice(choices: tuple[str, ...]) -> Callable[[Table, str], str]:
    def read(t: Table, name: str) -> str:
        value = t.data[name]
        if value not in choices:
            raise t.error(name, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return str(value)
    return read


# The [gateway] keys whose field has the same name, and how each is read (called only for keys present;
# an absent key keeps the field's default).
_READERS: dict[str, Callable[[Table, str], Any]] = {
    "enabled": lambda t, name: t.bool(name, True),
    "watch_non_streamed": lambda t, name: t.bool(name, True),
    "hold_s": lambda t, name: t.duration_s(name, 0),
    "shutdown_grace_s": lambda t, name: t.duration_s(name, 0),
    "prefill_stall_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "decode_stall_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "client_timeout_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "upstream_connect_timeout_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "upstream_read_timeout_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "body_timeout_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "header_timeout_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "hold_keepalive_s": lambda t, name: t.duration_s(name, 0, positive=True),
    "max_body_bytes": _size_at_least(MIN_BODY_BYTES, "1KiB"),
    "client_buffer_bytes": _size_at_least(MIN_CLIENT_BUFFER_BYTES, "4KiB"),
    "prefill_per_mib_s": _seconds_per_mib,
    "max_upstream_connections": _whole_at_least_1,
    "max_connections": _whole_at_least_1,
    "swaps": _choice(tuple(p.value for p in SwapPermission)),
    "think_tags": _choice(tuple(THINK_MODES)),
    "allowed_origins": _origins,
    "allowed_hosts": _host_names,
}
GATEWAY_KEYS = tuple(dict.fromkeys(("enabled", "listen", "api_key", "api_key_env", *_READERS)))


def read_gateway(t: Table, environ: Mapping[str, str]) -> GatewaySettings:
    """The ``[gateway]`` table as settings; ConfigError names the file, the key and what is valid."""
    t.check_unknown(GATEWAY_KEYS)
    kwargs: dict[str, Any] = {name: read(t, name) for name, read in _READERS.items() if t.has(name)}
    if t.has("listen"):
        kwargs["host"], kwargs["port"] = t.checked("listen", parse_listen)
    api_key, source = t.secret("api_key", environ)
    if api_key is not None:
        where = "the key" if source == "api_key" else "the environment variable"
        if not isinstance(api_key, str) or not api_key.strip():
            raise t.error(source, "expected a non-empty string (the key is never logged)"
                          if source == "api_key" else "the environment variable is empty; it must hold the key")
        if api_key != api_key.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F or ord(c) > 0x7E for c in api_key):
            # A client sends it in an HTTP header, which cannot carry these (a trailing newline from a key file
            # read into the variable is the usual one): no request could ever match it.
            raise t.error(source, f"{where} has leading or trailing whitespace, control characters or non-ASCII "
                                  "characters, which no client can send in an HTTP header; use printable ASCII "
                                  "(the key is never logged)")
        kwargs["api_key"] = api_key
    try:
        settings = GatewaySettings(**kwargs)
    except ValueError as exc:  # every key is checked above; this is the last line of defence
        raise ConfigError(str(exc), file=t.file, key=t.path) from exc
    if settings.enabled and settings.api_key is None and not is_loopback(settings.host):
        raise t.error("listen", f"{settings.listen} is reachable from other machines and the gateway has no API "
                                "key: anyone there could use and swap your models; set api_key (or api_key_env), "
                                "or listen on 127.0.0.1")
    if settings.swaps == SwapPermission.WITH_KEY and settings.api_key is None:
        raise t.error("swaps", '"with_key" needs the gateway to have an api_key (or api_key_env); '
                               'valid: "allowed", "with_key" with a key, "never"')
    return settings


def is_loopback(host: str) -> bool:
    """The host only this machine reaches (a name other than localhost is taken as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


__all__ = ["GATEWAY_KEYS", "GatewaySettings", "is_loopback", "parse_listen", "read_gateway"]
