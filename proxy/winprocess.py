"""process_* self-metrics on Windows, from the Win32 API through ctypes.

prometheus-client's ProcessCollector reads /proc, which Windows has not, so a Windows pod would
report no process_* series at all; this collector gives the same three that matter most, with the
names, help and units ProcessCollector (and client_golang's Windows collector) use:

- process_cpu_seconds_total: GetProcessTimes' user plus kernel time (FILETIMEs in 100 ns units);
- process_start_time_seconds: GetProcessTimes' creation time (a FILETIME counted from 1601-01-01 UTC);
- process_resident_memory_bytes: K32GetProcessMemoryInfo's WorkingSetSize (kernel32's export of
  psapi's GetProcessMemoryInfo, present since Windows 7, so psapi.dll need not be in the image).

Nothing here touches ctypes.windll at import time, so the module imports (and is tested) on Linux:
the kernel32 object is injected, as runtime.StopSignals takes one, and loaded only on first use.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("proxy.winprocess")

# FILETIME ticks are 100 ns; the FILETIME of 1970-01-01T00:00:00Z, counted from 1601-01-01.
TICKS_PER_SECOND = 10_000_000
UNIX_EPOCH_AS_FILETIME = 116_444_736_000_000_000


class FILETIME(ctypes.Structure):
    # DWORD is 32 bits on every Windows; c_uint32, not c_ulong, so the layout holds on Linux too.
    _fields_ = [("dwLowDateTime", ctypes.c_uint32), ("dwHighDateTime", ctypes.c_uint32)]

    @property
    def ticks(self) -> int:
        return (self.dwHighDateTime << 32) | self.dwLowDateTime


class PROCESS_MEMORY_COUNTERS(ctypes.Structure):
    _fields_ = [
        ("cb", ctypes.c_uint32),
        ("PageFaultCount", ctypes.c_uint32),
        ("PeakWorkingSetSize", ctypes.c_size_t),
        ("WorkingSetSize", ctypes.c_size_t),
        ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
        ("QuotaPagedPoolUsage", ctypes.c_size_t),
        ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
        ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
        ("PagefileUsage", ctypes.c_size_t),
        ("PeakPagefileUsage", ctypes.c_size_t),
    ]


def load_kernel32() -> Any:
    """kernel32 with the prototypes this module calls (Windows only).

    The prototypes matter on 64-bit Windows: ctypes' default int return would truncate
    GetCurrentProcess's pseudo-handle, (HANDLE)-1, to 32 bits, and the calls would then fail.
    """
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = ctypes.c_void_p
    kernel32.GetCurrentProcess.argtypes = []
    kernel32.GetCurrentProcess.restype = handle
    times = ctypes.POINTER(FILETIME)
    kernel32.GetProcessTimes.argtypes = [handle, times, times, times, times]
    kernel32.GetProcessTimes.restype = ctypes.c_int
    kernel32.K32GetProcessMemoryInfo.argtypes = [
        handle,
        ctypes.POINTER(PROCESS_MEMORY_COUNTERS),
        ctypes.c_uint32,
    ]
    kernel32.K32GetProcessMemoryInfo.restype = ctypes.c_int
    return kernel32


class WindowsProcessCollector:
    """What ProcessCollector gives on Linux, for the current process on Windows.

    A failed call leaves its metrics out of that scrape rather than raising: an exception in a
    collector would fail the whole /proxy/metrics response (and, at registration, the start). A
    kernel32 without these exports is logged once and then gives no process_* series at all.
    """

    def __init__(
        self, *, registry: CollectorRegistry | None = None, kernel32: Any = None, prefix: str = "process_"
    ) -> None:
        self._kernel32 = kernel32
        self._unavailable = False
        self._prefix = prefix
        if registry is not None:
            registry.register(self)

    @property
    def kernel32(self) -> Any:
        if self._kernel32 is None:
            self._kernel32 = load_kernel32()
        return self._kernel32

    def collect(self) -> Iterable[Metric]:
        if self._unavailable:
            return []
        try:
            kernel32 = self.kernel32
        except (OSError, AttributeError) as exc:
            self._unavailable = True
            log.warning("no process_* metrics: the Win32 calls are not available: %r", exc)
            return []
        process = kernel32.GetCurrentProcess()
        metrics: list[Metric] = []
        creation, exited, kernel, user = FILETIME(), FILETIME(), FILETIME(), FILETIME()
        # Pointers rather than byref(): the same to Windows, and a test's fake kernel32 can fill
        # them through .contents.
        pointer = ctypes.pointer
        if kernel32.GetProcessTimes(
            process, pointer(creation), pointer(exited), pointer(kernel), pointer(user)
        ):
            metrics.append(
                CounterMetricFamily(
                    f"{self._prefix}cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    value=(kernel.ticks + user.ticks) / TICKS_PER_SECOND,
                )
            )
            metrics.append(
                GaugeMetricFamily(
                    f"{self._prefix}start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=(creation.ticks - UNIX_EPOCH_AS_FILETIME) / TICKS_PER_SECOND,
                )
            )
        counters = PROCESS_MEMORY_COUNTERS()
        counters.cb = ctypes.sizeof(counters)
        if kernel32.K32GetProcessMemoryInfo(process, pointer(counters), counters.cb):
            metrics.append(
                GaugeMetricFamily(
                    f"{self._prefix}resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(counters.WorkingSetSize),
                )
            )
        return metrics
