"""The rules the proxy applies, assembled from settings: the YAML file, `${VAR}` expansion, and the
PROXY_KEEP / PROXY_DROP shorthands. Every error is a one-line ConfigError naming the setting, the
rule's index and the field.

Every rule, the shorthands' included, is read under PROXY_NAME_VALIDATION, so the server,
`check-config` and the `relabel` dry run accept and apply the same rules the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.relabel import DEFAULT_VALIDATION, RelabelConfigError, Rule, Validation, parse_rule, parse_rules
from proxy.rewrite import RuleSet
from proxy.settings import ConfigError, Settings, env_name, flag_name

CONFIG_KEY = "metric_relabel_configs"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STRING_FIELDS = ("separator", "regex", "target_label", "replacement")


def _setting(field: str) -> str:
    return f"{env_name(field)} ({flag_name(field)})"


def parse_config_text(
    text: str,
    *,
    expand_env: bool,
    environ: Mapping[str, str] | None = None,
    validation: Validation = DEFAULT_VALIDATION,
) -> list[Rule]:
    """Rules from a YAML document holding `metric_relabel_configs:`, validated under `validation`.

    Scalars are read as strings (YAML's BaseLoader), as Prometheus's Go YAML reads them into its
    string fields: `replacement: 1` is the string "1", `true` is "true".
    """
    import yaml  # here, not at the top: a proxy without rules never loads it

    try:
        document = yaml.load(
            text, Loader=yaml.BaseLoader
        )  # BaseLoader builds no objects: every scalar is a string
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RelabelConfigError("YAML", f"{where}{problem}") from None
    if document is None or document == "":
        return []
    if not isinstance(document, Mapping):
        raise RelabelConfigError("YAML", f"the document must be a mapping with the key {CONFIG_KEY}")
    for key in document:
        if key != CONFIG_KEY:
            raise RelabelConfigError(key, f"unknown key (expected {CONFIG_KEY})")
    raw = document.get(CONFIG_KEY)
    if expand_env and isinstance(raw, list):
        raw = [
            _expand_entry(entry, f"{CONFIG_KEY}[{i}]", os.environ if environ is None else environ)
            for i, entry in enumerate(raw)
        ]
    return parse_rules(raw, CONFIG_KEY, validation=validation)


def _expand_entry(entry: Any, where: str, environ: Mapping[str, str]) -> Any:
    """`${VAR}` from the environment in the string fields and source_labels of one entry.

    `${name}` is also how a replacement names a regex group, so a reference to a variable that is
    not set stays as it is when it can be a group reference, and is an error otherwise (a typo
    must not silently turn into an empty label).
    """
    if not isinstance(entry, Mapping):
        return entry
    groups = _group_names(entry.get("regex"))
    expanded = dict(entry)
    for field in (*_STRING_FIELDS, "source_labels"):
        value = entry.get(field)
        if isinstance(value, str):
            expanded[field] = _expand(value, f"{where}.{field}", environ, groups)
        elif isinstance(value, list):
            expanded[field] = [
                _expand(v, f"{where}.{field}[{i}]", environ, groups) if isinstance(v, str) else v
                for i, v in enumerate(value)
            ]
    return expanded


def _group_names(pattern: Any) -> set[str]:
    if not isinstance(pattern, str):
        return set()
    return set(re.findall(r"\(\?P?<([A-Za-z_][A-Za-z0-9_]*)>", pattern))


def _expand(value: str, where: str, environ: Mapping[str, str], groups: set[str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in environ:
            return environ[name]
        if name in groups:
            return match.group(0)
        raise RelabelConfigError(where, f"${{{name}}} is not set in the environment")

    return _ENV_REFERENCE.sub(substitute, value)


def build_rules(settings: Settings) -> list[Rule]:
    """All rules, in the order they run: PROXY_KEEP, PROXY_DROP, then the file's."""
    rules: list[Rule] = []
    for field, action in (("keep", "keep"), ("drop", "drop")):
        pattern = getattr(settings, field)
        if pattern is None:
            continue
        try:
            rules.append(
                parse_rule(
                    {"source_labels": ["__name__"], "regex": pattern, "action": action},
                    field,
                    validation=settings.name_validation,
                )
            )
        except RelabelConfigError as exc:
            raise ConfigError(f"{_setting(field)}: {exc.message}") from None
    path = settings.relabel_config
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{_setting('relabel_config')}: cannot read {path}: {reason}") from None
        try:
            rules.extend(
                parse_config_text(
                    text, expand_env=settings.relabel_expand_env, validation=settings.name_validation
                )
            )
        except RelabelConfigError as exc:
            raise ConfigError(f"{_setting('relabel_config')}: {path}: {exc}") from None
    return rules


def build_rule_set(settings: Settings) -> RuleSet | None:
    """The RuleSet to rewrite with, or None when nothing is configured (pure passthrough)."""
    rules = build_rules(settings)
    if not rules:
        return None
    return RuleSet(rules, cache_size=settings.relabel_cache_size)
