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
import contextlib
import gzip
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.fake_exporter import CAPTURE_NAME, TEXT_CONTENT_TYPE
from proxy.fake_wire import LAST_CHUNK, chunk_ends, go_chunks, go_wire
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


# --- integrity under every split: a property test ------------------------------------------------

PROPERTY_RULES = (
    "metric_relabel_configs:\n"
    "  - source_labels: [__name__]\n"
    "    regex: windows_(cpu|os|net|logical_disk|service)_.*\n"
    "    action: keep\n"
    "  - target_label: node\n    replacement: node-1\n"
)


@dataclass(frozen=True)
class Answer:
    """One upstream answer as Go frames it: the head, the chunked wire, and where it may be cut."""

    head: bytes = field(repr=False)
    wire: bytes = field(repr=False)
    # Offsets inside size lines, around each data/CRLF edge, and inside the final 0\r\n\r\n.
    special: tuple[int, ...] = field(repr=False)

    @classmethod
    def of(cls, body: bytes, *, gzipped: bool) -> Answer:
        wire = go_wire(body)
        special: set[int] = set()
        for end in chunk_ends(wire):
            special.update((end, end + 1))  # data|CRLF and CR|LF
        offset = 0
        for chunk in go_chunks(body):
            size_line = b"%x\r\n" % len(chunk)
            special.update(range(offset + 1, offset + len(size_line)))
            offset += len(size_line) + len(chunk) + 2
        special.update(range(len(wire) - len(LAST_CHUNK) + 1, len(wire)))
        return cls(head(gzipped=gzipped), wire, tuple(sorted(special)))


@dataclass
class Plan:
    """What the scripted upstream does for the next request: where to cut, and whether to stop."""

    answer: Answer
    cuts: list[int]
    stop: int | None = None  # send only this many wire bytes, then end the connection
    abrupt: bool = False  # end it with a RST instead of a FIN


class SplittingUpstream:
    """A raw upstream on 127.0.0.1 that sends each answer in the segments a Plan says."""

    def __init__(self) -> None:
        self.plan: Plan | None = None

    async def script(self, _head: bytes, writer: asyncio.StreamWriter) -> None:
        plan = self.plan
        assert plan is not None
        wire = plan.answer.wire if plan.stop is None else plan.answer.wire[: plan.stop]
        writer.write(plan.answer.head)
        start = 0
        for cut in [*sorted(c for c in set(plan.cuts) if 0 < c < len(wire)), len(wire)]:
            await writer.drain()
            await asyncio.sleep(0.001)  # the proxy reads what came so far on its own
            writer.write(wire[start:cut])
            start = cut
        await writer.drain()
        if plan.stop is not None:
            if plan.abrupt:
                writer.transport.abort()
            else:
                writer.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    """One event loop with the splitting upstream and two proxies (passthrough, rules) in front."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yml"
    rules.write_text(PROPERTY_RULES)
    loop = asyncio.new_event_loop()
    upstream = SplittingUpstream()
    stack = contextlib.AsyncExitStack()

    async def start() -> dict[str, int]:
        raw = await stack.enter_async_context(raw_server(upstream.script))
        ports = {}
        for mode, extra in (("passthrough", {}), ("rules", {"relabel_config": str(rules)})):
            settings = load_settings(hostip=LOOPBACK, port=str(raw.port), **extra)
            server = await stack.enter_async_context(TestServer(create_app(settings), host=LOOPBACK))
            ports[mode] = server.port
        return ports

    try:
        ports = loop.run_until_complete(start())
        yield loop, (upstream, ports, rules)
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


@pytest.fixture(scope="module")
def relabeled_capture(served: tuple[asyncio.AbstractEventLoop, Any]) -> bytes:
    """What the `relabel` dry run makes of the capture with the same rules: the expected body."""
    rules = served[1][2]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "relabel", "--config", str(rules), "-"],
        input=CAPTURE,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert b"windows_cpu_time_total{" in result.stdout
    assert b'node="node-1"' in result.stdout
    return result.stdout


ANSWERS = {
    "plain": Answer.of(CAPTURE, gzipped=False),
    "gzip": Answer.of(gzip.compress(CAPTURE, mtime=0), gzipped=True),
}


@st.composite
def plans(draw: st.DrawFn, answer: Answer) -> Plan:
    anywhere = st.integers(1, len(answer.wire) - 1)
    cuts = draw(st.lists(st.one_of(st.sampled_from(answer.special), anywhere), max_size=10))
    stop = draw(
        st.one_of(st.none(), st.none(), st.sampled_from(answer.special), st.integers(0, len(answer.wire) - 1))
    )
    return Plan(answer, cuts, stop, draw(st.booleans()))


PROPERTY = settings(
    max_examples=int(os.environ.get("INTEGRITY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.mark.parametrize("encoding", ["plain", "gzip"])
@pytest.mark.parametrize("mode", ["passthrough", "rules"])
def test_whole_or_broken_under_every_split(
    served: tuple[asyncio.AbstractEventLoop, Any], relabeled_capture: bytes, mode: str, encoding: str
) -> None:
    """Byte-identical (or the dry run's output, with rules) or a broken connection; never short and clean."""
    loop, (upstream, ports, _rules) = served
    answer = ANSWERS[encoding]
    if mode == "rules":
        expected = relabeled_capture  # the proxy gunzips what it rewrites, and this scraper takes plain
        headers: dict[str, str] = {}
    else:
        expected = gzip.compress(CAPTURE, mtime=0) if encoding == "gzip" else CAPTURE
        headers = {"Accept-Encoding": "gzip"} if encoding == "gzip" else {}
    outcomes: Counter[str] = Counter()

    @PROPERTY
    @given(plan=plans(answer))
    def check(plan: Plan) -> None:
        upstream.plan = plan
        status, received, error = loop.run_until_complete(asyncio.wait_for(scrape(ports[mode], headers), 30))
        if plan.stop is None:
            assert (status, error) == (200, None)
        if error is None:
            assert received == expected, f"a clean {status} with {len(received)} of {len(expected)} bytes"
            outcomes["whole"] += 1
        else:
            outcomes["broken"] += 1

    check()
    assert outcomes["whole"] > 0, outcomes  # both kinds of plan were tried
    assert outcomes["broken"] > 0, outcomes
