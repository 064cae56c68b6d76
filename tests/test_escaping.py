"""Escaping negotiation and name escaping (proxy/escaping.py), as prometheus/common does it."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.escaping import (
    Negotiated,
    Scheme,
    escape_label_name,
    escape_lines,
    escape_metric_name,
    escape_name,
    negotiate,
    parse_accept,
    rules_may_make_non_legacy,
    scraper_content_type,
    upstream_accept,
    upstream_scheme,
    with_escaping,
    without_escaping,
)
from proxy.relabel import parse_rules

CAPTURE = Path(__file__).parent.parent / "proxy" / "data" / "windows_exporter-0.20.0.prom"
TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Transcribed from prometheus/common, model/metric_test.go, TestEscapeName, at commit d2417e2:
# (input, underscores, dots, values).
ESCAPE_NAME_VECTORS = [
    ("", "", "", ""),
    ("no:escaping_required", "no:escaping_required", "no:escaping__required", "no:escaping_required"),
    (
        "mysystem.prod.west.cpu.load",
        "mysystem_prod_west_cpu_load",
        "mysystem_dot_prod_dot_west_dot_cpu_dot_load",
        "U__mysystem_2e_prod_2e_west_2e_cpu_2e_load",
    ),
    (
        "mysystem.prod.west.cpu.load_total",
        "mysystem_prod_west_cpu_load_total",
        "mysystem_dot_prod_dot_west_dot_cpu_dot_load__total",
        "U__mysystem_2e_prod_2e_west_2e_cpu_2e_load__total",
    ),
    ("http.status:sum", "http_status:sum", "http_dot_status:sum", "U__http_2e_status:sum"),
    ("label with 😱", "label_with__", "label__with____", "U__label_20_with_20__1f631_"),
    ("花火", "__", "____", "U___82b1__706b_"),
    ("label with \u0100", "label_with__", "label__with____", "U__label_20_with_20__100_"),
]

# Transcribed from prometheus/common, model/metric_test.go, TestEscapeMetricFamily, at commit d2417e2
# (ValueEncodingEscaping): metric `my.metric` with label `some?label`, and label `some.label`.
FAMILY_VECTORS = [
    ("my.metric", "U__my_2e_metric"),
    ("some?label", "U__some_3f_label"),
    ("some.label", "U__some_2e_label"),
]

# The Accept headers Prometheus v3.14.0 sends, from prometheus/prometheus scrape/scrape_test.go,
# TestAcceptHeader: (header, the scheme in it).
PROMETHEUS_3_ACCEPT = [
    (
        "application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.6,"
        "application/openmetrics-text;version=0.0.1;q=0.5,"
        "text/plain;version=1.0.0;escaping=underscores;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        Scheme.UNDERSCORES,
    ),
    (
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,"
        "application/openmetrics-text;version=1.0.0;escaping=dots;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=dots;q=0.3,"
        "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
        Scheme.DOTS,
    ),
    (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
        "application/openmetrics-text;version=0.0.1;q=0.5,"
        "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        Scheme.ALLOW_UTF8,
    ),
    (
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,"
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,"
        "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
        Scheme.ALLOW_UTF8,
    ),
]
# What Prometheus 2.42 (Debian's) sends: no escaping term.
PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "underscores", "dots", "values"), ESCAPE_NAME_VECTORS)
def test_escape_name_matches_prometheus_common(name: str, underscores: str, dots: str, values: str) -> None:
    assert escape_name(name, Scheme.ALLOW_UTF8) == name
    assert escape_name(name, Scheme.UNDERSCORES) == underscores
    assert escape_name(name, Scheme.DOTS) == dots
    assert escape_name(name, Scheme.VALUES) == values


@pytest.mark.parametrize(("name", "escaped"), FAMILY_VECTORS)
def test_escape_metric_family_vectors(name: str, escaped: str) -> None:
    assert escape_metric_name(name, Scheme.VALUES) == escaped
    assert escape_label_name(name, Scheme.VALUES) == escaped


@pytest.mark.parametrize("scheme", list(Scheme))
def test_legacy_names_are_never_escaped_in_an_exposition(scheme: Scheme) -> None:
    """EscapeMetricFamily leaves legacy names alone, under dots too (which EscapeName would change)."""
    assert escape_metric_name("no:escaping_required", scheme) == "no:escaping_required"
    assert escape_label_name("escaping_required", scheme) == "escaping_required"


@pytest.mark.parametrize(
    ("scheme", "metric", "label"),
    [
        (Scheme.ALLOW_UTF8, "utf-8.label", "utf-8.label"),
        (Scheme.UNDERSCORES, "utf_8_label", "utf_8_label"),
        (Scheme.DOTS, "utf__8_dot_label", "utf__8_dot_label"),
        (Scheme.VALUES, "U__utf_2d_8_2e_label", "U__utf_2d_8_2e_label"),
    ],
)
def test_every_scheme_on_metric_and_label_names(scheme: Scheme, metric: str, label: str) -> None:
    assert escape_metric_name("utf-8.label", scheme) == metric
    assert escape_label_name("utf-8.label", scheme) == label


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (Scheme.UNDERSCORES, "http_status_sum"),
        (Scheme.DOTS, "http_dot_status__sum"),
        (Scheme.VALUES, "U__http_2e_status_3a_sum"),
    ],
)
def test_label_names_come_out_legacy_label_names_colon_included(scheme: Scheme, expected: str) -> None:
    """common keeps `:` in label names (`http_status:sum`), which no Prometheus text parser reads."""
    assert escape_label_name("http.status:sum", scheme) == expected
    assert escape_label_name("a:b", scheme) != "a:b"
    # A metric name keeps its colon, as in common.
    assert ":" in escape_metric_name("http.status:sum", scheme)


# -- negotiation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "scheme"), PROMETHEUS_3_ACCEPT)
@pytest.mark.parametrize("content_type", [TEXT, OPENMETRICS])
def test_prometheus_3_gets_the_scheme_it_asked_for(accept: str, scheme: Scheme, content_type: str) -> None:
    # Text 0.0.4 matches `text/plain;version=0.0.4`, which has no escaping term itself: as in
    # expfmt, the term of the clauses before it holds.
    assert negotiate(accept, content_type) == Negotiated(scheme, named=True)


@pytest.mark.parametrize("content_type", [TEXT, OPENMETRICS, None])
def test_prometheus_2_names_no_scheme_and_gets_underscores(content_type: str | None) -> None:
    assert negotiate(PROMETHEUS_2_ACCEPT, content_type) == Negotiated(Scheme.UNDERSCORES, named=False)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, Negotiated(Scheme.UNDERSCORES, named=False)),
        ("", Negotiated(Scheme.UNDERSCORES, named=False)),
        ("*/*", Negotiated(Scheme.UNDERSCORES, named=False)),
        ("text/plain;escaping=bogus", Negotiated(Scheme.UNDERSCORES, named=False)),
        ("text/plain;version=0.0.4;escaping=values", Negotiated(Scheme.VALUES, named=True)),
        ("text/plain; version=0.0.4; escaping=dots", Negotiated(Scheme.DOTS, named=True)),
        # The matching clause's own term counts; a lower one does not.
        (
            "text/plain;version=0.0.4;escaping=dots;q=0.9,*/*;escaping=values;q=0.1",
            Negotiated(Scheme.DOTS, named=True),
        ),
    ],
)
def test_negotiation_edge_cases(accept: str | None, expected: Negotiated) -> None:
    assert negotiate(accept, TEXT) == expected


def test_parse_accept_orders_by_q_then_concrete_before_wildcards() -> None:
    ranges = parse_accept(PROMETHEUS_2_ACCEPT + ",text/*")
    assert [(r.type, r.subtype, r.q) for r in ranges] == [
        ("application", "openmetrics-text", 1.0),
        ("text", "*", 1.0),
        ("application", "openmetrics-text", 0.75),
        ("text", "plain", 0.5),
        ("*", "*", 0.1),
    ]


def test_upstream_accept_replaces_every_escaping_term() -> None:
    forwarded = {upstream_accept(accept, Scheme.ALLOW_UTF8) for accept, _ in PROMETHEUS_3_ACCEPT[::2]}
    # The two non-protobuf Prometheus 3 headers differ only in their escaping term: one request.
    assert forwarded == {
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
        "application/openmetrics-text;version=0.0.1;escaping=allow-utf-8;q=0.5,"
        "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
        "text/plain;version=0.0.4;escaping=allow-utf-8;q=0.3,*/*;escaping=allow-utf-8;q=0.2"
    }
    assert upstream_accept(PROMETHEUS_2_ACCEPT, Scheme.UNDERSCORES) == (
        "application/openmetrics-text;version=1.0.0;escaping=underscores,"
        "application/openmetrics-text;version=0.0.1;escaping=underscores;q=0.75,"
        "text/plain;version=0.0.4;escaping=underscores;q=0.5,*/*;escaping=underscores;q=0.1"
    )
    assert (
        upstream_accept("application/json, text/plain", Scheme.DOTS)
        == "application/json,text/plain;escaping=dots"
    )
    assert upstream_scheme("utf8") is Scheme.ALLOW_UTF8
    assert upstream_scheme("legacy") is Scheme.UNDERSCORES


def test_content_type_as_client_golang_writes_it() -> None:
    assert with_escaping(TEXT, Scheme.UNDERSCORES) == TEXT + "; escaping=underscores"
    assert with_escaping(TEXT + "; escaping=allow-utf-8", Scheme.VALUES) == TEXT + "; escaping=values"
    assert with_escaping("text/plain;version=0.0.4;escaping=dots", Scheme.DOTS) == (
        "text/plain; version=0.0.4; escaping=dots"
    )
    assert without_escaping(TEXT + "; escaping=allow-utf-8") == TEXT
    assert without_escaping(TEXT) is TEXT
    named = Negotiated(Scheme.UNDERSCORES, named=True)
    unnamed = Negotiated(Scheme.UNDERSCORES, named=False)
    exporter = OPENMETRICS + "; escaping=allow-utf-8"
    assert (
        scraper_content_type(exporter, named, names_may_change=False)
        == OPENMETRICS + "; escaping=underscores"
    )
    assert (
        scraper_content_type(exporter, unnamed, names_may_change=True)
        == OPENMETRICS + "; escaping=underscores"
    )
    assert scraper_content_type(exporter, unnamed, names_may_change=False) == OPENMETRICS
    assert scraper_content_type(TEXT, unnamed, names_may_change=False) is TEXT


# -- which rules can make a name non-legacy --------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "may"),
    [
        ([{"source_labels": ["__name__"], "regex": "windows_cpu_.*", "action": "keep"}], False),
        ([{"source_labels": ["__name__"], "regex": "go_.*", "action": "drop"}], False),
        ([{"regex": "core", "action": "labeldrop"}], False),
        ([{"target_label": "node", "replacement": "n1"}], False),
        ([{"target_label": "__name__", "replacement": "fixed_name"}], False),
        ([{"source_labels": ["__name__"], "target_label": "__name__", "replacement": "win_$1"}], True),
        ([{"target_label": "__name__", "replacement": "foo.bar"}], True),
        ([{"target_label": "utf-8.label", "replacement": "x"}], True),
        ([{"source_labels": ["mode"], "regex": "(.*)", "target_label": "$1"}], True),
        ([{"regex": "(.*)", "action": "labelmap"}], True),
        ([{"regex": "mode", "replacement": "state", "action": "labelmap"}], False),
        ([{"source_labels": ["mode"], "target_label": "__name__", "action": "lowercase"}], True),
        ([{"source_labels": ["mode"], "target_label": "m", "action": "uppercase"}], False),
        (
            [{"source_labels": ["mode"], "target_label": "__name__", "modulus": "4", "action": "hashmod"}],
            True,
        ),
        ([{"source_labels": ["mode"], "target_label": "shard", "modulus": "4", "action": "hashmod"}], False),
        ([{"source_labels": ["mode"], "target_label": "utf-8.label", "action": "keepequal"}], True),
    ],
)
def test_rules_that_may_make_a_name_non_legacy(rules: list[dict[str, str]], may: bool) -> None:
    assert rules_may_make_non_legacy(parse_rules(rules)) is may


# -- exposition chunks -----------------------------------------------------------------------------

UTF8_CHUNK = (
    b'# HELP "windows.cpu.time" Time that processor spent, "quoted" here\n'
    b'# TYPE "windows.cpu.time" counter\n'
    b'{"windows.cpu.time",core="0,0","utf-8.label"="idle"} 162455.59375 1700000000000\n'
    b'{"windows.cpu.time",core="0,1","utf-8.label"="a \\"q\\", b"} NaN\n'
    b'# HELP windows_os_info OS information, "legacy"\n'
    b"# TYPE windows_os_info gauge\n"
    b'windows_os_info{product="Microsoft Windows Server 2019"} 1\n'
    b'# UNIT "disk.size" bytes\n'
    b'{"disk.size"} 3 # {trace_id="x"} 1\n'
)


@pytest.mark.parametrize(
    ("scheme", "name", "label", "size"),
    [
        (Scheme.UNDERSCORES, b"windows_cpu_time", b"utf_8_label", b"disk_size"),
        (Scheme.DOTS, b"windows_dot_cpu_dot_time", b"utf__8_dot_label", b"disk_dot_size"),
        (Scheme.VALUES, b"U__windows_2e_cpu_2e_time", b"U__utf_2d_8_2e_label", b"U__disk_2e_size"),
    ],
)
def test_chunk_escaped_with_help_type_and_unit(
    scheme: Scheme, name: bytes, label: bytes, size: bytes
) -> None:
    expected = (
        b"# HELP " + name + b' Time that processor spent, "quoted" here\n'
        b"# TYPE "
        + name
        + b" counter\n"
        + name
        + b'{core="0,0",'
        + label
        + b'="idle"} 162455.59375 1700000000000\n'
        + name
        + b'{core="0,1",'
        + label
        + b'="a \\"q\\", b"} NaN\n'
        b'# HELP windows_os_info OS information, "legacy"\n'
        b"# TYPE windows_os_info gauge\n"
        b'windows_os_info{product="Microsoft Windows Server 2019"} 1\n'
        b"# UNIT " + size + b" bytes\n" + size + b' 3 # {trace_id="x"} 1\n'
    )
    assert escape_lines(UTF8_CHUNK, scheme) == expected


def test_allow_utf8_chunk_is_untouched() -> None:
    assert escape_lines(UTF8_CHUNK, Scheme.ALLOW_UTF8) is UTF8_CHUNK


def test_help_text_with_quotes_costs_a_parse_but_changes_nothing() -> None:
    chunk = b'# HELP windows_os_info OS information, "legacy"\nwindows_os_info{a="b"} 1\n'
    assert escape_lines(chunk, Scheme.UNDERSCORES) is chunk


def test_unparsable_lines_pass_through() -> None:
    chunk = b'{"foo.bar" 1\n{"ok.name"} 2\n'
    assert escape_lines(chunk, Scheme.UNDERSCORES) == b'{"foo.bar" 1\nok_name 2\n'


def test_a_legacy_name_the_exporter_quoted_is_written_bare() -> None:
    assert escape_lines(b'{"foo",a="b"} 1\n', Scheme.UNDERSCORES) == b'foo{a="b"} 1\n'


@pytest.mark.parametrize("scheme", list(Scheme))
def test_fast_path_returns_the_same_object_on_the_capture(scheme: Scheme) -> None:
    body = CAPTURE.read_bytes()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    for chunk in chunks:
        assert escape_lines(chunk, scheme) is chunk
    assert escape_lines(body, scheme) is body


FAMILY_CHUNK = (
    b'# TYPE "a.b" counter\n{"a.b_total",x="1"} 1\n{"a.b_created"} 1\n{"c.d_total"} 1\n'
    b'# TYPE "h.x" histogram\n{"h.x_bucket",le="+Inf"} 1\n{"h.x_count"} 1\n'
)


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (
            Scheme.UNDERSCORES,
            b'# TYPE a_b counter\na_b_total{x="1"} 1\na_b_created 1\nc_d_total 1\n'
            b'# TYPE h_x histogram\nh_x_bucket{le="+Inf"} 1\nh_x_count 1\n',
        ),
        (
            Scheme.DOTS,
            b'# TYPE a_dot_b counter\na_dot_b_total{x="1"} 1\na_dot_b_created 1\nc_dot_d__total 1\n'
            b'# TYPE h_dot_x histogram\nh_dot_x_bucket{le="+Inf"} 1\nh_dot_x_count 1\n',
        ),
        (
            Scheme.VALUES,
            b'# TYPE U__a_2e_b counter\nU__a_2e_b_total{x="1"} 1\nU__a_2e_b_created 1\nU__c_2e_d__total 1\n'
            b'# TYPE U__h_2e_x histogram\nU__h_2e_x_bucket{le="+Inf"} 1\nU__h_2e_x_count 1\n',
        ),
    ],
)
def test_family_suffixes_follow_the_escaped_family_name(scheme: Scheme, expected: bytes) -> None:
    """client_golang escapes a family's name, then appends `_total`/`_bucket`/...; an untyped
    sample (`c.d_total`) is one name, escaped whole. The memory carries across chunks."""
    assert escape_lines(FAMILY_CHUNK, scheme) == expected
    families: dict[str, frozenset[str]] = {}
    lines = FAMILY_CHUNK.splitlines(keepends=True)
    assert b"".join(escape_lines(line, scheme, families) for line in lines) == expected


def test_a_repeat_scrape_is_escaped_the_same_from_the_cache() -> None:
    chunk = b'{"a.b",v="x} y"} 1\n{"a.b",v="z"} 2 # {t="1"} 3\n{"c.d"} 4\n'
    expected = b'a_b{v="x} y"} 1\na_b{v="z"} 2 # {t="1"} 3\nc_d 4\n'
    assert escape_lines(chunk, Scheme.UNDERSCORES) == expected
    assert escape_lines(chunk, Scheme.UNDERSCORES) == expected
    assert escape_lines(chunk, Scheme.DOTS) == expected.replace(b"a_b", b"a_dot_b").replace(
        b"c_d", b"c_dot_d"
    )
