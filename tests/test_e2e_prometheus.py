"""End to end: a real Prometheus scrapes the fake exporter directly and through the proxy.

Everything listens on 127.0.0.1 only. Prometheus runs as a subprocess in a temp dir; its log is
printed at teardown, which pytest shows only for a failed test.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.fake_exporter import FakeExporter, Fault
from tests.conftest import LOOPBACK, require_binary

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL = "1s"
SCRAPE_TIMEOUT = "800ms"
PROXY_UA_PREFIX = "windows-metrics-proxy/"
PROMETHEUS_UA_PREFIX = "Prometheus/"
OPENMETRICS = "application/openmetrics-text"
SYNTHETIC = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
NO_MSSQL = "collect[]=cpu&collect[]=memory&collect[]=os"
DUPLICATE_FAMILY = "windows_mssql_locks_deadlocks"
# promtool 2.42 `check metrics`: 0 clean, 1 parse error ("error while linting: ..."), 3 lint problems only.
PROMTOOL_LINT_ONLY = 3


# --- the exporter, with a record of who asked what ---------------------------------------------


@dataclass
class Seen:
    """One request the fake exporter got, and the Content-Type it answered (None if it broke off)."""

    user_agent: str
    accept: str
    content_type: str | None = None


@dataclass
class Recorder:
    requests: list[Seen] = field(default_factory=list)

    def count(self, ua_prefix: str) -> int:
        return sum(1 for seen in self.requests if seen.user_agent.startswith(ua_prefix))

    def last(self, ua_prefix: str) -> Seen:
        return next(
            seen
            for seen in reversed(self.requests)
            if seen.user_agent.startswith(ua_prefix) and seen.content_type
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        seen = Seen(request.headers.get("User-Agent", ""), request.headers.get("Accept", ""))
        self.requests.append(seen)
        response = await handler(request)
        seen.content_type = response.headers.get("Content-Type")
        return response


@pytest.fixture
def fake() -> FakeExporter:
    # Prometheus scrapes the exporter twice per interval (direct and via the proxy): no 503s.
    return FakeExporter(max_concurrent=0)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def fake_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], fake: FakeExporter, recorder: Recorder
) -> TestServer:
    app = fake.app()
    app.middlewares.append(recorder.middleware)
    return await aiohttp_server(app, host=LOOPBACK)


# --- Prometheus ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    log_path: Path
    process: asyncio.subprocess.Process
    session: aiohttp.ClientSession

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    async def api(self, endpoint: str, params: list[tuple[str, str]]) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{endpoint}", params=params) as response:
            payload = await response.json()
        assert payload.get("status") == "success", f"{endpoint} {params}: {payload}"
        return payload["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = [("query", expr)]
        if at is not None:
            params.append(("time", f"{at:.3f}"))
        data = await self.api("query", params)
        return list(data["result"])

    async def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        return list(await self.api("series", [("match[]", match), ("start", str(start)), ("end", str(end))]))

    async def scalar(self, expr: str) -> float | None:
        """The value of a query that selects at most one series; None when it selects none."""
        result = await self.query(expr)
        assert len(result) <= 1, f"{expr} selected {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, description: str, check: Callable[[], Awaitable[bool]], within: float) -> None:
        """Poll `check` every 0.2 s, at most `within` seconds and 100 times."""
        deadline = time.monotonic() + within
        for _ in range(100):
            if self.process.returncode is not None:
                pytest.fail(f"prometheus exited ({self.process.returncode}); log:\n{self.tail()}")
            if await check():
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        pytest.fail(f"timed out after {within:g}s waiting for {description}; prometheus log:\n{self.tail()}")

    async def wait_up(self, job: str, value: float, within: float = 8.0) -> None:
        async def check() -> bool:
            return await self.scalar(f'up{{job="{job}"}}') == value

        await self.wait_for(f'up{{job="{job}"}} == {value:g}', check, within)


PROMETHEUS_YML = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {timeout}
  evaluation_interval: 1m
scrape_configs:
  - job_name: direct
    static_configs:
      - targets: ["{loopback}:{fake_port}"]
  - job_name: proxy
    static_configs:
      - targets: ["{loopback}:{proxy_port}"]
"""


@asynccontextmanager
async def running_prometheus(
    tmp_path: Path, config_text: str, *, log_level: str = "info"
) -> AsyncIterator[Prometheus]:
    """A Prometheus subprocess on 127.0.0.1, ready; its log tail is printed at teardown."""
    binary = require_binary("prometheus")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    log_path = workdir / "prometheus.log"
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        f"--log.level={log_level}",
    ]
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir
        )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4), trust_env=False, timeout=aiohttp.ClientTimeout(total=10)
    )
    server = Prometheus(f"http://{LOOPBACK}:{port}", log_path, process, session)
    try:

        async def ready() -> bool:
            try:
                async with session.get(f"{server.url}/-/ready") as response:
                    return response.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                return False

        await server.wait_for("prometheus /-/ready", ready, within=10.0)
        yield server
    finally:
        await session.close()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except TimeoutError:
                process.kill()
                await asyncio.wait_for(process.wait(), timeout=5)
        print(f"--- prometheus (exit {process.returncode}) log tail, {log_path} ---\n{server.tail()}")


