"""The relabel engine, case by case from Prometheus's documented semantics (written by us)."""

from __future__ import annotations

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.relabel import (
    Regex,
    RelabelConfigError,
    Validation,
    hashmod,
    parse_rule,
    parse_rules,
    process,
    valid_label_set,
)


def run(config: list[dict], labels: dict[str, str], validation: Validation = "utf8") -> dict[str, str] | None:
    return process(dict(labels), parse_rules(config, validation=validation))


# --- defaults and actions ---------------------------------------------------------------------------


def test_defaults_are_prometheus_defaults() -> None:
    rule = parse_rule({"target_label": "copy", "source_labels": ["a"]}, "r")
    assert (rule.action, rule.separator, rule.regex.pattern, rule.replacement) == (
        "replace",
        ";",
        "(.*)",
        "$1",
    )
    assert rule.modulus == 0
    # replace with all defaults copies the joined source labels
    assert run([{"source_labels": ["a", "b"], "target_label": "c"}], {"a": "1", "b": "2"}) == {
        "a": "1",
        "b": "2",
        "c": "1;2",
    }


def test_keep_and_drop_match_the_whole_joined_value() -> None:
    base = {"__name__": "windows_cpu_time_total", "mode": "idle"}
    keep = [{"source_labels": ["__name__"], "regex": "windows_cpu_.*", "action": "keep"}]
    assert run(keep, base) == base
    assert run([{"source_labels": ["__name__"], "regex": "cpu", "action": "keep"}], base) is None  # anchored
    drop = [{"source_labels": ["__name__", "mode"], "separator": "@", "regex": ".*@idle", "action": "drop"}]
    assert run(drop, base) is None
    assert run(drop, {**base, "mode": "user"}) is not None


def test_missing_source_labels_are_empty_strings() -> None:
    rules = [{"source_labels": ["nope"], "regex": "", "action": "keep"}]
    assert run(rules, {"__name__": "x"}) == {"__name__": "x"}
    rules = [{"source_labels": ["a", "nope"], "regex": "1;", "action": "keep"}]
    assert run(rules, {"__name__": "x", "a": "1"}) is not None


def test_replace_expansion_forms() -> None:
    labels = {"__name__": "windows_net_bytes_sent_total", "nic": "Ethernet 2"}
    config = [
        {
            "source_labels": ["__name__"],
            "regex": "windows_(?P<area>[a-z]+)_(.*)",
            "target_label": "area",
            "replacement": "$area",
        },
        {
            "source_labels": ["__name__"],
            "regex": "windows_([a-z]+)_(.*)",
            "target_label": "rest",
            "replacement": "${2}!",
        },
        {"source_labels": ["nic"], "regex": "(\\w+) (\\d)", "target_label": "nic", "replacement": "$1-${2}"},
        {"source_labels": ["nic"], "regex": "(.*)", "target_label": "dollar", "replacement": "$$1"},
        {"source_labels": ["nic"], "regex": "(.*)", "target_label": "gotcha", "replacement": "$1x"},
        {"source_labels": ["nic"], "regex": "(.*)", "target_label": "stray", "replacement": "a$"},
    ]
    result = run(config, labels)
    assert result == {
        "__name__": "windows_net_bytes_sent_total",
        "nic": "Ethernet-2",
        "area": "net",
        "rest": "bytes_sent_total!",
        "dollar": "$1",
        "stray": "a$",
        # "$1x" names the group "1x", which does not exist: it expands to nothing, so no label.
    }


def test_replace_target_label_can_be_a_template() -> None:
    config = [
        {"source_labels": ["k", "v"], "regex": "(.+);(.+)", "target_label": "tag_$1", "replacement": "$2"}
    ]
    assert run(config, {"k": "env", "v": "prod"}) == {"k": "env", "v": "prod", "tag_env": "prod"}
    # "tag_a-b" is a name under UTF-8 validation (Prometheus 3's default)...
    assert run(config, {"k": "a-b", "v": "prod"}) == {"k": "a-b", "v": "prod", "tag_a-b": "prod"}
    # ...and not under legacy validation, where a target that expands to an invalid name changes nothing
    assert run(config, {"k": "a-b", "v": "prod"}, "legacy") == {"k": "a-b", "v": "prod"}
    # an empty name is invalid under both
    empty = [{"source_labels": ["k"], "regex": "(x?)", "target_label": "$1", "replacement": "v"}]
    for validation in ("utf8", "legacy"):
        assert run(empty, {"a": "1"}, validation) == {"a": "1"}  # type: ignore[arg-type]


