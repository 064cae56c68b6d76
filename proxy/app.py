"""The HTTP surface: /metrics (the scrape pipeline, scrape.py), /health, /ready, /proxy/metrics,
and basic auth in front of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.typedefs import Handler

from proxy.inflight import InFlight
from proxy.scrape import SERVER_HEADER, MetricsProxy, text_response
from proxy.settings import Settings
from proxy.telemetry import Telemetry
from proxy.upstream import Upstream
from proxy.webconfig import REALM, BasicAuth, WebConfig

log = logging.getLogger("proxy.app")

UPSTREAM_KEY: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
TELEMETRY_KEY: web.AppKey[Telemetry] = web.AppKey("telemetry", Telemetry)
IN_FLIGHT_KEY: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)


async def health(_request: web.Request) -> web.Response:
    """Liveness, as the nginx image answered it: the process serves, whatever the exporter does."""
    return text_response(200, "ok")


async def ready(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM_KEY]
    max_age = upstream.settings.ready_max_age
    last = upstream.last_answer
    if last is not None and time.monotonic() - last <= max_age:
        return text_response(200, f"ready: exporter answered {time.monotonic() - last:.1f}s ago")
    reason = await upstream.probe()
    if reason is None:
        return text_response(200, "ready: exporter answered a probe")
    return text_response(503, f"not ready: {reason}")


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
    rules = None
    if settings.has_rules:  # the relabel modules load only when rules are configured
        from proxy.rules import build_rule_set

        rules = build_rule_set(settings)
    if rules is not None:
        telemetry.watch_relabel_cache(rules.cache)
    proxy = MetricsProxy(settings, upstream, telemetry, rules)

    # Outermost, so a stop also knows about a request still waiting on basic auth.
    in_flight = InFlight(proxy.readers)
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
