"""Build aks_setup.zip, the package the Azure VMSS DSC extension runs, from aks_setup/ and an MSI.

    python scripts/package_aks_setup.py --msi windows_exporter-0.31.3-amd64.msi --sha256 <hex>
    python scripts/package_aks_setup.py --msi-url https://.../windows_exporter-0.31.3-amd64.msi --sha256 <hex>
    python scripts/package_aks_setup.py --msi ... --sha256 <hex> --collectors cpu,container,memory,os

The MSI (prometheus-community's windows_exporter release) comes from a path or a URL, and its SHA256
is required and checked before anything is written: a mismatch, or a file that is not an MSI, stops
with exit status 1 and no zip. No MSI is kept in this repository.

The zip's layout is what the DSC extension expects (the settings name configuration.script and
configuration.function; the script must be at the root):

    aks_setup.psm1                         the configuration (Configuration Setup)
    windows_exporter-<version>-amd64.msi   the MSI, which Setup finds next to itself
    data/windows_exporter-collectors.json  each release's collectors, which Setup checks Collectors with
    dscmetadata.json                       {"AdditionalContent": ["windows_exporter-<version>-amd64.msi"]},
                                           as Publish-AzVMDscConfiguration -AdditionalPath writes it

The version comes from --version or from the MSI's file name. windows_exporter exits at start on a
collector name its version does not have (`cs` is gone from 0.31.0 on), so the module's default
Collectors, and the list given with --collectors (the Collectors your extension settings pass), are
checked against that version in aks_setup/data/windows_exporter-collectors.json, the table Setup
checks with on the node; a name the version lacks, or a version the table lacks, stops with exit
status 1 and no zip.

The zip is reproducible: the same inputs give the same bytes (fixed timestamps and order), and its
SHA256 is printed. Python 3.11+, standard library only, so it runs on Linux, macOS and Windows alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "aks_setup" / "aks_setup.psm1"
COLLECTOR_DATA = ROOT / "aks_setup" / "data" / "windows_exporter-collectors.json"
# Where the zip holds it: the same path relative to the module as in the repository, which is where
# aks_setup.psm1 looks ($PSScriptRoot\data\windows_exporter-collectors.json).
COLLECTOR_DATA_IN_ZIP = "data/windows_exporter-collectors.json"
# The module's default list: [string] $Collectors = '...' in the configuration's param block.
DEFAULT_COLLECTORS = re.compile(r"\[string\]\s+\$Collectors\s*=\s*'(?P<collectors>[^']*)'")
COLLECTOR_LIST = re.compile(r"^[a-z0-9_\[\]]+(,[a-z0-9_\[\]]+)*$")  # the module's ValidatePattern
DEFAULTS_TOKEN = "[defaults]"  # windows_exporter's own default set, valid in every version
MSI_NAME = re.compile(r"windows_exporter-(?P<version>[0-9]+\.[0-9]+\.[0-9]+)-amd64\.msi$")
VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
# An MSI is an OLE compound file; every one starts with these 8 bytes.
OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: reproducible
CHUNK = 1 << 20


class PackagingError(Exception):
    """A problem the user can fix; printed as one line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="package_aks_setup.py",
        description="Build aks_setup.zip for the Azure VMSS DSC extension from aks_setup.psm1 and a "
        "windows_exporter MSI.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--msi", type=Path, help="path of the windows_exporter MSI")
    source.add_argument("--msi-url", help="URL of the windows_exporter MSI (http or https)")
    parser.add_argument("--sha256", required=True, help="expected SHA256 of the MSI (64 hex digits)")
    parser.add_argument(
        "--version", help="windows_exporter version, e.g. 0.31.3 (default: from the file name)"
    )
    parser.add_argument(
        "--collectors",
        help="the Collectors the extension settings will pass (comma-separated); checked against the "
        "MSI's version like the module's default",
    )
    parser.add_argument("--module", type=Path, default=MODULE, help="the DSC module (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("aks_setup.zip"), help="default: %(default)s")
    return parser.parse_args(argv)


def load_collector_table(path: Path = COLLECTOR_DATA) -> dict[str, list[str]]:
    """Version ("0.31.3") -> its collector names, from the data file both checks read.

    One file for the packager and the module, so the two cannot disagree on what a release has.
    """
    try:
        versions = json.loads(path.read_text(encoding="utf-8"))["versions"]
    except (OSError, ValueError, KeyError) as exc:
        raise PackagingError(f"cannot read the collector table {path}: {exc}") from exc
    return {tag.removeprefix("v"): list(entry["collectors"]) for tag, entry in versions.items()}


def unknown_collectors(collectors: str, version: str, table: dict[str, list[str]]) -> list[str]:
    """The names in a comma-separated list that windows_exporter `version` lacks, sorted.

    Such an exporter exits at start ("unknown collector"), and the MSI starts it without waiting, so
    the install itself would succeed and the failure would only show on every node afterwards.
    """
    if version not in table:
        raise PackagingError(
            f"windows_exporter {version} is not in {display(COLLECTOR_DATA)}, so its collectors cannot be "
            "checked; add that release's collectors to it"
        )
    known = set(table[version])
    return sorted({name for name in collectors.split(",") if name != DEFAULTS_TOKEN and name not in known})


def check_collectors(version: str, settings: dict[str, str], table: dict[str, list[str]]) -> None:
    """Refuse, naming the collector, the version and the setting, any list `version` cannot run.

    `settings` maps where a list comes from (as the message should name it) to the list.
    """
    for setting, collectors in settings.items():
        if not COLLECTOR_LIST.match(collectors):
            raise PackagingError(f"{setting} must be comma-separated collector names, got {collectors!r}")
        unknown = unknown_collectors(collectors, version, table)
        if unknown:
            names = ", ".join(repr(name) for name in unknown)
            noun = "collector" if len(unknown) == 1 else "collectors"
            raise PackagingError(
                f"windows_exporter {version} has no {noun} {names} ({setting}): it would exit at start "
                f"with 'unknown collector'; see {display(COLLECTOR_DATA)}"
            )


def display(path: Path) -> str:
    """A path relative to the repository when it is in it: shorter, and the same on every machine."""
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def collector_settings(args: argparse.Namespace) -> dict[str, str]:
    """The lists to check: the module's default Collectors, and --collectors if given."""
    match = DEFAULT_COLLECTORS.search(args.module.read_text(encoding="utf-8"))
    if not match:
        raise PackagingError(f"cannot find the default Collectors in {args.module}")
    settings = {f"Collectors, the default in {args.module.name}": match["collectors"]}
    if args.collectors is not None:
        settings["--collectors"] = args.collectors
    return settings


def msi_version(name: str, given: str | None) -> str:
    if given:
        if not VERSION.match(given):
            raise PackagingError(f"--version must look like 0.31.3, got {given!r}")
        return given
    match = MSI_NAME.search(name)
    if not match:
        raise PackagingError(
            f"cannot tell the windows_exporter version from {name!r}; pass --version (e.g. --version 0.31.3)"
        )
    return match["version"]


def copy_hashing(source: BinaryIO, destination: Path) -> str:
    digest = hashlib.sha256()
    with destination.open("wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch(args: argparse.Namespace, workdir: Path) -> tuple[Path, str, str]:
    """The MSI in workdir, its original file name, and its SHA256."""
    local = workdir / "windows_exporter.msi"
    if args.msi is not None:
        if not args.msi.is_file():
            raise PackagingError(f"no such file: {args.msi}")
        with args.msi.open("rb") as source:
            return local, args.msi.name, copy_hashing(source, local)
    url = urllib.parse.urlsplit(args.msi_url)
    if url.scheme not in ("http", "https"):
        raise PackagingError(f"--msi-url must be http or https, got {args.msi_url!r}")
    name = Path(urllib.parse.unquote(url.path)).name
    try:
        with urllib.request.urlopen(args.msi_url, timeout=60) as response:
            return local, name, copy_hashing(response, local)
    except OSError as exc:
        raise PackagingError(f"cannot download {args.msi_url}: {exc}") from exc


def add(archive: zipfile.ZipFile, name: str, data: bytes | None = None, path: Path | None = None) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 0  # as if made on Windows, wherever it was made
    if path is not None:
        with path.open("rb") as source, archive.open(info, "w") as target:
            shutil.copyfileobj(source, target, CHUNK)
    else:
        archive.writestr(info, data or b"")


def build(args: argparse.Namespace) -> tuple[Path, str, str]:
    expected = args.sha256.strip().lower()
    if not SHA256.match(expected):
        raise PackagingError("--sha256 must be 64 hex digits")
    if not args.module.is_file():
        raise PackagingError(f"no such module: {args.module}")
    with tempfile.TemporaryDirectory(prefix="aks_setup-") as tmp:
        workdir = Path(tmp)
        msi, original_name, actual = fetch(args, workdir)
        if actual != expected:
            raise PackagingError(f"SHA256 mismatch for {original_name}: expected {expected}, got {actual}")
        with msi.open("rb") as handle:
            if handle.read(len(OLE_MAGIC)) != OLE_MAGIC:
                raise PackagingError(f"{original_name} is not an MSI (no OLE compound file signature)")
        version = msi_version(original_name, args.version)
        check_collectors(version, collector_settings(args), load_collector_table())
        msi_name = f"windows_exporter-{version}-amd64.msi"
        metadata = json.dumps({"AdditionalContent": [msi_name]}, indent=2) + "\n"

        # Written beside the output and renamed over it: whole or not at all, never half a zip.
        args.output.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".aks_setup-", suffix=".zip", dir=args.output.parent)
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as archive:
                add(archive, args.module.name, path=args.module)
                add(archive, msi_name, path=msi)
                add(archive, COLLECTOR_DATA_IN_ZIP, path=COLLECTOR_DATA)
                add(archive, "dscmetadata.json", data=metadata.encode())
            os.replace(partial, args.output)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    zip_sha256 = hashlib.sha256(args.output.read_bytes()).hexdigest()
    return args.output, version, zip_sha256


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        output, version, zip_sha256 = build(args)
    except PackagingError as exc:
        print(f"package_aks_setup: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {os.fspath(output)}: aks_setup.psm1 + windows_exporter {version}, sha256 {zip_sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
