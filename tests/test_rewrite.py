"""The streaming rewriter and the exposition parser: families, formats, chunking and fuzzing."""

from __future__ import annotations

import gzip
import importlib.resources
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from proxy.exposition import format_series, parse_metadata, parse_sample, without_protobuf
from proxy.relabel import parse_rules
from proxy.rewrite import (
    LINE_CAP,
    BodyRewrite,
    BrokenBody,
    LineTooLong,
    NamelessSeries,
    Rewriter,
    RuleSet,
    rewrite_bytes,
)

CAPTURE = (importlib.resources.files("proxy") / "data" / "windows_exporter-0.20.0.prom").read_bytes()
NODE_KEEP_LIST = (
    "windows_cpu_time_total|windows_logical_disk_free_bytes|windows_logical_disk_size_bytes|"
    "windows_memory_.*|windows_net_bytes_received_total|windows_net_bytes_sent_total|windows_os_.*|"
    "windows_system_.*"
)


def rules(*config: dict) -> RuleSet:
    return RuleSet(parse_rules(list(config)))


def keep(pattern: str) -> RuleSet:
    return rules({"source_labels": ["__name__"], "regex": pattern, "action": "keep"})


def samples(text: str, openmetrics: bool = False) -> list[tuple[str, tuple, float]]:
    families = parse_openmetrics(text) if openmetrics else parse_text(text)
    out = []
    for family in families:
        for s in family.samples:
            # An empty label value means no label, in Prometheus and in the rewriter's output.
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if v))
            out.append((s.name, labels, repr(float(s.value))))
    return sorted(out, key=repr)


def typed(text: str) -> dict[str, str]:
    return {f.name: f.type for f in parse_text(text)}


# --- the parser -------------------------------------------------------------------------------------


def test_parse_sample_with_escapes_quoted_names_and_exemplar() -> None:
    line = b'windows_service_info{display_name="A \\"q\\" \\\\ b\\nc",name="x"} 1 # {trace_id="t"} 2 3'
    series, name, labels, tail = parse_sample(line)  # type: ignore[misc]
    assert name == "windows_service_info"
    assert labels == [("display_name", 'A "q" \\ b\nc'), ("name", "x")]
    assert series == line[: line.index(b"} ") + 1]
    assert tail == b'1 # {trace_id="t"} 2 3'
    series, name, labels, tail = parse_sample('{"my.metric","lé.bel"="v",} NaN 1700000000000'.encode())  # type: ignore[misc]
    assert (name, labels, tail) == ("my.metric", [("lé.bel", "v")], b"NaN 1700000000000")


@pytest.mark.parametrize(
    "line",
    [b"no_value", b"x{a=b} 1", b'x{a="b" 1', b"x{} ", b'x{a="b"}1', b'{"a","b"} 1', b"\xff 1", b'x{a="\\'],
)
def test_malformed_samples_are_rejected(line: bytes) -> None:
    assert parse_sample(line) is None


def test_format_series_escapes_and_quotes() -> None:
    assert format_series("m", [("a", 'x"y\\z\nw'), ("b", "")]) == b'm{a="x\\"y\\\\z\\nw"}'
    assert format_series("my.metric", [("lé", "v")]) == '{"my.metric","lé"="v"}'.encode()
    assert format_series("up", []) == b"up"


def test_metadata_lines() -> None:
    assert parse_metadata(b"# TYPE foo counter") == (b"TYPE", b"foo", b" counter")
    assert parse_metadata(b'# HELP "my.metric" text') == (b"HELP", b"my.metric", b" text")
    assert parse_metadata(b"# just a comment") is None


def test_protobuf_is_stripped_from_accept() -> None:
    accept = (
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,"
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
    )
    assert (
        without_protobuf(accept)
        == "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
    )


# --- passthrough and keep-everything --------------------------------------------------------------------


def without_repeated_metadata(body: bytes) -> bytes:
    """The capture repeats one family's HELP and TYPE; the rewriter writes a family's metadata once."""
    seen: set[bytes] = set()
    lines = []
    for line in body.splitlines(keepends=True):
        if line.startswith((b"# HELP ", b"# TYPE ")):
            if line in seen:
                continue
            seen.add(line)
        lines.append(line)
    return b"".join(lines)


