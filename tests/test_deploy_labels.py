"""What the manifests promise about kinds, namespaces, uninstalling and the monitors' labels.

- The base renders only core kinds (no CRD kind, no Namespace), so it applies on any cluster.
- Each monitor component validates: prometheus-operator's models for monitoring.coreos.com, the
  CRD's openAPIV3Schema for Azure Monitor's azmonitoring.coreos.com PodMonitor.
- Uninstalling from a shared namespace: the rendered list (what `kubectl delete -k` deletes) holds no
  Namespace and only objects labelled as this project's.
- Every monitor sets instance = the node's name and job = windows-exporter, and the docs' patch to
  change the job works. The relabelings are applied here by a small evaluator of the one rule shape
  they use (`replace` with the default regex), which a test keeps honest, and by a real Prometheus
  (e2e; a file_sd label stands in for the Kubernetes SD's meta label).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from tests.conftest import LOOPBACK, require_module
from tests.test_deploy_manifests import (
    AZMONITORING,
    MONITORING,
    NAME,
    OVERLAYS,
    ROOT,
    endpoints,
    kustomize,
    monitors,
    one,
    render_with,
    rendered,
    validate_monitor,
    write_kustomization,
)
from tests.test_e2e_prometheus import running_prometheus

CORE_API_VERSIONS = {"v1", "apps/v1"}
MONITOR_COMPONENTS = {
    "servicemonitor": (MONITORING, "ServiceMonitor"),
    "podmonitor": (MONITORING, "PodMonitor"),
    "azure-monitor": (AZMONITORING, "PodMonitor"),
}
PROJECT_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}
NODE = "akswin000003"


def render(work: Path) -> list[dict[str, Any]]:
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- The base: core kinds only --------------------------------------------------------------------


def test_the_base_has_only_core_kinds_and_no_namespace() -> None:
    objects = rendered("base")
    assert sorted((o["apiVersion"], o["kind"]) for o in objects) == [
        ("apps/v1", "DaemonSet"),
        ("v1", "Service"),
    ]
    assert {o["apiVersion"] for o in objects} <= CORE_API_VERSIONS
    # and no `namespace:` of its own: the user's kustomization says where
    assert all("namespace" not in o["metadata"] for o in objects)


# --- Each monitor component, validated ------------------------------------------------------------


@pytest.mark.parametrize("component", list(MONITOR_COMPONENTS))
def test_each_monitor_component_adds_one_valid_monitor(component: str, tmp_path: Path) -> None:
    objects = render_with(tmp_path, [component])
    (monitor,) = monitors(objects)
    assert (monitor["apiVersion"], monitor["kind"]) == MONITOR_COMPONENTS[component]
    validate_monitor(monitor)
    # nothing else beyond the base and the namespace
    assert sorted(o["kind"] for o in objects if o is not monitor) == ["DaemonSet", "Namespace", "Service"]


AZ_BREAKAGES = {
    "typo": lambda pm: pm["spec"]["podMetricsEndpoints"][0].__setitem__("scrapeTimout", "20s"),
    "bad-duration": lambda pm: pm["spec"]["podMetricsEndpoints"][0].__setitem__("interval", "30 seconds"),
    "bad-action": lambda pm: pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0].__setitem__(
        "action", "rename"
    ),
    "port-number": lambda pm: pm["spec"]["podMetricsEndpoints"][0].__setitem__("port", 9100),
    "no-selector": lambda pm: pm["spec"].pop("selector"),
}


@pytest.mark.parametrize("breakage", list(AZ_BREAKAGES))
def test_a_broken_azure_monitor_podmonitor_fails_the_crd_schema(breakage: str) -> None:
    jsonschema = require_module("jsonschema", "pip install jsonschema")
    monitor = copy.deepcopy(one(rendered("azure-monitor"), "PodMonitor"))
    validate_monitor(monitor)
    AZ_BREAKAGES[breakage](monitor)
    with pytest.raises(jsonschema.ValidationError):
        validate_monitor(monitor)


# --- Namespaces and uninstalling ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_labelled_as_this_projects(overlay: str) -> None:
    for obj in rendered(overlay):
        labels = obj["metadata"].get("labels", {})
        assert PROJECT_LABELS.items() <= labels.items(), f"{obj['kind']}/{obj['metadata']['name']}: {labels}"


def test_the_relabel_components_configmap_is_labelled_too(tmp_path: Path) -> None:
    objects = render_with(tmp_path, ["servicemonitor", "relabel"])
    assert PROJECT_LABELS.items() <= one(objects, "ConfigMap")["metadata"]["labels"].items()


def test_uninstalling_from_a_shared_namespace_removes_only_this_projects_objects() -> None:
    # `kubectl delete -k overlays/shared-namespace` deletes exactly what this renders
    objects = rendered("shared-namespace")
    assert [o for o in objects if o["kind"] == "Namespace"] == []
    assert {o["metadata"]["namespace"] for o in objects} == {"monitoring"}
    assert sorted(o["kind"] for o in objects) == ["DaemonSet", "Service", "ServiceMonitor"]
    for obj in objects:
        assert obj["metadata"]["name"] == NAME
        assert PROJECT_LABELS.items() <= obj["metadata"]["labels"].items()


def test_a_user_kustomization_into_a_shared_namespace_has_no_namespace_object(tmp_path: Path) -> None:
    # what docs/deploy-aks.md tells a shared-namespace user to write: the base and a monitor, no
    # namespace component
    work = tmp_path / "shared"
    work.mkdir()
    write_kustomization(work, ["base"], ["servicemonitor", "aks-builtin-exporter", "relabel"])
    text = (work / "kustomization.yaml").read_text().replace(f"namespace: {NAME}", "namespace: kube-system")
    (work / "kustomization.yaml").write_text(text)
    objects = render(work)
    assert "Namespace" not in [o["kind"] for o in objects]
    assert {o["metadata"]["namespace"] for o in objects} == {"kube-system"}
    for obj in objects:
        assert PROJECT_LABELS.items() <= obj["metadata"]["labels"].items()


def test_why_the_namespace_component_is_only_for_a_namespace_of_its_own(tmp_path: Path) -> None:
    # kustomize renames the Namespace to the kustomization's namespace and keeps its labels: with a
    # shared namespace, the component would take over that namespace (the docs warn about this)
    work = tmp_path / "hazard"
    work.mkdir()
    write_kustomization(work, ["base"], ["namespace"])
    text = (work / "kustomization.yaml").read_text().replace(f"namespace: {NAME}", "namespace: monitoring")
    (work / "kustomization.yaml").write_text(text)
    namespace = one(render(work), "Namespace")
    assert namespace["metadata"]["name"] == "monitoring"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    docs = (ROOT / "docs" / "deploy-aks.md").read_text()
    assert "Only for a namespace of its own" in docs


# --- instance and job -----------------------------------------------------------------------------


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus relabeling, for the only shape the monitors use: `replace` with the default regex
    (.*), separator and replacement ($1), so the target label gets the joined source labels or the
    literal replacement."""
    out = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace", rule
        assert set(rule) <= {"sourceLabels", "targetLabel", "replacement", "action"}, rule
        value = ";".join(out.get(s, "") for s in rule.get("sourceLabels", []))
        replacement = rule.get("replacement", "$1")
        out[rule["targetLabel"]] = re.sub(r"\$1|\$\{1\}", value, replacement)
    return out


