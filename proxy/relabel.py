"""Prometheus relabel_config, with Prometheus's semantics: parsing, validation and the engine.

Pure: no I/O. Written from Prometheus's behaviour (`model/relabel` in prometheus/prometheus 3.x, read
at v3.14.0): RE2 regexes anchored as ``^(?s:...)$``, Go's ``regexp.Expand`` for ``$1``/``${1}``/
``$name``, the same defaults, validation rules and error cases, and hashmod as the md5 of the joined
values with its last 8 bytes read as a big-endian integer.

Label names are checked under one of Prometheus 3's two name validation schemes, chosen per parse
and kept on each Rule, because Prometheus 3 chooses it per scrape config
(`metric_name_validation_scheme`):

- ``utf8`` (Prometheus 3's default): a name is any non-empty valid UTF-8 string, so `utf-8.label`,
  `0${1}` or `${3}` are acceptable targets.
- ``legacy`` (Prometheus 2.x, and 3.x with `metric_name_validation_scheme: legacy`): a name is
  ``[a-zA-Z_][a-zA-Z0-9_]*``, and a target or labelmap replacement that holds `$` references must
  match Prometheus's `relabelTargetLegacy` pattern.

Either way, as in Prometheus 3, `source_labels` may be any non-empty UTF-8 name (Prometheus parses
them under its process-wide scheme, which is always UTF-8), `replace` skips a target that expands to
an invalid name under the rule's scheme, and `labelmap` writes whatever name its replacement expands
to, unchecked.

One documented difference from Prometheus: here the rules see only the exporter's labels. Prometheus
applies `metric_relabel_configs` after adding `job`, `instance` and other target labels, so a rule
that reads or drops those behaves differently in the proxy.
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ACTIONS = (
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
)
DEFAULT_SEPARATOR = ";"
DEFAULT_REGEX = "(.*)"
DEFAULT_REPLACEMENT = "$1"
FIELDS = ("source_labels", "separator", "regex", "modulus", "target_label", "replacement", "action")

NAME_LABEL = "__name__"

Validation = Literal["utf8", "legacy"]
VALIDATIONS: tuple[Validation, ...] = get_args(Validation)
DEFAULT_VALIDATION: Validation = "utf8"

# Legacy label names, and Prometheus's relabelTargetLegacy (a legacy name that may hold $1/${1}/$name
# parts), which is what legacy validation asks of a name that holds a `$`.
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_RELABEL_TARGET_PATTERN = r"^(?:(?:[a-zA-Z_]|\$(?:\{\w+\}|\w+))+\w*)+$"


@functools.cache
def _re2() -> tuple[Any, Any]:
    """The RE2 module and quiet options, imported on first use: a proxy without rules never pays
    for loading it."""
    import re2

    options = re2.Options()
    options.log_errors = False
    return re2, options


def _relabel_target(text: str) -> bool:
    re2, options = _re2()
    return re2.compile(_RELABEL_TARGET_PATTERN, options).match(text) is not None


@functools.lru_cache(maxsize=4096)
def is_label_name(name: str) -> bool:
    """A legacy label name (names repeat across series, so each is checked once)."""
    return _LABEL_NAME.match(name) is not None


@functools.lru_cache(maxsize=4096)
def is_utf8_label_name(name: str) -> bool:
    """A label name under UTF-8 validation: non-empty and valid UTF-8, as Go's utf8.ValidString.

    A Python str is valid UTF-8 unless it holds a lone surrogate (YAML's "\\udc80" escape, or bytes
    decoded with surrogateescape), which Go would see as invalid bytes.
    """
    return bool(name) and (name.isascii() or _encodes(name))


def label_name_check(validation: Validation) -> Callable[[str], bool]:
    """Prometheus's ValidationScheme.IsValidLabelName for a scheme, as a cached function."""
    if validation == "utf8":
        return is_utf8_label_name
    if validation == "legacy":
        return is_label_name
    raise ValueError(f"unknown name validation scheme {validation!r} (known: {', '.join(VALIDATIONS)})")


_LEGACY_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


