"""aks_setup: the DSC module, its packaging script, the Terraform and az examples, and all PowerShell.

PowerShell cannot run here, so every .ps1 and .psm1 in the repository is parsed with tree-sitter's
PowerShell grammar and must have no syntax error (and a broken snippet must show one). The module is
read for what the design requires; the packaging script is run for real, on a small stand-in MSI
made by the tests, over a path and over a loopback URL; the examples are parsed (HCL, bash) and must
name the same script, function and parameters as the module.

Collectors: windows_exporter exits at start on a collector its version lacks (`cs` from 0.31.0 on),
so the packager's check is run for real on both sides of that line, the module's check is read and
parsed, and every default and example list is checked against the version it is written for, all
from aks_setup/data/windows_exporter-collectors.json, the one table both checks read.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import LOOPBACK, require_binary, require_module

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "aks_setup" / "aks_setup.psm1"
PACKAGER = ROOT / "scripts" / "package_aks_setup.py"
TERRAFORM = ROOT / "aks_setup" / "examples" / "terraform" / "main.tf"
AZ_SCRIPT = ROOT / "aks_setup" / "examples" / "az" / "install-dsc-extension.sh"
COLLECTOR_DATA = ROOT / "aks_setup" / "data" / "windows_exporter-collectors.json"
DOCS = ROOT / "docs" / "exporter-sources.md"
# The version the defaults and examples are written for; each file says so ("for windows_exporter X").
KIT_VERSION = "0.31.3"
WRITTEN_FOR = re.compile(r"for windows_exporter (\d+\.\d+\.\d+)")
SKIP_DIRS = {".git", ".venv", "node_modules", "build", "dist", ".mypy_cache", ".ruff_cache"}
OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")


# --- PowerShell syntax ----------------------------------------------------------------------------


def powershell_parser() -> Any:
    tree_sitter = require_module("tree_sitter", "pip install -e '.[test]' installs tree-sitter")
    grammar = require_module(
        "tree_sitter_powershell", "pip install -e '.[test]' installs tree-sitter-powershell"
    )
    return tree_sitter.Parser(tree_sitter.Language(grammar.language()))


def syntax_errors(source: bytes) -> list[str]:
    """Every ERROR or MISSING node, as 'line:column: text'."""
    tree = powershell_parser().parse(source)
    problems: list[str] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            kind = "missing " + node.type if node.is_missing else "unexpected"
            text = node.text.decode(errors="replace").splitlines()[0][:60] if node.text else ""
            problems.append(f"{node.start_point[0] + 1}:{node.start_point[1] + 1}: {kind} {text!r}")
        elif node.has_error:
            stack.extend(node.children)
    if tree.root_node.has_error and not problems:
        problems.append("the parser reports an error it could not place")
    return sorted(problems)


def powershell_files() -> list[Path]:
    found = []
    for pattern in ("*.ps1", "*.psm1"):
        found += [p for p in ROOT.rglob(pattern) if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(found)


def test_there_is_powershell_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in powershell_files()}
    assert {
        "aks_setup/aks_setup.psm1",
        "scripts/build-image.ps1",
        "scripts/image/install-python.ps1",
        "scripts/image/install-packages.ps1",
    } <= names


@pytest.mark.parametrize("path", powershell_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_powershell_parses_without_errors(path: Path) -> None:
    assert syntax_errors(path.read_bytes()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "if ($a -eq 1 { 'unclosed condition' }",
        "function Get-Thing { param([int] $x = ) $x }",
        "$h = @{ a = 1 ",
        "Configuration Setup { Node localhost { Script X { GetScript = { @{ Result = 'x' } } }",
        "$arguments = @('/i', 'x.msi', '/qn'",
        "foreach ($x in ) { }",
    ],
)
def test_the_parser_catches_broken_powershell(snippet: str) -> None:
    assert syntax_errors(snippet.encode()) != []


def test_the_parser_accepts_dsc_syntax() -> None:
    valid = (
        "Configuration Setup {\n"
        "  param([int] $Port = 9182)\n"
        "  Import-DscResource -ModuleName 'PSDesiredStateConfiguration'\n"
        "  Node localhost {\n"
        "    Script X {\n"
        '      GetScript = { @{ Result = "$using:Port" } }\n'
        "      TestScript = { $true }\n"
        "      SetScript = { Start-Process -FilePath 'msiexec.exe' -ArgumentList @('/i') -Wait -PassThru }\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    assert syntax_errors(valid.encode()) == []


# --- The DSC module -------------------------------------------------------------------------------


def module_text() -> str:
    return MODULE.read_text()


def configuration_name() -> str:
    names = re.findall(r"^Configuration\s+(\w+)", module_text(), re.MULTILINE)
    assert len(names) == 1, names
    return names[0]


def configuration_parameters() -> dict[str, str | None]:
    """Name -> default (the source text), from the configuration's param block."""
    text = module_text()
    block = text[text.index("param", text.index("Configuration ")) :]
    block = block[: block.index("Import-DscResource")]
    params = {}
    for name, default in re.findall(r"\[\w+\]\s+\$(\w+)(?:\s*=\s*('[^']*'|[^\s,)]+))?", block):
        params[name] = default.strip() or None
    return params


