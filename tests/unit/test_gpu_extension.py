"""The daemon's GPU subsystem on CPU: GPU memory mapped to engines' process trees, status, orphans, XID actions.

NVML cannot run without an NVIDIA driver, so NVML is an injected stand-in module here; everything
else is real: the daemon runs in-process with its supervisors, real engine processes (the OpenAI
stand-in), real orphan processes and real signals. The same code runs against the real NVML on a
GPU in ``tests/gpu/``.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import psutil
import pytest
import structlog

from probes.readings import GpuDeviceReading, GpuProcessReading, GpuReading, XidEvent
from supervisord_llm.config import load_config
from supervisord_llm.daemon import Daemon
from supervisord_llm.extension import Extension
from supervisord_llm.subsystems.gpu import GpuExtension, find_gpu_orphans, held_bytes_by_pid, owners_of_pids
from tests.helpers import Daemon as DaemonProcess
from tests.helpers import free_port, short_tmpdir, standin_engine_toml

pytestmark = pytest.mark.long_wait  # mostly waits: run beside the rest

GIB = 1024**3
PYTHON = sys.executable


class StandInNvml:
    """The pynvml functions the probe and the XID watcher call, answering from what a test says is held.

    A pid stays listed while its process lives (a zombie counts as gone), and for ``linger_s`` after
    it died: the time a driver takes to release a dead process's memory. A device in ``lost`` answers
    NVML_ERROR_GPU_IS_LOST, one in ``silent`` NVML_ERROR_UNKNOWN (as pynvml words them).
    """

    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    nvmlEventTypeXidCriticalError = 8

    class NVMLError(Exception):
        MESSAGES = {10: "Timeout", 15: "GPU is lost", 999: "Unknown Error"}

        def __init__(self, value: int) -> None:
            self.value = value
            super().__init__(self.MESSAGES.get(value, f"NVML error {value}"))

    def __init__(self, *, total_bytes: int = 80 * GIB, devices: int = 1, init_error: int | None = None) -> None:
        self.total_bytes = total_bytes
        self.device_count = devices
        self.init_error = init_error
        self.held: dict[int, tuple[int, int]] = {}  # pid -> (device, bytes)
        self.linger_s = 0.0
        self._dead_since: dict[int, float] = {}
        self.xids: queue.Queue[tuple[int, int]] = queue.Queue()
        self.lost: set[int] = set()
        self.silent: set[int] = set()
        self.count_error: int | None = None  # every reading fails as a whole: nvmlDeviceGetCount raises this

    def hold(self, pid: int, used_bytes: int, device: int = 0) -> None:
        self.held[pid] = (device, used_bytes)

    def _listed(self, device: int) -> list[tuple[int, int]]:
        out = []
        for pid, (dev, used) in list(self.held.items()):
            if dev != device:
                continue
            if not _alive(pid):
                since = self._dead_since.setdefault(pid, time.monotonic())
                if time.monotonic() - since >= self.linger_s:
                    continue
            out.append((pid, used))
        return out

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise self.NVMLError(self.count_error)
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(index=index)

    def nvmlDeviceGetIndex(self, handle: SimpleNamespace) -> int:
        return handle.index

    def nvmlDeviceGetName(self, handle: SimpleNamespace) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: SimpleNamespace) -> str:
        return f"GPU-standin-{handle.index}"

    def nvmlDeviceGetMemoryInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        if handle.index in self.lost:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        if handle.index in self.silent:
            raise self.NVMLError(self.NVML_ERROR_UNKNOWN)
        used = sum(b for _, b in self._listed(handle.index))
        return SimpleNamespace(total=self.total_bytes, used=used, free=self.total_bytes - used)

    def nvmlDeviceGetUtilizationRates(self, handle: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(gpu=7, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimpleNamespace) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._listed(handle.index)]

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, handle: SimpleNamespace, event_types: int, event_set: object) -> None:
        pass

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        try:
            index, xid = self.xids.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise self.NVMLError(self.NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(device=SimpleNamespace(index=index), eventType=8, eventData=xid)

    def nvmlEventSetFree(self, event_set: object) -> None:
        pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _quiet_logger() -> object:
    return structlog.wrap_logger(structlog.PrintLogger(io.StringIO()),
                                 wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _build(config_text: str, nvml: StandInNvml, *, clock: object = None,
           **ext_kwargs: object) -> tuple[Daemon, GpuExtension]:
    state = short_tmpdir()
    path = state / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n\n[probes]\nnvml = false\ninterval = "0.2s"\n\n'
                    + config_text)
    daemon = Daemon(load_config(path), logger=_quiet_logger(), clock=clock)
    ext = GpuExtension(daemon, nvml_module=nvml, **ext_kwargs)
    daemon.extensions.append(ext)
    daemon.open()
    return daemon, ext


@asynccontextmanager
async def running(config_text: str, nvml: StandInNvml, **ext_kwargs: object) -> AsyncIterator[tuple[Daemon, GpuExtension]]:
    """A real daemon in this process with the GPU extension on a stand-in NVML; engines are real processes."""
    daemon, ext = _build(config_text, nvml, **ext_kwargs)
    async with run_built(daemon):
        yield daemon, ext


@asynccontextmanager
async def run_built(daemon: Daemon, *, keep_state: bool = False) -> AsyncIterator[Daemon]:
    """Run a daemon made by ``_build``; afterwards stop it, kill whatever carries its tag, remove its state
    (unless ``keep_state``: the next daemon on that state dir follows)."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                yield daemon
            finally:
                with anyio.move_on_after(20, shield=True):
                    await daemon.shutdown()
                tg.cancel_scope.cancel()
    finally:
        daemon.close()
        for pid in _tagged(daemon.daemon_id + "/"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not keep_state:
            shutil.rmtree(daemon.state_dir, ignore_errors=True)


def _tagged(prefix: str) -> list[int]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("SUPERVISORD_LLM_TAG", "").startswith(prefix):
                out.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return out


def _events(daemon: Daemon, kind: str) -> list[dict]:
    return [e for e in daemon.events.recent if e["kind"] == kind]


async def _until(predicate, timeout_s: float = 15.0, what: str = "condition") -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.05)


