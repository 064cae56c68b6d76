"""The proxy's HTTP surface against a fake exporter on 127.0.0.1: passthrough, failures, coalescing."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer

from proxy.fake_exporter import FakeExporter, Fault, Framing
from tests.conftest import LOOPBACK, ProxyFactory
from tests.rawserver import raw_server

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """GET without any decoding, so compressed bodies can be compared byte for byte."""
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as session,
        session.get(f"http://{LOOPBACK}:{port}{path}", headers=headers or {}) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def sample_value(exposition: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in exposition.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"{prefix!r} not in output")


# --- passthrough -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept": PROMETHEUS_ACCEPT},
        {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"},
        {"Accept-Encoding": "gzip"},
    ],
)
async def test_body_and_headers_identical_to_a_direct_scrape(
    proxy: TestClient, fake_server: TestServer, headers: dict[str, str]
) -> None:
    direct = await raw_get(fake_server.port, "/metrics", headers)
    proxied = await raw_get(proxy.server.port, "/metrics", headers)
    assert direct[0] == proxied[0] == 200
    assert proxied[2] == direct[2]  # byte for byte, gzip included
    assert len(proxied[2]) > 10_000
    for name in ("Content-Type", "Content-Encoding", "Content-Length"):
        assert proxied[1].get(name) == direct[1].get(name)
    if "gzip" in headers.get("Accept-Encoding", ""):
        assert proxied[1]["Content-Encoding"] == "gzip"
        assert gzip.decompress(proxied[2]).startswith(b"# HELP")


async def test_query_string_selects_collectors(proxy: TestClient, fake_server: TestServer) -> None:
    path = "/metrics?collect[]=cpu&collect[]=memory"
    direct = await raw_get(fake_server.port, path)
    proxied = await raw_get(proxy.server.port, path)
    assert proxied[0] == 200
    assert proxied[2] == direct[2]
    assert b"windows_cpu_" in proxied[2]
    assert b"windows_net_" not in proxied[2]


async def test_exporter_error_status_passes_through_with_body(proxy: TestClient) -> None:
    response = await proxy.get("/metrics?collect[]=nosuchcollector")
    assert response.status == 400
    assert "nosuchcollector" in await response.text()
    own = await (await proxy.get("/proxy/metrics")).text()
    assert sample_value(own, "windows_metrics_proxy_upstream_requests_total", 'outcome="http_error"') == 1


@pytest.mark.parametrize("framing", [Framing.GO, Framing.CONTENT_LENGTH])
async def test_head_returns_headers_without_body(
    proxy: TestClient, fake_server: TestServer, fake: FakeExporter, framing: Framing
) -> None:
    fake.framing = framing
    async with aiohttp.ClientSession(skip_auto_headers=("Accept-Encoding",)) as session:
        direct = await session.head(f"http://{LOOPBACK}:{fake_server.port}/metrics")
    response = await proxy.head("/metrics")
    assert response.status == direct.status == 200
    for name in ("Content-Type", "Content-Length"):
        assert response.headers.get(name) == direct.headers.get(name)
    assert ("Content-Length" in response.headers) is (framing is Framing.CONTENT_LENGTH)
    assert await response.read() == b""


async def test_forwards_only_negotiation_and_timeout_headers() -> None:
    seen: list[bytes] = []

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(head)
        body = b"up 1\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Content-Length: 5\r\nConnection: keep-alive, X-Secret\r\nX-Secret: hop\r\n"
            b"Keep-Alive: timeout=5\r\nProcess-Start-Time-Unix: 1700000000\r\n\r\n" + body
        )
        await writer.drain()

    async with raw_server(script) as upstream:
        from proxy.app import create_app
        from proxy.settings import load_settings

        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            writer.write(
                b"GET /metrics?collect[]=cpu&collect%5B%5D=os HTTP/1.1\r\n"
                b"Host: evil.example\r\n"
                b"Accept: text/plain;version=0.0.4\r\n"
                b"Accept-Encoding: gzip\r\n"
                b"X-Prometheus-Scrape-Timeout-Seconds: 7.5\r\n"
                b"Authorization: Bearer secret\r\n"
                b"Cookie: a=b\r\n"
                b"X-Forwarded-For: 203.0.113.9\r\n"
                b"Connection: close\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), timeout=5)
            writer.close()
    reply_head, _, reply_body = answer.partition(b"\r\n\r\n")
    assert reply_body == b"up 1\n"
    assert b"\r\nProcess-Start-Time-Unix: 1700000000" in reply_head
    assert b"X-Secret" not in reply_head
    assert b"Keep-Alive" not in reply_head
    head = seen[0].decode("latin-1")
    request_line, *header_lines = head.strip().split("\r\n")
    assert request_line == "GET /metrics?collect[]=cpu&collect%5B%5D=os HTTP/1.1"  # raw, as sent
    names = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in header_lines}
    assert names["accept"] == "text/plain;version=0.0.4"
    assert names["accept-encoding"] == "gzip"
    assert names["x-prometheus-scrape-timeout-seconds"] == "7.25"  # less the proxy's margin
    assert names["host"] == f"{LOOPBACK}:{upstream.port}"
    for dropped in ("authorization", "cookie", "x-forwarded-for"):
        assert dropped not in names


async def test_pooled_connection_is_reused() -> None:
    """A scrape opens no new TCP connection once the pool has one."""

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nup 1\n")
        await writer.drain()

    async with raw_server(script) as upstream:
        from proxy.app import create_app
        from proxy.settings import load_settings

        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port))
        async with TestClient(TestServer(create_app(settings), host=LOOPBACK)) as client:
            for _ in range(5):
                response = await client.get("/metrics")
                assert await response.read() == b"up 1\n"
    assert len(upstream.requests) == 5
    assert upstream.connections == 1


# --- other endpoints -----------------------------------------------------------------------------


async def test_health_does_not_touch_the_exporter(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(port=free_port())
    response = await client.get("/health")
    assert response.status == 200
    assert (await client.head("/health")).status == 200


async def test_ready_is_503_with_a_reason_when_exporter_is_down(make_proxy: ProxyFactory) -> None:
    port = free_port()
    client = await make_proxy(port=port)
    response = await client.get("/ready")
    assert response.status == 503
    text = await response.text()
    assert f"127.0.0.1:{port}" in text
    assert "refused" in text


async def test_ready_probes_then_remembers(proxy: TestClient, fake: FakeExporter) -> None:
    response = await proxy.get("/ready")
    assert response.status == 200
    assert "probe" in await response.text()
    assert fake.scrapes == 0  # the probe asks /health, never /metrics
    await proxy.get("/metrics")
    response = await proxy.get("/ready")
    assert "answered" in await response.text()


async def test_unknown_paths_and_methods(proxy: TestClient) -> None:
    assert (await proxy.get("/")).status == 404
    assert (await proxy.get("/metrics/../admin")).status == 404
    assert (await proxy.get("/federate")).status == 404
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert (await proxy.request(method, "/metrics")).status == 405, method


async def test_self_metrics(proxy: TestClient) -> None:
    await proxy.get("/metrics")
    response = await proxy.get("/proxy/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="success"') == 1
    assert sample_value(text, "windows_metrics_proxy_served_bytes_total") > 100_000
    assert sample_value(text, "windows_metrics_proxy_upstream_first_byte_seconds_count") == 1
    assert sample_value(text, "windows_metrics_proxy_upstream_last_byte_seconds_count") == 1
    assert sample_value(text, "windows_metrics_proxy_scrapes_in_flight") == 0
    assert "windows_metrics_proxy_build_info{" in text
    assert "windows_metrics_proxy_coalesced_scrapes_total" in text
    assert "process_resident_memory_bytes" in text
    om = await proxy.get("/proxy/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await om.text()).endswith("# EOF\n")


# --- failure mapping --------------------------------------------------------------------------------


def outcome_count(text: str, outcome: str) -> float:
    return sample_value(text, "windows_metrics_proxy_upstream_requests_total", f'outcome="{outcome}"')


async def assert_counted_and_logged(
    client: TestClient, outcome: str, caplog: pytest.LogCaptureFixture, expected_logs: int = 1
) -> None:
    text = await (await client.get("/proxy/metrics")).text()
    assert outcome_count(text, outcome) == 1
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("outcome") == outcome]
    assert len(lines) == expected_logs
    assert lines[0].fields["reason"]  # type: ignore[attr-defined]


async def test_connection_refused_is_502(make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    client = await make_proxy(port=port)
    with caplog.at_level(logging.INFO):
        response = await client.get("/metrics")
    assert response.status == 502
    text = await response.text()
    assert f"127.0.0.1:{port}" in text
    assert "refused" in text
    assert text.count("\n") == 1
    await assert_counted_and_logged(client, "connect_error", caplog)


class FailingResolver(AbstractResolver):
    """Stands in for DNS so no test ever sends a real query."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


