"""llama.cpp's real CUDA ``llama-server`` supervised by the real daemon on one and on two real GPUs.

Needs ``SUPERVISORD_LLM_LLAMA_SERVER_CUDA`` (a llama-server built with ``tools/build_engines.sh
--cuda``) and ``SUPERVISORD_LLM_GPU_GGUF`` (a model from ``tools/make_tiny_gguf.py``; the run in
docs/gpu-validation.md used ``--hidden 1024 --layers 32 --heads 8 --kv-heads 8 --ff 2816 --ctx 65536
--f16``, 0.95 GB, whose KV cache takes 128 KiB per token of ``-c``). The tests read NVML themselves,
independently of the daemon. Tests marked ``two_gpus`` are skipped where NVML sees fewer than two.
Set ``GPU_VALIDATION_OUT`` to also write the measurements as JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import free_port

pynvml = pytest.importorskip("pynvml")
try:
    pynvml.nvmlInit()
except Exception as exc:  # NVMLError subclasses; the message itself needs the library
    pytest.skip(f"needs an NVIDIA GPU with its driver (NVML: {type(exc).__name__})", allow_module_level=True)
SERVER = Path(os.environ.get("SUPERVISORD_LLM_LLAMA_SERVER_CUDA", "/nonexistent"))
MODEL = Path(os.environ.get("SUPERVISORD_LLM_GPU_GGUF", "/nonexistent"))
if not (SERVER.is_file() and MODEL.is_file()):
    pytest.skip("needs SUPERVISORD_LLM_LLAMA_SERVER_CUDA and SUPERVISORD_LLM_GPU_GGUF", allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
DEVICES = pynvml.nvmlDeviceGetCount()
two_gpus = pytest.mark.skipif(DEVICES < 2, reason="needs two GPUs")
MIB = 1024 * 1024
GIB = 1024 * MIB
KV_BYTES_PER_TOKEN = 32 * 2 * 1024 * 2  # layers × (K, V) × kv width × f16, for the model above
HEAD = '[probes]\ninterval = "1s"\n\n[policies.memory]\nheadroom = "1GB"\n\n'


def nvml_processes() -> dict[int, dict[int, int]]:
    """{device index: {pid: used bytes}} straight from NVML."""
    out = {}
    for i in range(DEVICES):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        out[i] = {int(p.pid): int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    return out


def nvml_used() -> list[int]:
    return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used) for i in range(DEVICES)]


class Sampler(threading.Thread):
    """NVML every ``interval_s`` on every device: (wall time, {device: {pid: bytes}})."""

    def __init__(self, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, dict[int, int]]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.time(), nvml_processes()))
            self._halt.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self.start()
        time.sleep(self.interval_s * 2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(5)

    def last_seen(self, pid: int, device: int) -> float | None:
        times = [t for t, procs in self.samples if procs.get(device, {}).get(pid, 0) > 0]
        return times[-1] if times else None


def _wall(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s}s")


def record(name: str, data: dict) -> None:
    print(f"\n=== {name} ===")
    for key, value in data.items():
        print(f"{key}: {value}")
    out = os.environ.get("GPU_VALIDATION_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "gpu-results.jsonl", "a") as f:
            f.write(json.dumps({"test": name, **data}) + "\n")


def llama_toml(name: str, devices: list[int], ctx: int, *args: str, **keys: object) -> str:
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "llama_cpp"', f'model = "{MODEL}"', f"port = {free_port()}",
             f"command = [{json.dumps(str(SERVER))}]",
             "args = [" + ", ".join(json.dumps(a) for a in ("-ngl", "99", "-c", str(ctx), *args)) + "]",
             f"gpu_devices = {json.dumps(devices)}"]
    # Host RAM: a CUDA llama-server keeps 0.7-2.7 GB resident (pinned staging buffers), and the memory
    # guard holds an engine to its footprint.
    keys.setdefault("footprint", "8GB")
    keys.setdefault("stop_grace", "20s")
    keys.setdefault("start_timeout", "120s")
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def xid_clean(d) -> dict:
    """The XID watcher is alive on every device with no error and no event."""
    probe = d.status()["system"]["gpu_probe"]
    xid = probe["xid"]
    assert xid["running"] is True and xid["registered_devices"] == list(range(DEVICES)), xid
    assert xid["reason"] is None and xid["last_error"] is None and xid["events"] == 0, xid
    assert not [e for e in d.events() if e["kind"] in ("gpu.xid", "gpu.xid_failed", "probe.failed")]
    assert "Traceback" not in d.stderr(), d.stderr()
    return xid


def _status_processes(d) -> dict[int, dict[int, str | None]]:
    return {g["index"]: {p["pid"]: p["engine"] for p in g["processes"]} for g in d.status()["system"]["gpus"]}


# ---- issue 13: one GPU ------------------------------------------------------------------------


def test_h_llama_server_on_the_gpu_is_attributed_and_its_memory_returns_after_sigkill(daemon_factory) -> None:
    """A real llama-server with -ngl 99 holds its weights and KV cache on GPU 0, attributed to it; SIGKILL frees them."""
    ctx = 65536
    d = daemon_factory(HEAD + llama_toml("gpu-llama", [0], ctx, gpu_footprint="12GB")).start()
    engine = d.wait_state("gpu-llama", "ready", 120)
    pid = engine["pid"]
    held = _wait(lambda: (b := nvml_processes()[0].get(pid, 0)) >= ctx * KV_BYTES_PER_TOKEN and b, 20,
                 "the engine's KV cache in NVML")
    others = {i: procs.get(pid) for i, procs in nvml_processes().items() if i != 0}
    status = _wait(lambda: abs(((e := d.engine("gpu-llama"))["memory"]["gpu_bytes"] or 0) - held) <= 64 * MIB and e, 20,
                   "status gpu_bytes at NVML's figure")
    owners = _status_processes(d)
    used_before = nvml_used()[0]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    gone_s = back_s = None
    while time.monotonic() - t0 < 30 and (gone_s is None or back_s is None):
        now = time.monotonic() - t0
        if gone_s is None and pid not in nvml_processes()[0]:
            gone_s = now
        if back_s is None and nvml_used()[0] <= used_before - held + 64 * MIB:
            back_s = now
        time.sleep(0.005)
    after = d.wait_state("gpu-llama", {"backoff", "failed"}, 10)
    released = _wait(lambda: [e for e in d.events() if e["kind"] == "gpu.memory_released"
                              and e["engine"] == "gpu-llama"], 10, "gpu.memory_released")
    record("h_llama_server_gpu", {
        "ctx": ctx, "kv_cache_bytes": ctx * KV_BYTES_PER_TOKEN, "nvml_pid_bytes_device0": held,
        "nvml_pid_on_other_devices": others, "status_gpu_bytes": status["memory"]["gpu_bytes"],
        "status_owner": owners[0].get(pid), "sigkill_nvml_pid_gone_s": gone_s and round(gone_s, 4),
        "sigkill_used_back_s": back_s and round(back_s, 4), "last_exit": after["last_exit"],
        "release_event": released[0],
    })
    assert owners[0].get(pid) == "gpu-llama"
    assert abs(status["memory"]["gpu_bytes"] - held) <= 64 * MIB
    assert all(v is None for v in others.values()), "gpu_devices = [0] must keep the engine off the other GPUs"
    assert gone_s is not None and back_s is not None and back_s < 10
    assert after["last_exit"]["signal"] == "SIGKILL" and released[0]["bytes"] >= ctx * KV_BYTES_PER_TOKEN
    xid_clean(d)


def test_i_exclusive_switch_between_two_real_gpu_engines_never_holds_both(daemon_factory) -> None:
    """`switch` between two real llama-servers on GPU 0: NVML (every 50 ms) never shows both; B starts after A's memory is back."""
    ctx = 262144  # 32 GiB of KV cache each
    cfg = (HEAD + llama_toml("llama-a", [0], ctx, exclusive=True, default=True, gpu_footprint="40GB")
           + llama_toml("llama-b", [0], ctx, exclusive=True, gpu_footprint="40GB"))
    d = daemon_factory(cfg).start()
    a = d.wait_state("llama-a", "ready", 120)["pid"]
    _wait(lambda: nvml_processes()[0].get(a, 0) >= ctx * KV_BYTES_PER_TOKEN, 20, "A's memory in NVML")
    with Sampler(0.05) as sampler:
        t0 = time.time()
        out = d.llmctl("switch", "llama-b", timeout=180)
        assert out.returncode == 0, out.stderr
        b = d.wait_state("llama-b", "ready", 30)["pid"]
        _wait(lambda: nvml_processes()[0].get(b, 0) >= ctx * KV_BYTES_PER_TOKEN, 20, "B's memory in NVML")
    both = [t for t, procs in sampler.samples if procs[0].get(a, 0) > 0 and procs[0].get(b, 0) > 0]
    events = d.events()
    spawned_b = [e for e in events if e["kind"] == "engine.spawned" and e["engine"] == "llama-b"][0]
    released_a = [e for e in events if e["kind"] == "gpu.memory_released" and e["engine"] == "llama-a"]
    finished = [e for e in events if e["kind"] == "swap.finished"][-1]
    a_last = sampler.last_seen(a, 0)
    record("i_exclusive_switch_one_gpu", {
        "samples": len(sampler.samples), "samples_with_both": len(both),
        "a_last_seen_ms": a_last and round((a_last - t0) * 1000), "b_spawned_ms": round((_wall(spawned_b) - t0) * 1000),
        "a_release_event": released_a[0] if released_a else None, "swap": finished,
    })
    assert not both
    # The proof is NVML's, sampled by the test: B was spawned after A's memory left the device. The
    # daemon's own gpu.memory_released event is recorded, not required (one run of k lacked it).
    assert a_last is not None and _wall(spawned_b) >= a_last - 0.002
    xid_clean(d)


