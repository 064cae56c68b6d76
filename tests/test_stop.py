"""Stopping within one budget, PROXY_SHUTDOWN_TIMEOUT: a real process and SIGTERM, then in-process.

A scrape still running when the budget ends must see a broken connection (never a clean short
body), and the process must be gone by the budget plus STOP_ALLOWANCE: Windows kills a stopping
container about 5 s after the stop event. Upstreams are raw scripted servers on 127.0.0.1, so the
timing of the exporter's body is exactly what each test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.app import IN_FLIGHT_KEY, TELEMETRY_KEY
from proxy.runtime import STOP_ALLOWANCE
from proxy.server import RunningProxy, start_proxy
from proxy.settings import load_settings
from tests.conftest import LOOPBACK
from tests.rawserver import raw_server
from tests.test_app import free_port
from tests.test_cli import wait_listening

CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
PIECE = b'windows_cpu_time_total{core="0,0",mode="idle"} 1.5\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def start_proxy_process(upstream_port: int, budget: float) -> tuple[subprocess.Popen[str], int]:
    """`python -m proxy` from this checkout (its folder is the working directory), as a container runs it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update({"PROXY_SHUTDOWN_TIMEOUT": str(budget), "PROXY_LOG_FORMAT": "json"})
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--hostip", LOOPBACK, "--port", str(upstream_port),
         "--listen-address", LOOPBACK, "--listen-port", str(port)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return process, port


def log_lines(stderr: str) -> list[dict[str, object]]:
    lines = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


async def test_sigterm_aborts_a_scrape_still_running_when_the_budget_ends(
    processes: list[subprocess.Popen[str]],
) -> None:
    budget = 1.5

    async def stall(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(PIECE))
        await writer.drain()
        await asyncio.Event().wait()  # the body never ends; the server's teardown cancels this

    async with raw_server(stall) as upstream:
        proxy, port = start_proxy_process(upstream.port, budget)
        processes.append(proxy)
        await wait_listening(port)
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            response = await session.get(f"http://{LOOPBACK}:{port}/metrics")
            assert response.status == 200
            # Headers and the first piece came through: the scrape is in flight in the proxy.
            assert await response.content.readany() == PIECE
            proxy.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # a clean end here would be a short body passed off as whole
            broken = time.monotonic() - signalled
            _, stderr = await asyncio.to_thread(proxy.communicate, timeout=15)
            stopped = time.monotonic() - signalled
    print(f"stop took {stopped:.2f}s with a {budget}s budget; the scrape broke at {broken:.2f}s")
    assert proxy.returncode == 0, stderr
    assert budget - 0.1 <= broken, "the scrape did not get the whole budget to finish"
    assert stopped <= budget + STOP_ALLOWANCE, f"stop took {stopped:.2f}s, budget {budget}s"
    lines = log_lines(stderr)
    aborted = [line for line in lines if line.get("msg") == "stop budget spent: aborted what was in flight"]
    assert len(aborted) == 1, stderr
    assert aborted[0]["scrapes"] == 1
    assert any(line.get("msg") == "stopped" for line in lines), stderr
    assert "Traceback" not in stderr


async def test_a_scrape_that_ends_within_the_budget_completes_and_the_process_exits_promptly(
    processes: list[subprocess.Popen[str]],
) -> None:
    budget = 3.0
    pieces = 10
    next_piece = asyncio.Event()

    async def slow_body(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(PIECE))
        await writer.drain()
        await asyncio.wait_for(next_piece.wait(), 10)  # the test sends SIGTERM first
        for _ in range(pieces - 1):
            await asyncio.sleep(0.05)  # the rest of the body over about 0.5 s
            writer.write(chunk(PIECE))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(slow_body) as upstream:
        proxy, port = start_proxy_process(upstream.port, budget)
        processes.append(proxy)
        await wait_listening(port)
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            response = await session.get(f"http://{LOOPBACK}:{port}/metrics")
            assert response.status == 200
            first = await response.content.readany()
            assert first == PIECE
            proxy.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            next_piece.set()
            body = first + await response.read()
            complete = time.monotonic()
            _, stderr = await asyncio.to_thread(proxy.communicate, timeout=15)
            exited = time.monotonic()
    assert body == PIECE * pieces
    assert proxy.returncode == 0, stderr
    print(f"body complete {complete - signalled:.2f}s after SIGTERM, exit {exited - complete:.2f}s later")
    assert exited - complete <= STOP_ALLOWANCE, "the process lingered after its last scrape ended"
    assert exited - signalled < budget
    assert "aborted what was in flight" not in stderr


