"""collect[] push-down, the pure part: the regex algebra, the ownership convention, the analysis
(with a hypothesis soundness property against the relabel engine), learning and the state."""

from __future__ import annotations

import importlib.resources
import random
import re

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from proxy.fake_exporter import ExporterPayload
from proxy.pushdown import (
    ALWAYS_PRESENT_NAMES,
    ALWAYS_PRESENT_PREFIXES,
    EXPORTER_PREFIX,
    STATUS_FAMILIES,
    Analysis,
    CollectorLearner,
    PushDown,
    asks_collectors,
    learn_collectors,
    names_of,
)
from proxy.regexlang import Unknown, matches, parse_regex, witness
from proxy.relabel import Regex, RelabelConfigError, parse_rule, parse_rules, process
from tests.test_rewrite import NODE_KEEP_LIST


def _data(name: str) -> bytes:
    return (importlib.resources.files("proxy") / "data" / name).read_bytes()


CAPTURES = {
    "0.20": _data("windows_exporter-0.20.0.prom"),
    "0.31": _data("windows_exporter-0.31-profile.prom"),
}


def _sample_names(body: bytes) -> list[str]:
    names = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in body.decode().splitlines()
        if line and not line.startswith("#")
    }
    return sorted(names)


def keep(regex: str) -> list[dict[str, object]]:
    return [{"source_labels": ["__name__"], "regex": regex, "action": "keep"}]


def plan_for(raw_rules: list[dict[str, object]], capture: str = "0.31") -> tuple[str, ...] | None:
    return Analysis(parse_rules(raw_rules)).plan(learn_collectors(CAPTURES[capture])).asked


# -- the regex algebra -----------------------------------------------------------------------------------

