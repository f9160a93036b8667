"""The NVIDIA path on a real GPU: the real daemon supervises engines that hold real GPU memory.

Each test runs ``supervisord-llm run`` (the ``Daemon`` harness) with engines of kind ``command``
running ``tests/gpu_engine.py`` (torch ``cudaMalloc`` allocations), and watches the GPU through
NVML from the test itself, independently of the daemon. Skipped where there is no NVIDIA driver or
torch sees no CUDA device.

Set ``GPU_VALIDATION_OUT`` to a directory to also get the timelines and measurements as JSON lines
(``gpu-results.jsonl``); ``-s`` prints them.
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

import psutil
import pytest

from tests.helpers import REPO, free_port

pynvml = pytest.importorskip("pynvml")
try:
    pynvml.nvmlInit()
except Exception as exc:  # NVMLError subclasses; the message itself needs the library
    pytest.skip(f"needs an NVIDIA GPU with its driver (NVML: {type(exc).__name__})", allow_module_level=True)
_torch_check = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"],
                              capture_output=True, text=True, timeout=120)
if _torch_check.returncode != 0:
    pytest.skip(f"needs torch with a CUDA device: {_torch_check.stderr.strip()[-200:]}", allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

MIB = 1024 * 1024
GIB = 1024 * MIB
PYTHON = sys.executable
GPU_ENGINE = REPO / "tests" / "gpu_engine.py"
# A CUDA context of a torch process is a few hundred MiB on top of what it allocates.
CONTEXT_SLACK_BYTES = 1536 * MIB


# ---- NVML seen from the test ------------------------------------------------------------------


def _handle(index: int = 0):
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_processes(index: int = 0) -> dict[int, int]:
    """{pid: used bytes} on one device, straight from NVML."""
    return {int(p.pid): int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(_handle(index))}


def nvml_memory(index: int = 0) -> tuple[int, int]:
    info = pynvml.nvmlDeviceGetMemoryInfo(_handle(index))
    return int(info.used), int(info.total)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSampler(threading.Thread):
    """Samples device 0 every ``interval_s``: wall time (to line up with daemon events), used bytes, pids."""

    def __init__(self, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, dict[int, int]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            used, _ = nvml_memory()
            self.samples.append((time.time(), used, nvml_processes()))
            self._halt.wait(self.interval_s)

    def __enter__(self) -> NvmlSampler:
        self.start()
        time.sleep(self.interval_s * 2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(5)

    def present(self, pid: int) -> list[float]:
        """Wall times of the samples in which ``pid`` held GPU memory."""
        return [t for t, _, procs in self.samples if procs.get(pid, 0) > 0]


def _event_wall(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def timeline(sampler: NvmlSampler, events: list[dict], labels: dict[int, str], t0: float,
             kinds: tuple[str, ...]) -> list[str]:
    """NVML changes (who holds memory, device used) merged with daemon events, relative to ``t0``."""
    rows: list[tuple[float, str]] = []
    last = None
    for t, used, procs in sampler.samples:
        holders = tuple(sorted(f"{labels.get(pid, pid)}={b / GIB:.2f}GiB" for pid, b in procs.items()
                               if pid in labels))
        key = (holders, round(used / GIB, 1))
        if key != last:
            rows.append((t, f"nvml   used={used / GIB:6.2f} GiB  holders: {', '.join(holders) or '-'}"))
            last = key
    for e in events:
        if e["kind"] in kinds:
            detail = {k: v for k, v in e.items() if k in ("engine", "to", "pid", "pids", "bytes", "after_exit_s",
                                                          "reason", "decision", "sigkilled", "took_s", "total_s",
                                                          "memory_released", "waited_s")}
            rows.append((_event_wall(e), f"daemon {e['kind']} {json.dumps(detail)}"))
    rows.sort(key=lambda r: r[0])
    return [f"{(t - t0) * 1000:+9.0f} ms  {text}" for t, text in rows]


def record(name: str, data: dict) -> None:
    print(f"\n=== {name} ===")
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], str):
            print(f"{key}:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key}: {value}")
    out = os.environ.get("GPU_VALIDATION_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "gpu-results.jsonl", "a") as f:
            f.write(json.dumps({"test": name, **data}) + "\n")


# ---- daemon config -----------------------------------------------------------------------------


def gpu_engine_toml(name: str, port: int, *extra: str, **keys: object) -> str:
    argv = [PYTHON, str(GPU_ENGINE), "--port", "{port}", *extra]
    lines = ["[[engine]]", f'name = "{name}"', 'kind = "command"', f"port = {port}",
             "command = [" + ", ".join(json.dumps(a) for a in argv) + "]", "gpu_devices = [0]"]
    keys.setdefault("footprint", "4GB")
    keys.setdefault("stop_grace", "10s")
    keys.setdefault("start_timeout", "180s")
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


HEAD = '[probes]\ninterval = "1s"\n\n[policies.memory]\nheadroom = "1GB"\n\n'


def xid_watcher_clean(d) -> dict:
    """The daemon's XID watcher thread is alive, watches every device and has reported no error."""
    probe = d.status()["system"]["gpu_probe"]
    xid = probe["xid"]
    count = pynvml.nvmlDeviceGetCount()
    assert probe["available"] is True, probe
    assert xid["running"] is True, xid
    assert xid["registered_devices"] == list(range(count)), xid
    assert xid["reason"] is None and xid["last_error"] is None, xid
    assert xid["events"] == 0, xid
    assert not [e for e in d.events() if e["kind"] in ("gpu.xid", "gpu.xid_failed", "probe.failed",
                                                        "probe.unavailable")]
    assert "Traceback" not in d.stderr(), d.stderr()
    return xid


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s}s")


