"""Name escaping as Prometheus 3 negotiates it: which scheme a scraper asked for, and names in it. Pure.

Prometheus 3 may read metric and label names that are not legacy (`foo.bar`, written quoted:
`{"foo.bar",a="b"}`), and says in its Accept how an exporter should write such names for it:
`escaping=allow-utf-8` (quoted, as they are), `underscores`, `dots` or `values`. Prometheus 2 sends no
escaping term and cannot parse a quoted name at all. The proxy rewrites bodies with rules that can
make names non-legacy, so it has to do what an exporter would: write each scraper's copy in the
scheme that scraper asked for, and say which one in Content-Type.

Everything here follows prometheus/common as read at commit d2417e2 (model/metric.go: EscapeName,
EscapeMetricFamily, ToEscapingScheme; expfmt/encode.go: NegotiateAccept, matchFormat; expfmt/expfmt.go:
Format.WithEscapingScheme), re-implemented, with one deliberate difference for label names
(`escape_label_name`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from proxy.exposition import (
    LEGACY_LABEL_NAME,
    LEGACY_METRIC_NAME,
    MEMBER_SUFFIXES,
    QUOTED_NAME_MARKS,
    format_metadata,
    format_series,
    may_hold_quoted_name,
    parse_metadata,
    parse_sample,
)

ESCAPING_KEY = "escaping"
NAME_LABEL = "__name__"


class Scheme(StrEnum):
    """The escaping schemes, by the names they have in `escaping=` (model.EscapingScheme.String)."""

    ALLOW_UTF8 = "allow-utf-8"
    UNDERSCORES = "underscores"
    DOTS = "dots"
    VALUES = "values"


# What a scraper gets when it names no (known) scheme: expfmt's default, model.NameEscapingScheme.
DEFAULT_SCHEME = Scheme.UNDERSCORES
_BY_NAME = {scheme.value: scheme for scheme in Scheme}


def parse_scheme(text: str) -> Scheme | None:
    """A scheme by its `escaping=` name (exact, as model.ToEscapingScheme); None if unknown."""
    return _BY_NAME.get(text)


# -- names -----------------------------------------------------------------------------------------


def _legacy_char(ch: str, first: bool, *, colon: bool = True) -> bool:
    """model.isValidLegacyRune (digits allowed after the first character); `colon` as metric names."""
    return (
        ("a" <= ch <= "z")
        or ("A" <= ch <= "Z")
        or ch == "_"
        or (colon and ch == ":")
        or (not first and "0" <= ch <= "9")
    )


def _escape(name: str, scheme: Scheme, *, colon: bool) -> str:
    if not name or scheme is Scheme.ALLOW_UTF8:
        return name
    if scheme is Scheme.UNDERSCORES:
        return "".join(ch if _legacy_char(ch, i == 0, colon=colon) else "_" for i, ch in enumerate(name))
    if scheme is Scheme.DOTS:
        # No early return for legacy names here: common's DotsEscaping doubles every underscore
        # (EscapeMetricFamily only ever calls it on non-legacy names, and so does this module).
        out = []
        for i, ch in enumerate(name):
            if ch == "_":
                out.append("__")
            elif ch == ".":
                out.append("_dot_")
            elif _legacy_char(ch, i == 0, colon=colon):
                out.append(ch)
            else:
                out.append("__")
        return "".join(out)
    # VALUES: U__ prefix, `_` doubled, any other character as _<lower-case hex code point>_.
    out = ["U__"]
    for i, ch in enumerate(name):
        if ch == "_":
            out.append("__")
        elif _legacy_char(ch, i == 0, colon=colon):
            out.append(ch)
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # not a valid rune (utf8.ValidRune)
            out.append("_FFFD_")
        else:
            out.append(f"_{ord(ch):x}_")
    return "".join(out)


def escape_name(name: str, scheme: Scheme) -> str:
    """model.EscapeName: `name` in `scheme`, legacy names included (dots escapes their underscores)."""
    if scheme in (Scheme.UNDERSCORES, Scheme.VALUES) and LEGACY_METRIC_NAME.match(name):
        return name
    return _escape(name, scheme, colon=True)


@functools.lru_cache(maxsize=4096)
def escape_metric_name(name: str, scheme: Scheme) -> str:
    """A metric name as EscapeMetricFamily writes it: legacy names as they are, others escaped."""
    if scheme is Scheme.ALLOW_UTF8 or LEGACY_METRIC_NAME.match(name):
        return name
    return _escape(name, scheme, colon=True)


@functools.lru_cache(maxsize=4096)
def escape_label_name(name: str, scheme: Scheme) -> str:
    """A label name escaped so that it comes out a legacy *label* name.

    The one place this differs from prometheus/common: EscapeMetricFamily checks and escapes label
    names with the metric-name rules, which allow `:`, so it leaves `a:b` as it is and turns
    `http.status:sum` into `http_status:sum`. No Prometheus text parser takes `:` in a bare label
    name (Prometheus 2.42's promlex.l: `{L}({L}|{D})*` with L = [a-zA-Z_]), so a scraper that asked
    for escaping would fail the scrape. Here `:` in a label name is one more character to escape:
    `_` (underscores), `__` (dots, as for any other character), `_3a_` (values, which UnescapeName
    still turns back into `:`).
    """
    if scheme is Scheme.ALLOW_UTF8 or LEGACY_LABEL_NAME.match(name):
        return name
    return _escape(name, scheme, colon=False)


# -- negotiation -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One clause of an Accept header, as goautoneg parses it (which expfmt uses)."""

    type: str
    subtype: str
    q: float
    params: tuple[tuple[str, str], ...]

    def param(self, key: str) -> str:
        for k, v in reversed(self.params):
            if k == key:
                return v  # the last one, as goautoneg's map keeps it
        return ""


def _media_range(part: str) -> MediaRange | None:
    pieces = part.strip(" ").split(";")
    kind = pieces[0].split("/")
    main = kind[0].strip(" ").lower()
    if len(kind) == 1 and main == "*":
        sub = "*"
    elif len(kind) == 2:
        sub = kind[1].strip(" ").lower()
    else:
        return None
    q = 1.0
    params: list[tuple[str, str]] = []
    for param in pieces[1:]:
        key, eq, value = param.partition("=")
        if not eq:
            continue
        key = key.strip(" ").lower()
        if key == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        else:
            params.append((key, value.strip(" ")))
    return MediaRange(main, sub, q, tuple(params))


def parse_accept(header: str | None) -> list[MediaRange]:
    """goautoneg.ParseAccept: the clauses, highest q first, then concrete types before wildcards.

    Types and parameter names are compared case-insensitively (goautoneg is case-sensitive; every
    scraper writes them in lower case, so this only forgives odd clients).
    """
    ranges = [r for r in map(_media_range, (header or "").split(",")) if r is not None]
    ranges.sort(key=lambda r: (-r.q, r.type == "*", r.subtype == "*"))
    return ranges


def _matches(clause: MediaRange, target: MediaRange) -> bool:
    """expfmt's matchFormat: type, subtype and every parameter of the target but charset."""
    if clause.type != "*" and clause.type != target.type:
        return False
    if clause.subtype != "*" and clause.subtype != target.subtype:
        return False
    if clause.type == "*" and clause.subtype == "*":
        return True
    version = clause.param("version")
    if not version and (clause.type, clause.subtype) == ("application", "openmetrics-text"):
        version = "0.0.1"
    if not version and (clause.type, clause.subtype) == ("text", "plain"):
        version = "0.0.4"
    for key, value in target.params:
        if key in ("charset", ESCAPING_KEY):
            continue
        if (version if key == "version" else clause.param(key)) != value:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Negotiated:
    scheme: Scheme
    named: bool  # the scraper's Accept named the scheme (False: expfmt's default)


def negotiate(accept: str | None, content_type: str | None) -> Negotiated:
    """The scheme a scraper asked for, given the format the body is in (the exporter's Content-Type).

    As expfmt's NegotiateAccept, which client_golang exporters run: clauses are walked in q order,
    and a known `escaping=` value on any clause is remembered (an unknown one is ignored) until a
    clause matches the body's format; the scheme is the one remembered then. So the escaping term
    need not sit on the matching clause itself: Prometheus 3 puts it on `version=1.0.0` clauses
    only, and an exporter that answers text 0.0.4 (matched by `text/plain;version=0.0.4;q=0.3`)
    still uses the `escaping=allow-utf-8` of the clauses before. When no clause matches, the last
    remembered scheme holds, as NegotiateAccept's fallback keeps it too; with none, underscores.
    """
    target = _media_range(content_type or "") or MediaRange("text", "plain", 1.0, ())
    scheme: Scheme | None = None
    for clause in parse_accept(accept):
        named = parse_scheme(clause.param(ESCAPING_KEY))
        if named is not None:
            scheme = named
        if _matches(clause, target):
            break
    if scheme is None:
        return Negotiated(DEFAULT_SCHEME, named=False)
    return Negotiated(scheme, named=True)


def _content_type_terms(content_type: str) -> list[str]:
    terms = []
    for part in content_type.split(";"):
        pieces = part.split("=")
        if len(pieces) != 2:
            if part.strip():
                terms.append(part.strip())
        elif pieces[0].strip() != ESCAPING_KEY:
            terms.append(part.strip())
    return terms


def with_escaping(content_type: str, scheme: Scheme) -> str:
    """Format.WithEscapingScheme: any escaping term replaced by `scheme`'s, terms joined by `; `.

    What a client_golang exporter answers, e.g. `text/plain; version=0.0.4; charset=utf-8;
    escaping=underscores`.
    """
    return "; ".join([*_content_type_terms(content_type), f"{ESCAPING_KEY}={scheme.value}"])


def without_escaping(content_type: str) -> str:
    """The Content-Type minus its escaping term; the very same string when it has none."""
    has_term = any(
        len(pieces := part.split("=")) == 2 and pieces[0].strip() == ESCAPING_KEY
        for part in content_type.split(";")
    )
    return "; ".join(_content_type_terms(content_type)) if has_term else content_type


def scraper_content_type(content_type: str, negotiated: Negotiated, *, names_may_change: bool) -> str:
    """The Content-Type a scraper of a rewritten body gets.

    It names the scheme the body was escaped in, as an exporter would; except for a scraper that
    named none (Prometheus 2) behind rules that cannot make a name non-legacy: that one gets the
    exporter's Content-Type minus its escaping term, so a keep-list setup looks exactly as before.
    """
    if not negotiated.named and not names_may_change:
        return without_escaping(content_type)
    return with_escaping(content_type, negotiated.scheme)


_TEXT_RANGES = frozenset({("text", "plain"), ("text", "*"), ("application", "openmetrics-text"), ("*", "*")})


def upstream_accept(accept: str, scheme: Scheme) -> str:
    """The scraper's Accept with every escaping term replaced by `scheme` on each text range.

    When the proxy rewrites, it asks the exporter in one scheme whatever the scraper asked for: the
    rules then see names as a Prometheus with the proxy's name validation would, and each scraper's
    copy is escaped afterwards. Scrapers that differ only in their escaping term then send the
    exporter the same request, so they can share one. The term goes before `q=`, where Prometheus
    writes it, and on `*/*` too, so that a scraper whose only range is `*/*` (curl) still gets
    the rules applied to the same names.
    """
    parts = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.strip().split(";")]
        if not pieces[0]:
            continue
        params = [p for p in pieces[1:] if p and p.partition("=")[0].strip().lower() != ESCAPING_KEY]
        kind = pieces[0].lower().split("/")
        key = (kind[0].strip(), kind[1].strip() if len(kind) == 2 else "*")
        if key in _TEXT_RANGES:
            at = next((i for i, p in enumerate(params) if p.partition("=")[0].strip().lower() == "q"), None)
            term = f"{ESCAPING_KEY}={scheme.value}"
            if at is None:
                params.append(term)
            else:
                params.insert(at, term)
        parts.append(";".join([pieces[0], *params]))
    return ",".join(parts)


