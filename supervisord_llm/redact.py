"""Secrets stay with the daemon: what engines inherit, and what records show of their command lines.

* Engines get the daemon's environment without the daemon's own secrets: the values behind
  ``url_env``/``secret_env`` (webhooks, their headers) and ``api_key_env`` (the gateway). An engine
  runs third-party code that logs and reports its environment freely; it needs none of these.
  Variables a person set for the engine (``env = {...}``) are passed on as written.
* Engine argv is recorded (events.jsonl, the daemon's log, state.json, status) with secret-looking
  values replaced by ``***``: the value after ``--api-key``/``--token``/``--password``-like flags,
  ``--flag=value`` and ``NAME=value`` forms of them, well-known token prefixes and URL passwords.
  The process still gets its real argv; only what is written about it is redacted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASK = "***"
# Normalised names (lower case, "_" as "-") of flags and variables whose value is a secret. Counts
# and paths that merely contain such a word (--max-tokens, --tokenizer, --ssl-keyfile) do not match.
_SECRET_NAME = re.compile(r"(^|-)(api-?key|token|secret|secret-key|password|passwd|auth|authorization|"
                          r"credentials?|access-key|private-key)$")
_TOKEN_VALUE = re.compile(r"^(sk-[A-Za-z0-9_-]{12,}|hf_[A-Za-z0-9]{10,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                          r"xox[abprs]-[A-Za-z0-9-]{10,}|Bearer\s+\S+)$")
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)([^@/\s]+)(@)")


def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.lower().lstrip("-").replace("_", "-")))


def _redact_value(value: str) -> str:
    if _TOKEN_VALUE.match(value):
        return MASK
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), value)


def redact_argv(argv: Sequence[str] | None) -> list[str]:
    """``argv`` as it may be shown and stored: secret values replaced by ``***``."""
    out: list[str] = []
    mask_next = False
    for arg in argv or ():
        arg = str(arg)
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        name, eq, _ = arg.partition("=")
        if arg.startswith("-") and _secret_name(name):
            if eq:
                out.append(f"{name}={MASK}")
            else:
                out.append(arg)
                mask_next = True
            continue
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and _secret_name(name):
            out.append(f"{name}={MASK}")
            continue
        out.append(_redact_value(arg))
    return out


def redact_command(command: str | None) -> str | None:
    """A command line as one string (a port holder's, an orphan's), redacted like argv."""
    if command is None:
        return None
    return " ".join(redact_argv(command.split(" ")))


def daemon_secret_values(config: Any) -> frozenset[str]:
    """The secret values the daemon holds: webhook URLs, secrets and header values, the gateway key."""
    values: set[str] = set()
    alerts = getattr(config, "alerts", None)
    for target in getattr(alerts, "targets", None) or ():
        values.add(target.url)
        if target.secret:
            values.add(target.secret)
        values.update(str(v) for v in (target.headers or {}).values())
    gateway = getattr(config, "gateway", None)
    if gateway is not None and getattr(gateway, "api_key", None):
        values.add(gateway.api_key)
    return frozenset(v for v in values if v)


def engine_environment(inherited: Mapping[str, str], secret_values: Iterable[str]) -> dict[str, str]:
    """``inherited`` without any variable that holds (or contains) one of the daemon's secrets."""
    secrets = [s for s in secret_values if len(s) >= 6]
    return {k: v for k, v in inherited.items() if not any(s == v or s in v for s in secrets)}


__all__ = ["MASK", "daemon_secret_values", "engine_environment", "redact_argv", "redact_command"]
