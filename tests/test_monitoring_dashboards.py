"""The Grafana dashboards in monitoring/dashboards/, checked offline.

Structure (what Grafana 11/12 imports as is), then what the queries ask for: every metric and label
must be one that windows_exporter (the 0.20 capture and the 0.31 profile) or the proxy's
/proxy/metrics really serves, so a renamed series shows up here rather than as an empty panel.
Then Grafana's own schema, through the grafana-foundation-sdk models, and the helpers that the
live check against a real Prometheus uses (substitution, rendering).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy.fake_exporter import PROFILES
from proxy.telemetry import Telemetry
from tests import monitoring_kit as kit
from tests.conftest import require_module

DATA = Path(__file__).resolve().parent.parent / "proxy" / "data"
NODE = "windows-node.json"
PROXY = "windows-metrics-proxy.json"

# The panel types Grafana ships in its core that these dashboards may use (no plugins to install).
SHIPPED_PANEL_TYPES = frozenset({"row", "timeseries", "stat", "table", "bargauge", "gauge", "text"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Labels a series gets from the scrape, not from the exposition: the kit's monitors set job,
# instance and node (the node's name) on the exporter's and on the proxy's series.
TARGET_LABELS = frozenset({"job", "instance", "node"})
DEFAULT_JOBS = {NODE: "windows-exporter", PROXY: "windows-metrics-proxy-self"}
RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase|delta|idelta|deriv|[a-z]+_over_time)\s*\(")


def _windows_payloads() -> dict[str, dict[str, dict[str, set[str]]]]:
    return {
        profile: kit.exposed_series((DATA / name).read_text(encoding="utf-8"))
        for profile, name in PROFILES.items()
    }


def _proxy_payload() -> dict[str, dict[str, set[str]]]:
    body, _ = Telemetry().render(None)
    return kit.exposed_series(body.decode())


WINDOWS = _windows_payloads()
SELF = _proxy_payload()
# What each dashboard may read: the node's dashboard both exporter versions, the proxy's its own.
SOURCES = {NODE: WINDOWS, PROXY: {"/proxy/metrics": SELF}}


def _dashboard(name: str) -> dict[str, Any]:
    return kit.load_dashboard(kit.DASHBOARD_DIR / name)


def _substituted(dashboard: Mapping[str, Any], expr: str) -> str:
    return kit.substitute(expr, {**kit.default_values(dashboard), "node": "akswin000000"})


def test_the_two_dashboards_are_there() -> None:
    assert [p.name for p in kit.dashboard_paths()] == sorted([NODE, PROXY])
    assert SOURCES[NODE].keys() == {"0.20", "0.31"}, "both exporter payloads are checked"


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_dashboard_is_importable_json_of_a_current_schema(name: str) -> None:
    text = (kit.DASHBOARD_DIR / name).read_text(encoding="utf-8")
    dashboard = json.loads(text)
    assert dashboard["uid"] == name.removesuffix(".json")
    assert len(dashboard["uid"]) <= 40, "Grafana's limit for a uid"
    assert dashboard["title"]
    assert 39 <= dashboard["schemaVersion"] <= 41, "the schema Grafana 11.x/12.x writes"
    # Importable as is, through the UI and through the sidecar: no export-for-sharing inputs to fill
    # in, and no server-side id that would clash with another dashboard.
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert dashboard.get("id") is None
    assert "${DS_" not in text


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_every_panel_has_an_id_a_place_a_shipped_type_and_the_datasource(name: str) -> None:
    dashboard = _dashboard(name)
    panels = list(kit.iter_panels(dashboard, rows=True))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in SHIPPED_PANEL_TYPES, panel
        assert panel.get("title"), panel["id"]
        pos = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= pos.keys(), panel["title"]
        assert pos["w"] >= 1, panel["title"]
        assert pos["h"] >= 1, panel["title"]
        assert 0 <= pos["x"] <= 24 - pos["w"], panel["title"]
        assert pos["y"] >= 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] in ("row", "text"):
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])
            assert "legendFormat" in target, (panel["title"], target["refId"])


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_variables_are_datasource_job_and_node(name: str) -> None:
    dashboard = _dashboard(name)
    by_name = {v["name"]: v for v in kit.variables(dashboard)}
    assert list(by_name) == ["datasource", "job", "node"], "in this order: node's query uses $job"
    assert by_name["datasource"]["type"] == "datasource"
    assert by_name["datasource"]["query"] == "prometheus"
    assert kit.default_values(dashboard)["job"] == DEFAULT_JOBS[name]
    for variable in ("job", "node"):
        assert by_name[variable]["type"] == "query"
        assert by_name[variable]["datasource"] == DATASOURCE
        # One node per view: the queries match with = not =~.
        assert not by_name[variable]["multi"], variable
        assert not by_name[variable]["includeAll"], variable
    node_query = kit.variable_query(by_name["node"])
    assert re.fullmatch(r'label_values\(\w+\{job="\$job"\}, node\)', node_query), node_query


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_no_query_uses_an_undefined_variable(name: str) -> None:
    dashboard = _dashboard(name)
    defined: set[str] = set()
    for variable in kit.variables(dashboard):
        # A variable's own query may use only the variables before it (Grafana resolves in order).
        used = kit.variables_used(kit.variable_query(variable))
        assert used <= defined, (variable["name"], used - defined)
        defined.add(variable["name"])
    for query in kit.queries(dashboard):
        undefined = kit.variables_used(query.expr) - defined - kit.BUILTIN_VARIABLES
        assert not undefined, (query.panel_title, undefined)
        for variable in ("job", "node"):
            assert f'{variable}="${variable}"' in query.expr, (
                query.panel_title,
                f"not scoped by ${variable}",
            )
        _substituted(dashboard, query.expr)  # raises UndefinedVariableError if one slipped through


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_rates_span_the_rate_interval(name: str) -> None:
    """$__rate_interval, not a fixed window: it always covers four scrapes whatever the
    scrape interval and the zoom, so a rate never comes out empty or jagged."""
    for query in kit.queries(_dashboard(name)):
        ranges = re.findall(r"\[([^\]]*)\]", query.expr)
        assert all(r == "$__rate_interval" for r in ranges), (query.panel_title, ranges)
        assert len(RANGE_FUNCTIONS.findall(query.expr)) == len(ranges), query.panel_title


def _exists(payload: Mapping[str, Mapping[str, set[str]]], selector: kit.Selector) -> list[str]:
    """What of this selector the payload lacks: the metric, a label, or the value of an `=` matcher."""
    if selector.name not in payload:
        return [f"metric {selector.name}"]
    labels = payload[selector.name]
    missing = []
    for label, op, value in selector.matchers:
        if label in TARGET_LABELS:
            continue
        if label not in labels:
            missing.append(f"label {label} of {selector.name}")
        elif op == "=" and value not in labels[label]:
            missing.append(f'{selector.name}{{{label}="{value}"}} (values: {sorted(labels[label])})')
    return missing


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_every_metric_and_label_is_served_by_every_source_the_dashboard_reads(name: str) -> None:
    """Each selector must match the exporter's output in both versions (or, for the proxy, its own
    /proxy/metrics). Where the versions name a series differently, the dashboard writes
    `new{...} or old{...}`, and each payload must have one of the two."""
    dashboard = _dashboard(name)
    checked = 0
    for query in kit.queries(dashboard):
        expr = _substituted(dashboard, query.expr)
        found = kit.selectors(expr)
        assert found, (query.panel_title, "no metric in the query")
        alternatives = kit.or_alternatives(expr)
        labels_of_query = set(TARGET_LABELS)
        for source, payload in SOURCES[name].items():
            for selector in found:
                missing = _exists(payload, selector)
                if missing:
                    partners = [b for a, b in alternatives if a == selector]
                    partners += [a for a, b in alternatives if b == selector]
                    assert any(not _exists(payload, p) for p in partners), (
                        f"{query.panel_title!r} ({source}): {missing}"
                    )
                    continue
                labels_of_query |= payload[selector.name].keys()
                checked += 1
        for label in kit.grouping_labels(expr) | kit.legend_labels(query.legend_format):
            assert label in labels_of_query, f"{query.panel_title!r}: label {label} is on none of its metrics"
    assert checked >= len(kit.queries(dashboard))


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_variable_queries_name_a_served_metric(name: str) -> None:
    dashboard = _dashboard(name)
    for variable in kit.variables(dashboard):
        query = kit.variable_query(variable)
        if not query:
            continue
        match, label = kit.parse_label_values(query)
        assert match, f"{variable['name']}: label_values without a metric lists every series' labels"
        (selector,) = kit.selectors(kit.substitute(match, {"job": DEFAULT_JOBS[name]}))
        assert label in TARGET_LABELS
        for source, payload in SOURCES[name].items():
            assert not _exists(payload, selector), (variable["name"], source)


def test_the_node_dashboard_shows_each_area_the_issue_asks_for() -> None:
    exprs = " ".join(q.expr for q in kit.queries(_dashboard(NODE)))
    for metric in (
        "windows_cpu_time_total",
        "windows_memory_available_bytes",
        "windows_memory_physical_total_bytes",  # 0.30+
        "windows_os_visible_memory_bytes",  # 0.20 to 0.29
        "windows_logical_disk_free_bytes",
        "windows_logical_disk_size_bytes",
        "windows_logical_disk_read_bytes_total",
        "windows_logical_disk_write_bytes_total",
        "windows_net_bytes_received_total",
        "windows_net_bytes_sent_total",
        "windows_service_state",
    ):
        assert metric in exprs, metric


def test_the_proxy_dashboard_shows_each_self_metric_the_issue_asks_for() -> None:
    exprs = " ".join(q.expr for q in kit.queries(_dashboard(PROXY)))
    for family in (
        "upstream_requests_total",
        "upstream_first_byte_seconds_bucket",
        "upstream_last_byte_seconds_bucket",
        "upstream_deadline_ratio_bucket",
        "served_bytes_total",
        "scrapes_total",
        "coalesced_scrapes_total",
        "client_aborts_total",
        "relabel_samples_total",
        "relabel_cache_hits_total",
        "relabel_cache_misses_total",
        "open_connections",
        "refused_connections_total",
        "build_info",
    ):
        assert f"windows_metrics_proxy_{family}" in exprs, family


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_grafana_schema_knows_every_key_and_panel_type(name: str) -> None:
    """grafana-foundation-sdk's models are generated from Grafana's dashboard schema (the
    dashboard kind and each core panel's options). Read into them and written back, the dashboard
    must come out with every key it went in with, unchanged: a key the schema does not know (a
    typo, an option in the wrong place) is dropped and shows here. Its reader itself is lenient,
    so this round trip, not the reading, is the check."""
    require_module("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard as models
    from grafana_foundation_sdk.models import prometheus

    register_default_plugins()
    original = _dashboard(name)
    parsed = models.Dashboard.from_json(original)
    for panel in parsed.panels or []:
        for child in [panel, *getattr(panel, "panels", [])]:
            if isinstance(child, models.RowPanel):
                continue
            assert runtime.panelcfg_config(child.type_val) is not None, f"not a core panel: {child.type_val}"
            assert not isinstance(child.options, dict), f"{child.title}: options not of {child.type_val}"
            for target in child.targets or []:
                assert isinstance(target, prometheus.Dataquery), child.title
    written = json.loads(json.dumps(parsed, cls=JSONEncoder))
    assert list(_lost(original, written)) == []


def _lost(given: Any, written: Any, path: str = "") -> Any:
    """Where `written` lacks or changed something `given` has (what it adds, defaults, is fine)."""
    if isinstance(given, dict) and isinstance(written, dict):
        for key, value in given.items():
            if key not in written:
                yield f"{path}.{key}: dropped"
            else:
                yield from _lost(value, written[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(written, list) and len(given) == len(written):
        for i, (a, b) in enumerate(zip(given, written, strict=True)):
            yield from _lost(a, b, f"{path}[{i}]")
    elif given != written:
        yield f"{path}: {given!r} became {written!r}"


# ------------------------------------------------------------------------ the helpers themselves


def test_substitute_replaces_every_spelling_and_grafanas_built_ins() -> None:
    expr = (
        'rate(m{job="$job", node="${node}", x="[[node]]", y="${node:raw}"}[$__rate_interval]) [$__interval]'
    )
    got = kit.substitute(
        expr, {"job": "windows-exporter", "node": "akswin000000"}, step=30, scrape_interval=15
    )
    assert got == (
        'rate(m{job="windows-exporter", node="akswin000000", x="akswin000000", y="akswin000000"}[60s]) [30s]'
    )
    # $__rate_interval is max(interval + scrape interval, 4 * scrape interval).
    assert kit.substitute("$__rate_interval", {}, step=15, scrape_interval=15) == "60s"
    assert kit.substitute("$__rate_interval", {}, step=120, scrape_interval=15) == "135s"
    assert kit.substitute("$__range $__range_s", {}, range_seconds=900) == "900s 900"
    assert kit.substitute("$__rate_interval", {"__rate_interval": "5m"}) == "5m", "an explicit value wins"


def test_substitute_escapes_values_and_joins_multi_values_as_a_regex() -> None:
    assert kit.substitute('m{a="$v"}', {"v": 'say "hi" \\ now'}) == r'm{a="say \"hi\" \\ now"}'
    assert kit.substitute('m{a=~"$v"}', {"v": ["a.b", "c|d", "e"]}) == r'm{a=~"(a\\.b|c\\|d|e)"}'


def test_substitute_refuses_an_undefined_variable() -> None:
    with pytest.raises(kit.UndefinedVariableError, match="nodee"):
        kit.substitute('m{node="$nodee"}', {"node": "n"})
    assert kit.variables_used('a{b="$x", c="${y}", d="[[z]]"}[$__rate_interval]') == {
        "x",
        "y",
        "z",
        "__rate_interval",
    }


def test_selectors_grouping_and_or_alternatives_are_read_from_promql() -> None:
    expr = (
        'sum by (mode, "core") (rate(a_total{x="1", y=~"b|c"}[1m] offset 5m)) / on (node) group_left(z) '
        '(b{x!="}"} or {__name__="c", w="2"}) - count without (q) (d) > bool 0.5e3 and topk(3, e)'
    )
    found = kit.selectors(expr)
    assert [s.name for s in found] == ["a_total", "b", "c", "d", "e"]
    assert found[0].matchers == (("x", "=", "1"), ("y", "=~", "b|c"))
    assert found[1].matchers == (("x", "!=", "}"),)
    assert found[2].matchers == (("w", "=", "2"),)
    assert kit.grouping_labels(expr) == {"mode", "core", "node", "z", "q"}
    assert [(a.name, b.name) for a, b in kit.or_alternatives(expr)] == [("b", "c")]
    with pytest.raises(kit.PromQLSyntaxError):
        kit.selectors('a{x="1"')
    with pytest.raises(kit.PromQLSyntaxError):
        kit.selectors("a ; b")


def test_parse_label_values() -> None:
    assert kit.parse_label_values('label_values(m{job="$job"}, node)') == ('m{job="$job"}', "node")
    assert kit.parse_label_values("label_values(job)") == (None, "job")
    with pytest.raises(ValueError, match="label_values"):
        kit.parse_label_values("query_result(up)")


def test_legend_and_exposed_series() -> None:
    assert kit.legend("{{volume}} read", {"volume": "C:"}) == "C: read"
    assert kit.legend("{{ nic }} / {{absent}}", {"nic": "eth"}) == "eth / "
    assert kit.legend("", {"__name__": "up", "job": "j"}) == 'up{job="j"}'
    series = kit.exposed_series('# HELP m x\nm{a="1",b="x\\"y"} 1\nm{a="2"} 2\nn 3\n')
    assert series == {"m": {"a": {"1", "2"}, "b": {'x\\"y'}}, "n": {}}
    assert "windows_metrics_proxy_upstream_deadline_ratio_bucket" in SELF
    assert SELF["windows_metrics_proxy_upstream_requests_total"]["outcome"] >= {"success", "body_error"}


def _synthetic_results(dashboard: Mapping[str, Any], *, empty_panel: int) -> dict[tuple[int, str], list[Any]]:
    """Made-up query results in the shape of Prometheus's query API, two series per target."""
    results: dict[tuple[int, str], list[Any]] = {}
    start = 1_764_000_000
    for query in kit.queries(dashboard):
        if query.panel_id == empty_panel:
            continue
        series = []
        for n, label in enumerate(("C:", "D:")):
            metric = {"volume": label, "mode": f"m{n}", "outcome": f"o{n}", "version": "0.31.8"}
            if query.instant:
                series.append({"metric": metric, "value": [start, str(0.25 * (n + 1))]})
            else:
                values = [[start + 15 * i, str((i % 7) * (n + 1) * 0.1)] for i in range(40)]
                series.append({"metric": metric, "values": values})
        results[query.key] = series
    return results


@pytest.mark.parametrize("name", [NODE, PROXY])
def test_render_dashboard_draws_a_png_of_every_panel(name: str, tmp_path: Path) -> None:
    require_module("matplotlib")
    dashboard = _dashboard(name)
    ts_panel = next(p["id"] for p in kit.iter_panels(dashboard) if p["type"] == "timeseries")
    out = kit.render_dashboard(
        dashboard,
        _synthetic_results(dashboard, empty_panel=ts_panel),
        tmp_path / "dashboard.png",
        values={"job": DEFAULT_JOBS[name], "node": "akswin000000"},
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width == 1600, "20 inches at 80 dpi"
    assert 1000 < height < 4000, height
    assert 100_000 < len(data) < 5_000_000, len(data)


def test_format_value_uses_the_panel_unit() -> None:
    assert kit.format_value(0.423, "percentunit") == "42.3%"
    assert kit.format_value(17179869184, "bytes") == "16 GiB"
    assert kit.format_value(2048, "Bps") == "2 KiB/s"
    assert kit.format_value(0.0123, "s") == "12.3 ms"
    assert kit.format_value(3 * 86400, "s") == "3.0 days"
    assert kit.format_value(float("nan"), "short") == "NaN"
