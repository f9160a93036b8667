"""Logging setup: structlog to stderr, configured once per process.

The daemon's entry point calls :func:`configure_logging`; the gateway's process calls it again with
the same choices (``current()``), so both write the same format to the same stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_current: dict[str, Any] = {"level": "info", "json_logs": False}


def current() -> dict[str, Any]:
    """The level and format the last :func:`configure_logging` in this process chose."""
    return dict(_current)


def configure_logging(level: str, *, json_logs: bool) -> Any:
    """Configure structlog once, here in the entry point, and return the root bound logger."""
    _current.update(level=level, json_logs=json_logs)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_logs:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("supervisord_llm")
