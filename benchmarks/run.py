"""The scenarios: which targets run in front of which upstream, and how each one is measured."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import peers
from benchmarks.load import (
    GZIP,
    PROMETHEUS_HEADERS,
    Fetched,
    LoadResult,
    Wrk,
    merge_headers,
    url_for,
    warm_up,
)
from benchmarks.procs import LOOPBACK, Proc, ServerError, Supervisor, cpu_seconds, free_port, memory_kib
from benchmarks.rewriter import KEEP_LIST_REGEX

REPO = Path(__file__).resolve().parent.parent
SERVICE_DROP = "windows_service_.*"
# The coalescing upstream: a realistic exporter, 50 ms to collect, one scrape at a time.
COALESCE_LATENCY_S = 0.05


@dataclass(frozen=True)
class Spec:
    """One row: a target in front of the upstream, and the headers its scrapers send."""

    name: str
    kind: str  # direct | nginx | exporter_exporter | proxy
    path: str = "/metrics"
    headers: dict[str, str] = field(default_factory=lambda: dict(PROMETHEUS_HEADERS))
    proxy_args: tuple[str, ...] = ()
    verify: bool = True  # exporter_exporter's http module option (its default: true)

    @property
    def gzip(self) -> bool:
        return "gzip" in self.headers.get("Accept-Encoding", "")


@dataclass
class Row:
    scenario: str  # "x1", "x10", "x100" or "coalesce"
    spec: Spec
    seq: LoadResult | None = None  # 1 sequential scraper
    conc: LoadResult | None = None  # 8 concurrent scrapers
    body: Fetched | None = None
    peak_rss_kib: int | None = None  # VmHWM after every run
    steady_rss_kib: int | None = None  # VmRSS after every run
    seq_rss_kib: int | None = None  # VmRSS after the sequential run only
    seq_peak_kib: int | None = None  # VmHWM after the sequential run only
    skipped: str | None = None  # why it was not measured
    notes: list[str] = field(default_factory=list)  # what a reader should know about this row

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def measured(self) -> bool:
        return self.skipped is None and self.seq is not None and self.conc is not None


@dataclass
class Settings:
    duration_s: int
    warmup_s: float
    warmup_max: int
    settle_s: float = 0.5  # idle time before reading the steady RSS
    rows: tuple[str, ...] = ()  # only rows whose name contains one of these (empty: all)


def static_specs(rules_file: Path) -> list[Spec]:
    prometheus_gzip = merge_headers(PROMETHEUS_HEADERS, GZIP)
    keep = ("--relabel-config", str(rules_file))
    drop = ("--drop", SERVICE_DROP)
    return [
        Spec("direct", "direct"),
        Spec("nginx", "nginx"),
        Spec("exporter_exporter", "exporter_exporter", f"/proxy?module={peers.EXPEXP_MODULE}"),
        Spec(
            "exporter_exporter verify:false",
            "exporter_exporter",
            f"/proxy?module={peers.EXPEXP_MODULE}",
            verify=False,
        ),
        Spec("proxy passthrough", "proxy"),
        Spec("proxy passthrough --no-coalesce", "proxy", proxy_args=("--no-coalesce",)),
        Spec("proxy keep-list", "proxy", proxy_args=keep),
        Spec("proxy keep-list gzip", "proxy", headers=prometheus_gzip, proxy_args=keep),
        Spec("proxy drop service", "proxy", proxy_args=drop),
        Spec("proxy drop service gzip", "proxy", headers=prometheus_gzip, proxy_args=drop),
    ]


def coalesce_specs() -> list[Spec]:
    return [
        Spec("direct", "direct"),
        Spec("nginx", "nginx"),
        # verify: true (the default) rejects windows_exporter 0.20's repeated family: see the x1 rows.
        Spec(
            "exporter_exporter verify:false",
            "exporter_exporter",
            f"/proxy?module={peers.EXPEXP_MODULE}",
            verify=False,
        ),
        Spec("proxy --no-coalesce", "proxy", proxy_args=("--no-coalesce",)),
        Spec("proxy coalescing", "proxy"),
    ]


def write_keep_rules(path: Path) -> Path:
    """The README's keep-list as a rules file (JSON is YAML)."""
    rules = {
        "metric_relabel_configs": [
            {"source_labels": ["__name__"], "regex": KEEP_LIST_REGEX, "action": "keep"},
        ]
    }
    path.write_text(json.dumps(rules, indent=2) + "\n")
    return path


