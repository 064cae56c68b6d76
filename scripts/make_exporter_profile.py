"""Generate the fake exporter's windows_exporter 0.31 profile (proxy/data/windows_exporter-0.31-profile.prom).

The 0.20.0 capture the fake serves by default shows names that current nodes no longer have
(windows_cs_*, the memory series of windows_os_*), so this writes an exposition with 0.31 names
and labels. There is no public capture of a 0.31 node to keep byte for byte, so the body is
generated from a committed list of families (proxy/data/windows_exporter-0.31-families.json)
and fixed, plausible values for one small node: deterministic, so the data file only changes
when this script does.

    python scripts/make_exporter_profile.py                  # the .prom from the committed list
    python scripts/make_exporter_profile.py --mirror GITDIR  # first rebuild the list from the docs

`--mirror` reads a bare git clone of prometheus-community/windows_exporter at TAG: the metric
tables of docs/collector.<name>.md give the names and types served (only documented families are
served); the collector's Go source gives the HELP text and label names where it declares them
plainly, and overrides a documented type or label list it contradicts (the docs lag the code).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

TAG = "v0.31.8"
VERSION = TAG.removeprefix("v")
COLLECTORS = ("cpu", "memory", "logical_disk", "physical_disk", "net", "os", "service", "system", "container")
DATA = Path(__file__).resolve().parent.parent / "proxy" / "data"
FAMILIES_JSON = DATA / "windows_exporter-0.31-families.json"
PROFILE = DATA / "windows_exporter-0.31-profile.prom"
# Documented families the profile leaves out, and why (kept in the JSON so tests can see it).
OMITTED = {
    "windows_logical_disk_bitlocker_status": "only reported when a BitLocker query answers for a volume",
}
# Documented names the code at TAG serves under another name: the profile serves the code's.
RENAMED_IN_CODE = {"windows_system_process_limit": "windows_system_processes_limit"}
# Declarations _DESC cannot read (a raw-string HELP, constant labels), copied as facts from TAG.
CODE_FACTS: dict[str, dict[str, Any]] = {
    "windows_os_info": {
        "help": 'Contains full product name & version in labels. Note that the "major_version" for '
        'Windows 11 is \\"10\\"; a build number greater than 22000 represents Windows 11.',
        "labels": ["product", "version", "major_version", "minor_version", "build_number", "revision"],
        "type": "gauge",
        "file": "internal/collector/os/os.go",
    },
}

# The exporter's own series (pkg/collector/collection.go and collect.go at TAG; build_info comes
# from client_golang's version collector). All gauges.
SELF_FAMILIES: list[dict[str, Any]] = [
    {
        "name": "windows_exporter_build_info",
        "type": "gauge",
        "help": "A metric with a constant '1' value labeled by version, revision, branch, goversion "
        "from which windows_exporter was built, and the goos and goarch for the build.",
        "labels": ["branch", "goarch", "goos", "goversion", "revision", "tags", "version"],
        "collector": None,
        "source": "prometheus/client_golang collectors/version (registered in cmd/windows_exporter)",
    },
    {
        "name": "windows_exporter_collector_duration_seconds",
        "type": "gauge",
        "help": "windows_exporter: Duration of a collection.",
        "labels": ["collector"],
        "collector": None,
        "source": "pkg/collector/collection.go",
    },
    {
        "name": "windows_exporter_collector_success",
        "type": "gauge",
        "help": "windows_exporter: Whether the collector was successful.",
        "labels": ["collector"],
        "collector": None,
        "source": "pkg/collector/collection.go",
    },
    {
        "name": "windows_exporter_collector_timeout",
        "type": "gauge",
        "help": "windows_exporter: Whether the collector timed out.",
        "labels": ["collector"],
        "collector": None,
        "source": "pkg/collector/collection.go",
    },
    {
        "name": "windows_exporter_scrape_duration_seconds",
        "type": "gauge",
        "help": "windows_exporter: Total scrape duration.",
        "labels": [],
        "collector": None,
        "source": "pkg/collector/collection.go",
    },
]


# --- reading the mirror (facts only: names, types, help, labels) ---------------------------------


def _git(mirror: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(mirror), *args], check=True, capture_output=True, text=True
    ).stdout


def _doc_text(cell: str) -> str:
    """A docs table cell as plain text: markdown links and code marks dropped, `\\\\` unescaped."""
    cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell.strip())
    return cell.replace("`", "").replace("\\\\", "\\").strip()


def _documented(mirror: Path, collector: str) -> list[dict[str, Any]]:
    path = f"docs/collector.{collector}.md"
    families = []
    for line in _git(mirror, "show", f"{TAG}:{path}").splitlines():
        cells = line.split("|")
        if len(cells) < 6 or not cells[1].strip().strip("`").startswith("windows_"):
            continue
        labels = [x.strip().strip("`") for x in cells[4].split(",")]
        families.append(
            {
                "name": cells[1].strip().strip("`"),
                "type": cells[3].strip().lower(),
                "help": _doc_text(cells[2]),
                "labels": [x for x in labels if x and x.lower() != "none"],
                "collector": collector,
                "source": path,
            }
        )
    return families


_DESC = re.compile(
    r"c\.(\w+)\s*=\s*prometheus\.NewDesc\(\s*prometheus\.BuildFQName\(types\.Namespace,\s*Name,\s*"
    r'"([^"]+)"\),\s*"((?:[^"\\]|\\.)*)",\s*(nil|\[\]string\{([^}]*)\})'
)
_METRIC = re.compile(r"MustNewConstMetric\(\s*c\.(\w+),\s*prometheus\.(Gauge|Counter)Value")


def _declared(mirror: Path, collector: str) -> dict[str, dict[str, Any]]:
    """What the collector's Go source declares plainly: name -> help, labels, type, file."""
    folder = f"internal/collector/{collector}"
    found: dict[str, dict[str, Any]] = {}
    for file in _git(mirror, "ls-tree", "--name-only", f"{TAG}:{folder}/").split():
        if not file.endswith(".go") or file.endswith("_test.go"):
            continue
        source = _git(mirror, "show", f"{TAG}:{folder}/{file}")
        types = {m[1]: m[2].lower() for m in _METRIC.finditer(source)}
        for m in _DESC.finditer(source):
            labels = [x.strip().strip('"') for x in (m[5] or "").split(",") if x.strip()]
            found[f"windows_{collector}_{m[2]}"] = {
                "help": m[3].replace('\\"', '"'),
                "labels": labels,
                "type": types.get(m[1]),
                "file": f"{folder}/{file}",
            }
    return found