def _engine(daemon: Daemon, name: str) -> dict:
    return next(e for e in daemon.status()["engines"] if e["name"] == name)


# ---- pure mapping ---------------------------------------------------------------------------------


def _reading(*devices: tuple[int, list[tuple[int, int]]]) -> GpuReading:
    return GpuReading(at_s=1.0, available=True, devices=tuple(
        GpuDeviceReading(index=i, name="gpu", uuid=f"GPU-{i}", total_bytes=80 * GIB,
                         used_bytes=sum(b for _, b in procs), free_bytes=80 * GIB - sum(b for _, b in procs),
                         utilization_percent=0, processes=tuple(GpuProcessReading(p, b) for p, b in procs))
        for i, procs in devices))


def test_orphans_are_tagged_nvml_pids_that_no_live_tree_accounts_for() -> None:
    """Only a GPU-holding process with this daemon's tag and outside every live engine tree is an orphan."""
    reading = _reading((0, [(10, 2 * GIB), (11, GIB), (12, GIB), (13, GIB)]), (1, [(10, GIB), (14, GIB)]))
    tags = {10: "d1/vllm/aaa", 11: "d1/vllm/bbb", 12: "d2/vllm/ccc", 13: None, 14: "d1x/other/ddd"}
    orphans = find_gpu_orphans(reading, live_pids=[11], tag_prefix="d1/", environ_tag=tags.get)
    assert [(o.pid, o.used_bytes, o.tag) for o in orphans] == [(10, 3 * GIB, "d1/vllm/aaa")]
    assert find_gpu_orphans(GpuReading(at_s=1.0, available=False, reason="no NVML"), [], "d1/",
                            environ_tag=tags.get) == []


def test_gpu_memory_per_pid_is_summed_over_devices_or_limited_to_some() -> None:
    """A process on two GPUs holds the sum of both; limited to one device it holds that device's share."""
    reading = _reading((0, [(10, 2 * GIB)]), (1, [(10, GIB), (11, GIB)]))
    assert held_bytes_by_pid(reading) == {10: 3 * GIB, 11: GIB}
    assert held_bytes_by_pid(reading, devices=[1]) == {10: GIB, 11: GIB}
    assert held_bytes_by_pid(None) == {}
    assert owners_of_pids({"a": [1, 2], "b": [2, 3]}) == {1: "a", 2: "a", 3: "b"}


def test_status_lists_every_gpu_with_its_processes_and_their_engines() -> None:
    """Status `system.gpus` has index, name, uuid, memory, utilisation and processes with their engine."""
    nvml = StandInNvml(devices=2)
    nvml.hold(os.getpid(), 3 * GIB, device=1)
    daemon, ext = _build("", nvml)
    try:
        ext.available = True
        ext._poll_blocking({"self-engine": os.getpid()})
        doc = daemon.status()
        gpus = doc["system"]["gpus"]
        assert [g["index"] for g in gpus] == [0, 1]
        assert set(gpus[0]) == {"index", "name", "uuid", "total_bytes", "used_bytes", "free_bytes",
                                "utilization_percent", "processes"}
        assert gpus[0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-standin-0",
                           "total_bytes": 80 * GIB, "used_bytes": 0, "free_bytes": 80 * GIB,
                           "utilization_percent": 7, "processes": []}
        assert gpus[1]["used_bytes"] == 3 * GIB and gpus[1]["free_bytes"] == 77 * GIB
        assert gpus[1]["processes"] == [{"pid": os.getpid(), "used_bytes": 3 * GIB, "engine": "self-engine"}]
        assert ext.gpu_free_bytes() == {0: 80 * GIB, 1: 77 * GIB}
        assert ext.engine_gpu_bytes([os.getpid(), 999999]) == 3 * GIB
        assert doc["system"]["gpu_probe"]["available"] is True
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