def test_replace_without_a_match_changes_nothing_and_empty_deletes() -> None:
    config = [{"source_labels": ["a"], "regex": "z(.*)", "target_label": "b", "replacement": "y"}]
    assert run(config, {"a": "x", "b": "keep"}) == {"a": "x", "b": "keep"}
    delete = [{"source_labels": ["nope"], "target_label": "b"}]  # $1 of "" is "": deletes b
    assert run(delete, {"a": "x", "b": "gone"}) == {"a": "x"}


def test_rename_through_name_label() -> None:
    config = [
        {
            "source_labels": ["__name__"],
            "regex": "windows_(.*)",
            "target_label": "__name__",
            "replacement": "win_$1",
        }
    ]
    assert run(config, {"__name__": "windows_os_info"}) == {"__name__": "win_os_info"}


def test_keepequal_and_dropequal() -> None:
    keepequal = [{"source_labels": ["a"], "target_label": "b", "action": "keepequal"}]
    assert run(keepequal, {"a": "1", "b": "1"}) is not None
    assert run(keepequal, {"a": "1", "b": "2"}) is None
    dropequal = [{"source_labels": ["a"], "target_label": "b", "action": "dropequal"}]
    assert run(dropequal, {"a": "1", "b": "1"}) is None
    assert run(dropequal, {"a": "1"}) is not None


@pytest.mark.parametrize(("value", "expected"), [("baz", 976), ("foo\nbar", 734)])
def test_hashmod_golden_values(value: str, expected: int) -> None:
    assert hashmod(value, 1000) == expected
    config = [{"source_labels": ["v"], "modulus": "1000", "target_label": "shard", "action": "hashmod"}]
    assert run(config, {"v": value}) == {"v": value, "shard": str(expected)}


def test_labelmap_copies_matching_names() -> None:
    config = [{"regex": "__meta_(.+)", "replacement": "meta_$1", "action": "labelmap"}]
    assert run(config, {"__meta_zone": "a", "x": "1"}) == {"__meta_zone": "a", "x": "1", "meta_zone": "a"}


def test_labeldrop_and_labelkeep_match_names() -> None:
    labels = {"__name__": "m", "core": "0,0", "mode": "idle", "instance_copy": "1"}
    assert run([{"regex": "core|instance_.*", "action": "labeldrop"}], labels) == {
        "__name__": "m",
        "mode": "idle",
    }
    assert run([{"regex": "__name__|mode", "action": "labelkeep"}], labels) == {
        "__name__": "m",
        "mode": "idle",
    }


def test_lowercase_and_uppercase() -> None:
    config = [
        {"source_labels": ["volume"], "target_label": "lower", "action": "lowercase"},
        {"source_labels": ["volume"], "target_label": "upper", "action": "uppercase"},
    ]
    assert run(config, {"volume": "HarddiskVolume1"}) == {
        "volume": "HarddiskVolume1",
        "lower": "harddiskvolume1",
        "upper": "HARDDISKVOLUME1",
    }


def test_case_mapping_is_go_s_one_rune_to_one_rune() -> None:
    config = [
        {"source_labels": ["v"], "target_label": "up", "action": "uppercase"},
        {"source_labels": ["w"], "target_label": "low", "action": "lowercase"},
        {"source_labels": ["x"], "target_label": "sigma", "action": "lowercase"},
    ]
    result = run(config, {"v": "Straße ﬁle", "w": "İdle", "x": "ΑΣ Ωμέγα"})
    assert result is not None
    assert result["up"] == "STRAßE ﬁLE"  # no one-character upper case: unchanged, as in Go
    assert result["low"] == "idle"  # not "i" plus a combining dot
    assert result["sigma"] == "ασ ωμέγα"  # noqa: RUF001 (no final-sigma rule)


def test_multiline_values_match_with_dot_all() -> None:
    config = [{"source_labels": ["msg"], "regex": "first.*last", "action": "keep"}]
    assert run(config, {"msg": "first\nmiddle\nlast"}) is not None
    # `$` is the end of the text, not the end of a line: a trailing newline does not match
    assert run([{"source_labels": ["msg"], "regex": "x$", "action": "keep"}], {"msg": "x\n"}) is None
    assert run([{"source_labels": ["msg"], "regex": "x", "action": "keep"}], {"msg": "x\n"}) is None


