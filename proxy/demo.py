"""`windows-metrics-proxy demo`: the fake exporter and the proxy on free loopback ports, with URLs to curl.

It is the first thing a newcomer runs, so it prints what to try and stops cleanly on Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from proxy.fake_exporter import DEFAULT_PROFILE, FakeExporter, bound_port, run_fake_exporter
from proxy.server import start_proxy
from proxy.settings import Settings

DEMO_HOST = "127.0.0.1"


def banner(exporter_port: int, proxy_port: int) -> str:
    proxy = f"http://{DEMO_HOST}:{proxy_port}"
    exporter = f"http://{DEMO_HOST}:{exporter_port}"
    return "\n".join(
        [
            f"fake windows_exporter: {exporter}/metrics",
            f"proxy:                 {proxy}/metrics",
            "",
            "Try:",
            f"  curl -s {proxy}/metrics | head",
            f"  curl -s '{proxy}/metrics?collect[]=cpu&collect[]=memory' | grep -c ^windows_",
            f"  curl -s -H 'Accept-Encoding: gzip' {proxy}/metrics | gunzip | wc -c",
            f"  curl -i {proxy}/health",
            f"  curl -i {proxy}/ready",
            f"  curl -s {proxy}/proxy/metrics | grep windows_metrics_proxy_upstream",
            f"  curl -i '{proxy}/metrics?fault=reset'   # the exporter dies mid-body: the proxy aborts",
            "",
            "Press Ctrl+C to stop.",
        ]
    )


async def run_demo(
    settings: Settings, args: argparse.Namespace, stop: asyncio.Event, *, loop_name: str
) -> None:
    exporter = FakeExporter(scale=args.scale, profile=getattr(args, "profile", DEFAULT_PROFILE))
    exporter_runner = await run_fake_exporter(exporter, DEMO_HOST, 0)
    try:
        exporter_port = bound_port(exporter_runner)
        proxy_settings = settings.model_copy(
            update={"hostip": DEMO_HOST, "port": exporter_port, "listen_address": DEMO_HOST}
        )
        proxy = await start_proxy(proxy_settings, loop_name=loop_name)
        try:
            print(banner(exporter_port, proxy.port), flush=True)
            await stop.wait()
        finally:
            await proxy.close()
    finally:
        await exporter_runner.cleanup()
    print("demo stopped", file=sys.stderr, flush=True)
