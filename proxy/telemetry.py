"""The proxy's own metrics, served on /proxy/metrics.

A registry per app instead of prometheus-client's global one, so tests (and the demo) can run
several proxies in one process without their counters mixing.

No `_created` series: prometheus-client adds one per counter and histogram child (the time it was
created), which doubles the counters' series for a number no dashboard of this proxy reads. The
library's only switch, disable_created_metrics(), is process-global; render() leaves them out of
this registry's output instead, so nothing else in the process is changed.

collect[] push-down (pushdown.py) is seen in narrowed_scrapes (upstream requests narrowed to the
collectors the rules can keep), learning_scrapes (full ones read to learn the exporter's collectors),
narrowing_retries{reason} (narrowed requests asked again in full: refused with 400, or the exporter
had restarted) and the pushdown_collectors gauge (collectors a narrowed scrape asks for, 0 when none).

process_* series: prometheus-client's ProcessCollector on Linux, which reads /proc; on Windows,
which has none, winprocess.WindowsProcessCollector over the Win32 API.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Sized
from platform import python_version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from proxy import __version__
from proxy.runtime import is_windows
from proxy.winprocess import WindowsProcessCollector

PREFIX = "windows_metrics_proxy"

# Upstream outcomes, one label value each; README's failure table lists them.
OUTCOMES = (
    "success",  # 2xx, body complete
    "http_error",  # the exporter answered non-2xx; passed through
    "resolve_error",  # the host name did not resolve
    "connect_error",  # refused, unreachable, or the connection failed before any byte
    "tls_error",  # the TLS handshake with the exporter failed (certificate, version)
    "connect_timeout",  # no connection within PROXY_CONNECT_TIMEOUT
    "header_timeout",  # the deadline passed before the response headers
    "protocol_error",  # the exporter's answer was not valid HTTP
    "body_timeout",  # the deadline passed mid-body; the client connection was aborted
    "body_error",  # the body broke off mid-way; the client connection was aborted
    "relabel_error",  # the rules removed a series' name, as Prometheus fails that scrape; aborted
    "line_too_long",  # with rules, a line over the rewriter's 1 MiB cap (rewrite.LINE_CAP); aborted
    "cancelled",  # every scraper went away before the response was complete, or the proxy stopped
)

# Why a scraper's connection was cut (client_aborts_total{reason}); README lists them.
ABORT_REASONS = ("upstream_broke", "scraper_timeout", "fell_behind", "stopped")
_DEADLINE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

# Scrape latencies of a windows_exporter sit between tens of milliseconds and the timeout.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Telemetry:
    """All self-metrics in one place, created once per app.

    platform and kernel32 stand in for sys.platform and the real kernel32, so tests on Linux can run
    the Windows branch (as runtime.StopSignals takes them).
    """

    def __init__(
        self, *, loop_name: str = "asyncio", platform: str | None = None, kernel32: Any = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if is_windows(platform):
            WindowsProcessCollector(registry=r, kernel32=kernel32)
        else:
            ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info(
            f"{PREFIX}_build",
            "Build and runtime of the proxy.",
            registry=r,
        ).info(
            {
                "version": __version__,
                "python": python_version(),
                "platform": platform or sys.platform,
                "loop": loop_name,
            }
        )
        self.upstream_requests = Counter(
            f"{PREFIX}_upstream_requests",
            "Requests made to the exporter, by how they ended.",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.upstream_requests.labels(outcome)
        self.upstream_first_byte = Histogram(
            f"{PREFIX}_upstream_first_byte_seconds",
            "Time from sending the upstream request to its response headers.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_last_byte = Histogram(
            f"{PREFIX}_upstream_last_byte_seconds",
            "Time from sending the upstream request to the last byte of its body.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_served = Counter(
            f"{PREFIX}_served_bytes",
            "Body bytes written to scrapers on /metrics.",
            registry=r,
        )
        self.scrapes_in_flight = Gauge(
            f"{PREFIX}_scrapes_in_flight",
            "Scrapes of /metrics being served right now.",
            registry=r,
        )
        self.scrapes = Counter(
            f"{PREFIX}_scrapes",
            "Scrapes of /metrics received.",
            registry=r,
        )
        self.coalesced_scrapes = Counter(
            f"{PREFIX}_coalesced_scrapes",
            "Scrapes served from another scrape's upstream request instead of a new one.",
            registry=r,
        )
        self.client_aborts = Counter(
            f"{PREFIX}_client_aborts",
            "Scraper connections aborted on purpose, by reason: upstream_broke (the exporter's body "
            "broke off or could not be rewritten), scraper_timeout (the scraper did not read within "
            "its scrape timeout), fell_behind (a coalesced scraper too far behind its shared flight), "
            "stopped (the proxy stopped before the scrape was complete).",
            ["reason"],
            registry=r,
        )
        for reason in ABORT_REASONS:
            self.client_aborts.labels(reason)
        # How close scrapes run to their timeout, whatever the scraper's timeout is: an alert on a
        # fixed number of seconds would be wrong for every job with another scrape_timeout.
        self.upstream_deadline_ratio = Histogram(
            f"{PREFIX}_upstream_deadline_ratio",
            "Time to the exporter's last byte as a share of the scrape's upstream deadline "
            "(the scraper's timeout less PROXY_SCRAPE_TIMEOUT_MARGIN); 1 means the deadline ran out.",
            buckets=_DEADLINE_BUCKETS,
            registry=r,
        )

        self.relabel_samples = Counter(
            f"{PREFIX}_relabel_samples",
            "Samples seen by the relabel rules, by result (kept, dropped, or unparsable and passed through).",
            ["result"],
            registry=r,
        )
        for result in ("kept", "dropped", "unparsable"):
            self.relabel_samples.labels(result)
        self.relabel_cache_hits = Counter(
            f"{PREFIX}_relabel_cache_hits",
            "Samples whose relabel outcome came from the cache.",
            registry=r,
        )
        self.relabel_cache_misses = Counter(
            f"{PREFIX}_relabel_cache_misses",
            "Samples whose relabel outcome had to be computed.",
            registry=r,
        )
        self.relabel_cache_series = Gauge(
            f"{PREFIX}_relabel_cache_series",
            "Series whose relabel outcome is cached.",
            registry=r,
        )

        # collect[] push-down (pushdown.py): how often scrapes are narrowed, the full scrapes that
        # learn the exporter's collectors, and narrowed requests retried in full.
        self.narrowed_scrapes = Counter(
            f"{PREFIX}_narrowed_scrapes",
            "Upstream requests sent with collect[] narrowed to the collectors the rules can keep "
            "(PROXY_COLLECTOR_PUSHDOWN).",
            registry=r,
        )
        self.learning_scrapes = Counter(
            f"{PREFIX}_learning_scrapes",
            "Full upstream requests read to learn the exporter's enabled collectors: the first "
            "scrape with rules, every PROXY_COLLECTOR_REFRESH seconds, and after a retry.",
            registry=r,
        )
        self.narrowing_retries = Counter(
            f"{PREFIX}_narrowing_retries",
            "Narrowed upstream requests asked again in full within the same scrape: the exporter "
            "answered 400 (rejected) or had restarted since it was learned (restarted).",
            ["reason"],
            registry=r,
        )
        for reason in ("rejected", "restarted"):
            self.narrowing_retries.labels(reason)
        self.pushdown_collectors = Gauge(
            f"{PREFIX}_pushdown_collectors",
            "Collectors a narrowed scrape asks the exporter for; 0 while scrapes are not narrowed.",
            registry=r,
        )

        self.open_connections = Gauge(
            f"{PREFIX}_open_connections",
            "Client connections open now.",
            registry=r,
        )
        self.refused_connections = Counter(
            f"{PREFIX}_refused_connections",
            "Client connections closed by the proxy: at PROXY_MAX_CONNECTIONS with every "
            "connection busy, answered 503 (limit); at the cap, an idle connection closed to make "
            "room for a new one (idle_evicted); no complete request head within "
            "PROXY_HEADER_TIMEOUT (header_timeout); or a head over 64 KiB (head_too_large).",
            ["reason"],
            registry=r,
        )
        for reason in ("limit", "idle_evicted", "header_timeout", "head_too_large"):
            self.refused_connections.labels(reason)
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "Requests refused with 401 by basic auth.",
            registry=r,
        )

    def watch_relabel_cache(self, cache: Sized) -> None:
        self.relabel_cache_series.set_function(lambda: len(cache))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Serialize in the format the scraper prefers (OpenMetrics or text 0.0.4)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(_WithoutCreated(self.registry)), content_type


class _WithoutCreated:
    """A view of a registry with every `_created` sample left out (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            if any(sample.name == created for sample in metric.samples):
                metric = copy.copy(metric)
                metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric
