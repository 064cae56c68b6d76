"""Hostile clients against the proxy as it runs in production: `start_proxy`, with its listener.

Methods, request targets and Host games that must never reach anything but the configured
exporter; oversized and malformed heads; slowloris; the connection cap; clients that go away
mid-body or stop reading. Raw bytes over sockets on 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from proxy import runtime
from proxy.app import TELEMETRY_KEY
from proxy.fake_exporter import FakeExporter, Fault, bound_port, huge_length, run_fake_exporter
from proxy.server import RunningProxy, start_proxy
from proxy.settings import load_settings
from tests.conftest import LOOPBACK
from tests.rawserver import RawServer, raw_server
from tests.test_fake_exporter import CAPTURE, dechunk

CLOSE = b"Connection: close\r\n\r\n"


@dataclass
class Served:
    proxy: RunningProxy
    fake: FakeExporter | None

    @property
    def port(self) -> int:
        return self.proxy.port

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxy.runner.app[TELEMETRY_KEY].registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    def outcome(self, outcome: str) -> float:
        return self.metric("windows_metrics_proxy_upstream_requests_total", outcome=outcome)


@contextlib.asynccontextmanager
async def serving(fake: FakeExporter | None = None, port: int = 0, **settings: Any) -> AsyncIterator[Served]:
    """The proxy from start_proxy on a free 127.0.0.1 port, in front of `fake` (or of `port`)."""
    runner: web.AppRunner | None = None
    if fake is not None:
        runner = await run_fake_exporter(fake, LOOPBACK, 0)
        port = bound_port(runner)
    values = {"hostip": LOOPBACK, "port": port, "listen_address": LOOPBACK, "listen_port": 0}
    values.update(settings)
    proxy = await start_proxy(load_settings(**{k: str(v) for k, v in values.items()}))
    try:
        yield Served(proxy, fake)
    finally:
        await proxy.close()
        if runner is not None:
            await runner.cleanup()


async def exchange(port: int, data: bytes, limit: float = 5.0) -> bytes:
    """Send raw bytes and read what comes back until the proxy closes (at most `limit` seconds)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(limit):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:100]
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    """A whole raw answer's body, de-chunked if it was sent chunked (as a Go exporter's is)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        return dechunk(body)[0]
    return body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response, with a Content-Length or a chunked body, from a keep-alive connection (within 5 s)."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
        if not chunked:
            return status_of(head), await reader.readexactly(length)
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"
        return status_of(head), bytes(body)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.exc_info or r.levelno >= logging.ERROR
    ]


# --- methods ------------------------------------------------------------------------------------------

METHODS = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "LOCK", "PURGE")


@pytest.mark.parametrize("path", ["/metrics", "/health", "/ready", "/proxy/metrics"])
async def test_every_method_but_get_and_head_is_405(path: str) -> None:
    fake = FakeExporter()
    async with serving(fake) as served:
        for method in METHODS:
            request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n".encode()
            answer = await exchange(served.port, request + CLOSE + b"{}")
            assert status_of(answer) == 405, (method, answer[:200])
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            assert b"\r\nallow: get,head" in head.replace(b", ", b","), (method, head)
        # Tokens that are no HTTP method at all never reach a handler either.
        for method in ("FOO", "get", "G\x7fET"):
            answer = await exchange(served.port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + CLOSE)
            assert status_of(answer) in (400, 405, 501), (method, answer[:200])
    assert fake.scrapes == 0


# --- nothing but the configured exporter ------------------------------------------------------------


async def test_no_request_target_or_header_reaches_anything_else() -> None:
    """Extends test_app's case list; checks what the configured exporter received, too."""

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n")
        if not head.startswith(b"HEAD "):
            writer.write(b"up 1\n")
        await writer.drain()

    async with raw_server(answer) as exporter, raw_server(answer) as other:
        target = f"{LOOPBACK}:{other.port}"
        attempts = [
            # absolute-form and authority-form targets
            f"GET https://{target}/metrics HTTP/1.1\r\nHost: {target}\r\n",
            f"GET http://{target}/metrics?collect[]=cpu HTTP/1.1\r\nHost: x\r\n",
            f"GET http://x@{target}/metrics HTTP/1.1\r\nHost: x\r\n",
            f"GET http://{target}:80@x/metrics HTTP/1.1\r\nHost: x\r\n",
            f"GET http://{target} HTTP/1.1\r\nHost: x\r\n",
            f"HEAD http://{target}/metrics HTTP/1.1\r\nHost: {target}\r\n",
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n",
            f"CONNECT {LOOPBACK}:{other.port} HTTP/1.1\r\n",
            f"CONNECT {target} HTTP/1.0\r\nHost: x\r\n",
            f"OPTIONS * HTTP/1.1\r\nHost: {target}\r\n",
            f"GET http://{target}/metrics HTTP/1.0\r\n",
            # dot segments, percent-encoding, doubled slashes
            "GET /%6Detrics HTTP/1.1\r\nHost: x\r\n",
            "GET /%6d%65%74%72%69%63%73 HTTP/1.1\r\nHost: x\r\n",
            "GET /metrics/../metrics HTTP/1.1\r\nHost: x\r\n",
            "GET /metrics/..%2fhealth HTTP/1.1\r\nHost: x\r\n",
            "GET /%2e%2e/metrics HTTP/1.1\r\nHost: x\r\n",
            "GET /./metrics HTTP/1.1\r\nHost: x\r\n",
            "GET //metrics HTTP/1.1\r\nHost: x\r\n",
            f"GET ///{target}/metrics HTTP/1.1\r\nHost: x\r\n",
            f"GET /metrics;@{target} HTTP/1.1\r\nHost: x\r\n",
            "GET /metrics%00 HTTP/1.1\r\nHost: x\r\n",
            f"GET /metrics?url=http://{target}/ HTTP/1.1\r\nHost: x\r\n",
            f"GET /metrics?%0d%0aHost:%20{target} HTTP/1.1\r\nHost: x\r\n",
            f"GET /metrics?a=1%23@{target}/ HTTP/1.1\r\nHost: x\r\n",
            # Host and forwarding headers
            f"GET /metrics HTTP/1.1\r\nHost: {target}@{LOOPBACK}\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: {LOOPBACK}\r\nHost: {target}\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Original-URL: http://{target}/metrics\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Rewrite-URL: http://{target}/metrics\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: https\r\n"
            f"X-Forwarded-Port: {other.port}\r\nX-Forwarded-Host: {target}\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Real-IP: {LOOPBACK}\r\nVia: 1.1 {target}\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nForwarded: for=x;host={target};proto=http\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\nProxy: http://{target}\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n",
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nReferer: http://{target}/\r\nOrigin: http://{target}\r\n",
        ]
        statuses: list[int | None] = []
        async with serving(port=exporter.port) as served:
            for attempt in attempts:
                closing = "" if "\nConnection:" in attempt else "Connection: close\r\n"
                answer = await exchange(served.port, f"{attempt}{closing}\r\n".encode(), limit=3)
                statuses.append(status_of(answer) if answer else None)
            await asyncio.sleep(0.1)
        assert other.requests == []
        assert other.connections == 0
    assert 500 not in statuses, list(zip(attempts, statuses, strict=True))
    assert_only_the_configured_request(exporter)
    assert len(exporter.requests) >= 20  # most attempts were scrapes, served by the exporter


