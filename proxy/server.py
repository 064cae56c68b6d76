"""Starting and stopping the proxy: the app, its listener (TLS, connection cap, header timeout),
and the graceful stop. Shared by `serve` and `demo`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from proxy import __version__
from proxy.app import create_app
from proxy.listener import ConnectionGuard, listen
from proxy.logs import quiet_bad_requests
from proxy.settings import ConfigError, Settings, env_name
from proxy.telemetry import Telemetry
from proxy.webconfig import WebConfig, WebConfigError, load_web_config

log = logging.getLogger("proxy.server")


@dataclass
class RunningProxy:
    runner: web.AppRunner
    server: asyncio.AbstractServer
    port: int

    async def close(self) -> None:
        """Stop accepting, let in-flight scrapes finish within the shutdown timeout, close the pool."""
        self.server.close()
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
        shutdown_timeout=settings.shutdown_timeout,
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
    return RunningProxy(runner, server, port)
