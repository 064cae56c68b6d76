"""The benchmark harness (issue 5) in its smoke form: it runs against the real peers and writes its
tables. Benchmarks are not timed tests: no performance target is checked here, only that every row
is there and the measured ones carry numbers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120
INSTALL = "Debian's {}; `make system-deps` installs it as root"
KEPT_TEXT = "Hand-written: the rewriter's fast path bought 3x (kept across runs)."

STATIC_ROWS = [
    "direct",
    "nginx",
    "exporter_exporter",
    "exporter_exporter verify:false",
    "proxy passthrough",
    "proxy passthrough --no-coalesce",
    "proxy keep-list",
    "proxy keep-list gzip",
    "proxy drop service",
    "proxy drop service gzip",
]
COALESCE_ROWS = [
    "direct",
    "nginx",
    "exporter_exporter verify:false",
    "proxy --no-coalesce",
    "proxy coalescing",
]
# Columns of the per-scenario tables that every row built on nginx or the proxy must fill.
P50, RATE, CPU, STEADY_RSS = 1, 5, 11, 14


def _nginx() -> str:
    # Debian's nginx lives in /usr/sbin, which a non-root PATH may not include.
    if Path("/usr/sbin/nginx").is_file():
        return "/usr/sbin/nginx"
    return require_binary("nginx", INSTALL.format("nginx-light"))


def _table(document: str, heading: str) -> dict[str, list[str]]:
    """The markdown table under a `## heading...` line: row name -> cells (the name is cell 0)."""
    section = document.split(f"\n## {heading}", 1)
    assert len(section) == 2, f"no section {heading!r} in:\n{document}"
    lines = [line for line in section[1].split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    rows: dict[str, list[str]] = {}
    for line in lines[2:]:  # after the header and its |---| line
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _number(cell: str) -> float:
    match = re.fullmatch(r"(-?[\d,]+(?:\.\d+)?)(?: / [\d,.]+)?", cell)
    assert match, f"not a number: {cell!r}"
    return float(match[1].replace(",", ""))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One smoke run for the whole module: (RESULTS.md, stdout)."""
    _nginx()
    require_binary("wrk", INSTALL.format("wrk"))
    require_binary("prometheus-exporter-exporter", INSTALL.format("prometheus-exporter-exporter"))
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    # A previous run's hand-written section must survive regeneration.
    out.write_text("# old\n\n<!-- optimisations:start -->\n" + KEPT_TEXT + "\n<!-- optimisations:end -->\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-install", "--no-chart", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out.read_text(), done.stdout


def test_every_row_is_there_with_numbers(smoke: tuple[str, str]) -> None:
    document, _ = smoke
    for heading, names in (("Payload ×1", STATIC_ROWS), ("Coalescing", COALESCE_ROWS)):  # noqa: RUF001
        rows = _table(document, heading)
        assert list(rows) == names, heading
        for name in names:
            cells = rows[name]
            if name.startswith("exporter_exporter"):
                continue  # a peer: measured or "not measured" with a reason, never missing
            assert _number(cells[P50]) > 0, (heading, name, cells)
            assert _number(cells[RATE]) > 0, (heading, name, cells)
            if name != "direct":
                assert _number(cells[CPU]) >= 0, (heading, name, cells)
                assert _number(cells[STEADY_RSS]) > 0, (heading, name, cells)
        for cells in rows.values():
            assert not cells[1].startswith("not measured") or "not measured: " in cells[1], cells


def test_rewriter_and_targets_are_reported(smoke: tuple[str, str]) -> None:
    document, _ = smoke
    rewriter = _table(document, "The rewriter alone")
    assert set(rewriter) >= {"keep-list", "drop windows_service_.*", "add label node=x"}
    for cells in rewriter.values():
        assert _number(cells[3]) > 0
        assert _number(cells[4]) > 0
    targets = _table(document, "Targets")
    assert len(targets) >= 8
    for cells in targets.values():
        # PASS or MISS are both fine here: benchmarks are not timed tests.
        assert cells[-1] in ("PASS", "MISS") or cells[-1].startswith("not measured ("), cells


def test_results_describe_the_run_and_keep_the_hand_written_section(smoke: tuple[str, str]) -> None:
    document, stdout = smoke
    for needle in ("**Date:**", "**Machine:**", "**Versions:**", "nginx", "wrk", "aiohttp", "1 s"):
        assert needle in document
    assert KEPT_TEXT in document
    assert document.count("<!-- optimisations:start -->") == 1
    assert "| proxy passthrough |" in stdout
