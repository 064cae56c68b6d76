"""collect[] push-down: which of the exporter's collectors can the relabel rules keep a series of?

Pure: no I/O. A scrape without `collect[]` makes windows_exporter run every enabled collector,
even when the rules then throw most of their series away; service and process take hundreds of
milliseconds of the node's CPU each. When the rules can only ever keep series of some collectors,
the proxy asks for just those (`?collect[]=cpu&collect[]=memory`), and the body after the rules is
byte for byte what the full scrape would have given.

Soundness is the whole point: the analysis may say "can keep" wrongly (that only costs savings),
never "cannot keep" wrongly (that would lose series). So every question it cannot answer for sure
is answered "can keep".

How it decides. A collector's series have names in a known language: `windows_<collector>_`
followed by legacy name characters (the exporter builds every name with
prometheus.BuildFQName("windows", <collector>, ...)); exceptions are data below. The rule chain is
run abstractly over "a series whose name is in L, every other label unknown":

- keep/drop whose source labels include `__name__` decide by regex algebra: keep R drops the series
  for sure when R matches no possible value; drop D when D matches every possible value. A keep or
  drop on `__name__` alone also narrows L for the rules after it;
- a rule that may write `__name__` (replace, hashmod, lowercase, uppercase, labelmap into it), or a
  labeldrop/labelkeep that removes it, makes the name unknown (any string) from then on;
- everything else reads labels whose values are unknown: it cannot decide, and changes nothing
  the analysis tracks.

The regex questions (is R ∩ L empty? is L ⊆ D?) are answered by regexlang.py, with Brzozowski
derivatives over a parsed subset of RE2 (literals, escapes, `.`, classes, groups, alternation,
`* + ? {m,n}` and their lazy forms); a construct outside it, or a question that needs too many
derivative states, is "unknown", which means "can keep".

Learning which collectors are enabled (`windows_exporter_collector_success{collector=...}` in a full
scrape) is CollectorLearner's job; PushDown holds what was learned and turns it into the query the
exporter is sent. The clock is passed in, so the whole module stays pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from proxy.regexlang import (
    ANY,
    EPS,
    LEGACY_NAME,
    Node,
    Unknown,
    alt,
    both,
    cat,
    chars,
    is_empty,
    literal,
    negate,
    parse_regex,
    star,
    witness,
)
from proxy.relabel import NAME_LABEL, Rule

# -- facts about windows_exporter -------------------------------------------------------------------

NAMESPACE = "windows"
# Collectors that emit names no prefix can tell apart from others' (textfile serves whatever its
# .prom files hold, performancecounter whatever its configuration names): asked for whenever they
# are enabled, so whatever they emit is in a narrowed scrape too.
ALWAYS_ASKED = frozenset({"textfile", "performancecounter"})
# Collectors that also emit a metric named `windows_<collector>` exactly. Source:
# prometheus-community/windows_exporter v0.20.0 collector/cpu_info.go:33 and v0.31.8
# internal/collector/cpu_info/cpu_info.go:81, `prometheus.BuildFQName(Namespace, "", "cpu_info")`.
# Every other collector at those tags builds its names as BuildFQName(Namespace, <its name>, ...)
# (mscluster's sub-collectors as Name + "_cluster" etc., hyperv's as "hyperv_" + component), which
# all begin `windows_<collector>_`.
BARE_NAME_COLLECTORS = frozenset({"cpu_info"})
# Served with or without collect[]: client_golang's Go, process and promhttp collectors and
# version.NewCollector("windows_exporter") (windows_exporter v0.31.8
# internal/httphandler/httphandler.go: the exporterMetricsRegistry and the per-request registry).
ALWAYS_PRESENT_PREFIXES = ("go_", "process_", "promhttp_")
ALWAYS_PRESENT_NAMES = ("windows_exporter_build_info",)
# The exporter's own series other than build_info: windows_exporter_collector_{duration_seconds,
# success,timeout} carry a `collector` label and a narrowed scrape reports only the collectors it
# asked for (pkg/collector/collection.go); windows_exporter_scrape_duration_seconds (0.31) and
# windows_exporter_perflib_snapshot_duration_seconds (0.20) change with what ran. Rules that can keep
# any of them turn push-down off.
EXPORTER_PREFIX = "windows_exporter_"
STATUS_FAMILIES = (
    "windows_exporter_collector_success",
    "windows_exporter_collector_duration_seconds",
    "windows_exporter_collector_timeout",
)
SUCCESS_FAMILY = STATUS_FAMILIES[0]


# -- the rules, run over name languages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Filter:
    keep: bool
    source_labels: tuple[str, ...]
    separator: str
    regex: Node | None  # None: outside the subset, so it cannot decide


_NAME_UNKNOWN = "name unknown"


def _abstract(rule: Rule) -> _Filter | str | None:
    """What a rule means to the analysis: a filter, _NAME_UNKNOWN, or None (nothing tracked)."""
    action = rule.action
    if action in ("keep", "drop"):
        try:
            regex: Node | None = parse_regex(rule.regex.pattern)
        except Unknown:
            regex = None
        return _Filter(action == "keep", rule.source_labels, rule.separator, regex)
    if action == "labeldrop":
        return _NAME_UNKNOWN if rule.regex.match(NAME_LABEL) is not None else None
    if action == "labelkeep":
        return _NAME_UNKNOWN if rule.regex.match(NAME_LABEL) is None else None
    if rule.can_set(NAME_LABEL):
        return _NAME_UNKNOWN
    return None  # keepequal, dropequal, and writes to other labels


class Analysis:
    """The rules compiled for the question "can they keep a series whose name is in L?".

    Built once per rule set; plan() answers per set of enabled collectors and caches the answer,
    so a scrape's cost is a lookup.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.steps = tuple(step for step in map(_abstract, rules) if step is not None)
        self._plans: dict[frozenset[str], Plan] = {}

    def can_keep(self, names: Node) -> bool:
        """Whether a series whose name is in `names` may survive the rules (True when unsure)."""
        return self.survivors(names) is not None

    def survivors(self, names: Node) -> Node | None:
        """The names of the series that may survive (over-approximated); None when none can."""
        try:
            return self._survivors(names)
        except RecursionError:  # a term too deep to walk: unsure, so it may keep
            return ANY

    def _survivors(self, names: Node) -> Node | None:
        current = names
        for step in self.steps:
            if isinstance(step, str):
                current = ANY  # the name may be anything (or gone: "" is in ANY) from here on
                continue
            if step.regex is None:
                continue
            value = _value_language(step, current)
            try:
                if step.keep:
                    if is_empty(both((value, step.regex))):
                        return None
                    if step.source_labels == (NAME_LABEL,):
                        current = both((current, step.regex))
                else:
                    if is_empty(both((value, negate(step.regex)))):
                        return None
                    if step.source_labels == (NAME_LABEL,):
                        current = both((current, negate(step.regex)))
            except Unknown:
                continue
        try:
            return None if is_empty(current) else current
        except Unknown:
            return current

    def example_kept(self, names: Node) -> str | None:
        """A name from `names` the rules may keep, for messages (None if none found cheaply)."""
        survivors = self.survivors(names)
        if survivors is None or survivors is ANY:
            return None
        try:
            return witness(survivors, limit=500)
        except (Unknown, RecursionError):
            return None

    def plan(self, enabled: frozenset[str]) -> Plan:
        plan = self._plans.get(enabled)
        if plan is None:
            plan = self._plans[enabled] = self._plan(enabled)
        return plan

    def _plan(self, enabled: frozenset[str]) -> Plan:
        if not enabled:
            return Plan(enabled, None, f"the exporter reports no {SUCCESS_FAMILY} series")
        for family in STATUS_FAMILIES:
            if self.can_keep(literal(family)):
                return Plan(enabled, None, f"the rules can keep {family}")
        exporter = both((cat(literal(EXPORTER_PREFIX), ANY), negate(_always_present())))
        if self.can_keep(exporter):
            return Plan(enabled, None, f"the rules can keep {EXPORTER_PREFIX}* series")
        owned = alt([_always_present(), cat(literal(EXPORTER_PREFIX), ANY)] + [_prefix(c) for c in enabled])
        unowned = negate(owned)
        if self.can_keep(unowned):
            example = self.example_kept(unowned)
            hint = f", e.g. {example!r}" if example else ""
            return Plan(enabled, None, f"the rules can keep names no enabled collector owns{hint}")
        asked = tuple(sorted(c for c in enabled if c in ALWAYS_ASKED or self.can_keep(names_of(c, enabled))))
        if not asked:
            return Plan(enabled, None, "the rules keep no collector's series")
        if len(asked) == len(enabled):
            return Plan(enabled, None, "the rules can keep series of every enabled collector")
        return Plan(enabled, asked, "")