# ---- no NVML --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_without_nvml_one_calm_event_and_no_gpu_numbers() -> None:
    """NVML that cannot initialise: one `probe.unavailable` event, no GPU numbers, starts unaffected."""
    nvml = StandInNvml(init_error=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    port = free_port()
    async with running(standin_engine_toml("e", port, gpu_devices=[0]), nvml) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        await anyio.sleep(0.6)  # several probe intervals: still only the one event
        unavailable = _events(daemon, "probe.unavailable")
        assert len(unavailable) == 1 and unavailable[0]["probe"] == "nvml"
        assert "NVML could not be initialised" in unavailable[0]["reason"]
        assert not [e for e in daemon.events.recent if e["kind"].startswith("gpu.") or e["kind"] == "probe.failed"]
        assert ext.gpu_free_bytes() is None and ext.engine_gpu_bytes([1]) is None
        doc = daemon.status()
        assert doc["system"]["gpus"] == []
        assert doc["system"]["gpu_probe"]["available"] is False
        assert _engine(daemon, "e")["memory"]["gpu_bytes"] is None
        admitted = [e for e in _events(daemon, "policy.decided") if e.get("engine") == "e"]
        assert "GPU memory not checked" in admitted[-1]["message"]


@pytest.mark.slow
def test_real_daemon_without_a_gpu_driver_reports_nvml_unavailable_once(daemon_factory) -> None:
    """`supervisord-llm run` on a machine without an NVIDIA driver: one calm event, the engine still serves."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver; tests/gpu covers it")
    except pynvml.NVMLError:
        pass
    d: DaemonProcess = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    events = d.events()
    unavailable = [e for e in events if e["kind"] == "probe.unavailable"]
    assert [e["probe"] for e in unavailable] == ["nvml"]
    assert d.status()["system"]["gpus"] == []
    assert "Traceback" not in d.stderr()


# ---- engines on a stand-in GPU -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_gpu_memory_of_an_engine_is_its_whole_process_tree() -> None:
    """An engine's `memory.gpu_bytes` adds its grandchild in another session and leaves foreign processes out."""
    nvml = StandInNvml()
    async with running(standin_engine_toml("e", free_port(), "--grandchild", gpu_devices=[0]), nvml) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        root = _engine(daemon, "e")["pid"]
        grandchild = psutil.Process(root).children(recursive=True)[0].pid
        nvml.hold(root, GIB)
        nvml.hold(grandchild, 2 * GIB)
        nvml.hold(1, 5 * GIB)  # init: not ours
        await _until(lambda: _engine(daemon, "e")["memory"]["gpu_bytes"] == 3 * GIB, 15)
        gpu = daemon.status()["system"]["gpus"][0]
        engines = {p["pid"]: p["engine"] for p in gpu["processes"]}
        assert engines == {1: None, root: "e", grandchild: "e"}
        assert gpu["used_bytes"] == 8 * GIB
        assert ext.gpu_free_bytes() == {0: 72 * GIB}


@pytest.mark.slow
@pytest.mark.anyio
async def test_start_waits_until_nvml_shows_the_previous_run_released_its_memory() -> None:
    """A restart does not spawn while NVML still lists the stopped engine's memory (driver still releasing)."""
    nvml = StandInNvml()
    nvml.linger_s = 1.5
    async with running(standin_engine_toml("e", free_port(), gpu_devices=[0]), nvml) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        first = _engine(daemon, "e")["pid"]
        nvml.hold(first, 4 * GIB)
        await _until(lambda: first in ext._owners and ext.engine_gpu_bytes([first]) == 4 * GIB)
        await daemon.stop("e")
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)
        await daemon.start("e", force=True)
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        released = [e for e in _events(daemon, "gpu.memory_released") if e["engine"] == "e"]
        assert released and released[0]["pids"] == [first] and released[0]["bytes"] == 4 * GIB
        assert released[0]["after_exit_s"] >= 1.2
        spawned = [e for e in _events(daemon, "engine.spawned") if e["engine"] == "e"]
        assert len(spawned) == 2 and released[0]["seq"] < spawned[1]["seq"]


@pytest.mark.anyio
async def test_memory_never_released_refuses_the_start_and_alerts() -> None:
    """GPU memory still listed after `memory.return_wait`: no spawn, backoff, a critical alert naming the pid."""
    nvml = StandInNvml()
    nvml.linger_s = float("inf")
    config = '[policies.memory]\nreturn_wait = "1s"\n\n' + standin_engine_toml("e", free_port(), gpu_devices=[0])
    async with running(config, nvml) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        first = _engine(daemon, "e")["pid"]
        nvml.hold(first, 4 * GIB)
        await _until(lambda: first in ext._owners)
        await daemon.stop("e")
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)
        await daemon.start("e", force=True)
        await _until(lambda: _engine(daemon, "e")["state"] in ("backoff", "failed"), 30)
        engine = _engine(daemon, "e")
        assert f"held by pid {first}" in engine["last_exit"]["reason"]
        assert "was not released within 1s" in engine["last_exit"]["reason"]
        assert len(_events(daemon, "engine.spawned")) == 1
        alerts = [e for e in _events(daemon, "alert.raised") if e["key"] == "gpu.memory_not_returned:e"]
        assert alerts and alerts[0]["severity"] == "critical"


@pytest.mark.slow
@pytest.mark.anyio
async def test_orphan_holding_gpu_memory_is_killed_before_the_next_start() -> None:
    """A process of ours that holds GPU memory outside every engine is SIGTERMed, then SIGKILLed, before a start."""
    nvml = StandInNvml()
    config = standin_engine_toml("e", free_port(), gpu_devices=[0], autostart=False)
    async with running(config, nvml, orphan_grace_s=0.5) as (daemon, ext):
        ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        ours = subprocess.Popen([PYTHON, "-c", ignore_term], start_new_session=True,  # noqa: ASYNC220 (a test fixture process, started once)
                                env={**os.environ, "SUPERVISORD_LLM_TAG": f"{daemon.daemon_id}/e/old"})
        foreign = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"], start_new_session=True,  # noqa: ASYNC220
                                   env={**os.environ, "SUPERVISORD_LLM_TAG": "another-daemon/e/old"})
        try:
            await anyio.sleep(0.3)  # let the interpreter take SIG_IGN
            nvml.hold(ours.pid, 6 * GIB)
            nvml.hold(foreign.pid, 2 * GIB)
            await daemon.start("e")
            await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
            freed = _events(daemon, "gpu.orphans_freed")
            assert len(freed) == 1
            assert freed[0]["pids"] == [ours.pid] and freed[0]["bytes"] == 6 * GIB
            assert freed[0]["sigkilled"] == [ours.pid] and freed[0]["memory_released"] is True
            spawned = _events(daemon, "engine.spawned")
            assert freed[0]["seq"] < spawned[0]["seq"]
            assert not _alive(ours.pid)  # reaped by the daemon's wait, so Popen cannot see the signal
            assert foreign.poll() is None  # another daemon's process is not ours to kill
        finally:
            for p in (ours, foreign):
                if p.poll() is None:
                    p.kill()
                p.wait()