def families_from_mirror(mirror: Path) -> dict[str, Any]:
    families: list[dict[str, Any]] = []
    for collector in COLLECTORS:
        declared = _declared(mirror, collector)
        for family in _documented(mirror, collector):
            if family["name"] in RENAMED_IN_CODE:
                family["documented_as"] = family["name"]
                family["name"] = RENAMED_IN_CODE[family["name"]]
            code = declared.get(family["name"]) or CODE_FACTS.get(family["name"])
            if code is not None:
                family["help"] = code["help"]
                family["labels"] = code["labels"]
                family["type"] = code["type"] or family["type"]
                family["source"] += f" + {code['file']}"
            families.append(family)
    return {
        "tag": TAG,
        "repository": "https://github.com/prometheus-community/windows_exporter",
        "collectors": list(COLLECTORS),
        "omitted": OMITTED,
        "families": families + SELF_FAMILIES,
    }


# --- rendering ---------------------------------------------------------------------------------------


def go_float(value: float) -> str:
    """A value as client_golang writes it: strconv.FormatFloat(v, 'g', -1, 64), so 1e+06 and up
    (and below 1e-4) in exponent form, like every real exporter's body."""
    if value == 0:
        return "0"
    digits_text = repr(float(value))
    sign, digits, exponent = Decimal(digits_text).normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = "".join(map(str, digits))
    point = len(mantissa) + exponent  # digits before the decimal point
    exp = point - 1
    prefix = "-" if sign else ""
    if exp < -4 or exp >= 6:
        tail = f".{mantissa[1:]}" if len(mantissa) > 1 else ""
        return f"{prefix}{mantissa[0]}{tail}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{mantissa}"
    if point >= len(mantissa):
        return f"{prefix}{mantissa}{'0' * (point - len(mantissa))}"
    return f"{prefix}{mantissa[:point]}.{mantissa[point:]}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