# ---- issue 19: two GPUs -----------------------------------------------------------------------


@two_gpus
def test_j_two_engines_pinned_one_per_gpu_and_a_third_that_fits_nowhere_is_refused(daemon_factory) -> None:
    """Two real llama-servers, gpu_devices [0] and [1], both resident, each attributed on its own device only; a third that fits on neither is refused."""
    ctx = 131072
    head = HEAD.replace('headroom = "1GB"\n', 'headroom = "1GB"\nadmission_wait = "2s"\n')
    cfg = (head + llama_toml("on-0", [0], ctx, gpu_footprint="20GB") + llama_toml("on-1", [1], ctx, gpu_footprint="20GB")
           + llama_toml("too-big", [0, 1], 8192, gpu_footprint="145GB", autostart=False))
    d = daemon_factory(cfg).start()
    p0 = d.wait_state("on-0", "ready", 120)["pid"]
    p1 = d.wait_state("on-1", "ready", 120)["pid"]
    procs = _wait(lambda: (p := nvml_processes())[0].get(p0, 0) >= ctx * KV_BYTES_PER_TOKEN
                  and p[1].get(p1, 0) >= ctx * KV_BYTES_PER_TOKEN and p, 20, "both engines' memory in NVML")
    owners = _wait(lambda: (o := _status_processes(d)).get(0, {}).get(p0) and o.get(1, {}).get(p1) and o, 20,
                   "attribution in status")
    assert d.post("/v1/engines/too-big/start").status_code == 200
    refused = _wait(lambda: [e for e in d.events() if e["kind"] == "policy.decided" and e.get("engine") == "too-big"
                             and e["decision"] == "refuse"], 30, "the refusal of too-big")
    record("j_pinned_one_per_gpu", {
        "nvml": {i: {pid: b for pid, b in m.items() if pid in (p0, p1)} for i, m in procs.items()},
        "status_owners": owners, "on_0": d.engine("on-0")["memory"], "on_1": d.engine("on-1")["memory"],
        "too_big_refusal": {k: refused[0][k] for k in ("reason", "message")},
    })
    assert p1 not in procs[0] and p0 not in procs[1], "each engine sees only its own GPU"
    assert owners[0][p0] == "on-0" and owners[1][p1] == "on-1"
    assert refused[0]["reason"] == "gpu" and "on GPU" in refused[0]["message"] and "free" in refused[0]["message"]
    assert not [e for e in d.events() if e["kind"] == "engine.spawned" and e["engine"] == "too-big"]
    xid_clean(d)