# ---- XID -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_xid_events_stop_engines_on_that_gpu_alert_and_ask_for_a_reboot() -> None:
    """XID 13 is left to the engine; XID 48 stops the engine on that GPU and alerts; XID 79 asks for a reboot."""
    nvml = StandInNvml()
    async with running(standin_engine_toml("e", free_port(), gpu_devices=[0]), nvml, xid_wait_timeout_ms=50) \
            as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        assert daemon.status()["system"]["gpu_probe"]["xid"]["registered_devices"] == [0]
        nvml.xids.put((0, 13))
        await _until(lambda: len(_events(daemon, "gpu.xid")) == 1)
        await anyio.sleep(0.3)
        assert _engine(daemon, "e")["state"] == "ready"
        assert not _events(daemon, "alert.raised")

        nvml.xids.put((0, 48))
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)
        xid = _events(daemon, "gpu.xid")[-1]
        assert (xid["xid"], xid["device_index"], xid["engines"]) == (48, 0, ["e"])
        alert = [e for e in _events(daemon, "alert.raised") if e["key"] == "gpu.reset_required:0"]
        assert alert and alert[0]["severity"] == "critical" and "XID 48" in alert[0]["summary"]
        assert "GPU 0 XID 48" in _engine(daemon, "e")["state_reason"]

        nvml.xids.put((0, 79))
        await _until(lambda: bool(_events(daemon, "gpu.reboot_required")))
        keys = [e["key"] for e in _events(daemon, "alert.raised")]
        assert "gpu.lost:0" in keys and "reboot.required" in keys
        status = daemon.status()["system"]["gpu_probe"]["xid"]
        assert status["events"] == 3 and status["last"] == {"device_index": 0, "xid": 79}
        assert status["running"] is True and status["last_error"] is None


@pytest.mark.anyio
async def test_xid_79_takes_the_reboot_escalation_when_the_daemon_runs_one() -> None:
    """With a reboot escalation installed, XID 79 goes through it instead of only being announced."""
    nvml = StandInNvml()
    daemon, ext = _build("", nvml)

    class Escalation(Extension):
        name = "escalation"

        def __init__(self) -> None:
            self.reasons: list[str] = []

        def request_reboot(self, reason: str) -> bool:
            self.reasons.append(reason)
            return True

    escalation = Escalation()
    daemon.extensions.append(escalation)
    try:
        ext.available = True
        await ext.handle_xid(XidEvent(at_s=daemon.clock.now(), device_index=0, xid=79))
        assert escalation.reasons == ["GPU 0 fell off the bus (XID 79)"]
        assert not _events(daemon, "gpu.reboot_required")
        assert [e["key"] for e in _events(daemon, "alert.raised")] == ["gpu.lost:0"]
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


def test_bad_extension_settings_name_what_is_valid() -> None:
    """A negative orphan grace is refused with the names and valid ranges of the settings."""
    nvml = StandInNvml()
    daemon, _ = _build("", nvml)
    try:
        with pytest.raises(ValueError, match="orphan_grace_s must be >= 0 s"):
            GpuExtension(daemon, nvml_module=nvml, orphan_grace_s=-1)
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)



# ---- gpu_footprint: host RAM and GPU memory are separate -----------------------------------------


GPU_ENGINE = '[[engine]]\nname = "g"\nkind = "command"\ncommand = ["x", "{port}"]\n'

GPU_FOOTPRINT_CONFIGS = [
    ("60GiB per device", 'gpu_devices = [0, 1]\ngpu_footprint = "60GiB"\n', 60 * GIB, None),
    ("bytes as a number", "gpu_devices = [0]\ngpu_footprint = 1048576\n", 1048576, None),
    ("unset", 'gpu_devices = [0]\nfootprint = "8GB"\n', None, None),
    ("bad unit", 'gpu_devices = [0]\ngpu_footprint = "40 parsecs"\n', None,
     "engine[0].gpu_footprint: unknown size unit 'parsecs'"),
    ("auto is not a size here", 'gpu_devices = [0]\ngpu_footprint = "auto"\n', None,
     "engine[0].gpu_footprint: expected a size"),
    ("negative", "gpu_devices = [0]\ngpu_footprint = -5\n", None, "engine[0].gpu_footprint: a size cannot be negative"),
    ("not a size", "gpu_devices = [0]\ngpu_footprint = true\n", None, "engine[0].gpu_footprint: expected a size"),
    ("without gpu_devices", 'gpu_footprint = "40GB"\n', None,
     "engine[0].gpu_footprint: is per GPU device and needs gpu_devices"),
]


@pytest.mark.parametrize(("label", "keys", "expected_bytes", "error"), GPU_FOOTPRINT_CONFIGS,
                         ids=[c[0] for c in GPU_FOOTPRINT_CONFIGS])
def test_gpu_footprint_is_a_size_per_device_or_a_precise_error(tmp_path, label, keys, expected_bytes, error) -> None:
    """`gpu_footprint` takes a size per GPU device; a bad one is refused naming `engine[i].gpu_footprint`."""
    from supervisord_llm.errors import ConfigError

    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + GPU_ENGINE + keys)
    if error is None:
        assert load_config(path).engines[0].gpu_footprint_bytes == expected_bytes
    else:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value).startswith(str(path)) and error in str(info.value), str(info.value)


ADMISSIONS = [
    # (engine keys, verdict, words in the message)
    ({"footprint": "2GB", "gpu_devices": [0], "gpu_footprint": "60GiB"}, "admit",
     ["2.0 GB + 1.0 GB headroom", "64.4 GB per GPU on 0"]),
    ({"footprint": "60GiB", "gpu_devices": [0]}, "budget", ["64.4 GB", "over the memory budget of 10.0 GB"]),
    ({"footprint": "2GB", "gpu_devices": [0], "gpu_footprint": "90GiB"}, "gpu",
     ["needs 96.6 GB on GPU 0, which has only 85.9 GB free"]),
    ({"footprint": "8GB", "gpu_devices": [0, 1]}, "admit", ["4.0 GB per GPU on 0, 1"]),
    ({"footprint": "2GB", "gpu_devices": [0, 1], "gpu_footprint": "30GB"}, "admit", ["30.0 GB per GPU on 0, 1"]),
]


