"""Hypothesis-generated HTTP requests, sent as raw bytes to a running proxy (start_proxy, listener
included): methods, request targets, query strings, versions and headers, weird bytes included.

Nothing may answer 500, crash (an error logged, a traceback) or hang (every exchange is bounded),
and the proxy serves a normal scrape afterwards. The proxy and its fake exporter run in a thread
with their own event loop, so a request that wedges the proxy cannot wedge the test client.
(Exposition bytes against the rewriter are fuzzed in tests/test_rewrite.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.fake_exporter import FakeExporter, bound_port, run_fake_exporter
from proxy.rewrite import rewrite_bytes
from proxy.rules import build_rule_set
from proxy.server import RunningProxy, start_proxy
from proxy.settings import load_settings
from tests.conftest import LOOPBACK
from tests.test_fake_exporter import CAPTURE

EXCHANGE_LIMIT = 8.0  # seconds for one exchange; the proxy's own deadlines are 2 s
PATHS = ["/metrics", "/health", "/ready", "/proxy/metrics", "/", "*", "/metrics/", "/federate"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PROPFIND"]
HEADER_NAMES = [
    "Accept",
    "Accept-Encoding",
    "X-Prometheus-Scrape-Timeout-Seconds",
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Expect",
    "Authorization",
    "Upgrade",
    "TE",
    "Range",
    "If-None-Match",
    "X-Forwarded-Host",
    "Forwarded",
    "Cookie",
]
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
URL_CHARS = TCHAR + "/:@;=,()[]?%"


class ServingThread:
    """A fake exporter and start_proxy in a thread of their own, with their own event loop."""

    def __init__(self, **settings: str) -> None:
        self.settings = settings
        self.expected = CAPTURE  # the body of a plain scrape
        if "keep" in settings:
            rules = build_rule_set(load_settings(hostip=LOOPBACK, keep=settings["keep"]))
            assert rules is not None
            self.expected = rewrite_bytes(CAPTURE, rules, openmetrics=False)
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzzed-proxy", daemon=True)
        self._proxy: RunningProxy | None = None
        self._runner: Any = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        self._runner = await run_fake_exporter(FakeExporter(max_concurrent=0), LOOPBACK, 0)
        values = {
            "hostip": LOOPBACK,
            "port": str(bound_port(self._runner)),
            "listen_address": LOOPBACK,
            "listen_port": "0",
            **self.settings,
        }
        self._proxy = await start_proxy(load_settings(**values))
        self.port = self._proxy.port

    async def _stop(self) -> None:
        if self._proxy is not None:
            await self._proxy.close()
        await self._runner.cleanup()

    def __enter__(self) -> ServingThread:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the proxy did not stop"


class Problems(logging.Handler):
    """Records that mean something crashed: errors, and anything carrying a traceback.

    A request aiohttp cannot parse is logged by the proxy as one debug line ("rejected a malformed
    request", see proxy/logs.py); those are counted as bad requests, and anything else at ERROR or
    with a traceback is a finding.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []
        self.bad_requests = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "aiohttp.server" and record.getMessage() == "rejected a malformed request":
            self.bad_requests += 1
            return
        if not (record.exc_info or record.levelno >= logging.ERROR):
            return
        error = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(error, HttpProcessingError):
            self.bad_requests += 1
            return
        self.found.append(f"{record.name} {record.levelname} {record.getMessage()} {error!r}")


KEEP = "windows_(cpu|memory|os)_.*"


@pytest.fixture(scope="module", params=["passthrough", "relabel"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[ServingThread, Problems]]:
    """The proxy (coalescing by default), plain or rewriting: rules parse Accept and Accept-Encoding."""
    problems = Problems()
    root = logging.getLogger()
    root.addHandler(problems)
    level = root.level
    root.setLevel(logging.DEBUG)  # so the proxy's one-line record of a rejected request reaches us
    settings = {"scrape_timeout": "2", "header_timeout": "2", "shutdown_timeout": "1"}
    if request.param == "relabel":
        settings["keep"] = KEEP
    try:
        with ServingThread(**settings) as thread:
            yield thread, problems
    finally:
        root.removeHandler(problems)
        root.setLevel(level)


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send, then read until the proxy closes; (what came back, whether it closed in time)."""
    deadline = time.monotonic() + EXCHANGE_LIMIT
    chunks: list[bytes] = []
    with socket.create_connection((LOOPBACK, port), timeout=EXCHANGE_LIMIT) as sock:
        with contextlib.suppress(OSError):  # the proxy may close on a bad head before reading it all
            sock.sendall(data)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), False
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)


def dechunk(body: bytes) -> bytes:
    """A chunked body's content (a rewritten body is chunked); other bodies as they are."""
    if not body.endswith(b"0\r\n\r\n"):
        return body
    out, rest = [], body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            break
        out.append(rest[:length])
        rest = rest[length + 2 :]
    return b"".join(out)


def statuses(answer: bytes) -> list[int]:
    """The status of every response in `answer` (pipelined requests get several)."""
    found = []
    for line in answer.split(b"\n"):
        if line.startswith(b"HTTP/") and line[5:6].isdigit():
            parts = line.split(b" ", 2)
            if len(parts) > 1 and parts[1].isdigit():
                found.append(int(parts[1]))
    return found


# --- strategies ------------------------------------------------------------------------------------


VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))
tokens = st.text(TCHAR, min_size=1, max_size=12)
timeouts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e-300", "1e300", "nan", "inf", "", " 5 ", "0x10", "1_0", "\u0661\u0660"]),
)
queries = st.lists(
    st.one_of(
        st.sampled_from(["collect[]=cpu", "collect[]=os", "collect[]=nosuch", "collect%5B%5D=cpu", "a", "="]),
        st.text(URL_CHARS + "&+", max_size=24),
    ),
    max_size=4,
).map(lambda parts: "?" + "&".join(parts) if parts else "")