def test_the_relabel_evaluator_follows_prometheus() -> None:
    rules = [
        {"sourceLabels": ["a", "b"], "targetLabel": "c", "action": "replace"},
        {"targetLabel": "job", "replacement": "x"},
    ]
    assert relabel(rules, {"a": "1", "b": "2", "job": "j"}) == {"a": "1", "b": "2", "c": "1;2", "job": "x"}
    with pytest.raises(AssertionError):
        relabel([{"sourceLabels": ["a"], "targetLabel": "c", "regex": "(.)"}], {"a": "1"})


def discovered(component: str) -> dict[str, str]:
    """The labels a target of that monitor has after service discovery, before relabeling."""
    job = "podMonitor" if MONITOR_COMPONENTS[component][1] == "PodMonitor" else "serviceMonitor"
    return {
        "__address__": "10.244.3.17:9100",  # instance would default to this after relabeling
        "job": f"{job}/{NAME}/{NAME}/0",
        "__meta_kubernetes_pod_node_name": NODE,
    }


@pytest.mark.parametrize("component", list(MONITOR_COMPONENTS))
def test_monitors_set_instance_to_the_node_and_job_to_windows_exporter(
    component: str, tmp_path: Path
) -> None:
    (monitor,) = monitors(render_with(tmp_path, [component]))
    exporter, own = endpoints(monitor)
    labels = relabel(exporter["relabelings"], discovered(component))
    assert (labels["instance"], labels["job"], labels["node"]) == (NODE, "windows-exporter", NODE)
    labels = relabel(own["relabelings"], discovered(component))
    assert (labels["instance"], labels["job"], labels["node"]) == (NODE, "windows-metrics-proxy-self", NODE)
    # jobLabel cannot set a literal job: the relabelings do it
    assert "jobLabel" not in monitor["spec"]