def _status_gpu_processes(d) -> dict[int, dict]:
    gpus = d.status()["system"]["gpus"]
    return {p["pid"]: p for g in gpus if g["index"] == 0 for p in g["processes"]}


# ---- (a) ---------------------------------------------------------------------------------------


def test_a_probe_reports_the_device_and_the_engines_gpu_memory(daemon_factory) -> None:
    """Status shows the real GPU and the engine's `memory.gpu_bytes` ≈ its 2 GiB allocation plus its CUDA context."""
    alloc_mb = 2048
    d = daemon_factory(HEAD + gpu_engine_toml("small", free_port(), "--gpu-mb", str(alloc_mb))).start()
    pid = d.wait_state("small", "ready", 180)["pid"]
    engine = _wait(lambda: (e := d.engine("small"))["memory"]["gpu_bytes"] and
                   e["memory"]["gpu_bytes"] >= alloc_mb * MIB and e, 20, "gpu_bytes in status")
    gpu_bytes = engine["memory"]["gpu_bytes"]
    direct = nvml_processes().get(pid, 0)
    assert alloc_mb * MIB <= gpu_bytes <= alloc_mb * MIB + CONTEXT_SLACK_BYTES
    assert abs(gpu_bytes - direct) <= 64 * MIB, (gpu_bytes, direct)
    gpu = d.status()["system"]["gpus"][0]
    handle = _handle(0)
    used, total = nvml_memory()
    assert gpu["name"] == _text(pynvml.nvmlDeviceGetName(handle))
    assert gpu["uuid"] == _text(pynvml.nvmlDeviceGetUUID(handle))
    assert gpu["total_bytes"] == total and gpu["free_bytes"] + gpu["used_bytes"] <= total
    assert gpu["used_bytes"] >= gpu_bytes
    assert _status_gpu_processes(d)[pid]["engine"] == "small"
    admission = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("engine") == "small"]
    assert "per GPU on 0" in admission[-1]["message"], admission[-1]  # the GPU check used a real reading
    xid = xid_watcher_clean(d)
    record("a_probe_and_attribution", {
        "gpu": {k: gpu[k] for k in ("index", "name", "uuid", "total_bytes", "used_bytes", "free_bytes",
                                    "utilization_percent")},
        "allocation_bytes": alloc_mb * MIB, "status_gpu_bytes": gpu_bytes, "nvml_pid_bytes": direct,
        "context_overhead_mib": round((gpu_bytes - alloc_mb * MIB) / MIB, 1),
        "status_processes": gpu["processes"], "admission": admission[-1]["message"], "xid_watcher": xid,
    })


# ---- (b) ---------------------------------------------------------------------------------------


