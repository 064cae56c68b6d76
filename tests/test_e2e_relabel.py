"""Relabeling checked against a real Prometheus, and the rewritten output against promtool.

1. Differential: for every rule file, one Prometheus scrapes a target twice. Job
   `prom_rules_<file>_<target>` reads the exporter's raw output and applies the rules as its own
   `metric_relabel_configs`; job `proxy_rules_<file>_<target>` reads a proxy configured with
   `relabel_config=<file>` and has no rules of its own. What Prometheus ingests from both (label
   sets minus job/instance, values, sample counts, `up`, at one instant) must be the same.
   Targets: the real windows_exporter capture (OpenMetrics, as Prometheus 2.42 negotiates it), the
   same in text 0.0.4, the fake exporter's scale=3 output, and a small exporter with awkward label
   values (non-ASCII, escapes, Go's case mapping, a rule that empties `__name__`) in both formats.
   One Prometheus runs every job at once.
2. `promtool check metrics` accepts the proxy's output wherever it accepts the input, without new
   lint problems.

Prometheus applies metric_relabel_configs after adding `job` and `instance`, so no rule here reads
or writes them, and every labelkeep keeps them (harmless for the proxy, which never sees them).

Debian's Prometheus is 2.42, which validates label names the legacy way, so every proxy here runs
with PROXY_NAME_VALIDATION=legacy: the differential compares like with like. (The UTF-8 scheme,
Prometheus 3's default, is checked against Prometheus 3's own test cases in
tests/test_relabel_prometheus3.py.)

Everything listens on 127.0.0.1 only; every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy.fake_exporter import FakeExporter
from tests.conftest import LOOPBACK, ProxyFactory, require_binary
from tests.test_e2e_prometheus import Prometheus, keyed, promtool_check, running_prometheus

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL = "1s"
SCRAPE_TIMEOUT = "900ms"
TEXT_ACCEPT = "text/plain;version=0.0.4"
NO_MSSQL = "collect[]=cpu&collect[]=memory&collect[]=os&collect[]=logical_disk&collect[]=net&collect[]=system"
# promtool 2.42 `check metrics`: 0 clean, 1 parse error, 3 lint problems only.
PROMTOOL_LINT_ONLY = 3
SYNTHETIC_PREFIX = "scrape_"
# Prometheus 2.42's name validation, which the proxy must use to be compared with it.
NAME_VALIDATION = "legacy"

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class RuleFile:
    """A rule file, plus label subsets that must (and must not) be in what Prometheus ingests.

    The probes are checked on Prometheus's own result, so they prove the rules do what this test
    means them to do (a differential test of rules that change nothing would prove little).
    """

    name: str
    yaml: str
    present: tuple[dict[str, str], ...] = ()
    absent: tuple[dict[str, str], ...] = ()
    # Lint lines `promtool check metrics` may report on the proxy's output beyond the input's.
    lint_allowed: tuple[str, ...] = ()
    # Prometheus fails the whole scrape under these rules (and so must the proxy's output).
    scrape_fails: bool = False


NODE_KEEP = RuleFile(
    "node_keep",
    r"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: "windows_cpu_time_total|windows_logical_disk_free_bytes|windows_logical_disk_size_bytes|\
      windows_memory_.*|windows_net_bytes_received_total|windows_net_bytes_sent_total|\
      windows_os_.*|windows_system_.*"
    action: keep
""",
    present=(
        {"__name__": "windows_cpu_time_total", "core": "0,3", "mode": "idle"},
        {"__name__": "windows_os_info"},
        {"__name__": "windows_memory_available_bytes"},
        {"__name__": "windows_system_threads"},
    ),
    absent=(
        {"__name__": "windows_cpu_cstate_seconds_total"},
        {"__name__": "windows_logical_disk_read_bytes_total"},
        {"__name__": "windows_net_bytes_total"},
        {"__name__": "go_threads"},
    ),
)

