"""The fake exporter is the upstream of every other test and benchmark: pin its behaviour."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import importlib.resources
import importlib.util
import io
import json
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_format_families

from proxy.fake_exporter import (
    GARBAGE,
    ExporterPayload,
    FakeExporter,
    Fault,
    Framing,
    add_arguments,
    bound_port,
    huge_blocks,
    huge_length,
    run_fake_exporter,
    serve_from_args,
)
from proxy.fake_wire import chunk_ends, go_wire

CAPTURE = (importlib.resources.files("proxy") / "data" / "windows_exporter-0.20.0.prom").read_bytes()
CAPTURE_SAMPLES = sum(1 for line in CAPTURE.splitlines() if line and not line.startswith(b"#"))
DUPLICATE_FAMILY = "windows_mssql_locks_deadlocks"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
IDENTITY = {"Accept-Encoding": "identity"}
LOOPBACK = "127.0.0.1"

Served = tuple[TestClient[Any, Any], FakeExporter]
Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
def serve(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> Serve:
    """A FakeExporter built with the given arguments, behind a loopback test client."""

    async def make(**kwargs: Any) -> Served:
        exporter = FakeExporter(**kwargs)
        return await aiohttp_client(exporter.app()), exporter

    return make


async def scrape_started(exporter: FakeExporter, count: int = 1) -> None:
    for _ in range(200):
        if exporter.scrapes >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the scrape never reached the exporter")


def assert_chunked_like_go(headers: Any) -> None:
    """windows_exporter's Go server sends a body of more than 2 KiB chunked, with no length."""
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers


def samples(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if line and not line.startswith("#")]


def type_names(body: bytes) -> list[str]:
    return re.findall(r"^# TYPE (\S+) ", body.decode(), flags=re.MULTILINE)


async def test_scale_1_is_the_capture_byte_for_byte(serve: Serve) -> None:
    cli, fake = await serve()
    response = await cli.get("/metrics", headers=IDENTITY)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert_chunked_like_go(response.headers)
    assert abs(int(response.headers["Process-Start-Time-Unix"]) - time.time()) < 60
    assert await response.read() == CAPTURE
    assert (fake.scrapes, fake.served, fake.rejected) == (1, 1, 0)


