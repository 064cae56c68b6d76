"""The proxy's own metrics: no `_created` series, and process_* on Windows from the Win32 API.

The Windows collector runs here on Linux with a fake kernel32 that fills the structures as the real
one would, the way tests/test_runtime.py simulates the console handler.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, generate_latest

from proxy import winprocess
from proxy.fake_exporter import FakeExporter, Fault
from proxy.telemetry import Telemetry
from proxy.upstream import SCRAPE_TIMEOUT_HEADER
from proxy.winprocess import FILETIME, PROCESS_MEMORY_COUNTERS, WindowsProcessCollector
from tests.conftest import ProxyFactory
from tests.test_app import PROMETHEUS_ACCEPT, sample_value

# --- no _created series -----------------------------------------------------------------------------


async def test_self_metrics_have_no_created_series_but_counters_and_histograms_render(
    proxy: TestClient,
) -> None:
    assert (await proxy.get("/metrics")).status == 200  # one success: a counter and two histograms move
    text = await (await proxy.get("/proxy/metrics")).text()
    assert "_created" not in text
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="success"') == 1
    assert sample_value(text, "windows_metrics_proxy_scrapes_total") >= 1
    assert "# TYPE windows_metrics_proxy_upstream_first_byte_seconds histogram" in text
    first_byte = "windows_metrics_proxy_upstream_first_byte_seconds"
    assert sample_value(text, f"{first_byte}_bucket", 'le="+Inf"') == 1
    assert sample_value(text, f"{first_byte}_count") == 1
    assert sample_value(text, f"{first_byte}_sum") > 0

    response = await proxy.get("/proxy/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    om = await response.text()
    assert "_created" not in om
    assert om.endswith("# EOF\n")
    assert "# TYPE windows_metrics_proxy_upstream_requests counter" in om
    assert sample_value(om, "windows_metrics_proxy_upstream_requests_total", 'outcome="success"') == 1
    assert sample_value(om, f"{first_byte}_count") == 1


async def test_deadline_ratio_says_how_much_of_the_scrape_timeout_the_exporter_took(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter
) -> None:
    """The alert on scrapes close to their timeout reads this ratio, so it holds for any job's
    scrape_timeout: 0.5 s of a 2 s scrape (a 1.75 s deadline after the 0.25 s margin) is ~0.29."""
    fake.fault = Fault.LATENCY
    fake.latency = 0.5
    proxy = await make_proxy(port=fake_server.port)
    response = await proxy.get("/metrics", headers={SCRAPE_TIMEOUT_HEADER: "2"})
    assert response.status == 200
    await response.read()
    text = await (await proxy.get("/proxy/metrics")).text()
    ratio = "windows_metrics_proxy_upstream_deadline_ratio"
    assert sample_value(text, f"{ratio}_count") == 1
    assert 0.5 / 1.75 <= sample_value(text, f"{ratio}_sum") < 0.5
    assert sample_value(text, f"{ratio}_bucket", 'le="0.25"') == 0
    assert sample_value(text, f"{ratio}_bucket", 'le="0.5"') == 1


def test_created_series_are_left_out_per_registry_not_for_the_whole_process() -> None:
    telemetry = Telemetry()
    telemetry.scrapes.inc()
    assert b"_created" not in telemetry.render(None)[0]
    # The registry still has them (nothing global was switched off), and so has any other registry.
    assert telemetry.registry.get_sample_value("windows_metrics_proxy_scrapes_created") is not None
    other = CollectorRegistry()
    Counter("other_things", "Something else in the same process.", registry=other).inc()
    assert b"other_things_created " in generate_latest(other)


# --- process_* on Windows ----------------------------------------------------------------------------

# 2024-01-02T03:04:05.5Z as a FILETIME: 100 ns ticks since 1601-01-01T00:00:00Z.
START_UNIX = 1_704_164_645.5
START_FILETIME = 133_486_382_455_000_000
KERNEL_TICKS = 125_000_000  # 12.5 s
USER_TICKS = 32_500_000  # 3.25 s
WORKING_SET = 123_456_789
PSEUDO_HANDLE = 0xFFFF_FFFF_FFFF_FFFF  # (HANDLE)-1, what GetCurrentProcess returns


def set_filetime(pointer: Any, ticks: int) -> None:
    pointer.contents.dwLowDateTime = ticks & 0xFFFF_FFFF
    pointer.contents.dwHighDateTime = ticks >> 32


class FakeKernel32:
    """Answers as kernel32 would for a process with known times and working set."""

    def __init__(self, *, times_ok: bool = True, memory_ok: bool = True) -> None:
        self.times_ok = times_ok
        self.memory_ok = memory_ok
        self.handles: list[int] = []

    def GetCurrentProcess(self) -> int:
        return PSEUDO_HANDLE

    def GetProcessTimes(self, process: int, creation: Any, exited: Any, kernel: Any, user: Any) -> int:
        self.handles.append(process)
        if not self.times_ok:
            return 0
        set_filetime(creation, START_FILETIME)
        set_filetime(exited, 0)
        set_filetime(kernel, KERNEL_TICKS)
        set_filetime(user, USER_TICKS)
        return 1

    def K32GetProcessMemoryInfo(self, process: int, counters: Any, size: int) -> int:
        self.handles.append(process)
        assert size == ctypes.sizeof(PROCESS_MEMORY_COUNTERS) == counters.contents.cb
        if not self.memory_ok:
            return 0
        counters.contents.WorkingSetSize = WORKING_SET
        counters.contents.PeakWorkingSetSize = WORKING_SET * 2
        return 1


def test_filetime_constants_agree() -> None:
    assert (START_FILETIME - winprocess.UNIX_EPOCH_AS_FILETIME) / winprocess.TICKS_PER_SECOND == START_UNIX
    assert START_FILETIME > 1 << 32  # the high DWORD is exercised
    assert ctypes.sizeof(FILETIME) == 8


def test_windows_collector_reports_cpu_start_time_and_working_set() -> None:
    kernel32 = FakeKernel32()
    registry = CollectorRegistry(auto_describe=True)
    WindowsProcessCollector(registry=registry, kernel32=kernel32)
    assert registry.get_sample_value("process_cpu_seconds_total") == 15.75
    assert registry.get_sample_value("process_start_time_seconds") == START_UNIX
    assert registry.get_sample_value("process_resident_memory_bytes") == WORKING_SET
    assert kernel32.handles
    assert set(kernel32.handles) == {PSEUDO_HANDLE}
    text = generate_latest(registry).decode()
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert "process_cpu_seconds_total 15.75\n" in text
    assert "# TYPE process_start_time_seconds gauge" in text
    assert "# TYPE process_resident_memory_bytes gauge" in text


def test_a_failed_win32_call_leaves_its_metrics_out_without_breaking_the_page() -> None:
    telemetry = Telemetry(platform="win32", kernel32=FakeKernel32(times_ok=False))
    text = telemetry.render(None)[0].decode()
    assert "process_cpu_seconds_total" not in text
    assert "process_start_time_seconds" not in text
    assert sample_value(text, "process_resident_memory_bytes") == WORKING_SET
    telemetry = Telemetry(platform="win32", kernel32=FakeKernel32(memory_ok=False))
    text = telemetry.render(None)[0].decode()
    assert "process_resident_memory_bytes" not in text
    assert sample_value(text, "process_cpu_seconds_total") == 15.75


def test_telemetry_on_windows_uses_the_win32_collector_instead_of_proc() -> None:
    kernel32 = FakeKernel32()
    text = Telemetry(platform="win32", kernel32=kernel32).render(None)[0].decode()
    assert sample_value(text, "process_cpu_seconds_total") == 15.75
    assert sample_value(text, "process_start_time_seconds") == START_UNIX
    assert sample_value(text, "process_resident_memory_bytes") == WORKING_SET
    assert "process_virtual_memory_bytes" not in text  # ProcessCollector (/proc) is not there
    assert 'platform="win32"' in text
    assert "python_info{" in text
    assert "_created" not in text


def test_telemetry_on_linux_keeps_the_proc_collector_and_never_calls_kernel32() -> None:
    kernel32 = FakeKernel32()
    text = Telemetry(platform="linux", kernel32=kernel32).render(None)[0].decode()
    assert kernel32.handles == []
    assert sample_value(text, "process_virtual_memory_bytes") > 0  # only ProcessCollector has it
    assert sample_value(text, "process_resident_memory_bytes") > 0
    assert sample_value(text, "process_cpu_seconds_total") != 15.75


def test_kernel32_is_loaded_lazily_with_handle_sized_prototypes(monkeypatch: pytest.MonkeyPatch) -> None:
    functions = {
        name: SimpleNamespace(argtypes=None, restype=None)
        for name in ("GetCurrentProcess", "GetProcessTimes", "K32GetProcessMemoryInfo")
    }
    loaded: list[tuple[str, bool]] = []

    def win_dll(name: str, use_last_error: bool = False) -> SimpleNamespace:
        loaded.append((name, use_last_error))
        return SimpleNamespace(**functions)

    monkeypatch.setattr(ctypes, "WinDLL", win_dll, raising=False)
    collector = WindowsProcessCollector()
    assert loaded == []  # nothing at construction, nothing at import
    kernel32 = collector.kernel32
    assert loaded == [("kernel32", True)]
    assert collector.kernel32 is kernel32
    # A default int return would cut the pseudo-handle (HANDLE)-1 to 32 bits on 64-bit Windows.
    assert functions["GetCurrentProcess"].restype is ctypes.c_void_p
    assert functions["GetProcessTimes"].argtypes[0] is ctypes.c_void_p
    assert functions["K32GetProcessMemoryInfo"].argtypes[0] is ctypes.c_void_p


def test_a_kernel32_without_the_calls_gives_no_process_metrics_but_the_proxy_starts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def win_dll(name: str, use_last_error: bool = False) -> SimpleNamespace:
        return SimpleNamespace()  # no exports: setting a prototype raises AttributeError

    monkeypatch.setattr(ctypes, "WinDLL", win_dll, raising=False)
    telemetry = Telemetry(platform="win32")
    text = telemetry.render(None)[0].decode()
    text += telemetry.render(None)[0].decode()
    assert "process_" not in text
    assert "windows_metrics_proxy_build_info{" in text
    warnings = [r for r in caplog.records if r.name == "proxy.winprocess"]
    assert len(warnings) == 1  # once, not per scrape
    assert "not available" in warnings[0].getMessage()


def test_the_windows_modules_import_on_linux_without_windll() -> None:
    code = "import ctypes, proxy.winprocess, proxy.telemetry; assert not hasattr(ctypes, 'windll')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
