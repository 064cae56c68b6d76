"""Soak: thousands of scrapes with faults mixed in; file descriptors, pooled connections, tasks and
memory stay flat.

Bounded: SOAK_SECONDS (default 20) of scraping, split into a warm-up and a measured phase, so a CI
run stays well under a minute. `SOAK_SECONDS=600 pytest tests/test_soak.py` soaks for longer.
Two proxies from start_proxy (coalescing passthrough, and relabeling) share one fake exporter
whose fault a seeded RNG flips between none, reset, error and a short latency.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import gzip
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import TELEMETRY_KEY, UPSTREAM_KEY, MetricsProxy
from proxy.fake_exporter import FakeExporter, Fault, bound_port, run_fake_exporter
from proxy.rewrite import rewrite_bytes
from proxy.rules import build_rule_set
from proxy.server import RunningProxy, start_proxy
from proxy.settings import load_settings
from proxy.telemetry import OUTCOMES
from tests.conftest import LOOPBACK
from tests.test_app import PROMETHEUS_ACCEPT

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
MAX_ROUNDS = 1_000_000  # the clock ends the soak; this only bounds the loop in count as well
SEED = 6
KEEP = "windows_(cpu|cs|memory|os|system|logical_disk|net)_.*"
# What one measurement may grow by between the end of the warm-up and the end of the soak.
FD_SLACK = 10
TASK_SLACK = 5
RSS_SLACK = 15 << 20
MAX_POOLED = 8  # upstream connections: at most one per concurrent upstream request
QUIESCE_SECONDS = 15.0  # for a phase's last scrapes to finish and what they held to be released
SETTLED = 5  # identical readings in a row, 10 ms apart, that count as nothing changing any more

# (query, request headers): the scrape variants, each a different coalescing key.
VARIANTS: list[tuple[str, dict[str, str]]] = [
    ("", {}),
    ("collect[]=cpu&collect[]=os", {}),
    ("", {"Accept-Encoding": "gzip"}),
    ("", {"Accept": PROMETHEUS_ACCEPT}),
]
FAULTS = [(Fault.NONE, 55), (Fault.RESET, 15), (Fault.ERROR, 15), (Fault.LATENCY, 15)]


@dataclass
class Soaked:
    name: str
    running: RunningProxy
    expected: list[bytes]  # per variant: the identity body a complete 200 must carry

    @property
    def app(self) -> web.Application:
        return self.running.runner.app

    def metric(self, name: str, **labels: str) -> float:
        value = self.app[TELEMETRY_KEY].registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    @property
    def handler(self) -> MetricsProxy:
        for route in self.app.router.routes():
            if route.resource is not None and route.resource.canonical == "/metrics":
                return route.handler.__self__  # type: ignore[attr-defined,no-any-return]
        raise AssertionError("no /metrics route")

    def pool(self) -> tuple[int, int]:
        """Pooled idle and acquired upstream connections (aiohttp connector internals, read only)."""
        connector: Any = self.app[UPSTREAM_KEY].session.connector
        return sum(len(c) for c in connector._conns.values()), len(connector._acquired)


class OutcomeLog(logging.Handler):
    """Counts the proxy's log lines per outcome without keeping records (pytest's capture would)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        outcome = getattr(record, "fields", {}).get("outcome")
        if outcome is not None:
            self.lines[outcome] += 1
        if record.levelno >= logging.ERROR or record.exc_info:
            self.errors.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def counted_logs() -> Any:
    """Route every log record to an OutcomeLog only, for the duration of the soak."""
    handler = OutcomeLog()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


@dataclass
class Tally:
    scrapes: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


async def scrape(
    session: aiohttp.ClientSession, proxy: Soaked, variant: int, tally: Tally, *, hang_up: bool = False
) -> None:
    """One scrape, checked: a 200 that ends cleanly carries the whole expected body."""
    query, headers = VARIANTS[variant]
    tally.sent[proxy.name] += 1
    url = f"http://{LOOPBACK}:{proxy.running.port}/metrics" + (f"?{query}" if query else "")
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as response:
        if hang_up:
            await response.content.readany()
            response.close()
            tally.scrapes["hung up"] += 1
            return
        try:
            body = await response.read()
        except aiohttp.ClientPayloadError:
            assert response.status == 200  # broke after the status line: the connection was cut
            tally.scrapes["aborted"] += 1
            return
    if response.status == 200:
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert body == proxy.expected[variant], (proxy.name, VARIANTS[variant])
    else:
        assert response.status in (500, 503), (response.status, body[:200])
    tally.scrapes[str(response.status)] += 1


async def quiesce(proxies: list[Soaked], fake: FakeExporter) -> None:
    """Wait until every scrape, flight and connection of the previous phase has finished, then
    until what `measure` counts stops changing (closed sockets' descriptors released, finished
    tasks gone): SETTLED identical readings in a row. Bounded by QUIESCE_SECONDS; failing loudly."""
    fake.fault = Fault.NONE
    deadline = time.monotonic() + QUIESCE_SECONDS
    while True:
        busy = fake.in_flight or any(
            p.metric("windows_metrics_proxy_scrapes_in_flight")
            or p.metric("windows_metrics_proxy_open_connections")
            or p.handler.flights
            or p.handler.readers
            or p.pool()[1]
            for p in proxies
        )
        if not busy:
            break
        assert time.monotonic() < deadline, "the previous phase's scrapes did not all finish"
        await asyncio.sleep(0.01)
    last: dict[str, int] = {}
    steady = 0
    while steady < SETTLED:
        gc.collect()
        reading = {k: v for k, v in measure(proxies).items() if k != "rss"}
        steady = steady + 1 if reading == last else 0
        assert time.monotonic() < deadline, f"still changing after {QUIESCE_SECONDS}s: {last} -> {reading}"
        last = reading
        await asyncio.sleep(0.01)