def upstream_scheme(name_validation: str) -> Scheme:
    """What the proxy asks the exporter for under PROXY_NAME_VALIDATION."""
    return Scheme.UNDERSCORES if name_validation == "legacy" else Scheme.ALLOW_UTF8


# -- rules -----------------------------------------------------------------------------------------


class _RuleLike(Protocol):
    action: str
    target_label: str
    replacement: str


def _literal(template: str) -> bool:
    return "$" not in template


def rules_may_make_non_legacy(rules: Iterable[_RuleLike]) -> bool:
    """Whether any rule might write a name that is not legacy. Conservative: True when unsure.

    Only for the Content-Type of a scraper that named no scheme: when this is False, nothing a rule
    writes can need escaping, so that scraper's response looks as it did before escaping existed.
    """
    for rule in rules:
        action = rule.action
        target = rule.target_label
        if action == "replace":
            if not _literal(target):
                return True  # a templated target can name any label, __name__ included
            if target == NAME_LABEL:
                if not (_literal(rule.replacement) and LEGACY_METRIC_NAME.match(rule.replacement)):
                    return True
            elif not LEGACY_LABEL_NAME.match(target):
                return True
        elif action == "labelmap":
            replacement = rule.replacement
            if not _literal(replacement) or replacement == NAME_LABEL:
                return True
            if not LEGACY_LABEL_NAME.match(replacement):
                return True
        elif action in ("hashmod", "lowercase", "uppercase"):
            # Into __name__ the value becomes the name (a hash starts with a digit: never legacy).
            if target == NAME_LABEL or not LEGACY_LABEL_NAME.match(target):
                return True
        elif action in ("keepequal", "dropequal") and not LEGACY_LABEL_NAME.match(target):
            return True
    return False