async def test_head_has_headers_and_no_body(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.head("/metrics", headers=IDENTITY)
    assert response.status == 200
    # As Go answers a HEAD for a body larger than its buffer: neither a length nor chunking.
    assert "Content-Length" not in response.headers
    assert "Transfer-Encoding" not in response.headers
    assert await response.read() == b""


async def test_collect_filters_families_and_collector_status(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics", params={"collect[]": "cpu"})
    assert response.status == 200
    body = (await response.read()).decode()
    assert "\nwindows_cpu_" in body
    assert "windows_memory_" not in body
    assert "windows_netframework_" not in body
    assert "\nwindows_exporter_build_info{" in body
    assert "\ngo_goroutines " in body
    status = re.findall(r'^windows_exporter_collector_\w+\{collector="(\w+)"', body, re.M)
    assert set(status) == {"cpu"}
    assert len(status) == 3  # duration, success, timeout


async def test_collect_uses_the_longest_collector_name(serve: Serve) -> None:
    cli, _ = await serve()
    body = (await (await cli.get("/metrics?collect[]=net")).read()).decode()
    assert "\nwindows_net_" in body
    assert "windows_netframework_" not in body
    body = (await (await cli.get("/metrics?collect[]=netframework_clrjit")).read()).decode()
    assert "\nwindows_netframework_clrjit_" in body
    assert "windows_net_" not in body
    assert "windows_netframework_clrmemory_" not in body


async def test_collect_several_collectors(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics?collect[]=cpu&collect[]=memory")
    body = (await response.read()).decode()
    assert "\nwindows_cpu_" in body
    assert "\nwindows_memory_" in body
    assert "windows_os_" not in body


async def test_unknown_collector_is_400(serve: Serve) -> None:
    cli, fake = await serve()
    response = await cli.get("/metrics?collect[]=cpu&collect[]=foo")
    assert response.status == 400
    text = await response.text()
    assert text == 'couldn\'t create filtered metrics handler: collector "foo" not found\n'
    assert (fake.scrapes, fake.served) == (1, 0)


async def test_scale_multiplies_series_and_keeps_families_contiguous(serve: Serve) -> None:
    cli, _ = await serve(scale=3)
    body = await (await cli.get("/metrics")).read()
    lines = samples(body)
    assert len(lines) == 3 * CAPTURE_SAMPLES
    names = type_names(body)
    assert len(names) == 701
    duplicated = {name for name in names if names.count(name) > 1}
    assert duplicated == {DUPLICATE_FAMILY}
    assert 'go_goroutines{replica="2"} 10' in lines
    assert 'go_info{version="go1.19.1",replica="1"} 1' in lines
    # Copy 0 is the capture itself, minus nothing.
    assert [line for line in lines if "replica=" not in line] == samples(CAPTURE)
    # A family's samples directly follow its TYPE line: no family name reappears later.
    owners: list[str] = []
    current = ""
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            assert line.startswith(current)
            if not owners or owners[-1] != current:
                owners.append(current)
    assert len(owners) == len(names)


async def test_scale_with_collect(serve: Serve) -> None:
    cli, _ = await serve(scale=2)
    body = (await (await cli.get("/metrics?collect[]=cpu")).read()).decode()
    success = re.findall(r"^windows_exporter_collector_success\{.*$", body, re.M)
    assert success == [
        'windows_exporter_collector_success{collector="cpu"} 1',
        'windows_exporter_collector_success{collector="cpu",replica="1"} 1',
    ]


@pytest.mark.parametrize("scale", [1, 2])
async def test_openmetrics_parses_strictly(serve: Serve, scale: int) -> None:
    cli, _ = await serve(scale=scale)
    response = await cli.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert response.status == 200
    assert response.headers["Content-Type"] == ("application/openmetrics-text; version=1.0.0; charset=utf-8")
    text = await response.text()
    assert text.endswith("\n# EOF\n")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(families) == 700  # the duplicate family is merged
    assert sum(len(f.samples) for f in families.values()) == scale * (CAPTURE_SAMPLES - 14)
    assert families["go_memstats_frees"].type == "counter"
    assert families["go_memstats_frees"].samples[0].name == "go_memstats_frees_total"
    deadlocks = families[DUPLICATE_FAMILY]
    assert deadlocks.type == "counter"
    assert {s.name for s in deadlocks.samples} == {f"{DUPLICATE_FAMILY}_total"}
    assert len(deadlocks.samples) == scale * 14
    # gauge go_memstats_alloc_bytes would clash with the counter's OpenMetrics name.
    assert families["go_memstats_alloc_bytes"].type == "gauge"
    assert families["go_memstats_alloc_bytes_total"].type == "unknown"


async def test_openmetrics_with_collect(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics?collect[]=mssql", headers={"Accept": PROMETHEUS_ACCEPT})
    families = list(text_string_to_metric_families(await response.text()))
    assert any(f.name == DUPLICATE_FAMILY for f in families)


@pytest.mark.parametrize(
    "accept",
    ["", "text/plain;version=0.0.4", "application/openmetrics-text;q=0,text/plain", "*/*"],
)
async def test_text_unless_openmetrics_accepted(serve: Serve, accept: str) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics", headers={"Accept": accept, **IDENTITY})
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert await response.read() == CAPTURE


async def test_openmetrics_help_escaping() -> None:
    source = b'# HELP a_total Say "hi" \\\\ and\\nbye\n# TYPE a_total counter\na_total 1\n'
    payload = ExporterPayload.parse(source)
    text = payload.render(collectors=None, openmetrics=True, scale=1).decode()
    assert text == ('# HELP a Say \\"hi\\" \\\\ and\\nbye\n# TYPE a counter\na_total 1\n# EOF\n')
    families = list(text_string_to_metric_families(text))
    assert families[0].documentation == 'Say "hi" \\ and\nbye'


async def test_untyped_becomes_unknown() -> None:
    payload = ExporterPayload.parse(b'# TYPE u untyped\nu 1\nv{a="b"} 2\n')
    text = payload.render(collectors=None, openmetrics=True, scale=2).decode()
    assert "# TYPE u unknown\n" in text
    assert 'u{replica="1"} 1\n' in text
    assert 'v{a="b",replica="1"} 2\n' in text


async def test_gzip_round_trip(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics", headers={"Accept-Encoding": "gzip, deflate"}, auto_decompress=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Vary"] == "Accept-Encoding"
    raw = await response.read()
    assert_chunked_like_go(response.headers)
    assert len(raw) < len(CAPTURE) // 4
    assert gzip.decompress(raw) == CAPTURE


async def test_gzip_refused_with_q0(serve: Serve) -> None:
    cli, _ = await serve()
    response = await cli.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in response.headers
    assert await response.read() == CAPTURE


async def test_gzip_cache_is_bounded(serve: Serve) -> None:
    cli, fake = await serve()
    collectors = sorted(fake.payload.collectors)
    for name in collectors:
        for encoding in ("gzip", "identity"):
            response = await cli.get(f"/metrics?collect[]={name}", headers={"Accept-Encoding": encoding})
            assert response.status == 200
            await response.read()
    assert len(fake._cache) == 32
    first = fake.variant(frozenset(["cpu"]), openmetrics=False, compress=True)
    assert fake.variant(frozenset(["cpu"]), openmetrics=False, compress=True) is first


async def test_concurrency_limit(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.HANG)
    hanging = asyncio.create_task(cli.get("/metrics"))
    await scrape_started(fake)
    response = await cli.get("/metrics")
    assert response.status == 503
    assert await response.text() == "Limit of concurrent requests reached (1), try again later.\n"
    assert (fake.scrapes, fake.served, fake.rejected) == (2, 0, 1)
    hanging.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await hanging


async def test_concurrency_unlimited_and_released(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.LATENCY, latency=0.2, max_concurrent=0)
    responses = await asyncio.gather(*(cli.get("/metrics") for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    fake.max_concurrent = 1
    fake.fault = Fault.NONE
    assert (await cli.get("/metrics")).status == 200  # slots were released
    assert (fake.served, fake.rejected) == (6, 0)


async def test_latency_delays_headers(serve: Serve) -> None:
    cli, _ = await serve(fault=Fault.LATENCY, latency=0.2)
    start = time.monotonic()
    response = await cli.get("/metrics", headers=IDENTITY)
    assert time.monotonic() - start >= 0.19
    assert await response.read() == CAPTURE


async def test_slow_body_arrives_in_pieces(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.SLOW_BODY, latency=0.32)
    start = time.monotonic()
    response = await cli.get("/metrics", headers=IDENTITY)
    assert time.monotonic() - start < 0.1  # headers at once
    assert_chunked_like_go(response.headers)
    pieces = 0
    body = b""
    while chunk := await response.content.readany():
        pieces += 1
        body += chunk
    assert time.monotonic() - start >= 0.25
    assert body == CAPTURE
    assert pieces >= 8
    assert fake.served == 1


async def test_reset_truncates_the_body(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.RESET)
    response = await cli.get("/metrics", headers=IDENTITY)
    assert response.status == 200
    assert_chunked_like_go(response.headers)
    received: list[bytes] = []

    async def read_all() -> None:
        while chunk := await response.content.readany():
            received.append(chunk)

    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await read_all()
    assert sum(map(len, received)) < len(CAPTURE)
    assert fake.served == 0


async def test_hang_times_out_and_shuts_down(aiohttp_server: Any) -> None:
    exporter = FakeExporter(fault=Fault.HANG)
    server = await aiohttp_server(exporter.app())
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.get(server.make_url("/metrics"), timeout=aiohttp.ClientTimeout(total=0.2))
        start = time.monotonic()
        await server.close()
        assert time.monotonic() - start < 1


async def test_hang_releases_open_connection_on_shutdown(aiohttp_server: Any) -> None:
    exporter = FakeExporter(fault=Fault.HANG)
    server = await aiohttp_server(exporter.app())
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(server.make_url("/metrics")))
        await scrape_started(exporter)
        start = time.monotonic()
        await server.close()
        assert time.monotonic() - start < 1
        with pytest.raises(aiohttp.ClientError):
            await request


async def test_error_is_500(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.ERROR)
    response = await cli.get("/metrics")
    assert response.status == 500
    assert "error" in await response.text()
    assert fake.served == 0


async def test_fault_query_parameter_overrides(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.ERROR)
    response = await cli.get("/metrics?fault=none&collect[]=cpu")
    assert response.status == 200
    assert "windows_memory_" not in await response.text()
    fake.fault = Fault.NONE
    assert (await cli.get("/metrics?fault=error")).status == 500
    assert (await cli.get("/metrics?fault=bogus")).status == 400


async def test_health_and_404(serve: Serve) -> None:
    cli, fake = await serve()
    response = await cli.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"status": "ok"}
    assert (await cli.get("/")).status == 404
    assert (await cli.get("/metrics/x")).status == 404
    assert fake.scrapes == 0


async def test_run_fake_exporter_on_port_0() -> None:
    exporter = FakeExporter()
    runner = await run_fake_exporter(exporter, "127.0.0.1", 0)
    try:
        port = bound_port(runner)
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics", headers=IDENTITY) as response,
        ):
            assert await response.read() == CAPTURE
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def served_from_args(capsys: pytest.CaptureFixture[str], argv: list[str]) -> AsyncIterator[str]:
    """`fake-exporter ARGV` running in this loop; yields the URL it printed, stops it after."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen-port", "0", *argv])
    stop = asyncio.Event()
    task = asyncio.create_task(serve_from_args(args, stop))
    try:
        out = ""
        for _ in range(200):
            if out := capsys.readouterr().out:
                break
            await asyncio.sleep(0.005)
        match = re.fullmatch(r"fake windows_exporter listening on (http://127\.0\.0\.1:\d+/metrics)\n", out)
        assert match, out
        yield match[1]
    finally:
        stop.set()
        await asyncio.wait_for(task, 1)


async def test_serve_from_args(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen-port", "0", "--scale", "2", "--latency", "0.05"])
    assert (args.listen_address, args.max_concurrent, args.fault) == ("127.0.0.1", 1, "none")
    async with (
        served_from_args(capsys, ["--scale", "2", "--latency", "0.05"]) as url,
        aiohttp.ClientSession() as session,
        session.get(url, headers=IDENTITY) as response,
    ):
        assert len(samples(await response.read())) == 2 * CAPTURE_SAMPLES


@pytest.mark.parametrize("argv", [["--scale", "0"], ["--max-concurrent", "-1"], ["--fault", "x"]])
def test_bad_arguments(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(argv)


# --- the faults added for the fault matrix (tests/test_faults.py) -------------------------------------


async def test_garbage_is_not_http() -> None:
    fake = FakeExporter(fault=Fault.GARBAGE)
    server = await run_fake_exporter(fake, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bound_port(server))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 2)  # the exporter closes after the bytes
        writer.close()
    finally:
        await server.cleanup()
    assert answer == GARBAGE
    assert not answer.startswith(b"HTTP/")
    assert (fake.scrapes, fake.served, fake.in_flight) == (1, 0, 0)


async def test_huge_is_a_valid_exposition_of_the_asked_size(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.HUGE, huge_bytes=3_000_000)
    response = await cli.get("/metrics", headers=IDENTITY)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    length = huge_length(3_000_000)
    assert 3_000_000 <= length < 3_000_000 + 250_000
    assert_chunked_like_go(response.headers)
    body = await response.read()
    assert len(body) == length
    assert body == b"".join(huge_blocks(3_000_000))
    families = list(text_format_families(body.decode()))
    assert [f.name for f in families] == ["windows_fake_huge_series"]
    series = families[0].samples
    assert len({tuple(sorted(s.labels.items())) for s in series}) == len(series)  # all distinct
    assert fake.served == 1


async def test_huge_is_generated_while_it_is_sent(serve: Serve) -> None:
    """Not held: the body is written block by block as the client reads, so it can exceed memory."""
    cli, _ = await serve(fault=Fault.HUGE, huge_bytes=64 << 20)
    blocks = huge_blocks(64 << 20)
    assert next(blocks).startswith(b"# HELP ")
    assert len(next(blocks)) < 300_000
    response = await cli.get("/metrics")
    first = await response.content.read(1000)
    assert first.startswith(b"# HELP windows_fake_huge_series ")
    response.close()  # hanging up mid-body frees the exporter
    head = await cli.head("/metrics")
    assert "Content-Length" not in head.headers
    assert await head.read() == b""
    assert huge_length(0) == len(next(huge_blocks(0)))


def inflate_whole(data: bytes) -> bytes:
    inflate = zlib.decompressobj(wbits=31)
    out = inflate.decompress(data) + inflate.flush()
    if not inflate.eof:
        raise EOFError("gzip stream ended early")
    return out


@pytest.mark.parametrize("accept_encoding", ["gzip", "identity"])
async def test_corrupt_gzip_is_gzip_that_fails_midway(serve: Serve, accept_encoding: str) -> None:
    cli, fake = await serve(fault=Fault.CORRUPT_GZIP)
    response = await cli.get("/metrics", headers={"Accept-Encoding": accept_encoding}, auto_decompress=False)
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"  # sent even when not asked for
    body = await response.read()
    assert_chunked_like_go(response.headers)
    good = gzip.compress(CAPTURE, compresslevel=6, mtime=0)
    assert len(body) == len(good)
    assert body[: len(good) // 2] == good[: len(good) // 2]  # the first half is intact
    assert body != good
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(body)
    with pytest.raises((zlib.error, EOFError)):  # as a streaming gunzip (the proxy's) sees it
        inflate_whole(body)
    fake.fault = Fault.NONE
    response = await cli.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert gzip.decompress(await response.read()) == CAPTURE  # the cached good variant is untouched


async def test_in_flight_counts_scrapes_being_answered(serve: Serve) -> None:
    cli, fake = await serve(fault=Fault.LATENCY, latency=0.2)
    assert fake.in_flight == 0
    scrape = asyncio.create_task(cli.get("/metrics"))
    await scrape_started(fake)
    assert fake.in_flight == 1
    response = await scrape
    await response.read()
    assert fake.in_flight == 0


def test_huge_bytes_argument() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--fault", "huge", "--huge-bytes", "1000"])
    assert (args.fault, args.huge_bytes) == ("huge", 1000)
    assert parser.parse_args([]).huge_bytes == 400 * 1024 * 1024
    assert {"garbage", "huge", "corrupt_gzip"} <= {f.value for f in Fault}


# --- framing: as windows_exporter's Go server puts a body on the wire ----------------------------


async def raw_exchange(
    port: int, request: bytes, *, until_close: bool = False
) -> tuple[bytes, bytes, list[int]]:
    """Send a raw request; return (head, body as framed on the wire, offsets in it where reads ended)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(request)
        data = bytearray()
        reads: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            piece = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not piece:
                break
            data += piece
            reads.append(len(data))
            head_end = data.find(b"\r\n\r\n")
            if until_close or head_end < 0:
                continue
            head = bytes(data[:head_end]).lower()
            if b"transfer-encoding: chunked" in head and data.endswith(b"\r\n0\r\n\r\n"):
                break
            length = re.search(rb"content-length: (\d+)", head)
            if length and len(data) - head_end - 4 >= int(length[1]):
                break
    finally:
        writer.close()
    head_end = data.index(b"\r\n\r\n") + 4
    return bytes(data[:head_end]), bytes(data[head_end:]), [r - head_end for r in reads if r > head_end]


def dechunk(wire: bytes) -> tuple[bytes, list[int]]:
    """A chunked body's content and its chunk sizes (the last, 0, left out)."""
    body = bytearray()
    sizes = []
    offset = 0
    while True:
        line_end = wire.index(b"\r\n", offset)
        size = int(wire[offset:line_end], 16)
        if size == 0:
            assert wire[line_end:] == b"\r\n\r\n"
            return bytes(body), sizes
        body += wire[line_end + 2 : line_end + 2 + size]
        assert wire[line_end + 2 + size : line_end + 4 + size] == b"\r\n"
        sizes.append(size)
        offset = line_end + 4 + size


@pytest.fixture
async def listening() -> Callable[..., Awaitable[tuple[int, FakeExporter]]]:
    """A FakeExporter on a real loopback port, for raw socket clients."""
    runners: list[Any] = []

    async def start(**kwargs: Any) -> tuple[int, FakeExporter]:
        exporter = FakeExporter(**kwargs)
        runner = await run_fake_exporter(exporter, LOOPBACK, 0)
        runners.append(runner)
        return bound_port(runner), exporter

    yield start
    for runner in runners:
        await runner.cleanup()


GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
async def test_go_framing_is_2048_byte_chunks_and_no_length(listening: Any, gzipped: bool) -> None:
    port, _ = await listening()
    request = GET.replace(b"\r\n\r\n", b"\r\nAccept-Encoding: gzip\r\n\r\n") if gzipped else GET
    head, wire, _ = await raw_exchange(port, request)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert b"Content-Length" not in head
    body, sizes = dechunk(wire)
    assert (gzip.decompress(body) if gzipped else body) == CAPTURE
    assert len(sizes) > 10
    assert set(sizes[:-1]) == {2048}
    assert 0 < sizes[-1] <= 2048
    assert go_wire(body) == wire  # the cached framing is the framing served


async def test_go_framing_gives_a_short_body_a_length(listening: Any) -> None:
    """Go sets Content-Length when the whole answer fit in its 2048-byte buffer."""
    port, _ = await listening(source=b"# TYPE up gauge\nup 1\n")
    head, body, _ = await raw_exchange(port, GET)
    assert b"Content-Length: 21\r\n" in head
    assert b"Transfer-Encoding" not in head
    assert body == b"# TYPE up gauge\nup 1\n"


async def test_split_framing_sends_each_crlf_apart_from_its_data(listening: Any) -> None:
    port, _ = await listening(framing=Framing.SPLIT, split_pause=0.01)
    head, wire, reads = await raw_exchange(port, GET.replace(b"/metrics", b"/metrics?collect[]=cpu"))
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    body, sizes = dechunk(wire)
    assert len(sizes) >= 3
    assert set(sizes[:-1]) == {2048}
    ends = chunk_ends(wire)
    # Every chunk's data arrived before its CRLF: a read ended exactly there.
    assert set(ends) <= set(reads), sorted(set(ends) - set(reads))
    direct = await raw_exchange(port, GET.replace(b"/metrics", b"/metrics?collect[]=cpu"))
    assert dechunk(direct[1])[0] == body


async def test_content_length_framing_as_old_exporters(listening: Any) -> None:
    port, _ = await listening(framing=Framing.CONTENT_LENGTH)
    head, body, _ = await raw_exchange(port, GET)
    assert f"Content-Length: {len(CAPTURE)}\r\n".encode() in head
    assert b"Transfer-Encoding" not in head
    assert body == CAPTURE


async def test_http_1_0_body_ends_with_the_connection(listening: Any) -> None:
    """Go has no chunking for HTTP/1.0: the body is unsized and the connection closes after it."""
    port, _ = await listening()
    head, body, _ = await raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n", until_close=True)
    assert b"Content-Length" not in head
    assert b"Transfer-Encoding" not in head
    assert body == CAPTURE


@pytest.mark.parametrize("framing", list(Framing))
async def test_every_fault_under_every_framing(serve: Serve, framing: Framing) -> None:
    cli, fake = await serve(framing=framing, split_pause=0.001, latency=0.16)
    fake.fault = Fault.SLOW_BODY
    assert await (await cli.get("/metrics", headers=IDENTITY)).read() == CAPTURE
    fake.fault = Fault.RESET
    response = await cli.get("/metrics", headers=IDENTITY)
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await response.read()
    fake.fault = Fault.HUGE
    fake.huge_bytes = 300_000
    assert await (await cli.get("/metrics")).read() == b"".join(huge_blocks(300_000))
    fake.fault = Fault.CORRUPT_GZIP
    corrupt = await (await cli.get("/metrics", auto_decompress=False)).read()
    with pytest.raises((zlib.error, EOFError)):
        inflate_whole(corrupt)
    fake.fault = Fault.ERROR
    assert (await cli.get("/metrics")).status == 500
    fake.fault = Fault.NONE
    assert await (await cli.get("/metrics", headers=IDENTITY)).read() == CAPTURE
    chunked = framing is not Framing.CONTENT_LENGTH
    assert ("Transfer-Encoding" in (await cli.get("/metrics")).headers) is chunked


def test_framing_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).framing == "go"
    args = parser.parse_args(["--framing", "split", "--split-pause", "0.3"])
    assert (args.framing, args.split_pause) == ("split", 0.3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--framing", "http2"])


# --- the 0.31 profile (proxy/data/windows_exporter-0.31-profile.prom) ----------------------------------

PROFILE_031 = (
    importlib.resources.files("proxy") / "data" / "windows_exporter-0.31-profile.prom"
).read_bytes()
# The families windows_exporter v0.31.8 documents (docs/collector.*.md) that the generator worked
# from; committed because the upstream repository is not available to tests.
FAMILIES_031 = json.loads(
    (importlib.resources.files("proxy") / "data" / "windows_exporter-0.31-families.json").read_text()
)
DEFAULT_COLLECTORS_031 = {"cpu", "memory", "logical_disk", "physical_disk", "net", "os", "service", "system"}


def _profile_families(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_format_families(body.decode())}


def _sample_names(body: bytes) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line[:1] != "#"}


def test_profile_031_parses_and_has_current_names() -> None:
    families = _profile_families(PROFILE_031)
    cpu = families["windows_cpu_time"]  # the parser drops _total from counter family names
    assert cpu.type == "counter"
    assert {frozenset(s.labels) for s in cpu.samples} == {frozenset({"core", "mode"})}
    assert {s.labels["mode"] for s in cpu.samples} == {"dpc", "idle", "interrupt", "privileged", "user"}
    assert len({s.labels["core"] for s in cpu.samples}) == 4
    for name in (
        "windows_memory_physical_total_bytes",
        "windows_memory_physical_free_bytes",
        "windows_os_hostname",
        "windows_os_info",
        "windows_logical_disk_free_bytes",
        "windows_service_state",
        "windows_container_available",
        "windows_exporter_build_info",
    ):
        assert name in families, name
    volumes = {s.labels["volume"] for s in families["windows_logical_disk_size_bytes"].samples}
    assert volumes == {"C:", "D:"}
    running = {
        s.labels["name"]
        for s in families["windows_service_state"].samples
        if s.value == 1 and s.labels["state"] == "running"
    }
    assert {"kubelet", "containerd"} <= running
    build = families["windows_exporter_build_info"].samples[0].labels
    assert build["version"].startswith("0.31.")


def test_profile_031_has_none_of_the_removed_names() -> None:
    names = {
        line.split("{")[0].split(" ")[0] for line in PROFILE_031.decode().splitlines() if line[:1] != "#"
    }
    assert not {n for n in names if n.startswith("windows_cs_")}
    # The memory series windows_os_* had before 0.30 moved to the memory collector.
    assert not {
        n
        for n in names
        if n.startswith("windows_os_") and n not in {"windows_os_hostname", "windows_os_info"}
    }
    assert "windows_cpu_info" not in names  # cpu_info is not enabled by default


def test_profile_031_serves_only_documented_families() -> None:
    listed = {f["name"]: f for f in FAMILIES_031["families"]}
    served = {f.name: f for f in ExporterPayload.parse(PROFILE_031).families}
    assert set(served) == set(listed) - set(FAMILIES_031["omitted"])
    for name, family in served.items():
        entry = listed[name]
        assert family.type == entry["type"], name
        assert entry["source"].startswith(
            ("docs/collector.", "pkg/collector/", "prometheus/client_golang")
        ), name
        # Every collector family comes from the docs' tables; only the exporter's own series don't.
        from_docs = entry["source"].startswith("docs/")
        assert from_docs != name.startswith("windows_exporter_"), name
        for sample in family.samples:
            labels = set(re.findall(r'(\w+)="', sample.labels or ""))
            assert labels == set(entry["labels"]), (name, sample.raw)


async def test_profile_031_collectors_and_collect_filter(serve: Serve) -> None:
    cli, exporter = await serve(profile="0.31")
    assert exporter.payload.collectors == DEFAULT_COLLECTORS_031 | {"container"}
    assert set(FAMILIES_031["collectors"]) == exporter.payload.collectors
    body = await (await cli.get("/metrics", headers=IDENTITY)).read()
    assert body == PROFILE_031
    response = await cli.get("/metrics?collect[]=cpu", headers=IDENTITY)
    assert response.status == 200
    families = _profile_families(await response.read())
    assert all(n.startswith(("windows_cpu_", "windows_exporter_")) for n in families), sorted(families)
    assert "windows_cpu_time" in families
    status = families["windows_exporter_collector_success"].samples
    assert [s.labels["collector"] for s in status] == ["cpu"]
    assert (await cli.get("/metrics?collect[]=cs")).status == 400  # windows_cs is gone in 0.31


@pytest.mark.parametrize("scale", [1, 3])
async def test_profile_031_openmetrics_parses_strictly(serve: Serve, scale: int) -> None:
    cli, _ = await serve(profile="0.31", scale=scale)
    response = await cli.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT, **IDENTITY})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    families = list(text_string_to_metric_families((await response.read()).decode()))
    assert len(families) == len(_profile_families(PROFILE_031))