@functools.lru_cache(maxsize=4096)
def is_legacy_metric_name(name: str) -> bool:
    """A legacy metric name: a legacy label name that may also hold `:` (recording rules' names)."""
    return _LEGACY_METRIC_NAME.match(name) is not None


def valid_label_set(labels: Mapping[str, str], validation: Validation) -> bool:
    """Whether Prometheus 3 ingests a relabeled series under `validation` (labels.IsValid).

    Not part of relabeling itself: Prometheus's scrape loop checks every series after
    metric_relabel_configs and fails the whole scrape on one it cannot take (a `labelmap` or
    `replace` to `__name__` may produce one). Values must be valid UTF-8 under either scheme.
    """
    valid_name = label_name_check(validation)
    metric_name = is_legacy_metric_name if validation == "legacy" else is_utf8_label_name
    for name, value in labels.items():
        if name == NAME_LABEL and not metric_name(value):
            return False
        if not valid_name(name) or not (value.isascii() or _encodes(value)):
            return False
    return True


def _encodes(text: str) -> bool:
    """Valid UTF-8 once encoded (no lone surrogates); values vary too much to be worth caching."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _templated_name_ok(value: str, validation: Validation) -> bool:
    """A replace target holding `$` or a labelmap replacement: Prometheus cannot know the expanded
    name yet, so under UTF-8 it asks only for a valid name, under legacy for relabelTargetLegacy."""
    if validation == "utf8":
        return is_utf8_label_name(value)
    return _relabel_target(value)


class RelabelConfigError(ValueError):
    """A rule is invalid; `where` says which rule and field, as in `metric_relabel_configs[2].regex`."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


# Escapes whose meaning in Python's `re` differs from RE2's, or that Python lacks: Unicode classes,
# quoting, \z \A, word boundaries, \s (RE2's has no \v), hex and octal forms.
_RE2_ONLY_ESCAPES = frozenset("pPQECzAbBsSx0123456789")


def _needs_re2(pattern: str) -> bool:
    """Whether the pattern uses a construct that Python's `re` reads differently from RE2.

    Everything else means the same in both engines (tests/test_relabel.py checks that on random
    inputs), and Python's `re` is about ten times faster per call from Python than the RE2 binding,
    which matters on a cold cache. Anchors count: Python's `$` also matches before a final newline.
    """
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 < n and pattern[i + 1] in _RE2_ONLY_ESCAPES:
                return True
            i += 2
            continue
        if in_class:
            if ch == "[" and pattern.startswith("[:", i):
                return True  # POSIX class
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":
                i += 1  # a leading ] is literal
            continue
        elif ch in "^$":
            return True
        elif ch == "(" and pattern.startswith("(?", i) and not pattern.startswith(("(?:", "(?P<"), i):
            return True  # flags such as (?i) or (?U), and (?<name>
        elif ch == "{" and pattern.startswith("{,", i):
            return True  # RE2 reads {,n} literally; Python as {0,n}
        i += 1
    return False


