"""The command line as a user runs it: real processes, real signals, loopback only."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.fake_exporter import PAUSES, FakeExporter, Fault, bound_port, run_fake_exporter
from tests.conftest import LOOPBACK
from tests.test_app import free_port

PYTHON = sys.executable


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    return subprocess.run(
        [PYTHON, "-m", "proxy", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ((), {}, "PROXY_HOSTIP (--hostip): required"),
        ((), {"PROXY_HOSTIP": "127.0.0.1", "PROXY_PORT": "0"}, "PROXY_PORT"),
        (("--hostip", "127.0.0.1", "--port", "99999"), {}, "--port (PROXY_PORT)"),
        ((), {"PROXY_HOSTIP": "127.0.0.1", "PROXY_SCRAPE_TIMEOUT": "ten"}, "PROXY_SCRAPE_TIMEOUT"),
        (("serve", "--hostip", "not a host"), {}, "--hostip (PROXY_HOSTIP)"),
    ],
)
def test_bad_configuration_exits_non_zero_with_one_line(
    args: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert lines[0].startswith("windows-metrics-proxy: error: ")
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_one_line_error() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--hostip", LOOPBACK, "--listen-address", LOOPBACK, "--listen-port", str(port))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_every_setting_is_a_flag() -> None:
    result = run_cli("serve", "--help")
    from proxy.settings import Settings, flag_name

    for name in Settings.model_fields:
        assert flag_name(name) in result.stdout


def test_version() -> None:
    from proxy import __version__

    assert run_cli("--version").stdout.strip() == f"windows-metrics-proxy {__version__}"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    return subprocess.Popen(
        [PYTHON, "-m", "proxy", *args],
        env={**clean, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_listening(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listening on {port} after {limit}s")


async def test_sigterm_lets_an_in_flight_scrape_finish(processes: list[subprocess.Popen[str]]) -> None:
    """SIGTERM arrives while the exporter holds the scrape; the exporter answers only once the proxy
    has logged that it is stopping, and the scraper still gets the whole body."""
    fake = FakeExporter(fault=Fault.HANG)  # held until this test releases it
    runner = await run_fake_exporter(fake, LOOPBACK, 0)
    try:
        port = free_port()
        proxy = start(
            "--hostip", LOOPBACK, "--port", str(bound_port(runner)),
            "--listen-address", LOOPBACK, "--listen-port", str(port),
            env={"PROXY_LOG_FORMAT": "json"},
        )  # fmt: skip
        processes.append(proxy)
        await wait_listening(port)
        assert proxy.stderr is not None
        async with aiohttp.ClientSession() as session:
            scrape = asyncio.ensure_future(session.get(f"http://{LOOPBACK}:{port}/metrics"))
            for _ in range(1000):  # bounded: until the scrape is waiting on the exporter
                if fake.in_flight or scrape.done():
                    break
                await asyncio.sleep(0.01)
            assert fake.in_flight == 1
            proxy.send_signal(signal.SIGTERM)
            logged: list[str] = []
            for _ in range(100):  # bounded: until the proxy logs that it took the signal
                line = await asyncio.wait_for(asyncio.to_thread(proxy.stderr.readline), timeout=10)
                assert line, f"the proxy exited without logging that it is stopping: {logged}"
                logged.append(line)
                if '"msg": "stopping"' in line:
                    break
            else:
                raise AssertionError(f"the proxy never logged that it is stopping: {logged}")
            assert fake.in_flight == 1  # the scrape is still in flight
            assert not scrape.done()
            for pause in list(runner.app[PAUSES]):  # now let the exporter answer
                if not pause.done():
                    pause.set_result(False)
            response = await asyncio.wait_for(scrape, timeout=10)
            body = await asyncio.wait_for(response.read(), timeout=10)
        assert response.status == 200
        assert len(body) == 265_813
        _, rest = await asyncio.to_thread(proxy.communicate, timeout=10)
        stderr = "".join(logged) + rest
        assert proxy.returncode == 0, stderr
        assert '"signal": "SIGTERM"' in stderr
        assert '"msg": "stopped"' in stderr
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOOPBACK, port)
    finally:
        await runner.cleanup()


async def test_demo_serves_and_stops_on_ctrl_c(processes: list[subprocess.Popen[str]]) -> None:
    demo = start("demo")
    processes.append(demo)
    assert demo.stdout is not None
    lines: list[str] = []
    while not any(line.startswith("proxy:") for line in lines):
        line = await asyncio.wait_for(asyncio.to_thread(demo.stdout.readline), timeout=20)
        assert line, "demo exited early"
        lines.append(line)
    proxy_url = re.search(r"proxy:\s+(\S+)", "".join(lines))
    exporter_url = re.search(r"fake windows_exporter:\s+(\S+)", "".join(lines))
    assert proxy_url
    assert exporter_url
    assert proxy_url.group(1).startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url.group(1)) as r:
            via_proxy = await r.read()
        async with session.get(exporter_url.group(1)) as r:
            direct = await r.read()
    assert via_proxy == direct
    assert b"windows_cpu_time_total" in via_proxy
    demo.send_signal(signal.SIGINT)
    _, stderr = await asyncio.to_thread(demo.communicate, timeout=10)
    assert demo.returncode == 0, stderr
    assert "Traceback" not in stderr


async def test_fake_exporter_command(processes: list[subprocess.Popen[str]]) -> None:
    port = free_port()
    fake = start("fake-exporter", "--listen-port", str(port), "--scale", "2")
    processes.append(fake)
    await wait_listening(port)
    async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{port}/metrics") as r:
        body = await r.read()
    assert b'replica="1"' in body
    fake.send_signal(signal.SIGTERM)
    await asyncio.to_thread(fake.communicate, timeout=10)
    assert fake.returncode == 0


def test_a_passthrough_proxy_loads_neither_the_fake_exporter_nor_the_relabel_modules() -> None:
    """Memory: the fake exporter is for its own command, the rewriter (2.8 MB) for rules."""
    probe = (
        "import sys\n"
        "from proxy.cli import build_parser\n"
        "from proxy.app import create_app\n"
        "from proxy.settings import load_settings\n"
        "build_parser('serve')\n"
        "create_app(load_settings(hostip='127.0.0.1'))\n"
        "heavy = ('proxy.fake_exporter', 'proxy.rewrite', 'proxy.relabel', 'proxy.rules', 're2', 'yaml')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "create_app(load_settings(hostip='127.0.0.1', keep='windows_cpu_.*'))\n"
        "print(sorted(m for m in ('proxy.rewrite', 'proxy.relabel', 'proxy.rules') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    passthrough, with_rules = result.stdout.splitlines()
    assert passthrough == "[]"
    assert with_rules == "['proxy.relabel', 'proxy.rewrite', 'proxy.rules']"


def test_name_validation_reaches_check_config_and_the_relabel_dry_run(tmp_path: Path) -> None:
    """One setting for the server, `check-config` and `relabel`: a UTF-8 target name is taken by
    default (Prometheus 3) and refused under legacy validation (Prometheus 2.x)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("metric_relabel_configs:\n  - source_labels: [a]\n    target_label: utf-8.label\n")
    body = tmp_path / "in.prom"
    body.write_text('m{a="x"} 1\n')
    ok = run_cli("check-config", "--hostip", "127.0.0.1", "--relabel-config", str(rules))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("1 relabel rule(s), name validation utf8")
    legacy_env = {"PROXY_NAME_VALIDATION": "legacy"}
    refused = run_cli("check-config", "--hostip", "127.0.0.1", "--relabel-config", str(rules), env=legacy_env)
    assert refused.returncode == 2
    assert "metric_relabel_configs[0].target_label: 'utf-8.label' is invalid" in refused.stderr
    dry = run_cli("relabel", "--config", str(rules), str(body))
    assert dry.returncode == 0, dry.stderr
    assert "utf-8.label" in dry.stdout  # how the name is written out is exposition.py's business
    # the flag wins over the environment, as every flag does
    flagged = run_cli(
        "relabel", "--name-validation", "utf8", "--config", str(rules), str(body), env=legacy_env
    )
    assert flagged.returncode == 0, flagged.stderr
    for args, env in ((("--name-validation", "legacy"), {}), ((), legacy_env)):
        result = run_cli("relabel", *args, "--config", str(rules), str(body), env=env)
        assert result.returncode == 2
        assert "'utf-8.label' is invalid 'target_label' for replace action" in result.stderr
    bad = run_cli("relabel", "--name-validation", "strict", "--config", str(rules), str(body))
    assert bad.returncode == 2
    assert "--name-validation (PROXY_NAME_VALIDATION)" in bad.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), b'{"win.cpu",a="x","utf-8.label"="x"} 1\n'),
        (("--escaping", "allow-utf-8"), b'{"win.cpu",a="x","utf-8.label"="x"} 1\n'),
        (("--escaping", "underscores"), b'win_cpu{a="x",utf_8_label="x"} 1\n'),
        (("--escaping", "dots"), b'win_dot_cpu{a="x",utf__8_dot_label="x"} 1\n'),
        (("--escaping", "values"), b'U__win_2e_cpu{a="x",U__utf_2d_8_2e_label="x"} 1\n'),
    ],
)
def test_relabel_dry_run_writes_names_as_the_escaping_scheme_asks(
    tmp_path: Path, args: tuple[str, ...], expected: bytes
) -> None:
    """By default as a Prometheus 3 scraper (allow-utf-8) gets them; --escaping names another scheme."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "metric_relabel_configs:\n"
        "  - {target_label: __name__, replacement: win.cpu}\n"
        "  - {source_labels: [a], target_label: utf-8.label}\n"
    )
    body = tmp_path / "in.prom"
    body.write_text('m{a="x"} 1\n')
    result = run_cli("relabel", *args, "--config", str(rules), str(body))
    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == expected
    bad = run_cli("relabel", "--escaping", "none", "--config", str(rules), str(body))
    assert bad.returncode == 2


# -- collect[] push-down: what a scrape would ask for, given a capture (proxy/pushdown.py) -----------

PUSHDOWN_KEEP = (
    "metric_relabel_configs:\n  - source_labels: [__name__]\n    action: keep\n    regex: "
    "windows_cpu_time_total|windows_memory_.*|windows_os_.*\n"
)
PROFILE_031 = Path(__file__).parent.parent / "proxy" / "data" / "windows_exporter-0.31-profile.prom"


def test_check_config_and_the_relabel_dry_run_say_which_collectors_a_scrape_asks_for(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(PUSHDOWN_KEEP)
    line = "push-down: a scrape would ask for collect[]=cpu,memory,os (6 of 9 enabled collectors not run)"
    check = run_cli(
        "check-config", "--hostip", "127.0.0.1", "--relabel-config", str(rules), "--capture", str(PROFILE_031)
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[-1] == line
    dry = run_cli("relabel", "--config", str(rules), str(PROFILE_031))
    assert dry.returncode == 0, dry.stderr
    assert dry.stderr.strip() == line
    assert "push-down" not in dry.stdout  # stdout stays the rewritten body
    assert dry.stdout.startswith("# HELP windows_cpu_time_total")
    off = run_cli(
        "relabel", "--config", str(rules), str(PROFILE_031), env={"PROXY_COLLECTOR_PUSHDOWN": "false"}
    )
    assert "push-down: off (PROXY_COLLECTOR_PUSHDOWN=false)" in off.stderr
    rules.write_text(PUSHDOWN_KEEP.replace("windows_os_.*", "windows_os_.*|windows_exporter_.*"))
    impossible = run_cli(
        "check-config", "--hostip", "127.0.0.1", "--relabel-config", str(rules), "--capture", str(PROFILE_031)
    )
    assert impossible.stdout.splitlines()[-1] == (
        "push-down: a scrape would ask for every collector "
        "(the rules can keep windows_exporter_collector_success)"
    )