@pytest.mark.parametrize(("keys", "verdict", "words"), ADMISSIONS, ids=[
    "gpu weights not counted as host RAM", "without gpu_footprint the footprint is host RAM too",
    "gpu_footprint over the card", "unset: footprint split evenly", "gpu_footprint on each device"])
def test_admission_checks_footprint_against_host_ram_and_gpu_footprint_against_each_gpu(keys, verdict, words) -> None:
    """An engine whose weights live on the GPU is admitted under a small host budget; its GPU share is checked per device."""
    from policies.actions import Admit

    nvml = StandInNvml(devices=2)
    config = '[policies.memory]\nbudget = "10GB"\nheadroom = "1GB"\n\n' + standin_engine_toml("g", free_port(), **keys)
    daemon, ext = _build(config, nvml)
    try:
        ext.available = True
        ext._poll_blocking({})
        result = daemon._admission(daemon.supervisors["g"])
        assert ("admit" if isinstance(result, Admit) else result.reason) == verdict, result
        for word in words:
            assert word in result.message, result.message
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


# ---- XID stop grace ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_xid_stop_uses_the_policys_grace_not_the_engines_long_one() -> None:
    """XID 48 on an engine that ignores SIGTERM with a 120 s stop_grace: SIGKILLed after the policy's 0.5 s grace."""
    nvml = StandInNvml()
    config = standin_engine_toml("e", free_port(), "--ignore-sigterm", gpu_devices=[0], stop_grace="120s")
    async with running(config, nvml, xid_wait_timeout_ms=50, stop_grace_s=0.5) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        nvml.xids.put((0, 48))
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)  # far below the engine's 120 s
        stopped = _events(daemon, "engine.stopped")[-1]
        assert stopped["graceful"] is False and stopped["signal"] == "SIGKILL", stopped


# ---- a GPU that NVML no longer answers for -------------------------------------------------------


class Escalation(Extension):
    """A reboot escalation as the stranded-memory extension exposes it: it only records requests."""

    name = "escalation"

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def request_reboot(self, reason: str) -> bool:
        self.reasons.append(reason)
        return True


@pytest.mark.anyio
async def test_gpu_is_lost_stops_its_engines_alerts_and_asks_for_a_reboot_at_once() -> None:
    """NVML answering "GPU is lost" for GPU 0: its engine is stopped, alerts raised, reboot announced; GPU 1 is still read."""
    nvml = StandInNvml(devices=2)
    config = standin_engine_toml("e", free_port(), gpu_devices=[0])
    async with running(config, nvml, lost_after_s=600) as (daemon, ext):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        nvml.hold(_engine(daemon, "e")["pid"], 4 * GIB, device=0)
        await _until(lambda: ext.engine_gpu_bytes([_engine(daemon, "e")["pid"]]) == 4 * GIB)
        nvml.lost.add(0)
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)
        lost = _events(daemon, "gpu.lost")
        assert len(lost) == 1 and lost[0]["device_index"] == 0 and lost[0]["engines"] == ["e"]
        assert "GPU 0 (NVIDIA H100 80GB HBM3) is lost (NVML: NVMLError: GPU is lost)" == lost[0]["cause"]
        assert "is lost" in _engine(daemon, "e")["state_reason"]
        keys = [e["key"] for e in _events(daemon, "alert.raised")]
        assert "gpu.lost:0" in keys and "reboot.required" in keys
        reboot = _events(daemon, "gpu.reboot_required")
        assert len(reboot) == 1 and reboot[0]["xid"] is None and reboot[0]["device_index"] == 0
        assert [g["index"] for g in daemon.status()["system"]["gpus"]] == [1]
        assert daemon.status()["system"]["gpu_probe"]["lost_devices"] == [0]
        await anyio.sleep(0.6)  # more readings of the lost GPU: still one episode
        assert len(_events(daemon, "gpu.lost")) == 1 and len(_events(daemon, "gpu.reboot_required")) == 1


def _two_gpus_on_a_fake_clock() -> tuple[Any, StandInNvml, Daemon, GpuExtension, Escalation]:
    """A daemon (no engine) with the GPU extension on a stand-in NVML of two GPUs, ``lost_after_s`` 10 s, a
    fake clock, and a reboot escalation that records what it is asked."""
    from supervisord_llm.clock import FakeClock

    clock = FakeClock()
    nvml = StandInNvml(devices=2)
    daemon, ext = _build("", nvml, clock=clock, lost_after_s=10)
    escalation = Escalation()
    daemon.extensions.append(escalation)
    return clock, nvml, daemon, ext, escalation


@pytest.mark.anyio
async def test_a_gpu_that_stops_answering_is_lost_only_after_lost_after_s_and_found_again() -> None:
    """A GPU missing from NVML is not lost at the first missed reading; after `lost_after_s` the reboot path runs."""
    clock, nvml, daemon, ext, escalation = _two_gpus_on_a_fake_clock()
    try:
        ext.available = True
        await ext.poll()  # both GPUs seen
        assert _events(daemon, "gpu.lost") == []
        nvml.device_count = 1  # GPU 1 no longer listed at all
        await ext.poll()
        clock.advance(9)
        await ext.poll()
        assert _events(daemon, "gpu.lost") == [] and escalation.reasons == []
        clock.advance(1)
        await ext.poll()
        lost = _events(daemon, "gpu.lost")
        assert [(e["device_index"], e["engines"]) for e in lost] == [(1, [])]
        assert escalation.reasons == ["GPU 1 (NVIDIA H100 80GB HBM3) has not answered NVML for 10s (no longer listed)"]
        assert [e["key"] for e in _events(daemon, "alert.raised")] == ["gpu.lost:1"]
        nvml.device_count = 2
        clock.advance(5)
        await ext.poll()
        back = _events(daemon, "gpu.device_back")
        assert [(e["device_index"], e["missing_s"]) for e in back] == [(1, 15.0)]
        nvml.silent.add(0)  # an error other than "GPU is lost": also only after lost_after_s
        await ext.poll()
        assert len(_events(daemon, "gpu.lost")) == 1
        clock.advance(10)
        await ext.poll()
        assert "(NVMLError: Unknown Error)" in _events(daemon, "gpu.lost")[-1]["cause"]
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