def test_utf8_label_names_and_values() -> None:
    labels = {"__name__": "m", "région": "Île-de-France", "ключ": "значение"}
    assert run([{"regex": "région", "action": "labeldrop"}], labels) == {"__name__": "m", "ключ": "значение"}
    config = [{"regex": "(.)é(.*)", "replacement": "r_$2", "action": "labelmap"}]
    assert run(config, labels)["r_gion"] == "Île-de-France"  # type: ignore[index]
    config = [{"source_labels": ["région"], "regex": "\\pL+-.*", "action": "keep"}]
    assert run(config, labels) is not None


def test_action_names_are_case_insensitive() -> None:
    assert parse_rule({"action": "LabelDrop", "regex": "x"}, "r").action == "labeldrop"


# --- validation, as Prometheus validates --------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "where", "needle"),
    [
        ({"action": "replace"}, "rules[0].target_label", "requires 'target_label'"),
        ({"action": "hashmod", "target_label": "x"}, "rules[0].modulus", "non-zero modulus"),
        ({"action": "hashmod", "target_label": "x", "modulus": "ten"}, "rules[0].modulus", "integer"),
        (
            {"action": "lowercase", "target_label": "x", "replacement": "y"},
            "rules[0].replacement",
            "can not be set",
        ),
        ({"action": "keepequal", "target_label": "b", "regex": "x"}, "rules[0]", "requires only"),
        # Prometheus compares keepequal's regex with its default by identity: `(.*)` written out is set.
        ({"action": "dropequal", "target_label": "b", "regex": "(.*)"}, "rules[0]", "requires only"),
        ({"action": "labeldrop", "regex": "x", "source_labels": ["a"]}, "rules[0]", "requires only 'regex'"),
        # An empty list is not a missing one (promtool 2.42 refuses `source_labels: []` here too).
        ({"action": "labelkeep", "regex": "x", "source_labels": []}, "rules[0]", "requires only 'regex'"),
        ({"action": "labelmap", "replacement": ""}, "rules[0].replacement", "invalid 'replacement'"),
        ({"action": "explode"}, "rules[0].action", "unknown relabel action"),
        ({"action": "keep", "regex": "(a)\\1"}, "rules[0].regex", "invalid RE2 regex"),
        ({"action": "keep", "regex": "(?=a)"}, "rules[0].regex", "invalid RE2 regex"),
        ({"action": "keep", "regex": "(?<!a)b"}, "rules[0].regex", "invalid RE2 regex"),
        (
            {"action": "keep", "source_labels": [""]},
            "rules[0].source_labels[0]",
            "not a valid label name",
        ),
        ({"action": "keep", "source_labels": "__name__"}, "rules[0].source_labels", "must be a list"),
        ({"action": "keep", "regexp": "x"}, "rules[0].regexp", "unknown field"),
    ],
)
@pytest.mark.parametrize("validation", ["utf8", "legacy"])
def test_invalid_rules_name_index_and_field(
    config: dict, where: str, needle: str, validation: Validation
) -> None:
    with pytest.raises(RelabelConfigError) as raised:
        parse_rules([{"source_labels": ["a"]}, config][1:], "rules", validation=validation)
    assert raised.value.where == where
    assert needle in raised.value.message
    assert "\n" not in str(raised.value)


# Names that only legacy validation refuses: Prometheus 3 (UTF-8 by default) takes these rules.
LEGACY_ONLY = [
    ({"action": "uppercase", "target_label": "$1"}, "rules[0].target_label", "invalid 'target_label'"),
    ({"action": "labelmap", "replacement": "1bad"}, "rules[0].replacement", "invalid 'replacement'"),
    ({"action": "replace", "target_label": "bad-name"}, "rules[0].target_label", "invalid 'target_label'"),
    ({"action": "replace", "target_label": "0${1}"}, "rules[0].target_label", "invalid 'target_label'"),
    ({"action": "hashmod", "target_label": "shard.id", "modulus": "4"}, "rules[0].target_label", "invalid"),
    ({"action": "keepequal", "target_label": "région"}, "rules[0].target_label", "invalid 'target_label'"),
]


@pytest.mark.parametrize(("config", "where", "needle"), LEGACY_ONLY)
def test_non_legacy_names_are_refused_only_under_legacy_validation(
    config: dict, where: str, needle: str
) -> None:
    with pytest.raises(RelabelConfigError) as raised:
        parse_rules([config], "rules", validation="legacy")
    assert (raised.value.where, needle in raised.value.message) == (where, True)
    [rule] = parse_rules([config], "rules", validation="utf8")
    assert (rule.validation, rule.action) == ("utf8", config["action"])


