"""Import hook for a real daemon: shows which process and thread run the gateway's code, and can block it.

Put this directory on the daemon's ``PYTHONPATH`` with ``GATEWAY_PROBE_DIR=DIR``. Python imports
``sitecustomize`` at start-up; this one waits for ``supervisord_llm.gateway.proxy`` to be imported
(other processes that inherit the path, such as the engine, never import it and are not touched)
and then wraps two of its functions:

- ``_Gateway.forward`` (every proxied request) and ``TokenMeter.feed`` (every chunk read from the
  engine): the first call on each thread of each process appends ``{"fn", "pid", "thread", "main"}``
  to ``DIR/threads.jsonl`` (``main``: the process's main thread);
- a request with the header ``x-probe-block`` makes ``forward`` block its thread with a plain
  ``time.sleep`` loop (a wedged event loop, as a blocking call in the gateway would make it): it
  writes ``DIR/blocked`` and holds until ``DIR/release`` exists (at most 90 s).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time

_DIR = os.environ.get("GATEWAY_PROBE_DIR")
_TARGET = "supervisord_llm.gateway.proxy"
_seen: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _note(fn: str) -> None:
    thread = threading.current_thread()
    key = (fn, f"{os.getpid()}/{thread.name}")
    if key in _seen:
        return
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
        with open(os.path.join(_DIR, "threads.jsonl"), "a") as f:
            f.write(json.dumps({"fn": fn, "pid": os.getpid(), "thread": thread.name,
                                "main": thread is threading.main_thread()}) + "\n")


def _block() -> None:
    """Blocks the calling thread, and with it the event loop running there: the fault under test."""
    open(os.path.join(_DIR, "blocked"), "w").close()
    deadline = time.monotonic() + 90
    while not os.path.exists(os.path.join(_DIR, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _patch(module) -> None:  # type: ignore[no-untyped-def]
    forward, feed = module._Gateway.forward, module.TokenMeter.feed

    async def probed_forward(self, request):  # type: ignore[no-untyped-def]
        _note("forward")
        if "x-probe-block" in request.headers:
            _block()
        return await forward(self, request)

    def probed_feed(self, chunk, at_s):  # type: ignore[no-untyped-def]
        _note("feed")
        return feed(self, chunk, at_s)

    module._Gateway.forward = probed_forward
    module.TokenMeter.feed = probed_feed


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
