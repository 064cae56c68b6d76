"""Escaping through the app: each scraper gets rewritten names in the scheme its Accept asked for."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.escaping import Scheme, escape_lines
from proxy.fake_exporter import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, FakeExporter, Fault
from proxy.relabel import parse_rules
from proxy.rewrite import RuleSet, rewrite_bytes
from tests.conftest import LOOPBACK, ProxyFactory
from tests.test_app import raw_get
from tests.test_escaping import PROMETHEUS_2_ACCEPT, PROMETHEUS_3_ACCEPT
from tests.test_rewrite import CAPTURE, NODE_KEEP_LIST

# windows_cpu_time_total becomes `win.cpu.time_total` (OpenMetrics family `win.cpu.time`), and gets
# a label `utf-8.label` from `mode`: a metric name and a label name that are not legacy.
RENAME_YAML = """
metric_relabel_configs:
  - source_labels: [__name__]
    regex: windows_cpu_time_total
    target_label: __name__
    replacement: win.cpu.time_total
  - source_labels: [__name__, mode]
    regex: win\\.cpu\\.time_total;(.+)
    target_label: utf-8.label
"""
KEEP_YAML = f"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: {NODE_KEEP_LIST}
    action: keep
"""
TEXT_ACCEPT = "text/plain;version=0.0.4"
CPU_SAMPLES = sum(1 for line in CAPTURE.split(b"\n") if line.startswith(b"windows_cpu_time_total{"))

# (scraper's Accept, the family name in TYPE, how its samples start, the label name, the escaping
# term in its Content-Type)
SCRAPERS = [
    pytest.param(
        PROMETHEUS_3_ACCEPT[0][0],
        b"win_cpu_time",
        b"win_cpu_time_total{",
        b"utf_8_label",
        "underscores",
        id="p3-underscores",
    ),
    pytest.param(
        PROMETHEUS_3_ACCEPT[1][0],
        b"win_dot_cpu_dot_time",
        b"win_dot_cpu_dot_time_total{",
        b"utf__8_dot_label",
        "dots",
        id="p3-dots",
    ),
    pytest.param(
        PROMETHEUS_3_ACCEPT[2][0],
        b'"win.cpu.time"',
        b'{"win.cpu.time_total",',
        b'"utf-8.label"',
        "allow-utf-8",
        id="p3-utf8",
    ),
    pytest.param(
        PROMETHEUS_3_ACCEPT[3][0],
        b'"win.cpu.time"',
        b'{"win.cpu.time_total",',
        b'"utf-8.label"',
        "allow-utf-8",
        id="p3-proto-utf8",
    ),
    pytest.param(
        PROMETHEUS_2_ACCEPT, b"win_cpu_time", b"win_cpu_time_total{", b"utf_8_label", "underscores", id="p2"
    ),
    pytest.param(
        "application/openmetrics-text;version=1.0.0;escaping=values",
        b"U__win_2e_cpu_2e_time",
        b"U__win_2e_cpu_2e_time_total{",
        b"U__utf_2d_8_2e_label",
        "values",
        id="values",
    ),
]


def rule_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def accepts_seen() -> list[str]:
    return []


