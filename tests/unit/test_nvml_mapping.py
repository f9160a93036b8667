"""NVML probe: mapping of NVML answers to readings, calm unavailability, and the XID watcher thread.

NVML cannot run without an NVIDIA driver, so these tests inject a stand-in module exposing the
pynvml functions the probe calls. The real pynvml is used where it can run: without a driver here
(unavailable, calmly) and on a GPU machine (the ``gpu`` test).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from probes.nvml import NvmlProbe, XidWatcher, gpu_bytes_for_pids, xid_needs_reboot, xid_needs_reset
from probes.readings import GpuDeviceReading, GpuProcessReading, GpuReading, XidEvent

GIB = 1024**3


class StandInNvml:
    """The subset of pynvml the probe uses, answering from plain data."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    nvmlEventTypeXidCriticalError = 8

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            self.value = value
            super().__init__(f"NVML error {value}")

    def __init__(self, devices: list[dict], *, init_error: int | None = None, register_error: int | None = None):
        self.devices = devices
        self.init_error = init_error
        self.register_error = register_error
        self.init_calls = 0
        self.shutdown_calls = 0
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.freed_sets: list[object] = []
        self.wait_error: int | None = None

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(index=index, **self.devices[index])

    def nvmlDeviceGetIndex(self, handle: SimpleNamespace) -> int:
        return handle.index

    def nvmlDeviceGetName(self, handle):
        return handle.name

    def nvmlDeviceGetUUID(self, handle):
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        if handle.lost:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(total=handle.total, used=handle.used, free=handle.total - handle.used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle.util is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=handle.util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in handle.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in handle.graphics]

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, handle, event_types: int, event_set) -> None:
        assert event_types == self.nvmlEventTypeXidCriticalError
        if self.register_error is not None:
            raise self.NVMLError(self.register_error)

    def nvmlEventSetWait(self, event_set, timeout_ms: int):
        if self.wait_error is not None:
            time.sleep(0.001)
            raise self.NVMLError(self.wait_error)
        try:
            index, xid = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise self.NVMLError(self.NVML_ERROR_TIMEOUT) from None
        handle = self.nvmlDeviceGetHandleByIndex(index)
        return SimpleNamespace(device=handle, eventType=self.nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, event_set) -> None:
        self.freed_sets.append(event_set)


def _device(name="NVIDIA H100 80GB HBM3", total=80 * GIB, used=0, util=0, compute=(), graphics=(), lost=False):
    return dict(
        name=name, uuid=f"GPU-{name[-4:]}-{total}", total=total, used=used, util=util,
        compute=list(compute), graphics=list(graphics), lost=lost,
    )


def test_reading_maps_devices_and_processes() -> None:
    """Each GPU's memory, utilisation and per-process memory come through in bytes; bytes names become text."""
    nvml = StandInNvml([
        _device(used=70 * GIB, util=97, compute=[(4242, 60 * GIB), (4243, 9 * GIB)]),
        _device(name=b"NVIDIA A10", total=24 * GIB, used=GIB, util=3, graphics=[(77, GIB)]),
    ])
    reading = NvmlProbe(nvml).read(5.0)
    assert reading.available and reading.reason is None and reading.at_s == 5.0
    first, second = reading.devices
    assert first == GpuDeviceReading(
        index=0, name="NVIDIA H100 80GB HBM3", uuid=first.uuid, total_bytes=80 * GIB, used_bytes=70 * GIB,
        free_bytes=10 * GIB, utilization_percent=97,
        processes=(GpuProcessReading(4242, 60 * GIB), GpuProcessReading(4243, 9 * GIB)),
    )
    assert second.name == "NVIDIA A10" and second.processes == (GpuProcessReading(77, GIB),)


def test_process_in_both_lists_is_counted_once_and_unknown_memory_as_zero() -> None:
    """A process with compute and graphics contexts counts once (the larger); memory NVML cannot tell is 0."""
    nvml = StandInNvml([_device(compute=[(10, 5 * GIB), (11, None)], graphics=[(10, 2 * GIB)])])
    (device,) = NvmlProbe(nvml).read(0.0).devices
    assert device.processes == (GpuProcessReading(10, 5 * GIB), GpuProcessReading(11, 0))