def script_block(name: str) -> str:
    """The text of GetScript/TestScript/SetScript, braces balanced."""
    text = module_text()
    start = text.index("{", re.search(rf"\b{name}\s*=", text).end())
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise AssertionError(f"{name} is not closed")


def test_configuration_setup_and_its_parameters() -> None:
    assert configuration_name() == "Setup"
    params = configuration_parameters()
    assert params["Port"] == "9182"
    defaults = "'cpu,container,logical_disk,memory,net,os,physical_disk,service,system,tcp'"
    assert params["Collectors"] == defaults
    assert params["TextfileDirectory"] == "''"
    assert params["RemoteAddress"] == "''"
    assert "Import-DscResource -ModuleName 'PSDesiredStateConfiguration'" in module_text()


def test_msiexec_is_silent_waited_for_and_checked() -> None:
    setscript = script_block("SetScript")
    for argument in (
        "'/i'",
        "'/qn'",
        "'/norestart'",
        "'ADDLOCAL=FirewallException'",
        "LISTEN_PORT=",
        "ENABLED_COLLECTORS=",
    ):
        assert argument in setscript, argument
    assert "TEXTFILE_DIRS=" in setscript
    assert "REMOTE_ADDR=" in setscript
    call = re.search(r"Start-Process -FilePath 'msiexec\.exe'[^\n]*", setscript)
    assert call
    assert "-Wait" in call[0]
    assert "-PassThru" in call[0]
    assert "switch ($process.ExitCode)" in setscript
    assert re.search(r"default \{.*?throw", setscript, re.DOTALL)  # any other exit code fails the run


def test_testscript_compares_version_port_and_collectors() -> None:
    testscript = script_block("TestScript")
    assert not re.fullmatch(r"\{\s*(return\s+)?\$false;?\s*\}", testscript)  # the old module's bug
    for wanted in ("$wantVersion", "$wantPort", "$wantCollectors"):
        assert re.search(rf"-ne {re.escape(wanted)}\b", testscript), wanted
    assert "return $ok" in testscript
    getscript = script_block("GetScript")
    assert "Result" in getscript
    for field in ("Version", "Port", "Collectors"):
        assert f"{field} = $state.{field}" in getscript


# --- The packaging script -------------------------------------------------------------------------