PATTERNS = [
    "a|b",
    "(?:ab)*c?",
    "[a-c]+x",
    "[^a-c]*?",
    r"\d{2,3}",
    r"\w+\.\s?",
    "windows_(cpu|memory)_.{1,4}",
    "(?P<name>go)_.*",
    "x{2}|y{0,}",
    r"[\]a-]",
    r"[]a]",
    r"\x41\x{263a}",
    "",
    "a||b",
    ".*_total",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_parsed_language_agrees_with_re2(pattern: str) -> None:
    node = parse_regex(pattern)
    regex = Regex(pattern)
    rng = random.Random(pattern)
    alphabet = "abcxy_0129.-]\n \u263aABgo"
    found = witness(node)
    if found is not None:
        assert regex.match(found) is not None
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        assert matches(node, text) == (regex.match(text) is not None), text


@pytest.mark.parametrize(
    "pattern", ["(?i)cpu", "^cpu", "cpu$", r"\bcpu", r"\pL", "[[:alpha:]]", "a{,2}", r"\Qx\E"]
)
def test_constructs_outside_the_subset_are_unknown(pattern: str) -> None:
    Regex(pattern)  # valid RE2
    with pytest.raises(Unknown):
        parse_regex(pattern)


@st.composite
def small_patterns(draw: st.DrawFn) -> str:
    atoms = st.sampled_from(["a", "b", "_", ".", "[ab]", "[^a]", r"\d", "(?:ab|b)", "x?", ""])
    parts = draw(st.lists(atoms, min_size=0, max_size=4))
    quant = draw(st.sampled_from(["", "*", "+", "?", "{1,2}", "*?"]))
    pattern = "".join(parts)
    if pattern and quant:
        pattern = f"(?:{pattern}){quant}"
    if draw(st.booleans()):
        pattern = f"{pattern}|{draw(atoms)}"
    return pattern


@settings(max_examples=300, deadline=None)
@given(small_patterns(), st.text(alphabet="ab_x1\n", max_size=6))
def test_random_patterns_agree_with_re2(pattern: str, text: str) -> None:
    assert matches(parse_regex(pattern), text) == (Regex(pattern).match(text) is not None)


# -- the ownership convention, checked against the bundled expositions --------------------------------


@pytest.mark.parametrize("capture", CAPTURES)
def test_every_name_is_owned_by_its_collector_by_prefix(capture: str) -> None:
    """Each name is either always present, the exporter's own, or in exactly the language the
    analysis gives its collector (the fake decides the owner the same way: longest prefix)."""
    body = CAPTURES[capture]
    enabled = learn_collectors(body)
    payload = ExporterPayload.parse(body)
    owners = {f.name: f.owner for f in payload.families}
    languages = {c: names_of(c, enabled) for c in enabled}
    checked = 0
    for name in _sample_names(body):
        family = next((f for f in owners if name == f or name.startswith(f + "_")), name)
        owner = owners.get(family)
        if name.startswith(ALWAYS_PRESENT_PREFIXES) or name in ALWAYS_PRESENT_NAMES:
            continue
        if name.startswith(EXPORTER_PREFIX):
            continue
        assert owner is not None, name
        holders = [c for c, language in languages.items() if matches(language, name)]
        assert holders == [owner], name
        checked += 1
    assert checked > 100


def test_cpu_info_owns_its_bare_name_and_cpu_does_not() -> None:
    enabled = frozenset({"cpu", "cpu_info"})
    assert matches(names_of("cpu_info", enabled), "windows_cpu_info")
    assert not matches(names_of("cpu", enabled), "windows_cpu_info")
    assert not matches(names_of("cpu", enabled), "windows_cpu_info_x")
    assert matches(names_of("cpu", enabled), "windows_cpu_time_total")
    # Without cpu_info enabled, nothing is taken from cpu's prefix.
    assert matches(names_of("cpu", frozenset({"cpu"})), "windows_cpu_info_x")


# -- the analysis -------------------------------------------------------------------------------------


def test_the_readme_keep_list_asks_for_six_collectors() -> None:
    asked = ("cpu", "logical_disk", "memory", "net", "os", "system")
    assert plan_for(keep(NODE_KEEP_LIST), "0.31") == asked
    assert plan_for(keep(NODE_KEEP_LIST), "0.20") == asked


@pytest.mark.parametrize(
    ("rules", "reason"),
    [
        (keep(".*"), "windows_exporter_collector_success"),
        (keep("windows_cpu_.*|windows_exporter_collector_duration_seconds"), "collector_duration"),
        (keep("windows_cpu_.*|windows_exporter_scrape_duration_seconds"), "windows_exporter_* series"),
        (keep("windows_cpu_.*|windows_memor"), "no enabled collector owns"),
        (keep("windows_cpu_.*|foo_bar"), "no enabled collector owns, e.g. 'foo_bar'"),
        ([{"source_labels": ["__name__"], "regex": "windows_service_.*", "action": "drop"}], "collector"),
        (keep("go_.*"), "keep no collector"),
        (keep(NODE_KEEP_LIST + "|windows_(container|physical_disk|service)_.*"), "every enabled collector"),
    ],
)
def test_when_push_down_is_impossible_it_says_why(rules: list[dict[str, object]], reason: str) -> None:
    plan = Analysis(parse_rules(rules)).plan(learn_collectors(CAPTURES["0.31"]))
    assert plan.asked is None
    assert reason in plan.reason
    assert plan.describe().startswith("push-down: a scrape would ask for every collector (")


def test_a_renaming_rule_makes_the_name_unknown() -> None:
    rename = {
        "source_labels": ["__name__"],
        "regex": "windows_(.*)",
        "target_label": "__name__",
        "replacement": "win_$1",
    }
    assert plan_for([rename, *keep("win_cpu_.*")]) is None
    # Renamed after the filtering: the name was known when the keep decided.
    assert plan_for([*keep("windows_cpu_.*"), rename]) == ("cpu",)
    labeldrop = {"regex": "__name__|x", "action": "labeldrop"}
    assert plan_for([labeldrop, *keep("windows_cpu_.*")]) is None
    labelkeep = {"regex": "__name__|core", "action": "labelkeep"}
    assert plan_for([labelkeep, *keep("windows_cpu_.*")]) == ("cpu",)


def test_filters_that_read_other_labels_decide_only_when_the_name_decides() -> None:
    with_state = {"source_labels": ["__name__", "state"], "regex": "windows_service_.*;.*", "action": "drop"}
    assert plan_for([*keep("windows_(cpu|service)_.*"), with_state]) == ("cpu",)
    only_state = {"source_labels": ["state"], "regex": "running", "action": "keep"}
    assert plan_for([*keep("windows_(cpu|service)_.*"), only_state]) == ("cpu", "service")
    # keep then drop narrow the name language step by step.
    drop_cpu = {"source_labels": ["__name__"], "regex": "windows_cpu_.*", "action": "drop"}
    assert plan_for([*keep("windows_(cpu|memory)_.*"), drop_cpu]) == ("memory",)


def test_an_unsupported_regex_can_only_keep() -> None:
    assert plan_for(keep("(?i)windows_cpu_.*")) is None
    drop_all = {"source_labels": ["__name__"], "regex": "(?i).*", "action": "drop"}
    assert plan_for([*keep("windows_cpu_.*"), drop_all]) == ("cpu",)


def test_textfile_and_performancecounter_are_always_asked_when_enabled() -> None:
    enabled = frozenset({"cpu", "memory", "textfile", "performancecounter", "service"})
    plan = Analysis(parse_rules(keep("windows_cpu_.*"))).plan(enabled)
    assert plan.asked == ("cpu", "performancecounter", "textfile")


# The soundness property: whenever the engine keeps a series, the narrowed scrape has it.

REAL_NAMES = sorted(set(_sample_names(CAPTURES["0.20"])) | set(_sample_names(CAPTURES["0.31"])))
FRAGMENTS = [
    "windows_",
    "windows_cpu",
    "windows_cpu_",
    "windows_cpu_info",
    "windows_memory_",
    "windows_net",
    "windows_netframework_",
    "windows_service_state",
    "windows_exporter_",
    "windows_exporter_collector_success",
    "windows_os_",
    "windows_logical_disk_",
    "go_",
    "process_",
    "time",
    "_total",
    "_bytes",
    "s",
]
REGEX_ATOMS = [".*", ".+", "[a-z_]+", "[^_]*", r"\w*", "[cm]", "(?:cpu|memory)", "_?", "x{0,2}", "(.*)"]


@st.composite
def regexes(draw: st.DrawFn) -> str:
    def branch() -> str:
        parts = draw(st.lists(st.sampled_from(FRAGMENTS + REGEX_ATOMS), min_size=1, max_size=4))
        return "".join(parts)

    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(REAL_NAMES))
    return "|".join(branch() for _ in range(draw(st.integers(1, 3))))


