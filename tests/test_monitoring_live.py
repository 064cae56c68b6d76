"""The monitoring kit against a real Prometheus (issue 13, section 3): rules and dashboards live.

One Prometheus (Debian's 2.42, the binary the e2e tests use) scrapes the proxy in front of the fake
exporter every second, with the labels the kit's monitors set (job, instance and node), and loads
the kit's rule file, evaluated every second. Then, in one run so that Prometheus starts once:

1. healthy: every rule evaluates without error and no alert is pending or firing; every dashboard
   query, with its variables substituted, is accepted by the query API, and each panel returns data;
2. a fault per alert the fake can cause (a failing collector, a reset mid-body, the exporter gone)
   makes the matching alert pending or firing within a bounded time. A second node, whose
   exporter is down from the start, shows WindowsExporterUnreachable: that alert means "no
   success in 5 minutes", which a node that was healthy a minute ago cannot meet in a short test;
3. each dashboard's panels are rendered (matplotlib) from what Prometheus holds of the healthy
   phase: into tmp_path, or into $RENDER_DASHBOARDS (`make dashboard-images` writes docs/images/
   that way, after a minute of healthy scrapes).

How the setup differs from a cluster: the fake exporter's counters advance at made-up rates (its
`advancing` mode) rather than a node's, the `for:` durations are not waited out (pending is enough
to show the expression caught the fault), and the monitors' relabelings are written as the static
labels they produce.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.fake_exporter import FakeExporter, Fault
from tests import monitoring_kit as kit
from tests.conftest import LOOPBACK, ProxyFactory
from tests.test_e2e_prometheus import Prometheus, running_prometheus

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
RULE_FILE = REPO / "monitoring" / "rules" / "windows-metrics-proxy.rules.yml"
NODE = "akswin000000"
NODE_JOB = "windows-exporter"
PROXY_JOB = "windows-metrics-proxy-self"
# Bounds of the run: how long an alert may take to go pending once its fault is on, and how long
# the healthy phase waits for every rule to have been evaluated.
ALERT_WITHIN = 20.0
RULES_WITHIN = 15.0
# How long the healthy phase runs when the pictures are made for the README (`make dashboard-images`).
HEALTHY_FOR_PICTURES = 60.0
# The pictures start this long after the first scrape, when rates over $__rate_interval have a
# full window (a ramp from the first sample would look like a change on the node).
RATE_WARMUP = 5.0


async def active_alerts(prometheus: Prometheus) -> list[dict[str, Any]]:
    return list((await prometheus.api("alerts", []))["alerts"])


async def wait_for_alert(prometheus: Prometheus, name: str, **labels: str) -> dict[str, Any]:
    """The alert `name` (with these labels) once it is pending or firing, within ALERT_WITHIN."""
    found: list[dict[str, Any]] = []

    async def active() -> bool:
        for alert in await active_alerts(prometheus):
            if alert["labels"].get("alertname") != name:
                continue
            if all(alert["labels"].get(k) == v for k, v in labels.items()):
                found.append(alert)
                return True
        return False

    await prometheus.wait_for(f"alert {name} {labels} pending or firing", active, within=ALERT_WITHIN)
    return found[-1]


async def rules_evaluated(prometheus: Prometheus) -> list[dict[str, Any]]:
    """Every rule of the kit once Prometheus has evaluated each at least once."""
    rules: list[dict[str, Any]] = []

    async def evaluated() -> bool:
        groups = (await prometheus.api("rules", []))["groups"]
        rules[:] = [rule for group in groups for rule in group["rules"]]
        return bool(rules) and all(rule.get("health") != "unknown" for rule in rules)

    await prometheus.wait_for("every rule evaluated once", evaluated, within=RULES_WITHIN)
    return rules


# Panels that may rightly show nothing on a healthy node of the 0.31 profile, with why.
MAY_BE_EMPTY: dict[str, str] = {}


def prometheus_config(rules: Path, targets: dict[str, int]) -> str:
    """Both jobs for each node (node name -> its proxy's port), labelled as the monitors label them."""
    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  scrape_timeout: 900ms",
        "  evaluation_interval: 1s",
        "rule_files:",
        f"  - {rules}",
        "scrape_configs:",
    ]
    for job, path in ((NODE_JOB, "/metrics"), (PROXY_JOB, "/proxy/metrics")):
        lines += [f"  - job_name: {job}", f"    metrics_path: {path}", "    static_configs:"]
        for node, port in targets.items():
            lines += [f'      - targets: ["{LOOPBACK}:{port}"]', f"        labels: {{node: {node}}}"]
        # instance = the node's name, as the monitors set it (from the node label here).
        lines += [
            "    relabel_configs:",
            "      - source_labels: [node]",
            "        target_label: instance",
        ]
    return "\n".join(lines) + "\n"


def closed_port() -> int:
    """A loopback port with nothing listening: an exporter that is down from the start."""
    import socket

    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def dashboard_results(
    prometheus: Prometheus, dashboard: dict[str, Any], values: dict[str, str], start: float, end: float
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Every query of a dashboard, variables substituted, as Prometheus answers it over [start, end]
    at a 1 s step (instant queries at `end`): the API refuses what it cannot parse."""
    results: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for query in kit.queries(dashboard):
        expr = kit.substitute(query.expr, values, step=1, scrape_interval=1, range_seconds=end - start)
        if query.instant:
            data = await prometheus.api("query", [("query", expr), ("time", f"{end:.3f}")])
        else:
            params = [("query", expr), ("start", f"{start:.3f}"), ("end", f"{end:.3f}"), ("step", "1")]
            data = await prometheus.api("query_range", params)
        results[query.key] = list(data["result"])
    return results


def image_dir(tmp_path: Path) -> Path:
    """Where the pictures go: $RENDER_DASHBOARDS (`make dashboard-images`), else the test's tmp."""
    out_dir = Path(os.environ.get("RENDER_DASHBOARDS") or tmp_path / "images")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def assert_no_rule_errors(rules: list[dict[str, Any]]) -> None:
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule.get("health") != "ok"]
    assert not broken, broken


async def test_the_kit_on_a_real_prometheus(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    down_node = "akswin000001"  # its exporter is down from the start
    fake = FakeExporter(profile="0.31", advancing=True, max_concurrent=0)
    exporter = await aiohttp_server(fake.app(), host=LOOPBACK)
    # Some rules, so that the relabel panels have something to show (a drop-list: the node
    # dashboard's series all stay).
    proxy = await make_proxy(port=exporter.port, drop="windows_container_.*")
    lost = await make_proxy(port=closed_port(), drop="windows_container_.*")
    config = prometheus_config(RULE_FILE, {NODE: proxy.server.port, down_node: lost.server.port})
    async with running_prometheus(tmp_path, config) as prometheus:
        started = time.time()
        for job in (NODE_JOB, PROXY_JOB):
            await prometheus.wait_for(
                f"{job} up on {NODE}",
                lambda job=job: _scalar_is(prometheus, f'up{{job="{job}", node="{NODE}"}}', 1),
                within=15.0,
            )

        # 1. Healthy: rules evaluate cleanly, nothing is pending for the healthy node, and every
        # dashboard query is accepted and (but for MAY_BE_EMPTY) returns data.
        # A few samples, so that rates over $__rate_interval (4 s) exist; a minute for pictures.
        await asyncio.sleep(HEALTHY_FOR_PICTURES if os.environ.get("RENDER_DASHBOARDS") else 6)
        assert_no_rule_errors(await rules_evaluated(prometheus))
        healthy = [a for a in await active_alerts(prometheus) if a["labels"].get("node") == NODE]
        assert not healthy, healthy
        now = time.time()
        for path in kit.dashboard_paths():
            dashboard = kit.load_dashboard(path)
            values = {**kit.default_values(dashboard), "node": NODE}
            results = await dashboard_results(prometheus, dashboard, values, now - 5, now)
            by_panel: dict[str, bool] = {}
            for query in kit.queries(dashboard):
                by_panel[query.panel_title] = by_panel.get(query.panel_title, False) or bool(
                    results[query.key]
                )
            empty = sorted(title for title, has in by_panel.items() if not has and title not in MAY_BE_EMPTY)
            assert not empty, f"{dashboard['title']}: panels without data: {empty}"

        # Pictures of the dashboards, from what Prometheus holds of the healthy node by now.
        out_dir = image_dir(tmp_path)
        end = time.time()
        for path in kit.dashboard_paths():
            dashboard = kit.load_dashboard(path)
            values = {**kit.default_values(dashboard), "node": NODE}
            results = await dashboard_results(prometheus, dashboard, values, started + RATE_WARMUP, end)
            picture = kit.render_dashboard(
                dashboard, results, out_dir / f"dashboard-{path.stem}.png", values=values
            )
            assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            assert picture.stat().st_size > 20_000

        # The node whose exporter never answered: unreachable, and its metrics target down.
        unreachable = await wait_for_alert(prometheus, "WindowsExporterUnreachable", node=down_node)
        assert unreachable["labels"]["outcome"] == "connect_error"
        assert down_node in unreachable["annotations"]["description"]
        await wait_for_alert(prometheus, "WindowsNodeMetricsDown", node=down_node)

        # 2. Faults the fake exporter injects on the healthy node, one at a time.
        fake.failing_collectors = {"service"}
        failed = await wait_for_alert(prometheus, "WindowsExporterCollectorFailed", node=NODE)
        assert failed["labels"]["collector"] == "service"
        fake.failing_collectors = set()

        fake.fault = Fault.RESET
        await wait_for_alert(prometheus, "WindowsMetricsProxyScrapesAborted", node=NODE)
        fake.fault = Fault.NONE
        await prometheus.wait_for(
            "the node's scrapes whole again",
            lambda: _scalar_is(prometheus, f'up{{job="{NODE_JOB}", node="{NODE}"}}', 1),
            within=10.0,
        )

        # 3. The exporter goes away.
        await exporter.close()
        await wait_for_alert(prometheus, "WindowsNodeMetricsDown", node=NODE)
        failing = await wait_for_alert(prometheus, "WindowsExporterScrapesFailing", node=NODE)
        assert failing["labels"]["outcome"] == "connect_error"
        assert_no_rule_errors(await rules_evaluated(prometheus))


async def _scalar_is(prometheus: Prometheus, expr: str, value: float) -> bool:
    return await prometheus.scalar(expr) == value