# Drop windows_service_* except windows_service_state{state="running"}: mark the survivor with a
# temporary label, drop the service series without it, then drop the label.
SERVICES = RuleFile(
    "services",
    r"""
metric_relabel_configs:
  - source_labels: [__name__, state]
    regex: windows_service_state;running
    target_label: keep_service
    replacement: "yes"
  - source_labels: [__name__, keep_service]
    regex: windows_service_.+;
    action: drop
  - regex: keep_service
    action: labeldrop
  - source_labels: [__name__]
    regex: go_.*|process_.*
    action: drop
""",
    present=(
        {"__name__": "windows_service_state", "name": "dhcp", "state": "running"},
        {"__name__": "windows_cpu_time_total"},
        {"__name__": "windows_mssql_locks_count"},
    ),
    absent=(
        {"__name__": "windows_service_state", "state": "stopped"},
        {"__name__": "windows_service_info"},
        {"__name__": "windows_service_status"},
        {"keep_service": "yes"},
        {"__name__": "go_threads"},
        {"__name__": "process_open_fds"},
    ),
)

# replace: $1, ${1}, a named group, a templated target_label, a label from no source labels, a
# replacement that expands to nothing (deletes the target), Go's `$1_x` (a group named "1_x", so
# empty), `$$`, a join with a custom separator, __name__ renamed windows_* -> win_*, and part of a
# family (the idle mode of windows_cpu_time_total) renamed on its own. The proxy documents that a
# family whose samples do not all move the same way loses its HELP/TYPE (its samples go untyped).
RENAME = RuleFile(
    "rename",
    r"""
metric_relabel_configs:
  - source_labels: [core]
    regex: (\d+),(\d+)
    target_label: socket
    replacement: $1
  - source_labels: [core]
    regex: (\d+),(\d+)
    target_label: cpu
    replacement: ${2}
  - source_labels: [volume]
    regex: "(?P<letter>[A-Z]):"
    target_label: drive
    replacement: ${letter}-drive
  - source_labels: [mode]
    regex: (idle|user)
    target_label: is_$1
    replacement: "true"
  - source_labels: [__name__, mode]
    regex: windows_cpu_time_total;idle
    target_label: __name__
    replacement: windows_cpu_idle_seconds_total
  - target_label: env
    replacement: test
  - source_labels: [__name__]
    regex: windows_os_timezone
    target_label: timezone
    replacement: ""
  - source_labels: [nic]
    regex: ([^_]+)_.*
    target_label: nic_vendor
    replacement: ${1}_vendor
  - source_labels: [nic]
    regex: ([^_]+)_.*
    target_label: nic
    replacement: $1_vendor
  - source_labels: [__name__]
    regex: windows_(.*)
    target_label: __name__
    replacement: win_$1
  - source_labels: [__name__, core, mode]
    separator: /
    regex: win_cpu_time_total/(.*)
    target_label: core_mode
    replacement: $$$1
""",
    present=(
        {
            "__name__": "win_cpu_time_total",
            "core": "0,3",
            "socket": "0",
            "cpu": "3",
            "mode": "user",
            "is_user": "true",
            "env": "test",
            "core_mode": "$0,3/user",
        },
        {"__name__": "win_cpu_idle_seconds_total", "core": "0,1", "mode": "idle", "is_idle": "true"},
        {"__name__": "win_logical_disk_free_bytes", "volume": "C:", "drive": "C-drive"},
        {"__name__": "win_os_timezone", "env": "test"},
        {"__name__": "win_net_bytes_total", "nic_vendor": "Intel_vendor"},
        {"__name__": "win_mssql_locks_count", "resource": "Xact"},
        {"__name__": "go_threads", "env": "test"},
    ),
    absent=(
        {"__name__": "windows_cpu_time_total"},
        {"__name__": "win_cpu_time_total", "mode": "idle"},
        {"__name__": "win_cpu_idle_seconds_total", "core_mode": "$0,1/idle"},
        {"__name__": "win_cpu_time_total", "mode": "dpc", "is_dpc": "true"},
        {"__name__": "win_logical_disk_free_bytes", "volume": "HarddiskVolume4", "drive": "-drive"},
        {"__name__": "win_os_timezone", "timezone": "EET"},
        {"__name__": "win_net_bytes_total", "nic": "Intel_R__PRO_1000_MT_Network_Connection"},
        {"__name__": "win_net_bytes_total", "nic": "Intel_vendor"},
    ),
    lint_allowed=("win_cpu_time_total no help text", "win_cpu_idle_seconds_total no help text"),
)