GIB = 1024**3
BOOT = 1767225600  # 2026-01-01T00:00:00Z
UPTIME = 86400 * 3
CORES = [f"0,{n}" for n in range(4)]
VOLUMES = {
    "C:": (127 * GIB, 88 * GIB, "Windows", "0"),
    "D:": (256 * GIB, 241 * GIB, "Temporary Storage", "1"),
}
DISKS = ["0 C:", "1 D:"]
NIC = "Microsoft_Hyper-V_Network_Adapter"
# name -> (state, start mode, display name, path, run as)
SERVICES = {
    "containerd": (
        "running",
        "auto",
        "containerd",
        "C:\\Program Files\\containerd\\containerd.exe",
        "LocalSystem",
    ),
    "Dhcp": (
        "running",
        "auto",
        "DHCP Client",
        "C:\\Windows\\system32\\svchost.exe -k LocalServiceNetworkRestricted -p",
        "NT Authority\\LocalService",
    ),
    "Dnscache": (
        "running",
        "auto",
        "DNS Client",
        "C:\\Windows\\system32\\svchost.exe -k NetworkService -p",
        "NT AUTHORITY\\NetworkService",
    ),
    "kubelet": ("running", "auto", "kubelet", "C:\\k\\kubelet.exe", "LocalSystem"),
    "kubeproxy": ("running", "auto", "kubeproxy", "C:\\k\\kube-proxy.exe", "LocalSystem"),
    "Spooler": ("stopped", "disabled", "Print Spooler", "C:\\Windows\\System32\\spoolsv.exe", "LocalSystem"),
    "W32Time": (
        "running",
        "manual",
        "Windows Time",
        "C:\\Windows\\system32\\svchost.exe -k LocalService",
        "NT AUTHORITY\\LocalService",
    ),
    "windows_exporter": (
        "running",
        "auto",
        "windows_exporter",
        '"C:\\Program Files\\windows_exporter\\windows_exporter.exe"',
        "LocalSystem",
    ),
    "WinRM": (
        "running",
        "auto",
        "Windows Remote Management (WS-Management)",
        "C:\\Windows\\System32\\svchost.exe -k NetworkService -p",
        "NT AUTHORITY\\NetworkService",
    ),
    "wuauserv": (
        "stop pending",
        "manual",
        "Windows Update",
        "C:\\Windows\\system32\\svchost.exe -k netsvcs -p",
        "LocalSystem",
    ),
}
SERVICE_STATES = [
    "continue pending",
    "pause pending",
    "paused",
    "running",
    "start pending",
    "stop pending",
    "stopped",
]
START_MODES = ["auto", "boot", "disabled", "manual", "system"]
CONTAINERS = [
    ("kube-system", "csi-azuredisk-node-win-7xk2p", "azuredisk"),
    ("default", "web-5d8c7b6f9d-q4wzt", "web"),
]
OPER_STATUS = ["down", "dormant", "lower layer down", "not present", "testing", "unknown", "up"]