# -- exposition ------------------------------------------------------------------------------------

Families = dict[str, frozenset[str]]


def escape_lines(chunk: bytes, scheme: Scheme, families: Families | None = None) -> bytes:
    """Whole exposition lines (each ending in a newline) with quoted names escaped for `scheme`.

    A chunk without any quoted name, which is every chunk when all names are legacy, is returned as
    the same object after three two-byte substring scans (about 0.75 ms for windows_exporter 0.20's
    266 KB capture) and a memchr; only lines that can hold a quoted name are parsed. Values,
    timestamps and exemplars are copied as they came (an exemplar's label names are not escaped).
    The chunk must consist of whole lines: the rewriter's output pieces do (proxy/rewrite.py
    joins complete lines only).

    `families` remembers, across the chunks of one body, the TYPE of each family whose name needed
    escaping: client_golang escapes a family's name and then appends `_total`, `_bucket`, ...,
    so under dots and values a sample `a.b_total` of counter `a.b` comes out `a_dot_b_total`, not
    `a_dot_b__total`, and still belongs to its family. Pass one dict per body.
    """
    if scheme is Scheme.ALLOW_UTF8:
        return chunk
    if not may_hold_quoted_name(chunk):
        return chunk
    if families is None:
        families = {}
    lines = chunk.split(b"\n")
    changed = False
    for i, line in enumerate(lines):
        if line and any(mark in line for mark in QUOTED_NAME_MARKS):
            escaped = _escape_line(line, scheme, families)
            if escaped is not line:
                lines[i] = escaped
                changed = True
    return b"\n".join(lines) if changed else chunk


