"""A fake windows_exporter: serves a real 0.20.0 capture with scaling, filtering and faults.

It is the upstream for local development, tests and benchmarks, so a benchmark must measure the
proxy and never this server: every payload variant is rendered (and compressed) once, cached, and
its chunked framing built once too.

A body goes out as windows_exporter's Go server sends it (`proxy.fake_wire`): chunked, in 2048-byte
chunks written 4 KiB at a time, unless `framing` asks for the data/CRLF split or Content-Length.
How it still differs from the real exporter: no collector runs, so an answer costs no time unless
a fault says so and its values never change; the body is a 0.20.0 capture, not a current release's;
and there is no protobuf, no TLS and no basic auth (tests/test_node_exporter.py covers those
against a real Go exporter).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import functools
import gzip
import importlib.resources
import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_writer import HttpVersion11, StreamWriter

from proxy.fake_wire import GO_CHUNK_BYTES, GO_FLUSH_BYTES, LAST_CHUNK, Framing, frame, go_chunks, go_wire

__all__ = [
    "ExporterPayload",
    "FakeExporter",
    "Fault",
    "Framing",
    "UnknownCollectorError",
    "add_arguments",
    "bound_port",
    "huge_blocks",
    "huge_length",
    "run_fake_exporter",
    "serve_from_args",
]

CAPTURE_NAME = "windows_exporter-0.20.0.prom"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# The real exporter filters these per collector, so a collect[] scrape must not report the others.
STATUS_FAMILIES = frozenset(
    {
        "windows_exporter_collector_duration_seconds",
        "windows_exporter_collector_success",
        "windows_exporter_collector_timeout",
    }
)
SLOW_BODY_PIECES = 16
# What Fault.GARBAGE answers instead of HTTP: an SSH banner and binary noise, as a wrong service
# (or a port reused by something else) would send.
GARBAGE = b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe\x80 this is not HTTP \x1b[0m\r\n\r\n"
# Fault.HUGE: a generated body of this many bytes by default, streamed block by block.
HUGE_BYTES = 400 * 1024 * 1024
HUGE_FAMILY = "windows_fake_huge_series"
_HUGE_HEADER = (
    f"# HELP {HUGE_FAMILY} A generated series, one per line, for bodies larger than any buffer.\n"
    f"# TYPE {HUGE_FAMILY} gauge\n"
).encode()
_HUGE_MARK = b"@@@@@@@@"  # replaced by the block number: every line is a distinct series
_HUGE_BLOCK = b"".join(
    b'%s{block="%s",line="%04d"} %d\n' % (HUGE_FAMILY.encode(), _HUGE_MARK, line, line)
    for line in range(4096)
)
# Fault.CORRUPT_GZIP: this many bytes are inverted in the middle of the gzip stream.
CORRUPT_GZIP_BYTES = 16
# Framing.SPLIT: the pause between a chunk's data and its CRLF, long enough for a reader on the
# same machine to take the data alone.
SPLIT_PAUSE = 0.002
# Pauses of in-flight faults, per application, so that its shutdown can cut them short.
PAUSES = web.AppKey("fake_exporter_pauses", set[asyncio.Future[bool]])
VARIANT_CACHE_SIZE = 32


class Fault(enum.StrEnum):
    """Misbehaviours of a Windows node that the proxy must survive."""

    NONE = "none"
    LATENCY = "latency"
    SLOW_BODY = "slow_body"
    RESET = "reset"
    HANG = "hang"
    ERROR = "error"
    GARBAGE = "garbage"  # answers bytes that are not HTTP, then closes
    HUGE = "huge"  # a valid exposition of `huge_bytes` bytes, generated while it is sent
    CORRUPT_GZIP = "corrupt_gzip"  # gzip (asked for or not) with bytes flipped mid-stream


class UnknownCollectorError(ValueError):
    """A collect[] name the capture has no collector for (the real exporter answers 400)."""

    def __init__(self, name: str) -> None:
        super().__init__(f'collector "{name}" not found')
        self.name = name


class _ConnectionDropped(Exception):
    """The handler aborted its connection on purpose; there is nobody left to answer."""


@dataclass(frozen=True, slots=True)
class _Sample:
    """One sample line, split so a replica label can be added without re-parsing per render."""

    raw: str  # the original line with its newline: copy 0 of the text format is byte-identical
    name: str
    labels: str | None  # text between the braces; None when the line has no braces
    rest: str  # " value [timestamp]\n"
    collector: str | None  # the `collector` label, only kept for the STATUS_FAMILIES

    def render(self, name: str, replica: int) -> str:
        if replica == 0:
            labels = "" if self.labels is None else f"{{{self.labels}}}"
        elif self.labels:
            labels = f'{{{self.labels},replica="{replica}"}}'
        else:
            labels = f'{{replica="{replica}"}}'
        return f"{name}{labels}{self.rest}"


@dataclass(slots=True)
class _Family:
    name: str
    type: str
    owner: str | None = None  # the collector that produces it; None = always served
    header: str = ""  # HELP/TYPE (and any other comment) lines exactly as captured
    help: str | None = None  # unescaped HELP text
    samples: list[_Sample] = field(default_factory=list)
    om_name: str = ""
    om_type: str = ""

    def name_for_openmetrics(self, names: set[str]) -> None:
        """Decide the OpenMetrics family name and type the way client_golang does.

        client_golang strips `_total` from counter families, which makes `go_memstats_alloc_bytes`
        (gauge) and `go_memstats_alloc_bytes_total` (counter) one name: strict parsers reject
        that, so such a counter is served as `unknown` under its full name instead.
        """
        self.om_name, self.om_type = self.name, "unknown" if self.type == "untyped" else self.type
        if self.type == "counter":
            base = self.name.removesuffix("_total")
            if (base != self.name and base in names) or f"{self.name}_total" in names:
                self.om_type = "unknown"
            else:
                self.om_name = base

    def om_header(self) -> str:
        lines = []
        if self.help is not None:
            escaped = self.help.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
            lines.append(f"# HELP {self.om_name} {escaped}\n")
        lines.append(f"# TYPE {self.om_name} {self.om_type}\n")
        return "".join(lines)

    def om_sample_name(self, sample: _Sample) -> str:
        if self.om_type == "counter" and not sample.name.endswith("_total"):
            return f"{sample.name}_total"
        return sample.name


_HELP_ESCAPE = re.compile(r"\\([\\n])")
_COLLECTOR_LABEL = re.compile(r'(?:^|,)collector="((?:[^"\\]|\\.)*)"')


def _unescape_help(text: str) -> str:
    return _HELP_ESCAPE.sub(lambda m: "\n" if m[1] == "n" else "\\", text)


def _collector_label(labels: str | None) -> str | None:
    match = _COLLECTOR_LABEL.search(labels or "")
    return match[1] if match else None


def _split_sample(line: str, family: _Family | None) -> _Sample:
    brace, space = line.find("{"), line.find(" ")
    if brace >= 0 and (space < 0 or brace < space):
        close = line.rindex("}")  # values and timestamps never contain a brace
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, labels, rest = line[:space], None, line[space:]
    in_status = family is not None and family.name in STATUS_FAMILIES
    collector = _collector_label(labels) if in_status else None
    return _Sample(line, name, labels, rest, collector)


@dataclass
class ExporterPayload:
    """The capture parsed into families, rendered into any (collectors, format, scale) variant.

    Parsing keeps each sample's original line so that text output stays byte-identical to the
    capture; sample timestamps (the capture has none) are passed through as they are.
    """

    source: bytes
    families: list[_Family]
    collectors: frozenset[str]

    @classmethod
    def parse(cls, source: bytes) -> ExporterPayload:
        text = source.decode("utf-8")
        lines = [f"{line}\n" for line in text.split("\n")]
        if text.endswith("\n"):
            lines.pop()
        families: list[_Family] = []
        current: _Family | None = None
        for line in lines:
            if line.startswith("#"):
                parts = line.rstrip("\n").split(" ", 3)
                keyword = parts[1] if len(parts) > 2 else ""
                if keyword in ("HELP", "TYPE"):
                    name = parts[2]
                    if current is None or current.name != name or current.samples:
                        current = _Family(name, "untyped")
                        families.append(current)
                    if keyword == "HELP":
                        current.help = _unescape_help(parts[3] if len(parts) > 3 else "")
                    else:
                        current.type = parts[3].strip() if len(parts) > 3 else "untyped"
                if current is not None:
                    current.header += line
                continue
            if not line.strip():
                continue  # blank lines are legal in 0.0.4; only the scale=1 capture keeps them
            sample = _split_sample(line, current)
            if current is None:
                current = _Family(sample.name, "untyped")
                families.append(current)
            current.samples.append(sample)

        collectors = frozenset(
            s.collector
            for f in families
            if f.name == "windows_exporter_collector_success"
            for s in f.samples
            if s.collector is not None
        )
        # Longest name wins so windows_netframework_clrjit_* is not taken by "net".
        by_length = sorted(collectors, key=len, reverse=True)
        names = {family.name for family in families}
        for family in families:
            family.name_for_openmetrics(names)
            family.owner = next((c for c in by_length if family.name.startswith(f"windows_{c}_")), None)
        return cls(source, families, collectors)

    def select(self, names: list[str]) -> frozenset[str] | None:
        """Validate collect[] values; None means every collector, like the real exporter."""
        if not names:
            return None
        for name in names:
            if name not in self.collectors:
                raise UnknownCollectorError(name)
        return frozenset(names)

    def render(self, *, collectors: frozenset[str] | None, openmetrics: bool, scale: int) -> bytes:
        if collectors is None and not openmetrics and scale == 1:
            return self.source
        groups: dict[str, tuple[_Family, list[_Sample]]] = {}
        for index, family in enumerate(self.families):
            if collectors is not None and family.owner not in (None, *collectors):
                continue
            samples = [
                s
                for s in family.samples
                if collectors is None or s.collector is None or s.collector in collectors
            ]
            # Text 0.0.4 keeps the capture's duplicated family where it is, as the real exporter
            # sends it. OpenMetrics forbids a family appearing twice or a series repeating, so
            # the later occurrence is merged into the first, without series already there.
            if not openmetrics or family.name not in groups:
                groups[family.name if openmetrics else str(index)] = (family, samples)
                continue
            merged = groups[family.name][1]
            seen = {(s.name, s.labels) for s in merged}
            merged.extend(s for s in samples if (s.name, s.labels) not in seen)
        out: list[str] = []
        for family, samples in groups.values():
            if openmetrics:
                out.append(family.om_header())
                names = [family.om_sample_name(s) for s in samples]
                for replica in range(scale):
                    out.extend(s.render(n, replica) for n, s in zip(names, samples, strict=True))
            else:
                out.append(family.header)
                out.extend(s.raw for s in samples)
                for replica in range(1, scale):
                    out.extend(s.render(s.name, replica) for s in samples)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode("utf-8")


@functools.cache
def _bundled_payload() -> ExporterPayload:
    """Parsed once per process: tests and benchmarks build many exporters over the same capture."""
    source = (importlib.resources.files("proxy") / "data" / CAPTURE_NAME).read_bytes()
    return ExporterPayload.parse(source)


def _params(entry: str) -> tuple[str, float]:
    """Split one Accept/Accept-Encoding entry into (lower-cased value, q)."""
    value, *params = (part.strip() for part in entry.split(";"))
    q = 1.0
    for param in params:
        key, _, raw = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(raw)
            except ValueError:
                q = 0.0
    return value.lower(), q


@functools.lru_cache(maxsize=64)
def _wants_openmetrics(accept: str) -> bool:
    return any(
        value == "application/openmetrics-text" and q > 0 for value, q in map(_params, accept.split(","))
    )


@functools.lru_cache(maxsize=64)
def _wants_gzip(accept_encoding: str) -> bool:
    return any(value == "gzip" and q > 0 for value, q in map(_params, accept_encoding.split(",")))


@dataclass(frozen=True, slots=True)
class _Variant:
    body: bytes
    headers: dict[str, str]


class FakeExporter:
    """windows_exporter's HTTP behaviour with knobs that tests may turn while it is serving."""

    def __init__(
        self,
        *,
        scale: int = 1,
        max_concurrent: int = 1,
        fault: Fault = Fault.NONE,
        latency: float = 1.0,
        huge_bytes: int = HUGE_BYTES,
        source: bytes | None = None,
        framing: Framing = Framing.GO,
        split_pause: float = SPLIT_PAUSE,
    ) -> None:
        if scale < 1:
            raise ValueError("scale must be >= 1")
        self.payload = _bundled_payload() if source is None else ExporterPayload.parse(source)
        self.scale = scale
        self.max_concurrent = max_concurrent
        self.fault = Fault(fault)
        self.latency = latency
        self.huge_bytes = huge_bytes
        self.framing = Framing(framing)
        self.split_pause = split_pause
        self.scrapes = 0
        self.served = 0
        self.rejected = 0
        self.start_time = int(time.time())
        self._in_flight = 0
        self._pinned: dict[tuple[bool, bool], _Variant] = {}
        self._cache: OrderedDict[tuple[frozenset[str], bool, bool], _Variant] = OrderedDict()
        # Full scrapes are what benchmarks hit: build them now, never on a measured request.
        for openmetrics in (False, True):
            body = self.payload.render(collectors=None, openmetrics=openmetrics, scale=scale)
            for compress in (False, True):
                self._pinned[openmetrics, compress] = self._wrap(body, openmetrics, compress)

    @property
    def in_flight(self) -> int:
        """Scrapes being answered now (what max_concurrent limits)."""
        return self._in_flight

    def app(self) -> web.Application:
        app = web.Application()
        app[PAUSES] = set()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.on_shutdown.append(_interrupt_pauses)
        return app

    def _wrap(self, body: bytes, openmetrics: bool, compress: bool) -> _Variant:
        headers = {
            "Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE,
            "Vary": "Accept-Encoding",
            "Process-Start-Time-Unix": str(self.start_time),
        }
        if compress:
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return _Variant(body, headers)

    def variant(self, collectors: frozenset[str] | None, *, openmetrics: bool, compress: bool) -> _Variant:
        if collectors is None:
            return self._pinned[openmetrics, compress]
        key = (collectors, openmetrics, compress)
        if (cached := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return cached
        body = self.payload.render(collectors=collectors, openmetrics=openmetrics, scale=self.scale)
        self._cache[key] = built = self._wrap(body, openmetrics, compress)
        if len(self._cache) > VARIANT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return built

    def _text(self, status: int, text: str) -> web.Response:
        headers = {"Process-Start-Time-Unix": str(self.start_time)}
        return web.Response(status=status, text=text, headers=headers)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.scrapes += 1
        fault = self.fault
        if "fault" in request.query:
            try:
                fault = Fault(request.query["fault"])
            except ValueError:
                return self._text(400, f'unknown fault "{request.query["fault"]}"\n')
        try:
            collectors = self.payload.select(request.query.getall("collect[]", []))
        except UnknownCollectorError as exc:
            return self._text(400, f"couldn't create filtered metrics handler: {exc}\n")
        limit = self.max_concurrent
        if limit and self._in_flight >= limit:
            self.rejected += 1
            return self._text(503, f"Limit of concurrent requests reached ({limit}), try again later.\n")
        self._in_flight += 1
        try:
            return await self._answer(request, fault, collectors)
        except _ConnectionDropped:
            # aiohttp only fails to send this (quietly); raising would log a traceback as ERROR.
            return web.Response(status=499)
        finally:
            self._in_flight -= 1

    async def _answer(
        self, request: web.Request, fault: Fault, collectors: frozenset[str] | None
    ) -> web.StreamResponse:
        if fault is Fault.ERROR:
            return self._text(500, "fake windows_exporter: injected error\n")
        if fault is Fault.GARBAGE:
            return self._garbage(request)
        if fault is Fault.HANG:
            await _pause(request, None)
        if fault is Fault.LATENCY:
            await _pause(request, self.latency)
        openmetrics = _wants_openmetrics(request.headers.get("Accept", ""))
        compress = _wants_gzip(request.headers.get("Accept-Encoding", ""))
        if fault is Fault.CORRUPT_GZIP:
            compress = True  # like a broken exporter or middlebox, whatever the client accepts
        variant = self.variant(collectors, openmetrics=openmetrics, compress=compress)
        # Body faults need a body: a HEAD answer must not carry one, so it is served normally.
        if fault is Fault.SLOW_BODY and request.method != "HEAD":
            return await self._slow_body(request, variant)
        if fault is Fault.RESET and request.method != "HEAD":
            return await self._reset(request, variant)
        if fault is Fault.HUGE:
            return await self._huge(request)
        if fault is Fault.CORRUPT_GZIP:
            variant = corrupted(variant)
        self.served += 1
        body = _Body(self, request)
        if not body.unsized(len(variant.body)):
            return web.Response(body=variant.body, headers=variant.headers)
        response = await body.start(variant.headers, len(variant.body))
        await body.send_whole(variant.body)
        return response

    def _garbage(self, request: web.Request) -> web.StreamResponse:
        """Answer bytes that are not HTTP, then close: a wrong service on the exporter's port."""
        transport = request.transport
        if transport is None:
            raise _ConnectionDropped
        transport.write(GARBAGE)
        transport.close()  # after the bytes are flushed
        raise _ConnectionDropped

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A valid text exposition of about `huge_bytes`, never held whole: one block at a time."""
        body = _Body(self, request)
        response = await body.start({"Content-Type": TEXT_CONTENT_TYPE}, huge_length(self.huge_bytes))
        if request.method != "HEAD":
            for block in huge_blocks(self.huge_bytes):
                await body.write(block)  # waits while the client is not reading
        await body.finish()
        self.served += 1
        return response

    async def _slow_body(self, request: web.Request, variant: _Variant) -> web.StreamResponse:
        writer = _Body(self, request)
        response = await writer.start(variant.headers, len(variant.body))
        body = variant.body
        step = -(-len(body) // SLOW_BODY_PIECES)
        for offset in range(0, len(body), step):
            if offset:
                await _pause(request, self.latency / SLOW_BODY_PIECES)
            # Each piece is flushed, as a handler that calls http.Flusher would, so it trickles.
            await writer.write(body[offset : offset + step], flush=True)
        await writer.finish()
        self.served += 1
        return response

    async def _reset(self, request: web.Request, variant: _Variant) -> web.StreamResponse:
        """Promise the full body, deliver half, then RST: the truncation the proxy must detect.

        Chunked, half of the framed bytes go out: the cut falls wherever it falls in the framing.
        """
        body = _Body(self, request)
        response = await body.start(variant.headers, len(variant.body))
        if body.framed:
            wire = go_wire(variant.body)
            await body.send_raw(wire[: len(wire) // 2])
        else:
            await response.write(variant.body[: len(variant.body) // 2])
        transport = request.transport
        if transport is None:
            raise _ConnectionDropped  # the client is already gone
        # abort() discards what is still buffered in user space; a client that stops reading
        # must not keep this handler alive, hence the bounded wait (about one second).
        for _ in range(1000):
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        raise _ConnectionDropped

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


class _Body:
    """One answer's body on the wire, framed as the exporter's `framing` says (see proxy.fake_wire).

    aiohttp frames each write as a chunk of its own. To frame as Go does, the head goes out with
    `Transfer-Encoding: chunked` and aiohttp's stream writer is then told the body is not chunked,
    so the bytes framed here pass through it untouched; keep-alive works as for any response.
    """

    __slots__ = ("_data", "_exporter", "_request", "_response", "_wire", "framed")

    def __init__(self, exporter: FakeExporter, request: web.Request) -> None:
        self._exporter = exporter
        self._request = request
        self._response = web.StreamResponse()
        self._data = bytearray()  # written by the handler, not yet a whole chunk
        self._wire = bytearray()  # framed, not yet a whole 4 KiB socket write (Framing.GO)
        self.framed = False

    def unsized(self, length: int | None) -> bool:
        """Whether this answer goes without Content-Length: Go sends one only when the whole body
        fit in its 2048-byte response buffer. Then HTTP/1.1 GETs are chunked (framed here), HEAD
        answers have headers only, and HTTP/1.0 bodies end when the connection closes."""
        return self._exporter.framing is not Framing.CONTENT_LENGTH and (
            length is None or length > GO_CHUNK_BYTES
        )

    async def start(self, headers: dict[str, str], length: int | None) -> web.StreamResponse:
        request, response = self._request, self._response
        response.headers.update(headers)
        if not self.unsized(length):
            response.content_length = length
        elif request.version >= HttpVersion11 and request.method != "HEAD":
            response.enable_chunked_encoding()
            self.framed = True
        await response.prepare(request)
        if self.framed:
            writer = request.writer
            assert isinstance(writer, StreamWriter)
            writer.chunked = False  # the framing is ours from here on
        return response

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are, in Go's 4 KiB socket writes."""
        view = memoryview(data)
        for offset in range(0, len(view), GO_FLUSH_BYTES):
            await self._response.write(view[offset : offset + GO_FLUSH_BYTES])

    async def send_whole(self, body: bytes) -> None:
        """A complete body at once, the common answer: its Go framing is built once and cached."""
        if self.framed and self._exporter.framing is Framing.GO:
            await self.send_raw(go_wire(body))
            await self._response.write_eof()
        else:
            await self.write(body)
            await self.finish()

    async def write(self, data: bytes, *, flush: bool = False) -> None:
        if not self.framed:
            if self._request.method != "HEAD":
                await self._response.write(data)
            return
        self._data += data
        ready = len(self._data) if flush else len(self._data) - len(self._data) % GO_CHUNK_BYTES
        if ready:
            chunks = go_chunks(bytes(self._data[:ready]))
            del self._data[:ready]
            await self._send_chunks(chunks, flush=flush)

    async def finish(self) -> None:
        if self.framed:
            await self.write(b"", flush=True)
            if self._exporter.framing is Framing.SPLIT:
                await self._response.write(LAST_CHUNK)
            else:
                self._wire += LAST_CHUNK
                await self._send_wire(flush=True)
        await self._response.write_eof()

    async def _send_chunks(self, chunks: list[bytes], *, flush: bool) -> None:
        if self._exporter.framing is Framing.SPLIT:
            for chunk in chunks:
                await self._response.write(b"%x\r\n%s" % (len(chunk), chunk))
                await _pause(self._request, self._exporter.split_pause)
                await self._response.write(b"\r\n")
            return
        for chunk in chunks:
            self._wire += frame(chunk)
        await self._send_wire(flush=flush)

    async def _send_wire(self, *, flush: bool) -> None:
        """Framing.GO: what fills Go's 4 KiB connection buffer goes out, the rest when flushed."""
        ready = len(self._wire) if flush else len(self._wire) - len(self._wire) % GO_FLUSH_BYTES
        if ready:
            data = bytes(self._wire[:ready])
            del self._wire[:ready]
            await self.send_raw(data)


def corrupted(gzipped: _Variant) -> _Variant:
    """Fault.CORRUPT_GZIP's answer: the gzipped variant with bytes inverted mid-stream.

    The HTTP framing stays valid (the right Content-Length): only a gunzip of the body fails.
    """
    body = bytearray(gzipped.body)
    middle = len(body) // 2
    for index in range(middle, middle + CORRUPT_GZIP_BYTES):
        body[index] ^= 0xFF
    return _Variant(bytes(body), gzipped.headers)


def _huge_block_count(size: int) -> int:
    return -(-max(size - len(_HUGE_HEADER), 0) // len(_HUGE_BLOCK))


def huge_length(size: int) -> int:
    """The exact length of Fault.HUGE's body for `huge_bytes=size` (at least `size`)."""
    return len(_HUGE_HEADER) + _huge_block_count(size) * len(_HUGE_BLOCK)


def huge_blocks(size: int) -> Iterator[bytes]:
    """Fault.HUGE's body: the header, then 4096-line blocks of distinct series, about `size` bytes."""
    yield _HUGE_HEADER
    for number in range(_huge_block_count(size)):
        yield _HUGE_BLOCK.replace(_HUGE_MARK, b"%08d" % number)


async def _pause(request: web.Request, seconds: float | None) -> None:
    """Sleep (forever if None) unless the app shuts down: then drop the connection unanswered.

    Without this a runner's cleanup waits for every hanging or slow handler until its shutdown
    timeout (60 s by default) before cancelling them.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()
    timer = None if seconds is None else loop.call_later(seconds, _resolve, future, False)
    pauses = request.app[PAUSES]
    pauses.add(future)
    try:
        interrupted = await future
    finally:
        pauses.discard(future)
        if timer is not None:
            timer.cancel()
    if interrupted:
        if request.transport is not None:
            request.transport.abort()
        raise _ConnectionDropped


def _resolve(future: asyncio.Future[bool], interrupted: bool) -> None:
    if not future.done():
        future.set_result(interrupted)


async def _interrupt_pauses(app: web.Application) -> None:
    pauses: set[asyncio.Future[bool]] = app[PAUSES]
    for future in list(pauses):
        _resolve(future, True)


async def run_fake_exporter(exporter: FakeExporter, host: str, port: int) -> web.AppRunner:
    """Start listening; the caller owns the runner and must `await runner.cleanup()`."""
    # handler_cancellation: a client that gives up on a hang or slow scrape frees its slot.
    runner = web.AppRunner(exporter.app(), access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound, needed when run_fake_exporter was asked for port 0."""
    return int(runner.addresses[0][1])


def _at_least(minimum: float, kind: Callable[[str], float]) -> Callable[[str], float]:
    """argparse type: reject nonsense (negative latency, scale 0) before anything starts."""

    def parse(value: str) -> float:
        number = kind(value)
        if not number >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return number

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen-address", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--listen-port", type=int, default=9182, help="0 = any free port")
    parser.add_argument("--scale", type=_at_least(1, int), default=1, help="multiply every series N times")
    parser.add_argument("--max-concurrent", type=_at_least(0, int), default=1, help="0 = unlimited")
    parser.add_argument("--fault", choices=[f.value for f in Fault], default=Fault.NONE.value)
    parser.add_argument(
        "--latency", type=_at_least(0.0, float), default=1.0, help="seconds, for latency/slow_body"
    )
    parser.add_argument(
        "--huge-bytes", type=_at_least(0, int), default=HUGE_BYTES, help="body size for the huge fault"
    )
    parser.add_argument(
        "--framing",
        choices=[f.value for f in Framing],
        default=Framing.GO.value,
        help="go: chunked as windows_exporter's Go server sends it (default); split: each chunk's "
        "data and CRLF written apart, --split-pause between; content-length: one write, as v0.16",
    )
    parser.add_argument(
        "--split-pause", type=_at_least(0.0, float), default=SPLIT_PAUSE, help="seconds, for --framing split"
    )


async def serve_from_args(args: argparse.Namespace, stop: asyncio.Event) -> None:
    exporter = FakeExporter(
        scale=args.scale,
        max_concurrent=args.max_concurrent,
        fault=Fault(args.fault),
        latency=args.latency,
        huge_bytes=args.huge_bytes,
        framing=Framing(args.framing),
        split_pause=args.split_pause,
    )
    runner = await run_fake_exporter(exporter, args.listen_address, args.listen_port)
    try:
        host = args.listen_address
        if ":" in host:
            host = f"[{host}]"
        print(
            f"fake windows_exporter listening on http://{host}:{bound_port(runner)}/metrics",
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