@pytest.fixture
async def recorded_fake(
    aiohttp_server: Callable[..., Awaitable[TestServer]], fake: FakeExporter, accepts_seen: list[str]
) -> TestServer:
    """The fake exporter, recording the Accept of every request it gets."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        accepts_seen.append(request.headers.get("Accept", ""))
        return await handler(request)

    app = fake.app()
    app.middlewares.append(record)
    return await aiohttp_server(app, host=LOOPBACK)


@pytest.fixture
async def renaming(make_proxy: ProxyFactory, recorded_fake: TestServer, tmp_path: Path) -> TestClient:
    return await make_proxy(port=recorded_fake.port, relabel_config=str(rule_file(tmp_path, RENAME_YAML)))


def cpu_lines(body: bytes, name: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if name in line]


@pytest.mark.parametrize(("accept", "family", "sample", "label", "term"), SCRAPERS)
async def test_each_scraper_gets_names_in_its_scheme(
    renaming: TestClient,
    accept: str,
    family: bytes,
    sample: bytes,
    label: bytes,
    term: str,
    accepts_seen: list[str],
) -> None:
    status, headers, body = await raw_get(renaming.server.port, "/metrics", {"Accept": accept})
    assert status == 200
    # Every Accept here prefers OpenMetrics, which the fake exporter speaks.
    assert headers["Content-Type"] == f"{OPENMETRICS_CONTENT_TYPE}; escaping={term}"
    assert body.endswith(b"# EOF\n")
    if term != "allow-utf-8":
        assert b'{"' not in body
        assert b',"' not in body
    assert b"# TYPE " + family + b" counter\n" in body
    assert b"# HELP " + family + b" Time that processor spent" in body
    samples = [line for line in body.split(b"\n") if line.startswith(sample)]
    assert len(samples) == CPU_SAMPLES > 0
    assert all(label + b'="' in line for line in samples)
    assert sum(b'core="0,0",mode="idle",' + label + b'="idle"} ' in line for line in samples) == 1
    assert b"windows_cpu_time_total" not in body
    # The exporter was asked in the proxy's own scheme, whatever the scraper's.
    assert len(accepts_seen) == 1
    assert "escaping=allow-utf-8" in accepts_seen[0]
    assert "escaping=underscores" not in accepts_seen[0]
    assert "escaping=dots" not in accepts_seen[0]
    assert "protobuf" not in accepts_seen[0]


async def test_text_format_and_gzip(renaming: TestClient) -> None:
    plain = await raw_get(renaming.server.port, "/metrics", {"Accept": TEXT_ACCEPT})
    zipped = await raw_get(
        renaming.server.port, "/metrics", {"Accept": TEXT_ACCEPT, "Accept-Encoding": "gzip"}
    )
    assert plain[0] == zipped[0] == 200
    for headers in (plain[1], zipped[1]):
        assert headers["Content-Type"] == f"{TEXT_CONTENT_TYPE}; escaping=underscores"
    assert zipped[1]["Content-Encoding"] == "gzip"
    body = gzip.decompress(zipped[2])
    assert body == plain[2]
    assert b"# TYPE win_cpu_time_total counter\n" in body
    assert b'win_cpu_time_total{core="0,0",mode="idle",utf_8_label="idle"} ' in body
    assert b'"win.cpu.time' not in body


async def test_head_gets_the_same_content_type(renaming: TestClient) -> None:
    async with renaming.head("/metrics", headers={"Accept": PROMETHEUS_3_ACCEPT[1][0]}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == f"{OPENMETRICS_CONTENT_TYPE}; escaping=dots"


async def test_scrapers_differing_only_in_escaping_share_one_upstream_request(
    renaming: TestClient, fake: FakeExporter, accepts_seen: list[str]
) -> None:
    fake.fault = Fault.LATENCY
    fake.latency = 0.3
    utf8, underscores, zipped_dots = await asyncio.gather(
        raw_get(renaming.server.port, "/metrics", {"Accept": PROMETHEUS_3_ACCEPT[2][0]}),
        raw_get(renaming.server.port, "/metrics", {"Accept": PROMETHEUS_3_ACCEPT[0][0]}),
        raw_get(
            renaming.server.port,
            "/metrics",
            {"Accept": PROMETHEUS_3_ACCEPT[0][0].replace("underscores", "dots"), "Accept-Encoding": "gzip"},
        ),
    )
    assert fake.scrapes == 1
    assert len(accepts_seen) == 1
    assert utf8[0] == underscores[0] == zipped_dots[0] == 200
    assert utf8[1]["Content-Type"].endswith("; escaping=allow-utf-8")
    assert underscores[1]["Content-Type"].endswith("; escaping=underscores")
    assert zipped_dots[1]["Content-Type"].endswith("; escaping=dots")
    assert b'{"win.cpu.time_total",core="0,0",mode="idle","utf-8.label"="idle"} ' in utf8[2]
    assert b'win_cpu_time_total{core="0,0",mode="idle",utf_8_label="idle"} ' in underscores[2]
    dots = gzip.decompress(zipped_dots[2])
    assert b'win_dot_cpu_dot_time_total{core="0,0",mode="idle",utf__8_dot_label="idle"} ' in dots
    # Apart from the names, the three are the same body.
    assert escape_lines(utf8[2], Scheme.UNDERSCORES) == underscores[2]
    assert escape_lines(utf8[2], Scheme.DOTS) == dots


async def test_all_legacy_rules_leave_bytes_and_content_type_as_before(
    make_proxy: ProxyFactory, recorded_fake: TestServer, tmp_path: Path
) -> None:
    client = await make_proxy(port=recorded_fake.port, relabel_config=str(rule_file(tmp_path, KEEP_YAML)))
    keep = RuleSet(parse_rules([{"source_labels": ["__name__"], "regex": NODE_KEEP_LIST, "action": "keep"}]))
    expected = rewrite_bytes(CAPTURE, keep, openmetrics=False)
    # Prometheus 2 (no escaping term): exactly what it got before escaping existed.
    status, headers, body = await raw_get(client.server.port, "/metrics", {"Accept": TEXT_ACCEPT})
    assert status == 200
    assert headers["Content-Type"] == TEXT_CONTENT_TYPE
    assert body == expected
    # A scraper that named a scheme is told it, as an exporter would; the bytes are the same.
    status, headers, body = await raw_get(
        client.server.port, "/metrics", {"Accept": TEXT_ACCEPT + ";escaping=values"}
    )
    assert status == 200
    assert headers["Content-Type"] == f"{TEXT_CONTENT_TYPE}; escaping=values"
    assert body == expected


async def test_no_piece_is_scanned_for_quoted_names_until_the_rules_let_one_out(
    make_proxy: ProxyFactory, recorded_fake: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The escaper's scan costs about 1 ms per 266 KB body and scraper: a rule set whose output has
    never held a quoted name (RuleSet.quoted_names) must not pay it on every piece."""
    import proxy.scrape

    scanned: list[int] = []

    def counting(chunk: bytes, scheme: Scheme, families: Any = None) -> bytes:
        scanned.append(len(chunk))
        return escape_lines(chunk, scheme, families)

    monkeypatch.setattr(proxy.scrape, "escape_lines", counting)
    client = await make_proxy(port=recorded_fake.port, relabel_config=str(rule_file(tmp_path, KEEP_YAML)))
    for _ in range(2):
        status, _, _ = await raw_get(client.server.port, "/metrics", {"Accept": TEXT_ACCEPT})
        assert status == 200
    assert scanned == []
    renaming = await make_proxy(port=recorded_fake.port, relabel_config=str(rule_file(tmp_path, RENAME_YAML)))
    status, _, body = await raw_get(renaming.server.port, "/metrics", {"Accept": TEXT_ACCEPT})
    assert status == 200
    assert scanned  # once a renamed series is out, every piece is escaped
    assert b'win_cpu_time_total{core="0,0",mode="idle",utf_8_label="idle"} ' in body