def test_no_rules_keeps_the_capture_byte_identical_but_for_repeated_metadata() -> None:
    expected = without_repeated_metadata(CAPTURE)
    assert len(expected) == len(CAPTURE) - 108  # the second HELP and TYPE of windows_mssql_locks_deadlocks
    assert rewrite_bytes(CAPTURE, RuleSet([]), openmetrics=False) == expected


def test_merged_families_get_their_metadata_once() -> None:
    body = (
        b'# HELP disk_free_bytes Free.\n# TYPE disk_free_bytes gauge\ndisk_free_bytes{volume="C:"} 1\n'
        b'# HELP disk_size_bytes Size.\n# TYPE disk_size_bytes gauge\ndisk_size_bytes{volume="C:"} 2\n'
    )
    merge = rules(
        {"source_labels": ["__name__"], "regex": "disk_(free|size)_bytes", "target_label": "kind"},
        {
            "source_labels": ["__name__"],
            "regex": "disk_.*_bytes",
            "target_label": "__name__",
            "replacement": "disk_bytes",
        },
    )
    out = rewrite_bytes(body, merge, openmetrics=False)
    assert out == (
        b"# HELP disk_bytes Free.\n# TYPE disk_bytes gauge\n"
        b'disk_bytes{kind="free",volume="C:"} 1\ndisk_bytes{kind="size",volume="C:"} 2\n'
    )


def test_a_series_whose_name_the_rules_remove_fails_the_scrape() -> None:
    nameless = rules(
        {"source_labels": ["kind"], "regex": "nan", "target_label": "__name__", "replacement": ""}
    )
    assert rewrite_bytes(b'v{kind="one"} 1\n', nameless, openmetrics=False) == b'v{kind="one"} 1\n'
    with pytest.raises(NamelessSeries, match="removed the metric name"):
        rewrite_bytes(b'v{kind="one"} 1\nv{kind="nan"} NaN\n', nameless, openmetrics=False)


def test_a_name_the_validation_refuses_breaks_the_body_as_prometheus_fails_the_scrape() -> None:
    """Prometheus checks each series after relabeling under its scheme ("invalid metric name or label
    names") and fails the whole scrape: under legacy, the rewriter must not serve `edge-value`
    (which output escaping would otherwise turn into a valid `edge_value`)."""
    raw = [{"source_labels": ["kind"], "regex": "(.*)", "target_label": "__name__", "replacement": "edge-$1"}]
    body = b'v{kind="value"} 1\n'
    legacy = RuleSet(parse_rules(raw, validation="legacy"))
    with pytest.raises(NamelessSeries, match="legacy validation refuses"):
        rewrite_bytes(body, legacy, openmetrics=False)
    utf8 = RuleSet(parse_rules(raw, validation="utf8"))
    assert rewrite_bytes(body, utf8, openmetrics=False) == b'{"edge-value",kind="value"} 1\n'


def test_rules_that_keep_everything_keep_every_sample() -> None:
    capture = without_repeated_metadata(CAPTURE)  # this parser would type the repeat apart
    out = rewrite_bytes(
        capture, rules({"regex": "nothing_has_this_name", "action": "labeldrop"}), openmetrics=False
    )
    assert samples(out.decode()) == samples(capture.decode())


def test_adding_a_label_keeps_every_sample_with_the_label() -> None:
    capture = without_repeated_metadata(CAPTURE)  # this parser would type the repeat apart
    out = rewrite_bytes(
        capture, rules({"target_label": "node", "replacement": "akswin000001"}), openmetrics=False
    )
    before, after = samples(capture.decode()), samples(out.decode())
    assert len(after) == len(before) == 1728
    assert all(("node", "akswin000001") in labels for _, labels, _ in after)
    assert typed(out.decode()) == typed(capture.decode())  # metadata is untouched


# --- filtering and family rules -------------------------------------------------------------------------


def test_keep_list_keeps_only_matching_families_with_their_metadata() -> None:
    out = rewrite_bytes(CAPTURE, keep(NODE_KEEP_LIST), openmetrics=False).decode()
    names = {name for name, _, _ in samples(out)}
    assert "windows_cpu_time_total" in names
    assert all(
        n.startswith(
            (
                "windows_cpu_time_total",
                "windows_logical_disk_",
                "windows_memory_",
                "windows_net_bytes_",
                "windows_os_",
                "windows_system_",
            )
        )
        for n in names
    )
    for line in out.splitlines():
        if line.startswith("# "):
            assert line.split()[2] in names  # no metadata for families that kept nothing
    # HELP and TYPE come right before the family's first sample
    lines = out.splitlines()
    first = lines.index("# TYPE windows_cpu_time_total counter")
    assert lines[first - 1].startswith("# HELP windows_cpu_time_total ")
    assert lines[first + 1].startswith("windows_cpu_time_total{")


def test_histogram_and_summary_members_stay_one_family() -> None:
    body = (
        b"# HELP req Request latency.\n# TYPE req histogram\n"
        b'req_bucket{le="0.1"} 1\nreq_bucket{le="+Inf"} 2\nreq_sum 0.3\nreq_count 2\n'
        b"# HELP gc Pauses.\n# TYPE gc summary\n"
        b'gc{quantile="0.5"} 0.1\ngc_sum 1\ngc_count 3\n'
    )
    out = rewrite_bytes(body, rules({"regex": "none", "action": "labeldrop"}), openmetrics=False)
    assert out == body
    # dropping the buckets keeps the family's metadata for its _sum and _count
    out = rewrite_bytes(
        body, rules({"source_labels": ["le"], "regex": ".+", "action": "drop"}), openmetrics=False
    )
    assert out.startswith(b"# HELP req Request latency.\n# TYPE req histogram\nreq_sum 0.3\n")


def test_consistent_rename_moves_the_metadata() -> None:
    body = (
        b"# HELP req Request latency.\n# TYPE req histogram\n"
        b'req_bucket{le="+Inf"} 2\nreq_sum 0.3\nreq_count 2\n'
    )
    rename = rules(
        {
            "source_labels": ["__name__"],
            "regex": "req_(.*)",
            "target_label": "__name__",
            "replacement": "http_req_$1",
        }
    )
    out = rewrite_bytes(body, rename, openmetrics=False).decode()
    assert out.splitlines()[:2] == ["# HELP http_req Request latency.", "# TYPE http_req histogram"]
    assert typed(out) == {"http_req": "histogram"}


def test_inconsistent_rename_drops_the_metadata() -> None:
    body = b'# HELP req Latency.\n# TYPE req histogram\nreq_bucket{le="+Inf"} 2\nreq_sum 0.3\nreq_count 2\n'
    rename = rules(
        {
            "source_labels": ["__name__"],
            "regex": "req_sum",
            "target_label": "__name__",
            "replacement": "other",
        }
    )
    out = rewrite_bytes(body, rename, openmetrics=False).decode()
    assert "# TYPE" not in out
    assert "# HELP" not in out
    assert samples(out) == sorted(
        [("req_bucket", (("le", "+Inf"),), "2.0"), ("other", (), "0.3"), ("req_count", (), "2.0")], key=repr
    )


def test_a_rename_that_keeps_the_name_keeps_the_metadata() -> None:
    body = b"# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 2\n"
    rename = rules(
        {"source_labels": ["__name__"], "regex": "b", "target_label": "__name__", "replacement": "c"}
    )
    assert (
        rewrite_bytes(body, rename, openmetrics=False)
        == b"# HELP a A.\n# TYPE a gauge\na 1\n# HELP c B.\n# TYPE c gauge\nc 2\n"
    )


# --- OpenMetrics ---------------------------------------------------------------------------------------

OPENMETRICS = (
    b"# HELP windows_cpu_time_seconds Time.\n# TYPE windows_cpu_time_seconds counter\n"
    b"# UNIT windows_cpu_time_seconds seconds\n"
    b'windows_cpu_time_seconds_total{mode="idle"} 1.5 # {trace_id="abc"} 1 1700000000.5\n'
    b'windows_cpu_time_seconds_created{mode="idle"} 1700000000\n'
    b"# HELP windows_service_state State.\n# TYPE windows_service_state gauge\n"
    b'windows_service_state{name="a"} NaN\nwindows_service_state{name="b"} +Inf 1700000000.250\n'
    b"# EOF\n"
)


