"""The Grafana dashboards of monitoring/dashboards/ as data: their panels, queries and variables.

Shared by the structural check (test_monitoring_dashboards.py) and the live check against a real
Prometheus, which substitutes the variables as Grafana would, runs every query and draws the
results with render_dashboard(). Pure apart from reading the JSON files and drawing with
matplotlib (imported only by render_dashboard, so the structural check runs without it).

The PromQL reading here (selectors(), grouping_labels()) is a tokenizer, not a parser: enough to
list the metric names, label matchers and grouping labels of the queries these dashboards use,
so a test can check each against what the exporter and the proxy really serve. Anything it
cannot read raises PromQLSyntaxError rather than being skipped, and the live check has Prometheus
itself parse every query.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "monitoring" / "dashboards"

# Grafana's global variables that a Prometheus query may use. $__rate_interval and $__interval are
# the only ones these dashboards need; the rest are here so a query using them is not reported as
# using an undefined variable.
BUILTIN_VARIABLES = frozenset(
    {
        "__interval",
        "__interval_ms",
        "__rate_interval",
        "__rate_interval_ms",
        "__range",
        "__range_s",
        "__range_ms",
        "__from",
        "__to",
    }
)

# $name, ${name}, ${name:format} and [[name]]: the three spellings Grafana interpolates.
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]")


class UndefinedVariableError(KeyError):
    """A query uses a variable that is neither given nor one of Grafana's built-ins."""


class PromQLSyntaxError(ValueError):
    """The tokenizer met something it does not read (see the module docstring)."""


# ------------------------------------------------------------------------------------- dashboards


@dataclass(frozen=True)
class Query:
    """One target of one panel, with what a renderer or a checker needs of its panel."""

    panel_id: int
    panel_title: str
    panel_type: str
    ref_id: str
    expr: str
    legend_format: str
    instant: bool
    format: str
    unit: str

    @property
    def key(self) -> tuple[int, str]:
        """How render_dashboard's `results` are keyed: (panel id, refId)."""
        return (self.panel_id, self.ref_id)