# Requests the HTTP parser accepts, so that they reach routing, the handlers and the upstream client.
fair_methods = st.sampled_from(["GET", "GET", "GET", "GET", "HEAD", "HEAD", *METHODS])
fair_paths = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(["/metrics"] * 4),
    st.builds(lambda p, s: p + s, st.sampled_from(PATHS), st.text(URL_CHARS, max_size=20)),
    st.builds(lambda p: f"http://{LOOPBACK}:1{p}", st.sampled_from(PATHS)),
)
fair_values = st.one_of(
    st.text(VISIBLE + " ", max_size=30).map(str.strip),
    st.sampled_from(["gzip", "gzip;q=0", "*/*", "application/openmetrics-text;version=1.0.0", "identity"]),
    timeouts.filter(str.isascii),
)
fair_headers = st.lists(st.tuples(st.one_of(st.sampled_from(HEADER_NAMES), tokens), fair_values), max_size=6)

# Anything: bytes where the parser expects tokens, URLs, versions and header text.
junk = st.binary(min_size=1, max_size=16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
any_methods = st.one_of(st.sampled_from(METHODS).map(str.encode), tokens.map(str.encode), junk)
any_targets = st.one_of(
    fair_paths.map(str.encode),
    st.builds(lambda p, b: p.encode() + b, st.sampled_from(PATHS), junk),
    st.text(max_size=20).map(lambda s: ("/metrics" + s).encode("utf-8", "surrogatepass")),
)
any_versions = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2", b"HTTP/1.1x", b"http/1.1", b""]
)
any_headers = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(HEADER_NAMES).map(str.encode), junk),
        st.one_of(fair_values.map(str.encode), junk, st.text(max_size=20).map(str.encode)),
    ),
    max_size=6,
)


def assemble(method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head ending in Connection: close (the test's own), one Host unless one was drawn.

    A body the head declares is sent: a declared body that never comes keeps the connection open
    for aiohttp's lingering time (10 s) after the answer, which is slow, not a hang.
    """
    lines = [method + b" " + target + (b" " + version if version else b"") + b"\r\n"]
    if not any(name.strip().lower() == b"host" for name, _ in headers):
        lines.append(b"Host: x\r\n")
    body = b""
    for name, raw in headers:
        key = name.strip().lower()
        value = raw.replace(b"\r", b"").replace(b"\n", b"")
        if key == b"connection":
            name = b"X-Connection"
        elif key == b"content-length" and value.strip().isdigit():
            if int(value) > 4096:
                value = b"0"
            body += b"x" * int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            body += b"0\r\n\r\n"
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"Connection: close\r\n\r\n")
    return b"".join(lines) + body


def harmless(target: str) -> str:
    """The fake exporter obeys ?fault=...: no forwarded query may switch a fault on."""
    if "fault" in urllib.parse.unquote_plus(target, errors="replace").lower():
        return target.lower().replace("fault", "f").replace("%", "")
    return target


@st.composite
def fair_requests(draw: st.DrawFn) -> tuple[bytes, str, str]:
    method, path, query = draw(fair_methods), draw(fair_paths), draw(queries)
    target = harmless(path + query)
    headers = [(n.encode(), v.encode()) for n, v in draw(fair_headers)]
    head = assemble(
        method.encode(), target.encode(), draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])), headers
    )
    if draw(st.booleans()):  # sometimes pipelined behind a keep-alive request on the same connection
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + head
    return head, method, path


@st.composite
def any_requests(draw: st.DrawFn) -> bytes:
    target = draw(any_targets)
    if b"fault" in target.lower():
        target = target.lower().replace(b"fault", b"f")
    return assemble(draw(any_methods), target, draw(any_versions), draw(any_headers))


# --- the tests -------------------------------------------------------------------------------------

EXAMPLES = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: bytes, answer: bytes, closed: bool, problems: Problems, seen: dict[int, int]) -> list[int]:
    assert closed, f"no close within {EXCHANGE_LIMIT}s for {data[:300]!r}"
    codes = statuses(answer)
    for code in codes:
        seen[code] = seen.get(code, 0) + 1
    # 504 is the proxy's honest answer to a scrape timeout header too short for any exporter.
    assert all(code < 500 or code == 504 for code in codes), (data[:300], answer[:300])
    assert problems.found == [], (data[:300], problems.found)
    return codes


def assert_still_serving(thread: ServingThread, problems: Problems) -> None:
    answer, closed = exchange(thread.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert closed
    assert statuses(answer) == [200]
    assert dechunk(answer.partition(b"\r\n\r\n")[2]) == thread.expected
    answer, _ = exchange(thread.port, b"GET /proxy/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"\nwindows_metrics_proxy_scrapes_in_flight 0.0\n" in answer
    assert problems.found == []


def test_parsable_requests_are_answered_and_never_500(served: tuple[ServingThread, Problems]) -> None:
    thread, problems = served
    seen: dict[int, int] = {}

    @EXAMPLES
    @given(request=fair_requests())
    def one(request: tuple[bytes, str, str]) -> None:
        data, method, path = request
        refused_before = problems.bad_requests
        answer, closed = exchange(thread.port, data)
        codes = check(data, answer, closed, problems, seen)
        # aiohttp logs a head it cannot parse before it answers it, so by the time the connection
        # is closed the record of this exchange (and only of this one) has been counted.
        refused = problems.bad_requests - refused_before
        pipelined = data.startswith(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        if refused:
            # The parser refused this head (e.g. an invalid Content-Length): one 400, and nothing
            # after it. A pipelined /health in the same read is lost with it, or answered first.
            assert refused == 1, (refused, data[:300], answer[:300])
            assert codes[-1:] == [400], (data[:300], answer[:300])
            assert len(codes) <= 1 + pipelined, (data[:300], answer[:300])
            return
        assert len(codes) == 1 + pipelined, (data[:300], answer[:300])
        if method in ("GET", "HEAD") and path == "/metrics":
            # served by the exporter (400: unknown collector), or a deadline too short (504), or
            # an Expect the server does not know (417, RFC 9110)
            assert codes[-1] in (200, 400, 417, 504), (data[:300], answer[:300])

    one()
    assert_still_serving(thread, problems)
    assert seen.get(200, 0) >= 50, seen  # most requests got past the parser to the handlers
    print(f"statuses: {dict(sorted(seen.items()))}; unparsable: {problems.bad_requests}")


def test_arbitrary_bytes_never_500_crash_or_hang(served: tuple[ServingThread, Problems]) -> None:
    thread, problems = served
    seen: dict[int, int] = {}

    @EXAMPLES
    @given(data=any_requests())
    def one(data: bytes) -> None:
        answer, closed = exchange(thread.port, data)
        check(data, answer, closed, problems, seen)

    one()
    assert_still_serving(thread, problems)
    print(f"statuses: {dict(sorted(seen.items()))}; unparsable: {problems.bad_requests}")
