"""The monitoring kit's alerting and recording rules (monitoring/rules), checked with the real tools.

- `promtool check rules` on the rule file, and on the PrometheusRule's `spec` as kustomize renders
  it, written out as a rule file; the PrometheusRule also passes prometheus-operator's schema (the
  cloudcoil models, unknown fields forbidden) and is what scripts/make_prometheusrule.py writes.
- `promtool test rules` on one file per alert (monitoring/rules/tests/<Alert>.test.yml), each with a
  case where its alert fires and one where it does not, and on the recording rules' file.
- Every alert has a severity, a summary, a description that names the node and a runbook section.
- Every metric and label the rules read exists: in the proxy's /proxy/metrics, in windows_exporter's
  output (the 0.20 capture and the 0.31 profile), or is Prometheus's `up`. Prometheus 2.42 has no
  parse API and promtool cannot list an expression's selectors, so a small PromQL tokenizer here
  finds them; a test feeds it broken rules so it cannot pass vacuously.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import re
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from proxy.telemetry import Telemetry
from tests import monitoring_kit as kit
from tests.conftest import require_binary, require_module
from tests.test_deploy_manifests import MANIFESTS, ROOT, kustomize, one, rendered, write_kustomization

RULES = ROOT / "monitoring" / "rules" / "windows-metrics-proxy.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "rules" / "tests"
RECORDING_TESTS = RULE_TESTS / "recording-rules.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
GENERATOR = ROOT / "scripts" / "make_prometheusrule.py"
OVERLAY = "prometheusrule"
# The job labels the kit's monitors set (checked against the monitors below).
NODE_JOB = "windows-exporter"
SELF_JOB = "windows-metrics-proxy-self"
# Labels every series of a target has after the monitors' relabelings; `up` has only these.
TARGET_LABELS = {"job", "instance", "node"}
PAYLOADS = ("windows_exporter-0.20.0.prom", "windows_exporter-0.31-profile.prom")


def promtool() -> str:
    return require_binary("promtool")


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS
    )


@cache
def rule_file() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_file()["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def records() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


# --- promtool check rules -------------------------------------------------------------------------


def test_the_rule_file_passes_promtool_check_rules(tmp_path: Path) -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    # and promtool does reject a broken expression
    broken = copy.deepcopy(rule_file())
    broken["groups"][1]["rules"][0]["expr"] = "sum by (job (up)"
    path = tmp_path / "broken.rules.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run_promtool("check", "rules", path)
    assert result.returncode != 0


# --- The PrometheusRule component -----------------------------------------------------------------


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_prometheusrule", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheusrule_is_what_the_generator_writes() -> None:
    module = generator()
    committed = (MANIFESTS / "components" / "prometheusrule" / "prometheusrule.yaml").read_text()
    assert module.render(RULES.read_text()) == committed, "run scripts/make_prometheusrule.py"
    assert module.main(["--check"]) == 0
    # and a change to the rule file is a change to the PrometheusRule
    assert module.render(RULES.read_text().replace("for: 15m", "for: 16m")) != committed


def rendered_prometheusrule() -> dict[str, Any]:
    return one(rendered(OVERLAY), "PrometheusRule")


def test_the_rendered_prometheusrule_has_the_rule_files_groups() -> None:
    rule = rendered_prometheusrule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "windows-metrics-proxy"
    assert rule["spec"]["groups"] == rule_file()["groups"]


def validate_prometheusrule(obj: dict[str, Any]) -> Any:
    models = require_module(
        "cloudcoil.models.prometheus_operator.v1",
        "pip install -e '.[test]' installs cloudcoil-models-prometheus-operator",
    )
    return models.PrometheusRule.model_validate(
        obj, extra="forbid", strict=True, by_alias=True, by_name=False
    )


def test_the_rendered_prometheusrule_passes_prometheus_operators_schema() -> None:
    validated = validate_prometheusrule(rendered_prometheusrule())
    assert len(validated.spec.groups) == len(rule_file()["groups"])


RULE_BREAKAGES = {
    "typo": lambda r: r["spec"]["groups"][1]["rules"][0].__setitem__("exprs", "up == 0"),
    "no-group-name": lambda r: r["spec"]["groups"][0].pop("name"),
    "for-as-number": lambda r: r["spec"]["groups"][1]["rules"][0].__setitem__("for", 300),
    "rules-as-map": lambda r: r["spec"]["groups"][0].__setitem__("rules", {"a": 1}),
}


@pytest.mark.parametrize("breakage", list(RULE_BREAKAGES))
def test_a_broken_prometheusrule_fails_the_schema(breakage: str) -> None:
    pydantic = require_module("pydantic", "pydantic comes with the project")
    rule = copy.deepcopy(rendered_prometheusrule())
    validate_prometheusrule(rule)
    RULE_BREAKAGES[breakage](rule)
    with pytest.raises(pydantic.ValidationError):
        validate_prometheusrule(rule)


def test_a_release_label_for_kube_prometheus_stack_reaches_the_prometheusrule(tmp_path: Path) -> None:
    """What the docs say: kube-prometheus-stack's ruleSelector wants `release: <its Helm release>`."""
    work = tmp_path / "stack"
    work.mkdir()
    write_kustomization(
        work,
        ["base"],
        ["namespace", "servicemonitor", "prometheusrule"],
        "labels:\n  - pairs:\n      release: kube-prometheus-stack\n",
    )
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    rule = one(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "windows-metrics-proxy"
    validate_prometheusrule(rule)


def test_the_rendered_prometheusrules_spec_passes_promtool(tmp_path: Path) -> None:
    path = tmp_path / "from-prometheusrule.rules.yml"
    path.write_text(yaml.safe_dump(rendered_prometheusrule()["spec"]))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# --- promtool test rules --------------------------------------------------------------------------


def alert_test_files() -> list[Path]:
    return sorted(p for p in RULE_TESTS.glob("*.test.yml") if p != RECORDING_TESTS)


def test_every_alert_has_its_own_test_file() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), names
    assert {p.name.removesuffix(".test.yml") for p in alert_test_files()} == set(names)
    assert RECORDING_TESTS.is_file()


