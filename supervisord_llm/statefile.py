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
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
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


def move_aside(path: Path, problem: str) -> str:
    """Keep a damaged state file for inspection as ``<name>.corrupt-<n>``; returns the warning text."""
    return _move_aside(Path(path), problem)


def state_shape_problem(data: dict[str, Any]) -> str | None:
    """What makes ``state.json`` unusable although it is valid JSON (None when its shape is right).

    A file of the wrong shape (hand-edited, written by another version) is treated like a damaged
    one: the loader would otherwise fail at start on the first field it reads.
    """
    engines = data.get("engines", {})
    if not isinstance(engines, dict):
        return f"'engines' is a {type(engines).__name__}, expected an object of engine records"
    kinds: dict[str, tuple[type, ...]] = {
        "pid": (int,), "create_time": (int, float), "tag": (str,), "argv": (list,), "state": (str,),
        "restarts": (int,), "backoff": (dict,), "last_exit": (dict,),
    }
    for name, record in engines.items():
        if not isinstance(record, dict):
            return f"engines.{name} is a {type(record).__name__}, expected an object"
        for key, types in kinds.items():
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                return f"engines.{name}.{key} is {value!r}, expected {' or '.join(t.__name__ for t in types)}"
    swap = data.get("swap")
    if swap is not None and not (isinstance(swap, dict) and isinstance(swap.get("target"), str)
                                 and isinstance(swap.get("from") or [], list)):
        return f"'swap' is {swap!r}, expected null or an object with a target"
    for key, value in data.items():
        if key not in ("version", "daemon_pid", "engines", "swap") and value is not None and not isinstance(value, dict):
            return f"{key!r} is a {type(value).__name__}, expected an object"
    return None