class Regex:
    """A relabel regex: validated by RE2 as Prometheus does, fully anchored, `.` matching newlines."""

    __slots__ = ("groupindex", "groups", "match", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        re2, options = _re2()
        try:
            compiled = re2.compile(f"^(?s:{pattern})$", options)
        except re2.error as exc:
            detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            detail = detail.replace(f"^(?s:{pattern})$", pattern)
            raise ValueError(f"invalid RE2 regex {pattern!r}: {detail}") from None
        self.groups: int = compiled.groups
        self.groupindex: Mapping[str, int] = dict(compiled.groupindex)
        self.match: Callable[[str], Any] = compiled.match
        fast = _python_equivalent(pattern, self.groups, self.groupindex)
        if fast is not None:
            self.match = fast.match


def _python_equivalent(pattern: str, groups: int, groupindex: Mapping[str, int]) -> re.Pattern[str] | None:
    if _needs_re2(pattern):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. FutureWarning for nested sets: not the same meaning
            compiled = re.compile(f"(?:{pattern})\\Z", re.DOTALL | re.ASCII)
    except (re.error, Warning):
        return None
    if compiled.groups != groups or dict(compiled.groupindex) != dict(groupindex):
        return None
    return compiled


# A template is literal text and group references, parsed once per rule.
Template = tuple[str | int, ...]


def parse_template(template: str, regex: Regex) -> Template:
    """Go's regexp.Expand, ahead of time: `$1`, `${1}`, `$name`, `${name}`, `$$`.

    As in Go, the longest run of letters, digits and `_` after `$` is the name, so `$1x` names the
    group "1x" (usually absent, hence empty); a reference to a missing group expands to nothing;
    a `$` that starts no valid reference stays a literal `$`.
    """
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "$":
            literal.append(ch)
            i += 1
            continue
        if i + 1 < n and template[i + 1] == "$":
            literal.append("$")
            i += 2
            continue
        name, end = _extract_name(template, i + 1)
        if name is None:
            literal.append("$")
            i += 1
            continue
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_group_index(name, regex))
        i = end
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def _extract_name(template: str, start: int) -> tuple[str | None, int]:
    i = start
    brace = i < len(template) and template[i] == "{"
    if brace:
        i += 1
    begin = i
    while i < len(template) and (template[i].isalpha() or template[i].isdecimal() or template[i] == "_"):
        i += 1
    if i == begin:
        return None, start
    name = template[begin:i]
    if brace:
        if i >= len(template) or template[i] != "}":
            return None, start
        i += 1
    return name, i


def _group_index(name: str, regex: Regex) -> int:
    """The group a reference means, or -1 (expands to nothing)."""
    if name.isascii() and name.isdigit() and not (name[0] == "0" and len(name) > 1):
        number = int(name) if len(name) < 9 else -1
        return number if 0 <= number <= regex.groups else -1
    return regex.groupindex.get(name, -1)


def expand(template: Template, match: Any) -> str:
    if len(template) == 1 and type(template[0]) is str:
        return template[0]
    out: list[str] = []
    for part in template:
        if type(part) is str:
            out.append(part)
        elif part >= 0:
            out.append(match.group(part) or "")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Rule:
    """One relabel_config entry, validated, with its templates parsed."""

    source_labels: tuple[str, ...]
    separator: str
    regex: Regex
    modulus: int
    target_label: str
    replacement: str
    action: str
    target_template: Template
    replacement_template: Template
    validation: Validation = DEFAULT_VALIDATION
    # The runtime check of an expanded replace target under `validation`: a cached function, as the
    # engine calls it once per replace per uncached series.
    valid_target: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "valid_target", label_name_check(self.validation))

    def can_set(self, label: str) -> bool:
        """Whether applying this rule might write `label` (used to know if names can change)."""
        if self.action == "replace":
            return self.target_label == label or "$" in self.target_label
        if self.action in ("hashmod", "lowercase", "uppercase"):
            return self.target_label == label
        return self.action == "labelmap"


