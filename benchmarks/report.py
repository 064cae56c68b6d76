"""RESULTS.md, the stdout tables, the targets of issue 5 and the PNG chart, all from one run."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks import peers
from benchmarks.load import PROMETHEUS_HEADERS
from benchmarks.rewriter import RewriterResult
from benchmarks.run import REPO, Row, Settings

X = "\N{MULTIPLICATION SIGN}"
OPT_START = "<!-- optimisations:start -->"
OPT_END = "<!-- optimisations:end -->"
OPT_PLACEHOLDER = (
    "_Filled in by hand, kept as it is when the file is regenerated: for each optimisation of the "
    "proxy, the commit, what changed, and what it bought (the numbers before and after, from runs "
    "of this benchmark on the same machine)._"
)
SCENARIO_TITLES = {"coalesce": "Coalescing: a 50 ms exporter that serves one scrape at a time"}

# Targets (ratios from the same run): issue 5's, with issue 10's tighter latency and CPU bounds for
# passthrough with coalescing off (added p50 <= 1.2x nginx's, CPU per scrape <= 1.0x).
LATENCY_ADDED_MAX = 1.2
THROUGHPUT_MIN = 0.8
COALESCE_MIN = 3.0
CPU_MAX = 1.0
RSS_STEADY_MAX_MB = 45.0
RSS_GROWTH_MAX_MB = 5.0
REWRITER_WARM_MIN = 1_000_000
REWRITER_COLD_MIN = 250_000
PURE = "proxy passthrough --no-coalesce"  # the row whose scrapes are each proxied on their own


@dataclass
class Results:
    started: datetime
    elapsed_s: float
    argv: list[str]
    smoke: bool
    settings: Settings
    scales: list[int]
    payload_bytes: dict[int, int]
    rows: list[Row]
    rewriter: list[RewriterResult]
    rewriter_input: str
    rewriter_skipped: str | None
    tools: peers.Tools
    notes: list[str] = field(default_factory=list)
    chart: Path | None = None
    chart_skipped: str | None = None
    load_before: str = ""  # /proc/loadavg's 1, 5 and 15 minute averages when the run began
    proxy_at_start: str = ""  # proxy_state() when the run began

    def row(self, scenario: str, name: str) -> Row | None:
        for row in self.rows:
            if row.scenario == scenario and row.name == name and row.measured:
                return row
        return None

    def scenarios(self) -> list[str]:
        seen: list[str] = []
        for row in self.rows:
            if row.scenario not in seen:
                seen.append(row.scenario)
        return seen


# -- numbers ---------------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{X}"


def mb(kib: int | None) -> str:
    return "—" if kib is None else f"{kib * 1024 / 1e6:.1f}"


def kib_to_mb(kib: int) -> float:
    return kib * 1024 / 1e6


def divide(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def scale_name(scenario: str) -> str:
    return scenario.replace("x", X) if scenario.startswith("x") else scenario


# -- tables ----------------------------------------------------------------------------------------

COLUMNS = [
    "target",
    "p50 ms (1)",
    "p99 ms (1)",
    "added p50 ms (1)",
    "added ÷ nginx's",
    "2xx/s (8)",
    "÷ nginx",
    "÷ direct",
    "p99 ms (8)",
    "scrapes (1 / 8)",
    "non-2xx, errors (1 / 8)",
    "CPU ms/scrape (1 / 8)",
    "CPU ÷ nginx (8)",
    "peak RSS MB",
    "steady RSS MB",
    "body bytes",
]


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _body(row: Row) -> str:
    if row.body is None:
        return "—"
    text = f"{row.body.body_bytes:,}"
    if row.body.content_encoding:
        text += f" {row.body.content_encoding}"
    if row.body.status != 200:
        text = f"{row.body.status}: {text}"
    return text


def scenario_table(results: Results, scenario: str) -> str:
    direct = results.row(scenario, "direct")
    nginx = results.row(scenario, "nginx")
    lines = []
    for row in (r for r in results.rows if r.scenario == scenario):
        if not row.measured:
            lines.append([row.name, row.skipped or "not measured", *[""] * (len(COLUMNS) - 2)])
            continue
        seq, conc = row.seq, row.conc
        assert seq is not None
        assert conc is not None
        added = added_nginx = None
        if direct is not None and direct.seq is not None and seq.ok:
            added = seq.p50_ms - direct.seq.p50_ms
            if nginx is not None and nginx.seq is not None:
                added_nginx = nginx.seq.p50_ms - direct.seq.p50_ms
        is_direct = row.spec.kind == "direct"
        nginx_conc = nginx.conc if nginx is not None else None
        direct_conc = direct.conc if direct is not None else None
        lines.append(
            [
                row.name,
                ms(seq.p50_ms if seq.ok else None),
                ms(seq.p99_ms if seq.ok else None),
                "—" if is_direct else ms(added) if added is None or added >= 0 else f"{added:.2f}",
                "—" if is_direct else ratio(divide(added, added_nginx)),
                rate(conc.ok_per_s),
                ratio(divide(conc.ok_per_s, nginx_conc.ok_per_s if nginx_conc else None)),
                ratio(divide(conc.ok_per_s, direct_conc.ok_per_s if direct_conc else None)),
                ms(conc.p99_ms if conc.ok else None),
                f"{seq.requests:,} / {conc.requests:,}",
                f"{seq.non2xx:,}, {seq.socket_errors:,} / {conc.non2xx:,}, {conc.socket_errors:,}",
                "—" if is_direct else f"{ms(seq.cpu_ms_per_scrape)} / {ms(conc.cpu_ms_per_scrape)}",
                "—"
                if is_direct
                else ratio(
                    divide(conc.cpu_ms_per_scrape, nginx_conc.cpu_ms_per_scrape if nginx_conc else None)
                ),
                mb(row.peak_rss_kib),
                mb(row.steady_rss_kib),
                _body(row),
            ]
        )
    return _table(COLUMNS, lines)


def rewriter_table(results: Results) -> str:
    lines = [
        [
            r.rules,
            f"{r.samples:,}",
            f"{r.kept:,}",
            f"{r.cold_per_s:,.0f}",
            f"{r.warm_per_s:,.0f}",
            f"{r.cold_passes} / {r.warm_passes}",
        ]
        for r in results.rewriter
    ]
    header = [
        "rules",
        "samples in",
        "samples out",
        "cold samples/s",
        "warm samples/s",
        "passes (cold / warm)",
    ]
    return _table(header, lines)


def _growth(now: int | None, then: int | None) -> str:
    return "—" if now is None or then is None else f"{kib_to_mb(now - then):+.1f}"


def rss_table(results: Results) -> str:
    """Passthrough's memory by payload: after the sequential run (Prometheus's pattern), and
    after the 8-scraper run too (the steady figure of the targets)."""
    lines = []
    first: Row | None = None
    for scale in results.scales:
        row = results.row(f"x{scale}", "proxy passthrough")
        if row is None or row.steady_rss_kib is None:
            lines.append([f"{X}{scale}", "not measured", "", ""])
            continue
        first = first or row
        is_first = row is first
        lines.append(
            [
                f"{X}{scale}",
                f"{mb(row.seq_rss_kib)} / {mb(row.steady_rss_kib)}",
                f"{mb(row.seq_peak_kib)} / {mb(row.peak_rss_kib)}",
                "—"
                if is_first
                else f"{_growth(row.seq_rss_kib, first.seq_rss_kib)} / "
                f"{_growth(row.steady_rss_kib, first.steady_rss_kib)}",
            ]
        )
    header = [
        "payload",
        "steady RSS MB (after 1 / after 8 scrapers)",
        "peak RSS MB (after 1 / after 8)",
        f"steady growth from {X}{results.scales[0]} MB (1 / 8)",
    ]
    return _table(header, lines)


# -- targets ---------------------------------------------------------------------------------------


@dataclass
class Check:
    target: str
    measured: str
    required: str
    verdict: str


def _check(
    target: str, required: str, value: float | None, ok: Callable[[float], bool], shown: str, why: str
) -> Check:
    if value is None:
        return Check(target, "—", required, f"not measured ({why})")
    return Check(target, shown, required, "PASS" if ok(value) else "MISS")


def targets(results: Results) -> list[Check]:
    checks: list[Check] = []
    direct, nginx, proxy = (results.row("x1", n) for n in ("direct", "nginx", "proxy passthrough"))

    # Latency added over direct, p50, 1 scraper, x1.
    value = shown = None
    why = f"needs direct, nginx and proxy passthrough at {X}1"
    if direct and nginx and proxy and direct.seq and nginx.seq and proxy.seq:
        added_proxy = proxy.seq.p50_ms - direct.seq.p50_ms
        added_nginx = nginx.seq.p50_ms - direct.seq.p50_ms
        if added_nginx > 0:
            value = added_proxy / added_nginx
            shown = f"{value:.2f}{X} ({added_proxy:.3f} ms vs nginx {added_nginx:.3f} ms)"
        else:
            why = f"nginx added {added_nginx:.3f} ms: no ratio"
    checks.append(
        _check(
            f"latency added over direct, p50, 1 scraper, {X}1: proxy ÷ nginx",
            f"≤ {LATENCY_ADDED_MAX}{X}",
            value,
            lambda v: v <= LATENCY_ADDED_MAX,
            shown or "",
            why,
        )
    )

    # Throughput, 8 scrapers, x1, passthrough: each scrape proxied on its own (strict), then at
    # the defaults, where the 8 scrapers also share upstream requests.
    for name, how in ((PURE, "each scrape proxied (--no-coalesce)"), ("proxy passthrough", "defaults")):
        row = results.row("x1", name)
        p = row.conc.ok_per_s if row and row.conc else None
        n = nginx.conc.ok_per_s if nginx and nginx.conc else None
        value = divide(p, n)
        checks.append(
            _check(
                f"throughput, 8 scrapers, {X}1, passthrough, {how}: proxy ÷ nginx",
                f"≥ {THROUGHPUT_MIN}{X}",
                value,
                lambda v: v >= THROUGHPUT_MIN,
                f"{value:.2f}{X} ({p:,.0f} vs {n:,.0f} 2xx/s)" if value is not None and p and n else "",
                f"needs nginx and {name} at {X}1",
            )
        )

    # Coalescing.
    co_proxy, co_nginx = results.row("coalesce", "proxy coalescing"), results.row("coalesce", "nginx")
    value = shown = None
    if co_proxy and co_nginx and co_proxy.conc and co_nginx.conc:
        p, n = co_proxy.conc.ok_per_s, co_nginx.conc.ok_per_s
        value = p / n if n > 0 else (float("inf") if p > 0 else 0.0)
        shown = f"{value:.2f}{X} ({p:,.1f} vs {n:,.1f} 2xx/s)"
    checks.append(
        _check(
            "throughput, 8 scrapers, 1-at-a-time 50 ms exporter, coalescing: proxy ÷ nginx (2xx only)",
            f"≥ {COALESCE_MIN}{X}",
            value,
            lambda v: v >= COALESCE_MIN,
            shown or "",
            "needs nginx and proxy coalescing in the coalescing scenario",
        )
    )

    # CPU per scrape, at every scale measured.
    for scale in results.scales:
        p, n = results.row(f"x{scale}", PURE), results.row(f"x{scale}", "nginx")
        pc = p.conc.cpu_ms_per_scrape if p and p.conc else None
        nc = n.conc.cpu_ms_per_scrape if n and n.conc else None
        value = divide(pc, nc)
        checks.append(
            _check(
                f"CPU per scrape, 8 scrapers, {X}{scale}, passthrough --no-coalesce: proxy ÷ nginx",
                f"≤ {CPU_MAX}{X}",
                value,
                lambda v: v <= CPU_MAX,
                f"{value:.2f}{X} ({pc:.3f} vs {nc:.3f} ms)" if value is not None and pc and nc else "",
                f"needs nginx and {PURE} at {X}{scale}",
            )
        )

    # RSS.
    rss: dict[int, int] = {}
    for scale in results.scales:
        row = results.row(f"x{scale}", "proxy passthrough")
        if row is not None and row.steady_rss_kib is not None:
            rss[scale] = row.steady_rss_kib
    for scale in (1, 100):
        value = kib_to_mb(rss[scale]) if scale in rss else None
        checks.append(
            _check(
                f"steady RSS, passthrough, after the {X}{scale} runs",
                f"≤ {RSS_STEADY_MAX_MB:.0f} MB",
                value,
                lambda v: v <= RSS_STEADY_MAX_MB,
                f"{value:.1f} MB" if value is not None else "",
                f"{X}{scale} not in this run (--scales)"
                if scale not in results.scales
                else "passthrough not measured",
            )
        )
    proxy_rows = [r for r in results.rows if r.spec.kind == "proxy" and r.measured and r.steady_rss_kib]
    if proxy_rows:
        top = max(proxy_rows, key=lambda r: r.steady_rss_kib or 0)
        value = kib_to_mb(top.steady_rss_kib or 0)
        checks.append(
            _check(
                "steady RSS, largest of every proxy row",
                f"≤ {RSS_STEADY_MAX_MB:.0f} MB",
                value,
                lambda v: v <= RSS_STEADY_MAX_MB,
                f"{value:.1f} MB ({top.name}, {scale_name(top.scenario)})",
                "",
            )
        )
    value = kib_to_mb(rss[100] - rss[1]) if 1 in rss and 100 in rss else None
    checks.append(
        _check(
            f"steady RSS growth, passthrough, {X}1 to {X}100",
            f"≤ {RSS_GROWTH_MAX_MB:.0f} MB",
            value,
            lambda v: v <= RSS_GROWTH_MAX_MB,
            f"{value:+.1f} MB" if value is not None else "",
            f"needs passthrough at {X}1 and {X}100 (--scales)",
        )
    )

    # Rewriter.
    if not results.rewriter:
        for label in ("warm", "cold"):
            checks.append(
                Check(f"rewriter, {label} cache", "—", "", f"not measured ({results.rewriter_skipped})")
            )
    for r in results.rewriter:
        checks.append(
            _check(
                f"rewriter, warm cache, {r.rules}, one core",
                f"≥ {REWRITER_WARM_MIN:,} samples/s",
                r.warm_per_s,
                lambda v: v >= REWRITER_WARM_MIN,
                f"{r.warm_per_s:,.0f} samples/s",
                "",
            )
        )
        checks.append(
            _check(
                f"rewriter, cold cache, {r.rules}, one core",
                f"≥ {REWRITER_COLD_MIN:,} samples/s",
                r.cold_per_s,
                lambda v: v >= REWRITER_COLD_MIN,
                f"{r.cold_per_s:,.0f} samples/s",
                "",
            )
        )
    return checks


def targets_table(checks: Sequence[Check]) -> str:
    return _table(
        ["target", "measured", "required", "result"],
        [[c.target, c.measured, c.required, c.verdict] for c in checks],
    )


# -- machine and versions --------------------------------------------------------------------------


def machine() -> dict[str, str]:
    info = {"nproc": str(len(os.sched_getaffinity(0))), "kernel": platform.release()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        info["cpu"] = model[1].strip() if model else "unknown"
        meminfo = Path("/proc/meminfo").read_text()
        total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
        info["memory"] = f"{int(total[1]) / 1024**2:.1f} GiB" if total else "unknown"
    except OSError:
        pass
    return info


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def proxy_state() -> str:
    """The proxy's commit, and whether proxy/ differs from it; read when the run begins."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    return f"commit {head or 'unknown'}" + (" with uncommitted changes in proxy/" if dirty else "")