def _value_language(step: _Filter, name: Node) -> Node:
    """The joined source label values a series can present: its name where `__name__` is read,
    any string for every other label (whose value the analysis does not know)."""
    if not step.source_labels:
        return EPS
    separator = literal(step.separator)
    value: Node | None = None
    for label in step.source_labels:
        part = name if label == NAME_LABEL else ANY
        value = part if value is None else cat(value, cat(separator, part))
    assert value is not None
    return value


def _prefix(collector: str) -> Node:
    """Every string a collector's prefix covers (any characters after it): what it may own."""
    base = f"{NAMESPACE}_{collector}"
    node = cat(literal(base + "_"), ANY)
    return alt((node, literal(base))) if collector in BARE_NAME_COLLECTORS else node


def _always_present() -> Node:
    return alt(
        [*(cat(literal(p), ANY) for p in ALWAYS_PRESENT_PREFIXES), *map(literal, ALWAYS_PRESENT_NAMES)]
    )


def names_of(collector: str, enabled: Iterable[str]) -> Node:
    """The names a collector can emit: `windows_<c>_` and legacy name characters (plus the bare
    `windows_<c>` for BARE_NAME_COLLECTORS), less what a longer enabled collector's prefix owns
    (cpu_info's `windows_cpu_info*` is not cpu's)."""
    base = f"{NAMESPACE}_{collector}"
    own = cat(literal(base + "_"), star(chars(LEGACY_NAME)))
    if collector in BARE_NAME_COLLECTORS:
        own = alt((own, literal(base)))
    longer = [_prefix(other) for other in enabled if other.startswith(collector + "_")]
    return both((own, negate(alt(longer)))) if longer else own