@pytest.fixture
async def prometheus(tmp_path: Path, fake_server: TestServer, proxy: TestClient) -> AsyncIterator[Prometheus]:
    config = PROMETHEUS_YML.format(
        interval=SCRAPE_INTERVAL,
        timeout=SCRAPE_TIMEOUT,
        loopback=LOOPBACK,
        fake_port=fake_server.port,
        proxy_port=proxy.server.port,
    )
    async with running_prometheus(tmp_path, config, log_level="debug") as server:
        yield server


def keyed(result: list[dict[str, Any]]) -> dict[frozenset[tuple[str, str]], str]:
    """Instant-vector samples by label set minus job and instance; duplicates are an error."""
    out: dict[frozenset[tuple[str, str]], str] = {}
    for item in result:
        labels = frozenset((k, v) for k, v in item["metric"].items() if k not in ("job", "instance"))
        assert labels not in out, f"two series with labels {sorted(labels)}"
        out[labels] = item["value"][1]
    return out


def label_sets(series: list[dict[str, str]]) -> set[frozenset[tuple[str, str]]]:
    return {
        frozenset((k, v) for k, v in labels.items() if k not in ("job", "instance"))
        for labels in series
        if labels["__name__"] not in SYNTHETIC
    }


# --- 1 and 3: what Prometheus ingests through the proxy is what it ingests directly -------------


async def test_ingested_series_equal_direct_and_openmetrics_passes_through(
    prometheus: Prometheus, proxy: TestClient, fake_server: TestServer, recorder: Recorder
) -> None:
    await prometheus.wait_up("direct", 1)
    await prometheus.wait_up("proxy", 1)

    at = time.time()
    direct = keyed(await prometheus.query('{job="direct"}', at))
    via_proxy = keyed(await prometheus.query('{job="proxy"}', at))

    def names(samples: dict[frozenset[tuple[str, str]], str], synthetic: bool) -> dict[Any, str]:
        return {k: v for k, v in samples.items() if (dict(k)["__name__"] in SYNTHETIC) == synthetic}

    direct_data, proxy_data = names(direct, False), names(via_proxy, False)
    assert len(direct_data) > 1500, f"only {len(direct_data)} series ingested directly"
    assert proxy_data.keys() == direct_data.keys(), (
        f"only direct: {sorted(map(sorted, direct_data.keys() - proxy_data.keys()))[:5]}, "
        f"only proxy: {sorted(map(sorted, proxy_data.keys() - direct_data.keys()))[:5]}"
    )
    differing = [sorted(k) for k in direct_data if direct_data[k] != proxy_data[k]]
    assert not differing, f"{len(differing)} values differ, e.g. {differing[:3]}"

    # Prometheus' own series for both jobs: up, and the same number of samples in each scrape.
    for job, samples in (("direct", direct), ("proxy", via_proxy)):
        synthetic = {dict(k)["__name__"]: float(v) for k, v in names(samples, True).items()}
        assert synthetic["up"] == 1, job
        assert synthetic["scrape_samples_scraped"] == len(direct_data), (job, synthetic)

    # The series API agrees (over the whole run, not one instant).
    now = time.time()
    direct_series = label_sets(await prometheus.series('{job="direct"}', now - 60, now))
    proxy_series = label_sets(await prometheus.series('{job="proxy"}', now - 60, now))
    assert direct_series == set(direct_data)
    assert proxy_series == direct_series

    # 3: Prometheus 2.42 negotiated OpenMetrics, and the proxy passed that through both ways.
    prom_accept = recorder.last(PROMETHEUS_UA_PREFIX)
    assert OPENMETRICS in prom_accept.accept, prom_accept
    assert prom_accept.content_type is not None
    assert prom_accept.content_type.startswith(OPENMETRICS), prom_accept
    forwarded = recorder.last(PROXY_UA_PREFIX)
    assert forwarded.accept == prom_accept.accept, forwarded
    assert forwarded.content_type == prom_accept.content_type, forwarded

    headers = {"Accept": prom_accept.accept}
    async with proxy.get("/metrics", headers=headers) as response:
        assert response.status == 200
        proxy_type = response.headers.get("Content-Type", "")
        proxy_body = await response.read()
    assert proxy_type.startswith(OPENMETRICS), proxy_type
    assert proxy_body.endswith(b"# EOF\n")
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(f"http://{LOOPBACK}:{fake_server.port}/metrics", headers=headers) as response,
    ):
        assert response.headers.get("Content-Type") == proxy_type
        assert await response.read() == proxy_body


# --- 2: a body that breaks off is a failed scrape, never a partial one ---------------------------