def assert_only_the_configured_request(exporter: RawServer) -> None:
    """Each request the exporter got is a GET or HEAD of /metrics, to its own address, with only
    the negotiation and timeout headers the proxy forwards."""
    allowed = {"host", "accept", "accept-encoding", "x-prometheus-scrape-timeout-seconds", "user-agent"}
    for head in exporter.requests:
        request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        method, target, version = request_line.split(" ")
        assert method in ("GET", "HEAD"), request_line
        assert target.partition("?")[0] == "/metrics", request_line
        assert version == "HTTP/1.1"
        headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines}
        assert headers["host"] == f"{LOOPBACK}:{exporter.port}", head
        assert set(headers) <= allowed, head


# --- oversized and malformed heads ------------------------------------------------------------------

OVERSIZED = {
    "request line": b"GET /metrics?" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n",
    "path": b"GET /" + b"m" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n",
    "one header": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n",
    "header name": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-" + b"n" * 10_000 + b": 1\r\n",
    "too many headers": b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(300)),
}
MALFORMED = {
    "CL and TE": b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "two CLs": b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
    "obs-fold": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n",
    "space before colon": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A : a\r\n",
    "NUL in a value": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n",
    "two Hosts": b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n",
    "tab in the request line": b"GET /metrics\tHTTP/1.1\r\nHost: x\r\n",
    "backslash target": b"GET \\metrics HTTP/1.1\r\nHost: x\r\n",
    "non-ASCII query": b"GET /metrics?a=\xff HTTP/1.1\r\nHost: x\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
}


