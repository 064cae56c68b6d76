"""Load: wrk runs (bounded in time) with a Lua `done` hook that prints exact numbers as JSON, and a
plain sequential HTTP/1.1 client for warm-up and for the size of one response body.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import LOOPBACK, Supervisor

# What Prometheus 2.x sends (scrape_protocols at their defaults), without Accept-Encoding: the
# rows that measure gzip add it, the others move the same identity bytes through every peer.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
    "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
GZIP = {"Accept-Encoding": "gzip"}

_LUA = """\
-- Written by windows-metrics-proxy's benchmarks: exact figures, in microseconds, as one JSON line.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"non2xx\\":%d,"
    .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"timeout\\":%d,"
    .. "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d,\\"mean_us\\":%f}\\n",
    summary.requests, summary.duration, summary.bytes, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class LoadResult:
    """One wrk run. `ok` counts 2xx/3xx answers only: non-2xx answers are not throughput."""

    connections: int
    requests: int
    non2xx: int
    socket_errors: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    bytes_read: int
    cpu_s: float | None = None  # of the process(es) under test, over the same run
    error_kinds: dict[str, int] = field(default_factory=dict)  # wrk's socket errors, by kind

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_ms_per_scrape(self) -> float | None:
        if self.cpu_s is None or self.ok == 0:
            return None
        return 1000.0 * self.cpu_s / self.ok


class Wrk:
    def __init__(self, binary: str, supervisor: Supervisor, workdir: Path) -> None:
        self.binary = binary
        self.supervisor = supervisor
        self.script = workdir / "report.lua"
        self.script.write_text(_LUA)

    def run(
        self,
        url: str,
        *,
        threads: int,
        connections: int,
        duration_s: int,
        headers: dict[str, str],
        timeout_s: int = 60,
    ) -> LoadResult:
        argv = [
            self.binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration_s}s",
            f"--timeout={timeout_s}s",
            "--latency",
            "-s",
            str(self.script),
        ]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        argv.append(url)
        code, out, err = self.supervisor.run(argv, timeout=duration_s + timeout_s + 30, name="wrk")
        for line in out.splitlines():
            if line.startswith("BENCH-JSON "):
                data = json.loads(line.removeprefix("BENCH-JSON "))
                break
        else:
            raise RuntimeError(f"wrk exited with {code} without its summary: {(err or out).strip()[-300:]}")
        return LoadResult(
            connections=connections,
            requests=data["requests"],
            non2xx=data["non2xx"],
            socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
            duration_s=data["duration_us"] / 1e6,
            p50_ms=data["p50_us"] / 1000,
            p90_ms=data["p90_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            max_ms=data["max_us"] / 1000,
            bytes_read=data["bytes"],
            error_kinds={k: data[k] for k in ("connect", "read", "write", "timeout") if data[k]},
        )


@dataclass
class Fetched:
    status: int
    body_bytes: int
    content_encoding: str | None
    content_type: str | None
    error_text: str = ""  # the start of a non-2xx body


def fetch(port: int, path: str, headers: dict[str, str], *, timeout: float = 60.0) -> Fetched:
    """One request; the body is counted as it came on the wire (gzip stays gzip)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        size, head = 0, b""
        while chunk := response.read(1 << 20):
            size += len(chunk)
            head = head or chunk[:300]
        return Fetched(
            response.status,
            size,
            response.getheader("Content-Encoding"),
            response.getheader("Content-Type"),
            "" if 200 <= response.status < 300 else " ".join(head.decode(errors="replace").split()),
        )
    finally:
        conn.close()


def warm_up(
    port: int, path: str, headers: dict[str, str], *, seconds: float, max_requests: int
) -> list[Fetched]:
    """Sequential scrapes for a moment (bounded in time and count), as a real scraper's first ones."""
    results: list[Fetched] = []
    deadline = time.monotonic() + seconds
    for _ in range(max_requests):
        results.append(fetch(port, path, headers))
        if time.monotonic() >= deadline:
            break
    return results


def merge_headers(*parts: dict[str, str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return merged


def url_for(port: int, path: str) -> str:
    return f"http://{LOOPBACK}:{port}{path}"