@pytest.mark.anyio
async def test_nvml_failing_as_a_whole_is_no_lost_gpu_and_asks_for_no_reboot() -> None:
    """Every NVML reading fails for a minute with an error other than "GPU is lost" (a timeout): that says
    nothing about any one GPU, so no GPU is lost (the engines on it would be stopped) and no reboot is asked for; the probe's
    failure is reported, and after a minute a person is warned. A failed reading saying "GPU is lost" still acts
    at once."""
    clock, nvml, daemon, ext, escalation = _two_gpus_on_a_fake_clock()
    try:
        ext.available = True
        await ext.poll()  # both GPUs seen
        nvml.count_error = StandInNvml.NVML_ERROR_TIMEOUT
        for _ in range(7):  # failing from the first of these readings, for 60 s at the last
            clock.advance(10)
            await ext.poll()
        assert _events(daemon, "gpu.lost") == [] and escalation.reasons == []
        assert [e["error"] for e in _events(daemon, "probe.failed")] == ["NVML cannot count devices (NVMLError: Timeout)"]
        # A person is told, once, after a minute of failed readings (nothing else would say it).
        warned = [e for e in _events(daemon, "alert.raised") if e["key"] == "gpu.probe_failing"]
        assert len(warned) == 1 and warned[0]["severity"] == "warning" and not warned[0]["resolved"], warned
        assert "NVML has not answered for 60s" in warned[0]["summary"], warned
        # NVML answers again without GPU 1: missing from then on, lost only after lost_after_s of that.
        nvml.count_error, nvml.device_count = None, 1
        await ext.poll()
        warned = [e for e in _events(daemon, "alert.raised") if e["key"] == "gpu.probe_failing"]
        assert [e["resolved"] for e in warned] == [False, True], warned
        clock.advance(5)
        await ext.poll()
        assert _events(daemon, "gpu.lost") == []
        nvml.count_error = StandInNvml.NVML_ERROR_GPU_IS_LOST
        await ext.poll()
        assert [e["device_index"] for e in _events(daemon, "gpu.lost")] == [0, 1]
        assert escalation.reasons and all("is lost (NVML: " in r for r in escalation.reasons)
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


@pytest.mark.anyio
async def test_xid_79_then_gpu_is_lost_is_one_episode() -> None:
    """XID 79 acts; NVML then saying "GPU is lost" for that GPU is noted but does not ask for a second reboot."""
    nvml = StandInNvml()
    daemon, ext = _build("", nvml)
    escalation = Escalation()
    daemon.extensions.append(escalation)
    try:
        ext.available = True
        await ext.poll()
        await ext.handle_xid(XidEvent(at_s=daemon.clock.now(), device_index=0, xid=79))
        nvml.lost.add(0)
        await ext.poll()
        assert escalation.reasons == ["GPU 0 fell off the bus (XID 79)"]
        lost = _events(daemon, "gpu.lost")
        assert len(lost) == 1 and lost[0]["already_handled"] is True
        assert [e["key"] for e in _events(daemon, "alert.raised")] == ["gpu.lost:0"]
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


# ---- when a GPU's alert episodes end --------------------------------------------------------------

# A webhook nobody answers: the outbox keeps the episodes open and retries, which is all these tests need.
ALERTING = '[alerts]\n[[alerts.webhook]]\nname = "hook"\nurl = "http://127.0.0.1:9/hook"\nformat = "json"\n'


def _build_alerting(config_text: str, nvml: StandInNvml, *, state: object = None, clock: object = None,
                    **ext_kwargs: object) -> tuple[Daemon, GpuExtension]:
    """``_build`` with the alert outbox (episodes survive the daemon in it), optionally on an earlier daemon's state."""
    from supervisord_llm.extensions import AlertsExtension

    state_dir = state or short_tmpdir()
    path = state_dir / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n\n[probes]\nnvml = false\ninterval = "0.2s"\n\n'
                    + config_text + ALERTING)
    daemon = Daemon(load_config(path), logger=_quiet_logger(), clock=clock)
    daemon.claim()
    daemon.extensions.append(AlertsExtension(daemon))
    ext = GpuExtension(daemon, nvml_module=nvml, **ext_kwargs)
    daemon.extensions.append(ext)
    daemon.open()
    return daemon, ext


def _open_episodes(daemon: Daemon) -> set[str]:
    daemon._alert_submitter.submit(lambda: None).result()  # what was raised has reached the outbox
    return set(daemon.alerts_outbox.open_episodes())


def _resolved(daemon: Daemon, key: str) -> list[dict]:
    return [e for e in _events(daemon, "alert.raised") if e["key"] == key and e["resolved"]]


