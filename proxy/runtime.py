"""The event loop and stop signals, per platform. With winprocess.py (process_* self-metrics over the
Win32 API), the only module that knows it might be on Windows.

POSIX: uvloop when importable, SIGTERM/SIGINT through the loop's signal handlers.
Windows: the default asyncio loop (uvloop has no Windows support), and a console control handler,
because a container stop arrives as CTRL_SHUTDOWN_EVENT/CTRL_CLOSE_EVENT, which asyncio never turns
into anything, and Windows kills the process about 5 s after delivering it. The handler runs on a
thread Windows creates; it asks the loop to stop and then blocks until the stop is done, since
returning from the handler for those events lets Windows end the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("proxy.runtime")

# How long the console handler waits beyond the stop budget (PROXY_SHUTDOWN_TIMEOUT): when the
# budget is spent the stop aborts what is still in flight, and then needs a moment to unwind the
# aborted handlers, let aiohttp sweep up and close the exporter pool (server.py). With the default
# budget, 4.0 + 0.5 = 4.5 s, inside the about 5 s Windows gives a stopping container.
STOP_ALLOWANCE = 0.5


def console_wait_limit(shutdown_timeout: float) -> float:
    """How long a console handler blocks for a stop with this budget before letting Windows end it."""
    return shutdown_timeout + STOP_ALLOWANCE


# wincon.h
CTRL_C_EVENT = 0
CTRL_BREAK_EVENT = 1
CTRL_CLOSE_EVENT = 2
CTRL_LOGOFF_EVENT = 5
CTRL_SHUTDOWN_EVENT = 6
STOP_EVENTS = frozenset(
    {CTRL_C_EVENT, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT}
)


def is_windows(platform: str | None = None) -> bool:
    return (platform or sys.platform) == "win32"


def loop_factory(platform: str | None = None) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The loop constructor to run with, and its name for build info."""
    if not is_windows(platform):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


class StopSignals:
    """Turns the platform's stop requests into one asyncio.Event, and waits for shutdown on Windows.

    wait_limit: the longest a console handler blocks for the stop (console_wait_limit of the
    budget). Past it, the handler returns and Windows ends the process, stopped or not.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stop: asyncio.Event,
        *,
        platform: str | None = None,
        kernel32: Any = None,
        wait_limit: float,
    ) -> None:
        self.loop = loop
        self.stop = stop
        self.platform = platform or sys.platform
        self._kernel32 = kernel32
        self._wait_limit = wait_limit
        self._stopped = threading.Event()
        self._console_handler: Any = None
        self._posix_signals: list[int] = []
        self.received: str | None = None

    def install(self) -> None:
        if is_windows(self.platform):
            self._install_console_handler()
        else:
            self._install_posix()

    def uninstall(self) -> None:
        for signum in self._posix_signals:
            with contextlib.suppress(Exception):
                self.loop.remove_signal_handler(signum)
        self._posix_signals.clear()
        if self._console_handler is not None:
            with contextlib.suppress(Exception):
                self._kernel32.SetConsoleCtrlHandler(self._console_handler, False)

    def mark_stopped(self) -> None:
        """Graceful shutdown is complete; release a console handler that is waiting for it."""
        self._stopped.set()

    def _request_stop(self, why: str) -> None:
        if self.received is None:
            self.received = why
            log.info("stopping", extra={"fields": {"signal": why}})
        self.stop.set()

    def _install_posix(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._request_stop, signal.Signals(signum).name)
            self._posix_signals.append(signum)

    def _install_console_handler(self) -> None:
        if self._kernel32 is None:
            self._kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        # WINFUNCTYPE exists only on Windows; CFUNCTYPE stands in when the branch is simulated.
        functype = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)
        prototype = functype(ctypes.c_int, ctypes.c_ulong)
        self._console_handler = prototype(self.on_console_event)
        if not self._kernel32.SetConsoleCtrlHandler(self._console_handler, True):
            log.warning("SetConsoleCtrlHandler failed; only a forced kill will stop the proxy")

    def on_console_event(self, event: int) -> int:
        """Runs on a thread Windows creates. Returns 1 (handled) or 0 (pass on)."""
        if event not in STOP_EVENTS:
            return 0
        names = {
            CTRL_C_EVENT: "CTRL_C_EVENT",
            CTRL_BREAK_EVENT: "CTRL_BREAK_EVENT",
            CTRL_CLOSE_EVENT: "CTRL_CLOSE_EVENT",
            CTRL_LOGOFF_EVENT: "CTRL_LOGOFF_EVENT",
            CTRL_SHUTDOWN_EVENT: "CTRL_SHUTDOWN_EVENT",
        }
        try:
            self.loop.call_soon_threadsafe(self._request_stop, names[event])
        except RuntimeError:  # the loop is already closed
            return 1
        if event in (CTRL_C_EVENT, CTRL_BREAK_EVENT):
            return 1  # the process lives on after these; the loop finishes the stop itself
        # For close, logoff and shutdown, returning lets Windows end the process at once.
        self._stopped.wait(self._wait_limit)
        return 1
