"""The peers (nginx, wrk, exporter_exporter): find them, install missing ones as root, configure them.

Every configuration listens on 127.0.0.1 only and keeps its pid, logs and temp files in the run's
temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import LOOPBACK

SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin"]
)
APT_TIMEOUT = 900.0
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@dataclass(frozen=True)
class Peer:
    key: str
    binary: str
    package: str  # Debian's


PEERS = (
    Peer("nginx", "nginx", "nginx-light"),
    Peer("wrk", "wrk", "wrk"),
    Peer("exporter_exporter", "prometheus-exporter-exporter", "prometheus-exporter-exporter"),
)


def locate(binary: str) -> str | None:
    return shutil.which(binary, path=SEARCH_PATH)


@dataclass
class Tools:
    """Paths of the peers that are there; for the others, why not."""

    paths: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    installed: list[str] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return self.paths.get(key)


def find_tools(*, install: bool, log: object = print) -> Tools:
    """Locate every peer; as root (and unless told not to) apt-get install the missing ones, once."""
    tools = Tools()
    absent = []
    for peer in PEERS:
        path = locate(peer.binary)
        if path:
            tools.paths[peer.key] = path
        else:
            absent.append(peer)
    if not absent:
        return tools
    packages = [peer.package for peer in absent]
    reason = None
    if not install:
        reason = "not installed (--no-install)"
    elif os.geteuid() != 0:
        reason = "not installed; run as root to install it, or: apt-get install " + " ".join(packages)
    elif locate("apt-get") is None:
        reason = "not installed and there is no apt-get to install it"
    else:
        log(f"installing missing peers with apt-get: {' '.join(packages)}")  # type: ignore[operator]
        reason = _apt_install(packages)
    for peer in absent:
        path = locate(peer.binary)
        if path:
            tools.paths[peer.key] = path
            tools.installed.append(peer.package)
        else:
            tools.missing[peer.key] = f"{peer.binary}: {reason or 'still missing after apt-get install'}"
    return tools


def _apt_install(packages: list[str]) -> str | None:
    """apt-get update (once) and install; returns why it failed, or None."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with _no_service_start():
            for argv in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            ):
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                    return f"`{' '.join(argv)}` failed: {' / '.join(tail)}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get failed: {exc}"
    return None


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Debian's policy-rc.d hook: the packages' services (nginx on *:80, exporter_exporter on *:9999)
    must not start on installation; only our own 127.0.0.1 instances run."""
    created = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text("#!/bin/sh\n# temporary, from windows-metrics-proxy benchmarks\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        created = True
    try:
        yield
    finally:
        if created:
            POLICY_RC_D.unlink(missing_ok=True)


def version_of(key: str, path: str) -> str:
    """One line naming the peer's version, as the tool itself prints it."""
    argv = {"nginx": [path, "-v"], "wrk": [path, "-v"], "exporter_exporter": [path, "-version"]}[key]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    if not lines:
        return "unknown"
    line = lines[0].strip()
    # "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer",
    # "Version: 0.4.0-0.4.0-1+b14 (from debian/sid, built by ...)"
    for prefix in ("nginx version: ", "wrk ", "Version: "):
        line = line.removeprefix(prefix)
    return line.split(" Copyright")[0].split(" (from ")[0]


# --- nginx ----------------------------------------------------------------------------------------

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _nginx_main(prefix: Path) -> str:
    # As root, the master would switch workers to `nobody`, which cannot read the 0700 temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp}\n"
    )


def nginx_argv(nginx: str, prefix: Path) -> list[str]:
    return [nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf")]


def write_nginx_static(prefix: Path, *, port: int, root: Path) -> Path:
    """The upstream: static files (one per scale) with the exporter's Content-Type, one worker."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = (
        _nginx_main(prefix) + "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    keepalive_requests 1000000;\n"
        "    types { }\n"
        f'    default_type "{TEXT_CONTENT_TYPE}";\n'
        "    server {\n"
        f"        listen {LOOPBACK}:{port};\n"
        f"        root {root};\n"
        "        location = /health { return 200; }\n"
        "    }\n"
        "}\n"
    )
    (prefix / "nginx.conf").write_text(conf)
    return prefix / "nginx.conf"


def write_nginx_front(prefix: Path, *, port: int, upstream_port: int, upstream_path: str) -> Path:
    """The nginx image's job: /metrics proxied to the exporter, /health answered locally.

    One worker and upstream keepalive; everything else (proxy buffering, keepalive_requests)
    at nginx's defaults, as in the image. Access logging is off, as it is in the proxy.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    conf = (
        _nginx_main(prefix) + "    upstream exporter {\n"
        f"        server {LOOPBACK}:{upstream_port};\n"
        "        keepalive 16;\n"
        "    }\n"
        "    server {\n"
        f"        listen {LOOPBACK}:{port};\n"
        "        location /metrics {\n"
        f"            proxy_pass http://exporter{upstream_path};\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "        }\n"
        "        location /health { return 200; }\n"
        "    }\n"
        "}\n"
    )
    (prefix / "nginx.conf").write_text(conf)
    return prefix / "nginx.conf"


# --- exporter_exporter -----------------------------------------------------------------------------

EXPEXP_MODULE = "windows"


def write_exporter_exporter(path: Path, *, upstream_port: int, upstream_path: str, verify: bool) -> Path:
    """One http module; the address is spelled out (its default is the name `localhost`)."""
    path.write_text(
        "modules:\n"
        f"  {EXPEXP_MODULE}:\n"
        "    method: http\n"
        "    timeout: 30s\n"
        "    http:\n"
        f"      address: {LOOPBACK}\n"
        f"      port: {upstream_port}\n"
        f"      path: {upstream_path}\n"
        f"      verify: {'true' if verify else 'false'}\n"
    )
    return path


def exporter_exporter_argv(binary: str, config: Path, port: int) -> list[str]:
    return [binary, "-config.file", str(config), "-web.listen-address", f"{LOOPBACK}:{port}"]
