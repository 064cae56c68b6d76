"""The fault matrix: every way the exporter can fail, against passthrough, relabel and coalesced scrapes.

For each fault and mode: the status the scraper gets (or that its body is aborted), the self-metric
that counts it, one log line per failed upstream request, and a normal scrape once the fault is off.
Everything runs on 127.0.0.1; the fake exporter runs with handler cancellation, as in production
use, so a scrape the proxy gives up on frees the exporter's single scrape slot. Its bodies are
chunked as windows_exporter's Go server sends them, with every chunk's CRLF written apart from its
data (Framing.SPLIT): the framing that once made a short body look whole. The two tests of bodies
larger than memory use Go's framing without the pauses, which would take minutes at that size.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient

from proxy.fake_exporter import (
    FakeExporter,
    Fault,
    Framing,
    bound_port,
    huge_blocks,
    huge_length,
    run_fake_exporter,
)
from proxy.rewrite import rewrite_bytes
from proxy.rules import build_rule_set
from proxy.settings import load_settings
from proxy.telemetry import OUTCOMES
from tests.conftest import LOOPBACK, ProxyFactory
from tests.rawserver import raw_server
from tests.test_app import assert_counted_and_logged, outcome_count, sample_value
from tests.test_fake_exporter import CAPTURE

MODES = ("passthrough", "relabel", "coalesced")
KEEP = "windows_.*"
FAILURES = tuple(outcome for outcome in OUTCOMES if outcome != "success")
# A short scrape: the proxy's deadline is 0.6 s less its 0.25 s margin.
SHORT = {"X-Prometheus-Scrape-Timeout-Seconds": "0.6"}
LONG = {"X-Prometheus-Scrape-Timeout-Seconds": "60"}
HUGE_BYTES = {"passthrough": 400 << 20, "coalesced": 400 << 20, "relabel": 96 << 20}
RSS_GROWTH_LIMIT = 60 << 20


def expected_relabel_body() -> bytes:
    rules = build_rule_set(load_settings(hostip=LOOPBACK, keep=KEEP))
    assert rules is not None
    return rewrite_bytes(CAPTURE, rules, openmetrics=False)


EXPECTED = {"passthrough": CAPTURE, "coalesced": CAPTURE, "relabel": expected_relabel_body()}


# --- the pieces: an exporter that can stop and come back, a proxy per mode, scrapes -------------------


class Exporter:
    """A FakeExporter on a fixed 127.0.0.1 port that can be stopped and started again on that port."""

    def __init__(self, fake: FakeExporter) -> None:
        self.fake = fake
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = await run_fake_exporter(self.fake, LOOPBACK, self.port)
        self.port = bound_port(self.runner)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def idle(self) -> None:
        """Wait (bounded) until the exporter answers nothing: a scrape the proxy gave up on is over."""
        for _ in range(200):
            if self.fake.in_flight == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the exporter is still answering a scrape the proxy gave up on")


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    running = Exporter(FakeExporter(framing=Framing.SPLIT, split_pause=0.0005))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    error: Exception | None  # what broke the body, if it broke


@dataclass
class Case:
    mode: str
    client: TestClient
    exporter: Exporter
    caplog: pytest.LogCaptureFixture

    @property
    def scrapers(self) -> int:
        return 3 if self.mode == "coalesced" else 1

    async def scrape(self, headers: dict[str, str] | None = None) -> list[Result]:
        """One scrape, or three at once in coalesced mode; bodies read raw, errors caught."""

        async def one() -> Result:
            response = await self.client.get("/metrics", headers=headers or {}, auto_decompress=False)
            chunks: list[bytes] = []
            error: Exception | None = None
            try:
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)
            except aiohttp.ClientError as exc:
                error = exc
            return Result(response.status, dict(response.headers), b"".join(chunks), error)

        return list(await asyncio.gather(*(one() for _ in range(self.scrapers))))

    async def self_metrics(self) -> str:
        return await (await self.client.get("/proxy/metrics")).text()

    def records(self, outcome: str) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if getattr(r, "fields", {}).get("outcome") == outcome]

    async def assert_counted(self, outcome: str, *, exactly_one: bool = False) -> int:
        """The outcome is counted once per upstream request made, with one log line each, and
        coalesced scrapes make as few as they can; returns how many upstream requests there were."""
        text = await self.self_metrics()
        count = int(outcome_count(text, outcome))
        if self.mode != "coalesced" or exactly_one:
            await assert_counted_and_logged(self.client, outcome, self.caplog)
        else:
            # A failure that comes back at once (refused, unresolvable) may be over before the
            # other two scrapes arrive; then they lead requests of their own.
            assert 1 <= count <= 3, (outcome, count)
            coalesced = sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total")
            assert coalesced == 3 - count
        for other in FAILURES:
            if other != outcome:
                assert outcome_count(text, other) == 0, other
        lines = self.records(outcome)
        assert len(lines) == count, [r.getMessage() for r in lines]
        assert all(r.fields["reason"] for r in lines)  # type: ignore[attr-defined]
        return count

    async def assert_next_scrape_is_normal(self) -> None:
        """Fault off: the next scrape is 200 with the whole, right body, and counted as a success."""
        self.exporter.fake.fault = Fault.NONE
        await self.exporter.idle()
        before = outcome_count(await self.self_metrics(), "success")
        for result in await self.scrape():
            assert result.error is None
            assert result.status == 200
            assert result.body == EXPECTED[self.mode]
        after = outcome_count(await self.self_metrics(), "success")
        assert before + 1 <= after <= before + self.scrapers


ProxyFor = Callable[..., Awaitable[Case]]


@pytest.fixture
def proxy_for(make_proxy: ProxyFactory, exporter: Exporter, caplog: pytest.LogCaptureFixture) -> ProxyFor:
    """The proxy in front of `exporter` for a mode, with log capture at INFO."""

    async def build(mode: str, **settings: object) -> Case:
        settings.setdefault("port", exporter.port)
        if mode == "passthrough":
            settings.setdefault("coalesce", False)
        elif mode == "relabel":
            settings.setdefault("keep", KEEP)
        caplog.set_level(logging.INFO)
        client = await make_proxy(**settings)
        return Case(mode, client, exporter, caplog)

    return build


def assert_aborted(results: list[Result]) -> None:
    """The status line went out as 200, then the connection was cut: the body cannot pass as complete."""
    for result in results:
        assert result.status == 200
        assert isinstance(result.error, aiohttp.ClientPayloadError), result.error


# --- before any response header ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_connection_refused(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    await exporter.stop()  # nothing listens on the port now
    case = await proxy_for(mode)
    for result in await case.scrape():
        assert result.status == 502
        assert f"{LOOPBACK}:{exporter.port}" in result.body.decode()
        assert "refused" in result.body.decode()
    await case.assert_counted("connect_error")
    await exporter.start()
    await case.assert_next_scrape_is_normal()


class SwitchableResolver(AbstractResolver):
    """A stub for DNS: fails like an unknown name while `failing`, else answers 127.0.0.1."""

    def __init__(self) -> None:
        self.failing = True
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        if self.failing:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=LOOPBACK,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("mode", MODES)
async def test_name_resolution_failure(proxy_for: ProxyFor, mode: str) -> None:
    resolver = SwitchableResolver()
    case = await proxy_for(mode, hostip="exporter.invalid", resolver=resolver)
    for result in await case.scrape():
        assert result.status == 502
        assert "cannot resolve exporter.invalid" in result.body.decode()
    count = await case.assert_counted("resolve_error")
    assert resolver.asked == ["exporter.invalid"] * count
    resolver.failing = False
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_accept_then_silence(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    exporter.fake.fault = Fault.HANG
    case = await proxy_for(mode)
    started = time.monotonic()
    results = await case.scrape(SHORT)
    assert time.monotonic() - started < 2
    for result in results:
        assert result.status == 504
        assert "no response headers within 0.35s" in result.body.decode()
    await case.assert_counted("header_timeout", exactly_one=True)
    assert exporter.fake.scrapes == 1
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_slow_headers_past_the_deadline(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    exporter.fake.fault = Fault.LATENCY
    exporter.fake.latency = 2.0
    case = await proxy_for(mode)
    for result in await case.scrape(SHORT):
        assert result.status == 504
    await case.assert_counted("header_timeout", exactly_one=True)
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_garbage_instead_of_http(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    exporter.fake.fault = Fault.GARBAGE
    case = await proxy_for(mode)
    for result in await case.scrape():
        assert result.status == 502
        text = result.body.decode()
        assert text.startswith("502 invalid response from the exporter: ")
        assert text.endswith(f"(upstream http://{LOOPBACK}:{exporter.port}/metrics)\n")
    count = await case.assert_counted("protocol_error")
    assert exporter.fake.scrapes == count  # not retried: bytes came back, just not HTTP
    await case.assert_next_scrape_is_normal()


async def test_protocol_error_reason_is_one_line(proxy_for: ProxyFor, exporter: Exporter) -> None:
    exporter.fake.fault = Fault.GARBAGE
    case = await proxy_for("passthrough")
    (result,) = await case.scrape()
    assert result.status == 502
    assert result.body.decode().count("\n") == 1, result.body
    (line,) = case.records("protocol_error")
    assert "\n" not in line.fields["reason"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
async def test_exporter_busy(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    """windows_exporter 0.30+ answers a second concurrent scrape with 503: passed through as such."""
    case = await proxy_for(mode)
    async with aiohttp.ClientSession() as direct:
        holder = asyncio.create_task(direct.get(f"http://{LOOPBACK}:{exporter.port}/metrics?fault=hang"))
        try:
            for _ in range(200):
                if exporter.fake.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert exporter.fake.in_flight == 1
            for result in await case.scrape():
                assert result.status == 503
                assert result.body == b"Limit of concurrent requests reached (1), try again later.\n"
                assert result.error is None
            count = await case.assert_counted("http_error")
            assert exporter.fake.rejected == count
            assert all(r.levelno == logging.INFO for r in case.records("http_error"))
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
    await case.assert_next_scrape_is_normal()


# --- after the status line went out ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_slow_body_past_the_deadline(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    exporter.fake.fault = Fault.SLOW_BODY
    exporter.fake.latency = 3.0
    case = await proxy_for(mode)
    results = await case.scrape(SHORT)
    assert_aborted(results)
    for result in results:
        assert len(result.body) < len(EXPECTED[mode])
    await case.assert_counted("body_timeout", exactly_one=True)
    text = await case.self_metrics()
    assert (
        sample_value(text, "windows_metrics_proxy_client_aborts_total", 'reason="upstream_broke"')
        == case.scrapers
    )
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_reset_mid_body(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    exporter.fake.fault = Fault.RESET
    case = await proxy_for(mode)
    results = await case.scrape()
    assert_aborted(results)
    count = await case.assert_counted("body_error")
    assert "body broke off" in case.records("body_error")[0].fields["reason"]  # type: ignore[attr-defined]
    text = await case.self_metrics()
    assert (
        sample_value(text, "windows_metrics_proxy_client_aborts_total", 'reason="upstream_broke"')
        == case.scrapers
    )
    assert exporter.fake.scrapes == count
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_corrupt_gzip_midway(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    """Passthrough (coalesced too) hands the bytes over untouched: the scraper's gunzip fails, as
    it would scraping the exporter directly, and the proxy counts a success because it never
    decodes. With rules the proxy decodes, so it must notice, and it aborts the scrape."""
    exporter.fake.fault = Fault.CORRUPT_GZIP
    async with aiohttp.ClientSession(auto_decompress=False) as direct:
        url = f"http://{LOOPBACK}:{exporter.port}/metrics"
        async with direct.get(url, headers={"Accept-Encoding": "gzip"}) as response:
            corrupt = await response.read()
    await exporter.idle()
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(corrupt)
    case = await proxy_for(mode)
    results = await case.scrape({"Accept-Encoding": "gzip"})
    if mode == "relabel":
        assert_aborted(results)
        await case.assert_counted("body_error")
        reason = case.records("body_error")[0].fields["reason"]  # type: ignore[attr-defined]
        assert "gzip" in reason
    else:
        for result in results:
            assert result.status == 200
            assert result.error is None
            assert result.headers["Content-Encoding"] == "gzip"
            assert result.body == corrupt
        text = await case.self_metrics()
        assert outcome_count(text, "success") == 1
        assert all(outcome_count(text, failure) == 0 for failure in FAILURES)
        assert not [r for r in case.caplog.records if r.levelno >= logging.WARNING]
    await case.assert_next_scrape_is_normal()


@pytest.mark.parametrize("mode", MODES)
async def test_exporter_restart_between_scrapes(proxy_for: ProxyFor, exporter: Exporter, mode: str) -> None:
    case = await proxy_for(mode)
    for result in await case.scrape():
        assert (result.status, result.body) == (200, EXPECTED[mode])
    await exporter.stop()
    await exporter.start()  # same port, fresh process: the proxy's pooled connection is dead
    for result in await case.scrape():
        assert (result.status, result.body, result.error) == (200, EXPECTED[mode], None)
    text = await case.self_metrics()
    assert 2 <= outcome_count(text, "success") <= 2 * case.scrapers
    assert all(outcome_count(text, failure) == 0 for failure in FAILURES)
    assert not [r for r in case.caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", MODES)
async def test_pooled_connection_closed_before_any_byte_is_retried_once(
    make_proxy: ProxyFactory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The deterministic form of a restart: the exporter reads the next request on the pooled
    connection and closes it without sending a byte. The proxy retries once, on a new connection."""
    seen = 0

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:
            writer.close()  # the stale pooled connection: read the request, closed, nothing sent
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 5\r\n\r\nup 1\n"
        )
        await writer.drain()

    caplog.set_level(logging.INFO)
    async with raw_server(script) as upstream:
        settings: dict[str, object] = {"port": upstream.port}
        if mode == "passthrough":
            settings["coalesce"] = False
        if mode == "relabel":
            settings["keep"] = "up"
        client = await make_proxy(**settings)
        for _ in range(2):  # one scrape at a time, so that there is exactly one pooled connection
            response = await client.get("/metrics")
            assert response.status == 200
            assert await response.read() == b"up 1\n"
        text = await (await client.get("/proxy/metrics")).text()
    assert seen == 3
    assert upstream.connections == 2
    assert outcome_count(text, "success") == 2
    assert all(outcome_count(text, failure) == 0 for failure in FAILURES)
    assert not [r for r in caplog.records if r.name.startswith("proxy") and r.levelno >= logging.WARNING]