@dataclass(frozen=True, slots=True)
class Plan:
    """What to ask a given exporter for: `asked` collectors, or None (a full scrape) and why."""

    enabled: frozenset[str]
    asked: tuple[str, ...] | None
    reason: str

    @property
    def query(self) -> str:
        """The collect[] parameters, built once: a scrape only appends them."""
        return "&".join(f"collect[]={quote(name, safe='')}" for name in self.asked or ())

    def describe(self) -> str:
        if self.asked is None:
            return f"push-down: a scrape would ask for every collector ({self.reason})"
        skipped = len(self.enabled) - len(self.asked)
        return (
            f"push-down: a scrape would ask for collect[]={','.join(self.asked)} "
            f"({skipped} of {len(self.enabled)} enabled collectors not run)"
        )


# -- learning the enabled collectors from a full scrape --------------------------------------------------

_MARK = SUCCESS_FAMILY.encode() + b"{"
_COLLECTOR = re.compile(rb'[{,]\s*collector="((?:[^"\\\n]|\\.)*)"')


class CollectorLearner:
    """Fed a full scrape's (decompressed) body in pieces; collects the `collector` label of every
    windows_exporter_collector_success sample. Only whole lines that start with that family are
    looked at, and a long unrelated line is skipped, not held."""

    __slots__ = ("_pending", "_skipping", "collectors")

    def __init__(self) -> None:
        self.collectors: set[str] = set()
        self._pending = b""
        self._skipping = False  # in the middle of a line that is not one of ours

    def feed(self, data: bytes) -> None:
        if self._skipping:
            cut = data.find(b"\n")
            if cut < 0:
                return
            self._skipping = False
            data = data[cut + 1 :]
        elif self._pending:
            data = self._pending + data
            self._pending = b""
        end = data.rfind(b"\n")
        whole, rest = (data[: end + 1], data[end + 1 :]) if end >= 0 else (b"", data)
        self._scan(whole)
        if rest:
            if rest.startswith(_MARK) or _MARK.startswith(rest):
                self._pending = rest
            else:
                self._skipping = True

    def finish(self) -> frozenset[str]:
        if self._pending:
            self._scan(self._pending)
            self._pending = b""
        return frozenset(self.collectors)

    def _scan(self, data: bytes) -> None:
        start = data.find(_MARK)
        while start >= 0:
            end = data.find(b"\n", start)
            if end < 0:
                end = len(data)
            if start == 0 or data[start - 1] == 0x0A:
                match = _COLLECTOR.search(data, start + len(_MARK) - 1, end)
                if match is not None:
                    self.collectors.add(match[1].decode("utf-8", "replace"))
            start = data.find(_MARK, end)


