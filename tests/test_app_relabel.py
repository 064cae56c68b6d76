"""Relabeling inside the proxy: headers, encodings, coalescing, self-metrics and the CLI commands."""

from __future__ import annotations

import asyncio
import gzip
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.fake_exporter import FakeExporter, Fault
from proxy.relabel import parse_rules
from proxy.rewrite import LINE_CAP, RuleSet, rewrite_bytes
from proxy.settings import load_settings
from tests.conftest import LOOPBACK, ProxyFactory
from tests.rawserver import raw_server
from tests.test_app import PROMETHEUS_ACCEPT, raw_get, read_until_error, sample_value
from tests.test_rewrite import CAPTURE, NODE_KEEP_LIST, long_sample

RULES_YAML = f"""
metric_relabel_configs:
  - source_labels: [__name__]
    regex: {NODE_KEEP_LIST}
    action: keep
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_YAML)
    return path


@pytest.fixture
async def relabeling(make_proxy: ProxyFactory, fake_server: TestServer, rules_file: Path) -> TestClient:
    return await make_proxy(port=fake_server.port, relabel_config=str(rules_file))


def expected(body: bytes = CAPTURE, openmetrics: bool = False) -> bytes:
    rule_set = RuleSet(
        parse_rules([{"source_labels": ["__name__"], "regex": NODE_KEEP_LIST, "action": "keep"}])
    )
    return rewrite_bytes(body, rule_set, openmetrics=openmetrics)


async def test_filtered_body_gzipped_for_scrapers_that_accept_it(relabeling: TestClient) -> None:
    status, headers, body = await raw_get(relabeling.server.port, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert "Content-Length" not in headers
    assert headers["Vary"] == "Accept-Encoding"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert gzip.decompress(body) == expected()
    assert len(gzip.decompress(body)) < len(CAPTURE) / 10


async def test_filtered_body_plain_otherwise(relabeling: TestClient) -> None:
    status, headers, body = await raw_get(relabeling.server.port, "/metrics")
    assert status == 200
    assert "Content-Encoding" not in headers
    assert "Content-Length" not in headers
    assert body == expected()


async def test_openmetrics_is_rewritten_as_openmetrics(
    relabeling: TestClient, fake_server: TestServer
) -> None:
    _, direct_headers, direct = await raw_get(fake_server.port, "/metrics", {"Accept": PROMETHEUS_ACCEPT})
    status, headers, body = await raw_get(relabeling.server.port, "/metrics", {"Accept": PROMETHEUS_ACCEPT})
    assert status == 200
    assert headers["Content-Type"] == direct_headers["Content-Type"]
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert body == expected(direct, openmetrics=True)


async def test_upstream_gets_no_protobuf_and_no_compression(tmp_path: Path, rules_file: Path) -> None:
    seen: list[bytes] = []
    payload = gzip.compress(b"# TYPE windows_os_info gauge\nwindows_os_info 1\nwindows_service_state 1\n")

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(head)
        # An exporter that compresses although not asked: the proxy must still decode it.
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload
        )
        await writer.drain()

    async with raw_server(script) as upstream:
        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port), relabel_config=str(rules_file))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            accept = (
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;q=0.9,"
                + PROMETHEUS_ACCEPT
            )
            status, _, body = await raw_get(
                server.port, "/metrics", {"Accept": accept, "Accept-Encoding": "gzip"}
            )
    assert status == 200
    assert gzip.decompress(body) == b"# TYPE windows_os_info gauge\nwindows_os_info 1\n"
    request = seen[0].decode().lower()
    assert "protobuf" not in request
    assert "accept-encoding" not in request
    assert "application/openmetrics-text;version=1.0.0" in request


async def test_head_describes_the_filtered_body(relabeling: TestClient) -> None:
    response = await relabeling.head("/metrics", headers={"Accept-Encoding": "gzip"})
    assert response.status == 200
    assert "Content-Length" not in response.headers
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == b""


async def test_exporter_errors_pass_through_unchanged(relabeling: TestClient) -> None:
    response = await relabeling.get("/metrics?collect[]=nosuch")
    assert response.status == 400
    assert "nosuch" in await response.text()


async def test_self_metrics_count_samples_and_cache_hits(
    make_proxy: ProxyFactory, fake_server: TestServer, rules_file: Path
) -> None:
    # Push-down off, so both scrapes read the whole capture (with it on the second one is narrowed
    # to the kept collectors: tests/test_app_pushdown.py).
    relabeling = await make_proxy(
        port=fake_server.port, relabel_config=str(rules_file), collector_pushdown=False
    )
    await relabeling.get("/metrics")
    await (await relabeling.get("/metrics")).read()
    text = await (await relabeling.get("/proxy/metrics")).text()
    kept = sample_value(text, "windows_metrics_proxy_relabel_samples_total", 'result="kept"')
    dropped = sample_value(text, "windows_metrics_proxy_relabel_samples_total", 'result="dropped"')
    assert kept + dropped == 2 * 1728
    assert 0 < kept < dropped
    assert sample_value(text, "windows_metrics_proxy_relabel_samples_total", 'result="unparsable"') == 0
    assert sample_value(text, "windows_metrics_proxy_relabel_cache_hits_total") >= 1728
    assert sample_value(text, "windows_metrics_proxy_relabel_cache_series") == 1714


async def test_gzip_and_plain_scrapers_share_one_upstream_request(
    relabeling: TestClient, fake: FakeExporter
) -> None:
    fake.fault = Fault.LATENCY
    fake.latency = 0.3
    plain, zipped = await asyncio.gather(
        raw_get(relabeling.server.port, "/metrics"),
        raw_get(relabeling.server.port, "/metrics", {"Accept-Encoding": "gzip"}),
    )
    assert plain[0] == zipped[0] == 200
    assert plain[2] == gzip.decompress(zipped[2]) == expected()
    assert fake.scrapes == 1


async def test_a_body_that_breaks_mid_rewrite_aborts(relabeling: TestClient, fake: FakeExporter) -> None:
    fake.fault = Fault.RESET
    status, error, _ = await read_until_error(relabeling.server.port)
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)


async def test_corrupt_gzip_from_the_exporter_aborts(rules_file: Path) -> None:
    broken = bytearray(gzip.compress(CAPTURE))
    broken[len(broken) // 2 : len(broken) // 2 + 64] = b"\xff" * 64

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(broken) + bytes(broken)
        )
        await writer.drain()

    async with raw_server(script) as upstream:
        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port), relabel_config=str(rules_file))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            status, error, _ = await read_until_error(server.port)
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)


async def test_a_line_over_the_cap_aborts_and_is_counted_as_line_too_long(
    rules_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = b"# TYPE windows_long gauge\n" + long_sample(LINE_CAP + 1) + b"\n"

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()

    async with raw_server(script) as upstream:
        settings = load_settings(hostip=LOOPBACK, port=str(upstream.port), relabel_config=str(rules_file))
        async with TestServer(create_app(settings), host=LOOPBACK) as server:
            with caplog.at_level(logging.INFO):
                status, error, _ = await read_until_error(server.port)
            _, _, own = await raw_get(server.port, "/proxy/metrics")
    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)
    text = own.decode()
    total = "windows_metrics_proxy_upstream_requests_total"
    assert sample_value(text, total, 'outcome="line_too_long"') == 1
    assert sample_value(text, total, 'outcome="body_error"') == 0
    assert sample_value(text, "windows_metrics_proxy_client_aborts_total", 'reason="upstream_broke"') == 1
    [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "line_too_long"]
    assert "a line longer than 1 MiB (1048576 bytes)" in record.fields["reason"]  # type: ignore[attr-defined]


async def test_keep_and_drop_shorthands(make_proxy: ProxyFactory, fake_server: TestServer) -> None:
    client = await make_proxy(port=fake_server.port, keep="windows_(os|cpu)_.*", drop="windows_cpu_.*")
    body = await (await client.get("/metrics")).text()
    names = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if not line.startswith("#")}
    assert names
    assert all(name.startswith("windows_os_") for name in names)


# --- the commands -------------------------------------------------------------------------------------


def cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


async def test_relabel_command_matches_what_the_server_serves(
    relabeling: TestClient, fake_server: TestServer, rules_file: Path, tmp_path: Path
) -> None:
    for accept, fmt in ((None, "text"), (PROMETHEUS_ACCEPT, "openmetrics")):
        headers = {"Accept": accept} if accept else {}
        _, _, upstream_body = await raw_get(fake_server.port, "/metrics", headers)
        _, _, served = await raw_get(relabeling.server.port, "/metrics", headers)
        source = tmp_path / f"input.{fmt}"
        source.write_bytes(upstream_body)
        from_file = await asyncio.to_thread(
            cli, "relabel", "--config", str(rules_file), "--format", fmt, str(source)
        )
        from_stdin = await asyncio.to_thread(
            cli, "relabel", "--config", str(rules_file), "--format", fmt, "-", stdin=upstream_body
        )
        assert from_file.returncode == 0, from_file.stderr
        assert from_file.stdout == served
        assert from_stdin.stdout == served


def test_relabel_command_fails_on_a_line_over_the_cap(rules_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "long.prom"
    source.write_bytes(b"windows_os_x 1\n" + long_sample(LINE_CAP + 1) + b"\n")
    result = cli("relabel", "--config", str(rules_file), str(source))
    assert result.returncode == 1, result.stderr
    assert result.stdout == b""
    assert b"a line longer than 1 MiB (1048576 bytes)" in result.stderr
    assert b"Traceback" not in result.stderr


def test_check_config_accepts_and_rejects(rules_file: Path, tmp_path: Path) -> None:
    ok = cli("check-config", "--hostip", "10.0.0.4", "--relabel-config", str(rules_file))
    assert ok.returncode == 0, ok.stderr
    assert b"1 relabel rule(s)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "metric_relabel_configs:\n  - action: keep\n  - action: hashmod\n    target_label: shard\n"
    )
    result = cli("check-config", "--hostip", "10.0.0.4", "--relabel-config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "PROXY_RELABEL_CONFIG" in lines[0]
    assert "metric_relabel_configs[1].modulus" in lines[0]
    missing = cli("check-config", "--hostip", "10.0.0.4", "--relabel-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert b"cannot read" in missing.stderr


def test_serving_with_a_bad_rule_file_fails_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metric_relabel_configs:\n  - regex: '(?=x)'\n    action: drop\n")
    result = cli("--hostip", "127.0.0.1", "--listen-port", "0", "--relabel-config", str(bad))
    assert result.returncode == 2
    assert b"metric_relabel_configs[0].regex: invalid RE2 regex" in result.stderr
    assert b"Traceback" not in result.stderr


def test_environment_expansion(tmp_path: Path) -> None:
    import os

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "metric_relabel_configs:\n"
        "  - target_label: node\n    replacement: ${NODE_NAME}\n"
        "  - source_labels: [__name__]\n    regex: (?P<n>up)\n    target_label: copy\n    replacement: ${n}\n"
    )
    env = {**os.environ, "NODE_NAME": "akswin000002"}
    result = cli("relabel", "--config", str(rules), "--expand-env", "-", stdin=b"up 1\n", env=env)
    assert result.stdout == b'up{copy="up",node="akswin000002"} 1\n', result.stderr
    unexpanded = cli("relabel", "--config", str(rules), "-", stdin=b"up 1\n")
    # Without expansion ${NODE_NAME} is what Prometheus makes of it: a reference to a regex group
    # that does not exist, so the replacement is empty and no label is set.
    assert unexpanded.stdout == b'up{copy="up"} 1\n'
    rules.write_text("metric_relabel_configs:\n  - target_label: node\n    replacement: ${NODE_NAM}\n")
    typo = cli("relabel", "--config", str(rules), "--expand-env", "-", stdin=b"up 1\n", env=env)
    assert typo.returncode == 2
    assert b"metric_relabel_configs[0].replacement: ${NODE_NAM} is not set in the environment" in typo.stderr