def test_utilization_not_supported_is_none() -> None:
    """A board that cannot report utilisation gives None, not a failed reading."""
    (device,) = NvmlProbe(StandInNvml([_device(util=None)])).read(0.0).devices
    assert device.utilization_percent is None


def test_lost_gpu_is_named_while_the_others_are_still_read() -> None:
    """A GPU that fell off the bus is named in the reason; the healthy GPUs are still reported."""
    nvml = StandInNvml([_device(lost=True), _device(name="NVIDIA L40S", used=GIB)])
    reading = NvmlProbe(nvml).read(0.0)
    assert reading.available
    assert [d.index for d in reading.devices] == [1]
    assert reading.reason is not None and "device 0" in reading.reason and "15" in reading.reason


def test_init_failure_is_reported_calmly_and_only_tried_once() -> None:
    """When NVML cannot initialise, every reading says unavailable with the same reason and nothing is retried or raised."""
    nvml = StandInNvml([_device()], init_error=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    probe = NvmlProbe(nvml)
    first, second = probe.read(1.0), probe.read(2.0)
    assert not probe.available
    assert first == GpuReading(at_s=1.0, available=False, reason=first.reason)
    assert first.reason == second.reason and "NVML error 9" in first.reason
    assert nvml.init_calls == 1


def test_close_shuts_nvml_down() -> None:
    """Closing the probe calls nvmlShutdown once for the one nvmlInit."""
    nvml = StandInNvml([_device()])
    probe = NvmlProbe(nvml)
    assert probe.available
    probe.close()
    probe.close()
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_gpu_bytes_for_pids_sums_an_engines_tree_across_devices() -> None:
    """An engine's GPU memory is the sum over its pids on all devices; other processes do not count."""
    nvml = StandInNvml([
        _device(compute=[(100, 30 * GIB), (999, 5 * GIB)]),
        _device(compute=[(101, 30 * GIB)]),
    ])
    reading = NvmlProbe(nvml).read(0.0)
    assert gpu_bytes_for_pids(reading, (100, 101, 102)) == 60 * GIB
    assert gpu_bytes_for_pids(reading, []) == 0
    assert gpu_bytes_for_pids(GpuReading(at_s=0.0, available=False, reason="x"), [100]) == 0


@pytest.mark.parametrize(
    ("xid", "reboot", "reset"),
    [(79, True, False), (48, False, True), (62, False, True), (64, False, True), (95, False, True),
     (119, False, True), (120, False, True), (13, False, False), (31, False, False), (43, False, False)],
)
def test_xid_classification(xid: int, reboot: bool, reset: bool) -> None:
    """XID 79 asks for a reboot, the listed hardware XIDs for a GPU reset, application XIDs (13, 31, 43) for neither."""
    assert (xid_needs_reboot(xid), xid_needs_reset(xid)) == (reboot, reset)


def _collector() -> tuple[list[XidEvent], threading.Event, Callable[[XidEvent], None]]:
    events: list[XidEvent] = []
    arrived = threading.Event()

    def on_event(event: XidEvent) -> None:
        events.append(event)
        arrived.set()

    return events, arrived, on_event


def test_xid_watcher_delivers_events_and_stops() -> None:
    """An XID on GPU 1 reaches the callback with its device and number; stop() ends the thread and frees NVML."""
    nvml = StandInNvml([_device(), _device()])
    events, arrived, on_event = _collector()
    watcher = XidWatcher(nvml, on_event, wait_timeout_ms=50, clock=lambda: 123.0)
    assert watcher.start()
    assert watcher.registered_devices == (0, 1)
    time.sleep(0.15)  # a few empty waits (timeouts) first
    nvml.events.put((1, 79))
    assert arrived.wait(5.0)
    assert events == [XidEvent(at_s=123.0, device_index=1, xid=79)]
    watcher.stop()
    assert not watcher.running
    assert len(nvml.freed_sets) == 1 and nvml.shutdown_calls == 1


def test_xid_watcher_survives_a_failing_callback() -> None:
    """A callback that raises is recorded and the next XID is still delivered."""
    nvml = StandInNvml([_device()])
    seen: list[int] = []
    second = threading.Event()

    def on_event(event: XidEvent) -> None:
        seen.append(event.xid)
        if len(seen) == 1:
            raise RuntimeError("alert queue full")
        second.set()

    watcher = XidWatcher(nvml, on_event, wait_timeout_ms=20)
    assert watcher.start()
    try:
        nvml.events.put((0, 48))
        nvml.events.put((0, 62))
        assert second.wait(5.0)
        assert seen == [48, 62]
        assert watcher.last_error is not None and "alert queue full" in watcher.last_error
    finally:
        watcher.stop()


def test_xid_watcher_does_not_spin_on_a_persistent_wait_error() -> None:
    """A wait that keeps failing (GPU lost) is retried at the wait interval, not in a tight loop."""
    nvml = StandInNvml([_device()])
    calls = 0
    original = nvml.nvmlEventSetWait

    def counting_wait(event_set, timeout_ms):
        nonlocal calls
        calls += 1
        return original(event_set, timeout_ms)

    nvml.nvmlEventSetWait = counting_wait
    nvml.wait_error = StandInNvml.NVML_ERROR_GPU_IS_LOST
    watcher = XidWatcher(nvml, lambda e: None, wait_timeout_ms=100)
    assert watcher.start()
    time.sleep(0.5)
    watcher.stop()
    assert 1 <= calls <= 10
    assert watcher.last_error is not None and "15" in watcher.last_error


def test_xid_watcher_unsupported_device_says_why() -> None:
    """Where XID events cannot be registered, start() returns False and the reason names the device."""
    nvml = StandInNvml([_device()], register_error=StandInNvml.NVML_ERROR_NOT_SUPPORTED)
    watcher = XidWatcher(nvml, lambda e: None, wait_timeout_ms=20)
    assert watcher.start() is False
    watcher.stop()
    assert watcher.reason is not None and "device 0" in watcher.reason
    assert not watcher.running and nvml.shutdown_calls == 1


def _nvml_has_driver() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_pynvml_without_driver_is_unavailable_without_raising() -> None:
    """On a machine without an NVIDIA driver the real probe and watcher report unavailable with a reason, raising nothing."""
    if _nvml_has_driver():
        pytest.skip("this machine has an NVIDIA driver; the gpu test covers it")
    probe = NvmlProbe()
    reading = probe.read(1.0)
    assert not probe.available
    assert reading.available is False and reading.devices == ()
    assert reading.reason is not None and "NVML" in reading.reason
    watcher = XidWatcher(None, lambda e: None)
    assert watcher.start() is False
    watcher.stop()
    assert watcher.reason is not None and "NVML" in watcher.reason


# A process that holds GPU memory through the CUDA driver API (no framework needed).
_CUDA_HOLDER = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
device = ctypes.c_int()
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
context = ctypes.c_void_p()
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0
assert cuda.cuCtxSetCurrent(context) == 0
pointer = ctypes.c_uint64()
assert cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(1 << 30)) == 0
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.gpu
def test_real_gpu_process_memory_maps_to_its_pid() -> None:
    """On a real NVIDIA GPU, a process holding 1 GiB shows up under its pid with at least that much memory."""
    if not _nvml_has_driver() or ctypes.util.find_library("cuda") is None:
        pytest.skip("needs an NVIDIA GPU with its driver")
    holder = subprocess.Popen([sys.executable, "-c", _CUDA_HOLDER], stdout=subprocess.PIPE, text=True)
    probe = NvmlProbe()
    try:
        assert holder.stdout.readline().strip() == "ready"
        reading = probe.read(0.0)
        assert reading.available and reading.devices
        device = reading.devices[0]
        assert device.total_bytes > device.used_bytes >= GIB
        assert device.free_bytes == pytest.approx(device.total_bytes - device.used_bytes, rel=0.05)
        assert device.name and device.uuid.startswith("GPU-")
        print(f"device {device.name}: {[(p.pid, p.used_bytes) for p in device.processes]}")
        assert gpu_bytes_for_pids(reading, [holder.pid]) >= GIB
        assert gpu_bytes_for_pids(reading, [os.getpid()]) == 0
        watcher = XidWatcher(None, lambda e: None, wait_timeout_ms=100)
        started = watcher.start()
        print(f"xid watcher started={started} devices={watcher.registered_devices} reason={watcher.reason}")
        watcher.stop()
        assert not watcher.running
        assert started and watcher.registered_devices, f"the XID watcher did not start: {watcher.reason}"
    finally:
        probe.close()
        holder.kill()
        holder.wait()
        holder.stdout.close()