@pytest.mark.parametrize("path", alert_test_files(), ids=lambda p: p.name)
def test_each_alert_test_file_fires_and_does_not_fire(path: Path) -> None:
    """Its own alert only, firing in one case (with labels and annotations) and silent in another."""
    name = path.name.removesuffix(".test.yml")
    spec = yaml.safe_load(path.read_text())
    assert spec["rule_files"] == ["../windows-metrics-proxy.rules.yml"]
    cases = [case for test in spec["tests"] for case in test.get("alert_rule_test", [])]
    assert {case["alertname"] for case in cases} == {name}
    firing = [alert for case in cases for alert in case.get("exp_alerts") or []]
    assert firing, f"{path.name} never expects {name} to fire"
    assert any(not case.get("exp_alerts") for case in cases), f"{path.name} has no case where it is silent"
    for alert in firing:
        assert alert["exp_annotations"]["description"], alert
        assert set(alert["exp_labels"]) >= TARGET_LABELS, alert
    for test in spec["tests"]:
        for series in test["input_series"]:
            labels = selectors(series["series"])[0].labels
            assert set(labels) >= TARGET_LABELS, series  # as the monitors label every series


@pytest.mark.e2e
@pytest.mark.parametrize("path", [*alert_test_files(), RECORDING_TESTS], ids=lambda p: p.name)
def test_promtool_test_rules(path: Path) -> None:
    result = run_promtool("test", "rules", path.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.e2e
def test_promtool_test_rules_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """So a passing file means the expectations held, not that nothing was compared."""
    path = RULE_TESTS / "WindowsExporterCollectorFailed.test.yml"
    text = path.read_text().replace("../windows-metrics-proxy.rules.yml", str(RULES))
    wrong = tmp_path / "wrong.test.yml"
    wrong.write_text(text.replace("collector: service", "collector: cpu", 1))
    result = subprocess.run(
        [promtool(), "test", "rules", str(wrong)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_recording_rule_is_tested() -> None:
    spec = yaml.safe_load(RECORDING_TESTS.read_text())
    exprs = " ".join(case["expr"] for test in spec["tests"] for case in test.get("promql_expr_test", []))
    for rule in records():
        assert rule["record"] in exprs, rule["record"]


# --- Severity, annotations, runbook ---------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_has_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("warning", "critical")
    assert alert.get("for"), "an alert without for: pages on one evaluation"
    annotations = alert["annotations"]
    assert set(annotations) == {"summary", "description", "runbook"}
    assert annotations["summary"].strip()
    assert "{{ $labels.node }}" in annotations["description"]
    page, _, anchor = annotations["runbook"].partition("#")
    assert page == "docs/runbook.md"
    assert anchor == alert["alert"].lower()
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section #{anchor}"


def test_the_runbook_has_what_each_section_needs() -> None:
    text = RUNBOOK.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    by_anchor = {slug(s.splitlines()[0]): s for s in sections[1:]}
    for alert in alerts():
        section = by_anchor[alert["alert"].lower()]
        for part in ("What it means", "What to check", "How to fix"):
            assert f"**{part}.**" in section, (alert["alert"], part)
    # how to set a real runbook_url, change the job labels, and what a keep-list hides
    assert "runbook_url" in text
    assert "Changing the job labels" in text
    assert "windows_exporter_collector_success" in by_anchor["windowsexportercollectorfailed"]
    assert "keep-list" in by_anchor["windowsexportercollectorfailed"]


# --- The rules read only what exists --------------------------------------------------------------


@dataclass
class Selector:
    name: str
    labels: dict[str, tuple[str, str]]  # label -> (operator, value)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring/group_*


def parse(expr: str) -> Parsed:
    """The selectors and grouping labels of a PromQL expression, read by the dashboards' reader
    (tests/monitoring_kit.py), so the rules and the dashboards are checked by one tokenizer."""
    found = [
        Selector(s.name, {label: (op, value) for label, op, value in s.matchers}) for s in kit.selectors(expr)
    ]
    for selector in found:
        assert selector.name, f"a selector without a metric name in {expr!r}"
    return Parsed(found, kit.grouping_labels(expr))


def selectors(expr: str) -> list[Selector]:
    return parse(expr).selectors


@cache
def known_series() -> dict[str, dict[str, set[str]]]:
    """Every metric name served, with its labels and their values: /proxy/metrics and both payloads."""
    texts = [Telemetry().render(None)[0].decode()]
    texts += [(importlib.resources.files("proxy") / "data" / p).read_text() for p in PAYLOADS]
    series: dict[str, dict[str, set[str]]] = {"up": {}}  # Prometheus's own, the target's labels only
    for text in texts:
        for name, labels in kit.exposed_series(text).items():
            known = series.setdefault(name, {})
            for label, values in labels.items():
                known.setdefault(label, set()).update(values)
    return series


def problems(rule_list: list[dict[str, Any]]) -> list[str]:
    """What a rule reads that nothing serves: unknown metrics, labels, or label values."""
    known = {name: {k: set(v) for k, v in labels.items()} for name, labels in known_series().items()}
    found: list[str] = []
    recorded: set[str] = set()
    for rule in rule_list:
        where = rule.get("alert") or rule.get("record")
        parsed = parse(rule["expr"])
        seen_labels = set(TARGET_LABELS)
        for sel in parsed.selectors:
            if sel.name not in known:
                found.append(f"{where}: no metric {sel.name}")
                continue
            labels = known[sel.name]
            seen_labels |= set(labels)
            for label, (op, value) in sel.labels.items():
                if label in TARGET_LABELS:
                    continue
                if label not in labels:
                    found.append(f"{where}: {sel.name} has no label {label}")
                elif op in ("=", "=~") and re.fullmatch(r"[\w.+|]*", value):
                    for alternative in value.split("|"):
                        if alternative not in labels[label]:
                            found.append(f'{where}: {sel.name} never has {label}="{alternative}"')
        for label in parsed.grouping - seen_labels:
            found.append(f"{where}: groups by {label}, which none of its series has")
        if "record" in rule:
            # What a later rule may read from this record: its grouping labels and their values,
            # what the records it reads carry (kept by a `group_left`), and its own `labels:`.
            out: dict[str, set[str]] = {}
            for sel in parsed.selectors:
                if sel.name in recorded:
                    for label, values in known[sel.name].items():
                        out.setdefault(label, set()).update(values)
            for label in parsed.grouping - TARGET_LABELS:
                out.setdefault(label, set()).update(
                    *(known.get(s.name, {}).get(label, set()) for s in parsed.selectors)
                )
            for label, value in rule.get("labels", {}).items():
                out[label] = {str(value)}
            known[rule["record"]] = out
            recorded.add(rule["record"])
    return found


def test_every_metric_and_label_the_rules_read_exists() -> None:
    assert problems(rules()) == []
    # and they read the proxy's metrics, windows_exporter's and up (the checker saw them all)
    names = {sel.name for rule in rules() for sel in selectors(rule["expr"])}
    assert {"up", "windows_exporter_collector_success", "windows_metrics_proxy_client_aborts_total"} <= names


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('windows_exporter_collector_sucess{job="windows-exporter"} == 0', "no metric"),
        ('windows_metrics_proxy_client_aborts_total{reasn="fell_behind"}', "has no label reasn"),
        ('windows_metrics_proxy_client_aborts_total{reason=~"upstream_broken|stopped"}', "never has"),
        ('sum by (node, outcom) (windows_metrics_proxy_upstream_requests_total{job="x"})', "groups by"),
        ('up{job="windows-exporter", collector="cpu"}', "has no label collector"),
    ],
)
def test_the_existence_check_catches_mistakes(expr: str, problem: str) -> None:
    found = problems([{"alert": "Broken", "expr": expr}])
    assert any(problem in p for p in found), found


def test_the_tokenizer_reads_every_construct_the_rules_use() -> None:
    parsed = parse(
        'sum by (job, le) (rate(a_bucket{x="1", y=~"b|c"}[5m])) / on (job) group_left(z) '
        "histogram_quantile(0.9, b) > 0.8 unless c offset 5m"
    )
    assert [s.name for s in parsed.selectors] == ["a_bucket", "b", "c"]
    assert parsed.selectors[0].labels == {"x": ("=", "1"), "y": ("=~", "b|c")}
    assert parsed.grouping == {"job", "le", "z"}


def monitor_jobs(path: Path, endpoints_key: str) -> dict[str, str]:
    monitor = yaml.safe_load(path.read_text())
    return {
        endpoint["path"]: next(r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job")
        for endpoint in monitor["spec"][endpoints_key]
    }


def test_selectors_take_the_job_labels_the_monitors_set() -> None:
    components = MANIFESTS / "components"
    for path, key in (
        (components / "servicemonitor" / "servicemonitor.yaml", "endpoints"),
        (components / "podmonitor" / "podmonitor.yaml", "podMetricsEndpoints"),
        (components / "azure-monitor" / "podmonitor.yaml", "podMetricsEndpoints"),
    ):
        assert monitor_jobs(path, key) == {"/metrics": NODE_JOB, "/proxy/metrics": SELF_JOB}, path
    records_ = {rule["record"] for rule in records()}
    for rule in rules():
        for sel in selectors(rule["expr"]):
            if sel.name in records_:
                continue  # a record keeps the job of the series it was made from
            job = sel.labels.get("job")
            assert job is not None, (rule.get("alert") or rule.get("record"), sel)
            assert job[0] == "=", sel
            if sel.name.startswith("windows_metrics_proxy_"):
                assert job[1] == SELF_JOB, sel
            elif sel.name.startswith("windows_"):
                assert job[1] == NODE_JOB, sel
            else:
                assert job[1] in (NODE_JOB, SELF_JOB), sel


def test_the_runbooks_job_substitution_reaches_every_selector() -> None:
    """docs/runbook.md changes the jobs with one `sed` of `job="..."`: no other spelling may hide."""
    runbook = RUNBOOK.read_text()
    for job in (NODE_JOB, SELF_JOB):
        assert f's/job="{job}"/' in runbook
        exprs = "\n".join(rule["expr"] for rule in rules())
        assert exprs.count(job) == exprs.count(f'job="{job}"') > 0, job