@pytest.mark.anyio
async def test_a_lost_gpus_episode_ends_when_the_gpu_answers_nvml_again() -> None:
    """GPU 1 "is lost": gpu.lost:1 opens and stays open while NVML says so; NVML reading it again ends it."""
    nvml = StandInNvml(devices=2)
    daemon, ext = _build_alerting("", nvml, boot_id="boot-A")
    daemon.extensions.append(Escalation())
    try:
        ext.available = True
        await ext.poll()
        nvml.lost.add(1)
        await ext.poll()
        await ext.poll()
        assert "gpu.lost:1" in _open_episodes(daemon) and not _resolved(daemon, "gpu.lost:1")
        raised = next(e for e in _events(daemon, "alert.raised") if e["key"] == "gpu.lost:1")
        assert raised["details"]["uuid"] == "GPU-standin-1" and raised["details"]["boot_id"] == "boot-A"
        nvml.lost.discard(1)
        await ext.poll()
        assert "gpu.lost:1" not in _open_episodes(daemon)
        resolved = _resolved(daemon, "gpu.lost:1")
        assert len(resolved) == 1 and "answers NVML again" in resolved[0]["summary"], resolved
        await ext.poll()
        assert len(_resolved(daemon, "gpu.lost:1")) == 1
    finally:
        daemon.close()
        shutil.rmtree(daemon.state_dir, ignore_errors=True)


@pytest.mark.anyio
async def test_a_new_daemon_ends_a_gpu_lost_episode_only_once_that_gpu_answers() -> None:
    """After a reboot with GPU 1 still missing, gpu.lost:1 stays open (no daemon would report it again);
    GPU 1 showing up in NVML later ends it."""
    nvml = StandInNvml(devices=2)
    daemon, ext = _build_alerting("", nvml, boot_id="boot-A")
    daemon.extensions.append(Escalation())
    state = daemon.state_dir
    try:
        ext.available = True
        await ext.poll()
        nvml.lost.add(1)
        await ext.poll()
        assert "gpu.lost:1" in _open_episodes(daemon)
    finally:
        daemon.close()
    rebooted = StandInNvml(devices=1)  # the new boot: GPU 1 is not on the bus
    daemon, ext = _build_alerting("", rebooted, state=state, boot_id="boot-B")
    async with run_built(daemon):
        await _until(lambda: bool(_events(daemon, "gpu.probe_started")))
        await anyio.sleep(0.5)  # a few readings
        assert "gpu.lost:1" in _open_episodes(daemon) and not _resolved(daemon, "gpu.lost:1")
        rebooted.device_count = 2
        await _until(lambda: bool(_resolved(daemon, "gpu.lost:1")), 10)
        assert "gpu.lost:1" not in _open_episodes(daemon)


@pytest.mark.anyio
async def test_a_probe_failing_warning_an_earlier_daemon_raised_ends_when_nvml_answers_the_next_one() -> None:
    """NVML failing for a minute raises gpu.probe_failing; the daemon is restarted (a reboot after the driver
    upgrade), NVML answers the new daemon: it ends the episode (it stayed open: the new daemon had raised nothing)."""
    from supervisord_llm.clock import FakeClock

    clock = FakeClock()
    nvml = StandInNvml(devices=1)
    daemon, ext = _build_alerting("", nvml, clock=clock, boot_id="boot-A")
    state = daemon.state_dir
    try:
        ext.available = True
        await ext.poll()
        nvml.count_error = StandInNvml.NVML_ERROR_TIMEOUT
        for _ in range(7):
            clock.advance(10)
            await ext.poll()
        assert "gpu.probe_failing" in _open_episodes(daemon)
    finally:
        daemon.close()
    daemon, ext = _build_alerting("", StandInNvml(devices=1), state=state, boot_id="boot-B")
    async with run_built(daemon):
        await _until(lambda: bool(_resolved(daemon, "gpu.probe_failing")), 10)
        assert "gpu.probe_failing" not in _open_episodes(daemon)


@pytest.mark.anyio
async def test_a_gpu_reset_required_episode_ends_after_a_reboot_not_after_a_daemon_restart() -> None:
    """XID 48 opens gpu.reset_required:0; a daemon restarted in the same boot keeps it open (the GPU still answers
    NVML while it needs a reset); the first reading of a later boot, with the GPU there, ends it."""
    nvml = StandInNvml()
    daemon, ext = _build_alerting("", nvml, boot_id="boot-A")
    state = daemon.state_dir
    try:
        ext.available = True
        await ext.poll()
        await ext.handle_xid(XidEvent(at_s=daemon.clock.now(), device_index=0, xid=48))
        await ext.poll()
        assert "gpu.reset_required:0" in _open_episodes(daemon)
    finally:
        daemon.close()
    daemon, ext = _build_alerting("", nvml, state=state, boot_id="boot-A")
    async with run_built(daemon, keep_state=True):
        await _until(lambda: bool(_events(daemon, "gpu.probe_started")))
        await anyio.sleep(0.5)
        assert "gpu.reset_required:0" in _open_episodes(daemon) and not _resolved(daemon, "gpu.reset_required:0")
    daemon, ext = _build_alerting("", nvml, state=state, boot_id="boot-B")
    async with run_built(daemon):
        await _until(lambda: bool(_events(daemon, "gpu.probe_started")))
        resolved = _resolved(daemon, "gpu.reset_required:0")
        assert len(resolved) == 1 and "reboot" in resolved[0]["summary"], resolved
        assert "gpu.reset_required:0" not in _open_episodes(daemon)