def proxy_env(proxy_root: Path) -> dict[str, str]:
    """Our environment without PROXY_* (a developer's shell must not change what is measured),
    importing the proxy from proxy_root (the working tree, or a snapshot of --proxy-rev)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(proxy_root), env.get("PYTHONPATH", "")) if p)
    return env


def snapshot_proxy(rev: str, dest: Path) -> str:
    """proxy/ as committed at rev, unpacked under dest (git archive); returns the short commit."""
    resolved = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if resolved.returncode != 0:
        raise ValueError(f"--proxy-rev {rev}: not a commit of {REPO}: {resolved.stderr.strip()}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "proxy"], capture_output=True, timeout=120
    )
    if archive.returncode != 0:
        raise ValueError(f"--proxy-rev {rev}: git archive failed: {archive.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4; the archive comes from our own repository
            tar.extractall(dest)
    return resolved.stdout.strip()


class Bench:
    def __init__(
        self,
        supervisor: Supervisor,
        tools: peers.Tools,
        workdir: Path,
        settings: Settings,
        log: Callable[[str], None],
        proxy_root: Path = REPO,
    ) -> None:
        self.proxy_root = proxy_root  # where `python -m proxy` imports the proxy from
        self.sup = supervisor
        self.tools = tools
        self.workdir = workdir
        self.settings = settings
        self.log = log
        wrk = tools.get("wrk")
        self.wrk = Wrk(wrk, supervisor, workdir) if wrk else None
        self.rules_file = write_keep_rules(workdir / "keep-list.yaml")
        self._serial = 0

    # -- upstreams ---------------------------------------------------------------------------------

    def start_static_upstream(self, root: Path) -> Proc:
        nginx = self.tools.get("nginx")
        if nginx is None:
            raise ServerError(self.tools.missing["nginx"])
        port = free_port()
        prefix = self.workdir / "nginx-upstream"
        peers.write_nginx_static(prefix, port=port, root=root)
        proc = self.sup.start("nginx-upstream", peers.nginx_argv(nginx, prefix), port=port)
        self.sup.wait_listening(proc)
        return proc

    def start_fake_exporter(self) -> Proc:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "proxy",
            "fake-exporter",
            "--listen-address",
            LOOPBACK,
            "--listen-port",
            str(port),
            "--max-concurrent",
            "1",
            "--fault",
            "latency",
            "--latency",
            str(COALESCE_LATENCY_S),
        ]
        proc = self.sup.start(
            "fake-exporter", argv, port=port, env=proxy_env(self.proxy_root), cwd=self.proxy_root
        )
        self.sup.wait_listening(proc)
        return proc

    # -- targets -----------------------------------------------------------------------------------

    def _start_target(self, spec: Spec, upstream_port: int, upstream_path: str) -> Proc:
        self._serial += 1
        tag = f"{self._serial:02d}-{spec.kind}"
        port = free_port()
        if spec.kind == "nginx":
            nginx = self.tools.paths["nginx"]
            prefix = self.workdir / tag
            peers.write_nginx_front(
                prefix, port=port, upstream_port=upstream_port, upstream_path=upstream_path
            )
            proc = self.sup.start(tag, peers.nginx_argv(nginx, prefix), port=port)
        elif spec.kind == "exporter_exporter":
            config = peers.write_exporter_exporter(
                self.workdir / f"{tag}.yml",
                upstream_port=upstream_port,
                upstream_path=upstream_path,
                verify=spec.verify,
            )
            binary = self.tools.paths["exporter_exporter"]
            proc = self.sup.start(tag, peers.exporter_exporter_argv(binary, config, port), port=port)
        elif spec.kind == "proxy":
            argv = [
                sys.executable,
                "-m",
                "proxy",
                "--hostip",
                LOOPBACK,
                "--port",
                str(upstream_port),
                "--upstream-path",
                upstream_path,
                "--listen-address",
                LOOPBACK,
                "--listen-port",
                str(port),
                *spec.proxy_args,
            ]
            proc = self.sup.start(tag, argv, port=port, env=proxy_env(self.proxy_root), cwd=self.proxy_root)
        else:
            raise ValueError(spec.kind)
        self.sup.wait_listening(proc)
        return proc

    def _why_not(self, spec: Spec, scenario: str) -> str | None:
        if self.wrk is None:
            return f"not measured: {self.tools.missing.get('wrk', 'wrk missing')}"
        if spec.kind in ("nginx", "exporter_exporter") and spec.kind in self.tools.missing:
            return f"not measured: {self.tools.missing[spec.kind]}"
        wanted = self.settings.rows
        if wanted and not any(part in spec.name for part in wanted):
            return "not measured: not selected (--rows)"
        return None

    def measure(self, scenario: str, spec: Spec, upstream_port: int, upstream_path: str) -> Row:
        row = Row(scenario, spec)
        row.skipped = self._why_not(spec, scenario)
        if row.skipped:
            self.log(f"  {spec.name:<32} {row.skipped}")
            return row
        assert self.wrk is not None
        proc: Proc | None = None
        started = time.monotonic()
        try:
            if spec.kind == "direct":
                port, path = upstream_port, upstream_path
            else:
                proc = self._start_target(spec, upstream_port, upstream_path)
                assert proc.port is not None
                port, path = proc.port, spec.path
            s = self.settings
            warm = warm_up(port, path, spec.headers, seconds=s.warmup_s, max_requests=s.warmup_max)
            row.body = warm[-1]
            if row.body.error_text:
                said = f"answers {row.body.status}: {row.body.error_text[:200]}"
                if proc is not None and (last := proc.log_tail(1).strip()):
                    said += f"; its log: {last[:300]}"
                row.notes.append(said)
            url = url_for(port, path)
            row.seq = self._load(proc, url, spec, threads=1, connections=1)
            if proc is not None:  # memory after Prometheus's pattern, before the concurrent run
                time.sleep(self.settings.settle_s)
                row.seq_rss_kib = memory_kib(proc.pids(), "VmRSS")
                row.seq_peak_kib = memory_kib(proc.pids(), "VmHWM")
            row.conc = self._load(proc, url, spec, threads=2, connections=8)
            if proc is not None:
                time.sleep(self.settings.settle_s)
                pids = proc.pids()
                row.steady_rss_kib = memory_kib(pids, "VmRSS")
                row.peak_rss_kib = memory_kib(pids, "VmHWM")
                if proc.popen.poll() is not None:
                    raise ServerError(f"{proc.name} died during the run:\n{proc.log_tail()}")
                if spec.kind == "nginx":
                    row.notes += nginx_warnings(self.workdir / proc.name / "error.log")
                if spec.kind == "proxy" and any(a in spec.proxy_args for a in RULE_FLAGS):
                    row.notes += relabel_cache_note(port)
        except (
            ServerError,
            RuntimeError,
            OSError,
            subprocess.TimeoutExpired,
            http.client.HTTPException,
        ) as exc:
            row.skipped = f"not measured: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        finally:
            if proc is not None:
                self.sup.stop(proc)
        self.log(f"  {spec.name:<32} {summary(row)} ({time.monotonic() - started:.0f} s)")
        return row

    def _load(self, proc: Proc | None, url: str, spec: Spec, *, threads: int, connections: int) -> LoadResult:
        assert self.wrk is not None
        pids = proc.pids() if proc is not None else []
        before = cpu_seconds(pids)
        result = self.wrk.run(
            url,
            threads=threads,
            connections=connections,
            duration_s=self.settings.duration_s,
            headers=spec.headers,
        )
        if proc is not None:
            result.cpu_s = cpu_seconds(pids) - before
        return result


def nginx_warnings(error_log: Path) -> list[str]:
    """nginx's own words about this run, e.g. big bodies spilled to temporary files."""
    try:
        lines = error_log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    spilled = sum("buffered to a temporary file" in line for line in lines)
    others = [line for line in lines if "[warn]" in line or "[error]" in line or "[crit]" in line]
    notes = []
    if spilled:
        notes.append(
            f"nginx buffered {spilled} upstream responses to temporary files (its default "
            "proxy_buffering with 8 x 4k buffers); the nginx image does the same"
        )
    rest = [line for line in others if "buffered to a temporary file" not in line]
    if rest:
        notes.append(f"nginx logged {len(rest)} other warnings/errors, e.g. {rest[0][:200]}")
    return notes


