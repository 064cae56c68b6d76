"""The HTTP surface: /metrics (streamed from the exporter), /health, /ready and /proxy/metrics.

Data flows one way: scraper request -> upstream request -> body chunks -> scraper. A scrape that
breaks after the status line went out is aborted at the TCP level, because a chunked body that
ends cleanly would be ingested by Prometheus as a complete scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Hashable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.typedefs import Handler

from proxy import __version__
from proxy.coalesce import Flight, FlightAborted, Flights, Head, Refusal
from proxy.exposition import is_openmetrics
from proxy.inflight import STOPPING, InFlight
from proxy.rewrite import BodyRewrite, BrokenBody, RuleSet
from proxy.rules import build_rule_set
from proxy.settings import Settings
from proxy.telemetry import Telemetry
from proxy.upstream import (
    SCRAPE_TIMEOUT_HEADER,
    Upstream,
    UpstreamFailure,
    body_failure,
    forwarded_headers,
    response_headers,
)
from proxy.webconfig import REALM, BasicAuth, WebConfig

log = logging.getLogger("proxy.app")

SERVER_HEADER = f"windows-metrics-proxy/{__version__}"
UPSTREAM_KEY: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
TELEMETRY_KEY: web.AppKey[Telemetry] = web.AppKey("telemetry", Telemetry)
IN_FLIGHT_KEY: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)

# Rewritten bodies are gzipped for scrapers that accept it. Level 1: metrics text still shrinks
# about tenfold, for a fraction of the CPU of the default level on a busy Windows node.
GZIP_LEVEL = 1
# Headers that describe the exporter's bytes, which a rewritten body no longer is.
_ENCODING_HEADERS = frozenset({"content-length", "content-encoding", "vary"})


def _abort(request: web.BaseRequest) -> None:
    """Cut the scraper's connection so the broken body cannot pass for a complete one."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers={"Server": SERVER_HEADER})


def accepts_gzip(accept_encoding: str | None) -> bool:
    for part in (accept_encoding or "").split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class ClientWriter:
    """One scraper's end of the body: its response, and its own gzip stream for rewritten bodies."""

    __slots__ = ("_compressor", "_timer", "response", "served", "timed_out")

    def __init__(self, head: Head, request: web.Request, time_limit: float) -> None:
        self.response = web.StreamResponse(status=head.status)
        headers = self.response.headers
        for name, value in head.headers:
            headers.add(name, value)
        headers["Server"] = SERVER_HEADER
        self._compressor = None
        if head.rewritten:
            headers["Vary"] = "Accept-Encoding"
            if accepts_gzip(request.headers.get("Accept-Encoding")):
                headers["Content-Encoding"] = "gzip"
                if request.method != "HEAD":  # a HEAD answer must not carry even a gzip trailer
                    self._compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self.served = 0
        # A scraper that stops reading must not hold the exporter's single scrape slot (or a
        # coalesced flight) forever: past its own scrape timeout its connection is cut.
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            time_limit, self._cut_off, request
        )

    def _cut_off(self, request: web.Request) -> None:
        self._timer = None
        self.timed_out = True
        _abort(request)

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data)
            if not data:
                return
        self.served += len(data)
        await self.response.write(data)

    async def close(self) -> None:
        """The body is complete: end the gzip stream (aiohttp then ends the HTTP body)."""
        if self._compressor is not None:
            tail = self._compressor.flush()
            self.served += len(tail)
            await self.response.write(tail)