def outcomes(proxy: Soaked) -> dict[str, float]:
    return {o: proxy.metric("windows_metrics_proxy_upstream_requests_total", outcome=o) for o in OUTCOMES}


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def measure(proxies: list[Soaked]) -> dict[str, int]:
    pooled = [p.pool() for p in proxies]
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(asyncio.all_tasks()),
        "rss": rss(),
        "pooled": sum(idle for idle, _ in pooled),
        "acquired": sum(acquired for _, acquired in pooled),
        "in_flight": int(sum(p.metric("windows_metrics_proxy_scrapes_in_flight") for p in proxies)),
        "open": int(sum(p.metric("windows_metrics_proxy_open_connections") for p in proxies)),
        "flights": sum(len(p.handler.flights) + len(p.handler.readers) for p in proxies),
    }


@contextlib.asynccontextmanager
async def soak_setup() -> AsyncIterator[tuple[FakeExporter, list[Soaked]]]:
    fake = FakeExporter(latency=0.03)
    runner = await run_fake_exporter(fake, LOOPBACK, 0)
    port = bound_port(runner)
    direct: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        for query, headers in VARIANTS:
            url = f"http://{LOOPBACK}:{port}/metrics" + (f"?{query}" if query else "")
            async with session.get(url, headers=headers) as response:
                direct.append(await response.read())  # decompressed: the identity body
    base = {"hostip": LOOPBACK, "port": str(port), "listen_address": LOOPBACK, "listen_port": "0"}
    base.update(scrape_timeout="2", shutdown_timeout="1")
    rules = build_rule_set(load_settings(**base, keep=KEEP))
    assert rules is not None
    relabeled = [
        rewrite_bytes(body, rules, openmetrics="Accept" in headers)
        for body, (_, headers) in zip(direct, VARIANTS, strict=True)
    ]
    proxies: list[Soaked] = []
    try:
        proxies.append(Soaked("plain", await start_proxy(load_settings(**base)), direct))
        proxies.append(Soaked("relabel", await start_proxy(load_settings(**base, keep=KEEP)), relabeled))
        yield fake, proxies
    finally:
        for proxy in proxies:
            await proxy.running.close()
        await runner.cleanup()


async def run_phase(
    proxies: list[Soaked], fake: FakeExporter, rng: random.Random, seconds: float, tally: Tally
) -> None:
    """Scrape with faults flipping until `seconds` pass: mostly one at a time, some bursts, some
    scrapers that hang up mid-body. A fresh client session per phase: its pool is measured too."""
    faults, weights = zip(*FAULTS, strict=True)
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for _ in range(MAX_ROUNDS):
            if time.monotonic() >= deadline:
                break
            fake.fault = rng.choices(faults, weights)[0]
            proxy = rng.choice(proxies)
            action = rng.random()
            if action < 0.75:
                await scrape(session, proxy, rng.randrange(len(VARIANTS)), tally)
            elif action < 0.95:  # concurrent scrapes: some share a flight, some do not
                variants = [rng.randrange(2) for _ in range(rng.randint(2, 4))]
                await asyncio.gather(*(scrape(session, proxy, v, tally) for v in variants))
            else:
                await scrape(session, proxy, rng.randrange(len(VARIANTS)), tally, hang_up=True)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs Linux /proc")
async def test_soak_stays_flat() -> None:
    rng = random.Random(SEED)
    tally = Tally()
    started = time.monotonic()
    with counted_logs() as logs:
        async with soak_setup() as (fake, proxies):
            for proxy in proxies:  # every variant once, so caches hold what they will hold
                for variant in range(len(VARIANTS)):
                    await scrape_once(proxy, variant, tally)
            await run_phase(proxies, fake, rng, SOAK_SECONDS * 0.25, tally)
            await quiesce(proxies, fake)
            before = measure(proxies)
            warm_up_scrapes = tally.total
            await run_phase(proxies, fake, rng, SOAK_SECONDS * 0.75, tally)
            await quiesce(proxies, fake)
            after = measure(proxies)
            counted = {p.name: outcomes(p) for p in proxies}
            received = {p.name: p.metric("windows_metrics_proxy_scrapes_total") for p in proxies}
    elapsed = time.monotonic() - started
    report = f"{tally.total} scrapes in {elapsed:.1f}s: {dict(tally.scrapes)}; {before=} {after=}"
    print(report)

    assert tally.total - warm_up_scrapes >= 1000 * min(1.0, SOAK_SECONDS / 20), report
    for name in ("aborted", "500", "503", "200"):
        assert tally.scrapes[name] > 0, (name, report)  # every kind of ending happened
    assert received == dict(tally.sent)  # every scrape reached the proxy, and was counted once

    # Nothing in flight, nothing acquired, every client connection closed.
    for key in ("acquired", "in_flight", "open", "flights"):
        assert before[key] == after[key] == 0, (key, report)
    assert before["pooled"] <= MAX_POOLED, report
    assert after["pooled"] <= MAX_POOLED, report
    assert after["fds"] <= before["fds"] + FD_SLACK, report
    assert after["tasks"] <= before["tasks"] + TASK_SLACK, report
    assert after["rss"] <= before["rss"] + RSS_SLACK, report

    # Each upstream failure was logged once, and nothing was logged as an error or with a traceback.
    assert logs.errors == []
    for outcome in OUTCOMES:
        if outcome != "success":
            assert logs.lines[outcome] == sum(c[outcome] for c in counted.values()), outcome
    assert sum(c["body_error"] for c in counted.values()) > 0
    assert sum(c["http_error"] for c in counted.values()) > 0


async def scrape_once(proxy: Soaked, variant: int, tally: Tally) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await scrape(session, proxy, variant, tally)
