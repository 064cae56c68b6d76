"""Configuration: defaults, sources, and one-line errors that name the setting."""

from __future__ import annotations

import pytest

from proxy.settings import ConfigError, Settings, load_settings


def test_defaults_match_the_nginx_image_and_windows_exporter() -> None:
    s = load_settings(hostip="10.240.0.4")
    assert (s.port, s.listen_address, s.listen_port) == (9182, "0.0.0.0", 9100)
    assert (s.upstream_path, s.upstream_scheme) == ("/metrics", "http")
    assert (s.connect_timeout, s.scrape_timeout) == (2.0, 10.0)
    assert s.coalesce is True
    assert s.upstream_url == "http://10.240.0.4:9182/metrics"


def test_environment_is_read_with_the_proxy_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_HOSTIP", "10.0.0.5")
    monkeypatch.setenv("PROXY_PORT", "19182")
    monkeypatch.setenv("PROXY_COALESCE", "false")
    monkeypatch.setenv("PROXY_LOG_FORMAT", "JSON")
    s = load_settings()
    assert (s.hostip, s.port, s.coalesce, s.log_format) == ("10.0.0.5", 19182, False, "json")


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_PORT", "19182")
    assert load_settings(hostip="10.0.0.5", port="9999").port == 9999


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("fd00::4", "http://[fd00::4]:9182/metrics"),
        ("[fd00::4]", "http://[fd00::4]:9182/metrics"),
        ("exporter.monitoring.svc", "http://exporter.monitoring.svc:9182/metrics"),
        ("10.1.2.3", "http://10.1.2.3:9182/metrics"),
    ],
)
def test_hostip_accepts_ip_literals_and_dns_names(host: str, url: str) -> None:
    assert load_settings(hostip=host).upstream_url == url


@pytest.mark.parametrize(
    ("overrides", "env", "needle"),
    [
        ({"port": "70000"}, "PROXY_PORT", "less than or equal to 65535"),
        ({"port": "abc"}, "PROXY_PORT", "integer"),
        ({"connect_timeout": "soon"}, "PROXY_CONNECT_TIMEOUT", "number"),
        ({"scrape_timeout": "-1"}, "PROXY_SCRAPE_TIMEOUT", "greater than 0"),
        ({"hostip": "10.0.0.1/evil"}, "PROXY_HOSTIP", "IPv4 or IPv6 address or a DNS name"),
        ({"hostip": "user@host"}, "PROXY_HOSTIP", "DNS name"),
        ({"upstream_path": "metrics"}, "PROXY_UPSTREAM_PATH", "absolute path"),
        ({"upstream_scheme": "ftp"}, "PROXY_UPSTREAM_SCHEME", "'http' or 'https'"),
        ({"log_format": "xml"}, "PROXY_LOG_FORMAT", "'text' or 'json'"),
        ({"scrape_timeout": "90"}, "PROXY_SCRAPE_TIMEOUT", "max_scrape_timeout"),
    ],
)
def test_errors_are_one_line_naming_the_setting(
    overrides: dict[str, str], env: str, needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in overrides.items():
        monkeypatch.setenv(f"PROXY_{name.upper()}", value)
    with pytest.raises(ConfigError) as raised:
        load_settings(hostip="10.0.0.1") if "hostip" not in overrides else load_settings()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(env), message
    assert needle in message, message


def test_a_flag_error_names_the_flag_first() -> None:
    with pytest.raises(ConfigError, match=r"^--listen-port \(PROXY_LISTEN_PORT\): "):
        load_settings(hostip="10.0.0.1", listen_port="-5")


def test_missing_hostip_is_reported_only_when_serving() -> None:
    s = load_settings()
    assert s.hostip is None
    with pytest.raises(ConfigError, match=r"^PROXY_HOSTIP \(--hostip\): required"):
        s.require_upstream()


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    from proxy.settings import env_name, flag_name

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` | `{flag_name(name)}" in readme, name


def test_readme_relabel_examples_are_valid_and_do_what_they_say() -> None:
    import re
    from pathlib import Path

    from proxy.rewrite import RuleSet, rewrite_bytes
    from proxy.rules import parse_config_text

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [
        b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("metric_relabel_configs:")
    ]
    assert len(blocks) >= 4
    capture = (Path(__file__).parent.parent / "proxy" / "data" / "windows_exporter-0.20.0.prom").read_bytes()
    outputs = []
    for block in blocks:
        rules = parse_config_text(block, expand_env=True, environ={"NODE_NAME": "akswin000000"})
        outputs.append(rewrite_bytes(capture, RuleSet(rules), openmetrics=False).decode())
    keep_list, services, rename, env_label = outputs[:4]
    assert "windows_cpu_time_total{" in keep_list
    assert "windows_service_" not in keep_list
    service_lines = [line for line in services.splitlines() if line.startswith("windows_service")]
    assert service_lines == ['windows_service_state{name="dhcp",state="running"} 1']
    assert "# TYPE win_cpu_time_total counter" in rename
    assert "\nwindows_" not in rename
    assert 'node="akswin000000"' in env_label
