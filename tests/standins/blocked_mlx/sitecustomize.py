"""Import hook for a real mlx_lm.server whose generation loop wedges after N requests.

Put this directory on the engine's ``PYTHONPATH`` with ``BLOCK_GENERATION_AFTER=N``: Python imports
``sitecustomize`` at start-up, and this one wraps ``queue.Queue.get`` so that when mlx_lm.server's
generation thread (``ResponseGenerator._run_generate``, mlx_lm/server.py 0.32) takes its request
number N+1 from ``self.requests``, it blocks for ever. The thread stays *alive*, so ``/health``
keeps answering 200 (it checks ``generation_thread.is_alive()``), the process runs and its HTTP
threads answer, but no request is ever answered again: the "server went silent while /health stayed
200" failure, on the real engine. Nothing else in the process is changed.
"""

from __future__ import annotations

import os
import queue
import threading

_after = int(os.environ.get("BLOCK_GENERATION_AFTER", "0") or 0)
_taken = 0
_original_get = queue.Queue.get


def _get(self, block=True, timeout=None):  # type: ignore[no-untyped-def]
    global _taken
    item = _original_get(self, block, timeout)
    target = getattr(threading.current_thread(), "_target", None)
    if _after and getattr(target, "__name__", "") == "_run_generate":
        _taken += 1
        if _taken > _after:
            print(f"blocked_mlx: generation loop wedged at request {_taken}", flush=True)
            threading.Event().wait()
    return item


queue.Queue.get = _get  # type: ignore[method-assign]