@two_gpus
def test_k_engine_spanning_both_gpus_then_exclusive_switch_to_a_one_gpu_engine(daemon_factory) -> None:
    """A llama-server split over GPUs 0 and 1 is attributed on both; switching to a GPU-1 engine never holds both on either device."""
    ctx = 262144
    cfg = (HEAD + llama_toml("span", [0, 1], ctx, "--split-mode", "layer", exclusive=True, default=True,
                             gpu_footprint="24GB")
           + llama_toml("single", [1], ctx, exclusive=True, gpu_footprint="40GB"))
    d = daemon_factory(cfg).start()
    s = d.wait_state("span", "ready", 120)["pid"]
    procs = _wait(lambda: (p := nvml_processes())[0].get(s, 0) > 4 * GIB and p[1].get(s, 0) > 4 * GIB and p, 20,
                  "span's memory on both devices")
    owners = _wait(lambda: (o := _status_processes(d)).get(0, {}).get(s) and o.get(1, {}).get(s) and o, 20,
                   "attribution of span on both devices")
    span_status = d.engine("span")["memory"]
    with Sampler(0.05) as sampler:
        t0 = time.time()
        out = d.llmctl("switch", "single", timeout=180)
        assert out.returncode == 0, out.stderr
        n = d.wait_state("single", "ready", 30)["pid"]
        _wait(lambda: nvml_processes()[1].get(n, 0) >= ctx * KV_BYTES_PER_TOKEN, 20, "single's memory in NVML")
    both = [(t, dev) for t, p in sampler.samples for dev in p if p[dev].get(s, 0) > 0 and p[dev].get(n, 0) > 0]
    events = d.events()
    spawned = [e for e in events if e["kind"] == "engine.spawned" and e["engine"] == "single"][0]
    released = [e for e in events if e["kind"] == "gpu.memory_released" and e["engine"] == "span"]
    last = {dev: sampler.last_seen(s, dev) for dev in (0, 1)}
    single_devices = {dev: p.get(n) for dev, p in nvml_processes().items()}
    record("k_span_then_switch", {
        "span_nvml": {i: m.get(s) for i, m in procs.items()}, "span_status_memory": span_status,
        "status_owners": {i: o.get(s) for i, o in owners.items()}, "samples": len(sampler.samples),
        "samples_with_both": len(both), "span_last_seen_ms": {k: v and round((v - t0) * 1000) for k, v in last.items()},
        "single_spawned_ms": round((_wall(spawned) - t0) * 1000), "span_release_event": released[0] if released else None,
        "single_nvml": single_devices,
    })
    assert owners[0][s] == "span" and owners[1][s] == "span"
    assert span_status["gpu_bytes"] >= procs[0][s] + procs[1][s] - 64 * MIB, "status sums both devices"
    assert not both
    assert all(v is not None and _wall(spawned) >= v - 0.002 for v in last.values()), \
        "single started while a device still showed span's memory"
    assert single_devices[0] is None, "gpu_devices = [1] keeps single off GPU 0"
    xid_clean(d)


@two_gpus
def test_l_device_indices_nvml_order_is_what_the_engine_environment_selects() -> None:
    """gpu_devices are NVML indices; with the daemon's CUDA_DEVICE_ORDER=PCI_BUS_ID, CUDA_VISIBLE_DEVICES=i is NVML's device i."""
    nvml = []
    for i in range(DEVICES):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        nvml.append((i, pynvml.nvmlDeviceGetPciInfo(h).busId, uuid.decode() if isinstance(uuid, bytes) else uuid))
    probe = "import torch; print('GPU-' + str(torch.cuda.get_device_properties(0).uuid))"
    seen = {}
    for order in ("PCI_BUS_ID", "FASTEST_FIRST"):
        for i in range(DEVICES):
            env = {**os.environ, "CUDA_DEVICE_ORDER": order, "CUDA_VISIBLE_DEVICES": str(i)}
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
            seen[f"{order} CUDA_VISIBLE_DEVICES={i}"] = out.stdout.strip() or out.stderr[-200:]
    record("l_device_order", {"nvml": nvml, "cuda": seen})
    for i, _, uuid in nvml:
        assert seen[f"PCI_BUS_ID CUDA_VISIBLE_DEVICES={i}"] == uuid
