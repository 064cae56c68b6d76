"""Prometheus 3's own relabel test cases, run through our engine under both name validation schemes.

The cases are data, transcribed from prometheus/prometheus model/relabel/relabel_test.go v3.14.0
into tests/data/prometheus-relabel-cases.yaml (its header says how). Every rule goes through the
same path a rule file does (YAML text, BaseLoader, parse_config_text), so what is checked is what
a user pasting the rule would get. Under `utf8` the expectations are the Go test's; under `legacy`
they are what relabel.go v3.14.0 does with model.LegacyValidation, as the data file states.
"""

from __future__ import annotations

import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.relabel import VALIDATIONS, RelabelConfigError, Rule, Validation, process
from proxy.rules import parse_config_text

CASES_FILE = Path(__file__).parent / "data" / "prometheus-relabel-cases.yaml"
# The Go file's table sizes at v3.14.0: a case lost in transcription fails the count test.
GO_TABLE_SIZES = {"relabel": 34, "validate": 10, "target_legacy_validity": 16, "unmarshal": 4}


@cache
def cases() -> dict[str, Any]:
    loaded = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def table(name: str) -> list[dict[str, Any]]:
    entries = cases()[name]
    assert isinstance(entries, list)
    return entries


def ids(name: str) -> list[str]:
    return [entry["go"] for entry in table(name)]


def parse(entries: list[dict[str, Any]], validation: Validation) -> list[Rule]:
    """Rules as a user's file would hold them: dumped to YAML text and read back as the proxy reads
    a rule file."""
    text = yaml.safe_dump({"metric_relabel_configs": entries}, allow_unicode=True)
    return parse_config_text(text, expand_env=False, validation=validation)


def parse_text(entry: str, validation: Validation) -> list[Rule]:
    """One metric_relabel_configs entry given as YAML text (Go's test YAML, unchanged)."""
    indented = textwrap.indent(entry, "    ")
    text = "metric_relabel_configs:\n  - " + indented[4:]
    return parse_config_text(text, expand_env=False, validation=validation)


def as_labels(mapping: dict[str, Any]) -> dict[str, str]:
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()), mapping
    return dict(mapping)


# --- TestRelabel: labels in, rules, labels out --------------------------------------------------


@pytest.mark.parametrize("validation", VALIDATIONS)
@pytest.mark.parametrize("case", table("relabel"), ids=ids("relabel"))
def test_relabel_cases(case: dict[str, Any], validation: Validation) -> None:
    expectation = "same" if validation == "utf8" else case["legacy"]
    if expectation != "same":
        refused = expectation["refused"]
        with pytest.raises(RelabelConfigError) as raised:
            parse(case["rules"], validation)
        assert raised.value.where == f"metric_relabel_configs[{refused['rule']}].{refused['field']}"
        assert raised.value.message == refused["message"]
        return
    rules = parse(case["rules"], validation)
    assert [rule.validation for rule in rules] == [validation] * len(case["rules"])
    result = process(as_labels(case["input"]), rules)
    if case.get("drop"):
        assert result is None
    else:
        assert result == as_labels(case["output"])


# --- TestRelabelValidate: one rule, valid or the error ------------------------------------------


def check_validation(rule: dict[str, Any], validation: Validation, error: str | None) -> None:
    if error is None:
        [parsed] = parse([rule], validation)
        assert parsed.validation == validation
        return
    with pytest.raises(RelabelConfigError) as raised:
        parse([rule], validation)
    assert error in raised.value.message
    assert raised.value.where.startswith("metric_relabel_configs[0]")


@pytest.mark.parametrize("case", table("validate"), ids=ids("validate"))
def test_validate_cases_under_the_go_scheme(case: dict[str, Any]) -> None:
    check_validation(case["rule"], case["go_scheme"], case["error"])


@pytest.mark.parametrize("case", table("validate"), ids=ids("validate"))
def test_validate_cases_under_the_other_scheme(case: dict[str, Any]) -> None:
    other: Validation = "legacy" if case["go_scheme"] == "utf8" else "utf8"
    check_validation(case["rule"], other, case["other_scheme"])


# --- TestTargetLabelLegacyValidity: relabelTargetLegacy -----------------------------------------


@pytest.mark.parametrize("case", table("target_legacy_validity"), ids=ids("target_legacy_validity"))
def test_legacy_target_validity(case: dict[str, Any]) -> None:
    """Legacy validation applies relabelTargetLegacy to a replace target holding `$` and to every
    labelmap replacement (a target without `$` must be a legacy name, which that pattern also
    decides); UTF-8 validation takes any non-empty name in both places."""
    target, valid = case["target"], case["valid"]
    for rule, field in (
        ({"target_label": target}, "target_label"),
        ({"regex": "(.*)", "replacement": target, "action": "labelmap"}, "replacement"),
    ):
        if valid:
            assert len(parse([rule], "legacy")) == 1
        else:
            with pytest.raises(RelabelConfigError) as raised:
                parse([rule], "legacy")
            assert raised.value.where == f"metric_relabel_configs[0].{field}"
        assert len(parse([rule], "utf8")) == 1


# --- TestConfig_UnmarshalThenMarshal: rules Go reads without error ------------------------------


@pytest.mark.parametrize("validation", VALIDATIONS)
@pytest.mark.parametrize("case", table("unmarshal"), ids=ids("unmarshal"))
def test_unmarshal_cases_are_accepted(case: dict[str, Any], validation: Validation) -> None:
    [rule] = parse_text(case["yaml"], validation)
    raw = yaml.load(case["yaml"], Loader=yaml.BaseLoader)
    assert (rule.action, rule.target_label, rule.separator) == (
        raw["action"],
        raw["target_label"],
        raw["separator"],
    )
    assert rule.regex.pattern == raw.get("regex", "(.*)")


# --- accounting ---------------------------------------------------------------------------------


def test_every_go_case_is_transcribed_or_listed_with_a_reason() -> None:
    sizes = {name: len(table(name)) for name in GO_TABLE_SIZES}
    assert sizes == GO_TABLE_SIZES
    skipped = cases()["not_expressible"]
    assert skipped, "the Go-only tests are listed"
    assert all(entry["go"] and len(entry["reason"]) > 20 for entry in skipped)
    assert {entry["legacy"] if entry["legacy"] == "same" else "refused" for entry in table("relabel")} == {
        "same",
        "refused",
    }
    runs = {
        "TestRelabel (x2 schemes)": 2 * sizes["relabel"],
        "TestRelabelValidate (x2 schemes)": 2 * sizes["validate"],
        "TestTargetLabelLegacyValidity": sizes["target_legacy_validity"],
        "TestConfig_UnmarshalThenMarshal (x2 schemes)": 2 * sizes["unmarshal"],
    }
    go_cases = sum(sizes.values())
    print(
        f"prometheus relabel_test.go v3.14.0: {go_cases} cases transcribed, {sum(runs.values())} runs "
        f"({', '.join(f'{k}: {v}' for k, v in runs.items())}); {len(skipped)} Go-only tests listed "
        "as not expressible"
    )
