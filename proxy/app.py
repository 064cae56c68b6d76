"""The HTTP surface: /metrics (streamed from the exporter), /health, /ready and /proxy/metrics.

Data flows one way: scraper request -> upstream request -> body chunks -> scraper. A scrape that
breaks after the status line went out is aborted at the TCP level, because a chunked body that
ends cleanly would be ingested by Prometheus as a complete scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from proxy import __version__
from proxy.coalesce import Flight, FlightAborted, Flights, Head, Refusal
from proxy.settings import Settings
from proxy.telemetry import Telemetry
from proxy.upstream import (
    SCRAPE_TIMEOUT_HEADER,
    Upstream,
    UpstreamFailure,
    body_failure,
    response_headers,
)

log = logging.getLogger("proxy.app")

SERVER_HEADER = f"windows-metrics-proxy/{__version__}"
UPSTREAM_KEY: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
TELEMETRY_KEY: web.AppKey[Telemetry] = web.AppKey("telemetry", Telemetry)


def _abort(request: web.BaseRequest) -> None:
    """Cut the scraper's connection so the broken body cannot pass for a complete one."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers={"Server": SERVER_HEADER})


class MetricsProxy:
    """The /metrics handler and the state it shares across scrapes."""

    def __init__(self, settings: Settings, upstream: Upstream, telemetry: Telemetry) -> None:
        self.settings = settings
        self.upstream = upstream
        self.telemetry = telemetry
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
            key: Hashable = (
                request.rel_url.raw_query_string,
                headers.get("Accept"),
                headers.get("Accept-Encoding"),
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
        try:
            deadline = self.upstream.deadline(request.headers.get(SCRAPE_TIMEOUT_HEADER))
            started = time.perf_counter()
            try:
                upstream = await self.upstream.request(
                    request.method, request.rel_url.raw_query_string, request.headers, deadline
                )
            except UpstreamFailure as failure:
                self._count(failure.outcome, failure.reason, log_level=logging.WARNING)
                text = f"{failure.status} {failure.reason} (upstream {self.upstream.url})"
                if flight is not None:
                    flight.set_head(Refusal(failure.status, text))
                return _text(failure.status, text)
            self.telemetry.upstream_first_byte.observe(time.perf_counter() - started)

            head = Head(upstream.status, tuple(response_headers(upstream.headers)))
            if flight is not None:
                flight.set_head(head)
            response = self._start_response(head)
            try:
                await response.prepare(request)
                client: web.Request | None = request
            except (ConnectionError, RuntimeError):
                client = None
            try:
                await self._pump(upstream, flight, client, response, deadline, started)
            except asyncio.CancelledError:
                # This scraper's handler was cancelled (it hung up, or the server is stopping).
                # Followers still want the body: finish it for them in the background.
                if flight is not None and flight.has_followers:
                    task = asyncio.create_task(self._pump(upstream, flight, None, None, deadline, started))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                    handed_off = True
                else:
                    upstream.close()
                    self._count("cancelled", "the scraper went away mid-body")
                raise
            return response
        finally:
            if flight is not None and not handed_off:
                self.flights.end(flight)

    async def _pump(
        self,
        upstream: aiohttp.ClientResponse,
        flight: Flight | None,
        client: web.Request | None,
        response: web.StreamResponse | None,
        deadline: float,
        started: float,
    ) -> None:
        """Move the body from the exporter to the scraper (if still there) and the followers."""
        t = self.telemetry
        served = 0
        content = upstream.content
        try:
            while chunk := await content.readany():
                if flight is not None:
                    flight.publish(chunk)
                if client is not None and response is not None:
                    try:
                        await response.write(chunk)
                        served += len(chunk)
                    except (ConnectionError, RuntimeError):
                        client = None
                if client is None and (flight is None or not flight.has_followers):
                    upstream.close()
                    self._count("cancelled", "every scraper went away mid-body")
                    if flight is not None:
                        self.flights.end(flight)
                    return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            upstream.close()
            outcome, reason = body_failure(exc, deadline)
            self._count(outcome, reason, log_level=logging.WARNING)
            if flight is not None:
                self.flights.end(flight, exc)
            if client is not None:
                t.client_aborts.inc()
                _abort(client)
            return
        finally:
            t.bytes_served.inc(served)
        upstream.release()
        if flight is not None:
            self.flights.end(flight)
        t.upstream_last_byte.observe(time.perf_counter() - started)
        if 200 <= upstream.status < 300:
            self._count("success", None)
        else:
            self._count("http_error", f"exporter answered {upstream.status}", log_level=logging.INFO)

    async def _follow(self, request: web.Request, flight: Flight) -> web.StreamResponse:
        """Serve another scrape's upstream answer, replaying what already went by."""
        follower = flight.join()
        try:
            head = await asyncio.shield(flight.head)
            if isinstance(head, Refusal):
                return _text(head.status, head.text)
            response = self._start_response(head)
            await response.prepare(request)
            served = 0
            try:
                while batch := await follower.next_batch():
                    for chunk in batch:
                        await response.write(chunk)
                        served += len(chunk)
            except FlightAborted:
                self.telemetry.client_aborts.inc()
                _abort(request)
            finally:
                self.telemetry.bytes_served.inc(served)
            return response
        except (ConnectionError, RuntimeError):
            # This scraper went away; the flight goes on for the others.
            return web.Response(status=499)
        finally:
            flight.leave(follower)

    def _start_response(self, head: Head) -> web.StreamResponse:
        response = web.StreamResponse(status=head.status)
        headers = response.headers
        for name, value in head.headers:
            headers.add(name, value)
        headers["Server"] = SERVER_HEADER
        return response

    def _count(self, outcome: str, reason: str | None, log_level: int = logging.DEBUG) -> None:
        self.telemetry.upstream_requests.labels(outcome).inc()
        if reason is not None:
            log.log(
                log_level,
                "upstream request %s",
                outcome,
                extra={"fields": {"outcome": outcome, "reason": reason, "upstream": self.upstream.url}},
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


def create_app(
    settings: Settings,
    *,
    telemetry: Telemetry | None = None,
    resolver: AbstractResolver | None = None,
) -> web.Application:
    """The proxy as an aiohttp app; the upstream pool opens on startup and closes on cleanup."""
    telemetry = telemetry or Telemetry()
    upstream = Upstream(settings, resolver=resolver)
    proxy = MetricsProxy(settings, upstream, telemetry)

    app = web.Application(handler_args={"max_field_size": 8190, "max_line_size": 8190})
    app[UPSTREAM_KEY] = upstream
    app[TELEMETRY_KEY] = telemetry

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
