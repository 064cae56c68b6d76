"""Prometheus text 0.0.4 and OpenMetrics 1.0.0, one line at a time. Pure: no I/O.

Only what a relabeling rewriter needs is parsed: a sample's name and labels, and the name of a
HELP/TYPE/UNIT line. Values, timestamps and exemplars are carried as the raw bytes after the label
set, so NaN, +Inf, integer-millisecond and float-second timestamps and `# {...}` exemplars come out
exactly as they went in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

LEGACY_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LEGACY_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

OPENMETRICS_MEDIA_TYPE = "application/openmetrics-text"
PROTOBUF_MEDIA_TYPE = "application/vnd.google.protobuf"

_NAME = re.compile(rb"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SPACE = re.compile(rb"[ \t]*")
# One item inside braces: a bare or quoted name, optionally `="value"`, then `,` or `}`.
_ITEM = re.compile(
    rb'[ \t]*(?:([a-zA-Z_][a-zA-Z0-9_]*)|"((?:[^"\\\n]|\\.)*)")[ \t]*'
    rb'(?:=[ \t]*"((?:[^"\\\n]|\\.)*)")?[ \t]*([,}])'
)
_ESCAPE = re.compile(r"\\(.)")
# A sample value as Prometheus's parsers take it (Go's ParseFloat plus the spellings of NaN and Inf).
_VALUE_PATTERN = (
    rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+|[Nn][Aa][Nn]|[Ii][Nn][Ff](?:[Ii][Nn][Ii][Tt][Yy])?)"
    rb"(?:[ \t\r]|\Z)"
)
_VALUE = re.compile(_VALUE_PATTERN)
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}

# Sample names a family of each type may hold, in either format (text: counter `x_total` holds
# `x_total`; OpenMetrics: counter `x` holds `x_total` and `x_created`).
MEMBER_SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("", "_info"),
}


def is_openmetrics(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == OPENMETRICS_MEDIA_TYPE


def without_protobuf(accept: str) -> str:
    """The Accept header minus protobuf media ranges, which the rewriter cannot read."""
    kept = [
        part
        for part in accept.split(",")
        if part.split(";", 1)[0].strip().lower() != PROTOBUF_MEDIA_TYPE and part.strip()
    ]
    return ",".join(kept)


def _unescape(raw: bytes) -> str:
    return _unescape_text(raw.decode("utf-8"))


def _unescape_text(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(0)), text)


# The common shape, `name{label="value",...} value`, in one regex; anything else (quoted names,
# white space inside the braces) goes through the general parser below.
_COMMON = re.compile(
    rb"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    rb'(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    rb'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*,?)?)\})?[ \t]+(?=' + _VALUE_PATTERN + rb")"
)
_COMMON_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def split_sample(line: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(series text, metric name, rest) of a well-formed sample, without decoding its labels.

    For rules that only look at the metric name, which is most filtering.
    """
    common = _COMMON.match(line)
    if common is not None:
        series_end = common.end(2) + 1 if common.group(2) is not None else common.end(1)
        return line[:series_end], common.group(1), line[common.end() :]
    parsed = parse_sample(line)
    if parsed is None:
        return None
    return parsed[0], parsed[1].encode("utf-8"), parsed[3]


def parse_sample(line: bytes) -> tuple[bytes, str, list[tuple[str, str]], bytes] | None:
    """Split a sample line into (series text, name, labels, rest after the label set).

    The series text is the line up to the end of the label set; the rest starts at the value.
    None if the line is not a well-formed sample.
    """
    try:
        common = _COMMON.match(line)
        if common is not None:
            raw_labels = common.group(2)
            labels: list[tuple[str, str]] = []
            if raw_labels:
                text = raw_labels.decode("utf-8")
                if "\\" in text:
                    labels = [(k, _unescape_text(v)) for k, v in _COMMON_LABEL.findall(text)]
                else:
                    labels = _COMMON_LABEL.findall(text)
            series_end = common.end(2) + 1 if raw_labels is not None else common.end(1)
            return line[:series_end], common.group(1).decode("ascii"), labels, line[common.end() :]
        return _parse_sample(line)
    except UnicodeDecodeError:
        return None