def stand_in_msi(directory: Path, name: str = "windows_exporter-0.31.3-amd64.msi") -> tuple[Path, str]:
    """A small file that starts like an MSI (an OLE compound file), and its SHA256."""
    data = OLE_MAGIC + b"stand-in for the windows_exporter MSI\n" * 50
    path = directory / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def package(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PACKAGER), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_zip_layout(tmp_path: Path) -> None:
    msi, sha = stand_in_msi(tmp_path)
    out = tmp_path / "out" / "aks_setup.zip"
    result = package("--msi", str(msi), "--sha256", sha, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() in result.stdout
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        # the configuration script at the root, where the DSC extension's configuration.script points
        assert names == [
            "aks_setup.psm1",
            "windows_exporter-0.31.3-amd64.msi",
            "data/windows_exporter-collectors.json",
            "dscmetadata.json",
        ]
        assert archive.read("aks_setup.psm1") == MODULE.read_bytes()
        # the table the module checks Collectors with, where it looks ($PSScriptRoot\data\...)
        assert archive.read("data/windows_exporter-collectors.json") == COLLECTOR_DATA.read_bytes()
        assert archive.read("windows_exporter-0.31.3-amd64.msi") == msi.read_bytes()
        metadata = json.loads(archive.read("dscmetadata.json"))
        assert metadata == {"AdditionalContent": ["windows_exporter-0.31.3-amd64.msi"]}
        assert archive.testzip() is None


def test_zip_is_reproducible_and_names_the_msi_by_version(tmp_path: Path) -> None:
    msi, sha = stand_in_msi(tmp_path, "exporter.msi")  # a name without the version
    assert package("--msi", str(msi), "--sha256", sha, "--output", "a.zip", cwd=tmp_path).returncode != 0
    for out in ("a.zip", "b.zip"):
        result = package(
            "--msi", str(msi), "--sha256", sha.upper(), "--version", "0.31.3", "--output", out, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        assert "windows_exporter-0.31.3-amd64.msi" in archive.namelist()


@pytest.mark.parametrize(
    ("case", "expected"),
    [("wrong-sha", "SHA256 mismatch"), ("bad-sha", "64 hex digits"), ("not-an-msi", "not an MSI")],
)
def test_packaging_refuses_a_wrong_msi(tmp_path: Path, case: str, expected: str) -> None:
    msi, sha = stand_in_msi(tmp_path)
    if case == "wrong-sha":
        sha = hashlib.sha256(b"some other file").hexdigest()
    elif case == "bad-sha":
        sha = sha[:40]
    else:
        msi.write_bytes(b"<html>not found</html>")
        sha = hashlib.sha256(msi.read_bytes()).hexdigest()
    out = tmp_path / "aks_setup.zip"
    result = package("--msi", str(msi), "--sha256", sha, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert list(tmp_path.glob("*.zip")) == []
    assert list(tmp_path.glob(".aks_setup-*")) == []


@pytest.fixture
def msi_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A loopback HTTP server with the stand-in MSI; yields (its URL, its SHA256)."""
    msi, sha = stand_in_msi(tmp_path)
    body = msi.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != f"/download/{msi.name}":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_port}/download/{msi.name}", sha
    finally:
        server.shutdown()
        server.server_close()


def test_packaging_from_a_url(tmp_path: Path, msi_server: tuple[str, str]) -> None:
    url, sha = msi_server
    out = tmp_path / "from-url.zip"
    result = package("--msi-url", url, "--sha256", sha, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist()[1] == "windows_exporter-0.31.3-amd64.msi"
    wrong = package("--msi-url", url, "--sha256", "0" * 64, "--output", str(tmp_path / "x.zip"), cwd=tmp_path)
    assert wrong.returncode == 1
    assert "SHA256 mismatch" in wrong.stderr
    missing = package(
        "--msi-url", url + ".nope", "--sha256", sha, "--output", str(tmp_path / "y.zip"), cwd=tmp_path
    )
    assert missing.returncode == 1
    assert "cannot download" in missing.stderr
    assert not (tmp_path / "x.zip").exists()
    assert not (tmp_path / "y.zip").exists()


# --- The examples ---------------------------------------------------------------------------------


def unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def test_terraform_example_names_the_module_script_and_function() -> None:
    hcl2 = require_module("hcl2", "pip install -e '.[test]' installs python-hcl2")
    document = hcl2.load(io.StringIO(TERRAFORM.read_text()))
    settings = next(block["dsc_settings"] for block in document["locals"] if "dsc_settings" in block)
    configuration = {k: unquote(v) for k, v in settings["configuration"].items()}
    assert configuration["script"] == MODULE.name
    assert configuration["function"] == configuration_name()
    assert set(settings["configurationArguments"]) <= set(configuration_parameters())
    blocks = {
        unquote(kind): next(iter(named.values())) for r in document["resource"] for kind, named in r.items()
    }
    extension = blocks["azurerm_virtual_machine_scale_set_extension"]
    assert unquote(extension["publisher"]) == "Microsoft.Powershell"
    assert unquote(extension["type"]) == "DSC"
    assert [unquote(v) for v in extension["provision_after_extensions"]] == ["vmssCSE"]
    assert extension["settings"] == "${jsonencode(local.dsc_settings)}"


def az_settings() -> dict[str, Any]:
    text = AZ_SCRIPT.read_text()
    template = re.search(r"<<JSON\n(.*?)\nJSON\n", text, re.DOTALL)
    assert template, "the settings here-document"
    filled = template[1].replace("${zip_url}", "https://example.invalid/aks_setup.zip")
    filled = filled.replace("${port}", "9182").replace("${collectors}", "cpu,os")
    filled = filled.replace("${remote_address}", "10.244.0.0/16")
    assert "${" not in filled, filled
    return json.loads(filled)


def test_az_example_names_the_module_script_and_function() -> None:
    settings = az_settings()
    assert settings["configuration"]["script"] == MODULE.name
    assert settings["configuration"]["function"] == configuration_name()
    assert set(settings["configurationArguments"]) <= set(configuration_parameters())
    text = AZ_SCRIPT.read_text()
    for flag in ("--publisher Microsoft.Powershell", "--name DSC", "--provision-after-extensions vmssCSE"):
        assert flag in text, flag
    assert re.search(r"--settings \"\$settings\"", text)


def test_az_example_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(AZ_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    shellcheck = require_binary("shellcheck", "Debian's shellcheck; `make test` installs it as root")
    result = subprocess.run([shellcheck, str(AZ_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_examples_default_to_the_modules_defaults() -> None:
    params = configuration_parameters()
    tf = TERRAFORM.read_text()
    port = re.search(r'variable "exporter_port" \{.*?default\s*=\s*(\d+)', tf, re.DOTALL)
    collectors = re.search(r'variable "exporter_collectors" \{.*?default\s*=\s*"([^"]+)"', tf, re.DOTALL)
    assert port
    assert port[1] == params["Port"]
    assert collectors
    assert f"'{collectors[1]}'" == params["Collectors"]
    az = AZ_SCRIPT.read_text()
    assert f"port=${{3:-{params['Port']}}}" in az
    assert f"collectors=${{4:-{params['Collectors'].strip(chr(39))}}}" in az


# --- Collectors against the exporter's version -----------------------------------------------------


def packager_module() -> ModuleType:
    """scripts/package_aks_setup.py imported by path (scripts/ is not a package), for its check."""
    spec = importlib.util.spec_from_file_location("package_aks_setup", PACKAGER)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def collector_table() -> dict[str, list[str]]:
    table: dict[str, list[str]] = packager_module().load_collector_table()
    return table


def unknown(collectors: str, version: str) -> list[str]:
    names: list[str] = packager_module().unknown_collectors(collectors, version, collector_table())
    return names


def written_for(text: str) -> str:
    """The one version a file says its collectors are for."""
    versions = set(WRITTEN_FOR.findall(text))
    assert len(versions) == 1, versions
    return versions.pop()


def module_default_collectors() -> str:
    return (configuration_parameters()["Collectors"] or "").strip("'")


def test_the_collector_table_is_the_documented_data() -> None:
    data = json.loads(COLLECTOR_DATA.read_text())
    assert "windows_exporter" in data["source"]
    versions = data["versions"]
    assert {"v0.16.0", "v0.30.8", "v0.31.0", "v0.31.8"} <= set(versions)
    for tag, entry in versions.items():
        assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), tag
        assert set(entry["default"]) <= set(entry["collectors"]), tag
    readme = (COLLECTOR_DATA.parent / "README.md").read_text()
    assert COLLECTOR_DATA.name in readme
    assert "prometheus-community/windows_exporter" in readme


def test_cs_is_valid_for_0_30_and_not_for_0_31() -> None:
    """The defect: `cs` left in v0.31.0, and every 0.31.x refuses to start with it."""
    table = collector_table()
    listed = "cpu,cs,container,memory"
    v030 = [v for v in table if v.startswith("0.30.")]
    v031 = [v for v in table if v.startswith("0.31.")]
    assert v030
    assert v031
    for version in v030:
        assert unknown(listed, version) == [], version
    for version in v031:
        assert unknown(listed, version) == ["cs"], version
    assert unknown("[defaults],container", "0.31.3") == []  # the exporter's own set is always valid


def test_packaging_refuses_cs_for_0_31_and_accepts_it_for_0_30(tmp_path: Path) -> None:
    refused_msi, refused_sha = stand_in_msi(tmp_path, "windows_exporter-0.31.3-amd64.msi")
    out = tmp_path / "refused.zip"
    result = package(
        "--msi", str(refused_msi), "--sha256", refused_sha, "--collectors", "cpu,cs,os",
        "--output", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "package_aks_setup: error: windows_exporter 0.31.3 has no collector 'cs' (--collectors): it would "
        "exit at start with 'unknown collector'; see aks_setup/data/windows_exporter-collectors.json\n"
    )
    assert not out.exists()
    assert list(tmp_path.glob(".aks_setup-*")) == []

    accepted_msi, accepted_sha = stand_in_msi(tmp_path, "windows_exporter-0.30.8-amd64.msi")
    result = package(
        "--msi", str(accepted_msi), "--sha256", accepted_sha, "--collectors", "cpu,cs,os",
        "--output", str(tmp_path / "accepted.zip"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_packaging_checks_the_modules_default_and_refuses_unknown_versions(tmp_path: Path) -> None:
    msi, sha = stand_in_msi(tmp_path)
    stale = tmp_path / "aks_setup.psm1"
    stale.write_text(MODULE.read_text().replace(module_default_collectors(), "cpu,cs,container,os,tcp,logon"))
    result = package("--msi", str(msi), "--sha256", sha, "--module", str(stale), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "package_aks_setup: error: windows_exporter 0.31.3 has no collectors 'cs', 'logon' (Collectors, the "
        "default in aks_setup.psm1): it would exit at start with 'unknown collector'; see "
        "aks_setup/data/windows_exporter-collectors.json\n"
    )
    unlisted, unlisted_sha = stand_in_msi(tmp_path, "windows_exporter-9.9.9-amd64.msi")
    result = package("--msi", str(unlisted), "--sha256", unlisted_sha, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "package_aks_setup: error: windows_exporter 9.9.9 is not in "
        "aks_setup/data/windows_exporter-collectors.json, so its collectors cannot be checked; add that "
        "release's collectors to it\n"
    )
    assert list(tmp_path.glob("*.zip")) == []


def test_the_defaults_are_valid_for_the_version_they_are_written_for() -> None:
    assert written_for(module_text()) == KIT_VERSION
    defaults = module_default_collectors()
    assert unknown(defaults, KIT_VERSION) == []
    assert "cs" not in defaults.split(",")
    table = json.loads(COLLECTOR_DATA.read_text())["versions"][f"v{KIT_VERSION}"]
    # windows_exporter's own default set, plus what a Kubernetes node needs (the pods' containers)
    assert set(table["default"]) | {"container"} <= set(defaults.split(","))


def example_collector_lists() -> dict[str, tuple[str, list[str]]]:
    """Per example: the version it is written for, and every collector list in it."""
    tf = TERRAFORM.read_text()
    az = AZ_SCRIPT.read_text()
    docs = DOCS.read_text()
    tf_default = re.search(r'variable "exporter_collectors" \{.*?default\s*=\s*"([^"]+)"', tf, re.DOTALL)
    az_default = re.search(r"collectors=\$\{4:-([^}]+)\}", az)
    docs_default = re.search(r"^\| `Collectors` \| `([^`]+)`", docs, re.MULTILINE)
    assert tf_default
    assert az_default
    assert docs_default
    docs_versions = set(re.findall(r"windows_exporter-(\d+\.\d+\.\d+)-amd64\.msi", docs))
    assert len(docs_versions) == 1, docs_versions  # the version the docs' packaging commands install
    return {
        "terraform": (written_for(tf), [tf_default[1]]),
        "az": (written_for(az), [az_default[1]]),
        "docs": (docs_versions.pop(), [docs_default[1], *re.findall(r"--collectors ([a-z0-9_,]+)", docs)]),
    }


@pytest.mark.parametrize("example", ["terraform", "az", "docs"])
def test_every_examples_collectors_exist_in_the_version_it_installs(example: str) -> None:
    version, lists = example_collector_lists()[example]
    assert version == KIT_VERSION
    for collectors in lists:
        assert unknown(collectors, version) == [], collectors


def powershell_collector_check() -> str:
    """The module's check: from reading the table to the throw that names the unknown collectors."""
    text = module_text()
    start = text.index("$CollectorData = ")
    end = text.index("\n", text.index("throw", text.index("if ($Unknown.Count -gt 0)")))
    return text[start:end] + "\n    }\n"


def test_the_module_refuses_unknown_collectors_before_installing() -> None:
    text = module_text()
    check = powershell_collector_check()
    assert syntax_errors(check.encode()) == []  # the check, alone, is whole PowerShell
    # It runs when the configuration compiles: after the version is read from the MSI's name, before
    # the Node block (so before msiexec can run anywhere).
    assert text.index("$WantedVersion = $Matches[1]") < text.index(check) < text.index("Node localhost")
    # Reading the table the packager writes into the zip, at the same relative path.
    data_path = re.search(r"Join-Path \$PSScriptRoot '([^']+)'", check)
    assert data_path
    assert data_path[1].replace("\\", "/") == packager_module().COLLECTOR_DATA_IN_ZIP
    assert COLLECTOR_DATA.relative_to(MODULE.parent).as_posix() == data_path[1].replace("\\", "/")
    # The release's entry by its key in the file ("v0.31.3"), its collectors, case-sensitively.
    assert '.versions.PSObject.Properties["v$WantedVersion"]' in check
    assert "$Release.Value.collectors" in check
    assert "-cnotcontains" in check
    assert "'[defaults]'" in check
    # Clear errors: a missing version, and the unknown collectors with the version.
    assert re.search(r'throw "Cannot check Collectors: windows_exporter \$WantedVersion is not in', check)
    assert re.search(r'throw "Collectors lists \$names, which windows_exporter \$WantedVersion does', check)


def test_the_module_and_the_packager_accept_the_same_list_syntax() -> None:
    pattern = re.search(r"\[ValidatePattern\('([^']+)'\)\]\s*\[string\] \$Collectors", module_text())
    assert pattern
    assert pattern[1] == packager_module().COLLECTOR_LIST.pattern


def test_both_examples_pass_the_same_arguments() -> None:
    """The az example lacked RemoteAddress, which the Terraform one passes."""
    hcl2 = require_module("hcl2", "pip install -e '.[test]' installs python-hcl2")
    document = hcl2.load(io.StringIO(TERRAFORM.read_text()))
    settings = next(block["dsc_settings"] for block in document["locals"] if "dsc_settings" in block)
    assert set(az_settings()["configurationArguments"]) == set(settings["configurationArguments"])
    assert az_settings()["configurationArguments"]["RemoteAddress"] == "10.244.0.0/16"


def test_terraform_example_pins_azurerm_4_and_names_the_subscription() -> None:
    """azurerm v4 refuses a provider block without subscription_id (or ARM_SUBSCRIPTION_ID)."""
    hcl2 = require_module("hcl2", "pip install -e '.[test]' installs python-hcl2")
    document = hcl2.load(io.StringIO(TERRAFORM.read_text()))
    providers = document["terraform"][0]["required_providers"][0]
    assert unquote(providers["azurerm"]["version"]) == "~> 4.0"
    providers_configured = {unquote(name): block for p in document["provider"] for name, block in p.items()}
    assert providers_configured["azurerm"]["subscription_id"] == "${var.subscription_id}"
    assert "subscription_id" in {unquote(name) for v in document["variable"] for name in v}


def test_clearing_an_extra_is_not_taken_for_no_change() -> None:
    """TestScript said 'configured' whenever no RemoteAddress or TextfileDirectory was asked for, so
    clearing one set before never took effect. With a record, its values are always compared."""
    text = MODULE.read_text()
    block = re.search(r"\$ExtrasMatch = \(\{(.*?)\}\)\.ToString\(\)", text, re.DOTALL)
    assert block, "the ExtrasMatch script block"
    body = block[1]
    assert "{ return $true }" not in body
    record = body.index("Test-Path -LiteralPath $StateFile")
    compare = body.index("$recorded.RemoteAddress")
    assert record < compare
    # the only unconditional answer is for a node with no record at all
    no_record = body[record : body.index("Get-Content")]
    assert "-not ($Wanted.TextfileDirectory -or $Wanted.RemoteAddress)" in no_record
