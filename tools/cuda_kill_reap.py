#!/usr/bin/env python3
"""SIGKILL -> reaped, for a bare process with and without a CUDA context: no supervisor involved.

Run on a GPU machine with torch (``python3 tools/cuda_kill_reap.py``): each case starts a child that
allocates N bytes on the GPU (none for the CPU case), SIGKILLs it, and times until ``waitpid``
returns, 5 times. Writes ``$OUT/cuda-kill-reap.json`` (or /tmp). This is the floor under the
daemon's SIGKILL -> ``engine.exited`` figure for a CUDA engine: the kernel reports the exit only
once the process has closed its files, the NVIDIA driver's among them.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

CHILD_CPU = "import time; print('up', flush=True); time.sleep(1000)"
CHILD_CUDA = ("import sys, time, torch; x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device='cuda'); "
              "torch.cuda.synchronize(); print('up', flush=True); time.sleep(1000)")
CASES = [("cpu python", CHILD_CPU, ()), ("cuda 64MB", CHILD_CUDA, (str(64 * 2**20),)),
         ("cuda 8GB", CHILD_CUDA, (str(8 * 2**30),)), ("cuda 40GB", CHILD_CUDA, (str(40 * 2**30),))]


def once(code: str, *args: str) -> float:
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "up"
    time.sleep(0.3)
    started = time.perf_counter()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    out = {}
    for name, code, args in CASES:
        times = [once(code, *args) for _ in range(5)]
        out[name] = {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
                     "all": [round(t, 1) for t in times]}
        print(name, out[name], flush=True)
    where = os.environ.get("OUT", "/tmp")
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "cuda-kill-reap.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