def proxy_fingerprint(root: Path = REPO) -> str:
    """A hash of the proxy's source: if it changes during a run, rows measured different code."""
    digest = hashlib.sha256()
    for path in sorted((root / "proxy").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def versions(tools: peers.Tools, proxy_at_start: str) -> dict[str, str]:
    try:
        from proxy import __version__ as proxy_version
    except ImportError:
        proxy_version = "unknown"
    found = {
        "windows-metrics-proxy": f"{proxy_version}, {proxy_at_start}",
        "python": sys.version.split()[0],
        "aiohttp": _dist_version("aiohttp"),
        "uvloop": _dist_version("uvloop"),
    }
    for peer in peers.PEERS:
        path = tools.get(peer.key)
        found[peer.key] = peers.version_of(peer.key, path) if path else tools.missing.get(peer.key, "missing")
    return found


# -- the document ----------------------------------------------------------------------------------


def preserved_optimisations(path: Path | None) -> str:
    if path is not None and path.is_file():
        text = path.read_text()
        start, end = text.find(OPT_START), text.find(OPT_END)
        if 0 <= start < end:
            return text[start + len(OPT_START) : end].strip("\n")
    return OPT_PLACEHOLDER


def _method(results: Results) -> str:
    s = results.settings
    headers = ", ".join(f"`{k}: {v}`" for k, v in PROMETHEUS_HEADERS.items())
    cold = results.rewriter[0].cold_passes if results.rewriter else 0
    return f"""\
- **Durations:** every measurement is a wrk run of {s.duration_s} s: one sequential scraper
  (`wrk -t1 -c1`), then 8 concurrent scrapers (`wrk -t2 -c8`), after one warm-up of up to
  {s.warmup_s:g} s / {s.warmup_max} sequential scrapes; wrk's request timeout is 60 s; RSS is read
  {s.settle_s:g} s after each of the two runs. Every row runs at every scale.
- **Upstream:** nginx (one worker, sendfile) serving the fake exporter's text rendering at each
  scale as a static file, so the upstream is never the bottleneck; each target is started fresh for
  each row and scale, as a subprocess, and stopped after it.
- **Headers:** every scrape sends Prometheus's {headers}; no `Accept-Encoding` except the `gzip` rows,
  which send `Accept-Encoding: gzip` (as Prometheus always does) and get the proxy's gzip output.
- **Columns:** (1) = one sequential scraper, (8) = 8 concurrent scrapers. Latencies are wrk's
  percentiles. *added p50* = the row's p50 minus direct's p50; *added ÷ nginx's* = that over nginx's.
  *2xx/s* counts only 2xx answers (non-2xx are listed, not counted). *÷ nginx*, *÷ direct*: ratios of
  2xx/s to those rows of the same table. *CPU ms/scrape*: utime + stime from /proc/<pid>/stat of
  the target over the same wrk run (nginx: master + worker), divided by its 2xx answers (the
  work on the scrapes wrk abandons when its time is up, at most one per connection, is included:
  it weighs on rows with few, slow scrapes). *RSS*:
  VmHWM (peak) and VmRSS (steady, after the runs) from /proc/<pid>/status, nginx's master + worker
  summed; MB = 10⁶ bytes. *body bytes*: one response's body as it came on the wire (gzip stays
  compressed).
- **Rows:** *direct* scrapes the upstream itself (the limit); *nginx* is the nginx image's config
  (`location /metrics {{ proxy_pass }}`, `location /health {{ return 200; }}`, one worker, an upstream
  block with `keepalive 16`, `proxy_http_version 1.1`, `Connection ""`; buffering and the rest at
  nginx's defaults; access log off); *exporter_exporter* is an http module at its defaults, which
  include `verify: true` (it parses and re-encodes every scrape); *verify:false* proxies the bytes
  (its Go reverse proxy opens a new upstream connection per scrape); *proxy passthrough* is
  `python -m proxy` with no rules; *keep-list* is `--relabel-config` with the README's node list;
  *drop service* is `--drop 'windows_service_.*'`. The proxy rows run at the proxy's defaults,
  coalescing on: 8 scrapers that ask at once share upstream requests (and, with rules, the
  rewriting), so their 8-scraper figures are not the cost of proxying each scrape; *passthrough
  --no-coalesce* is, and the throughput and CPU targets are checked on it (coalescing has its own
  scenario and target).
- **Coalescing:** the upstream is `python -m proxy fake-exporter --max-concurrent 1 --fault latency
  --latency 0.05`: 50 ms per scrape, a concurrent scrape answered 503, like windows_exporter ≥ 0.30.
- **Rewriter:** in-process, pinned to one core: `Rewriter(RuleSet(rules, cache_size=10**6),
  openmetrics=False)` fed {results.rewriter_input} in 64 KiB chunks; *cold* is the first pass of a
  fresh RuleSet (best of {cold} fresh ones), *warm* the best of the passes after it."""


def render(results: Results, optimisations: str, *, chart_rel: str | None) -> str:
    info = machine()
    found = versions(results.tools, results.proxy_at_start)
    sizes = ", ".join(f"{X}{s} = {n:,} bytes" for s, n in sorted(results.payload_bytes.items()))
    parts = [
        "# Benchmarks: windows-metrics-proxy beside nginx and exporter_exporter",
        "",
        "Generated by `python -m benchmarks` (issue 5); the tables and targets below come from one run on "
        "loopback. Regenerate with `make bench`.",
        "",
        f"- **Date:** {results.started:%Y-%m-%d %H:%M:%S %Z}; the run took {results.elapsed_s:.0f} s"
        + (" (smoke run)" if results.smoke else ""),
        f"- **Command:** `{' '.join(results.argv)}`",
        f"- **Machine:** {info.get('nproc')} cores ({info.get('cpu', 'unknown')}), "
        f"{info.get('memory', 'unknown')} memory, Linux {info.get('kernel')}; load average "
        f"{results.load_before or 'unknown'} before the run, {load_average() or 'unknown'} after it "
        "(anything else running on the machine shows up in every row)",
        "- **Versions:** " + "; ".join(f"{k} {v}" for k, v in found.items()),
        f"- **Payloads:** {sizes}",
        "",
        "## Method",
        "",
        _method(results),
        "",
    ]
    for scenario in results.scenarios():
        title = SCENARIO_TITLES.get(scenario, f"Payload {scale_name(scenario)}")
        if scenario.startswith("x"):
            size = results.payload_bytes.get(int(scenario[1:]))
            if size:
                title += f" ({size / 1e6:.2f} MB)"
        parts += [f"## {title}", "", scenario_table(results, scenario), ""]
    parts += [
        "## Memory of the proxy in passthrough, by payload",
        "",
        "Read after the sequential run and again after the 8-scraper run (the targets use the "
        "latter); each payload has its own proxy process.",
        "",
        rss_table(results),
        "",
        "## The rewriter alone",
        "",
        rewriter_table(results) if results.rewriter else f"Not measured: {results.rewriter_skipped}.",
        "",
        "## Targets (issues 5 and 10)",
        "",
        targets_table(targets(results)),
        "",
    ]
    if chart_rel:
        parts += ["## Chart", "", f"![benchmark chart]({chart_rel})", ""]
    elif results.chart_skipped:
        parts += ["## Chart", "", f"Not drawn: {results.chart_skipped}.", ""]
    if results.notes:
        parts += ["## Notes from this run", "", *[f"- {note}" for note in results.notes], ""]
    parts += [
        "## What each optimisation bought",
        "",
        OPT_START,
        optimisations,
        OPT_END,
        "",
    ]
    return "\n".join(parts)


def stdout_report(results: Results) -> str:
    parts = []
    for scenario in results.scenarios():
        parts += [
            f"== {SCENARIO_TITLES.get(scenario, 'payload ' + scale_name(scenario))}",
            scenario_table(results, scenario),
            "",
        ]
    if results.rewriter:
        parts += ["== rewriter alone", rewriter_table(results), ""]
    parts += ["== targets", targets_table(targets(results)), ""]
    return "\n".join(parts)


# -- chart -----------------------------------------------------------------------------------------


def draw_chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    static = [s for s in results.scenarios() if s.startswith("x")]
    names: list[str] = []
    for row in results.rows:
        if row.scenario in static and row.name not in names:
            names.append(row.name)

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(
        f"windows-metrics-proxy vs nginx and exporter_exporter — {results.started:%Y-%m-%d}, "
        f"{machine().get('nproc')} cores, {results.settings.duration_s} s per measurement"
    )

    def grouped(
        ax, title: str, value: Callable[[Row], float | None], *, log: bool, skip_direct: bool
    ) -> None:  # type: ignore[no-untyped-def]
        shown = [n for n in names if not (skip_direct and n == "direct")]
        width = 0.8 / max(len(static), 1)
        for i, scenario in enumerate(static):
            heights = []
            for name in shown:
                row = results.row(scenario, name)
                v = value(row) if row is not None else None
                heights.append(v if v is not None and v > 0 else 0)
            xs = [j + (i - (len(static) - 1) / 2) * width for j in range(len(shown))]
            ax.bar(xs, heights, width, label=scale_name(scenario))
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)

    grouped(
        axes[0][0],
        "p50 latency, 1 scraper (ms)",
        lambda r: r.seq.p50_ms if r.seq and r.seq.ok else None,
        log=True,
        skip_direct=False,
    )
    grouped(
        axes[0][1],
        "2xx/s, 8 scrapers",
        lambda r: r.conc.ok_per_s if r.conc else None,
        log=True,
        skip_direct=False,
    )
    grouped(
        axes[0][2],
        "CPU ms per scrape, 8 scrapers",
        lambda r: r.conc.cpu_ms_per_scrape if r.conc else None,
        log=True,
        skip_direct=True,
    )
    grouped(
        axes[1][0],
        "steady RSS (MB; red: the 45 MB target)",
        lambda r: kib_to_mb(r.steady_rss_kib) if r.steady_rss_kib else None,
        log=True,
        skip_direct=True,
    )
    axes[1][0].axhline(RSS_STEADY_MAX_MB, color="red", linestyle="--", linewidth=1)

    ax = axes[1][1]
    co = [r for r in results.rows if r.scenario == "coalesce"]
    ax.bar(
        [r.name for r in co],
        [r.conc.ok_per_s if r.measured and r.conc else 0 for r in co],
        color="tab:green",
    )
    ax.set_title("coalescing: 2xx/s, 8 scrapers, 1-at-a-time 50 ms exporter", fontsize=10)
    ax.tick_params(axis="x", rotation=35, labelsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][2]
    rw = results.rewriter
    xs = list(range(len(rw)))
    ax.bar([x - 0.2 for x in xs], [r.cold_per_s for r in rw], 0.4, label="cold")
    ax.bar([x + 0.2 for x in xs], [r.warm_per_s for r in rw], 0.4, label="warm")
    ax.axhline(REWRITER_WARM_MIN, color="red", linestyle="--", linewidth=1)
    ax.axhline(REWRITER_COLD_MIN, color="orange", linestyle="--", linewidth=1)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.rules for r in rw], rotation=15, fontsize=8)
    ax.set_title("rewriter alone, samples/s on one core", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