# --- a body far larger than any buffer -----------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """The highest resident set size seen while the block runs, sampled every 10 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss())
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("mode", MODES)
async def test_body_far_larger_than_memory_stays_streamed(
    proxy_for: ProxyFor, exporter: Exporter, mode: str
) -> None:
    """Hundreds of MB stream through with flat memory (proxy, exporter and client share this process).

    With rules every line goes through the rewriter, which is slower, so that body is smaller; the
    series cache is bounded by its own setting, kept small here so that only the body is measured.
    """
    size = HUGE_BYTES[mode]
    length = huge_length(size)
    want = 0
    for block in huge_blocks(size):
        want = zlib.crc32(block, want)
    settings = {"relabel_cache_size": 1000} if mode == "relabel" else {}
    case = await proxy_for(mode, **settings)
    await case.scrape()  # warm-up: pools, buffers and caches as a normal scrape leaves them
    successes = outcome_count(await case.self_metrics(), "success")
    exporter.fake.fault = Fault.HUGE
    exporter.fake.framing = Framing.GO
    exporter.fake.huge_bytes = size
    gc.collect()
    baseline = rss()

    async def one() -> tuple[int, int, int]:
        response = await case.client.get("/metrics", headers=LONG)
        received, crc = 0, 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            crc = zlib.crc32(chunk, crc)
        return response.status, received, crc

    async with PeakRss() as memory:
        results = await asyncio.gather(*(one() for _ in range(case.scrapers)))
    assert results == [(200, length, want)] * case.scrapers
    assert memory.peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(memory.peak - baseline) >> 20} MiB"
    text = await case.self_metrics()
    assert outcome_count(text, "success") == successes + 1  # one upstream request, even coalesced
    assert all(outcome_count(text, failure) == 0 for failure in FAILURES)
    assert not [r for r in case.caplog.records if r.levelno >= logging.WARNING]
    await case.assert_next_scrape_is_normal()


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, limit: float = 20.0) -> None:
    """Poll `condition` every 10 ms until it holds; fail after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not await condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {limit}s: {what}")
        await asyncio.sleep(0.01)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
async def test_slow_follower_does_not_make_the_proxy_hold_the_body(make_proxy: ProxyFactory) -> None:
    """Two scrapes share one 128 MiB answer; one reads it all, the other reads nothing until the
    first is done. The proxy must not keep the body for the idle one: a scraper that falls more
    than max(8 x PROXY_COALESCE_BUFFER_BYTES, 16 MiB) behind is cut off (a broken body, counted in
    client_aborts_total), the other gets every byte, and memory stays flat.

    The exporter is scripted so that nothing is left to timing: it sends the head at once and the
    body only once both scrapes are in the flight (a scrape arriving after the first 2 MiB went by
    would go upstream on its own), and the idle scrape then falls 128 MiB minus what the socket
    buffers hold behind, far past the limit.
    """
    size = 128 << 20
    length = huge_length(size)
    both_joined = asyncio.Event()

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        text = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %d\r\n\r\n"
        if len(upstream.requests) == 1:  # the warm-up
            writer.write(text % len(CAPTURE) + CAPTURE)
            await writer.drain()
            return
        writer.write(text % length)
        await writer.drain()
        await asyncio.wait_for(both_joined.wait(), 60)
        for block in huge_blocks(size):
            writer.write(block)
            await writer.drain()

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port)  # coalescing, with the default 2 MiB buffer

        async def metric(name: str, labels: str = "") -> float:
            return sample_value(await (await client.get("/proxy/metrics")).text(), name, labels)

        async def coalesced() -> bool:
            return await metric("windows_metrics_proxy_coalesced_scrapes_total") == 1

        async def exporter_asked() -> bool:
            return len(upstream.requests) == 2

        warm_up = await client.get("/metrics", headers=LONG)  # pools and buffers as a scrape leaves them
        assert (warm_up.status, await warm_up.read()) == (200, CAPTURE)
        aborts = await metric("windows_metrics_proxy_client_aborts_total", 'reason="fell_behind"')
        gc.collect()
        baseline = rss()
        leader_done = asyncio.Event()

        async def leader() -> int:
            response = await client.get("/metrics", headers=LONG)
            assert response.status == 200
            received = 0
            async for chunk in response.content.iter_any():  # counted, not kept: this test's own memory
                received += len(chunk)
            leader_done.set()
            return received

        async def follower() -> tuple[int, Exception | None]:
            response = await client.get("/metrics", headers=LONG)
            assert response.status == 200
            await asyncio.wait_for(leader_done.wait(), 60)  # reads nothing until the leader is done
            received = 0
            try:
                async for chunk in response.content.iter_any():
                    received += len(chunk)
            except aiohttp.ClientPayloadError as exc:
                return received, exc
            return received, None

        async with PeakRss() as memory:
            leading = asyncio.create_task(leader())
            following: asyncio.Task[tuple[int, Exception | None]] | None = None
            try:
                await eventually(exporter_asked, "the first scrape asked the exporter")
                following = asyncio.create_task(follower())
                await eventually(coalesced, "the second scrape joined the first one's flight")
                both_joined.set()
                led, (followed, error) = await asyncio.wait_for(asyncio.gather(leading, following), 120)
            finally:
                for task in (leading, following):
                    if task is not None and not task.done():
                        task.cancel()
        assert len(upstream.requests) == 2  # the warm-up, and one request shared by both scrapes
        assert (
            await metric("windows_metrics_proxy_client_aborts_total", 'reason="fell_behind"') == aborts + 1
        )  # the follower
    assert led == length
    # Cut off, visibly (never a short body that looks whole), and far short of the body: what it
    # got is at most the allowed backlog plus what the socket buffers held, not the 128 MiB.
    assert isinstance(error, aiohttp.ClientPayloadError), (followed, error)
    assert followed < length // 2, followed
    assert memory.peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(memory.peak - baseline) >> 20} MiB"
