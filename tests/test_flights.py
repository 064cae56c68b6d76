"""Shared scrapes through the proxy: one reader per flight, every scraper equal, each on its own clock.

Each test here failed on the design where the first scraper of a flight read the exporter inside
its own handler (see the closing note of the issue that replaced it). Upstreams are scripted raw
servers or the fake exporter on 127.0.0.1; a gate in the script makes every scraper join the
flight before the body flows, so nothing is left to timing.
"""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.fake_exporter import huge_blocks, huge_length
from proxy.rewrite import BodyRewrite
from tests.conftest import LOOPBACK, ProxyFactory
from tests.rawserver import raw_server
from tests.test_app import sample_value
from tests.test_faults import eventually as until

TEXT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"


def timeout(seconds: float) -> dict[str, str]:
    return {"X-Prometheus-Scrape-Timeout-Seconds": f"{seconds:g}"}


async def metric(client: TestClient, name: str, labels: str = "") -> float:
    return sample_value(await (await client.get("/proxy/metrics")).text(), name, labels)


async def followers_joined(client: TestClient, count: int) -> None:
    """Wait (bounded) until `count` scrapes have joined another scrape's flight."""

    async def joined() -> bool:
        return await metric(client, "windows_metrics_proxy_coalesced_scrapes_total") == count

    await until(joined, f"{count} scrape(s) joined a flight")


async def read_all(
    client: TestClient, headers: dict[str, str]
) -> tuple[int, int, BaseException | None, float]:
    """(status, bytes received, the error that broke the body or None, seconds taken)."""
    started = time.monotonic()
    try:
        response = await client.get("/metrics", headers=headers)
    except aiohttp.ClientError as exc:  # the connection broke before any status
        return 0, 0, exc, time.monotonic() - started
    received = 0
    try:
        async for piece in response.content.iter_any():
            received += len(piece)
    except aiohttp.ClientError as exc:
        return response.status, received, exc, time.monotonic() - started
    return response.status, received, None, time.monotonic() - started


async def test_a_stuck_first_scraper_does_not_stall_the_second(make_proxy: ProxyFactory) -> None:
    """The first scraper stops reading a 24 MiB body; the second still gets all of it, promptly."""
    size = 24 << 20
    length = huge_length(size)
    gate = asyncio.Event()

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(TEXT_HEAD + b"Content-Length: %d\r\n\r\n" % length)
        await writer.drain()
        await asyncio.wait_for(gate.wait(), 30)
        for block in huge_blocks(size):
            writer.write(block)
            await writer.drain()

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port, scrape_timeout=3)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(stuck, (LOOPBACK, client.server.port))
            # The same request as the second scraper's (aiohttp's default Accept), so they share.
            await loop.sock_sendall(stuck, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
            await until(
                lambda: asyncio.sleep(0, bool(upstream.requests)), "the first scrape reached upstream"
            )
            second = asyncio.create_task(read_all(client, timeout(3)))

            await followers_joined(client, 1)
            gate.set()
            status, received, error, took = await second
        finally:
            stuck.close()
    assert (status, error) == (200, None)
    assert received == length
    assert took < 3.0  # promptly: well inside the scrape timeout the stuck scraper is cut at
    assert len(upstream.requests) == 1  # one upstream request, shared


@pytest.mark.parametrize("rules", [False, True], ids=["passthrough", "rules"])
async def test_an_unexpected_exception_breaks_every_scraper(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, rules: bool
) -> None:
    """Any exception in the reader, not only the ones it expects, must break every body."""
    gate = asyncio.Event()
    body = b"".join(b'x_total{n="%d"} 1\n' % n for n in range(20_000))

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(TEXT_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:100_000])
        await writer.drain()
        await asyncio.wait_for(gate.wait(), 30)
        writer.write(body[100_000:])
        await writer.drain()

    if rules:
        original = BodyRewrite.feed
        fed = [0]

        def feed(self: BodyRewrite, data: bytes) -> bytes:
            fed[0] += len(data)
            if fed[0] > 150_000:
                raise ValueError("injected")
            return original(self, data)

        monkeypatch.setattr(BodyRewrite, "feed", feed)
    else:
        import proxy.coalesce

        original_publish = proxy.coalesce.Flight.publish
        published = [0]

        def publish(self: proxy.coalesce.Flight, piece: bytes) -> None:
            published[0] += len(piece)
            if published[0] > 150_000:
                raise ValueError("injected")
            original_publish(self, piece)

        monkeypatch.setattr(proxy.coalesce.Flight, "publish", publish)

    async with raw_server(script) as upstream:
        extra = {"keep": "x_.*"} if rules else {}
        client = await make_proxy(port=upstream.port, **extra)
        scrapes = [asyncio.create_task(read_all(client, timeout(10))) for _ in range(3)]

        await followers_joined(client, 2)
        gate.set()
        results = await asyncio.gather(*scrapes)
        text = await (await client.get("/proxy/metrics")).text()
    for status, received, error, _ in results:
        assert status == 200
        assert error is not None, f"a clean body of {received} bytes"
    assert sample_value(text, "windows_metrics_proxy_client_aborts_total", 'reason="upstream_broke"') == 3
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="body_error"') == 1