async def test_name_resolution_failure_is_502(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = FailingResolver()
    client = await make_proxy(hostip="exporter.invalid", port=9182, resolver=resolver)
    with caplog.at_level(logging.INFO):
        response = await client.get("/metrics")
    assert response.status == 502
    assert "exporter.invalid" in await response.text()
    assert resolver.asked == ["exporter.invalid"]
    await assert_counted_and_logged(client, "resolve_error", caplog)


async def test_deadline_before_headers_is_504(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fault = Fault.LATENCY
    fake.latency = 2.0
    client = await make_proxy(port=fake_server.port, scrape_timeout_margin=0.1)
    with caplog.at_level(logging.INFO):
        response = await client.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.5"})
    assert response.status == 504
    await assert_counted_and_logged(client, "header_timeout", caplog)


async def test_hanging_exporter_is_504_within_the_default_timeout(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter
) -> None:
    fake.fault = Fault.HANG
    client = await make_proxy(port=fake_server.port, scrape_timeout=0.6, scrape_timeout_margin=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get("/metrics")
    assert response.status == 504
    assert loop.time() - started < 2


async def test_exporter_500_passes_through(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter
) -> None:
    fake.fault = Fault.ERROR
    client = await make_proxy(port=fake_server.port)
    response = await client.get("/metrics")
    assert response.status == 500
    assert await response.text()


async def test_exporter_busy_503_passes_through_without_coalescing(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter
) -> None:
    fake.fault = Fault.LATENCY
    fake.latency = 0.3
    client = await make_proxy(port=fake_server.port, coalesce=False)
    first, second = await asyncio.gather(client.get("/metrics"), client.get("/metrics"))
    assert sorted([first.status, second.status]) == [200, 503]
    busy = first if first.status == 503 else second
    assert "Limit of concurrent requests" in await busy.text()
    assert fake.scrapes == 2


# --- broken bodies must look broken ----------------------------------------------------------------


async def read_until_error(port: int, path: str = "/metrics") -> tuple[int, Exception | None, int]:
    """Status, the error the client saw while reading the body (if any), and bytes received."""
    received = 0
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"http://{LOOPBACK}:{port}{path}")
        try:
            async for chunk in response.content.iter_any():
                received += len(chunk)
        except aiohttp.ClientError as exc:
            return response.status, exc, received
        return response.status, None, received


async def test_reset_mid_body_aborts_the_client(
    proxy: TestClient, fake: FakeExporter, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fault = Fault.RESET
    with caplog.at_level(logging.INFO):
        status, error, received = await read_until_error(proxy.server.port)
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert 0 < received < 265_813
    await assert_counted_and_logged(proxy, "body_error", caplog)
    fake.fault = Fault.NONE
    assert (await proxy.get("/metrics")).status == 200  # the next scrape is served normally


async def test_chunked_upstream_that_stops_mid_body_is_not_passed_as_complete() -> None:
    """Without Content-Length only the terminating chunk proves completeness; it must not be faked."""

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"7\r\nup 1\nx\r\n"
        )
        await writer.drain()
        writer.close()  # no terminating 0-chunk

    async with raw_server(script) as upstream:
        from proxy.app import create_app
        from proxy.settings import load_settings

        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            status, error, _ = await read_until_error(server.port)
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)


async def test_stalled_body_past_the_deadline_aborts(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fault = Fault.SLOW_BODY
    fake.latency = 3.0
    client = await make_proxy(port=fake_server.port, scrape_timeout=0.8, scrape_timeout_margin=0.1)
    with caplog.at_level(logging.INFO):
        status, error, _ = await read_until_error(client.server.port)
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)
    await assert_counted_and_logged(client, "body_timeout", caplog)


# --- coalescing --------------------------------------------------------------------------------------


async def test_concurrent_scrapes_share_one_upstream_request(
    proxy: TestClient, fake: FakeExporter, fake_server: TestServer
) -> None:
    fake.fault = Fault.LATENCY
    fake.latency = 0.3
    responses = await asyncio.gather(*(proxy.get("/metrics") for _ in range(3)))
    bodies = [await r.read() for r in responses]
    assert [r.status for r in responses] == [200, 200, 200]
    fake.fault = Fault.NONE
    direct = await raw_get(fake_server.port, "/metrics")
    assert all(body == direct[2] for body in bodies)
    assert fake.scrapes == 2  # one shared upstream request, plus the direct one above
    text = await (await proxy.get("/proxy/metrics")).text()
    assert sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total") == 2
    assert outcome_count(text, "success") == 1


async def test_late_joiner_gets_the_whole_body(
    proxy: TestClient, fake: FakeExporter, fake_server: TestServer
) -> None:
    fake.fault = Fault.SLOW_BODY
    fake.latency = 0.8
    first = await proxy.get("/metrics")  # headers are in; the body trickles
    await first.content.readany()  # bytes have started flowing
    second = await proxy.get("/metrics")
    first_body, second_body = await asyncio.gather(first.read(), second.read())
    fake.fault = Fault.NONE
    direct = await raw_get(fake_server.port, "/metrics")
    assert second.status == 200
    assert second_body == direct[2]
    assert len(first_body) < len(direct[2])  # the first read() started after the readany() above
    assert fake.scrapes == 2


async def test_different_queries_are_not_coalesced(proxy: TestClient, fake: FakeExporter) -> None:
    fake.max_concurrent = 0
    fake.fault = Fault.LATENCY
    fake.latency = 0.2
    a, b = await asyncio.gather(proxy.get("/metrics?collect[]=cpu"), proxy.get("/metrics?collect[]=os"))
    assert (a.status, b.status) == (200, 200)
    assert await a.read() != await b.read()
    assert fake.scrapes == 2


async def test_followers_see_a_broken_body_as_broken(
    proxy: TestClient, fake: FakeExporter, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fault = Fault.RESET
    with caplog.at_level(logging.INFO):
        results = await asyncio.gather(*(read_until_error(proxy.server.port) for _ in range(3)))
    for status, error, _ in results:
        assert status == 200
        assert isinstance(error, aiohttp.ClientPayloadError)
    assert fake.scrapes == 1
    await assert_counted_and_logged(proxy, "body_error", caplog)


async def test_followers_get_the_same_refusal(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(port=free_port())
    responses = await asyncio.gather(*(client.get("/metrics") for _ in range(3)))
    assert [r.status for r in responses] == [502, 502, 502]
    text = await (await client.get("/proxy/metrics")).text()
    asked = outcome_count(text, "connect_error")  # scrapes that asked the exporter themselves
    assert 1 <= asked <= 3
    # Every other scrape was a follower, and each follower is counted once.
    assert sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total") == 3 - asked


async def test_leader_going_away_does_not_break_followers(
    proxy: TestClient, fake: FakeExporter, fake_server: TestServer
) -> None:
    fake.fault = Fault.SLOW_BODY
    fake.latency = 0.6
    leader = await proxy.get("/metrics")
    await leader.content.readany()
    follower = await proxy.get("/metrics")
    leader.close()  # the first scraper hangs up mid-body
    body = await follower.read()
    fake.fault = Fault.NONE
    assert body == (await raw_get(fake_server.port, "/metrics"))[2]


# --- the upstream is fixed by configuration ---------------------------------------------------------


async def test_nothing_in_a_request_reaches_another_server(proxy: TestClient, fake: FakeExporter) -> None:
    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with raw_server(script) as other:
        target = f"{LOOPBACK}:{other.port}"
        attempts = [
            f"GET http://{target}/metrics HTTP/1.1\r\nHost: {target}\r\n\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: {target}\r\n\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: {target}\r\n"
            f"Forwarded: host={target}\r\n\r\n",
            f"GET //{target}/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET /metrics?@{target}/ HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET /metrics?x=1#@{target} HTTP/1.1\r\nHost: x\r\n\r\n",
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        ]
        for attempt in attempts:
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.server.port)
            writer.write(attempt.encode())
            await writer.drain()
            await asyncio.wait_for(reader.read(100), timeout=5)
            writer.close()
        await asyncio.sleep(0.1)
        assert other.requests == []
    assert fake.scrapes >= 4  # the /metrics attempts reached the configured exporter, and only it