def learn_collectors(body: bytes) -> frozenset[str]:
    learner = CollectorLearner()
    learner.feed(body)
    return learner.finish()


# -- the state a proxy keeps -------------------------------------------------------------------------------


def asks_collectors(raw_query: str) -> bool:
    """Whether the scraper chose collectors itself (then its query goes upstream untouched)."""
    if "collect" not in raw_query:
        return False
    return any(key == "collect[]" for key, _ in parse_qsl(raw_query, keep_blank_values=True))


@dataclass(frozen=True, slots=True)
class Decision:
    """How one scrape asks the exporter: the query sent, the plan it narrows by (None: full), and
    whether its body is read to learn the enabled collectors."""

    query: str
    full: str  # the scraper's own query: what a retry in full sends
    plan: Plan | None
    learn: bool


class PushDown:
    """What the proxy knows of its exporter's collectors, and the query each scrape is sent.

    Until a full scrape has taught it the enabled collectors it narrows nothing; it re-learns every
    `refresh` seconds, and after forget() (a narrowed request refused, or the exporter restarted).
    """

    def __init__(self, analysis: Analysis, refresh: float) -> None:
        self.analysis = analysis
        self.refresh = refresh
        self.plan: Plan | None = None
        self.start_time: str | None = None
        self.learned_at: float | None = None

    def decide(self, raw_query: str, now: float) -> Decision:
        if asks_collectors(raw_query):
            return Decision(raw_query, raw_query, None, False)
        plan = self.plan
        if plan is None or self.learned_at is None or now - self.learned_at >= self.refresh:
            return Decision(raw_query, raw_query, None, True)
        if plan.asked is None:
            return Decision(raw_query, raw_query, None, False)
        narrowed = f"{raw_query}&{plan.query}" if raw_query else plan.query
        return Decision(narrowed, raw_query, plan, False)

    def learned(self, enabled: frozenset[str], start_time: str | None, now: float) -> Plan | None:
        """Record a full scrape's collectors; the new plan when it differs from the last one."""
        previous = self.plan
        plan = self.analysis.plan(enabled)
        self.plan = plan
        self.start_time = start_time
        self.learned_at = now
        if previous is not None and (previous.asked, previous.reason) == (plan.asked, plan.reason):
            return None
        return plan

    def same_exporter(self, start_time: str | None) -> bool:
        """Whether a narrowed answer came from the exporter process the knowledge is about."""
        return start_time == self.start_time

    def forget(self) -> None:
        self.learned_at = None