def dashboard_paths() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def load_dashboard(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def iter_panels(dashboard: Mapping[str, Any], *, rows: bool = False) -> Iterator[dict[str, Any]]:
    """Every panel in layout order, a row's nested panels included (a collapsed row keeps its
    panels inside it, an expanded one lists them after it); rows themselves only if asked."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            if rows:
                yield panel
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(dashboard: Mapping[str, Any]) -> list[Query]:
    found = []
    for panel in iter_panels(dashboard):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for target in panel.get("targets", []):
            found.append(
                Query(
                    panel_id=panel["id"],
                    panel_title=panel.get("title", ""),
                    panel_type=panel["type"],
                    ref_id=target.get("refId", ""),
                    expr=target.get("expr", ""),
                    legend_format=target.get("legendFormat", ""),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                    format=target.get("format", "time_series"),
                    unit=unit,
                )
            )
    return found


def variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


def variable_names(dashboard: Mapping[str, Any]) -> set[str]:
    return {v["name"] for v in variables(dashboard)}


def variable_query(variable: Mapping[str, Any]) -> str:
    """The PromQL-ish query of a query variable (e.g. `label_values(m{job="$job"}, node)`), or ""
    (Grafana stores it as a string in old dashboards, as an object in current ones)."""
    query = variable.get("query", "")
    if isinstance(query, Mapping):
        return str(query.get("query", ""))
    return str(query) if variable.get("type") == "query" else ""


_LABEL_VALUES = re.compile(r"\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(selector, label)` or `label_values(label)` as (selector or None, label): what
    Prometheus's /api/v1/label/<label>/values?match[]=<selector> answers for a variable."""
    m = _LABEL_VALUES.fullmatch(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("match"), m.group("label")


def default_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Each variable's saved current value, where it has one (job has; node is picked at load)."""
    values = {}
    for variable in variables(dashboard):
        value = variable.get("current", {}).get("value")
        if isinstance(value, str) and value:
            values[variable["name"]] = value
    return values


# ------------------------------------------------------------------------------------ variables


def variables_used(text: str) -> set[str]:
    """Names of the variables a query or a variable's query refers to, built-ins included."""
    return {m.group(1) or m.group(2) or m.group(4) for m in _VARIABLE.finditer(text)}


def format_duration(seconds: float) -> str:
    """A Prometheus duration; whole seconds where possible, as Grafana writes $__rate_interval."""
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {seconds}")
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def builtin_values(
    *, step: float = 15.0, scrape_interval: float = 15.0, range_seconds: float = 3600.0
) -> dict[str, str]:
    """Grafana's built-ins for a query_range with this step, against a Prometheus data source
    whose scrape interval is `scrape_interval`: $__rate_interval is max($__interval + scrape
    interval, 4 * scrape interval), so a rate() always spans at least four samples."""
    interval = max(step, scrape_interval)
    rate_interval = max(interval + scrape_interval, 4 * scrape_interval)
    return {
        "__interval": format_duration(interval),
        "__interval_ms": str(round(interval * 1000)),
        "__rate_interval": format_duration(rate_interval),
        "__rate_interval_ms": str(round(rate_interval * 1000)),
        "__range": format_duration(range_seconds),
        "__range_s": str(round(range_seconds)),
        "__range_ms": str(round(range_seconds * 1000)),
    }


def _escape_single(value: str) -> str:
    # A single value lands inside a double-quoted PromQL string.
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _escape_regex(value: str) -> str:
    # As Grafana's Prometheus data source escapes each value of a multi-value variable: regex
    # metacharacters get a backslash, which itself is doubled inside the PromQL string.
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(
    expr: str,
    values: Mapping[str, str | Sequence[str]],
    *,
    step: float = 15.0,
    scrape_interval: float = 15.0,
    range_seconds: float = 3600.0,
) -> str:
    """`expr` with every variable replaced as Grafana would before sending it to Prometheus.

    `values` maps a variable's name to its value, or to a list of values for a multi-value
    variable (written `(a|b)`, each regex-escaped, for use with `=~`). Built-ins come from
    builtin_values() unless `values` gives them. An unknown variable raises
    UndefinedVariableError, so a typo in a dashboard cannot slip through as a literal `$nodee`.
    """
    known: dict[str, str | Sequence[str]] = {
        **builtin_values(step=step, scrape_interval=scrape_interval, range_seconds=range_seconds),
        **values,
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        if name not in known:
            raise UndefinedVariableError(name)
        value = known[name]
        if isinstance(value, str):
            return value if name in BUILTIN_VARIABLES else _escape_single(value)
        return "(" + "|".join(_escape_regex(v) for v in value) + ")"

    return _VARIABLE.sub(replace, expr)


# ----------------------------------------------------------------------------- reading PromQL


@dataclass(frozen=True)
class Selector:
    """A vector selector: `name{label op "value", ...}`, with its place in the query."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]
    start: int
    end: int


_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}) | _GROUPING
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:[a-zA-Z]+[0-9a-zA-Z]*)*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_OPERATORS = re.compile(r"==|!=|>=|<=|=~|!~|[-+*/%^<>@]")
_MATCHER = re.compile(
    r'\s*(?:(?P<label>[A-Za-z_][A-Za-z0-9_]*)|(?P<qlabel>"(?:[^"\\]|\\.)*"))'
    r'\s*(?:(?P<op>=~|!~|!=|=)\s*(?P<value>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'))?\s*(?:,|$)'
)


@dataclass
class _Scan:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    # (kind, start, end) of each token in order, for or_alternatives() to look at `or`'s neighbours.
    tokens: list[tuple[str, int, int]] = field(default_factory=list)


def _unquote(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text[1:-1]


def _matchers(body: str, at: int) -> list[tuple[str, str, str]]:
    found = []
    pos = 0
    while pos < len(body) and body[pos:].strip():
        m = _MATCHER.match(body, pos)
        if not m or m.end() == pos:
            raise PromQLSyntaxError(f"cannot read the label matchers at offset {at + pos}: {body!r}")
        label = m.group("label") or _unquote(m.group("qlabel"))
        if m.group("op") is None:
            if m.group("qlabel") is None:
                raise PromQLSyntaxError(f"label {label!r} without an operator at offset {at + pos}")
            found.append(("__name__", "=", label))  # {"name"}: a quoted metric name
        else:
            found.append((label, m.group("op"), _unquote(m.group("value"))))
        pos = m.end()
    return found


def _closing(expr: str, pos: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at `pos`, strings skipped."""
    depth = 0
    while pos < len(expr):
        char = expr[pos]
        if char in "\"'`":
            m = _STRING.match(expr, pos)
            if not m:
                raise PromQLSyntaxError(f"unterminated string at offset {pos}")
            pos = m.end()
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise PromQLSyntaxError(f"unbalanced {opening!r} in {expr!r}")


def _scan(expr: str) -> _Scan:
    scan = _Scan()
    pos = 0
    while pos < len(expr):
        char = expr[pos]
        if char.isspace():
            pos += 1
        elif char == "#":
            newline = expr.find("\n", pos)
            pos = len(expr) if newline < 0 else newline
        elif char in "\"'`":
            m = _STRING.match(expr, pos)
            if not m:
                raise PromQLSyntaxError(f"unterminated string at offset {pos}")
            scan.tokens.append(("str", pos, m.end()))
            pos = m.end()
        elif char == "[":  # range or subquery: durations only
            end = _closing(expr, pos, "[", "]")
            scan.tokens.append(("range", pos, end))
            pos = end
        elif char == "{":  # a selector without a name outside the braces
            end = _closing(expr, pos, "{", "}")
            matchers = _matchers(expr[pos + 1 : end - 1], pos + 1)
            names = [v for label, op, v in matchers if label == "__name__" and op == "="]
            if not names:
                raise PromQLSyntaxError(f"selector without a metric name at offset {pos}")
            kept = tuple(m for m in matchers if m[0] != "__name__")
            scan.selectors.append(Selector(names[0], kept, pos, end))
            scan.tokens.append(("selector", pos, end))
            pos = end
        elif char.isdigit() or (char == "." and expr[pos + 1 : pos + 2].isdigit()):
            m = _NUMBER.match(expr, pos)
            if not m:
                raise PromQLSyntaxError(f"cannot read a number at offset {pos}")
            scan.tokens.append(("num", pos, m.end()))
            pos = m.end()
        elif m := _IDENT.match(expr, pos):
            word = m.group()
            after = m.end()
            while after < len(expr) and expr[after].isspace():
                after += 1
            if word in _GROUPING:
                if after >= len(expr) or expr[after] != "(":
                    if word in ("group_left", "group_right"):  # may stand without a label list
                        scan.tokens.append(("keyword", pos, m.end()))
                        pos = m.end()
                        continue
                    raise PromQLSyntaxError(f"{word} without a label list at offset {pos}")
                end = _closing(expr, after, "(", ")")
                for label in expr[after + 1 : end - 1].split(","):
                    if label.strip():
                        scan.grouping.add(
                            _unquote(label.strip()) if label.strip()[0] in "\"'" else label.strip()
                        )
                scan.tokens.append(("keyword", pos, end))
                pos = end
            elif word in _KEYWORDS or word in _AGGREGATIONS or (after < len(expr) and expr[after] == "("):
                scan.tokens.append(("or" if word == "or" else "keyword", pos, m.end()))
                pos = m.end()
            else:
                end = m.end()
                matchers: list[tuple[str, str, str]] = []
                if after < len(expr) and expr[after] == "{":
                    end = _closing(expr, after, "{", "}")
                    matchers = _matchers(expr[after + 1 : end - 1], after + 1)
                scan.selectors.append(Selector(word, tuple(matchers), pos, end))
                scan.tokens.append(("selector", pos, end))
                pos = end
        elif m := _OPERATORS.match(expr, pos):
            scan.tokens.append(("op", pos, m.end()))
            pos = m.end()
        elif char in "(),":
            scan.tokens.append((char, pos, pos + 1))
            pos += 1
        else:
            raise PromQLSyntaxError(f"unexpected {char!r} at offset {pos} in {expr!r}")
    return scan


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a query (variables substituted first), in order."""
    return _scan(expr).selectors


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""
    return _scan(expr).grouping


def or_alternatives(expr: str) -> list[tuple[Selector, Selector]]:
    """Pairs of bare selectors written `a{...} or b{...}`: how a dashboard spells one series that
    two exporter versions name differently (the only use of `or` the existence check credits)."""
    scan = _scan(expr)
    by_start = {s.start: s for s in scan.selectors}
    pairs = []
    for i, (kind, _, _) in enumerate(scan.tokens):
        if kind != "or" or i == 0 or i + 1 >= len(scan.tokens):
            continue
        before, after = scan.tokens[i - 1], scan.tokens[i + 1]
        if before[0] == "selector" and after[0] == "selector":
            pairs.append((by_start[before[1]], by_start[after[1]]))
    return pairs


_LEGEND = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


def legend_labels(legend_format: str) -> set[str]:
    return set(_LEGEND.findall(legend_format))


def legend(legend_format: str, metric: Mapping[str, str]) -> str:
    """A series' name as Grafana's legendFormat makes it: `{{label}}` replaced by the label's
    value (empty if absent); with no format, the series' labels as Prometheus prints them."""
    if legend_format and legend_format != "__auto":
        return _LEGEND.sub(lambda m: metric.get(m.group(1), ""), legend_format)
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{metric.get('__name__', '')}{{{labels}}}"


# ---------------------------------------------------------------------------------- exposition

_SAMPLE_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_PAIR = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def exposed_series(text: str) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values seen, from a text-format exposition (legacy names
    only: every name the exporter and the proxy serve is one). Histogram `_bucket`/`_sum`/`_count`
    samples appear under their own names, as PromQL sees them."""
    series: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_NAME.match(line)
        if not m:
            raise ValueError(f"not a sample line: {line[:80]!r}")
        labels = series.setdefault(m.group(), {})
        if line[m.end() : m.end() + 1] == "{":
            close = line.index("}", m.end())
            for pair in _LABEL_PAIR.finditer(line, m.end() + 1, close):
                labels.setdefault(pair.group(1), set()).add(pair.group(2))
    return series


# ------------------------------------------------------------------------------------ rendering

# Prometheus API results per target: the `result` list of /api/v1/query_range (a matrix:
# {"metric": {...}, "values": [[t, "v"], ...]}) or of /api/v1/query (a vector: {"metric",
# "value": [t, "v"]}), keyed by Query.key.
Results = Mapping[tuple[int, str], Sequence[Mapping[str, Any]]]

CAPTION = (
    "A rendering of the dashboard's PromQL queries from Prometheus query results, drawn with "
    "matplotlib: not a screenshot of Grafana."
)


def _points(series: Mapping[str, Any]) -> list[tuple[float, float]]:
    if "values" in series:
        return [(float(t), float(v)) for t, v in series["values"]]
    if "value" in series:
        t, v = series["value"]
        return [(float(t), float(v))]
    return []


def format_value(value: float, unit: str) -> str:
    """A number as the panel's unit shows it, roughly as Grafana does for the units used here."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        size = abs(value)
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if size < 1024 or prefix == "TiB":
                return f"{math.copysign(size, value):.3g} {prefix}{suffix}"
            size /= 1024
    if unit == "s":
        if abs(value) >= 86400:
            return f"{value / 86400:.1f} days"
        if abs(value) >= 3600:
            return f"{value / 3600:.1f} h"
        if 0 < abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value:.3g} s"
    if unit == "reqps":
        return f"{value:.3g}/s"
    return f"{value:.4g}"


def render_dashboard(
    dashboard: Mapping[str, Any],
    results: Results,
    out_path: Path | str,
    *,
    values: Mapping[str, str] | None = None,
    dpi: int = 80,
) -> Path:
    """Draw every panel's query results on one PNG, laid out on the dashboard's own 24-column
    grid (gridPos), and return its path.

    Time series panels are lines with legends from legendFormat; stat, gauge and bar gauge panels
    show each series' last value as text; tables list each series' labels and last value. A panel
    whose queries returned nothing says "No data", as Grafana does. The title names the dashboard
    and the variable values (`values`); the caption says it is a rendering, not a screenshot.
    """
    # The Agg canvas on a bare Figure, not pyplot: no global figure state, whatever backend the
    # calling process has chosen.
    import matplotlib.dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec

    panels = list(iter_panels(dashboard, rows=True))
    by_panel: dict[int, list[Query]] = {}
    for query in queries(dashboard):
        by_panel.setdefault(query.panel_id, []).append(query)

    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1)
    # Grafana's grid is 24 columns across and 30 px a row; at 20 inches wide, half an inch a row
    # keeps the proportions close enough to read the layout, with room for titles and ticks.
    height = 1.6 + rows * 0.5
    fig = Figure(figsize=(20, height), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = GridSpec(
        rows,
        24,
        figure=fig,
        left=0.04,
        right=0.99,
        top=1 - 0.9 / height,
        bottom=0.7 / height,
        hspace=3.0,
        wspace=1.2,
    )
    subtitle = ", ".join(f"{k}={v}" for k, v in (values or {}).items())
    fig.suptitle(f"{dashboard.get('title', '')}" + (f"  ({subtitle})" if subtitle else ""), fontsize=16)
    fig.text(0.5, 0.2 / height, CAPTION, ha="center", fontsize=11, style="italic")

    for panel in panels:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[pos["y"] : pos["y"] + pos["h"], :])
            ax.axis("off")
            ax.text(
                0,
                0.5,
                panel.get("title", ""),
                fontsize=13,
                weight="bold",
                va="center",
                transform=ax.transAxes,
            )
            continue
        ax = fig.add_subplot(grid[pos["y"] : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]])
        ax.set_title(panel.get("title", ""), fontsize=10, loc="left")
        drawn = _draw_panel(ax, panel, by_panel.get(panel["id"], []), results, mdates)
        if not drawn:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])

    out = Path(out_path)
    fig.savefig(out, dpi=dpi)
    return out