@pytest.mark.parametrize("name", [*OVERSIZED, *MALFORMED])
async def test_oversized_or_malformed_head_is_4xx(name: str) -> None:
    fake = FakeExporter()
    async with serving(fake) as served:
        answer = await exchange(served.port, {**OVERSIZED, **MALFORMED}[name] + CLOSE)
        assert 400 <= status_of(answer) < 500, answer[:300]
        normal = await exchange(served.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + CLOSE)
        assert body_of(normal) == CAPTURE
    assert fake.scrapes == 1  # only the normal scrape after it


@pytest.mark.parametrize("name", ["request line", "one header", "too many headers", "obs-fold"])
async def test_oversized_or_malformed_head_logs_no_traceback(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(FakeExporter()) as served:
        answer = await exchange(served.port, {**OVERSIZED, **MALFORMED}[name] + CLOSE)
        assert status_of(answer) == 400
    assert no_tracebacks(caplog) == []


async def test_a_head_of_a_megabyte_is_refused() -> None:
    fake = FakeExporter()
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(120)
    )
    async with serving(fake) as served:
        answer = await exchange(served.port, head + CLOSE)
    assert 400 <= status_of(answer) < 500, answer[:200]
    assert fake.scrapes == 0


# --- slowloris ------------------------------------------------------------------------------------------


async def closed_within(reader: asyncio.StreamReader, limit: float) -> float | None:
    """Seconds until the proxy closes the connection (EOF or reset), or None if it did not in time."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


async def test_slowloris_is_closed_after_the_header_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeExporter()
    async with serving(fake, header_timeout=0.5) as served:
        started = time.monotonic()  # before the connection exists: the proxy's clock starts later
        reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
        closing = asyncio.create_task(closed_within(reader, 3.0))
        trickle = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100))
        sent = 0
        with contextlib.suppress(ConnectionError):
            for byte in trickle:  # a byte every 20 ms: ~14 s for the whole head, were it let through
                if closing.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.02)
        elapsed = await closing
        writer.close()
        assert elapsed is not None, "the trickled head was never cut off"
        assert time.monotonic() - started >= 0.45  # not before the header timeout
        assert sent < len(trickle) // 2  # cut off mid-head, long before the head could have ended

        # A connection that sends nothing at all is closed the same way.
        idle_reader, idle_writer = await asyncio.open_connection(LOOPBACK, served.port)
        assert await closed_within(idle_reader, 3.0) is not None
        idle_writer.close()

        # A slow but honest client finishing its head in time is served.
        reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + CLOSE
        for piece in range(0, len(request), 10):
            writer.write(request[piece : piece + 10])
            await asyncio.sleep(0.03)
        status, body = await read_response(reader)
        writer.close()
        assert (status, body) == (200, CAPTURE)
        assert served.metric("windows_metrics_proxy_refused_connections_total", reason="header_timeout") == 2
    assert fake.scrapes == 1  # the honest one; the trickled head never reached the exporter
    cut = [r for r in caplog.records if r.getMessage().startswith("closed a connection that sent no")]
    assert len(cut) == 2
    assert no_tracebacks(caplog) == []


# --- the connection cap -------------------------------------------------------------------------------

GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
GATED_BODY = b"windows_cs_logical_processors 8\n"
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll `condition` every 10 ms until it holds; fail after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


def refused(served: Served, reason: str) -> float:
    """A refused_connections_total sample, 0 when the reason was never used (the old listener
    knew no `idle_evicted`)."""
    registry = served.proxy.runner.app[TELEMETRY_KEY].registry
    return (
        registry.get_sample_value("windows_metrics_proxy_refused_connections_total", {"reason": reason}) or 0
    )


async def exchange_in_two(port: int, data: bytes, limit: float = 5.0) -> bytes:
    """Like exchange, but the request is written in two pieces 20 ms apart, as a client that
    writes its request line and its headers separately may."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        half = len(data) // 2
        writer.write(data[:half])
        await writer.drain()
        await asyncio.sleep(0.02)  # the client's own pause, not a wait for the proxy
        writer.write(data[half:])
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def open_now(served: Served) -> float:
    return served.metric("windows_metrics_proxy_open_connections")