# keepequal keeps only the idle mode of windows_cpu_time_total (elsewhere both sides are empty, so
# equal, except for series with a `mode` and no `expected_mode`); dropequal drops core "0,0",
# where socket and cpu are both "0" (series without a core get socket="none" first, so survive).
EQUAL = RuleFile(
    "equal",
    r"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: windows_cpu_time_total
    target_label: expected_mode
    replacement: idle
  - source_labels: [mode]
    target_label: expected_mode
    action: keepequal
  - regex: expected_mode
    action: labeldrop
  - source_labels: [core]
    regex: (\d+),(\d+)
    target_label: socket
    replacement: $1
  - source_labels: [core]
    regex: \d+,(\d+)
    target_label: cpu
  - source_labels: [core]
    regex: ""
    target_label: socket
    replacement: none
  - source_labels: [socket]
    target_label: cpu
    action: dropequal
""",
    present=(
        {"__name__": "windows_cpu_time_total", "core": "0,1", "mode": "idle", "socket": "0", "cpu": "1"},
        {"__name__": "windows_cpu_interrupts_total", "core": "0,3"},
        {"__name__": "windows_os_info", "socket": "none"},
    ),
    absent=(
        {"__name__": "windows_cpu_time_total", "mode": "user"},
        {"__name__": "windows_cpu_time_total", "core": "0,0"},
        {"__name__": "windows_cpu_interrupts_total", "core": "0,0"},
        {"__name__": "windows_process_cpu_time_total"},
        {"expected_mode": "idle"},
    ),
)

HASHMOD = RuleFile(
    "hashmod",
    r"""
metric_relabel_configs:
  - source_labels: [__name__, core, mode, volume, nic, process_id, resource, database, replica]
    separator: "|"
    modulus: 4
    target_label: shard
    action: hashmod
  - source_labels: [shard]
    regex: "[01]"
    action: keep
""",
    present=({"shard": "0"}, {"shard": "1"}),
    absent=({"shard": "2"}, {"shard": "3"}),
)

# labelmap copies core/mode to cpu_core/cpu_mode, labeldrop removes core, labelkeep keeps a list
# (with job and instance, which Prometheus has by then).
LABELS = RuleFile(
    "labels",
    r"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: windows_(cpu|logical_disk|net|os|system|memory)_.*
    action: keep
  - regex: (core|mode)
    replacement: cpu_$1
    action: labelmap
  - regex: core
    action: labeldrop
  - regex: __name__|job|instance|replica|cpu_.*|state|volume|nic
    action: labelkeep
""",
    present=(
        {"__name__": "windows_cpu_time_total", "cpu_core": "0,0", "cpu_mode": "idle"},
        {"__name__": "windows_cpu_cstate_seconds_total", "cpu_core": "0,2", "state": "c3"},
        {"__name__": "windows_logical_disk_free_bytes", "volume": "C:"},
        {"__name__": "windows_os_info"},
    ),
    absent=(
        {"mode": "idle"},
        {"core": "0,0"},
        {"__name__": "windows_os_info", "product": "Microsoft Windows 10 Pro"},
        {"__name__": "windows_os_timezone", "timezone": "EET"},
        {"__name__": "windows_service_state"},
    ),
)