def _parse_sample(line: bytes) -> tuple[bytes, str, list[tuple[str, str]], bytes] | None:
    name: str | None = None
    pos = 0
    match = _NAME.match(line)
    if match is not None:
        name = match.group().decode("ascii")
        pos = match.end()
    labels: list[tuple[str, str]] = []
    if pos < len(line) and line[pos] == 0x7B:  # "{"
        pos += 1
        after_comma = True
        while True:
            space = _SPACE.match(line, pos)
            assert space is not None
            if after_comma and line[space.end() : space.end() + 1] == b"}":
                pos = space.end() + 1
                break
            item = _ITEM.match(line, pos)
            if item is None:
                return None
            bare, quoted, value, sep = item.groups()
            if value is None:
                # A quoted name without a value is the metric name (UTF-8 names go inside braces).
                if quoted is None or name is not None:
                    return None
                name = _unescape(quoted)
            else:
                label = bare.decode("ascii") if bare is not None else _unescape(quoted)
                labels.append((label, _unescape(value)))
            pos = item.end()
            if sep == b"}":
                break
            after_comma = True
    if name is None or not name:
        return None
    series_end = pos
    space = _SPACE.match(line, pos)
    assert space is not None
    if space.end() == pos or _VALUE.match(line, space.end()) is None:
        return None  # a value must follow, after white space
    return line[:series_end], name, labels, line[space.end() :]


def _escape_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _quote(name: str) -> str:
    return '"' + _escape_value(name) + '"'


@functools.lru_cache(maxsize=4096)
def _label_name_text(label: str) -> str:
    """A label name as written: bare when legacy, quoted otherwise (names repeat: checked once)."""
    return label if LEGACY_LABEL_NAME.match(label) else _quote(label)


@functools.lru_cache(maxsize=4096)
def _is_legacy_metric_name(name: str) -> bool:
    return LEGACY_METRIC_NAME.match(name) is not None


def format_series(name: str, labels: Iterable[tuple[str, str]]) -> bytes:
    """A label set as exposition text: legacy names bare, others quoted; empty values left out."""
    items = [f'{_label_name_text(label)}="{_escape_value(value)}"' for label, value in labels if value]
    if _is_legacy_metric_name(name):
        text = f"{name}{{{','.join(items)}}}" if items else name
    else:
        text = "{" + ",".join([_quote(name), *items]) + "}"
    return text.encode("utf-8")


def parse_metadata(line: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(kind, name, rest) of `# HELP|TYPE|UNIT name rest`, or None for any other line."""
    if not (line.startswith((b"# HELP ", b"# TYPE ", b"# UNIT "))):
        return None
    kind = line[2:6]
    body = line[7:]
    if body.startswith(b'"'):
        end = 1
        while end < len(body):
            if body[end] == 0x5C:  # backslash
                end += 2
                continue
            if body[end] == 0x22:
                break
            end += 1
        if end >= len(body):
            return None
        try:
            name = _unescape(body[1:end]).encode("utf-8")
        except UnicodeDecodeError:
            return None
        return kind, name, body[end + 1 :]
    space = body.find(b" ")
    name, rest = (body, b"") if space < 0 else (body[:space], body[space:])
    if not name:
        return None
    return kind, name, rest


def format_metadata(kind: bytes, name: bytes, rest: bytes) -> bytes:
    text = name.decode("utf-8")
    shown = name if LEGACY_METRIC_NAME.match(text) else _quote(text).encode("utf-8")
    return b"# " + kind + b" " + shown + rest


# Where a quoted name can begin: first inside braces, after a comma, after white space (a quoted name
# in HELP/TYPE/UNIT follows `# HELP `; the parser allows blanks inside braces). A `"` inside a label
# value is always escaped (`\"`), so none of these occurs in a value; HELP text can hold them, which
# only makes the answer a false "maybe".
QUOTED_NAME_MARKS = (b'{"', b',"', b' "', b'\t"')


def may_hold_quoted_name(text: bytes) -> bool:
    """Whether exposition text may hold a quoted (non-legacy) name; False is certain.

    Two-byte needles scan at about 1 GB/s (CPython 3.11); a tab is rare, and one byte is found by
    memchr, so `\t"` is looked for only when a tab is there at all.
    """
    return b'{"' in text or b',"' in text or b' "' in text or (b"\t" in text and b'\t"' in text)


def family_members(name: bytes, metric_type: bytes | None) -> frozenset[bytes]:
    suffixes = MEMBER_SUFFIXES.get((metric_type or b"").decode("ascii", "replace"), ("",))
    return frozenset(name + suffix.encode() for suffix in suffixes)