def test_a_rule_keeps_its_scheme_for_the_runtime_check() -> None:
    config = [{"source_labels": ["k"], "regex": "(.*)", "target_label": "${1}", "replacement": "v"}]
    assert run(config, {"k": "a.b"}, "utf8") == {"k": "a.b", "a.b": "v"}
    assert run(config, {"k": "a.b"}, "legacy") == {"k": "a.b"}
    # labelmap is not checked at run time in Prometheus, under either scheme
    labelmap = [{"regex": "k(.*)", "replacement": "x$1", "action": "labelmap"}]
    assert run(labelmap, {"k.1": "v"}, "legacy") == {"k.1": "v", "x.1": "v"}
    # source labels are read under UTF-8 whatever the rule's scheme, as Prometheus 3 reads them
    keep = [{"source_labels": ["a.b"], "regex": "yes", "action": "keep"}]
    assert run(keep, {"a.b": "yes"}, "legacy") == {"a.b": "yes"}
    with pytest.raises(RelabelConfigError, match=r"source_labels\[0\]: '\\udc80' is not a valid"):
        parse_rules([{"source_labels": ["\udc80"], "action": "keep"}], "rules")
    with pytest.raises(ValueError, match="unknown name validation scheme"):
        parse_rules([], "rules", validation="strict")  # type: ignore[arg-type]


def test_rule_index_counts_from_zero_in_the_list() -> None:
    with pytest.raises(RelabelConfigError, match=r"^rules\[2\]\.regex: "):
        parse_rules(
            [{"action": "keep"}, {"action": "drop", "regex": "x"}, {"action": "keep", "regex": "("}], "rules"
        )


# --- the fast path: Python's re must mean exactly what RE2 means --------------------------------------

PATTERNS = [
    "windows_cpu_time_total|windows_memory_.*|windows_os_.*",
    "windows_service_.*",
    "(.*)",
    "([a-z]+)_(\\d+)?",
    "(?P<area>[a-z]+)_(?:x|y)*z?",
    "a{2,3}b+c*?",
    "[^,]+,[^,]+",
    "[a-c\\]x-]+",
    ".",
    "",
    "(a|ab)(c|bcd)(d*)",
    "\\w+\\.\\d",
]
RE2_ONLY = ["^a$", "\\pL+", "(?i)abc", "[[:alpha:]]+", "a\\b", "\\s+", "x{,3}", "\\Qa.b\\E", "(?U)a+"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_common_patterns_take_the_fast_path(pattern: str) -> None:
    regex = Regex(pattern)
    assert not type(regex.match).__module__.startswith("re2"), pattern
    assert "re2" not in repr(regex.match)


@pytest.mark.parametrize("pattern", RE2_ONLY)
def test_patterns_that_differ_in_python_use_re2(pattern: str) -> None:
    assert "re2" in repr(Regex(pattern).match) or "_re2" in repr(Regex(pattern).match)


_alphabet = st.sampled_from(list("abcdxyz_019 ,.\n-]é"))


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), text=st.text(_alphabet, max_size=12))
def test_fast_path_agrees_with_re2(pattern: str, text: str) -> None:
    fast = Regex(pattern)
    options = re2.Options()
    options.log_errors = False
    slow = re2.compile(f"^(?s:{pattern})$", options)
    a, b = fast.match(text), slow.match(text)
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        for group in range(fast.groups + 1):
            assert a.span(group) == b.span(group)


def test_valid_label_set_is_prometheus_3s_check_after_relabeling() -> None:
    """scrape.go fails a scrape whose relabeled series labels.IsValid refuses under its scheme."""
    legacy_ok = {"__name__": "job:up:sum", "le": "+Inf", "région_value": ""}
    assert not valid_label_set(legacy_ok, "legacy")  # a non-legacy label name
    del legacy_ok["région_value"]
    assert valid_label_set(legacy_ok, "legacy")  # `:` is allowed in a legacy metric name
    assert not valid_label_set({"__name__": "edge-value"}, "legacy")
    assert not valid_label_set({"__name__": "m", "job:x": "1"}, "legacy")  # ...not in a label name
    assert valid_label_set({"__name__": "edge-value", "utf-8.label": "x", "0": "é"}, "utf8")
    assert not valid_label_set({"__name__": "m", "": "x"}, "utf8")
    assert not valid_label_set({"__name__": "m", "a": "\udc80"}, "utf8")  # a value must be UTF-8 too
    assert not valid_label_set({"__name__": ""}, "utf8")