def test_profile_argument_and_unknown_profile() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).profile == "0.20"
    assert parser.parse_args(["--profile", "0.31"]).profile == "0.31"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(["--profile", "0.99"])
    with pytest.raises(ValueError, match="unknown profile"):
        FakeExporter(profile="0.99")
    assert FakeExporter().payload.source == CAPTURE  # 0.20 stays the default


def test_profile_031_is_what_the_generator_writes() -> None:
    """The data file is generated: regenerating it from the committed family list changes nothing."""
    script = importlib.util.spec_from_file_location(
        "make_exporter_profile",
        Path(__file__).resolve().parent.parent / "scripts" / "make_exporter_profile.py",
    )
    assert script is not None
    assert script.loader is not None
    module = importlib.util.module_from_spec(script)
    script.loader.exec_module(module)
    assert module.render(FAMILIES_031).encode() == PROFILE_031
    assert [
        module.go_float(v) for v in (0, 1, 4, 0.5, 123456, 1234567, 1.7179869184e10, 0.0001, 0.00001)
    ] == ["0", "1", "4", "0.5", "123456", "1.234567e+06", "1.7179869184e+10", "0.0001", "1e-05"]


def test_readme_keep_list_names_exist_in_031() -> None:
    """The README's relabel examples must name series a current node still serves."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    names = _sample_names(PROFILE_031)
    regexes = re.findall(r"regex: (windows_[^\s;]*)", readme)
    assert regexes
    for regex in regexes:
        for alternative in re.sub(r"^windows_\((.*)\)_\.\*$", r"\1", regex).split("|"):
            pattern = alternative if alternative.startswith("windows_") else f"windows_{alternative}_.*"
            if pattern == "windows_.*":
                continue
            assert any(re.fullmatch(pattern, n) for n in names), (regex, pattern)


# -- the collector cost MODEL and the restart knob (for collect[] push-down) -----------------------------


async def test_collector_runs_are_counted_and_exposed(serve: Serve) -> None:
    cli, fake = await serve()
    await (await cli.get("/metrics", headers=IDENTITY)).read()
    await (await cli.get("/metrics?collect[]=cpu&collect[]=service", headers=IDENTITY)).read()
    assert fake.collector_runs["cpu"] == 2
    assert fake.collector_runs["service"] == 2
    assert fake.collector_runs["hyperv"] == 1
    assert sum(fake.collector_runs.values()) == len(fake.payload.collectors) + 2
    # The model's costs are the capture's own collector durations.
    assert fake.modelled_seconds == pytest.approx(sum(fake.payload.costs.values()) + 0.00052 + 0.1016404)
    text = await (await cli.get("/fake/metrics")).text()
    assert 'windows_fake_collector_runs_total{collector="cpu"} 2\n' in text
    assert 'windows_fake_collector_runs_total{collector="hyperv"} 1\n' in text
    assert f"windows_fake_sent_bytes_total {fake.sent_bytes}\n" in text
    assert fake.sent_bytes > len(CAPTURE)


async def test_collector_cost_waits_the_longest_collector_when_asked(serve: Serve) -> None:
    cli, _ = await serve(collector_cost=True)
    started = time.monotonic()
    await (await cli.get("/metrics?collect[]=service")).read()
    assert time.monotonic() - started >= 0.1016404 - 0.01  # service's duration in the capture
    started = time.monotonic()
    await (await cli.get("/metrics?collect[]=cpu")).read()
    assert time.monotonic() - started < 0.1  # cpu: 0.52 ms


async def test_start_time_header_follows_start_time_and_refused_collectors_are_400(serve: Serve) -> None:
    cli, fake = await serve()
    first = await cli.get("/metrics")
    await first.read()
    fake.start_time += 60
    second = await cli.get("/metrics?collect[]=cpu")
    await second.read()
    assert (
        int(second.headers["Process-Start-Time-Unix"]) == int(first.headers["Process-Start-Time-Unix"]) + 60
    )
    fake.refused_collectors = frozenset({"cpu"})
    refused = await cli.get("/metrics?collect[]=os&collect[]=cpu")
    assert refused.status == 400
    assert 'collector "cpu" not found' in await refused.text()
    assert refused.headers["Process-Start-Time-Unix"] == str(fake.start_time)


# --- A failing collector, as windows_exporter reports one -----------------------------------------


def collector_success(body: bytes) -> dict[str, float]:
    return {
        sample.labels["collector"]: sample.value
        for family in text_format_families(body.decode())
        if family.name == "windows_exporter_collector_success"
        for sample in family.samples
    }


@pytest.mark.parametrize("profile", ["0.20", "0.31"])
async def test_a_failing_collector_reports_0_and_serves_none_of_its_series(
    serve: Serve, profile: str
) -> None:
    cli, fake = await serve(profile=profile, failing_collectors=["cpu"])
    body = await (await cli.get("/metrics", headers=IDENTITY)).read()
    success = collector_success(body)
    assert success["cpu"] == 0
    assert {name for name, value in success.items() if value != 1} == {"cpu"}
    assert "\nwindows_cpu_" not in body.decode()
    assert "\nwindows_memory_" in body.decode()  # the others are served as usual
    # the status families keep cpu's line (duration too), as the real exporter does
    assert re.search(r'^windows_exporter_collector_duration_seconds\{collector="cpu"\}', body.decode(), re.M)
    # and it can be changed while serving
    fake.failing_collectors.clear()
    body = await (await cli.get("/metrics", headers=IDENTITY)).read()
    assert set(collector_success(body).values()) == {1}
    assert "\nwindows_cpu_" in body.decode()


async def test_fail_collector_query_parameter(serve: Serve) -> None:
    cli, fake = await serve(failing_collectors=["memory"])
    response = await cli.get("/metrics?fail_collector=cpu&fail_collector=os", headers=IDENTITY)
    assert response.status == 200
    success = collector_success(await response.read())
    assert {name for name, value in success.items() if value == 0} == {"cpu", "os", "memory"}
    # per request only: the next scrape has the process-wide one alone
    success = collector_success(await (await cli.get("/metrics")).read())
    assert {name for name, value in success.items() if value == 0} == {"memory"}
    # with collect[], only a failing collector that was asked for is reported
    body = await (await cli.get("/metrics?collect[]=cpu&fail_collector=cpu")).read()
    assert collector_success(body) == {"cpu": 0}
    assert "\nwindows_cpu_" not in body.decode()
    # OpenMetrics too, and still a valid exposition
    response = await cli.get("/metrics?fail_collector=cpu", headers={"Accept": PROMETHEUS_ACCEPT})
    families = {f.name: f for f in text_string_to_metric_families((await response.read()).decode())}
    (cpu,) = [
        s for s in families["windows_exporter_collector_success"].samples if s.labels["collector"] == "cpu"
    ]
    assert cpu.value == 0
    assert not any(name.startswith("windows_cpu_") for name in families)
    # an unknown collector is refused, like an unknown fault
    response = await cli.get("/metrics?fail_collector=nosuch")
    assert response.status == 400
    assert "nosuch" in await response.text()
    assert fake.failing_collectors == {"memory"}


def test_failing_collector_flag_is_repeatable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).failing_collector == []
    args = parser.parse_args(["--failing-collector", "cpu", "--failing-collector", "os"])
    assert args.failing_collector == ["cpu", "os"]
    with pytest.raises(ValueError, match="nosuch"):
        FakeExporter(failing_collectors=["nosuch"])


async def test_an_unknown_failing_collector_flag_is_a_one_line_error() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen-port", "0", "--profile", "0.31", "--failing-collector", "mssql"])
    with pytest.raises(SystemExit, match='--failing-collector: collector "mssql" not found'):
        await serve_from_args(args, asyncio.Event())  # 0.31's profile has no mssql collector


async def test_failing_collector_flag_reaches_the_exporter(capsys: pytest.CaptureFixture[str]) -> None:
    async with (
        served_from_args(capsys, ["--failing-collector", "os"]) as url,
        aiohttp.ClientSession() as session,
        session.get(url) as response,
    ):
        success = collector_success(await response.read())
    assert {name for name, value in success.items() if value == 0} == {"os"}


@pytest.mark.parametrize("profile", ["0.20", "0.31"])
def test_advancing_counters_grow_at_their_modelled_rates_and_gauges_stay(profile: str) -> None:
    """--advancing: the live monitoring test needs rates that are not all zero (CPU utilisation of
    1 - idle would read 100 % otherwise); gauges, and the body's shape, stay as captured."""
    from proxy.fake_exporter import CPU_MODE_RATES

    fake = FakeExporter(advancing=True, profile=profile)
    before = fake.variant(None, openmetrics=False, compress=False).body.decode()
    fake._born -= 10.0  # ten seconds later
    after = fake.variant(None, openmetrics=False, compress=False).body.decode()

    def values(body: str) -> dict[str, float]:
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line and not line.startswith("#")
        }

    def types(body: str) -> dict[str, str]:
        return {line.split()[2]: line.split()[3] for line in body.splitlines() if line.startswith("# TYPE ")}

    old, new, kinds = values(before), values(after), types(before)
    assert old.keys() == new.keys()
    assert [line for line in before.splitlines() if line.startswith("#")] == [
        line for line in after.splitlines() if line.startswith("#")
    ]
    grown = 0
    for series, value in old.items():
        name = series.split("{", 1)[0]
        if kinds.get(name) == "counter":
            assert new[series] > value, series
            grown += 1
            if name == "windows_cpu_time_total":
                mode = series.split('mode="', 1)[1].split('"', 1)[0]
                assert new[series] - value == pytest.approx(10 * CPU_MODE_RATES[mode], rel=0.05)
        elif kinds.get(name) == "gauge":
            assert new[series] == value, series
    assert grown > 100
    assert not FakeExporter(profile=profile).advancing  # off by default: bodies stay cached


@pytest.mark.parametrize(
    ("profile", "accept", "expected"),
    [
        # Prometheus 3's default scrape protocols (prometheus/prometheus v3.14.0 scrape/scrape_test.go)
        (
            "0.31",
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
            "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
            "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
            "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
        ),
        (
            "0.31",
            "text/plain;version=0.0.4;escaping=dots",
            "text/plain; version=0.0.4; charset=utf-8; escaping=dots",
        ),
        ("0.31", "", "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"),
        ("0.20", "text/plain;version=0.0.4;escaping=dots", "text/plain; version=0.0.4; charset=utf-8"),
    ],
)
async def test_a_current_profile_names_its_escaping_scheme_as_client_golang_does(
    serve: Serve, profile: str, accept: str, expected: str
) -> None:
    """windows_exporter 0.30+ is built on client_golang 1.20+ (0.31.0: 1.22.0, common 0.65.0), whose
    Content-Type names the escaping scheme; 0.20 (client_golang 1.13.0) names none."""
    client, _ = await serve(profile=profile)
    response = await client.get("/metrics", headers={"Accept": accept, **IDENTITY})
    assert response.headers["Content-Type"] == expected
    await response.read()