def test_b_switch_between_exclusive_engines_never_holds_both_on_the_gpu(daemon_factory) -> None:
    """`switch` between two exclusive engines that do not fit together: the new one starts after the old one's memory is back."""
    _, total = nvml_memory()
    big_mb = int(total * 0.55 / MIB)  # two of them exceed the card
    # The footprint is also checked against system RAM (admission); keep it inside what this machine has.
    ram_ok_mb = int((psutil.virtual_memory().available - 8 * GIB) / MIB)
    footprint_mb = min(big_mb, ram_ok_mb)
    cfg = (HEAD + gpu_engine_toml("big-a", free_port(), "--gpu-mb", str(big_mb), exclusive=True, default=True,
                                  footprint=f"{footprint_mb}MiB")
           + gpu_engine_toml("big-b", free_port(), "--gpu-mb", str(big_mb), exclusive=True,
                             footprint=f"{footprint_mb}MiB"))
    d = daemon_factory(cfg).start()
    a_pid = d.wait_state("big-a", "ready", 180)["pid"]
    assert d.engine("big-b")["state"] == "stopped"
    _wait(lambda: nvml_processes().get(a_pid, 0) >= big_mb * MIB, 20, "big-a's memory in NVML")
    with NvmlSampler(0.05) as sampler:
        t0 = time.time()
        response = d.post("/v1/switch", {"name": "big-b"}, timeout=300)
        assert response.status_code == 200, response.text
        b_pid = d.wait_state("big-b", "ready", 180)["pid"]
        _wait(lambda: nvml_processes().get(b_pid, 0) >= big_mb * MIB, 20, "big-b's memory in NVML")
        time.sleep(0.3)
    events = d.events()
    both = [t for t, _, procs in sampler.samples if procs.get(a_pid, 0) > 0 and procs.get(b_pid, 0) > 0]
    a_seen, b_seen = sampler.present(a_pid), sampler.present(b_pid)
    spawned_b = [e for e in events if e["kind"] == "engine.spawned" and e["engine"] == "big-b"]
    released_a = [e for e in events if e["kind"] == "gpu.memory_released" and e["engine"] == "big-a"]
    lines = timeline(sampler, events, {a_pid: "big-a", b_pid: "big-b"}, t0,
                     ("swap.started", "engine.stopped", "gpu.memory_released", "policy.decided", "engine.spawned",
                      "engine.state_changed", "swap.finished"))
    result = {
        "device_total_bytes": total, "allocation_each_bytes": big_mb * MIB, "footprint_each": f"{footprint_mb}MiB",
        "samples": len(sampler.samples), "sample_interval_s": sampler.interval_s,
        "samples_with_both": len(both),
        "a_last_seen_ms": round((a_seen[-1] - t0) * 1000) if a_seen else None,
        "b_spawned_ms": round((_event_wall(spawned_b[0]) - t0) * 1000) if spawned_b else None,
        "b_first_seen_ms": round((b_seen[0] - t0) * 1000) if b_seen else None,
        "swap": response.json(), "timeline": lines,
    }
    record("b_switch_exclusive", result)
    assert a_seen and b_seen, "the sampler saw both engines' memory"
    assert not both, "both engines held GPU memory at the same time"
    assert b_seen[0] > a_seen[-1]
    # Event times carry milliseconds (truncated): allow that much.
    assert len(spawned_b) == 1 and _event_wall(spawned_b[0]) >= a_seen[-1] - 0.002, \
        "big-b was spawned while NVML still showed big-a's memory"
    assert released_a and released_a[0]["seq"] < spawned_b[0]["seq"], "the daemon saw big-a's memory back first"
    xid_watcher_clean(d)


# ---- (c) ---------------------------------------------------------------------------------------


def test_c_sigkill_of_the_engine_returns_its_gpu_memory(daemon_factory) -> None:
    """SIGKILL of a GPU engine: NVML shows its memory free again within seconds (measured)."""
    alloc_mb = 4096
    d = daemon_factory(HEAD + gpu_engine_toml("victim", free_port(), "--gpu-mb", str(alloc_mb))).start()
    pid = d.wait_state("victim", "ready", 180)["pid"]
    _wait(lambda: nvml_processes().get(pid, 0) >= alloc_mb * MIB, 20, "the engine's memory in NVML")
    held = nvml_processes()[pid]
    used_before, _ = nvml_memory()
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    pid_gone_s = used_back_s = None
    while time.monotonic() - start < 30 and (pid_gone_s is None or used_back_s is None):
        now = time.monotonic() - start
        if pid_gone_s is None and pid not in nvml_processes():
            pid_gone_s = now
        if used_back_s is None and nvml_memory()[0] <= used_before - held + 64 * MIB:
            used_back_s = now
        time.sleep(0.005)
    used_after, _ = nvml_memory()
    engine = d.wait_state("victim", {"backoff", "failed"}, 10)
    released = _wait(lambda: [e for e in d.events() if e["kind"] == "gpu.memory_released"
                              and e["engine"] == "victim"], 10, "gpu.memory_released")
    record("c_sigkill_release", {
        "held_bytes": held, "device_used_before_bytes": used_before, "device_used_after_bytes": used_after,
        "nvml_pid_gone_after_s": round(pid_gone_s, 4) if pid_gone_s is not None else None,
        "nvml_used_back_after_s": round(used_back_s, 4) if used_back_s is not None else None,
        "daemon_event": released[0], "last_exit": engine["last_exit"],
    })
    assert pid_gone_s is not None and pid_gone_s < 10
    assert used_back_s is not None and used_back_s < 10
    assert engine["last_exit"]["signal"] == "SIGKILL"
    assert released[0]["pids"] == [pid] and released[0]["bytes"] >= alloc_mb * MIB
    xid_watcher_clean(d)


