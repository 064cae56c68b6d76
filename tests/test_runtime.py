"""Event loop choice and stop signals, with the Windows branch run by simulating the platform."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest

from proxy import runtime


def test_uvloop_on_posix_and_never_on_windows() -> None:
    factory, name = runtime.loop_factory("linux")
    assert name == "uvloop"
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    factory, name = runtime.loop_factory("win32")
    assert (factory, name) == (asyncio.new_event_loop, "asyncio")


def test_default_loop_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    assert runtime.loop_factory("linux")[1] == "asyncio"


class FakeKernel32:
    """Records what the Windows branch asks of kernel32, as ctypes would pass it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, bool]] = []

    def SetConsoleCtrlHandler(self, handler: Any, add: bool) -> int:
        self.calls.append((handler, add))
        return 1


async def test_windows_console_shutdown_event_stops_gracefully() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    kernel32 = FakeKernel32()
    signals = runtime.StopSignals(loop, stop, platform="win32", kernel32=kernel32, wait_limit=5)
    signals.install()
    assert len(kernel32.calls) == 1
    handler, add = kernel32.calls[0]
    assert add is True
    assert callable(handler)

    # Windows calls the handler on a thread of its own, and ends the process when it returns.
    returned: list[tuple[int, float]] = []

    def windows_delivers() -> None:
        result = handler(runtime.CTRL_SHUTDOWN_EVENT)  # through the real ctypes callback
        returned.append((result, time.monotonic()))

    thread = threading.Thread(target=windows_delivers)
    thread.start()
    await asyncio.wait_for(stop.wait(), timeout=2)
    assert signals.received == "CTRL_SHUTDOWN_EVENT"
    await asyncio.sleep(0.2)  # graceful shutdown in progress: the handler must still be blocking
    assert returned == []
    finished = time.monotonic()
    signals.mark_stopped()
    await asyncio.to_thread(thread.join, 2)
    assert returned
    assert returned[0][0] == 1
    assert returned[0][1] >= finished
    signals.uninstall()
    assert kernel32.calls[-1] == (handler, False)


async def test_windows_ctrl_c_does_not_block_and_other_events_pass_on() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = runtime.StopSignals(loop, stop, platform="win32", kernel32=FakeKernel32(), wait_limit=5)
    signals.install()
    assert signals.on_console_event(99) == 0  # not ours
    assert await asyncio.to_thread(signals.on_console_event, runtime.CTRL_C_EVENT) == 1
    await asyncio.wait_for(stop.wait(), timeout=2)
    assert signals.received == "CTRL_C_EVENT"


async def test_windows_handler_gives_up_waiting_before_windows_kills() -> None:
    loop = asyncio.get_running_loop()
    signals = runtime.StopSignals(
        loop, asyncio.Event(), platform="win32", kernel32=FakeKernel32(), wait_limit=0.2
    )
    signals.install()
    started = time.monotonic()
    assert await asyncio.to_thread(signals.on_console_event, runtime.CTRL_CLOSE_EVENT) == 1
    assert time.monotonic() - started < 2


async def test_windows_branch_never_touches_posix_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    def refuse(*_args: Any) -> None:
        raise NotImplementedError("add_signal_handler is not available on Windows")

    monkeypatch.setattr(loop, "add_signal_handler", refuse)
    runtime.StopSignals(
        loop, asyncio.Event(), platform="win32", kernel32=FakeKernel32(), wait_limit=5
    ).install()


async def test_posix_sigterm_sets_the_stop_event() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = runtime.StopSignals(loop, stop, platform="linux", wait_limit=5)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=2)
        assert signals.received == "SIGTERM"
    finally:
        signals.uninstall()


def test_the_console_handler_waits_the_configured_budget_plus_the_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cli.run on a simulated Windows: a stop that overruns is let go at budget + STOP_ALLOWANCE."""
    from proxy import cli

    budget = 0.3
    kernel32 = FakeKernel32()
    real = runtime.StopSignals

    def on_windows(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, **kwargs: Any) -> Any:
        return real(loop, stop, platform="win32", kernel32=kernel32, **kwargs)

    monkeypatch.setattr(cli, "StopSignals", on_windows)
    monkeypatch.setattr(cli, "loop_factory", lambda: (asyncio.new_event_loop, "asyncio"))
    waited: list[float] = []

    async def overrunning_stop(stop: asyncio.Event, _loop_name: str) -> None:
        handler = kernel32.calls[0][0]

        def windows_delivers() -> None:
            delivered = time.monotonic()
            handler(runtime.CTRL_SHUTDOWN_EVENT)  # blocks until the stop is done or the limit
            waited.append(time.monotonic() - delivered)

        thread = threading.Thread(target=windows_delivers)
        thread.start()
        await asyncio.wait_for(stop.wait(), timeout=2)
        # This stop never finishes in time: the handler must give up on its own.
        await asyncio.wait_for(asyncio.to_thread(thread.join), timeout=5)

    assert cli.run(overrunning_stop, shutdown_timeout=budget) == 0
    assert waited
    expected = budget + runtime.STOP_ALLOWANCE
    assert expected - 0.05 <= waited[0] < expected + 0.5, waited


def test_serve_and_demo_hand_the_settings_budget_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import cli

    budgets: list[float] = []

    def record(_main: Any, *, shutdown_timeout: float = -1.0) -> int:  # serves nothing
        budgets.append(shutdown_timeout)
        return 0

    monkeypatch.setattr(cli, "run", record)
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)  # the test run's logging stays
    assert cli.main(["serve", "--hostip", "127.0.0.1", "--shutdown-timeout", "1.5"]) == 0
    assert cli.main(["demo", "--shutdown-timeout", "2.5"]) == 0
    assert cli.main(["fake-exporter"]) == 0
    assert budgets == [1.5, 2.5, -1.0]  # the fake exporter keeps run()'s default
    assert runtime.console_wait_limit(cli.DEFAULT_SHUTDOWN_TIMEOUT) == 4.5  # inside Windows' ~5 s