def _draw_panel(
    ax: Any, panel: Mapping[str, Any], panel_queries: list[Query], results: Results, mdates: Any
) -> bool:
    """Draw one panel; False if none of its queries returned a series."""
    import datetime as dt

    series = [(q, s) for q in panel_queries for s in results.get(q.key, [])]
    if not series:
        return False
    unit = panel_queries[0].unit
    if panel["type"] == "timeseries":
        for query, s in series:
            points = _points(s)
            times = [dt.datetime.fromtimestamp(t, tz=dt.UTC) for t, _ in points]
            name = legend(query.legend_format, s.get("metric", {})).strip() or legend("", s.get("metric", {}))
            ax.plot(times, [v for _, v in points], label=name)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_formatter(lambda v, _: format_value(v, unit))
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
            ax.legend(fontsize=7, loc="upper left", ncols=3, framealpha=0.6)
        ax.grid(alpha=0.3)
        return True
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_alpha(0.3)
    if panel["type"] == "table":
        _draw_table(ax, panel, panel_queries, series)
        return True
    # stat, gauge, bargauge: each series' last value, named by its legend when there are several
    # (or when the legend is the point, as in a stat showing a version)
    text_mode = panel.get("options", {}).get("textMode", "auto")
    lines = []
    for query, s in series:
        points = _points(s)
        name = legend(query.legend_format, s.get("metric", {}))
        value = format_value(points[-1][1], unit) if points else ""
        if text_mode == "name":
            lines.append(name)
        elif len(series) > 1:
            lines.append(f"{name}: {value}")
        else:
            lines.append(value)
    size = 16 if len(lines) == 1 and len(lines[0]) < 16 else 9
    ax.text(0.5, 0.5, "\n".join(lines[:10]), ha="center", va="center", transform=ax.transAxes, fontsize=size)
    return True