# ---- (d) ---------------------------------------------------------------------------------------


def test_d_orphaned_grandchild_holding_gpu_memory_is_freed_before_the_next_start(daemon_factory) -> None:
    """A grandchild that escaped its engine's session keeps GPU memory after the engine dies; it is found through NVML and freed before the next start."""
    orphan_mb = 2048
    cfg = HEAD + gpu_engine_toml("leaky", free_port(), "--gpu-mb", "1024", "--orphan-gpu-mb", str(orphan_mb),
                                 "--orphan-ignore-sigterm", stop_grace="30s")
    d = daemon_factory(cfg).start()
    root = d.wait_state("leaky", "ready", 180)["pid"]
    procs = _wait(lambda: (p := _status_gpu_processes(d)) and
                  len([x for x in p.values() if x["engine"] == "leaky"]) == 2 and p, 20,
                  "engine and grandchild attributed to leaky in status")
    orphan = next(pid for pid, p in procs.items() if p["engine"] == "leaky" and pid != root)
    assert psutil.Process(orphan).ppid() == root and os.getsid(orphan) != os.getsid(root)
    with NvmlSampler(0.05) as sampler:
        t0 = time.time()
        os.kill(root, signal.SIGKILL)
        d.wait_state("leaky", "backoff", 10)
        assert orphan in nvml_processes(), "the orphan still holds its GPU memory after its engine died"
        response = d.post("/v1/engines/leaky/start", {"force": True})
        assert response.status_code == 200, response.text
        new_root = d.wait_state("leaky", "ready", 180)["pid"]
        time.sleep(0.3)
    events = d.events()
    freed = [e for e in events if e["kind"] == "gpu.orphans_freed"]
    spawned = [e for e in events if e["kind"] == "engine.spawned" and e["engine"] == "leaky"]
    root_released = [e for e in events if e["kind"] == "gpu.memory_released" and root in e["pids"]]
    orphan_seen = sampler.present(orphan)
    root_seen = [procs.get(root, 0) for _, _, procs in sampler.samples]
    lines = timeline(sampler, events, {root: "engine(old)", orphan: "orphan", new_root: "engine(new)"}, t0,
                     ("engine.exited", "engine.state_changed", "gpu.orphans_freed", "gpu.memory_released",
                      "engine.leftovers_killed", "policy.decided", "engine.spawned"))
    record("d_orphan_freed", {"orphan_pid": orphan, "orphan_bytes_nvml": procs[orphan]["used_bytes"],
                              "engine_root_bytes_status": procs[root]["used_bytes"],
                              "engine_root_peak_bytes_sampler": max(root_seen, default=0),
                              "engine_root_release_event": root_released[0] if root_released else None,
                              "event": freed[0] if freed else None, "timeline": lines})
    # The SIGKILLed engine's release event names what it held, not a reading taken mid-teardown.
    assert len(root_released) == 1 and root_released[0]["bytes"] >= procs[root]["used_bytes"] >= 1024 * MIB, \
        root_released
    assert len(freed) == 1 and orphan in freed[0]["pids"]
    assert freed[0]["bytes"] >= orphan_mb * MIB and freed[0]["memory_released"] is True
    assert freed[0]["sigkilled"] == [orphan]  # it ignored SIGTERM
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    assert orphan not in nvml_processes()
    assert len(spawned) == 2 and orphan_seen and _event_wall(spawned[1]) >= orphan_seen[-1] - 0.002, \
        "the new engine was spawned while the orphan still held GPU memory"
    assert freed[0]["seq"] < spawned[1]["seq"]
    xid_watcher_clean(d)


# ---- (e) ---------------------------------------------------------------------------------------