RULE_FLAGS = ("--relabel-config", "--drop", "--keep")


def relabel_cache_note(port: int) -> list[str]:
    """From the proxy's own metrics: a relabel cache that misses most of the time is worth a line."""
    try:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        try:
            conn.request("GET", "/proxy/metrics")
            text = conn.getresponse().read().decode(errors="replace")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return []
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("windows_metrics_proxy_relabel_cache_"):
            with contextlib.suppress(ValueError):
                values[name.removeprefix("windows_metrics_proxy_relabel_cache_")] = float(value)
    hits, misses = values.get("hits_total"), values.get("misses_total")
    if hits is None or misses is None or hits + misses == 0:
        return []
    rate = hits / (hits + misses)
    if rate >= 0.9:
        return []
    return [
        f"the relabel cache hit {100 * rate:.1f}% of {hits + misses:,.0f} lookups over the whole run "
        f"({values.get('series', 0):,.0f} series cached, the default --relabel-cache-size): "
        "the payload has more series than the cache holds, so every scrape runs cold"
    ]


def summary(row: Row) -> str:
    if not row.measured:
        return row.skipped or "not measured"
    assert row.seq is not None
    assert row.conc is not None
    text = (
        f"p50 {row.seq.p50_ms:.2f} ms, p99 {row.seq.p99_ms:.2f} ms (1); "
        f"{row.conc.ok_per_s:.0f} 2xx/s, p99 {row.conc.p99_ms:.1f} ms (8)"
    )
    if row.conc.non2xx or row.seq.non2xx:
        text += f"; non-2xx {row.seq.non2xx}/{row.conc.non2xx}"
    return text
