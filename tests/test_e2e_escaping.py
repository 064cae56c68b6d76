"""End to end: a real Prometheus 2.42 ingests names that the proxy's rules made non-legacy.

Prometheus 2.x sends no `escaping=` term and cannot parse a quoted name: before the proxy escaped
its output, a rule that renamed a series to `win.cpu.time_total` made every such scrape fail
(`up == 0`, `"INVALID" "{" is not a valid start token`). Now Prometheus 2.42 gets the names
escaped with underscores, as a client_golang exporter would write them for it.

Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from proxy.fake_exporter import FakeExporter
from tests.conftest import LOOPBACK, ProxyFactory
from tests.test_app_escaping import CPU_SAMPLES, RENAME_YAML
from tests.test_e2e_prometheus import running_prometheus

pytestmark = pytest.mark.e2e

PROMETHEUS_YML = """\
global:
  scrape_interval: 1s
  scrape_timeout: 800ms
  evaluation_interval: 1m
scrape_configs:
  - job_name: proxy
    static_configs:
      - targets: ["{loopback}:{port}"]
"""


@pytest.fixture
async def fake_server(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(FakeExporter(max_concurrent=0).app(), host=LOOPBACK)


async def test_prometheus_2_ingests_a_renamed_series_under_its_escaped_name(
    make_proxy: ProxyFactory, fake_server: TestServer, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RENAME_YAML)
    proxy = await make_proxy(port=fake_server.port, relabel_config=str(rules))
    config = PROMETHEUS_YML.format(loopback=LOOPBACK, port=proxy.server.port)
    async with running_prometheus(tmp_path, config) as prometheus:
        await prometheus.wait_up("proxy", 1, within=15.0)

        async def ingested() -> bool:
            return len(await prometheus.query("win_cpu_time_total")) == CPU_SAMPLES

        await prometheus.wait_for("win_cpu_time_total ingested", ingested, within=10.0)
        idle = await prometheus.query('win_cpu_time_total{utf_8_label="idle"}')
        assert len(idle) == CPU_SAMPLES // 5  # five modes per core
        assert all(item["metric"]["mode"] == "idle" for item in idle)
        assert {item["metric"]["core"] for item in idle} >= {"0,0"}
        assert await prometheus.query("windows_cpu_time_total") == []
        # The family's metadata came along under the escaped name.
        metadata = await prometheus.api("targets/metadata", [("metric", "win_cpu_time")])
        assert [entry["type"] for entry in metadata] == ["counter"]
        assert await prometheus.scalar('up{job="proxy"}') == 1