# -- an exporter that negotiates escaping itself, as client_golang's promhttp does -----------------

MODERN_BODY = b'# HELP up_like A gauge.\n# TYPE up_like gauge\nup_like{a="b"} 1\n{"exporter.utf8",a="b"} 2\n'


@pytest.fixture
async def modern(aiohttp_server: Callable[..., Awaitable[TestServer]], accepts_seen: list[str]) -> TestServer:
    """Answers text 0.0.4 with `escaping=<what the Accept named>` (underscores by default), and, when
    asked for allow-utf-8, a name that is not legacy of its own."""

    async def metrics(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        accepts_seen.append(accept)
        utf8 = "escaping=allow-utf-8" in accept
        body = MODERN_BODY if utf8 else MODERN_BODY.replace(b'{"exporter.utf8",', b"exporter_utf8{")
        content_type = f"{TEXT_CONTENT_TYPE}; escaping={'allow-utf-8' if utf8 else 'underscores'}"
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return await aiohttp_server(app, host=LOOPBACK)


async def test_the_exporters_escaping_term_is_replaced(
    make_proxy: ProxyFactory, modern: TestServer, tmp_path: Path, accepts_seen: list[str]
) -> None:
    client = await make_proxy(
        port=modern.port,
        relabel_config=str(
            rule_file(tmp_path, "metric_relabel_configs:\n  - regex: x\n    action: labeldrop\n")
        ),
    )
    # Prometheus 2 behind rules that cannot make a name non-legacy: the exporter's type minus its
    # term; the exporter's own UTF-8 name still comes escaped.
    status, headers, body = await raw_get(client.server.port, "/metrics", {"Accept": TEXT_ACCEPT})
    assert status == 200
    assert headers["Content-Type"] == TEXT_CONTENT_TYPE
    assert body == MODERN_BODY.replace(b'{"exporter.utf8",', b"exporter_utf8{")
    assert accepts_seen[-1] == "text/plain;version=0.0.4;escaping=allow-utf-8"
    status, headers, body = await raw_get(
        client.server.port, "/metrics", {"Accept": PROMETHEUS_3_ACCEPT[2][0]}
    )
    assert headers["Content-Type"] == f"{TEXT_CONTENT_TYPE}; escaping=allow-utf-8"
    assert body == MODERN_BODY


async def test_legacy_name_validation_asks_the_exporter_for_underscores(
    make_proxy: ProxyFactory, modern: TestServer, tmp_path: Path, accepts_seen: list[str]
) -> None:
    client = await make_proxy(
        port=modern.port,
        name_validation="legacy",
        relabel_config=str(
            rule_file(tmp_path, "metric_relabel_configs:\n  - regex: x\n    action: labeldrop\n")
        ),
    )
    status, headers, body = await raw_get(
        client.server.port, "/metrics", {"Accept": PROMETHEUS_3_ACCEPT[2][0]}
    )
    assert status == 200
    assert "escaping=underscores" in accepts_seen[-1]
    assert "allow-utf-8" not in accepts_seen[-1]
    # The rules saw (and the scraper gets) the exporter's escaped name, in the scheme it asked for.
    assert headers["Content-Type"] == f"{TEXT_CONTENT_TYPE}; escaping=allow-utf-8"
    assert b'exporter_utf8{a="b"} 2\n' in body


async def test_passthrough_leaves_accept_and_content_type_alone(
    make_proxy: ProxyFactory, modern: TestServer, accepts_seen: list[str]
) -> None:
    client = await make_proxy(port=modern.port)
    for accept, term in (
        (PROMETHEUS_3_ACCEPT[0][0], "underscores"),
        (PROMETHEUS_3_ACCEPT[3][0], "allow-utf-8"),
    ):
        status, headers, _ = await raw_get(client.server.port, "/metrics", {"Accept": accept})
        assert status == 200
        assert accepts_seen[-1] == accept
        assert headers["Content-Type"] == f"{TEXT_CONTENT_TYPE}; escaping={term}"