class MetricsProxy:
    """The /metrics handler and the state it shares across scrapes."""

    def __init__(
        self, settings: Settings, upstream: Upstream, telemetry: Telemetry, rules: RuleSet | None
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.telemetry = telemetry
        self.rules = rules
        self.flights = Flights(settings.coalesce_buffer_bytes)
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t = self.telemetry
        t.scrapes.inc()
        t.scrapes_in_flight.inc()
        try:
            if not self.settings.coalesce or request.method != "GET":
                return await self._lead(request, None)
            headers = request.headers
            # Scrapes are identical when the exporter would answer them with the same bytes. When
            # rewriting, the proxy asks for an uncompressed body whatever the scraper accepts.
            key: Hashable = (
                request.rel_url.raw_query_string,
                headers.get("Accept"),
                None if self.rules is not None else headers.get("Accept-Encoding"),
            )
            flight = self.flights.joinable(key)
            if flight is not None:
                t.coalesced_scrapes.inc()
                return await self._follow(request, flight)
            return await self._lead(request, self.flights.start(key))
        finally:
            t.scrapes_in_flight.dec()

    async def _lead(self, request: web.Request, flight: Flight | None) -> web.StreamResponse:
        """Ask the exporter and stream its answer to this scraper and to any followers."""
        handed_off = False
        own_writer: ClientWriter | None = None
        try:
            deadline = self.upstream.deadline(request.headers.get(SCRAPE_TIMEOUT_HEADER))
            started = time.perf_counter()
            try:
                upstream = await self.upstream.request(
                    request.method,
                    request.rel_url.raw_query_string,
                    forwarded_headers(request.headers, rewriting=self.rules is not None),
                    deadline,
                )
            except UpstreamFailure as failure:
                self._count(failure.outcome, failure.reason, log_level=logging.WARNING)
                text = f"{failure.status} {failure.reason} (upstream {self.upstream.url})"
                if flight is not None:
                    flight.set_head(Refusal(failure.status, text))
                return _text(failure.status, text)
            self.telemetry.upstream_first_byte.observe(time.perf_counter() - started)

            transform = None
            headers = response_headers(upstream.headers)
            rewriting = self.rules is not None and upstream.status == 200
            if rewriting:
                headers = [(k, v) for k, v in headers if k.lower() not in _ENCODING_HEADERS]
                if request.method == "GET":  # a HEAD answer has headers only, describing a GET's
                    transform = BodyRewrite(
                        self.rules,  # type: ignore[arg-type]
                        openmetrics=is_openmetrics(upstream.headers.get("Content-Type")),
                        gzipped=upstream.headers.get("Content-Encoding", "").lower() == "gzip",
                    )
            head = Head(upstream.status, tuple(headers), rewritten=rewriting)
            if flight is not None:
                flight.set_head(head)
            writer: ClientWriter | None = ClientWriter(head, request, self._time_limit(request))
            own_writer = writer
            try:
                await own_writer.response.prepare(request)
            except (ConnectionError, RuntimeError):
                writer = None
            try:
                await self._pump(upstream, transform, flight, request, writer, deadline, started)
            except asyncio.CancelledError as cancelled:
                # This scraper's handler was cancelled (it hung up, or the server is stopping).
                # Followers still want the body: finish it for them in the background, unless
                # the stop is aborting them too.
                stopping = cancelled.args == (STOPPING,)
                if flight is not None and flight.has_followers and not stopping:
                    task = asyncio.create_task(
                        self._pump(upstream, transform, flight, request, None, deadline, started)
                    )
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                    handed_off = True
                else:
                    upstream.close()
                    self._count("cancelled", STOPPING if stopping else "the scraper went away mid-body")
                raise
            return writer.response if writer is not None else web.Response(status=499)
        finally:
            if own_writer is not None:
                own_writer.done()
            if flight is not None and not handed_off:
                self.flights.end(flight)

    async def _pump(
        self,
        upstream: aiohttp.ClientResponse,
        transform: BodyRewrite | None,
        flight: Flight | None,
        request: web.Request,
        writer: ClientWriter | None,
        deadline: float,
        started: float,
    ) -> None:
        """Move the body from the exporter (rewritten, if rules are set) to the scraper and followers."""
        t = self.telemetry
        content = upstream.content
        gone = "every scraper went away mid-body"
        try:
            while True:
                # One buffered piece at a time, as the socket delivered it: readany() would join
                # everything buffered into a new bytes object, a copy of the whole body per scrape.
                # readchunk() also answers (b"", True) when an HTTP chunk's closing CRLF arrives
                # after its data was read: the end of one chunk, not of the body. Go's net/http
                # (windows_exporter) writes data and CRLF separately, so this happens in the
                # wild. The body has ended only when the stream is at EOF, which aiohttp sets
                # only after the last chunk; asking at_eof() also covers the empty payload of a
                # HEAD answer, whose reader says (b"", True) forever once it said (b"", False).
                chunk, end_of_http_chunk = await content.readchunk()
                if not chunk:
                    if end_of_http_chunk and not content.at_eof():
                        continue
                    if transform is None:
                        break
                    chunk = transform.finish()
                    transform_done, transform = transform, None
                    self._count_rewrite(transform_done)
                    if not chunk:
                        break
                elif transform is not None:
                    chunk = transform.feed(chunk)
                    if not chunk:
                        continue
                if flight is not None:
                    flight.publish(chunk)
                if writer is not None:
                    try:
                        await writer.write(chunk)
                    except (ConnectionError, RuntimeError):
                        t.bytes_served.inc(writer.served)
                        if writer.timed_out:
                            t.client_aborts.inc()
                            gone = "the scraper did not read the body within its scrape timeout"
                        writer = None
                if writer is None and (flight is None or not flight.has_followers):
                    upstream.close()
                    self._count("cancelled", gone)
                    if flight is not None:
                        self.flights.end(flight)
                    return
            if writer is not None:
                # A scraper that leaves at the very end is no failure of the exporter's answer.
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await writer.close()
        except (aiohttp.ClientError, OSError, TimeoutError, BrokenBody) as exc:
            upstream.close()
            outcome, reason = body_failure(exc, deadline)
            self._count(outcome, reason, log_level=logging.WARNING)
            if flight is not None:
                self.flights.end(flight, exc)
            if writer is not None:
                t.client_aborts.inc()
                t.bytes_served.inc(writer.served)
                _abort(request)
            return
        upstream.release()
        if flight is not None:
            self.flights.end(flight)
        if writer is not None:
            t.bytes_served.inc(writer.served)
        t.upstream_last_byte.observe(time.perf_counter() - started)
        if 200 <= upstream.status < 300:
            self._count("success", None)
        else:
            self._count("http_error", f"exporter answered {upstream.status}", log_level=logging.INFO)

    async def _follow(self, request: web.Request, flight: Flight) -> web.StreamResponse:
        """Serve another scrape's upstream answer, replaying what already went by."""
        follower = flight.join()
        writer: ClientWriter | None = None
        try:
            head = await asyncio.shield(flight.head)
            if isinstance(head, Refusal):
                return _text(head.status, head.text)
            writer = ClientWriter(head, request, self._time_limit(request))
            await writer.response.prepare(request)
            try:
                while batch := await follower.next_batch():
                    for chunk in batch:
                        await writer.write(chunk)
                await writer.close()
            except FlightAborted:
                self.telemetry.client_aborts.inc()
                _abort(request)
            return writer.response
        except (ConnectionError, RuntimeError):
            # This scraper went away; the flight goes on for the others.
            return web.Response(status=499)
        finally:
            flight.leave(follower)
            if writer is not None:
                writer.done()
                self.telemetry.bytes_served.inc(writer.served)

    def _time_limit(self, request: web.Request) -> float:
        """How long a scraper may take to read its answer: its own scrape timeout."""
        return self.upstream.scrape_window(request.headers.get(SCRAPE_TIMEOUT_HEADER))

    def _count(self, outcome: str, reason: str | None, log_level: int = logging.DEBUG) -> None:
        self.telemetry.upstream_requests.labels(outcome).inc()
        if reason is not None:
            log.log(
                log_level,
                "upstream request %s",
                outcome,
                extra={"fields": {"outcome": outcome, "reason": reason, "upstream": self.upstream.url}},
            )

    def _count_rewrite(self, transform: BodyRewrite) -> None:
        stats = transform.stats
        t = self.telemetry
        t.relabel_samples.labels("kept").inc(stats.kept)
        t.relabel_samples.labels("dropped").inc(stats.dropped)
        t.relabel_samples.labels("unparsable").inc(stats.unparsable)
        t.relabel_cache_hits.inc(stats.cache_hits)
        t.relabel_cache_misses.inc(stats.cache_misses)
        if stats.unparsable:
            log.warning(
                "unparsable lines passed through",
                extra={"fields": {"lines": stats.unparsable, "upstream": self.upstream.url}},
            )


async def health(_request: web.Request) -> web.Response:
    """Liveness, as the nginx image answered it: the process serves, whatever the exporter does."""
    return _text(200, "ok")


async def ready(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM_KEY]
    max_age = upstream.settings.ready_max_age
    last = upstream.last_answer
    if last is not None and time.monotonic() - last <= max_age:
        return _text(200, f"ready: exporter answered {time.monotonic() - last:.1f}s ago")
    reason = await upstream.probe()
    if reason is None:
        return _text(200, "ready: exporter answered a probe")
    return _text(503, f"not ready: {reason}")


async def self_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[TELEMETRY_KEY].render(request.headers.get("Accept"))
    response = web.Response(body=body, headers={"Server": SERVER_HEADER})
    response.headers["Content-Type"] = content_type
    return response


def basic_auth_middleware(
    users: BasicAuth, telemetry: Telemetry, *, open_health: bool
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def require_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if open_health and request.path == "/health":
            return await handler(request)
        if await users.check(request.headers.get("Authorization")):
            return await handler(request)
        telemetry.auth_failures.inc()
        return web.Response(
            status=401,
            text="401 unauthorized\n",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}"', "Server": SERVER_HEADER},
        )

    return require_auth


def create_app(
    settings: Settings,
    *,
    telemetry: Telemetry | None = None,
    resolver: AbstractResolver | None = None,
    web_config: WebConfig | None = None,
) -> web.Application:
    """The proxy as an aiohttp app; the upstream pool opens on startup and closes on cleanup."""
    telemetry = telemetry or Telemetry()
    upstream = Upstream(settings, resolver=resolver)
    rules = build_rule_set(settings)
    if rules is not None:
        telemetry.watch_relabel_cache(rules.cache)
    proxy = MetricsProxy(settings, upstream, telemetry, rules)

    # Outermost, so a stop also knows about a request still waiting on basic auth.
    in_flight = InFlight(proxy._background)
    middlewares = [in_flight.track]
    if web_config is not None and web_config.requires_auth:
        middlewares.append(
            basic_auth_middleware(
                BasicAuth(web_config.users), telemetry, open_health=not settings.health_auth
            )
        )
    app = web.Application(
        middlewares=middlewares, handler_args={"max_field_size": 8190, "max_line_size": 8190}
    )
    app[UPSTREAM_KEY] = upstream
    app[TELEMETRY_KEY] = telemetry
    app[IN_FLIGHT_KEY] = in_flight

    async def upstream_pool(_app: web.Application):  # type: ignore[no-untyped-def]
        await upstream.start()
        yield
        await upstream.close()

    app.cleanup_ctx.append(upstream_pool)
    app.router.add_get("/metrics", proxy.handle, allow_head=True)
    app.router.add_get("/health", health, allow_head=True)
    app.router.add_get("/ready", ready, allow_head=True)
    app.router.add_get("/proxy/metrics", self_metrics, allow_head=True)
    return app
