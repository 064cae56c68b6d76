"""Processes under test: start each in its own process group, wait until it listens, always reap it.

Also the /proc readings: CPU seconds (utime + stime) and RSS (VmRSS, VmHWM) of a process and its
descendants (nginx's master and workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 6.0  # the proxy's graceful stop takes up to its shutdown timeout (4 s)


class ServerError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The process and every descendant still alive (nginx: master and workers)."""
        return [self.pid, *descendants(self.pid)]


@dataclass
class Supervisor:
    """Owns every process the benchmark starts; `close()` (or leaving the `with`) kills them all."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: killed as one, immune to our ^C
            )
        proc = Proc(name, list(argv), log_path, popen, port)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float, name: str = "tool") -> tuple[int, str, str]:
        """A bounded foreground command (wrk), in its own group so ^C here still reaps it."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        proc = Proc(name, list(argv), self.workdir / "unused.log", popen)
        self.procs.append(proc)
        try:
            out, err = popen.communicate(timeout=timeout)
        except BaseException:  # a timeout, or ^C: it must not outlive us
            self.stop(proc)
            raise
        self.procs.remove(proc)
        return popen.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def wait_listening(self, proc: Proc, *, timeout: float = START_TIMEOUT) -> None:
        """Poll until the port accepts a connection; fail early if the process died."""
        assert proc.port is not None
        deadline = time.monotonic() + timeout
        while True:
            if proc.popen.poll() is not None:
                raise ServerError(
                    f"{proc.name} exited with {proc.popen.returncode} before listening:\n{proc.log_tail()}"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((LOOPBACK, proc.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{proc.name} did not listen on {LOOPBACK}:{proc.port} within {timeout:.0f} s:\n"
                    f"{proc.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, and reap the leader."""
        if proc.popen.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=timeout)
        # Stragglers of the group (an nginx worker whose master died) go too.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid, found through the parent pid in /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given processes, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def memory_kib(pids: Iterable[int], key: str) -> int:
    """Sum of a /proc/<pid>/status field in KiB: VmRSS (now) or VmHWM (peak)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(f"{key}:"):
                total += int(line.split()[1])
                break
    return total