async def test_a_cancellation_during_prepare_leaves_the_others_whole(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first scraper's handler is cancelled as it prepares its response; the others are served."""
    gate = asyncio.Event()
    body = b"".join(b'y_total{n="%d"} 1\n' % n for n in range(20_000))

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(gate.wait(), 30)  # every scraper prepares its answer after this
        writer.write(TEXT_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    original = aiohttp.web.StreamResponse.prepare
    prepared = [0]

    async def prepare(self: aiohttp.web.StreamResponse, request: aiohttp.web.BaseRequest) -> object:
        if request.path == "/metrics":
            prepared[0] += 1
            if prepared[0] == 1:
                raise asyncio.CancelledError
        return await original(self, request)

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port)
        scrapes = [asyncio.create_task(read_all(client, timeout(10))) for _ in range(3)]

        await followers_joined(client, 2)
        monkeypatch.setattr(aiohttp.web.StreamResponse, "prepare", prepare)
        gate.set()
        results = await asyncio.gather(*scrapes)
        monkeypatch.undo()
        text = await (await client.get("/proxy/metrics")).text()
    whole = [r for r in results if r[2] is None]
    broken = [r for r in results if r[2] is not None]
    assert len(broken) == 1  # the cancelled one: its connection is gone, never a clean short body
    assert [(status, received) for status, received, _, _ in whole] == [(200, len(body))] * 2
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="success"') == 1


async def test_a_follower_with_a_shorter_timeout_gets_its_504(make_proxy: ProxyFactory) -> None:
    """The exporter answers after 1.5 s: the 10 s scraper waits for it, the 0.6 s one gets 504."""

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.5)
        writer.write(TEXT_HEAD + b"Content-Length: 5\r\n\r\nup 1\n")
        await writer.drain()

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port)
        leader = asyncio.create_task(read_all(client, timeout(10)))
        await until(lambda: asyncio.sleep(0, bool(upstream.requests)), "the leader's request upstream")
        status, _, _, took = await read_all(client, timeout(0.6))
        assert status == 504
        assert took < 1.2, took
        assert (await leader)[:3] == (200, 5, None)
        assert len(upstream.requests) == 1
        assert await metric(client, "windows_metrics_proxy_coalesced_scrapes_total") == 1


async def test_followers_are_served_within_their_own_deadlines(make_proxy: ProxyFactory) -> None:
    """A body that takes 2.5 s: the 1 s follower is cut at about 1 s, the 10 s ones are served whole."""
    gate = asyncio.Event()
    pieces = [b'z_total{n="%d"} 1\n' % n for n in range(50)]
    body = b"".join(pieces)

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(TEXT_HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.wait_for(gate.wait(), 30)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port)
        leader = asyncio.create_task(read_all(client, timeout(10)))
        await until(lambda: asyncio.sleep(0, bool(upstream.requests)), "the leader's request upstream")
        short = asyncio.create_task(read_all(client, timeout(1)))
        long = asyncio.create_task(read_all(client, timeout(10)))

        await followers_joined(client, 2)
        gate.set()
        short_status, short_received, short_error, short_took = await short
        assert short_status == 200
        assert short_error is not None  # broken, never a clean short body
        assert short_received < len(body)
        assert short_took < 1.6, short_took  # its own deadline, from the moment it asked
        for task in (leader, long):
            assert (await task)[:3] == (200, len(body), None)
        assert (
            await metric(client, "windows_metrics_proxy_client_aborts_total", 'reason="scraper_timeout"') == 1
        )
        assert len(upstream.requests) == 1


async def test_followers_of_a_failed_exporter_are_counted_once_each(make_proxy: ProxyFactory) -> None:
    """The exporter closes without answering: three scrapers get 502, two of them as followers."""
    gate = asyncio.Event()

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(gate.wait(), 30)
        writer.close()

    async with raw_server(script) as upstream:
        client = await make_proxy(port=upstream.port)
        scrapes = [asyncio.create_task(read_all(client, timeout(10))) for _ in range(3)]

        await followers_joined(client, 2)
        gate.set()
        results = await asyncio.gather(*scrapes)
        text = await (await client.get("/proxy/metrics")).text()
    assert [status for status, *_ in results] == [502] * 3
    assert sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total") == 2
    failures = sum(
        sample_value(text, "windows_metrics_proxy_upstream_requests_total", f'outcome="{outcome}"')
        for outcome in ("protocol_error", "connect_error")
    )
    assert failures == 1  # one upstream request, counted once
    for reason in ("upstream_broke", "scraper_timeout", "fell_behind", "stopped"):  # a 502 cuts nothing
        assert sample_value(text, "windows_metrics_proxy_client_aborts_total", f'reason="{reason}"') == 0


async def test_an_unexpected_error_asking_the_exporter_is_one_502_for_everyone(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception upstream.py does not classify still ends the flight with one count and a 502."""
    import proxy.upstream

    async def broken(*_args: object, **_kwargs: object) -> None:
        await asyncio.sleep(0.2)  # long enough for the other scrapes to join
        raise KeyError("injected")

    monkeypatch.setattr(proxy.upstream.Upstream, "request", broken)
    client = await make_proxy(port=1)
    scrapes = [asyncio.create_task(read_all(client, timeout(10))) for _ in range(3)]
    await followers_joined(client, 2)
    results = await asyncio.gather(*scrapes)
    text = await (await client.get("/proxy/metrics")).text()
    assert [status for status, *_ in results] == [502] * 3
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="connect_error"') == 1