def test_openmetrics_keeps_eof_last_and_carries_values_raw() -> None:
    out = rewrite_bytes(OPENMETRICS, keep("windows_cpu_.*"), openmetrics=True)
    assert out.endswith(b"# EOF\n")
    assert b"windows_service_state" not in out
    assert b'# {trace_id="abc"} 1 1700000000.5' in out
    assert b"# UNIT windows_cpu_time_seconds seconds\n" in out
    families = list(parse_openmetrics(out.decode()))
    assert [f.name for f in families] == ["windows_cpu_time_seconds"]
    out = rewrite_bytes(OPENMETRICS, keep("windows_service_.*"), openmetrics=True)
    assert b"NaN\n" in out
    assert b"+Inf 1700000000.250\n" in out
    assert [f.name for f in parse_openmetrics(out.decode())] == ["windows_service_state"]


def test_openmetrics_round_trip_keeps_every_sample() -> None:
    out = rewrite_bytes(OPENMETRICS, rules({"target_label": "node", "replacement": "n1"}), openmetrics=True)
    assert len(samples(out.decode(), openmetrics=True)) == len(
        samples(OPENMETRICS.decode(), openmetrics=True)
    )


def test_bom_is_stripped_even_split_across_chunks() -> None:
    body = b"\xef\xbb\xbf# TYPE up gauge\nup 1\n"
    whole = rewrite_bytes(body, keep("up"), openmetrics=False)
    assert whole == b"# TYPE up gauge\nup 1\n"
    rewriter = Rewriter(keep("up"), openmetrics=False)
    out = rewriter.feed(body[:1]) + rewriter.feed(body[1:2]) + rewriter.feed(body[2:]) + rewriter.finish()
    assert out == whole


def test_unparsable_lines_pass_through_and_are_counted() -> None:
    body = b'# TYPE up gauge\nup 1\nthis is not { a sample\nup{x="1"} 2\n'
    rewriter = Rewriter(keep("up"), openmetrics=False)
    out = rewriter.feed(body) + rewriter.finish()
    assert b"this is not { a sample\n" in out
    assert rewriter.stats.unparsable == 1
    assert rewriter.stats.kept == 2


def test_duplicate_label_names_stay_unparsable() -> None:
    # (Filters on the metric name alone never decode labels, so only rules that read them see this.)
    rewriter = Rewriter(rules({"target_label": "n", "replacement": "x"}), openmetrics=False)
    out = rewriter.feed(b'm{a="1",a="2"} 1\n') + rewriter.finish()
    assert out == b'm{a="1",a="2"} 1\n'
    assert rewriter.stats.unparsable == 1


def test_cache_hits_on_the_second_scrape_and_stays_bounded() -> None:
    rule_set = RuleSet(
        parse_rules([{"source_labels": ["__name__"], "regex": "windows_.*", "action": "keep"}]),
        cache_size=500,
    )
    # The capture repeats one family (14 series): those hit the cache already on the first scrape.
    unique = {parse_sample(line)[0] for line in CAPTURE.splitlines() if line and not line.startswith(b"#")}  # type: ignore[index]
    first = Rewriter(rule_set, openmetrics=False)
    first.feed(CAPTURE)
    first.finish()
    assert len(unique) == 1714
    assert first.stats.cache_misses + first.stats.cache_hits == 1728
    assert len(rule_set.cache) == 500
    small = RuleSet(rule_set.rules, cache_size=10_000)
    Rewriter(small, openmetrics=False).feed(CAPTURE)
    second = Rewriter(small, openmetrics=False)
    second.feed(CAPTURE)
    second.finish()
    assert second.stats.cache_hits == 1728
    assert second.stats.cache_misses == 0


# --- chunk boundaries -------------------------------------------------------------------------------------

SMALL = CAPTURE[:3000] + b"\n"  # a few families, cut at a line end


@pytest.mark.parametrize("rule_set", [keep("go_.*"), rules({"target_label": "n", "replacement": "x"})])
def test_every_split_point_gives_the_same_output(rule_set: RuleSet) -> None:
    expected = rewrite_bytes(SMALL, rule_set, openmetrics=False)
    for cut in range(len(SMALL) + 1):
        rewriter = Rewriter(rule_set, openmetrics=False)
        out = rewriter.feed(SMALL[:cut]) + rewriter.feed(SMALL[cut:]) + rewriter.finish()
        assert out == expected, cut


