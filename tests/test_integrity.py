"""A scrape through the proxy is whole or visibly broken, whatever the exporter's chunk framing.

windows_exporter is a Go program: its promhttp handler answers `Transfer-Encoding: chunked`, and
Go's net/http writes a chunk's size line, data and closing CRLF as separate writes into a 4 KiB
connection buffer, so a TCP segment can end anywhere in that framing. These tests play such
upstreams from a scripted raw server, segment by segment, with pauses that make the proxy read
each segment on its own.

How the doubles differ from the real exporter: the raw server sends a canned answer (no
collectors run, so the body is the same every time), and the pauses exaggerate what a real
network does only now and then. tests/test_node_exporter.py runs the real Go sibling.
"""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.fake_exporter import CAPTURE_NAME, TEXT_CONTENT_TYPE
from proxy.settings import load_settings
from tests.conftest import LOOPBACK
from tests.rawserver import raw_server

CAPTURE = (Path(__file__).parent.parent / "proxy" / "data" / CAPTURE_NAME).read_bytes()


def _lines(count: int) -> bytes:
    """`count` bytes of valid exposition text: gauge samples whose values have a decimal part."""
    out = bytearray(b"# TYPE integrity_sample gauge\n")
    number = 0
    while len(out) < count:
        out += b'integrity_sample{n="%06d"} 12345.6\n' % number
        number += 1
    return bytes(out[: out.rfind(b"\n", 0, count) + 1])


def head(content_type: str = TEXT_CONTENT_TYPE, *, gzipped: bool = False) -> bytes:
    encoding = b"Content-Encoding: gzip\r\n" if gzipped else b""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + content_type.encode()
        + b"\r\n"
        + encoding
        + b"Date: Sun, 29 Nov 2026 12:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


async def scrape(port: int, headers: dict[str, str] | None = None) -> tuple[int, bytes, BaseException | None]:
    """One scrape, read to the end: (status, bytes received, the error that broke it or None)."""
    received = bytearray()
    session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
    async with session:
        response = await session.get(f"http://{LOOPBACK}:{port}/metrics", headers=headers or {})
        try:
            async for piece in response.content.iter_any():
                received += piece
        except aiohttp.ClientError as exc:
            return response.status, bytes(received), exc
        return response.status, bytes(received), None


LABEL_RULES = "metric_relabel_configs:\n  - target_label: node\n    replacement: n1\n"


def with_node_label(body: bytes) -> bytes:
    """What LABEL_RULES make of a `_lines` body: every sample gets node="n1"."""
    return body.replace(b'"} 12345.6\n', b'",node="n1"} 12345.6\n')


@pytest.mark.parametrize("rewriting", [False, True], ids=["passthrough", "rules"])
async def test_chunk_data_and_its_crlf_in_separate_reads(rewriting: bool, tmp_path: Path) -> None:
    """The issue's reproduction: one chunk's data, a pause, then its CRLF and the rest."""
    body = _lines(11_000)
    first, rest = body[:5_500], body[5_500:]  # the cut falls inside a sample's value

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(head() + b"%x\r\n" % len(first) + first)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"\r\n" + b"%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n")
        await writer.drain()

    rules = tmp_path / "rules.yml"
    rules.write_text(LABEL_RULES)
    extra = {"relabel_config": str(rules)} if rewriting else {}
    async with raw_server(script) as upstream:
        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port), **extra)
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            status, received, error = await scrape(server.port)
    assert (status, error) == (200, None)
    assert received == (with_node_label(body) if rewriting else body)


async def test_gzip_chunks_split_from_their_crlf_pass_whole() -> None:
    gzipped = gzip.compress(CAPTURE, mtime=0)
    pieces = [gzipped[i : i + 2048] for i in range(0, len(gzipped), 2048)]

    async def script(_head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(head(gzipped=True))
        for piece in pieces:
            writer.write(b"%x\r\n" % len(piece) + piece)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(script) as upstream:
        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            status, received, error = await scrape(server.port, {"Accept-Encoding": "gzip"})
    assert (status, error) == (200, None)
    assert received == gzipped