def docs_job_patch() -> str:
    guide = (ROOT / "docs" / "deploy-aks.md").read_text()
    (block,) = [
        b for b in re.findall(r"```yaml\n(.*?)```", guide, re.DOTALL) if "kubernetes-windows-exporter" in b
    ]
    return block


def test_the_docs_patch_changes_the_job(tmp_path: Path) -> None:
    work = tmp_path / "mixin"
    work.mkdir()
    write_kustomization(work, ["base"], ["namespace", "servicemonitor"], docs_job_patch())
    (monitor,) = monitors(render(work))
    validate_monitor(monitor)
    exporter, own = endpoints(monitor)
    labels = relabel(exporter["relabelings"], discovered("servicemonitor"))
    assert (labels["instance"], labels["job"]) == (NODE, "kubernetes-windows-exporter")
    assert relabel(own["relabelings"], discovered("servicemonitor"))["job"] == "windows-metrics-proxy-self"


def test_the_docs_patch_fails_loudly_if_the_relabelings_move(tmp_path: Path) -> None:
    work = tmp_path / "moved"
    work.mkdir()
    patch = docs_job_patch().replace("relabelings/2", "relabelings/0")
    write_kustomization(work, ["base"], ["namespace", "servicemonitor"], patch)
    result = kustomize(work)
    assert result.returncode != 0


# --- The same relabelings in a real Prometheus ----------------------------------------------------


def snake_case(rule: dict[str, Any]) -> dict[str, Any]:
    """A monitor's relabeling (camelCase) as a Prometheus relabel_config (snake_case)."""
    return {re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), key): value for key, value in rule.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("component", list(MONITOR_COMPONENTS))
async def test_a_real_prometheus_applies_the_monitors_relabelings(
    component: str, tmp_path: Path, proxy: TestClient
) -> None:
    # No Kubernetes here, so no kubernetes_sd: a file_sd target carries the label
    # __meta_kubernetes_pod_node_name itself, standing in for the one Kubernetes SD would discover.
    # Like any `__` label it exists only during relabeling. The monitor's relabelings are copied
    # into relabel_configs unchanged apart from camelCase -> snake_case (what the operator does).
    (monitor,) = monitors(render_with(tmp_path, [component]))
    exporter, own = endpoints(monitor)
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps(
            [
                {
                    "targets": [f"{LOOPBACK}:{proxy.server.port}"],
                    "labels": {"__meta_kubernetes_pod_node_name": NODE},
                }
            ]
        )
    )
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "800ms", "evaluation_interval": "1m"},
        "scrape_configs": [
            {
                "job_name": name,
                "metrics_path": endpoint["path"],
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
                "relabel_configs": [snake_case(r) for r in endpoint["relabelings"]],
            }
            for name, endpoint in (("exporter-endpoint", exporter), ("proxy-endpoint", own))
        ],
    }
    async with running_prometheus(tmp_path, yaml.safe_dump(config)) as prometheus:
        await prometheus.wait_up("windows-exporter", 1)
        await prometheus.wait_up("windows-metrics-proxy-self", 1)
        (up,) = await prometheus.query('up{job="windows-exporter"}')
        assert up["metric"] == {"__name__": "up", "instance": NODE, "job": "windows-exporter", "node": NODE}
        (up,) = await prometheus.query('up{job="windows-metrics-proxy-self"}')
        assert up["metric"] == {
            "__name__": "up",
            "instance": NODE,
            "job": "windows-metrics-proxy-self",
            "node": NODE,
        }
        # the node's series carry the same target labels, and no job or instance of the scrape config
        samples = await prometheus.query('{__name__=~"windows_.+", job="windows-exporter"}')
        assert samples
        assert {(s["metric"]["instance"], s["metric"]["node"]) for s in samples} == {(NODE, NODE)}
        assert await prometheus.query('{job=~"exporter-endpoint|proxy-endpoint"}') == []
        assert await prometheus.query(f'{{instance="{LOOPBACK}:{proxy.server.port}"}}') == []