# lowercase/uppercase into new and existing labels; joins with custom separators, including joins
# of labels a series lacks (an empty value joined is still the separator).
CASE = RuleFile(
    "case",
    r"""
metric_relabel_configs:
  - source_labels: [volume]
    target_label: volume_lower
    action: lowercase
  - source_labels: [product]
    target_label: product
    action: uppercase
  - source_labels: [mode, state]
    separator: "+"
    target_label: mode_state
    action: uppercase
  - source_labels: [mssql_instance, resource]
    separator: " / "
    target_label: owner
    action: lowercase
""",
    present=(
        {"__name__": "windows_logical_disk_free_bytes", "volume": "C:", "volume_lower": "c:"},
        {"__name__": "windows_logical_disk_size_bytes", "volume_lower": "harddiskvolume4"},
        {"__name__": "windows_os_info", "product": "MICROSOFT WINDOWS 10 PRO"},
        {"__name__": "windows_cpu_time_total", "mode": "idle", "mode_state": "IDLE+"},
        {"__name__": "windows_service_state", "state": "running", "mode_state": "+RUNNING"},
        {"__name__": "windows_mssql_locks_count", "owner": "sqlexpress / xact"},
        {"__name__": "go_threads", "mode_state": "+", "owner": " / "},
    ),
    absent=({"__name__": "windows_os_info", "product": "Microsoft Windows 10 Pro"},),
)

