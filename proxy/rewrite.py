"""The streaming rewriter: exposition bytes in, relabeled exposition bytes out. Pure: no I/O.

It works line by line on whatever chunks arrive, holding back only an unfinished last line (and,
when rules can rename metrics, the current family), so memory stays flat as payloads grow. A line
may not be longer than LINE_CAP: one that is would have to be held whole, so it fails the scrape
(LineTooLong) rather than let an exporter grow the proxy's memory without limit.

The same series come back on every scrape, so each series' outcome under the rules is cached,
keyed on the series' raw text (`name{labels}`, exactly as the exporter wrote it), in a bounded LRU.
A warm scrape then costs a split and a dict lookup per line.

Family rules: HELP/TYPE/UNIT lines are held until their family keeps a sample, then written just
before it, so filtered-out families leave no orphaned metadata. When rules rename metrics, a family's
output is held until the family ends: its metadata follows the new name only if every kept sample
moved the same way (`foo_bucket`/`foo_sum`/`foo_count` to `bar_...`); otherwise it is dropped and the
samples stay untyped.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.exposition import (
    family_members,
    format_metadata,
    format_series,
    may_hold_quoted_name,
    parse_metadata,
    parse_sample,
    split_sample,
)
from proxy.relabel import NAME_LABEL, Rule, Validation, process, valid_label_set

BOM = b"\xef\xbb\xbf"
# The longest line the rewriter holds, in bytes before its newline. windows_exporter's longest lines
# are a few KiB (a service's or a process's labels); a line of a megabyte is an exporter gone wrong,
# and past this the scrape fails with LineTooLong instead of the proxy buffering without limit.
LINE_CAP = 1 << 20
# The most a gzipped body is inflated at once (BodyRewrite.feed).
INFLATE_STEP = 1 << 20
_FILTERS = frozenset({"keep", "drop", "keepequal", "dropequal"})
EOF_LINE = b"# EOF"

# (sample name, output prefix `series ` or SAME when the line goes out as it came, or None when
# it is dropped, new sample name). Output lists hold lines without their newline.
Outcome = tuple[bytes, Any, bytes | None]
SAME: Any = object()
# The new name of a series whose rules removed its name: Prometheus fails the whole scrape then
# ("missing metric name"), so the rewriter does too.
NAMELESS = b""
# The new name of a series whose rules gave it a name the validation scheme refuses (under
# `legacy`, e.g. `__name__` set to `edge-value`): Prometheus fails the whole scrape on it too
# ("invalid metric name or label names"). Not a name any series can have: it holds a NUL.
INVALID = b"\x00invalid"


class RuleSet:
    """Rules plus the cache of their outcomes; one per proxy, shared by every scrape."""

    def __init__(self, rules: Sequence[Rule], cache_size: int = 50_000) -> None:
        self.rules = tuple(rules)
        self.cache_size = cache_size
        # Prometheus checks each series after its relabeling under its validation scheme; the
        # rules were parsed under one scheme, which the check follows.
        self.validation: Validation = self.rules[0].validation if self.rules else "utf8"
        self.cache: OrderedDict[bytes, Outcome] = OrderedDict()
        # Only rules that may write __name__ need the slower, family-buffering path.
        self.can_rename = any(rule.can_set(NAME_LABEL) for rule in self.rules)
        # Rules that only filter never change a series' text.
        self.filter_only = all(rule.action in _FILTERS for rule in self.rules)
        # Filters on the metric name alone (the usual keep-list) decide per name, not per series:
        # a new series of a known metric then costs a syntax check and a lookup.
        self.name_only = self.filter_only and all(
            set(rule.source_labels) <= {NAME_LABEL}
            and (rule.action in ("keep", "drop") or rule.target_label == NAME_LABEL)
            for rule in self.rules
        )
        self._kept_names: dict[bytes, bool] = {}
        # Whether any line the rules ever let out may hold a quoted (non-legacy) name: set when an
        # outcome or a metadata line with one is first computed, never cleared. Until then no
        # scraper's copy needs escaping (ClientWriter skips escaping.escape_lines' scan of every
        # piece, which costs about 1 ms per 266 KB body and scraper).
        self.quoted_names = False
        self.metadata: dict[bytes, Comment] = {}  # HELP/TYPE/UNIT lines, parsed once

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, series: bytes, name: str, labels: list[tuple[str, str]]) -> Outcome | None:
        """The outcome for a parsed series (cached); None if its label set is not one Prometheus takes."""
        labelset = {NAME_LABEL: name}
        for label, value in labels:
            if label in labelset:
                return None  # duplicate label names: Prometheus fails such a scrape; so must the scraper
            labelset[label] = value
        original = labelset if self.filter_only else dict(labelset)
        old_name = name.encode("utf-8")
        result = process(labelset, self.rules)
        if result is None:
            outcome: Outcome = (old_name, None, None)
        elif not result.get(NAME_LABEL):
            outcome = (old_name, None, NAMELESS)
        elif result is original or result == original:
            outcome = (old_name, SAME, old_name)
        elif not valid_label_set(result, self.validation):
            outcome = (old_name, None, INVALID)
        else:
            new_name = result.pop(NAME_LABEL)
            text = format_series(new_name, sorted(result.items()))
            outcome = (old_name, text + b" ", new_name.encode("utf-8"))
        return self._remember(series, outcome)

    def evaluate_by_name(self, series: bytes, name: bytes) -> Outcome:
        """The outcome for a series under name-only filters (cached per series and per name)."""
        kept = self._kept_names.get(name)
        if kept is None:
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            kept = process({NAME_LABEL: text}, self.rules) is not None
            if len(self._kept_names) < self.cache_size:
                self._kept_names[name] = kept
        return self._remember(series, (name, SAME, name) if kept else (name, None, None))

    def _remember(self, series: bytes, outcome: Outcome) -> Outcome:
        if not self.quoted_names and outcome[1] is not None:
            if outcome[1] is SAME:
                # Once per new series, so the cheapest test that holds for how exporters write a
                # quoted name (client_golang: `{"a.b",...}` or `name{"a.b"="v"}`): a full scan
                # here cost a fifth of a cold rewrite.
                self.quoted_names = series[:1] == b"{" or b'"=' in series
            else:  # a label set the rules wrote (rarer): any quoted name format_series made
                self.quoted_names = may_hold_quoted_name(outcome[1])
        cache = self.cache
        cache[series] = outcome
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return outcome


@dataclass
class RewriteStats:
    kept: int = 0
    dropped: int = 0
    unparsable: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class Rewriter:
    """Rewrites one exposition body; feed() chunks as they come, then finish()."""

    def __init__(self, rules: RuleSet, *, openmetrics: bool, line_cap: int = LINE_CAP) -> None:
        self.rules = rules
        self.openmetrics = openmetrics
        self.line_cap = line_cap
        self.stats = RewriteStats()
        # The unfinished last line, grown in place: pieces of a long line are appended (amortized
        # linear), never re-joined with each new piece, which was quadratic in the line's length.
        self._pending = bytearray()
        self._started = False
        self._eof_seen = False
        # The current family: its name, the sample names it may hold, its metadata lines.
        self._family: bytes | None = None
        self._members: frozenset[bytes] = frozenset()
        self._meta: list[bytes] = []
        self._emitted = False
        self._written: set[bytes | None] = set()  # families whose metadata is out
        # Rename mode only: the family's output so far and where its kept samples moved.
        self._held: list[bytes] = []
        self._held_kept = False
        self._new_family: bytes | None = None
        self._consistent = True

    def feed(self, data: bytes) -> bytes:
        pending = self._pending
        if not self._started:
            if pending:
                data = bytes(pending) + data
                pending.clear()
            if len(data) < len(BOM) and BOM.startswith(data):
                pending += data  # maybe a BOM split across chunks
                return b""
            self._started = True
            if data.startswith(BOM):
                data = data[len(BOM) :]
        if b"\n" not in data:
            # One more piece of an unfinished line: checked against the cap before it is kept.
            if len(pending) + len(data) > self.line_cap:
                raise LineTooLong(self.line_cap)
            pending += data
            return b""
        if pending:
            data = b"".join((pending, data))
            pending.clear()
        lines = data.split(b"\n")
        # No line can be over the cap unless the data is: the usual chunk costs one comparison.
        if len(data) > self.line_cap and max(map(len, lines)) > self.line_cap:
            raise LineTooLong(self.line_cap)
        pending += lines.pop()
        out: list[bytes] = []
        if self.rules.can_rename:
            self._lines_renaming(lines, out)
        else:
            self._lines(lines, out)
        return _joined(out)

    def finish(self) -> bytes:
        """Rewrite a last line that had no newline and close the last family."""
        out: list[bytes] = []
        carry = bytes(self._pending)
        self._pending.clear()
        if not self._started:
            self._started = True
            if carry.startswith(BOM):
                carry = carry[len(BOM) :]
        if carry:
            lines = [carry]
            if self.rules.can_rename:
                self._lines_renaming(lines, out)
            else:
                self._lines(lines, out)
        self._end_family(out)
        return _joined(out)

    # -- the hot loop (rules never rename) ---------------------------------------------------------

    def _lines(self, lines: list[bytes], out: list[bytes]) -> None:
        cache = self.rules.cache
        lookup = cache.get
        touch = cache.move_to_end
        append = out.append
        stats = self.stats
        members = self._members
        emitted = self._emitted
        hits = kept = dropped = 0
        for line in lines:
            if not line:
                continue
            if line[0] == 0x23:  # "#"
                self._emitted = emitted
                self._comment(line, out)
                members = self._members
                emitted = self._emitted
                continue
            cut = line.find(b"} ")
            if cut > 0:
                key = line[: cut + 1]
                tail = line[cut + 2 :]
                entry = lookup(key)
            else:
                cut = line.find(b" ")
                key = line[:cut]
                tail = line[cut + 1 :]
                entry = lookup(key) if cut > 0 else None
            if entry is not None:
                touch(key)
                hits += 1
            else:
                missed = self._miss(line)
                if missed is None:
                    self._emitted = emitted
                    self._unparsable(line, out)
                    continue
                entry, tail = missed
            if entry[0] not in members:
                self._emitted = emitted
                self._implicit_family(entry[0], out)
                members = self._members
                emitted = self._emitted
            prefix = entry[1]
            if prefix is None:
                if entry[2] is not None:
                    raise refused_series(entry[2], line, self.rules.validation)
                dropped += 1
                continue
            kept += 1
            if not emitted:
                self._write_meta(self._family, self._meta, out)
                emitted = True
            append(line if prefix is SAME else prefix + tail)
        self._emitted = emitted
        stats.cache_hits += hits
        stats.kept += kept
        stats.dropped += dropped

    def _miss(self, line: bytes) -> tuple[Outcome, bytes] | None:
        rules = self.rules
        if rules.name_only:
            split = split_sample(line)
            if split is None:
                return None
            series, name, tail = split
            entry = rules.cache.get(series)
            if entry is not None:
                self.stats.cache_hits += 1
                return entry, tail
            self.stats.cache_misses += 1
            return rules.evaluate_by_name(series, name), tail
        parsed = parse_sample(line)
        if parsed is None:
            return None
        series, name, labels, tail = parsed
        entry = self.rules.cache.get(series)
        if entry is not None:
            self.stats.cache_hits += 1
            return entry, tail
        self.stats.cache_misses += 1
        entry = self.rules.evaluate(series, name, labels)
        if entry is None:
            return None
        return entry, tail

    # -- rename mode: the same per line, but a family's output is held until it ends ------------------

    def _lines_renaming(self, lines: list[bytes], out: list[bytes]) -> None:
        stats = self.stats
        for line in lines:
            if not line:
                continue
            if line[0] == 0x23:
                self._comment(line, out)
                continue
            cut = line.find(b"} ")
            if cut <= 0:
                cut = line.find(b" ")
                key, tail = line[:cut], line[cut + 1 :]
            else:
                key, tail = line[: cut + 1], line[cut + 2 :]
            entry = self.rules.cache.get(key) if cut > 0 else None
            if entry is not None:
                self.rules.cache.move_to_end(key)
                stats.cache_hits += 1
            else:
                missed = self._miss(line)
                if missed is None:
                    self._unparsable(line, out)
                    continue
                entry, tail = missed
            old_name, prefix, new_name = entry
            if old_name not in self._members:
                self._implicit_family(old_name, out)
            if prefix is None or new_name is None:
                if new_name is not None:
                    raise refused_series(entry[2], line, self.rules.validation)
                stats.dropped += 1
                continue
            stats.kept += 1
            self._held_kept = True
            self._held.append(line if prefix is SAME else prefix + tail)
            self._track_move(old_name, new_name)

    def _track_move(self, old_name: bytes, new_name: bytes) -> None:
        family = self._family or old_name
        if not self._consistent:
            return
        if not old_name.startswith(family):
            self._consistent = False
            return
        suffix = old_name[len(family) :]
        if not new_name.endswith(suffix):
            self._consistent = False
            return
        moved = new_name[: len(new_name) - len(suffix)] if suffix else new_name
        if self._new_family is None:
            self._new_family = moved
        elif self._new_family != moved:
            self._consistent = False

    # -- families, metadata and odd lines -------------------------------------------------------------

    def _comment(self, line: bytes, out: list[bytes]) -> None:
        # The same HELP and TYPE lines come back every scrape: parse each once (per RuleSet).
        meta = self.rules.metadata.get(line, _UNSEEN)
        if meta is _UNSEEN:
            meta = _parse_comment(line)
            if meta is not None and line[7:8] == b'"':  # `# HELP "name"`: a quoted family name
                self.rules.quoted_names = True
            if len(self.rules.metadata) < self.rules.cache_size:
                self.rules.metadata[line] = meta
        if meta is None or self._eof_seen:
            if self.openmetrics:
                self._unparsable(line, out)  # OpenMetrics has no free comments: let the scraper judge
            return  # text format: a comment carries nothing
        kind, name, members = meta
        if kind is None:  # "# EOF"
            self._end_family(out)
            self._eof_seen = True
            out.append(line)
            return
        if name != self._family:
            self._end_family(out)
            self._family = name
            self._members = members if members is not None else frozenset((name,))
        elif members is not None:
            self._members = members
        if self._emitted and not self.rules.can_rename:
            out.append(line)  # metadata after the family's samples: keep it in place
        else:
            self._meta.append(line)

    def _implicit_family(self, name: bytes, out: list[bytes]) -> None:
        """A sample outside the current family starts a family of its own, without metadata."""
        self._end_family(out)
        self._family = name
        self._members = frozenset((name,))
        self._meta = []
        self._emitted = False

    def _unparsable(self, line: bytes, out: list[bytes]) -> None:
        self.stats.unparsable += 1
        if self.rules.can_rename:
            self._held.append(line)
        else:
            out.append(line)

    def _end_family(self, out: list[bytes]) -> None:
        if self._held:
            if self._held_kept and self._meta and self._consistent and self._new_family is not None:
                if self._new_family == self._family:
                    self._write_meta(self._family, self._meta, out)
                else:
                    self._write_meta(self._new_family, self._renamed_meta(self._new_family), out)
            out.extend(self._held)
            self._held = []
        if self.rules.can_rename:
            self._held_kept = False
            self._new_family = None
            self._consistent = True
        self._family = None
        self._members = _NO_MEMBERS
        if self._meta:
            self._meta = []
        self._emitted = False

    def _write_meta(self, family: bytes | None, lines: list[bytes], out: list[bytes]) -> None:
        """A family's metadata, once per body: a second HELP or TYPE for a name breaks parsers
        (rules can merge families, and exporters repeat one now and then)."""
        if family in self._written:
            return
        self._written.add(family)
        out.extend(lines)

    def _renamed_meta(self, new_family: bytes) -> list[bytes]:
        lines = []
        for raw in self._meta:
            meta = parse_metadata(raw)
            if meta is not None:
                lines.append(format_metadata(meta[0], new_family, meta[2]))
        return lines


_UNSEEN = object()
_NO_MEMBERS: frozenset[bytes] = frozenset()
# A parsed comment line: (kind, family name, the sample names of its family or None), with kind
# None for "# EOF"; None for a comment that is neither.
Comment = tuple[bytes | None, bytes, frozenset[bytes] | None] | None


def _parse_comment(line: bytes) -> Comment:
    if line.rstrip(b"\r") == EOF_LINE:
        return (None, b"", None)
    meta = parse_metadata(line)
    if meta is None:
        return None
    kind, name, rest = meta
    if kind == b"TYPE":
        return kind, name, family_members(name, rest.strip().split(b" ", 1)[0])
    return kind, name, None


def _joined(lines: list[bytes]) -> bytes:
    if not lines:
        return b""
    lines.append(b"")
    return b"\n".join(lines)


class BrokenBody(Exception):
    """The upstream body cannot be decoded (corrupt or truncated gzip)."""


class NamelessSeries(BrokenBody):
    """The rules removed a series' metric name, which makes Prometheus fail the whole scrape."""

    def __init__(self, line: bytes) -> None:
        shown = line[:200].decode("utf-8", "replace")
        super().__init__(f"the relabel rules removed the metric name of {shown!r}")