# The sample-name suffixes of a family of each type, in either format, but the family's own name.
_SUFFIXES = {kind: tuple(s for s in suffixes if s) for kind, suffixes in MEMBER_SUFFIXES.items()}
_ALL_SUFFIXES = frozenset(suffix for suffixes in _SUFFIXES.values() for suffix in suffixes)
_MAX_FAMILIES = 10_000  # a bound on what one body can make a scraper's escaper remember


def _escape_sample_name(name: str, scheme: Scheme, families: Families) -> str:
    if families and not LEGACY_METRIC_NAME.match(name):
        for suffix in _ALL_SUFFIXES:
            if name.endswith(suffix) and suffix in families.get(name[: -len(suffix)], ()):
                return escape_metric_name(name[: -len(suffix)], scheme) + suffix
    return escape_metric_name(name, scheme)


def _escape_line(line: bytes, scheme: Scheme, families: Families) -> bytes:
    if line.startswith(b"#"):
        if line[7:8] != b'"':  # `# HELP "name"`: only a quoted name can need escaping
            return line
        meta = _METADATA.get(line)
        if meta is None:
            parsed = parse_metadata(line)  # a byte at a time in Python for a quoted name: cached
            if parsed is None:
                return line
            kind, name, rest = parsed
            members = frozenset(_SUFFIXES.get(rest.strip().split(b" ", 1)[0].decode("ascii", "replace"), ()))
            meta = (kind, name.decode("utf-8"), rest, members)
            if len(_METADATA) >= SERIES_CACHE_SIZE:
                _METADATA.clear()
            _METADATA[line] = meta
        kind, text, rest, members = meta
        if kind == b"TYPE" and len(families) < _MAX_FAMILIES:
            families[text] = members
        return format_metadata(kind, escape_metric_name(text, scheme).encode("utf-8"), rest)
    return _escape_sample(line, scheme, families)