def _string(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise RelabelConfigError(where, f"must be a string, got {type(value).__name__}")


def parse_rule(raw: Any, where: str, *, validation: Validation = DEFAULT_VALIDATION) -> Rule:
    """Validate one entry as Prometheus does under the name validation scheme `validation`; `raw`
    holds strings as YAML's BaseLoader gives them."""
    label_name_check(validation)  # an unknown scheme is the caller's bug: fail before any rule error
    if not isinstance(raw, Mapping):
        raise RelabelConfigError(where, "must be a mapping of relabel_config fields")
    for key in raw:
        if key not in FIELDS:
            raise RelabelConfigError(f"{where}.{key}", f"unknown field (known: {', '.join(FIELDS)})")

    source = raw.get("source_labels")
    # Prometheus tells a missing (or null) list from an empty one: labeldrop refuses `[]`.
    source_given = False
    if source is None or source == "":
        source_labels: tuple[str, ...] = ()
    elif isinstance(source, Sequence) and not isinstance(source, str):
        source_given = True
        source_labels = tuple(_string(v, f"{where}.source_labels[{i}]") for i, v in enumerate(source))
        for i, label in enumerate(source_labels):
            # Prometheus 3 reads source_labels under its process-wide scheme, which is always UTF-8,
            # whatever the rule's own scheme: any non-empty valid UTF-8 name.
            if not is_utf8_label_name(label):
                raise RelabelConfigError(
                    f"{where}.source_labels[{i}]", f"{label!r} is not a valid label name"
                )
    else:
        raise RelabelConfigError(f"{where}.source_labels", "must be a list of label names")

    separator = _string(raw.get("separator", DEFAULT_SEPARATOR), f"{where}.separator")
    target_label = _string(raw.get("target_label", ""), f"{where}.target_label")
    replacement = _string(raw.get("replacement", DEFAULT_REPLACEMENT), f"{where}.replacement")
    action = _string(raw.get("action", "replace"), f"{where}.action").lower()
    if action == "":
        raise RelabelConfigError(f"{where}.action", "relabel action cannot be empty")
    if action not in ACTIONS:
        raise RelabelConfigError(
            f"{where}.action", f"unknown relabel action {raw.get('action')!r} (known: {', '.join(ACTIONS)})"
        )
    modulus_raw = raw.get("modulus", "0")
    try:
        modulus = int(str(modulus_raw), 10)
        if modulus < 0 or modulus >= 2**64:
            raise ValueError
    except ValueError:
        raise RelabelConfigError(
            f"{where}.modulus", f"must be a non-negative integer, got {modulus_raw!r}"
        ) from None
    pattern = _string(raw.get("regex", DEFAULT_REGEX), f"{where}.regex")
    try:
        regex = Regex(pattern)
    except ValueError as exc:
        raise RelabelConfigError(f"{where}.regex", str(exc)) from None

    _validate(
        where,
        action,
        source_given,
        separator,
        modulus,
        target_label,
        replacement,
        regex_given="regex" in raw,
        validation=validation,
    )
    return Rule(
        source_labels=source_labels,
        separator=separator,
        regex=regex,
        modulus=modulus,
        target_label=target_label,
        replacement=replacement,
        action=action,
        target_template=parse_template(target_label, regex),
        replacement_template=parse_template(replacement, regex),
        validation=validation,
    )


def _validate(
    where: str,
    action: str,
    source_given: bool,
    separator: str,
    modulus: int,
    target_label: str,
    replacement: str,
    *,
    regex_given: bool,
    validation: Validation,
) -> None:
    """Prometheus's relabel.Config.Validate, check for check and in its order, with the field each
    one is about."""
    valid_name = label_name_check(validation)
    if action == "hashmod" and modulus == 0:
        raise RelabelConfigError(
            f"{where}.modulus", "relabel configuration for hashmod requires non-zero modulus"
        )
    needs_target = ("replace", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal")
    if action in needs_target and target_label == "":
        raise RelabelConfigError(
            f"{where}.target_label",
            f"relabel configuration for {action} action requires 'target_label' value",
        )
    invalid_target = RelabelConfigError(
        f"{where}.target_label", f"{target_label!r} is invalid 'target_label' for {action} action"
    )
    if action == "replace":
        # A literal target must be a valid name; one with `$` references is checked as a template.
        templated = "$" in target_label
        if not (_templated_name_ok(target_label, validation) if templated else valid_name(target_label)):
            raise invalid_target
    plain_target = ("lowercase", "uppercase", "keepequal", "dropequal")
    if action in plain_target and not valid_name(target_label):
        raise invalid_target
    if action in plain_target and replacement != DEFAULT_REPLACEMENT:
        raise RelabelConfigError(f"{where}.replacement", f"'replacement' can not be set for {action} action")
    if action == "labelmap" and not _templated_name_ok(replacement, validation):
        raise RelabelConfigError(
            f"{where}.replacement", f"{replacement!r} is invalid 'replacement' for {action} action"
        )
    if action == "hashmod" and not valid_name(target_label):
        raise invalid_target
    # Prometheus compares the regex by identity with its default: any regex written in the rule,
    # even `(.*)`, counts as set.
    if action in ("keepequal", "dropequal") and (
        regex_given or modulus != 0 or separator != DEFAULT_SEPARATOR or replacement != DEFAULT_REPLACEMENT
    ):
        raise RelabelConfigError(
            where, f"{action} action requires only 'source_labels' and `target_label`, and no other fields"
        )
    if action in ("labeldrop", "labelkeep") and (
        source_given
        or target_label != ""
        or modulus != 0
        or separator != DEFAULT_SEPARATOR
        or replacement != DEFAULT_REPLACEMENT
    ):
        raise RelabelConfigError(where, f"{action} action requires only 'regex', and no other fields")


def parse_rules(
    raw: Any, where: str = "metric_relabel_configs", *, validation: Validation = DEFAULT_VALIDATION
) -> list[Rule]:
    label_name_check(validation)  # an unknown scheme fails even with no rules to parse
    if raw is None or raw == "":
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise RelabelConfigError(where, "must be a list of relabel_config entries")
    return [parse_rule(entry, f"{where}[{i}]", validation=validation) for i, entry in enumerate(raw)]


def go_lower(text: str) -> str:
    """Go's strings.ToLower: each character mapped on its own, never into two.

    Python's str.lower() applies Unicode's full mappings ('İ' to 'i' plus a combining dot) and a
    final-sigma rule; Prometheus, in Go, maps one rune to one rune.
    """
    if text.isascii():
        return text.lower()
    out = []
    for ch in text:
        low = ch.lower()
        out.append(low if len(low) == 1 else _SIMPLE_LOWER.get(ch, ch))
    return "".join(out)


def go_upper(text: str) -> str:
    """Go's strings.ToUpper: 'ß' and 'ﬁ' stay as they are (no one-character upper case exists)."""
    if text.isascii():
        return text.upper()
    out = []
    for ch in text:
        up = ch.upper()
        if len(up) != 1:
            # Letters with a one-character title case (Greek with ypogegrammeni) upper-case to it.
            title = ch.title()
            up = title if len(title) == 1 else ch
        out.append(up)
    return "".join(out)


# The only character whose full lower-case mapping has two characters; its simple mapping is 'i'.
_SIMPLE_LOWER = {"\u0130": "i"}


def hashmod(value: str, modulus: int) -> int:
    digest = hashlib.md5(value.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[8:], "big") % modulus


def process(labels: dict[str, str], rules: Sequence[Rule]) -> dict[str, str] | None:
    """Apply the rules in order to a label set (changed in place); None if a rule drops it.

    Setting a label to the empty string deletes it, as Prometheus's label builder does.
    """
    for rule in rules:
        action = rule.action
        if rule.source_labels:
            value = rule.separator.join(labels.get(name, "") for name in rule.source_labels)
        else:
            value = ""
        if action == "keep":
            if rule.regex.match(value) is None:
                return None
        elif action == "drop":
            if rule.regex.match(value) is not None:
                return None
        elif action == "replace":
            match = rule.regex.match(value)
            if match is None:
                continue
            target = expand(rule.target_template, match)
            if not rule.valid_target(target):
                continue
            _set(labels, target, expand(rule.replacement_template, match))
        elif action == "keepequal":
            if labels.get(rule.target_label, "") != value:
                return None
        elif action == "dropequal":
            if labels.get(rule.target_label, "") == value:
                return None
        elif action == "hashmod":
            _set(labels, rule.target_label, str(hashmod(value, rule.modulus)))
        elif action == "lowercase":
            _set(labels, rule.target_label, go_lower(value))
        elif action == "uppercase":
            _set(labels, rule.target_label, go_upper(value))
        elif action == "labelmap":
            # Unchecked, as in Prometheus: a labelmap may write a name its scheme would refuse.
            for name, label_value in sorted(labels.items()):
                match = rule.regex.match(name)
                if match is not None:
                    _set(labels, expand(rule.replacement_template, match), label_value)
        elif action == "labeldrop":
            for name in [n for n in labels if rule.regex.match(n) is not None]:
                del labels[name]
        elif action == "labelkeep":
            for name in [n for n in labels if rule.regex.match(n) is None]:
                del labels[name]
    return labels


def _set(labels: dict[str, str], name: str, value: str) -> None:
    if value:
        labels[name] = value
    else:
        labels.pop(name, None)
