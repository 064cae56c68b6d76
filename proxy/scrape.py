"""The scrape pipeline: a /metrics request, the flight that reads the exporter, the scraper's body.

Data flows one way. A scrape finds (or starts) the flight for the request the exporter would be
sent; the flight's reader task asks the exporter, rewrites the body if rules are set, and
publishes the pieces (coalesce.py); the scrape writes them to its scraper, at its own pace and
within its own scrape timeout. With coalescing off, or for HEAD, the flight is private to the
scrape, through the same code.

A scrape that breaks after its status line went out is aborted at the TCP level, because a
chunked body that ends cleanly would be ingested by Prometheus as a complete scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Hashable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy import __version__
from proxy.coalesce import NOBODY_LEFT, Cursor, CursorDropped, Flight, FlightFailed, Flights, Head, Refusal
from proxy.escaping import (
    Scheme,
    escape_lines,
    negotiate,
    rules_may_make_non_legacy,
    scraper_content_type,
    upstream_scheme,
)
from proxy.exposition import is_openmetrics
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

if TYPE_CHECKING:
    from proxy.pushdown import CollectorLearner, Decision, PushDown
    from proxy.rewrite import BodyRewrite, RuleSet

log = logging.getLogger("proxy.scrape")

SERVER_HEADER = f"windows-metrics-proxy/{__version__}"
# Rewritten bodies are gzipped for scrapers that accept it. Level 1: metrics text still shrinks
# about tenfold, for a fraction of the CPU of the default level on a busy Windows node.
GZIP_LEVEL = 1
# windows_exporter's start time (client_golang promhttp HandlerOpts.ProcessStartTime): a new value
# means a restarted exporter, whose collectors push-down must learn again.
START_TIME_HEADER = "Process-Start-Time-Unix"
# Headers that describe the exporter's bytes, which a rewritten body no longer is.
_ENCODING_HEADERS = frozenset({"content-length", "content-encoding", "vary"})


def abort(request: web.BaseRequest) -> None:
    """Cut the scraper's connection so a broken body cannot pass for a complete one."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def text_response(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers={"Server": SERVER_HEADER})


def accepts_gzip(accept_encoding: str | None) -> bool:
    for part in (accept_encoding or "").split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class ScraperTimedOut(CursorDropped):
    """The scraper did not take its body within its own scrape timeout."""


class ClientWriter:
    """One scraper's end of the body: its response, and its own gzip stream for rewritten bodies.

    A rewritten body is also escaped for this scraper: its names in the scheme its Accept asked
    for (escaping.py), said in its Content-Type. A passthrough body is the exporter's, which
    negotiated escaping with the scraper itself, so it and its headers are left alone.
    """

    __slots__ = ("_compressor", "_escaping", "_families", "_rules", "response", "served")

    def __init__(
        self,
        head: Head,
        request: web.Request,
        *,
        rules: RuleSet | None = None,
        names_may_change: bool = True,
    ) -> None:
        self.response = web.StreamResponse(status=head.status)
        headers = self.response.headers
        for name, value in head.headers:
            headers.add(name, value)
        headers["Server"] = SERVER_HEADER
        self._compressor = None
        self._escaping: Scheme | None = None
        self._rules = rules
        self._families: dict[str, frozenset[str]] = {}  # escape_lines' memory of this body
        if head.rewritten:
            headers["Vary"] = "Accept-Encoding"
            content_type = headers.get("Content-Type")
            negotiated = negotiate(request.headers.get("Accept"), content_type)
            if negotiated.scheme is not Scheme.ALLOW_UTF8:
                self._escaping = negotiated.scheme
            if content_type is not None:
                headers["Content-Type"] = scraper_content_type(
                    content_type, negotiated, names_may_change=names_may_change
                )
            if accepts_gzip(request.headers.get("Accept-Encoding")):
                headers["Content-Encoding"] = "gzip"
                if request.method != "HEAD":  # a HEAD answer must not carry even a gzip trailer
                    self._compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self.served = 0

    async def write(self, data: bytes) -> None:
        # Only once the rules have let out a line that may hold a quoted name (RuleSet.quoted_names,
        # set before that line is published): until then every piece would pass unchanged.
        if self._escaping is not None and self._rules is not None and self._rules.quoted_names:
            # The rewriter's pieces are whole lines (Rewriter.feed holds back an unfinished last
            # line and finish() ends the last one), which escape_lines needs.
            data = escape_lines(data, self._escaping, self._families)
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
    """The /metrics handler, and the flights it shares among scrapes."""

    def __init__(
        self, settings: Settings, upstream: Upstream, telemetry: Telemetry, rules: RuleSet | None
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.telemetry = telemetry
        self.rules = rules
        self.flights = Flights(settings.coalesce_buffer_bytes)
        # collect[] push-down (pushdown.py): with rules, the exporter is asked only for the
        # collectors whose series they can keep. The analysis runs once, here and per learned set.
        self.pushdown: PushDown | None = None
        if rules is not None and settings.collector_pushdown:
            from proxy.pushdown import Analysis, PushDown

            self.pushdown = PushDown(Analysis(rules.rules), settings.collector_refresh)
        # With rules, the exporter is asked for names in the scheme of the proxy's own name
        # validation, and each scraper's copy is escaped for it (ClientWriter).
        self._upstream_escaping = upstream_scheme(settings.name_validation)
        self._names_may_change = rules is not None and rules_may_make_non_legacy(rules.rules)
        # What can break a body. The rewriter's own errors only exist when rules are set: its
        # modules (2.8 MB) are loaded only then.
        self._body_errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)
        if rules is not None:
            from proxy.rewrite import BrokenBody

            self._body_errors = (*self._body_errors, BrokenBody)

    @property
    def readers(self) -> set[asyncio.Task[None]]:
        """The flights' reader tasks running now (a stop cancels them)."""
        return self.flights.tasks

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t = self.telemetry
        t.scrapes.inc()
        t.scrapes_in_flight.inc()
        try:
            return await self._serve(request)
        finally:
            t.scrapes_in_flight.dec()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        timeout_header = request.headers.get(SCRAPE_TIMEOUT_HEADER)
        # The scraper's own time: it gets its head and its whole body within it, or is cut off.
        expires = loop.time() + self.upstream.scrape_window(timeout_header)
        forwarded = forwarded_headers(
            request.headers, rewriting=self.rules is not None, escaping=self._upstream_escaping
        )
        flight, cursor = self._flight(request, forwarded, timeout_header)
        writer: ClientWriter | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            try:
                async with asyncio.timeout_at(expires):
                    head = await asyncio.shield(flight.head)
            except TimeoutError:
                return text_response(504, self._late_head(flight))
            if isinstance(head, Refusal):
                return text_response(head.status, head.text)
            writer = ClientWriter(head, request, rules=self.rules, names_may_change=self._names_may_change)
            cursor.on_drop = lambda: self._cut(request, "fell_behind")  # too far behind: cut now
            # A scraper that stops reading must not hold a flight, or the exporter's single
            # scrape slot, forever: past its own scrape timeout its connection is cut.
            timer = loop.call_at(expires, self._cut_off, request, cursor)
            await writer.response.prepare(request)
            while batch := await cursor.next_batch():
                for piece in batch:
                    await writer.write(piece)
            await writer.close()
            return writer.response
        except CursorDropped:
            return web.Response(status=499)  # cut off (and counted) when it was dropped
        except FlightFailed:
            self.telemetry.client_aborts.labels("upstream_broke").inc()
            abort(request)
            return writer.response if writer is not None else web.Response(status=499)
        except (ConnectionError, RuntimeError):
            # This scraper went away, or was cut off (and counted) as it wrote; the flight goes
            # on for the others.
            abort(request)
            return web.Response(status=499)
        finally:
            if timer is not None:
                timer.cancel()
            flight.leave(cursor)
            if writer is not None:
                self.telemetry.bytes_served.inc(writer.served)

    def _flight(
        self, request: web.Request, forwarded: dict[str, str], timeout_header: str | None
    ) -> tuple[Flight, Cursor]:
        """The flight this scrape reads: a running one for the same upstream request, or a new one."""
        key: Hashable | None = None
        query = request.rel_url.raw_query_string
        decision: Decision | None = None
        if self.pushdown is not None:
            decision = self.pushdown.decide(query, time.monotonic())
            query = decision.query
        if self.settings.coalesce and request.method == "GET":
            # Scrapes are identical when the exporter would be sent the same request.
            key = (
                query,
                forwarded.get("Accept"),
                forwarded.get("Accept-Encoding"),
            )
            flight = self.flights.joinable(key)
            if flight is not None:
                self.telemetry.coalesced_scrapes.inc()
                return flight, flight.join()
        deadline = self.upstream.deadline(timeout_header)

        async def read(flight: Flight) -> None:
            await self._read(flight, request.method, query, forwarded, deadline, decision)

        return self.flights.start(key, read)

    def _cut_off(self, request: web.Request, cursor: Cursor) -> None:
        """The scraper's own time ran out: it will not get a whole body any more."""
        cursor.close(ScraperTimedOut("the scraper did not read its body within its scrape timeout"))
        self._cut(request, "scraper_timeout")

    def _cut(self, request: web.Request, reason: str) -> None:
        """Cut one scraper off (its time ran out, or it fell too far behind), and count it."""
        self.telemetry.client_aborts.labels(reason).inc()
        abort(request)

    def _late_head(self, flight: Flight) -> str:
        log.info(
            "scrape timed out waiting for the exporter's response headers",
            extra={"fields": {"upstream": self.upstream.url, "coalesced": flight.key is not None}},
        )
        return f"504 no response headers within the scrape timeout (upstream {self.upstream.url})"

    async def _read(
        self,
        flight: Flight,
        method: str,
        raw_query: str,
        headers: dict[str, str],
        deadline: float,
        decision: Decision | None = None,
    ) -> None:
        """The flight's reader: ask the exporter once, publish its (rewritten) body, count once."""
        started = time.perf_counter()
        try:
            upstream, learner = await self._ask(method, raw_query, headers, deadline, decision)
        except UpstreamFailure as failure:
            self._count(failure.outcome, failure.reason, log_level=logging.WARNING)
            if failure.outcome == "header_timeout":
                self.telemetry.upstream_deadline_ratio.observe((time.perf_counter() - started) / deadline)
            text = f"{failure.status} {failure.reason} (upstream {self.upstream.url})"
            flight.set_head(Refusal(failure.status, text))
            return
        except asyncio.CancelledError as exc:
            self._count("cancelled", _cancel_reason(exc))
            raise
        except Exception as exc:  # not one upstream.py classifies: still one count, one 502
            self._count("connect_error", f"unexpected error asking the exporter: {exc!r}")
            log.exception(
                "unexpected error asking the exporter", extra={"fields": {"upstream": self.upstream.url}}
            )
            flight.set_head(
                Refusal(502, f"502 unexpected error asking the exporter (upstream {self.upstream.url})")
            )
            return
        self.telemetry.upstream_first_byte.observe(time.perf_counter() - started)
        transform: BodyRewrite | None = None
        whole = False
        try:
            response_head = response_headers(upstream.headers)
            rewriting = self.rules is not None and upstream.status == 200
            if rewriting:
                response_head = [(k, v) for k, v in response_head if k.lower() not in _ENCODING_HEADERS]
                if method == "GET":  # a HEAD answer has headers only, describing a GET's
                    from proxy.rewrite import BodyRewrite

                    transform = BodyRewrite(
                        self.rules,  # type: ignore[arg-type]
                        openmetrics=is_openmetrics(upstream.headers.get("Content-Type")),
                        gzipped=upstream.headers.get("Content-Encoding", "").lower() == "gzip",
                        tap=learner.feed if learner is not None else None,
                    )
            flight.set_head(Head(upstream.status, tuple(response_head), rewritten=rewriting))
            content = upstream.content
            publish = flight.publish
            while True:
                # One buffered piece at a time, as the socket delivered it: readany() would join
                # everything buffered into a new bytes object, a copy of the whole body per scrape.
                # readchunk() also answers (b"", True) when an HTTP chunk's closing CRLF arrives
                # after its data was read: the end of one chunk, not of the body. Go's net/http
                # (windows_exporter) writes data and CRLF separately, so this happens in the
                # wild. The body has ended only when the stream is at EOF, which aiohttp sets
                # only after the last chunk; asking at_eof() also covers the empty payload of a
                # HEAD answer, whose reader says (b"", True) forever once it said (b"", False).
                piece, end_of_http_chunk = await content.readchunk()
                if not piece:
                    if end_of_http_chunk and not content.at_eof():
                        continue
                    break
                if transform is not None:
                    piece = transform.feed(piece)
                    if not piece:
                        continue
                publish(piece)
            if transform is not None:
                tail = transform.finish()
                if tail:
                    publish(tail)
            whole = True
        except self._body_errors as exc:
            outcome, reason = body_failure(exc, deadline)
            self._count(outcome, reason, log_level=logging.WARNING)
            if outcome == "body_timeout":
                self.telemetry.upstream_deadline_ratio.observe((time.perf_counter() - started) / deadline)
            raise FlightFailed(reason) from exc
        except asyncio.CancelledError as exc:
            self._count("cancelled", _cancel_reason(exc))
            raise
        except Exception as exc:
            self._count("body_error", f"unexpected error reading the exporter's body: {exc!r}")
            log.exception(
                "unexpected error in a scrape's reader", extra={"fields": {"upstream": self.upstream.url}}
            )
            raise FlightFailed(f"unexpected error: {exc!r}") from exc
        finally:
            if whole:
                upstream.release()
            else:
                upstream.close()
            if transform is not None:
                self._count_rewrite(transform)
        elapsed = time.perf_counter() - started
        self.telemetry.upstream_last_byte.observe(elapsed)
        self.telemetry.upstream_deadline_ratio.observe(elapsed / deadline)
        if 200 <= upstream.status < 300:
            self._count("success", None)
        else:
            self._count("http_error", f"exporter answered {upstream.status}", log_level=logging.INFO)
        if learner is not None and transform is not None:
            self._learned(learner, upstream.headers.get(START_TIME_HEADER))

    async def _ask(
        self, method: str, raw_query: str, headers: dict[str, str], deadline: float, decision: Decision | None
    ) -> tuple[aiohttp.ClientResponse, CollectorLearner | None]:
        """Send the request; a narrowed one the exporter refuses (400: it lacks a collector now) or
        that a restarted exporter answers is asked again in full, within the same deadline: no
        scraper has seen its head yet. The response comes with a learner when its body is to be
        read for the enabled collectors."""
        upstream = await self.upstream.request(method, raw_query, headers, deadline)
        pushdown = self.pushdown
        if pushdown is None or decision is None:
            return upstream, None
        learn = decision.learn
        if decision.plan is not None:
            self.telemetry.narrowed_scrapes.inc()
            reason = None
            if upstream.status == 400:
                reason = "rejected"
            elif not pushdown.same_exporter(upstream.headers.get(START_TIME_HEADER)):
                reason = "restarted"
            if reason is not None:
                upstream.close()
                pushdown.forget()
                self.telemetry.narrowing_retries.labels(reason).inc()
                self.telemetry.pushdown_collectors.set(0)
                log.info(
                    "push-down: narrowed request %s, asking again in full and re-learning",
                    reason,
                    extra={"fields": {"reason": reason, "upstream": self.upstream.url}},
                )
                upstream = await self.upstream.request(method, decision.full, headers, deadline)
                learn = True
        if learn and method == "GET" and upstream.status == 200:
            from proxy.pushdown import CollectorLearner

            return upstream, CollectorLearner()
        return upstream, None

    def _learned(self, learner: CollectorLearner, start_time: str | None) -> None:
        """A full scrape's body is complete: record its collectors; log when the plan changes."""
        assert self.pushdown is not None
        self.telemetry.learning_scrapes.inc()
        plan = self.pushdown.learned(learner.finish(), start_time, time.monotonic())
        current = self.pushdown.plan
        self.telemetry.pushdown_collectors.set(len(current.asked or ()) if current is not None else 0)
        if plan is None:
            return
        fields = {"enabled": len(plan.enabled), "upstream": self.upstream.url}
        if plan.asked is not None:
            log.info(
                "push-down: asking the exporter for collect[]=%s (%d of %d enabled collectors not run)",
                ",".join(plan.asked),
                len(plan.enabled) - len(plan.asked),
                len(plan.enabled),
                extra={"fields": {**fields, "collectors": ",".join(plan.asked)}},
            )
        else:
            log.info("push-down: scraping in full: %s", plan.reason, extra={"fields": fields})

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


def _cancel_reason(exc: asyncio.CancelledError) -> str:
    """Why a reader was cancelled: the message its canceller gave (e.g. NOBODY_LEFT, a stop)."""
    return str(exc.args[0]) if exc.args and exc.args[0] else NOBODY_LEFT