def table_rows(
    panel: Mapping[str, Any],
    panel_queries: Sequence[Query],
    series: Sequence[tuple[Query, Mapping[str, Any]]],
) -> tuple[list[str], list[list[str]]]:
    """A table panel's header and rows as Grafana shows them: with several queries, their series
    merged on equal labels into one row with a `Value #<refId>` column each; then the panel's
    `organize` transformation hides and renames columns. Values are the last point, with the unit."""
    several = len(panel_queries) > 1
    merged: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    label_names: set[str] = set()
    for query, s in series:
        metric = {k: v for k, v in s.get("metric", {}).items() if k != "__name__"}
        label_names |= metric.keys()
        points = _points(s)
        row = merged.setdefault(tuple(sorted(metric.items())), dict(metric))
        row["Value #" + query.ref_id if several else "Value"] = (
            format_value(points[-1][1], query.unit) if points else ""
        )
    value_columns = [f"Value #{q.ref_id}" for q in panel_queries] if several else ["Value"]
    excluded: set[str] = {"Time", "__name__"}
    renamed: dict[str, str] = {}
    for transformation in panel.get("transformations", []):
        if transformation.get("id") == "organize":
            options = transformation.get("options", {})
            excluded |= {k for k, v in options.get("excludeByName", {}).items() if v}
            renamed.update(options.get("renameByName", {}))
    columns = [c for c in [*sorted(label_names), *value_columns] if c not in excluded]
    header = [renamed.get(c, c) for c in columns]
    rows = [[row.get(c, "") for c in columns] for row in merged.values()]
    return header, rows


def _draw_table(
    ax: Any,
    panel: Mapping[str, Any],
    panel_queries: Sequence[Query],
    series: Sequence[tuple[Query, Mapping[str, Any]]],
) -> None:
    header, rows = table_rows(panel, panel_queries, series)
    shown = rows[:12]
    if len(rows) > len(shown):
        shown.append(["..."] * len(header))
    table = ax.table(
        cellText=shown or [[""] * len(header)], colLabels=header, loc="upper center", cellLoc="left"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (row, _), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if row == 0:
            cell.set_text_props(weight="bold")
