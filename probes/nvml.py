"""NVIDIA GPUs through NVML (``import pynvml``, provided by the ``nvidia-ml-py`` distribution).

* :class:`NvmlProbe` reads per-device memory and utilisation and per-process GPU memory.
  Without the NVML library or driver it reports ``GpuReading(available=False, reason=...)``:
  a Mac or a CPU-only box is a normal machine, not an error.
* :func:`gpu_bytes_for_pids` maps per-process GPU memory onto one engine's process tree.
* :class:`XidWatcher` waits for XID critical errors in a worker thread and hands each to a callback.
  XID 79 (GPU fallen off the bus) needs a reboot; 48, 62, 64, 95, 119 and 120 need a GPU reset.

Every call here blocks (NVML is a C library); the daemon calls :meth:`NvmlProbe.read` in a worker
thread. The NVML module is injected (``nvml_module``) so the mapping can be tested without a GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from probes.readings import GpuDeviceReading, GpuProcessReading, GpuReading, XidEvent

__all__ = [
    "NvmlProbe",
    "XidWatcher",
    "gpu_bytes_for_pids",
    "xid_needs_reboot",
    "xid_needs_reset",
    "XID_REBOOT",
    "XID_RESET",
]

XID_REBOOT: frozenset[int] = frozenset({79})
XID_RESET: frozenset[int] = frozenset({48, 62, 64, 95, 119, 120})

# Fallbacks for stand-in modules that do not define the constants (values are NVML's own).
_NVML_ERROR_TIMEOUT = 10
_NVML_ERROR_NOT_SUPPORTED = 3
_XID_CRITICAL_ERROR_EVENT = 8


def xid_needs_reboot(xid: int) -> bool:
    """XID 79: the GPU has fallen off the bus; only a reboot brings it back."""
    return xid in XID_REBOOT


def xid_needs_reset(xid: int) -> bool:
    """XIDs after which the GPU needs a reset (double-bit ECC, unrecoverable faults, GSP errors)."""
    return xid in XID_RESET


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # pynvml builds the message through the library, which may be absent
        message = ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _load_pynvml() -> tuple[Any | None, str | None]:
    try:
        import pynvml
    except ImportError as exc:
        return None, f"nvidia-ml-py is not installed ({exc}); install it to read NVIDIA GPUs"
    return pynvml, None


class NvmlProbe:
    """GPU readings from NVML. ``nvml_module`` defaults to ``pynvml``; any object with the same functions works.

    NVML is initialised once, on first use. If that fails (no library, no driver, no device
    permission) the probe stays unavailable and every reading carries the same ``reason``:
    no exception, no retry storm. :meth:`close` shuts NVML down.
    """

    def __init__(self, nvml_module: Any | None = None) -> None:
        self._nvml: Any = nvml_module
        self._lock = threading.Lock()
        self._initialised = False
        self._reason: str | None = None
        self._tried = False

    def _ensure(self) -> bool:
        with self._lock:
            if self._tried:
                return self._initialised
            self._tried = True
            if self._nvml is None:
                self._nvml, self._reason = _load_pynvml()
                if self._nvml is None:
                    return False
            try:
                self._nvml.nvmlInit()
            except Exception as exc:  # NVMLError subclasses, OSError from ctypes, ...
                self._reason = f"NVML could not be initialised ({_describe(exc)}); no NVIDIA driver on this machine?"
                return False
            self._initialised = True
            return True

    @property
    def available(self) -> bool:
        """True when NVML initialised; the first access initialises it."""
        return self._ensure()

    @property
    def reason(self) -> str | None:
        """Why the probe is unavailable (None while it is available or not yet tried)."""
        return self._reason

    @property
    def module(self) -> Any | None:
        """The NVML module in use (for an :class:`XidWatcher` that should share it)."""
        return self._nvml

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass
                self._initialised = False
                self._tried = False

    def read(self, at_s: float) -> GpuReading:
        """One reading of every device. Blocking. Never raises for NVML errors.

        A device that fails to answer (e.g. "GPU is lost" after XID 79) is left out and named in
        ``reason`` while the other devices are still reported.
        """
        if not self._ensure():
            return GpuReading(at_s=at_s, available=False, reason=self._reason)
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return GpuReading(at_s=at_s, available=False, reason=f"NVML cannot count devices ({_describe(exc)})")
        devices: list[GpuDeviceReading] = []
        problems: list[str] = []
        for index in range(count):
            try:
                devices.append(self._read_device(index))
            except Exception as exc:
                problems.append(f"device {index}: {_describe(exc)}")
        return GpuReading(
            at_s=at_s, available=True, devices=tuple(devices), reason="; ".join(problems) or None
        )

    def _read_device(self, index: int) -> GpuDeviceReading:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization: int | None
        try:
            utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # NOT_SUPPORTED on some boards and in some MIG modes
            utilization = None
        return GpuDeviceReading(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            free_bytes=int(memory.free),
            utilization_percent=utilization,
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> tuple[GpuProcessReading, ...]:
        # A process with both a compute and a graphics context appears in both lists ("C+G");
        # NVML reports its memory once per context type, so take the larger, not the sum.
        used_by_pid: dict[int, int] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            function = getattr(self._nvml, getter, None)
            if function is None:
                continue
            try:
                infos = function(handle)
            except Exception:
                continue
            for info in infos:
                used = getattr(info, "usedGpuMemory", None)
                # None is NVML_VALUE_NOT_AVAILABLE (e.g. under some containers or WDDM).
                used_bytes = int(used) if used is not None else 0
                pid = int(info.pid)
                used_by_pid[pid] = max(used_by_pid.get(pid, 0), used_bytes)
        return tuple(GpuProcessReading(pid=pid, used_bytes=used) for pid, used in sorted(used_by_pid.items()))


def gpu_bytes_for_pids(reading: GpuReading, pids: Iterable[int]) -> int:
    """GPU memory (all devices) used by the given pids, e.g. ``ProcessTreeReading.pids`` of one engine.

    NVML reports host pids; inside a container without the host pid namespace they do not match.
    """
    wanted = set(pids)
    return sum(p.used_bytes for d in reading.devices for p in d.processes if p.pid in wanted)


class XidWatcher:
    """Waits for XID critical errors on every device in a worker thread; calls ``on_event(XidEvent)``.

    ``start()`` returns at once; ``stop()`` ends the thread within about ``wait_timeout_ms``.
    ``on_event`` runs in the watcher thread: hand the event to the event loop from there
    (e.g. ``anyio.from_thread.run_sync``). If events cannot be registered (no NVML, unsupported
    device), the thread ends and ``reason`` says why; ``registered_devices`` lists what is watched.
    """

    def __init__(
        self,
        nvml_module: Any | None,
        on_event: Callable[[XidEvent], None],
        *,
        wait_timeout_ms: int = 500,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if wait_timeout_ms <= 0:
            raise ValueError(f"wait_timeout_ms must be a positive number of milliseconds, got {wait_timeout_ms}")
        self._nvml = nvml_module
        self._on_event = on_event
        self._wait_timeout_ms = int(wait_timeout_ms)
        self._clock = clock
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.reason: str | None = None
        self.registered_devices: tuple[int, ...] = ()
        self.last_error: str | None = None  # the last failure of a wait or of on_event

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, ready_timeout_s: float = 5.0) -> bool:
        """Start watching; returns True when at least one device is registered for XID events."""
        if self._thread is not None:
            raise RuntimeError("XidWatcher.start() was already called; create a new watcher")
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()
        self._ready.wait(ready_timeout_s)
        return bool(self.registered_devices) and self.running

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        nvml = self._nvml
        if nvml is None:
            nvml, self.reason = _load_pynvml()
            if nvml is None:
                self._ready.set()
                return
            self._nvml = nvml
        try:
            nvml.nvmlInit()  # reference counted by NVML: safe alongside an NvmlProbe
        except Exception as exc:
            self.reason = f"NVML could not be initialised ({_describe(exc)})"
            self._ready.set()
            return
        event_set = None
        try:
            event_set, by_handle = self._register(nvml)
            self._ready.set()
            if event_set is None:
                return
            self._loop(nvml, event_set, by_handle)
        finally:
            self._ready.set()
            if event_set is not None:
                try:
                    nvml.nvmlEventSetFree(event_set)
                except Exception:
                    pass
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass

    def _register(self, nvml: Any) -> tuple[Any | None, list[tuple[Any, int]]]:
        xid_event = getattr(nvml, "nvmlEventTypeXidCriticalError", _XID_CRITICAL_ERROR_EVENT)
        try:
            event_set = nvml.nvmlEventSetCreate()
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.reason = f"cannot create an NVML event set ({_describe(exc)})"
            return None, []
        registered: list[int] = []
        by_handle: list[tuple[Any, int]] = []
        problems: list[str] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, xid_event, event_set)
            except Exception as exc:
                problems.append(f"device {index}: {_describe(exc)}")
                continue
            registered.append(index)
            by_handle.append((handle, index))
        self.registered_devices = tuple(registered)
        if problems:
            self.reason = "XID events not available on " + "; ".join(problems)
        if not registered:
            self.reason = self.reason or "no NVIDIA device to watch"
            try:
                nvml.nvmlEventSetFree(event_set)
            except Exception:
                pass
            return None, []
        return event_set, by_handle

    def _device_index(self, nvml: Any, device: Any, by_handle: list[tuple[Any, int]]) -> int:
        try:
            return int(nvml.nvmlDeviceGetIndex(device))
        except Exception:
            pass
        for handle, index in by_handle:
            if handle is device or handle == device:
                return index
        return -1

    def _loop(self, nvml: Any, event_set: Any, by_handle: list[tuple[Any, int]]) -> None:
        timeout_code = getattr(nvml, "NVML_ERROR_TIMEOUT", _NVML_ERROR_TIMEOUT)
        nvml_error = getattr(nvml, "NVMLError", Exception)
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(event_set, self._wait_timeout_ms)
            except nvml_error as exc:
                if getattr(exc, "value", None) == timeout_code:
                    continue
                # Anything else (GPU lost, driver unloading): note it and wait before trying again
                # so that a persistent failure does not spin a core.
                self.last_error = _describe(exc)
                self._stop.wait(self._wait_timeout_ms / 1000)
                continue
            event = XidEvent(
                at_s=self._clock(),
                device_index=self._device_index(nvml, data.device, by_handle),
                xid=int(data.eventData),
            )
            try:
                self._on_event(event)
            except Exception as exc:  # the watcher must outlive a faulty callback
                self.last_error = f"on_event failed: {_describe(exc)}"