# Two families renamed into one name (a `kind` label keeps their series apart), and two into the
# name of a third, existing family. Prometheus takes the result; see test_promtool_accepts_the_output.
MERGE = RuleFile(
    "merge",
    r"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: windows_logical_disk_(free|size)_bytes
    target_label: kind
  - source_labels: [__name__]
    regex: windows_logical_disk_(?:free|size)_bytes
    target_label: __name__
    replacement: windows_logical_disk_bytes
  - source_labels: [__name__]
    regex: windows_net_bytes_(received|sent)_total
    target_label: direction
  - source_labels: [__name__]
    regex: windows_net_bytes_(?:received|sent)_total
    target_label: __name__
    replacement: windows_net_bytes_total
""",
    present=(
        {"__name__": "windows_logical_disk_bytes", "kind": "free", "volume": "C:"},
        {"__name__": "windows_logical_disk_bytes", "kind": "size", "volume": "C:"},
        {"__name__": "windows_net_bytes_total", "direction": "sent"},
        {"__name__": "windows_net_bytes_total", "direction": "received"},
    ),
    absent=(
        {"__name__": "windows_logical_disk_free_bytes"},
        {"__name__": "windows_net_bytes_sent_total"},
    ),
)

RULE_FILES = (NODE_KEEP, SERVICES, RENAME, EQUAL, HASHMOD, LABELS, CASE, MERGE)


# --- a small exporter with awkward label values, for rules whose semantics depend on them --------

EDGE_BODY = """\
# HELP edge_info Labels with awkward values.
# TYPE edge_info gauge
edge_info{display_name="Straße İzmir ﬁle",volume="ΑΣ Ωμέγα",mode="İdle",path="C:\\\\Program Files\\\\x",\
quote="say \\"hi\\"",newline="a\\nb",empty=""} 1
# HELP edge_value Odd values.
# TYPE edge_value gauge
edge_value{kind="nan"} NaN
edge_value{kind="inf"} +Inf
edge_value{kind="ninf"} -Inf
edge_value{kind="neg"} -0.5
edge_value{kind="tiny"} 4.9e-324
# HELP edge_latency_seconds A histogram.
# TYPE edge_latency_seconds histogram
edge_latency_seconds_bucket{le="0.1"} 1
edge_latency_seconds_bucket{le="+Inf"} 2
edge_latency_seconds_sum 0.3
edge_latency_seconds_count 2
# HELP edge_rpc_seconds A summary.
# TYPE edge_rpc_seconds summary
edge_rpc_seconds{quantile="0.5"} 0.2
edge_rpc_seconds_sum 1
edge_rpc_seconds_count 3
"""
EDGE_TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EDGE_OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Regexes over non-ASCII values (`.` is one character, not one byte; RE2's (?i)), a rename that makes
# the proxy re-serialize escaped label values, a value with a quote and a backslash, hashmod over
# UTF-8, and templated targets under legacy name validation: `word_Straße` is not a legacy name, so
# Prometheus 2.42 skips that replace at run time (and so must the proxy), while `kind_nan` is set.
UNICODE_REGEX = RuleFile(
    "unicode_regex",
    r"""
metric_relabel_configs:
  - source_labels: [volume]
    regex: (.)(.*)
    target_label: first
  - source_labels: [display_name]
    regex: (?i)STRASSE|straße (\S+) .*
    target_label: city
  - source_labels: [display_name]
    regex: "[^a-z ]+"
    target_label: never
    replacement: x
  - source_labels: [display_name, volume]
    modulus: 1000
    target_label: bucket
    action: hashmod
  - source_labels: [__name__]
    regex: edge_(info|value)
    target_label: __name__
    replacement: edge_${1}_renamed
  - target_label: added
    replacement: "é \" \\ "
  - source_labels: [display_name]
    regex: (\S+) .*
    target_label: word_${1}
    replacement: x
  - source_labels: [kind]
    regex: (n.*)
    target_label: kind_${1}
    replacement: "yes"
""",
    present=(
        {"__name__": "edge_info_renamed", "first": "\u0391", "city": "İzmir", "newline": "a\nb"},
        {"__name__": "edge_info_renamed", "path": "C:\\Program Files\\x", "quote": 'say "hi"'},
        {"__name__": "edge_value_renamed", "kind": "nan", "added": 'é " \\ '},
        {"__name__": "edge_latency_seconds_bucket", "le": "+Inf"},
        {"__name__": "edge_value_renamed", "kind": "neg", "kind_neg": "yes"},
    ),
    absent=({"never": "x"}, {"__name__": "edge_info"}, {"word_Straße": "x"}),
)

# A metric name Prometheus 2.42 cannot take: it fails the scrape ("invalid metric name"); the proxy
# writes a name its parser rejects, which fails the scrape as well.
BAD_NAME = RuleFile(
    "bad_name",
    r"""
metric_relabel_configs:
  - source_labels: [kind]
    regex: neg
    target_label: __name__
    replacement: edge-value
""",
    scrape_fails=True,
)

# Go's case mapping (one rune to one rune), which differs from Python's for some non-ASCII text.
UNICODE_CASE = RuleFile(
    "unicode_case",
    r"""
metric_relabel_configs:
  - source_labels: [volume]
    target_label: volume_lower
    action: lowercase
  - source_labels: [display_name]
    target_label: display_upper
    action: uppercase
  - source_labels: [mode]
    target_label: mode_lower
    action: lowercase
""",
    present=({"__name__": "edge_info", "display_upper": "STRAßE İZMIR ﬁLE", "mode_lower": "idle"},),
)
# A rule that empties __name__: Prometheus fails the whole scrape ("missing metric name"), and so
# does the proxy, by breaking its response.
NO_NAME = RuleFile(
    "no_name",
    r"""
metric_relabel_configs:
  - source_labels: [kind]
    regex: nan
    target_label: __name__
    replacement: ""
""",
    scrape_fails=True,
)


# --- targets, proxies and jobs -------------------------------------------------------------------


@web.middleware
async def text_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """Ask the fake exporter for text 0.0.4 whatever the scraper accepts (Prometheus 2.42 has no
    setting for that), so that what Prometheus ingests went through the text rewriting path."""
    headers = CIMultiDict(request.headers)
    headers["Accept"] = TEXT_ACCEPT
    return await handler(request.clone(headers=headers))


def edge_app(openmetrics: bool) -> web.Application:
    body = (EDGE_BODY + "# EOF\n" if openmetrics else EDGE_BODY).encode()
    content_type = EDGE_OPENMETRICS_TYPE if openmetrics else EDGE_TEXT_TYPE

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


@dataclass(frozen=True)
class Target:
    """An exporter Prometheus and the proxies scrape: `kind` is capture, text or edge."""

    name: str
    kind: str = "capture"
    scale: int = 1
    openmetrics: bool = True

    def app(self) -> web.Application:
        if self.kind == "edge":
            return edge_app(self.openmetrics)
        # max_concurrent=0: every job scrapes the same exporter at once, and none may get a 503.
        app = FakeExporter(scale=self.scale, max_concurrent=0).app()
        if not self.openmetrics:
            app.middlewares.append(text_only)
        return app


CAPTURE = Target("capture")  # Prometheus 2.42 negotiates OpenMetrics
CAPTURE_TEXT = Target("text", openmetrics=False)
SCALED = Target("x3", scale=3)
EDGE_TEXT = Target("edge", kind="edge", openmetrics=False)
EDGE_OPENMETRICS = Target("edge_om", kind="edge")


@dataclass
class Pair:
    rules: RuleFile
    target: Target
    prom_job: str
    proxy_job: str


@dataclass
class Harness:
    pairs: list[Pair] = field(default_factory=list)
    jobs: list[tuple[str, int, str | None]] = field(default_factory=list)


async def build(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_proxy: ProxyFactory,
    plan: list[tuple[Target, tuple[RuleFile, ...]]],
) -> Harness:
    """One exporter per target, one proxy per (target, rule file), and a job for each side."""
    harness = Harness()
    for target, rule_files in plan:
        server = await aiohttp_server(target.app(), host=LOOPBACK)
        for rules in rule_files:
            path = tmp_path / f"{rules.name}.yml"
            path.write_text(rules.yaml)
            proxy: TestClient = await make_proxy(
                port=server.port, relabel_config=path, name_validation=NAME_VALIDATION
            )
            pair = Pair(
                rules,
                target,
                prom_job=f"prom_rules_{rules.name}_{target.name}",
                proxy_job=f"proxy_rules_{rules.name}_{target.name}",
            )
            harness.pairs.append(pair)
            harness.jobs.append((pair.prom_job, server.port, rules.yaml))
            harness.jobs.append((pair.proxy_job, proxy.server.port, None))
    return harness


def prometheus_config(jobs: list[tuple[str, int, str | None]]) -> str:
    """A prometheus.yml with one static target per job, rules embedded as their file has them."""
    lines = [
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  scrape_timeout: {SCRAPE_TIMEOUT}",
        "  evaluation_interval: 1m",
        "scrape_configs:",
    ]
    for name, port, rules in jobs:
        lines += [f"  - job_name: {name}", "    static_configs:", f'      - targets: ["{LOOPBACK}:{port}"]']
        if rules is not None:
            lines += [f"    {line}" if line.strip() else "" for line in rules.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


async def settled(prometheus: Prometheus, harness: Harness) -> float:
    """An instant at which every job has been scraped and every job meant to be up is, once the
    scrapes that began before it are in.

    Prometheus starts scraping new targets only on its 5 s discovery tick, hence the 15 s bound.
    """
    jobs = len(harness.jobs)
    meant_up = [
        job
        for pair in harness.pairs
        if not pair.rules.scrape_fails
        for job in (pair.prom_job, pair.proxy_job)
    ]
    up_query = f'count(up{{job=~"{"|".join(meant_up)}"}} == 1)' if meant_up else "vector(0)"

    async def all_scraped() -> bool:
        scraped = await prometheus.scalar("count(up)")
        return scraped == jobs and await prometheus.scalar(up_query) == len(meant_up)

    await prometheus.wait_for(f"all {jobs} jobs scraped, {len(meant_up)} of them up", all_scraped, 15.0)
    at = time.time()
    await asyncio.sleep(1.0)  # a scrape that began before `at` ends within the 0.9 s timeout
    return at


async def differential(prometheus: Prometheus, harness: Harness, attempts: int = 3) -> list[str]:
    """compare() every pair at one instant. A scrape that failed where it should not have is the
    test's own load (dozens of proxies in one Python process) rather than relabeling: then try
    again at a later instant, a bounded number of times."""
    problems: list[str] = []
    for _ in range(attempts):
        at = await settled(prometheus, harness)
        problems, failed_scrapes = [], False
        for pair in harness.pairs:
            failed, found = await compare(prometheus, pair, at)
            failed_scrapes |= failed
            problems += found
        if not failed_scrapes:
            break
    return problems


# --- comparing the two jobs of a pair ------------------------------------------------------------


def is_synthetic(labels: Labels) -> bool:
    name = dict(labels).get("__name__", "")
    return name == "up" or name.startswith(SYNTHETIC_PREFIX)


def matches(labels: Labels, probe: dict[str, str]) -> bool:
    return probe.items() <= dict(labels).items()


def describe(keys: set[Labels], limit: int = 3) -> list[list[tuple[str, str]]]:
    return [sorted(k) for k in sorted(keys, key=sorted)[:limit]]


async def compare(prometheus: Prometheus, pair: Pair, at: float) -> tuple[bool, list[str]]:
    """What differs between the two jobs of a pair at one instant, as readable lines; and whether
    a scrape meant to succeed failed (then nothing else is compared)."""
    where = f"{pair.rules.name} on {pair.target.name}"
    direct = keyed(await prometheus.query(f'{{job="{pair.prom_job}"}}', at))
    via_proxy = keyed(await prometheus.query(f'{{job="{pair.proxy_job}"}}', at))

    def synthetic(samples: dict[Labels, str]) -> dict[str, float]:
        return {dict(k)["__name__"]: float(v) for k, v in samples.items() if is_synthetic(k)}

    prom_meta, proxy_meta = synthetic(direct), synthetic(via_proxy)
    expected_up = 0 if pair.rules.scrape_fails else 1
    ups = (prom_meta.get("up"), proxy_meta.get("up"))
    if ups != (expected_up, expected_up):
        return expected_up == 1 and 0 in ups, [
            f"{where}: up is {ups[0]} with Prometheus's rules and {ups[1]} through the proxy, "
            f"expected {expected_up} for both"
        ]
    if pair.rules.scrape_fails:
        return False, []

    prom_data = {k: v for k, v in direct.items() if not is_synthetic(k)}
    proxy_data = {k: v for k, v in via_proxy.items() if not is_synthetic(k)}
    problems: list[str] = []
    only_prom, only_proxy = prom_data.keys() - proxy_data.keys(), proxy_data.keys() - prom_data.keys()
    if only_prom or only_proxy:
        problems.append(
            f"{where}: {len(only_prom)} series only with Prometheus's rules, e.g. {describe(only_prom)}; "
            f"{len(only_proxy)} only through the proxy, e.g. {describe(only_proxy)}"
        )
    common = prom_data.keys() & proxy_data.keys()
    differing = sorted((k for k in common if prom_data[k] != proxy_data[k]), key=sorted)
    if differing:
        problems.append(
            f"{where}: {len(differing)} values differ, e.g. "
            + "; ".join(f"{sorted(k)}: {prom_data[k]} vs {proxy_data[k]}" for k in differing[:3])
        )
    # The proxy sent exactly the samples that survive Prometheus's relabeling (duplicates included).
    kept = prom_meta.get("scrape_samples_post_metric_relabeling")
    if proxy_meta.get("scrape_samples_scraped") != kept:
        problems.append(
            f"{where}: the proxy sent {proxy_meta.get('scrape_samples_scraped')} samples, "
            f"Prometheus's own relabeling kept {kept}"
        )
    # The rules do what this test means them to do: checked on Prometheus's own result.
    problems += [
        f"{where}: Prometheus's rules left no series with {probe} (rule file or probe wrong)"
        for probe in pair.rules.present
        if not any(matches(k, probe) for k in prom_data)
    ]
    problems += [
        f"{where}: Prometheus's rules left a series with {probe} (rule file or probe wrong)"
        for probe in pair.rules.absent
        if any(matches(k, probe) for k in prom_data)
    ]
    last_replica = {"replica": str(pair.target.scale - 1)}
    if pair.target.scale > 1 and not any(matches(k, last_replica) for k in prom_data):
        problems.append(f"{where}: no {last_replica} series from the scaled exporter")
    return False, problems


# --- 1: what Prometheus ingests is the same whether it or the proxy applies the rules -----------


async def test_prometheus_ingests_the_same_whoever_applies_the_rules(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], make_proxy: ProxyFactory
) -> None:
    plan = [
        (CAPTURE, RULE_FILES),
        (CAPTURE_TEXT, RULE_FILES),
        (SCALED, RULE_FILES),
        (EDGE_TEXT, (UNICODE_REGEX, BAD_NAME, UNICODE_CASE, NO_NAME)),
        (EDGE_OPENMETRICS, (UNICODE_REGEX, BAD_NAME, UNICODE_CASE, NO_NAME)),
    ]
    harness = await build(tmp_path, aiohttp_server, make_proxy, plan)
    async with running_prometheus(tmp_path, prometheus_config(harness.jobs)) as prometheus:
        problems = await differential(prometheus, harness)
        assert not problems, "\n".join(problems)


# --- 2: promtool check metrics on the proxy's output ---------------------------------------------


def lint_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


async def fetch_text(session: aiohttp.ClientSession, url: str) -> bytes:
    """A text-format scrape: promtool 2.42 parses text 0.0.4 only."""
    async with session.get(url, headers={"Accept": TEXT_ACCEPT}) as response:
        assert response.status == 200, (url, response.status, await response.text())
        assert response.headers.get("Content-Type", "").startswith("text/plain"), response.headers
        return await response.read()


@pytest.mark.parametrize(
    "rules",
    RULE_FILES,
    ids=lambda rules: rules.name,
)
async def test_promtool_accepts_the_output(
    rules: RuleFile,
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_proxy: ProxyFactory,
) -> None:
    require_binary("promtool")
    path = tmp_path / f"{rules.name}.yml"
    path.write_text(rules.yaml)
    server = await aiohttp_server(FakeExporter().app(), host=LOOPBACK)
    proxy: TestClient = await make_proxy(
        port=server.port, relabel_config=path, name_validation=NAME_VALIDATION
    )
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=10)) as session:
        raw = await fetch_text(session, f"http://{LOOPBACK}:{server.port}/metrics?{NO_MSSQL}")
        rewritten = await fetch_text(session, f"http://{LOOPBACK}:{proxy.server.port}/metrics?{NO_MSSQL}")
    assert any(line and not line.startswith(b"#") for line in rewritten.splitlines()), rewritten[:500]
    assert rewritten != raw

    code_in, out_in = await promtool_check(raw)
    assert code_in in (0, PROMTOOL_LINT_ONLY), out_in
    code_out, out_out = await promtool_check(rewritten)
    assert code_out in (0, PROMTOOL_LINT_ONLY), f"promtool on the proxy's output:\n{out_out}"

    # Lint lines are "<metric> <problem>". Rules may rename metrics, so compare the problems: the
    # output may not have a problem (or more of one) the input lacks, beyond those the file allows.
    allowed = set(rules.lint_allowed)
    before = Counter(line.partition(" ")[2] for line in lint_lines(out_in))
    after = Counter(line.partition(" ")[2] for line in lint_lines(out_out) if line not in allowed)
    assert not after - before, f"new lint problems {dict(after - before)}; promtool said:\n{out_out}"