def between_requests(served: Served) -> int:
    """How many served connections are idle between keep-alive requests, as the cap judges it
    (aiohttp parks a connection a turn or two of the loop after its answer went out)."""
    guard = served.proxy.guard
    assert guard is not None
    return sum(protocol.awaiting_request() for protocol in guard.connections if protocol not in guard.fresh)


@contextlib.asynccontextmanager
async def gated_exporter() -> AsyncIterator[tuple[RawServer, asyncio.Event]]:
    """An exporter that holds every request until the gate opens (within 10 s), so the proxy's
    connections stay busy with a request for as long as a test needs."""
    gate = asyncio.Event()

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(10):
            await gate.wait()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(GATED_BODY)
            + GATED_BODY
        )
        await writer.drain()

    async with raw_server(answer) as exporter:
        try:
            yield exporter, gate
        finally:
            gate.set()


async def test_past_the_cap_with_every_connection_busy_a_new_client_reads_the_503() -> None:
    """The refusal must arrive: the proxy reads the request head, answers, shuts its sending side
    and only then closes. Closing at once (the old listener) left the client's request unread, and
    the kernel's reset then destroyed the 503 before the client read it."""
    async with (
        gated_exporter() as (exporter, gate),
        serving(port=exporter.port, max_connections=3, coalesce=False, header_timeout=1) as served,
    ):
        busy = [await asyncio.open_connection(LOOPBACK, served.port) for _ in range(3)]
        try:
            for _, writer in busy:
                writer.write(GET_METRICS)
            await until(lambda: len(exporter.requests) == 3)
            answers = [await exchange(served.port, GET_METRICS, limit=3) for _ in range(10)]
            # A head in two writes: the old listener had closed before the second, and the reset
            # that answered it reached the client before it read the 503.
            answers += [await exchange_in_two(served.port, GET_METRICS, limit=3) for _ in range(10)]
            for answer in answers:
                assert answer.startswith(b"HTTP/1.1 503 "), answers
                assert answer.endswith(b"\r\n\r\ntoo many connections, retry\n"), answers
                assert b"\r\nConnection: close\r\n" in answer
            # A client that sends no head is answered too, once the header timeout has passed.
            started = time.monotonic()
            silent = await exchange(served.port, b"", limit=3)
            assert status_of(silent) == 503
            assert 0.9 <= time.monotonic() - started < 2.5
            assert refused(served, "limit") == 21
            assert refused(served, "idle_evicted") == 0

            # The busy three were never touched, and are served; then, idle between requests,
            # they make room for a new client instead of refusing it.
            gate.set()
            for reader, _ in busy:
                assert await read_response(reader) == (200, GATED_BODY)
            await until(lambda: between_requests(served) == 3)
            answer = await exchange(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + CLOSE)
            assert status_of(answer) == 200
            assert refused(served, "idle_evicted") == 1
            assert refused(served, "limit") == 21
        finally:
            for _, writer in busy:
                writer.close()


async def test_idle_connections_make_room_for_a_probe_at_the_cap() -> None:
    """300 connections that send nothing, against a cap of 256: /health still answers at once
    (the old listener refused it until the header timeout closed the idle ones, so a kubelet
    probe failed and would have restarted the pod). A probe displaces the oldest idle one."""
    async with serving(FakeExporter(), max_connections=256, header_timeout=30) as served:
        idle: list[Connection] = []
        try:
            for _ in range(300):
                idle.append(await asyncio.open_connection(LOOPBACK, served.port))
            await until(
                lambda: (
                    open_now(served) == 256
                    and refused(served, "idle_evicted") + refused(served, "limit") == 44
                )
            )
            for probe in range(3):
                started = time.monotonic()
                answer = await exchange(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + CLOSE, limit=5)
                elapsed = time.monotonic() - started
                assert status_of(answer) == 200, (probe, answer[:200])
                assert body_of(answer) == b"ok\n"
                assert elapsed < 1.0, (probe, elapsed)
            # The first probe displaced the oldest idle connection; the next ones found its slot
            # free again (each probe closes its connection after the answer).
            assert refused(served, "idle_evicted") == 45
            assert refused(served, "limit") == 0
            # The oldest 45 went, in the order they came; the rest are still open.
            for reader, _ in idle[:45]:
                assert await closed_within(reader, 2.0) is not None
            assert not any(reader.at_eof() for reader, _ in idle[45:])
            await until(lambda: open_now(served) == 255)
        finally:
            for _, writer in idle:
                writer.close()