async def test_reset_mid_body_is_a_failed_scrape_not_a_partial_one(
    prometheus: Prometheus, proxy: TestClient, fake: FakeExporter, recorder: Recorder
) -> None:
    await prometheus.wait_up("direct", 1)
    await prometheus.wait_up("proxy", 1)
    full = await prometheus.scalar('scrape_samples_scraped{job="proxy"}')
    assert full is not None
    assert full > 1500

    fault_from = time.time()
    before = recorder.count(PROXY_UA_PREFIX)
    fake.fault = Fault.RESET

    async def failed_scrapes() -> list[tuple[float, float, float]]:
        """(timestamp, up, scrape_samples_scraped) of the proxy job's scrapes that began after the fault."""
        window = f"[{int(time.time() - fault_from) + 5}s]"
        ups = await prometheus.query(f'up{{job="proxy"}}{window}')
        counts = await prometheus.query(f'scrape_samples_scraped{{job="proxy"}}{window}')
        if not ups or not counts:
            return []
        by_time = {float(ts): float(v) for ts, v in counts[0]["values"]}
        return [
            (float(ts), float(v), by_time.get(float(ts), -1.0))
            for ts, v in ups[0]["values"]
            if float(ts) > fault_from + 0.01
        ]

    async def two_failed() -> bool:
        return recorder.count(PROXY_UA_PREFIX) - before >= 2 and len(await failed_scrapes()) >= 2

    await prometheus.wait_for("two scrapes through the proxy during the reset fault", two_failed, 8.0)
    scrapes = await failed_scrapes()
    assert all(up == 0 and samples == 0 for _, up, samples in scrapes), (
        f"(timestamp, up, scrape_samples_scraped) after the fault: {scrapes}"
    )
    assert await prometheus.scalar('up{job="proxy"}') == 0
    assert await prometheus.scalar('scrape_samples_scraped{job="proxy"}') == 0
    # The failed scrape marked every series of the job stale: nothing half-ingested lingers.
    lingering = await prometheus.query('{job="proxy", __name__!~"up|scrape_.*"}')
    assert not lingering, f"{len(lingering)} series of the proxy job still current, e.g. {lingering[:2]}"

    # Prometheus 2.42 always asks for gzip and prefers OpenMetrics, so it would catch a truncated
    # body by itself (bad gzip stream, no "# EOF"). A scraper of uncompressed text 0.0.4 could
    # not: for it the proxy must break the connection too, never end the body cleanly.
    plain = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
    async with proxy.get("/metrics", headers=plain) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    fake.fault = Fault.NONE
    await prometheus.wait_up("proxy", 1)
    assert await prometheus.scalar('scrape_samples_scraped{job="proxy"}') == full


# --- 4: promtool check metrics ---------------------------------------------------------------------


async def promtool_check(body: bytes) -> tuple[int, str]:
    binary = require_binary("promtool")
    process = await asyncio.create_subprocess_exec(
        binary,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(body), timeout=15)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    """A text-format scrape: no OpenMetrics in Accept, since promtool 2.42 parses text 0.0.4 only."""
    async with session.get(url, headers={"Accept": "text/plain;version=0.0.4"}) as response:
        assert response.status == 200, (url, response.status, await response.text())
        assert response.headers.get("Content-Type", "").startswith("text/plain"), response.headers
        return await response.read()


async def test_promtool_check_metrics(proxy: TestClient, fake_server: TestServer) -> None:
    require_binary("promtool")
    proxy_url = f"http://{LOOPBACK}:{proxy.server.port}"
    direct_url = f"http://{LOOPBACK}:{fake_server.port}"
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=10)) as session:
        # A few scrapes of every kind, so the proxy's own metrics carry several label values.
        await fetch(session, f"{proxy_url}/metrics")
        async with session.get(f"{proxy_url}/metrics", headers={"Accept": OPENMETRICS}) as response:
            await response.read()
        await fetch(session, f"{proxy_url}/metrics?{NO_MSSQL}")
        async with session.get(f"{proxy_url}/metrics?collect[]=nosuchcollector") as response:
            assert response.status == 400
        async with session.get(f"{proxy_url}/metrics?fault=reset") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()

        # (a) The proxy's own metrics: clean, not even a lint warning.
        own = await fetch(session, f"{proxy_url}/proxy/metrics")
        assert b"# TYPE" in own
        assert await promtool_check(own) == (0, "")

        # (b) Without mssql the exporter's output parses. 2.42 exits 3 for lint problems alone
        # (the exporter's own names, e.g. a gauge ending in _total): not a parse failure.
        selected = await fetch(session, f"{proxy_url}/metrics?{NO_MSSQL}")
        assert DUPLICATE_FAMILY.encode() not in selected
        assert selected == await fetch(session, f"{direct_url}/metrics?{NO_MSSQL}")
        code, output = await promtool_check(selected)
        assert code in (0, PROMTOOL_LINT_ONLY), output
        assert "error while linting" not in output
        assert "parsing error" not in output

        # (c) The full output fails exactly as the exporter's own does: the duplicate HELP quirk.
        full_proxy = await fetch(session, f"{proxy_url}/metrics")
        full_direct = await fetch(session, f"{direct_url}/metrics")
        assert full_proxy == full_direct
        via_proxy, direct = await promtool_check(full_proxy), await promtool_check(full_direct)
        assert via_proxy == direct
        assert via_proxy[0] == 1, via_proxy
        assert DUPLICATE_FAMILY in via_proxy[1], via_proxy