LABELS = ["__name__", "state", "collector", "core", "__tmp"]
COLLECTOR_PREFIXES = [
    "windows_cpu_",
    "windows_cpu_info",
    "windows_memory_",
    "windows_net_",
    "windows_netframework_",
    "windows_os_",
    "windows_service_",
    "windows_logical_disk_",
    "windows_exporter_build_info",
    "go_",
]


@st.composite
def keep_lists(draw: st.DrawFn) -> dict[str, object]:
    """A keep on __name__ whose branches start with collector prefixes: the rule sets that narrow."""
    branches = [
        draw(st.sampled_from(COLLECTOR_PREFIXES))
        + "".join(draw(st.lists(st.sampled_from(REGEX_ATOMS), max_size=2)))
        for _ in range(draw(st.integers(1, 3)))
    ]
    return {"source_labels": ["__name__"], "regex": "|".join(branches), "action": "keep"}


@st.composite
def rule_sets(draw: st.DrawFn) -> list[dict[str, object]]:
    rest = draw(st.lists(rules(), min_size=0, max_size=3))
    if draw(st.integers(0, 4)):
        position = draw(st.integers(0, len(rest)))
        rest.insert(position, draw(keep_lists()))
    assume(rest)
    return rest


@st.composite
def rules(draw: st.DrawFn) -> dict[str, object]:
    action = draw(
        st.sampled_from(
            [
                "keep",
                "keep",
                "drop",
                "drop",
                "replace",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "keepequal",
                "dropequal",
                "lowercase",
                "uppercase",
                "hashmod",
            ]
        )
    )
    regex = draw(regexes())
    sources = draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=2))
    if draw(st.integers(0, 2)):
        sources = ["__name__"] if action in ("keep", "drop") else sources
    target = draw(st.sampled_from([*LABELS, "${1}"]))
    if action in ("keep", "drop"):
        return {"source_labels": sources, "regex": regex, "action": action}
    if action == "replace":
        replacement = draw(st.sampled_from(["$1", "x", "", "windows_cpu_$1", "go_x"]))
        return {"source_labels": sources, "regex": regex, "target_label": target, "replacement": replacement}
    if action == "labelmap":
        return {"regex": draw(st.sampled_from(["(.*)", "__(.*)", "s(tate)"])), "action": action,
                "replacement": draw(st.sampled_from(["$1", "__name__", "x_$1"]))}  # fmt: skip
    if action in ("labeldrop", "labelkeep"):
        return {"regex": draw(st.sampled_from(["__name__", "state|core", "__.*", ".*"])), "action": action}
    if action in ("keepequal", "dropequal"):
        return {"source_labels": sources, "target_label": draw(st.sampled_from(LABELS)), "action": action}
    if action == "hashmod":
        return {"source_labels": sources, "target_label": target.strip("${}") or "h", "modulus": "3",
                "action": action}  # fmt: skip
    return {"source_labels": sources, "target_label": draw(st.sampled_from(LABELS)), "action": action}


@st.composite
def series_names(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.sampled_from(REAL_NAMES))
    prefix = draw(st.sampled_from(COLLECTOR_PREFIXES))
    return prefix + draw(st.text(alphabet="abc_:09", max_size=5))