def test_e_xid_watcher_runs_through_start_stop_and_restart_without_errors(daemon_factory) -> None:
    """The XID watcher thread stays alive on every GPU through engine starts and stops, with no XID and no error."""
    d = daemon_factory(HEAD + gpu_engine_toml("steady", free_port(), "--gpu-mb", "512")).start()
    d.wait_state("steady", "ready", 180)
    first = xid_watcher_clean(d)
    assert d.post("/v1/engines/steady/stop").status_code == 200
    d.wait_state("steady", "stopped", 60)
    assert d.post("/v1/engines/steady/start", {"force": True}).status_code == 200
    d.wait_state("steady", "ready", 180)
    time.sleep(3)
    last = xid_watcher_clean(d)
    record("e_xid_watcher", {"after_first_start": first, "after_restart": last,
                             "uptime_s": d.status()["daemon"]["uptime_s"]})


# ---- (f) ---------------------------------------------------------------------------------------


def test_f_gpu_footprint_larger_than_the_host_budget_starts_and_is_checked_on_the_gpu(daemon_factory) -> None:
    """An engine whose GPU memory exceeds the host memory budget starts (gpu_footprint), and one larger than the card is refused."""
    _, total = nvml_memory()
    gpu_mb = int(total * 0.5 / MIB)
    gpu_footprint_mb = int(total * 0.6 / MIB)
    budget = "8GB"  # host RAM budget far below what the engine holds on the GPU
    cfg = (HEAD.replace('headroom = "1GB"\n', f'headroom = "1GB"\nbudget = "{budget}"\nadmission_wait = "2s"\n')
           + gpu_engine_toml("gpu-heavy", free_port(), "--gpu-mb", str(gpu_mb), footprint="2GB",
                             gpu_footprint=f"{gpu_footprint_mb}MiB")
           + gpu_engine_toml("too-big", free_port(), "--gpu-mb", "64", footprint="1GB", autostart=False,
                             gpu_footprint=f"{int(total / MIB) + 1024}MiB"))
    d = daemon_factory(cfg).start()
    pid = d.wait_state("gpu-heavy", "ready", 180)["pid"]
    held = _wait(lambda: (b := nvml_processes().get(pid, 0)) >= gpu_mb * MIB and b, 20, "gpu-heavy's memory in NVML")
    admitted = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("engine") == "gpu-heavy"]
    assert admitted[-1]["decision"] == "admit"
    assert held > 8e9, "the engine holds more GPU memory than the whole host budget"
    assert d.post("/v1/engines/too-big/start").status_code == 200
    refused = _wait(lambda: [e for e in d.events() if e["kind"] == "policy.decided" and e.get("engine") == "too-big"
                             and e["decision"] == "refuse"], 30, "the refusal of too-big")
    record("f_gpu_footprint", {
        "device_total_bytes": total, "host_budget": budget, "gpu_heavy_footprint": "2GB",
        "gpu_heavy_gpu_footprint": f"{gpu_footprint_mb}MiB", "gpu_heavy_nvml_bytes": held,
        "gpu_heavy_admission": admitted[-1]["message"],
        "too_big_refusal": {k: refused[0][k] for k in ("reason", "message")},
        "too_big_state": d.engine("too-big")["state"],
    })
    assert f"{gpu_footprint_mb * MIB / 1e9:.1f} GB per GPU on 0" in admitted[-1]["message"]
    assert refused[0]["reason"] == "gpu" and "on GPU 0, which has only" in refused[0]["message"]
    assert not [e for e in d.events() if e["kind"] == "engine.spawned" and e["engine"] == "too-big"]
    xid_watcher_clean(d)


# ---- (g) ---------------------------------------------------------------------------------------