def _series(family: dict[str, Any], collectors: list[str]) -> list[tuple[dict[str, str], float]]:
    """Each family's label sets and values: fixed facts first, a seeded draw for plain counters."""
    name, labels = family["name"], family["labels"]
    rng = random.Random(name)  # str seeds are hashed with SHA-512: the same draw on every run

    def amount() -> float:
        if name.endswith("_seconds_total"):
            return round(rng.uniform(10, UPTIME), 6)
        if name.endswith("_bytes_total"):
            return float(rng.randrange(10**8, 10**11))
        if family["type"] == "counter":
            return float(rng.randrange(10**3, 10**8))
        if name.endswith("_bytes"):
            return float(rng.randrange(1, 512) * 2**20)
        return float(rng.randrange(0, 50))

    fixed: dict[str, float] = {
        "windows_cpu_logical_processor": 4,
        "windows_memory_physical_total_bytes": 16 * GIB,
        "windows_memory_physical_free_bytes": 9.25 * GIB,
        "windows_memory_available_bytes": 9.5 * GIB,
        "windows_memory_commit_limit": 20 * GIB,
        "windows_memory_committed_bytes": 7.75 * GIB,
        "windows_memory_process_memory_limit_bytes": 128 * 2**40,
        "windows_memory_free_system_page_table_entries": 12283765,
        "windows_system_boot_time_timestamp": BOOT,
        "windows_system_processes": 131,
        "windows_system_processes_limit": 4294967295,
        "windows_system_process_limit": 4294967295,
        "windows_system_threads": 1874,
        "windows_system_processor_queue_length": 0,
        "windows_net_current_bandwidth_bytes": 5e9,
        "windows_net_output_queue_length_packets": 0,
        "windows_container_count": len(CONTAINERS),
        "windows_exporter_scrape_duration_seconds": 0.1983465,
    }
    if name == "windows_exporter_build_info":
        return [
            (
                {
                    "branch": "HEAD",
                    "goarch": "amd64",
                    "goos": "windows",
                    "goversion": "go1.25.0",
                    "revision": "c73b596c0ebb4088bb9b9422a26903f8a35cec86",
                    "tags": "unknown",
                    "version": VERSION,
                },
                1,
            )
        ]
    if name.startswith("windows_exporter_collector_"):
        value = {"success": 1.0, "timeout": 0.0}.get(name.rsplit("_", 1)[1])
        return [
            ({"collector": c}, value if value is not None else round(rng.uniform(0.0005, 0.18), 7))
            for c in collectors
        ]
    if not labels:
        return [({}, float(fixed.get(name, amount())))]
    if name == "windows_cpu_time_total":
        share = {"dpc": 0.002, "idle": 0.86, "interrupt": 0.004, "privileged": 0.05, "user": 0.084}
        return [
            ({"core": c, "mode": m}, round(UPTIME * s * rng.uniform(0.9, 1.1), 6))
            for c in CORES
            for m, s in share.items()
        ]
    if name == "windows_cpu_cstate_seconds_total":
        return [({"core": c, "state": s}, amount()) for c in CORES for s in ("c1", "c2", "c3")]
    if labels == ["core"]:
        special = {"windows_cpu_parking_status": 0.0, "windows_cpu_core_frequency_mhz": 2594.0}
        return [({"core": c}, special.get(name, amount())) for c in CORES]
    if name == "windows_logical_disk_info":
        return [
            (
                {
                    "disk": disk,
                    "filesystem": "NTFS",
                    "serial_number": f"{0x6A2E1F30 + int(disk):08X}",
                    "type": "fixed",
                    "volume": volume,
                    "volume_name": label,
                },
                1,
            )
            for volume, (_, _, label, disk) in VOLUMES.items()
        ]
    if labels == ["volume"]:
        rows = []
        for volume, (size, free, _, _) in VOLUMES.items():
            special = {
                "windows_logical_disk_size_bytes": size,
                "windows_logical_disk_free_bytes": free,
                "windows_logical_disk_readonly": 0,
            }
            rows.append(({"volume": volume}, float(special.get(name, amount()))))
        return rows
    if labels == ["disk"]:
        return [({"disk": d}, amount()) for d in DISKS]
    if name == "windows_net_nic_info":
        return [({"friendly_name": "Ethernet", "mac": "00:0D:3A:5B:1C:7E", "nic": NIC}, 1)]
    if name == "windows_net_nic_address_info":
        return [({"address": "10.224.0.33", "family": "ipv4", "nic": NIC}, 1)]
    if name == "windows_net_nic_operation_status":
        return [({"nic": NIC, "status": s}, float(s == "up")) for s in OPER_STATUS]
    if name == "windows_net_route_info":
        routes = [("0.0.0.0/0", "10.224.0.1", "15"), ("10.224.0.0/16", "0.0.0.0", "271")]
        return [({"dest": d, "metric": m, "nic": NIC, "src": s}, 1) for d, s, m in routes]
    if labels == ["nic"]:
        return [({"nic": NIC}, float(fixed.get(name, amount())))]
    if name == "windows_os_hostname":
        return [({"domain": "", "fqdn": "akswin000000", "hostname": "akswin000000"}, 1)]
    if name == "windows_os_info":
        info = {
            "build_number": "20348",
            "revision": "2849",
            "major_version": "10",
            "minor_version": "0",
            "product": "Windows Server 2022 Datacenter",
            "version": "10.0.20348",
        }
        return [({k: info[k] for k in labels}, 1)]
    if name == "windows_service_info":
        return [
            ({"display_name": d, "name": n, "path_name": p, "run_as": r}, 1)
            for n, (_, _, d, p, r) in SERVICES.items()
        ]
    if name == "windows_service_state":
        return [
            ({"name": n, "state": s}, float(s == v[0])) for n, v in SERVICES.items() for s in SERVICE_STATES
        ]
    if name == "windows_service_start_mode":
        return [
            ({"name": n, "start_mode": m}, float(m == v[1])) for n, v in SERVICES.items() for m in START_MODES
        ]
    if name == "windows_service_process":
        running = [n for n, v in SERVICES.items() if v[0] == "running"]
        return [
            ({"name": n, "process_id": str(1000 + 236 * i)}, BOOT + 20 + i) for i, n in enumerate(running)
        ]
    if name.startswith("windows_container_"):
        rows = []
        for index, (namespace, pod, container) in enumerate(CONTAINERS):
            base = {
                "container": container,
                "container_id": "containerd://" + random.Random(pod).randbytes(32).hex(),
                "namespace": namespace,
                "pod": pod,
            }
            if "hostprocess" in labels:
                base["hostprocess"] = "false"
            if "interface" in labels:
                base["interface"] = f"{random.Random(container).randbytes(16).hex()[:8].upper()}-EPT{index}"
            value = 1.0 if name == "windows_container_available" else amount()
            rows.append((base, value))
        return rows
    raise ValueError(f"no values for {name} with labels {labels}: add them to _series")