def _owner(name: str, enabled: frozenset[str]) -> str | None:
    owners = [c for c in enabled if name == f"windows_{c}" or name.startswith(f"windows_{c}_")]
    return max(owners, key=len) if owners else None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rule_sets(),
    st.lists(series_names(), min_size=1, max_size=12),
    st.sampled_from(["0.20", "0.31", "cpu_info"]),
    st.dictionaries(
        st.sampled_from(["state", "collector", "core"]), st.sampled_from(["running", "cpu", "0,1"])
    ),
)
def test_the_analysis_never_drops_what_the_engine_keeps(
    raw_rules: list[dict[str, object]], names: list[str], capture: str, labels: dict[str, str]
) -> None:
    try:
        parsed = [parse_rule(raw, f"r[{i}]") for i, raw in enumerate(raw_rules)]
    except RelabelConfigError:
        assume(False)
        return
    if capture == "cpu_info":
        enabled = frozenset({"cpu", "cpu_info", "memory", "net", "netframework"})
    else:
        enabled = learn_collectors(CAPTURES[capture])
    plan = Analysis(parsed).plan(enabled)
    event("narrowed" if plan.asked is not None else "full")
    if plan.asked is None:
        return  # a full scrape: nothing to prove
    asked = set(plan.asked)
    for name in names:
        series = [{**labels, "__name__": name}]
        if name in STATUS_FAMILIES:
            series = [{"__name__": name, "collector": c} for c in sorted(enabled)]
        for labelset in series:
            if process(dict(labelset), parsed) is None:
                continue
            if name.startswith(ALWAYS_PRESENT_PREFIXES) or name in ALWAYS_PRESENT_NAMES:
                continue  # in every scrape
            if name in STATUS_FAMILIES:
                assert labelset["collector"] in asked, (name, labelset, plan)
                continue
            owner = _owner(name, enabled)
            assert owner in asked, (name, labelset, plan)


# -- learning --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", CAPTURES)
def test_the_learner_reads_the_collectors_whatever_the_chunking(capture: str) -> None:
    body = CAPTURES[capture]
    expected = frozenset(
        re.findall(r'^windows_exporter_collector_success\{collector="([^"]+)"', body.decode(), re.M)
    )
    assert learn_collectors(body) == expected
    assert len(expected) == {"0.20": 25, "0.31": 9}[capture]
    rng = random.Random(7)
    for _ in range(20):
        learner = CollectorLearner()
        offset = 0
        while offset < len(body):
            size = rng.choice([1, 7, 35, 36, 37, 500, 4096])
            learner.feed(body[offset : offset + size])
            offset += size
        assert learner.finish() == expected


def test_the_learner_ignores_other_lines_and_holds_no_long_line() -> None:
    learner = CollectorLearner()
    learner.feed(b'# HELP windows_exporter_collector_success{collector="no"} x\n')
    learner.feed(b'other{collector="no"} 1\nwindows_exporter_collector_success_x{collector="no"} 1\n')
    learner.feed(b"x" * 100_000)
    assert len(learner._pending) == 0
    learner.feed(b'\nwindows_exporter_collector_success{collector="cpu"} 1\n')
    learner.feed(b'windows_exporter_collector_success{collector="os"')
    assert learner.finish() == {"cpu", "os"}


# -- the state a proxy keeps -----------------------------------------------------------------------------


def test_push_down_learns_first_narrows_then_refreshes() -> None:
    state = PushDown(Analysis(parse_rules(keep(NODE_KEEP_LIST))), refresh=300)
    first = state.decide("", now=0)
    assert (first.query, first.plan, first.learn) == ("", None, True)
    plan = state.learned(learn_collectors(CAPTURES["0.31"]), "1700000000", now=1)
    assert plan is not None
    assert plan.asked is not None
    narrowed = state.decide("", now=2)
    assert (
        narrowed.query
        == "collect[]=cpu&collect[]=logical_disk&collect[]=memory&collect[]=net&collect[]=os&collect[]=system"
    )
    assert narrowed.full == ""
    assert state.decide("fault=none", now=2).query == f"fault=none&{plan.query}"
    assert state.same_exporter("1700000000")
    assert not state.same_exporter("1700000999")
    # The same set again: no change to report.
    assert state.decide("", now=301).learn
    assert state.learned(learn_collectors(CAPTURES["0.31"]), "1700000000", now=301) is None
    state.forget()
    assert state.decide("", now=302).learn


def test_a_scraper_that_chose_its_collectors_is_left_alone() -> None:
    state = PushDown(Analysis(parse_rules(keep(NODE_KEEP_LIST))), refresh=300)
    state.learned(learn_collectors(CAPTURES["0.31"]), None, now=0)
    for query in ("collect[]=service", "collect%5B%5D=service", "a=1&collect[]=cpu"):
        assert asks_collectors(query)
        decision = state.decide(query, now=1)
        assert (decision.query, decision.plan, decision.learn) == (query, None, False)
    assert not asks_collectors("collector=cpu")