def test_g_orphans_from_a_killed_daemon_release_their_gpu_memory_before_engines_start(daemon_factory) -> None:
    """Daemon and engine SIGKILLed, a grandchild keeps GPU memory; the next daemon kills it and waits for NVML before starting engines."""
    orphan_mb = 2048
    old_cfg = HEAD + gpu_engine_toml("retired", free_port(), "--gpu-mb", "512", "--orphan-gpu-mb", str(orphan_mb))
    d = daemon_factory(old_cfg).start()
    root = d.wait_state("retired", "ready", 180)["pid"]
    orphan = _wait(lambda: [p for p in nvml_processes() if p != root and psutil.pid_exists(p)
                            and psutil.Process(p).ppid() == root], 20, "the grandchild in NVML")[0]
    d.kill()
    os.kill(root, signal.SIGKILL)
    _wait(lambda: root not in nvml_processes(), 10, "the engine's memory back")
    assert orphan in nvml_processes(), "the grandchild still holds its GPU memory"
    # The engine was renamed while the daemon was down: its grandchild is nobody's to adopt, an orphan.
    d.config_path.write_text(d.config_path.read_text().replace('"retired"', '"fresh"'))
    with NvmlSampler(0.05) as sampler:
        t0 = time.time()
        d.start()
        new_root = d.wait_state("fresh", "ready", 180)["pid"]
        time.sleep(0.3)
    events = [e for e in d.events() if _event_wall(e) >= t0 - 1]
    found = [e for e in events if e["kind"] == "daemon.orphans_found"]
    released = [e for e in events if e["kind"] == "gpu.orphans_released"]
    spawned = [e for e in events if e["kind"] == "engine.spawned" and e["engine"] == "fresh"]
    orphan_seen = sampler.present(orphan)
    lines = timeline(sampler, events, {orphan: "orphan", new_root: "fresh"}, t0,
                     ("daemon.orphans_found", "daemon.orphans_killed", "gpu.orphans_released", "daemon.started",
                      "policy.decided", "engine.spawned", "engine.state_changed"))
    record("g_orphans_at_daemon_start", {"orphan_pid": orphan, "released_event": released[0] if released else None,
                                         "timeline": lines})
    assert found and orphan in found[0]["pids"]
    assert len(released) == 1 and released[0]["memory_released"] is True and orphan in released[0]["pids"]
    assert released[0]["bytes"] >= orphan_mb * MIB
    assert orphan not in nvml_processes()
    assert spawned and released[0]["seq"] < spawned[0]["seq"]
    assert orphan_seen and _event_wall(spawned[0]) >= orphan_seen[-1] - 0.002, \
        "fresh was spawned while NVML still listed the orphan's memory"
    xid_watcher_clean(d)


# ---- (h) ---------------------------------------------------------------------------------------


def test_h_memory_guard_quiet_within_gpu_footprint_and_recycles_an_engine_past_it(daemon_factory) -> None:
    """The memory guard on real GPU memory: an engine within its gpu_footprint raises nothing; one holding
    more than gpu_footprint x 1.3 is drained and restarted through the backoff with a critical alert naming
    its NVML bytes."""
    alloc_mb = 2048  # plus the CUDA context (about 600 MiB with torch 2.11 / CUDA 13)
    cfg = (HEAD + gpu_engine_toml("fits", free_port(), "--gpu-mb", str(alloc_mb), gpu_footprint="3GiB")
           + gpu_engine_toml("outgrown", free_port(), "--gpu-mb", str(alloc_mb), gpu_footprint="1GiB"))
    d = daemon_factory(cfg).start()
    fits = d.wait_state("fits", "ready", 180)
    outgrown_pid = d.wait_state("outgrown", {"ready", "stopping", "backoff"}, 180)["pid"]
    engine = d.wait_state("outgrown", "backoff", 60)
    alerts = [e for e in d.events() if e["kind"] == "alert.raised" and e["key"].startswith("engine.gpu_memory")]
    exceeded = [a for a in alerts if a["key"] == "engine.gpu_memory_exceeded:outgrown"]
    time.sleep(3)  # a few more probe intervals for the engine that fits
    held = nvml_processes().get(fits["pid"], 0)
    fits_now = d.engine("fits")
    record("h_memory_guard_gpu", {"outgrown_pid": outgrown_pid, "outgrown_reason": engine["state_reason"],
                                  "exceeded_alert": exceeded[0] if exceeded else None,
                                  "fits_nvml_bytes": held, "fits_memory": fits_now["memory"]})
    assert exceeded and exceeded[0]["severity"] == "critical"
    assert exceeded[0]["details"]["held_bytes"] >= alloc_mb * MIB and exceeded[0]["details"]["source"] == "nvml"
    assert "GPU memory" in engine["state_reason"] and engine["next_start_in_s"] >= 50
    assert not [a for a in alerts if a["key"].endswith(":fits")], "no alert for the engine within its footprint"
    assert fits_now["state"] == "ready" and fits_now["pid"] == fits["pid"] and fits_now["memory"]["gpu_guard"] == "ok"
    assert held >= alloc_mb * MIB and fits_now["memory"]["gpu_hard_bytes"] == round(3 * GIB * 1.3)
    xid_watcher_clean(d)
