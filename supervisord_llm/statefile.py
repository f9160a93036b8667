"""Durable JSON state: written atomically (temp file, fsync, rename), read defensively.

A truncated or garbage state file must never stop the daemon: it is moved aside as
``<name>.corrupt-<n>`` (kept for inspection), an event says so, and the daemon starts from empty state,
finding its engines again through their process tags.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_json(path: Path) -> tuple[dict[str, Any], str | None]:
    """Return (data, problem). A missing file is ({}, None); a bad one is moved aside: ({}, problem)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        return {}, _move_aside(path, f"unreadable: {exc}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, _move_aside(path, f"not valid JSON ({exc.msg} at line {exc.lineno})")
    if not isinstance(data, dict):
        return {}, _move_aside(path, f"expected a JSON object, got {type(data).__name__}")
    return data, None


def _move_aside(path: Path, problem: str) -> str:
    n = 0
    while True:
        target = path.with_name(f"{path.name}.corrupt-{n}")
        if not target.exists():
            break
        n += 1
    try:
        os.replace(path, target)
        return f"{path} was {problem}; moved it to {target.name} and started from empty state"
    except OSError:
        return f"{path} was {problem}; started from empty state"
