"""Starting and stopping the proxy: the app, its listener (TLS, connection cap, header timeout),
and the graceful stop. Shared by `serve` and `demo`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiohttp import web

from proxy import __version__
from proxy.app import IN_FLIGHT_KEY, TELEMETRY_KEY, create_app
from proxy.listener import ConnectionGuard, listen
from proxy.logs import quiet_bad_requests
from proxy.settings import ConfigError, Settings, env_name
from proxy.telemetry import Telemetry
from proxy.webconfig import WebConfig, WebConfigError, load_web_config

log = logging.getLogger("proxy.server")


# After the budget, the rest of a stop fits in runtime.STOP_ALLOWANCE (0.5 s): aborted handlers
# and flight readers get UNWIND_TIMEOUT to run their except and finally blocks, and aiohttp's
# own shutdown, which by then should find nothing in flight, waits at most twice
# STRAGGLER_TIMEOUT for anything that slipped past (aiohttp's own 400 answers to unparsable
# requests never reach the app). What is left is closing the exporter pool.
UNWIND_TIMEOUT = 0.2
STRAGGLER_TIMEOUT = 0.05


@dataclass
class RunningProxy:
    runner: web.AppRunner
    server: asyncio.AbstractServer
    port: int
    shutdown_timeout: float
    guard: ConnectionGuard | None = None  # the listener's cap: refusals under way end with the stop
    _closed: bool = field(default=False, init=False)

    async def close(self) -> None:
        """Stop within one budget, shutdown_timeout (PROXY_SHUTDOWN_TIMEOUT).

        Stop accepting; close idle keep-alive connections at once; let the requests in flight
        finish until the budget is spent; then abort the connections of those still running (a
        scraper must see a broken body, never a clean short one) and cancel their handlers and
        flights' readers. aiohttp's cleanup and the pool's close then find nothing to wait for.
        A second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        app = self.runner.app
        in_flight = app[IN_FLIGHT_KEY]
        self.server.close()
        if self.guard is not None:
            self.guard.close()  # Python 3.12+ waits for every connection in wait_closed, these too
        web_server = self.runner.server
        if web_server is not None:
            # No connection reads another request; one that is busy closes after its answer.
            web_server.pre_shutdown()
            # A request whose head was read before that still gets its handler (and so enters the
            # app's InFlight) within two turns of the loop: one for aiohttp's connection task to
            # take it, one for the handler task it starts. Only then is "idle" certain.
            for _ in range(2):
                await asyncio.sleep(0)
            busy = in_flight.busy_connections()
            for connection in web_server.connections:
                if connection not in busy:
                    connection.force_close()  # idle keep-alive: a request sent now would hang
        if not await in_flight.drain(self.shutdown_timeout):
            scrapes, others = await in_flight.abort(UNWIND_TIMEOUT)
            app[TELEMETRY_KEY].client_aborts.labels("stopped").inc(scrapes)
            log.warning(
                "stop budget spent: aborted what was in flight",
                extra={
                    "fields": {
                        "scrapes": scrapes,
                        "other_requests": others,
                        "shutdown_timeout": self.shutdown_timeout,
                    }
                },
            )
        else:
            await in_flight.abort(UNWIND_TIMEOUT)  # readers left behind serve nobody now
        await self.runner.cleanup()
        await self.server.wait_closed()


def web_config_of(settings: Settings) -> WebConfig:
    if settings.web_config_file is None:
        return WebConfig()
    try:
        return load_web_config(settings.web_config_file)
    except WebConfigError as exc:
        raise ConfigError(
            f"{env_name('web_config_file')} (--web-config-file): {settings.web_config_file}: {exc}"
        ) from None


async def start_proxy(settings: Settings, *, loop_name: str = "asyncio") -> RunningProxy:
    """Start serving; ConfigError (one line) for anything the user can fix."""
    web_config = web_config_of(settings)
    quiet_bad_requests()
    telemetry = Telemetry(loop_name=loop_name)
    app = create_app(settings, telemetry=telemetry, web_config=web_config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        # RunningProxy.close spends the budget itself; aiohttp only sweeps up (a timeout of 0
        # would mean no timeout to aiohttp, so it must stay positive).
        shutdown_timeout=STRAGGLER_TIMEOUT,
    )
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(
        runner.server,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        telemetry=telemetry,
    )
    try:
        server = await listen(guard, settings.listen_address, settings.listen_port, web_config.ssl_context)
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"{env_name('listen_port')} (--listen-port): cannot listen on "
            f"{settings.listen_address}:{settings.listen_port}: {exc.strerror or exc}"
        ) from None
    port = int(server.sockets[0].getsockname()[1])
    log.info(
        "listening",
        extra={
            "fields": {
                "address": settings.listen_address,
                "port": port,
                "tls": web_config.ssl_context is not None,
                "basic_auth": web_config.requires_auth,
                "upstream": settings.upstream_url,
                "coalesce": settings.coalesce,
                "loop": loop_name,
                "version": __version__,
            }
        },
    )
    return RunningProxy(runner, server, port, settings.shutdown_timeout, guard)