class InvalidSeries(NamelessSeries):
    """The rules gave a series a name its validation scheme refuses: Prometheus fails the scrape."""

    def __init__(self, line: bytes, validation: str) -> None:
        shown = line[:200].decode("utf-8", "replace")
        BrokenBody.__init__(
            self, f"the relabel rules made {shown!r} a series with a name {validation} validation refuses"
        )


def refused_series(new_name: bytes, line: bytes, validation: str) -> NamelessSeries:
    """The error for a series the rules made unacceptable to Prometheus (no name, or an invalid one)."""
    return InvalidSeries(line, validation) if new_name == INVALID else NamelessSeries(line)


class LineTooLong(BrokenBody):
    """The exporter sent a line longer than the rewriter holds (LINE_CAP).

    Rewriting needs a whole line, so the alternative to failing is buffering without limit: an
    exporter (or anything posing as one) that never sends a newline would grow the proxy's memory
    until the scrape deadline. The scrape is broken instead, like any body that cannot be rewritten.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        super().__init__(f"a line longer than {_size(cap)}")


def _size(count: int) -> str:
    if count >= 1 << 20 and count % (1 << 20) == 0:
        return f"{count >> 20} MiB ({count} bytes)"
    return f"{count} bytes"


class BodyRewrite:
    """gunzip (when the exporter compressed) then rewrite; what the app feeds upstream chunks to."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        openmetrics: bool,
        gzipped: bool,
        line_cap: int = LINE_CAP,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self.rewriter = Rewriter(rules, openmetrics=openmetrics, line_cap=line_cap)
        self._inflate = zlib.decompressobj(wbits=47) if gzipped else None  # 32+15: gzip or zlib
        # Sees the exporter's decompressed body before the rules (push-down learns the enabled
        # collectors from it); set only on the few scrapes that learn.
        self._tap = tap

    @property
    def stats(self) -> RewriteStats:
        return self.rewriter.stats

    def feed(self, chunk: bytes) -> bytes:
        if self._inflate is None:
            if self._tap is not None:
                self._tap(chunk)
            return self.rewriter.feed(chunk)
        # At most INFLATE_STEP bytes inflated at a time, each rewritten before the next: a small
        # compressed chunk can inflate a thousandfold (a 256 KB chunk of newlines held 2.5 GB
        # whole and split), and a step at a time the line cap also stops a bomb without newlines
        # after its first megabyte.
        out: list[bytes] = []
        while chunk:
            try:
                piece = self._inflate.decompress(chunk, INFLATE_STEP)
            except zlib.error as exc:
                raise BrokenBody(f"corrupt gzip stream: {exc}") from exc
            chunk = self._inflate.unconsumed_tail
            if self._tap is not None:
                self._tap(piece)
            out.append(self.rewriter.feed(piece))
        return b"".join(out)

    def finish(self) -> bytes:
        if self._inflate is not None:
            try:
                tail = self._inflate.flush()
            except zlib.error as exc:
                raise BrokenBody(f"corrupt gzip stream: {exc}") from exc
            if not self._inflate.eof:
                raise BrokenBody("gzip stream ended early")
            if self._tap is not None and tail:
                self._tap(tail)
            return self.rewriter.feed(tail) + self.rewriter.finish()
        return self.rewriter.finish()


def rewrite_bytes(body: bytes, rules: RuleSet, *, openmetrics: bool) -> bytes:
    """Rewrite a whole body at once (the `relabel` command and tests); same bytes as streaming,
    and the same LineTooLong for a line over the cap, so a dry run fails where a scrape would."""
    rewriter = Rewriter(rules, openmetrics=openmetrics)
    return rewriter.feed(body) + rewriter.finish()