@pytest.mark.anyio
async def test_a_gpu_reset_required_episode_ends_when_an_engine_serves_from_that_gpu_again() -> None:
    """After XID 48 (engine stopped) the episode stays open while the GPU only answers NVML; once the engine is
    ready again and holds memory on that GPU (the reset worked), it ends."""
    nvml = StandInNvml()
    config = standin_engine_toml("e", free_port(), gpu_devices=[0])
    daemon, ext = _build_alerting(config, nvml, xid_wait_timeout_ms=50, boot_id="boot-A")
    async with run_built(daemon):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        nvml.xids.put((0, 48))
        await _until(lambda: _engine(daemon, "e")["state"] == "stopped", 30)
        await _until(lambda: "gpu.reset_required:0" in _open_episodes(daemon))
        await anyio.sleep(0.5)
        assert not _resolved(daemon, "gpu.reset_required:0")
        await daemon.start("e")  # after `nvidia-smi -r -i 0`
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        await anyio.sleep(0.5)  # ready, but not on the GPU yet: no evidence the GPU works
        assert not _resolved(daemon, "gpu.reset_required:0")
        nvml.hold(_engine(daemon, "e")["pid"], 4 * GIB, device=0)
        await _until(lambda: bool(_resolved(daemon, "gpu.reset_required:0")), 10)
        assert "e" in _resolved(daemon, "gpu.reset_required:0")[0]["summary"]
        assert "gpu.reset_required:0" not in _open_episodes(daemon)


# ---- orphans from an earlier run, found at the daemon's start ------------------------------------


def _tagged_orphan(daemon: Daemon, engine: str) -> subprocess.Popen:
    """A process of an earlier run of this daemon (its tag), as a daemon killed mid-run leaves behind."""
    return subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"], start_new_session=True,
                            env={**os.environ, "SUPERVISORD_LLM_TAG": f"{daemon.daemon_id}/{engine}/old"})


@pytest.mark.anyio
async def test_daemon_start_waits_until_nvml_shows_killed_orphans_memory_back_before_engines_start() -> None:
    """Orphans killed at daemon start: engines start only once NVML no longer lists their memory; an event says how long."""
    nvml = StandInNvml()
    nvml.linger_s = 0.8  # the driver still lists a dead process's memory for a while
    daemon, ext = _build(standin_engine_toml("e", free_port(), gpu_devices=[0]), nvml)
    orphan = _tagged_orphan(daemon, "removed-engine")
    try:
        nvml.hold(orphan.pid, 6 * GIB)
        async with run_built(daemon):
            await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
            released = _events(daemon, "gpu.orphans_released")
            assert len(released) == 1, released
            r = released[0]
            assert (r["pids"], r["bytes"], r["memory_released"], r["still_listed"]) == ([orphan.pid], 6 * GIB, True, [])
            assert r["took_s"] >= 0.7 and r["waited_s"] <= r["took_s"]
            kinds = [e["kind"] for e in daemon.events.recent]
            assert kinds.index("daemon.orphans_killed") < kinds.index("gpu.orphans_released") \
                < kinds.index("daemon.started") < kinds.index("engine.spawned")
            assert orphan.poll() is not None or not _alive(orphan.pid)
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


@pytest.mark.anyio
async def test_orphan_memory_never_released_at_daemon_start_refuses_the_first_start() -> None:
    """An orphan's GPU memory still listed after `memory.return_wait`: said in the event, and no engine loads next to it."""
    nvml = StandInNvml()
    nvml.linger_s = float("inf")
    config = '[policies.memory]\nreturn_wait = "1s"\n\n' + standin_engine_toml("e", free_port(), gpu_devices=[0])
    daemon, ext = _build(config, nvml)
    orphan = _tagged_orphan(daemon, "removed-engine")
    try:
        nvml.hold(orphan.pid, 6 * GIB)
        async with run_built(daemon):
            await _until(lambda: _engine(daemon, "e")["state"] in ("backoff", "failed"), 30)
            r = _events(daemon, "gpu.orphans_released")[0]
            assert r["memory_released"] is False and r["still_listed"] == [orphan.pid] and r["waited_s"] >= 0.9
            assert f"held by pid {orphan.pid}" in _engine(daemon, "e")["last_exit"]["reason"]
            assert not _events(daemon, "engine.spawned")
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


@pytest.mark.slow
@pytest.mark.anyio
async def test_gpu_memory_past_its_watermarks_warns_then_drains_and_restarts() -> None:
    """An engine's GPU memory (NVML) over gpu_footprint x 1.1 warns once; over x 1.3 it is drained and
    restarted through the backoff, with a critical alert naming the GPU bytes."""
    from supervisord_llm.subsystems.memory_guard import MemoryGuardExtension

    nvml = StandInNvml()
    daemon, _ = _build(standin_engine_toml("e", free_port(), gpu_devices=[0], gpu_footprint="10GiB",
                                           footprint="100MB"), nvml)
    daemon.extensions.append(MemoryGuardExtension(daemon))
    async with run_built(daemon):
        await _until(lambda: _engine(daemon, "e")["state"] == "ready", 30)
        root = _engine(daemon, "e")["pid"]
        mem = _engine(daemon, "e")["memory"]
        assert (mem["gpu_soft_bytes"], mem["gpu_hard_bytes"]) == (round(11 * GIB), 13 * GIB)
        nvml.hold(root, 12 * GIB)
        await _until(lambda: any(e["key"] == "engine.gpu_memory_high:e" for e in _events(daemon, "alert.raised")))
        assert _engine(daemon, "e")["state"] == "ready"
        nvml.hold(root, 14 * GIB)
        await _until(lambda: _engine(daemon, "e")["state"] == "backoff", 20)
        engine = _engine(daemon, "e")
        assert "GPU memory" in engine["state_reason"] and "memory guard" in engine["state_reason"]
        alerts = [e for e in _events(daemon, "alert.raised") if e["key"].startswith("engine.gpu_memory")]
        assert [(a["key"], a["severity"]) for a in alerts] == [("engine.gpu_memory_high:e", "warning"),
                                                               ("engine.gpu_memory_exceeded:e", "critical")]
        assert alerts[1]["details"]["held_bytes"] == 14 * GIB and alerts[1]["details"]["source"] == "nvml"
        assert engine["next_start_in_s"] >= 50, "the restart waits out the backoff"