# --- in-process: what the stop counts, and coalesced scrapes with a background pump -----------------


@contextlib.asynccontextmanager
async def proxy_in_front_of(upstream_port: int, **settings: object) -> AsyncIterator[RunningProxy]:
    values = {"hostip": LOOPBACK, "port": upstream_port, "listen_address": LOOPBACK, "listen_port": 0}
    values.update(settings)
    running = await start_proxy(load_settings(**{k: str(v) for k, v in values.items()}))
    try:
        yield running
    finally:
        await running.close()  # idempotent: the tests close it themselves


async def test_the_budget_aborts_a_shared_scrape_and_cancels_its_pumps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leader whose scraper left still pumps for its follower: at the budget, both stop."""
    caplog.set_level(logging.DEBUG, logger="proxy.scrape")  # the upstream outcome's reason
    budget = 0.5

    async def stall(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(PIECE))
        await writer.drain()
        await asyncio.Event().wait()

    async with (
        raw_server(stall) as upstream,
        proxy_in_front_of(upstream.port, shutdown_timeout=budget) as running,
    ):
        in_flight = running.runner.app[IN_FLIGHT_KEY]
        sample = running.runner.app[TELEMETRY_KEY].registry.get_sample_value
        url = f"http://{LOOPBACK}:{running.port}/metrics"
        async with (
            aiohttp.ClientSession() as leader,
            aiohttp.ClientSession() as follower,
            asyncio.timeout(10),
        ):
            lead = await leader.get(url)
            assert await lead.content.readany() == PIECE
            follow = await follower.get(url)  # joins the flight and is replayed what went by
            assert await follow.content.readany() == PIECE
            lead.close()  # the leader's scraper hangs up; its handler goes on for the follower
            for _ in range(200):
                if sample("windows_metrics_proxy_open_connections") == 1:
                    break
                await asyncio.sleep(0.01)
            assert sample("windows_metrics_proxy_open_connections") == 1
            assert len(in_flight.handlers) == 2
            # A pump finishing a shared body in the background, as MetricsProxy keeps them.
            pump = asyncio.create_task(asyncio.Event().wait())
            in_flight.background.add(pump)
            pump.add_done_callback(in_flight.background.discard)
            started = time.monotonic()
            await running.close()
            took = time.monotonic() - started
            with pytest.raises(aiohttp.ClientPayloadError):
                await follow.read()
    assert budget - 0.05 <= took <= budget + STOP_ALLOWANCE, took
    assert pump.cancelled()
    assert not in_flight.handlers
    assert not in_flight.background
    assert upstream.connections == 1  # one shared upstream request
    assert (
        sample("windows_metrics_proxy_client_aborts_total", {"reason": "stopped"}) == 1
    )  # the follower's connection
    assert sample("windows_metrics_proxy_upstream_requests_total", {"outcome": "cancelled"}) == 1
    assert sample("windows_metrics_proxy_scrapes_in_flight") == 0
    aborted = [r for r in caplog.records if r.getMessage() == "stop budget spent: aborted what was in flight"]
    assert len(aborted) == 1
    assert aborted[0].fields == {  # type: ignore[attr-defined]
        "scrapes": 1,
        "other_requests": 0,
        "shutdown_timeout": budget,
    }
    stopping = [r for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "cancelled"]
    assert [r.fields["reason"] for r in stopping] == ["the proxy is stopping"]  # type: ignore[attr-defined]


async def test_idle_keep_alive_connections_close_at_once_and_a_quiet_stop_is_quick() -> None:
    async def answer(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nx\n")
        await writer.drain()

    async with (
        raw_server(answer) as upstream,
        proxy_in_front_of(upstream.port, shutdown_timeout=5) as running,
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, running.port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await reader.readexactly(2) == b"x\n"
            started = time.monotonic()
            closing = asyncio.ensure_future(running.close())
            async with asyncio.timeout(2):
                assert await reader.read(100) == b""  # the idle connection is closed, not left hanging
                await closing
            assert time.monotonic() - started < 1  # nothing in flight: no budget spent
        finally:
            writer.close()