async def test_the_cap_displaces_a_silent_connection_first_then_the_oldest_idle_never_a_busy_one() -> None:
    async with (
        gated_exporter() as (exporter, gate),
        serving(port=exporter.port, max_connections=3, coalesce=False, header_timeout=30) as served,
    ):
        opened: list[Connection] = []

        async def connect() -> Connection:
            opened.append(await asyncio.open_connection(LOOPBACK, served.port))
            return opened[-1]

        try:
            busy = await connect()
            busy[1].write(GET_METRICS)
            await until(lambda: len(exporter.requests) == 1)
            between = await connect()  # served once, kept alive
            between[1].write(GET_HEALTH)
            assert await read_response(between[0]) == (200, b"ok\n")
            silent = await connect()  # the newest, but it never sent a request
            await until(lambda: open_now(served) == 3 and between_requests(served) == 1)

            newer = await connect()
            newer[1].write(GET_HEALTH)
            assert await read_response(newer[0]) == (200, b"ok\n")
            assert await closed_within(silent[0], 2.0) is not None
            assert not between[0].at_eof()

            newest = await connect()
            newest[1].write(GET_HEALTH)
            assert await read_response(newest[0]) == (200, b"ok\n")
            assert await closed_within(between[0], 2.0) is not None  # older than `newer`
            newer[1].write(GET_HEALTH)
            assert await read_response(newer[0]) == (200, b"ok\n")
            assert refused(served, "idle_evicted") == 2

            gate.set()
            assert await read_response(busy[0]) == (200, GATED_BODY)
            assert refused(served, "limit") == 0
        finally:
            for _, writer in opened:
                writer.close()


async def test_a_stop_ends_the_refusals_under_way() -> None:
    """Refused connections hold no slot and are not aiohttp's, so the stop closes them itself
    (Python 3.12 and later wait in Server.wait_closed for every connection, these too)."""
    async with (
        gated_exporter() as (exporter, _gate),
        serving(
            port=exporter.port, max_connections=1, coalesce=False, header_timeout=30, shutdown_timeout=0.5
        ) as served,
    ):
        busy = await asyncio.open_connection(LOOPBACK, served.port)
        busy[1].write(GET_METRICS)
        await until(lambda: len(exporter.requests) == 1)
        waiting = await asyncio.open_connection(LOOPBACK, served.port)  # refused; sends nothing
        try:
            await until(lambda: refused(served, "limit") == 1)
            started = time.monotonic()
            await asyncio.wait_for(served.proxy.close(), 10)  # the second close, on exit, does nothing
            assert time.monotonic() - started < served.proxy.shutdown_timeout + 0.5
            assert await closed_within(waiting[0], 2.0) is not None
        finally:
            busy[1].close()
            waiting[1].close()


def test_the_503_and_the_431_are_written_on_the_production_loop() -> None:
    """uvloop's transports (the loop on Linux) are no subclasses of asyncio's: the listener once
    checked isinstance(transport, asyncio.WriteTransport) before writing, and so under uvloop it
    never wrote its 503 (the client saw a bare close or a reset) nor its 431."""
    factory, _name = runtime.loop_factory()
    megabyte = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(120)
    )

    async def scenario() -> None:
        async with serving(FakeExporter()) as served:
            assert status_of(await exchange(served.port, megabyte + CLOSE, limit=5)) == 431
        async with (
            gated_exporter() as (exporter, gate),
            serving(port=exporter.port, max_connections=1, coalesce=False) as served,
        ):
            reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
            try:
                writer.write(GET_METRICS)
                await until(lambda: len(exporter.requests) == 1)
                for answer in (
                    await exchange(served.port, GET_METRICS, limit=3),
                    await exchange_in_two(served.port, GET_METRICS, limit=3),
                ):
                    assert answer.startswith(b"HTTP/1.1 503 "), answer
                    assert answer.endswith(b"too many connections, retry\n"), answer
                gate.set()
                assert await read_response(reader) == (200, GATED_BODY)
            finally:
                writer.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


