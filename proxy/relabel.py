"""Prometheus relabel_config, with Prometheus's semantics: parsing, validation and the engine.

Pure: no I/O. Written from Prometheus's documented behaviour (`model/relabel` in
prometheus/prometheus, 2.x): RE2 regexes anchored as ``^(?s:...)$``, Go's ``regexp.Expand`` for
``$1``/``${1}``/``$name``, the same defaults, validation rules and error cases, and hashmod as the md5
of the joined values with its last 8 bytes read as a big-endian integer.

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
from dataclasses import dataclass
from typing import Any

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

# Prometheus 2.x label names, and its relabelTarget (a name that may hold $1/${1}/$name parts).
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


def parse_rule(raw: Any, where: str) -> Rule:
    """Validate one entry as Prometheus does; `raw` holds strings as YAML's BaseLoader gives them."""
    if not isinstance(raw, Mapping):
        raise RelabelConfigError(where, "must be a mapping of relabel_config fields")
    for key in raw:
        if key not in FIELDS:
            raise RelabelConfigError(f"{where}.{key}", f"unknown field (known: {', '.join(FIELDS)})")

    source = raw.get("source_labels")
    if source is None or source == "":
        source_labels: tuple[str, ...] = ()
    elif isinstance(source, Sequence) and not isinstance(source, str):
        source_labels = tuple(_string(v, f"{where}.source_labels[{i}]") for i, v in enumerate(source))
        for i, label in enumerate(source_labels):
            # UTF-8 names are allowed, as Prometheus 3 allows them; an empty one never is.
            if not label:
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
        where, action, source_labels, separator, pattern, modulus, target_label, replacement, "regex" in raw
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
    )


def _validate(
    where: str,
    action: str,
    source_labels: tuple[str, ...],
    separator: str,
    pattern: str,
    modulus: int,
    target_label: str,
    replacement: str,
    regex_given: bool,
) -> None:
    """Prometheus's relabel.Config.Validate, rule for rule, with the field each one is about."""
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
    plain_target = ("lowercase", "uppercase", "keepequal", "dropequal")
    if action in ("replace", *plain_target) and not _relabel_target(target_label):
        raise RelabelConfigError(
            f"{where}.target_label", f"{target_label!r} is invalid 'target_label' for {action} action"
        )
    if action in plain_target and not is_label_name(target_label):
        raise RelabelConfigError(
            f"{where}.target_label", f"{target_label!r} is invalid 'target_label' for {action} action"
        )
    if action in plain_target and replacement != DEFAULT_REPLACEMENT:
        raise RelabelConfigError(f"{where}.replacement", f"'replacement' can not be set for {action} action")
    if action == "labelmap" and not _relabel_target(replacement):
        raise RelabelConfigError(
            f"{where}.replacement", f"{replacement!r} is invalid 'replacement' for {action} action"
        )
    if action == "hashmod" and not is_label_name(target_label):
        raise RelabelConfigError(
            f"{where}.target_label", f"{target_label!r} is invalid 'target_label' for {action} action"
        )
    if action in ("keepequal", "dropequal") and (
        (regex_given and pattern != DEFAULT_REGEX)
        or modulus != 0
        or separator != DEFAULT_SEPARATOR
        or replacement != DEFAULT_REPLACEMENT
    ):
        raise RelabelConfigError(
            where, f"{action} action requires only 'source_labels' and `target_label`, and no other fields"
        )
    if action in ("labeldrop", "labelkeep") and (
        source_labels
        or target_label != ""
        or modulus != 0
        or separator != DEFAULT_SEPARATOR
        or replacement != DEFAULT_REPLACEMENT
    ):
        raise RelabelConfigError(where, f"{action} action requires only 'regex', and no other fields")


def parse_rules(raw: Any, where: str = "metric_relabel_configs") -> list[Rule]:
    if raw is None or raw == "":
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise RelabelConfigError(where, "must be a list of relabel_config entries")
    return [parse_rule(entry, f"{where}[{i}]") for i, entry in enumerate(raw)]


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
            if not is_label_name(target):
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
