"""Shared fixtures: a fake exporter and a proxy in front of it, both on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.fake_exporter import FakeExporter
from proxy.settings import load_settings
from proxy.telemetry import Telemetry

LOOPBACK = "127.0.0.1"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(message: str) -> NoReturn:
    """A real part the test needs is absent: that fails under CI=true and skips elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_binary(
    name: str, install: str = "Debian's prometheus package; `make test` installs it as root"
) -> str:
    """Path of a real tool the test drives, looked up beside this Python (the venv) first, then on PATH."""
    beside_python = Path(sys.executable).parent / name
    path = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if path is None:
        _missing(f"{name} not found ({install})")
    return path


def require_module(name: str, install: str = "pip install -e '.[test]' installs it") -> Any:
    """A Python package the test drives."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"{name} cannot be imported ({exc}); {install}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Every process a test starts is killed (and reaped) at the end, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=10)


@pytest.fixture
def fake() -> FakeExporter:
    return FakeExporter()


@pytest.fixture
async def fake_server(aiohttp_server: Callable[..., Awaitable[TestServer]], fake: FakeExporter) -> TestServer:
    return await aiohttp_server(fake.app(), host=LOOPBACK)


ProxyFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_proxy(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> ProxyFactory:
    """Build a proxy client for given settings; `port` defaults to nothing in particular."""

    async def factory(*, resolver: Any = None, **settings: Any) -> TestClient:
        settings.setdefault("hostip", LOOPBACK)
        values = load_settings(**{k: str(v) if not isinstance(v, bool) else v for k, v in settings.items()})
        app: web.Application = create_app(values, telemetry=Telemetry(), resolver=resolver)
        # Like curl, and unlike aiohttp's default, ask for an uncompressed body unless a test says so.
        return await aiohttp_client(
            app, server_kwargs={"host": LOOPBACK}, skip_auto_headers=("Accept-Encoding",)
        )

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_server: TestServer) -> TestClient:
    return await make_proxy(port=fake_server.port)


@pytest.fixture(autouse=True)
def _clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read PROXY_* from the environment; a developer's shell must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("PROXY_"):
            monkeypatch.delenv(name)