def render(spec: dict[str, Any]) -> str:
    """The exposition as client_golang writes it: families sorted by name, series by labels."""
    collectors = sorted(spec["collectors"])
    out = []
    omitted = set(spec["omitted"])
    for family in sorted(spec["families"], key=lambda f: f["name"]):
        if family["name"] in omitted:
            continue
        name = family["name"]
        out.append(f"# HELP {name} {_escape_help(family['help'])}\n# TYPE {name} {family['type']}\n")
        rows = _series(family, collectors)
        keyed = []
        for labels, value in rows:
            assert sorted(labels) == sorted(family["labels"]), (name, labels)
            pairs = sorted(labels.items())
            text = ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs)
            keyed.append((pairs, f"{name}{{{text}}}" if text else name, value))
        for _, series, value in sorted(keyed, key=lambda row: row[0]):
            out.append(f"{series} {go_float(value)}\n")
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, help="a windows_exporter git dir: rebuild the family list")
    args = parser.parse_args()
    if args.mirror is not None:
        FAMILIES_JSON.write_text(json.dumps(families_from_mirror(args.mirror), indent=1) + "\n")
    spec = json.loads(FAMILIES_JSON.read_text())
    PROFILE.write_text(render(spec))
    print(f"wrote {PROFILE}")


if __name__ == "__main__":
    main()