# Samples' parsed and escaped label sets by (scheme, series text). The same series come back every
# scrape, and a line with quoted names takes the parser's slow path (about 15 us): with the cache,
# a repeat costs a split, a lookup and the name's escaping. Bounded: emptied when full.
_SERIES: dict[tuple[Scheme, bytes], tuple[str, bytes]] = {}
# HELP/TYPE/UNIT lines with a quoted name, parsed: (kind, name, rest, a TYPE's sample suffixes).
_METADATA: dict[bytes, tuple[bytes, str, bytes, frozenset[str]]] = {}
SERIES_CACHE_SIZE = 50_000


def _escape_sample(line: bytes, scheme: Scheme, families: Families) -> bytes:
    # As the rewriter splits a line: the series text ends at the first `} `. When a label value
    # holds `} ` the cut falls inside a quoted value, which no parsed series text ends in, so that
    # line merely misses the cache.
    cut = line.find(b"} ")
    entry = _SERIES.get((scheme, line[: cut + 1])) if cut > 0 else None
    if entry is not None:
        series, rest = line[: cut + 1], line[cut + 2 :]
    else:
        parsed = parse_sample(line)
        if parsed is None:
            return line  # passed through, as the rewriter passes unparsable lines
        series, name, labels, rest = parsed
        # Every name comes out legacy, so format_series writes them bare; a stand-in metric name
        # leaves the label set's text (with its braces) to be put after the escaped name.
        label_text = format_series(
            "x", [(escape_label_name(label, scheme), value) for label, value in labels]
        )[1:]
        entry = (name, label_text)
        if len(_SERIES) >= SERIES_CACHE_SIZE:
            _SERIES.clear()
        _SERIES[scheme, series] = entry
    name, label_text = entry
    escaped = _escape_sample_name(name, scheme, families).encode("utf-8") + label_text
    # A legacy name the exporter quoted comes out bare too.
    return line if escaped == series else escaped + b" " + rest