def test_random_chunking_of_the_whole_capture() -> None:
    rule_set = keep(NODE_KEEP_LIST)
    expected = rewrite_bytes(CAPTURE, rule_set, openmetrics=False)
    rng = random.Random(7)
    for _ in range(30):
        rewriter = Rewriter(rule_set, openmetrics=False)
        out, pos = [], 0
        while pos < len(CAPTURE):
            step = rng.choice([1, 7, 100, 4096, 65536])
            out.append(rewriter.feed(CAPTURE[pos : pos + step]))
            pos += step
        out.append(rewriter.finish())
        assert b"".join(out) == expected


# --- gzip from the exporter -------------------------------------------------------------------------------


def test_gzipped_upstream_is_decoded_in_pieces() -> None:
    compressed = gzip.compress(CAPTURE)
    body = BodyRewrite(keep("go_.*"), openmetrics=False, gzipped=True)
    out = (
        b"".join(body.feed(compressed[i : i + 1000]) for i in range(0, len(compressed), 1000)) + body.finish()
    )
    assert out == rewrite_bytes(CAPTURE, keep("go_.*"), openmetrics=False)


def test_corrupt_or_truncated_gzip_is_a_broken_body() -> None:
    compressed = bytearray(gzip.compress(CAPTURE))
    body = BodyRewrite(keep(".*"), openmetrics=False, gzipped=True)
    body.feed(bytes(compressed[: len(compressed) // 2]))
    with pytest.raises(BrokenBody, match="ended early"):
        body.finish()
    compressed[100:110] = b"\x00" * 10
    body = BodyRewrite(keep(".*"), openmetrics=False, gzipped=True)
    with pytest.raises(BrokenBody, match="corrupt"):
        body.feed(bytes(compressed))


# --- the line cap -----------------------------------------------------------------------------------------

PIECE = 4096  # what a socket read tends to deliver
RENAME = {"source_labels": ["__name__"], "regex": "(.*)", "target_label": "__name__", "replacement": "${1}"}


def long_sample(length: int) -> bytes:
    """A valid sample line of exactly `length` bytes before its newline: one long label value."""
    head, tail = b'windows_long{value="', b'"} 1'
    return head + b"a" * (length - len(head) - len(tail)) + tail


def in_pieces(rewriter: Rewriter | BodyRewrite, data: bytes, piece: int = PIECE) -> bytes:
    out = [rewriter.feed(data[i : i + piece]) for i in range(0, len(data), piece)]
    return b"".join(out) + rewriter.finish()


@pytest.mark.parametrize("rule_set", [keep("windows_.*"), rules(RENAME)], ids=["filter", "rename"])
def test_a_line_one_byte_over_the_cap_fails_and_one_at_the_cap_does_not(rule_set: RuleSet) -> None:
    line = long_sample(LINE_CAP + 1)
    at_cap = Rewriter(rule_set, openmetrics=False)
    over = Rewriter(rule_set, openmetrics=False)
    for i in range(0, LINE_CAP, PIECE):  # exactly LINE_CAP bytes of the line, no newline yet
        assert at_cap.feed(line[i : i + PIECE]) == b""
        assert over.feed(line[i : i + PIECE]) == b""
    # The cap is on the bytes before the newline: a newline now completes a line of LINE_CAP bytes...
    assert at_cap.feed(b"\n") + at_cap.finish() == line[:LINE_CAP] + b"\n"
    # ...and one byte more is past it, whether a newline follows in the same piece or not.
    with pytest.raises(LineTooLong, match=r"^a line longer than 1 MiB \(1048576 bytes\)$"):
        over.feed(line[LINE_CAP:])
    with pytest.raises(LineTooLong):
        Rewriter(rule_set, openmetrics=False).feed(line + b"\n")  # the whole line in one piece
    whole = Rewriter(rule_set, openmetrics=False)
    assert whole.feed(line[:LINE_CAP] + b"\n") + whole.finish() == line[:LINE_CAP] + b"\n"


@pytest.mark.parametrize("rule_set", [keep("windows_.*"), rules(RENAME)], ids=["filter", "rename"])
def test_a_line_over_the_cap_fails_however_it_arrives(rule_set: RuleSet) -> None:
    line = long_sample(LINE_CAP + 1)
    body = b"# TYPE windows_long gauge\n" + line + b"\nwindows_short 2\n"
    assert issubclass(LineTooLong, BrokenBody)  # so the app treats it as a body it cannot rewrite
    with pytest.raises(LineTooLong):
        rewrite_bytes(body, rule_set, openmetrics=False)  # whole, the way the `relabel` dry run feeds it
    with pytest.raises(LineTooLong):
        in_pieces(Rewriter(rule_set, openmetrics=False), body)
    last = body[: -len(b"\nwindows_short 2\n")]  # the long line last, without its newline
    with pytest.raises(LineTooLong):
        in_pieces(Rewriter(rule_set, openmetrics=False), last)
    gzipped = BodyRewrite(rule_set, openmetrics=False, gzipped=True)
    with pytest.raises(LineTooLong):
        in_pieces(gzipped, gzip.compress(body), piece=1000)


@pytest.mark.parametrize("rule_set", [keep("windows_.*"), rules(RENAME)], ids=["filter", "rename"])
def test_a_long_but_legal_line_passes_byte_identical(rule_set: RuleSet) -> None:
    body = (
        b"# HELP windows_long A long one.\n# TYPE windows_long gauge\n"
        + long_sample(LINE_CAP)
        + b"\n# TYPE windows_short gauge\nwindows_short 2\n"
    )
    assert rewrite_bytes(body, rule_set, openmetrics=False) == body
    assert in_pieces(Rewriter(rule_set, openmetrics=False), body) == body
    assert in_pieces(Rewriter(rule_set, openmetrics=False), body, piece=65536 + 3) == body
    gzipped = BodyRewrite(rule_set, openmetrics=False, gzipped=True)
    assert in_pieces(gzipped, gzip.compress(body), piece=1000) == body
    last = body + long_sample(LINE_CAP)  # a last line at the cap, without its newline
    assert in_pieces(Rewriter(rule_set, openmetrics=False), last) == last + b"\n"


def test_a_long_line_grows_one_buffer_in_place_rather_than_a_copy_per_piece() -> None:
    """The work on a long line is linear in its length.

    The rewriter used to hold an unfinished line as bytes and do `held + piece` on every feed, which
    copies the whole line so far each time: O(n^2) for a line of n bytes in small pieces (an 8 MiB
    line in 4 KiB pieces took seconds of event-loop time). It now appends each piece to one
    bytearray (amortized O(piece)) and joins it once, when the newline comes. Timing belongs in the
    benchmarks; this asserts the structure that makes it linear.
    """
    rewriter = Rewriter(keep("windows_.*"), openmetrics=False)
    line = long_sample(LINE_CAP)
    assert rewriter.feed(line[:PIECE]) == b""
    held = rewriter._pending
    assert isinstance(held, bytearray)
    for i in range(PIECE, LINE_CAP, PIECE):
        assert rewriter.feed(line[i : i + PIECE]) == b""
        assert rewriter._pending is held  # the same buffer, grown in place
        assert len(held) == i + PIECE
    assert rewriter.feed(b"\n") == line + b"\n"
    assert len(rewriter._pending) == 0


# --- fuzzing ----------------------------------------------------------------------------------------------

_name = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
_value_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
_number = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["NaN", "+Inf", "-Inf"]),
)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def expositions(draw: st.DrawFn) -> str:
    lines = []
    for family in draw(st.lists(_name, min_size=1, max_size=5, unique=True)):
        kind = draw(st.sampled_from(["gauge", "counter", "untyped"]))
        lines.append(f"# HELP {family} Help for {family}.")
        lines.append(f"# TYPE {family} {kind}")
        seen = set()
        for _ in range(draw(st.integers(1, 4))):
            labels = draw(
                st.dictionaries(_name.filter(lambda n: not n.startswith("__")), _value_text, max_size=3)
            )
            key = tuple(sorted(labels.items()))
            if key in seen:
                continue
            seen.add(key)
            text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{family}{{{text}}} {draw(_number)}" if text else f"{family} {draw(_number)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(body=expositions(), cut=st.integers(0, 10_000))
def test_random_expositions_survive_a_keep_everything_round_trip(body: str, cut: int) -> None:
    rule_set = rules(
        {"regex": "never_a_label", "action": "labeldrop"}, {"target_label": "extra", "replacement": "1"}
    )
    data = body.encode()
    cut = min(cut, len(data))
    rewriter = Rewriter(rule_set, openmetrics=False)
    out = (rewriter.feed(data[:cut]) + rewriter.feed(data[cut:]) + rewriter.finish()).decode()
    expected = [(name, tuple(sorted((*labels, ("extra", "1")))), v) for name, labels, v in samples(body)]
    assert samples(out) == sorted(expected, key=repr)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_random_bytes_never_crash_the_rewriter(data: bytes, cuts: list[int]) -> None:
    for openmetrics in (False, True):
        for rule_set in (
            keep("a.*"),
            rules(
                {
                    "source_labels": ["__name__"],
                    "regex": "(.*)",
                    "target_label": "__name__",
                    "replacement": "x_$1",
                }
            ),
        ):
            rewriter = Rewriter(rule_set, openmetrics=openmetrics)
            pos = 0
            for cut in sorted(cuts):
                rewriter.feed(data[pos:cut])
                pos = max(pos, cut)
            rewriter.feed(data[pos:])
            rewriter.finish()
    body = BodyRewrite(keep(".*"), openmetrics=False, gzipped=True)
    try:
        body.feed(data)
        body.finish()
    except BrokenBody:
        pass


def test_zlib_streams_are_accepted_too() -> None:
    body = BodyRewrite(keep(".*"), openmetrics=False, gzipped=True)
    assert body.feed(zlib.compress(b"up 1\n")) + body.finish() == b"up 1\n"


def test_a_gzip_bomb_is_inflated_a_step_at_a_time() -> None:
    """A small compressed chunk can inflate a thousandfold: the rewriter must never hold it whole.

    64 MiB of newlines compress to about 64 KB, one upstream chunk. Inflated a step at a time the
    peak stays a few MiB; before, it was the whole body and the list of its split lines (640 MiB).
    Memory, not time, is asserted: tracemalloc counts what Python allocated."""
    import tracemalloc

    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = bomb.compress(b"\n" * (64 << 20)) + bomb.flush()
    assert len(body) < 1 << 20
    transform = BodyRewrite(
        RuleSet(parse_rules([{"regex": "x", "action": "labeldrop"}])), openmetrics=False, gzipped=True
    )
    tracemalloc.start()
    try:
        out = transform.feed(body) + transform.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == b""
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"


def test_a_gzip_bomb_without_newlines_fails_at_the_line_cap_not_at_its_size() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = bomb.compress(b"x" * (64 << 20)) + bomb.flush()
    transform = BodyRewrite(
        RuleSet(parse_rules([{"regex": "x", "action": "labeldrop"}])), openmetrics=False, gzipped=True
    )
    with pytest.raises(LineTooLong):
        transform.feed(body)
    inflated = transform._inflate.unconsumed_tail  # what is left was never inflated
    assert len(inflated) > 0


def test_the_rule_set_remembers_whether_its_output_ever_held_a_quoted_name() -> None:
    keep = RuleSet(parse_rules([{"source_labels": ["__name__"], "regex": NODE_KEEP_LIST, "action": "keep"}]))
    rewrite_bytes(CAPTURE, keep, openmetrics=False)
    assert not keep.quoted_names
    rename = RuleSet(
        parse_rules(
            [
                {
                    "source_labels": ["__name__"],
                    "regex": "windows_cpu_(.*)",
                    "target_label": "__name__",
                    "replacement": "cpu.$1",
                }
            ]
        )
    )
    rewrite_bytes(CAPTURE, rename, openmetrics=False)
    assert rename.quoted_names
    passed = RuleSet(parse_rules([{"regex": "x", "action": "labeldrop"}]))
    rewrite_bytes(b"up 1\n", passed, openmetrics=False)
    assert not passed.quoted_names
    rewrite_bytes(b'{"exporter.utf8",a="b"} 2\n', passed, openmetrics=False)  # an exporter's own
    assert passed.quoted_names
    metadata = RuleSet(parse_rules([{"regex": "x", "action": "labeldrop"}]))
    rewrite_bytes(b'# HELP "a.b" A help text.\n', metadata, openmetrics=False)
    assert metadata.quoted_names