# --- clients that go away, or stop reading ----------------------------------------------------------------

LINE = b'windows_cs_logical_processors{instance="x"} 8\n'


@pytest.mark.parametrize("mode", ["passthrough", "relabel", "coalesced"])
async def test_client_gone_mid_body_cancels_the_upstream_request(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The exporter trickles a long body; the scraper reads a little and hangs up. The proxy must
    close that upstream connection (a half-read one cannot go back to the pool), count `cancelled`,
    and serve the next scrape on a new connection."""
    caplog.set_level(logging.DEBUG, logger="proxy")
    requests = 0
    upstream_closed = asyncio.Event()

    async def trickle(head: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        if requests > 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(LINE)
            )
            writer.write(LINE)
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 67108864\r\n\r\n")
        try:
            for _ in range(250):  # at most ~5 s
                writer.write(LINE * 300)
                await writer.drain()
                if writer.is_closing():
                    break
                await asyncio.sleep(0.02)
            else:
                return
        except ConnectionError:
            pass
        upstream_closed.set()

    settings: dict[str, Any] = {"coalesce": mode == "coalesced"}
    if mode == "relabel":
        settings["keep"] = "windows_.*"
    async with raw_server(trickle) as upstream, serving(port=upstream.port, **settings) as served:
        reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.read(1000)  # some of the body came through
        writer.close()
        await asyncio.wait_for(upstream_closed.wait(), 3)
        for _ in range(100):
            if served.outcome("cancelled"):
                break
            await asyncio.sleep(0.01)
        assert served.outcome("cancelled") == 1
        for outcome in ("success", "body_error", "body_timeout", "protocol_error"):
            assert served.outcome(outcome) == 0, outcome
        answer = await exchange(served.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + CLOSE)
        assert status_of(answer) == 200
        assert LINE in answer.partition(b"\r\n\r\n")[2]  # chunked when relabeled
        assert served.outcome("success") == 1
    assert requests == 2
    assert upstream.connections == 2  # the dirty connection was not reused
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "cancelled"]
    assert len(lines) == 1


async def test_a_client_that_stops_reading_is_cut_off_at_the_deadline() -> None:
    """A scraper asks for 12 MiB and reads nothing: more than the socket buffers hold, less than
    the 16 MiB a scraper may fall behind before it is dropped, so its deadline (scrape timeout 1 s)
    is what cuts it off. Then a client abort is counted, the upstream request is counted once,
    nothing is left in flight (the exporter's one scrape slot included), and the scraper sees its
    connection end short of the body."""
    size = 12 << 20
    fake = FakeExporter(fault=Fault.HUGE, huge_bytes=size)

    def state() -> tuple[int, float, float, float]:
        """(the exporter's scrapes in flight, the proxy's, client aborts, upstream requests counted)"""
        counted = sum(served.outcome(o) for o in ("success", "body_timeout", "cancelled", "body_error"))
        aborts = served.metric("windows_metrics_proxy_client_aborts_total", reason="scraper_timeout")
        return fake.in_flight, served.metric("windows_metrics_proxy_scrapes_in_flight"), aborts, counted

    async with serving(fake, scrape_timeout=1, shutdown_timeout=0.5) as served:
        assert state() == (0, 0, 0, 0)
        loop = asyncio.get_running_loop()
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        try:
            await loop.sock_connect(stuck, (LOOPBACK, served.port))
            await loop.sock_sendall(stuck, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            sent = time.monotonic()
            while time.monotonic() - sent < 5:  # polled, bounded
                if state() == (0, 0, 1, 1):
                    break
                await asyncio.sleep(0.01)
            cut_after = time.monotonic() - sent
            assert state() == (0, 0, 1, 1), f"not cut off within 5 s of a 1 s deadline: {state()}"
            assert fake.scrapes == 1
            received = 0
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(10):  # what the socket buffers held, then the end
                    while chunk := await loop.sock_recv(stuck, 65536):
                        received += len(chunk)
            fake.fault = Fault.NONE
            answer = await exchange(served.port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n" + CLOSE)
        finally:
            stuck.close()
    # Not before the deadline: the earliest is the exporter's, 1 s less the 0.25 s margin.
    assert cut_after >= 0.7, cut_after
    assert 0 < received < huge_length(size), received  # the head and some body, never all of it
    assert status_of(answer) == 200, answer[:200]
