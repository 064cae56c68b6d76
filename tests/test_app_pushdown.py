"""collect[] push-down through the real app and the fake exporter: the same bytes, less work.

The fake counts which collectors each request ran (FakeExporter.collector_runs), so a test can see
that the collectors the rules cannot keep were not run.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.fake_exporter import FakeExporter, Fault
from proxy.pushdown import learn_collectors
from proxy.relabel import RelabelConfigError, parse_rule
from proxy.settings import load_settings
from proxy.telemetry import Telemetry
from tests.conftest import LOOPBACK, ProxyFactory
from tests.test_app import raw_get, sample_value
from tests.test_pushdown import CAPTURES, keep_lists, rule_sets, rules
from tests.test_rewrite import NODE_KEEP_LIST

KEPT = ("cpu", "logical_disk", "memory", "net", "os", "system")
KEEP_RULES = {
    "metric_relabel_configs": [{"source_labels": ["__name__"], "regex": NODE_KEEP_LIST, "action": "keep"}]
}


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(KEEP_RULES))
    return path


async def pushdown_proxy(
    make_proxy: ProxyFactory, fake_server: TestServer, rules: Path, **kw: object
) -> TestClient:
    return await make_proxy(port=fake_server.port, relabel_config=str(rules), **kw)


def runs_since(fake: FakeExporter, before: Counter[str]) -> Counter[str]:
    return fake.collector_runs - before


async def scrape(client: TestClient, path: str = "/metrics", headers: dict[str, str] | None = None) -> bytes:
    status, _, body = await raw_get(client.server.port, path, headers)
    assert status == 200, body
    return body


async def self_metrics(client: TestClient) -> str:
    return await (await client.get("/proxy/metrics")).text()


async def test_first_scrape_learns_then_only_kept_collectors_run(
    make_proxy: ProxyFactory,
    fake_server: TestServer,
    fake: FakeExporter,
    rules_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.scrape")
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    reference = await pushdown_proxy(make_proxy, fake_server, rules_file, collector_pushdown=False)
    expected = await scrape(reference)
    before = Counter(fake.collector_runs)
    assert await scrape(proxy) == expected  # learning: a full scrape
    assert runs_since(fake, before) == Counter(fake.payload.collectors)
    for _ in range(3):
        before = Counter(fake.collector_runs)
        assert await scrape(proxy) == expected
        assert set(runs_since(fake, before)) == set(KEPT)
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_learning_scrapes_total") == 1
    assert sample_value(text, "windows_metrics_proxy_narrowed_scrapes_total") == 3
    assert sample_value(text, "windows_metrics_proxy_pushdown_collectors") == len(KEPT)
    chosen = [r for r in caplog.records if "push-down: asking the exporter" in r.getMessage()]
    assert len(chosen) == 1  # once, not per scrape
    assert "collect[]=cpu,logical_disk,memory,net,os,system (19 of 25" in chosen[0].getMessage()


@pytest.mark.parametrize("profile", ["0.20", "0.31"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept-Encoding": "gzip"},
        {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
    ],
)
async def test_narrowed_output_is_byte_identical(
    make_proxy: ProxyFactory,
    aiohttp_server: object,
    rules_file: Path,
    profile: str,
    headers: dict[str, str],
) -> None:
    fake = FakeExporter(profile=profile)
    server = await aiohttp_server(fake.app(), host=LOOPBACK)  # type: ignore[operator]
    proxy = await pushdown_proxy(make_proxy, server, rules_file)
    reference = await pushdown_proxy(make_proxy, server, rules_file, collector_pushdown=False)
    expected = await scrape(reference, headers=headers)
    await scrape(proxy, headers=headers)  # learns
    before = Counter(fake.collector_runs)
    narrowed = await scrape(proxy, headers=headers)
    assert set(runs_since(fake, before)) == set(KEPT)
    if "Accept-Encoding" in headers:
        narrowed, expected = gzip.decompress(narrowed), gzip.decompress(expected)
    assert narrowed == expected
    assert b"windows_cpu_time_total" in narrowed


async def test_refresh_relearns_after_collector_refresh(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file, collector_refresh=0.3)
    await scrape(proxy)
    before = Counter(fake.collector_runs)
    await scrape(proxy)
    assert set(runs_since(fake, before)) == set(KEPT)
    await asyncio.sleep(0.4)
    before = Counter(fake.collector_runs)
    await scrape(proxy)
    assert runs_since(fake, before) == Counter(fake.payload.collectors)  # the refresh is a full scrape
    before = Counter(fake.collector_runs)
    await scrape(proxy)
    assert set(runs_since(fake, before)) == set(KEPT)
    assert sample_value(await self_metrics(proxy), "windows_metrics_proxy_learning_scrapes_total") == 2


async def test_a_restarted_exporter_is_asked_again_in_full_and_relearned(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    expected = await scrape(proxy)
    await scrape(proxy)
    fake.start_time += 60  # a new exporter process
    scrapes = fake.scrapes
    before = Counter(fake.collector_runs)
    assert await scrape(proxy) == expected
    assert fake.scrapes == scrapes + 2  # the narrowed request, then the full one
    assert runs_since(fake, before) == Counter(fake.payload.collectors) + Counter(KEPT)
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_narrowing_retries_total", 'reason="restarted"') == 1
    assert sample_value(text, "windows_metrics_proxy_learning_scrapes_total") == 2
    before = Counter(fake.collector_runs)
    assert await scrape(proxy) == expected
    assert set(runs_since(fake, before)) == set(KEPT)  # narrowed again, with the new start time


async def test_a_refused_narrowed_request_is_retried_in_full_within_the_scrape(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    expected = await scrape(proxy)
    await scrape(proxy)
    fake.refused_collectors = frozenset({"memory"})  # answered 400, as an exporter without it
    assert await scrape(proxy) == expected
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_narrowing_retries_total", 'reason="rejected"') == 1
    assert sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="http_error"') == 0
    # Re-learned from the full answer (the fake still reports memory): narrowed, refused, retried.
    assert await scrape(proxy) == expected
    assert (
        sample_value(
            await self_metrics(proxy), "windows_metrics_proxy_narrowing_retries_total", 'reason="rejected"'
        )
        == 2
    )


async def test_a_scraper_that_sends_collect_is_left_alone(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    reference = await pushdown_proxy(make_proxy, fake_server, rules_file, collector_pushdown=False)
    await scrape(proxy)
    await scrape(proxy)
    before = Counter(fake.collector_runs)
    body = await scrape(proxy, "/metrics?collect[]=service&collect[]=cpu")
    assert runs_since(fake, before) == Counter({"service": 1, "cpu": 1})
    assert body == await scrape(reference, "/metrics?collect[]=service&collect[]=cpu")


@pytest.mark.parametrize("mode", ["no rules", "pushdown off"])
async def test_never_narrows_without_rules_or_when_switched_off(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path, mode: str
) -> None:
    if mode == "no rules":
        proxy = await make_proxy(port=fake_server.port)
    else:
        proxy = await pushdown_proxy(make_proxy, fake_server, rules_file, collector_pushdown=False)
    for _ in range(3):
        before = Counter(fake.collector_runs)
        await scrape(proxy)
        assert runs_since(fake, before) == Counter(fake.payload.collectors)
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_narrowed_scrapes_total") == 0
    assert sample_value(text, "windows_metrics_proxy_learning_scrapes_total") == 0


async def test_concurrent_narrowed_scrapes_still_share_one_request(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    expected = await scrape(proxy)
    fake.fault = Fault.LATENCY
    fake.latency = 0.3
    scrapes = fake.scrapes
    bodies = await asyncio.gather(*(scrape(proxy) for _ in range(3)))
    assert bodies == [expected] * 3
    assert fake.scrapes == scrapes + 1
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_narrowed_scrapes_total") == 1
    assert sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total") == 2


async def test_head_requests_follow_the_plan_without_learning(
    make_proxy: ProxyFactory, fake_server: TestServer, fake: FakeExporter, rules_file: Path
) -> None:
    proxy = await pushdown_proxy(make_proxy, fake_server, rules_file)
    assert (await proxy.head("/metrics")).status == 200
    assert sample_value(await self_metrics(proxy), "windows_metrics_proxy_learning_scrapes_total") == 0
    await scrape(proxy)
    before = Counter(fake.collector_runs)
    assert (await proxy.head("/metrics")).status == 200
    assert set(runs_since(fake, before)) == set(KEPT)


async def test_an_exporter_without_collector_status_is_never_narrowed(
    make_proxy: ProxyFactory, aiohttp_server: object, rules_file: Path
) -> None:
    source = b"".join(
        line + b"\n"
        for line in CAPTURES["0.31"].splitlines()
        if not line.startswith(
            (b"windows_exporter_collector_success", b"# HELP windows_exporter_collector_success")
        )
    )
    fake = FakeExporter(source=source)
    server = await aiohttp_server(fake.app(), host=LOOPBACK)  # type: ignore[operator]
    proxy = await pushdown_proxy(make_proxy, server, rules_file)
    for _ in range(3):
        await scrape(proxy)
    assert fake.collector_runs == Counter()  # it knows no collectors, so none were asked for
    text = await self_metrics(proxy)
    assert sample_value(text, "windows_metrics_proxy_narrowed_scrapes_total") == 0


# -- the differential: random rule sets through the real app, push-down on and off -----------------------


async def _outcome(session: aiohttp.ClientSession, port: int) -> tuple[int, bytes] | str:
    try:
        async with session.get(f"http://{LOOPBACK}:{port}/metrics") as response:
            return response.status, await response.read()
    except aiohttp.ClientError as exc:
        return type(exc).__name__  # a scrape the rules break (a nameless series) breaks alike


async def _differential(profile: str, rules: list[dict[str, object]]) -> tuple[object, object, bool]:
    fake = FakeExporter(profile=profile)
    runners: list[web.AppRunner] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(yaml.safe_dump({"metric_relabel_configs": rules}))
        try:
            ports: list[int] = []

            async def serve(app: web.Application) -> None:
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, LOOPBACK, 0).start()
                ports.append(int(runner.addresses[0][1]))

            await serve(fake.app())
            for pushdown in (True, False):
                values = load_settings(
                    hostip=LOOPBACK, port=str(ports[0]), relabel_config=str(path), collector_pushdown=pushdown
                )
                await serve(create_app(values, telemetry=Telemetry()))
            async with aiohttp.ClientSession(
                auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
            ) as session:
                await _outcome(session, ports[1])  # learns
                before = Counter(fake.collector_runs)
                narrowed = await _outcome(session, ports[1])
                ran_all = runs_since(fake, before) == Counter(fake.payload.collectors)
                full = await _outcome(session, ports[2])
            return narrowed, full, ran_all
        finally:
            for runner in reversed(runners):
                await runner.cleanup()


@st.composite
def keep_list_first(draw: st.DrawFn) -> list[dict[str, object]]:
    """Mostly rule sets that narrow, so the comparison is not between two full scrapes."""
    return [draw(keep_lists()), *draw(st.lists(rules(), max_size=2))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(rule_sets(), keep_list_first()), st.sampled_from(["0.20", "0.31"]))
def test_random_rule_sets_give_the_same_bytes_with_and_without_push_down(
    rules: list[dict[str, object]], profile: str
) -> None:
    try:
        for i, raw in enumerate(rules):
            parse_rule(raw, f"r[{i}]")
    except RelabelConfigError:
        assume(False)
    narrowed, full, ran_all = asyncio.run(_differential(profile, rules))
    event("full" if ran_all else "narrowed")
    assert narrowed == full


def test_the_differential_harness_does_narrow() -> None:
    """The property above would pass vacuously if the harness never narrowed: this one must."""
    rules = KEEP_RULES["metric_relabel_configs"]
    narrowed, full, ran_all = asyncio.run(_differential("0.31", rules))
    assert not ran_all
    assert narrowed == full
    assert isinstance(full, tuple)
    assert b"windows_memory_" in full[1]
    assert len(learn_collectors(CAPTURES["0.31"])) == 9
