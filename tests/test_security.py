"""Listener TLS and basic auth (exporter-toolkit web config), and TLS and basic auth to the exporter.

Real certificates made here with `cryptography`, real handshakes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.fake_exporter import FakeExporter
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ConfigError, load_settings
from proxy.webconfig import (
    BCRYPT_SLOTS,
    FAILURE_BURST,
    FAILURE_RATE,
    BasicAuth,
    WebConfigError,
    parse_web_config,
)
from tests.conftest import LOOPBACK
from tests.test_app import sample_value

# --- a small PKI ------------------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Issued(cert_path, key_path)


class CA:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = _write(folder, name, self.cert, self.key).cert

    def issue(self, name: str, *, server: bool) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False
            )
        return _write(self.folder, name, builder.sign(self.key, hashes.SHA256()), key)


@dataclass
class PKI:
    ca: CA
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca = CA(folder, "test-ca")
    other = CA(folder, "other-ca")
    return PKI(
        ca,
        ca.issue("proxy", server=True),
        ca.issue("prometheus", server=False),
        other.issue("x", server=False),
    )


def client_context(
    pki: PKI, cert: Issued | None = None, *, max_tls: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if max_tls is not None:
        context.maximum_version = max_tls
    return context


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- the proxy, started as `serve` starts it ---------------------------------------------------------


@pytest.fixture
async def exporter() -> AsyncIterator[int]:
    runner = web.AppRunner(FakeExporter(max_concurrent=0).app())
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def proxy_with(
    tmp_path: Path, upstream_port: int, web_config: str | None, **settings: str
) -> RunningProxy:
    values = {"hostip": LOOPBACK, "port": str(upstream_port), "listen_address": LOOPBACK, "listen_port": "0"}
    if web_config is not None:
        path = tmp_path / "web.yml"
        path.write_text(web_config)
        values["web_config_file"] = str(path)
    return await start_proxy(load_settings(**values, **settings))


def tls_config(pki: PKI, extra: str = "") -> str:
    return f"tls_server_config:\n  cert_file: {pki.server.cert}\n  key_file: {pki.server.key}\n{extra}"


async def fetch(url: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), await response.read()


# --- listener TLS ------------------------------------------------------------------------------------


async def test_tls_listener_serves_https_only(tmp_path: Path, pki: PKI, exporter: int) -> None:
    proxy = await proxy_with(tmp_path, exporter, tls_config(pki))
    try:
        status, _, body = await fetch(f"https://{LOOPBACK}:{proxy.port}/metrics", ssl=client_context(pki))
        assert status == 200
        assert b"windows_cpu_time_total" in body
        with pytest.raises(aiohttp.ClientError):
            await fetch(f"http://{LOOPBACK}:{proxy.port}/metrics")
    finally:
        await proxy.close()


async def test_required_client_certificate(tmp_path: Path, pki: PKI, exporter: int) -> None:
    config = tls_config(
        pki, f"  client_ca_file: {pki.ca.path}\n  client_auth_type: RequireAndVerifyClientCert\n"
    )
    proxy = await proxy_with(tmp_path, exporter, config)
    url = f"https://{LOOPBACK}:{proxy.port}/metrics"
    try:
        assert (await fetch(url, ssl=client_context(pki, pki.client)))[0] == 200
        for refused in (client_context(pki), client_context(pki, pki.stranger)):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await fetch(url, ssl=refused)
    finally:
        await proxy.close()


async def test_optional_client_certificate(tmp_path: Path, pki: PKI, exporter: int) -> None:
    config = tls_config(
        pki, f"  client_ca_file: {pki.ca.path}\n  client_auth_type: VerifyClientCertIfGiven\n"
    )
    proxy = await proxy_with(tmp_path, exporter, config)
    url = f"https://{LOOPBACK}:{proxy.port}/health"
    try:
        assert (await fetch(url, ssl=client_context(pki)))[0] == 200
        assert (await fetch(url, ssl=client_context(pki, pki.client)))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await fetch(url, ssl=client_context(pki, pki.stranger))
    finally:
        await proxy.close()


async def test_min_version(tmp_path: Path, pki: PKI, exporter: int) -> None:
    proxy = await proxy_with(tmp_path, exporter, tls_config(pki, "  min_version: TLS13\n"))
    url = f"https://{LOOPBACK}:{proxy.port}/health"
    try:
        assert (await fetch(url, ssl=client_context(pki)))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await fetch(url, ssl=client_context(pki, max_tls=ssl.TLSVersion.TLSv1_2))
    finally:
        await proxy.close()


# --- basic auth ----------------------------------------------------------------------------------------


async def test_basic_auth(tmp_path: Path, exporter: int, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    proxy = await proxy_with(tmp_path, exporter, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    base = f"http://{LOOPBACK}:{proxy.port}"
    try:
        status, headers, _ = await fetch(f"{base}/metrics")
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="windows-metrics-proxy"'
        assert (await fetch(f"{base}/metrics", headers={"Authorization": basic("prometheus", "wrong")}))[
            0
        ] == 401
        assert (await fetch(f"{base}/metrics", headers={"Authorization": basic("nobody", "s3cret")}))[
            0
        ] == 401
        assert (await fetch(f"{base}/metrics", headers={"Authorization": "Bearer x"}))[0] == 401
        assert (await fetch(f"{base}/proxy/metrics"))[0] == 401
        assert (await fetch(f"{base}/health"))[0] == 200  # probes need no credentials
        good = {"Authorization": basic("prometheus", "s3cret")}
        before = len(checks)
        assert (await fetch(f"{base}/metrics", headers=good))[0] == 200
        assert (await fetch(f"{base}/metrics", headers=good))[0] == 200
        assert len(checks) == before + 1  # bcrypt once; then the remembered digest
        _, _, metrics = await fetch(f"{base}/proxy/metrics", headers=good)
        assert sample_value(metrics.decode(), "windows_metrics_proxy_auth_failures_total") == 5
        assert b"s3cret" not in metrics
    finally:
        await proxy.close()


class CountingCheck:
    """bcrypt.checkpw, counting its calls and how many ran at once (it runs in executor threads)."""

    def __init__(self) -> None:
        self._checkpw = bcrypt.checkpw  # the real one, even once this replaces it
        self._lock = threading.Lock()
        self.calls = 0
        self.running = 0
        self.peak = 0

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._checkpw(password, hashed)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_flood_of_wrong_passwords_runs_few_bcrypt_checks() -> None:
    """200 wrong passwords at once cost FAILURE_BURST bcrypt checks, at most BCRYPT_SLOTS at a
    time; a remembered credential passes throughout; a credential not remembered waits for the
    budget to refill (the clock is the test's, so the counts are exact)."""
    check = CountingCheck()
    now = [1000.0]
    auth = BasicAuth(
        {"prometheus": HASH.encode(), "grafana": HASH.encode()}, checkpw=check, clock=lambda: now[0]
    )
    good = basic("prometheus", "s3cret")
    assert await auth.check(good)  # remembered from now on; its token was given back
    assert check.calls == 1

    async with asyncio.timeout(30):
        results = await asyncio.gather(
            *(auth.check(basic("prometheus", f"guess {i}")) for i in range(100)),
            *(auth.check(good) for _ in range(5)),
            *(auth.check(basic(f"user{i}", "s3cret")) for i in range(100)),  # unknown users
        )
    assert results == [False] * 100 + [True] * 5 + [False] * 100
    assert check.calls == 1 + FAILURE_BURST
    assert check.peak <= BCRYPT_SLOTS

    other = basic("grafana", "s3cret")
    assert not await auth.check(other)  # right, but not remembered: refused unchecked for now
    assert check.calls == 1 + FAILURE_BURST
    now[0] += 1 / FAILURE_RATE
    assert await auth.check(other)
    assert check.calls == 2 + FAILURE_BURST


async def test_a_flood_of_wrong_passwords_through_the_proxy(
    tmp_path: Path, exporter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = CountingCheck()
    monkeypatch.setattr(bcrypt, "checkpw", check)
    proxy = await proxy_with(tmp_path, exporter, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    base = f"http://{LOOPBACK}:{proxy.port}"
    good = {"Authorization": basic("prometheus", "s3cret")}
    try:
        assert (await fetch(f"{base}/metrics", headers=good))[0] == 200
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def status(path: str, headers: dict[str, str]) -> tuple[int, float]:
                sent = time.monotonic()
                async with session.get(f"{base}{path}", headers=headers) as response:
                    await response.read()
                    return response.status, time.monotonic() - sent

            async with asyncio.timeout(30):
                flood = [
                    asyncio.create_task(status("/metrics", {"Authorization": basic("prometheus", f"g{i}")}))
                    for i in range(200)
                ]
                during = [await status("/metrics", good), await status("/health", {})]
                wrong = await asyncio.gather(*flood)
        elapsed = time.monotonic() - started
        assert [code for code, _ in wrong] == [401] * 200
        assert [code for code, _ in during] == [200, 200]
        assert max(seconds for _, seconds in during) < 2.0
        assert check.calls <= 1 + FAILURE_BURST + elapsed * FAILURE_RATE + 1
        assert check.peak <= BCRYPT_SLOTS
    finally:
        await proxy.close()


def test_the_remembered_digests_key_is_random_per_process() -> None:
    """The key is not derived from the hashes: knowing the web config file does not let anyone
    recompute (or test guesses against) the digests of remembered credentials."""
    users = {"prometheus": HASH.encode()}
    first, second = BasicAuth(users), BasicAuth(users)
    assert len(first._key) == 32
    assert first._key != second._key


async def test_health_auth_when_asked(tmp_path: Path, exporter: int) -> None:
    proxy = await proxy_with(tmp_path, exporter, f"basic_auth_users:\n  p: '{HASH}'\n", health_auth="true")
    try:
        assert (await fetch(f"http://{LOOPBACK}:{proxy.port}/health"))[0] == 401
    finally:
        await proxy.close()


# --- web config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tls_server_config:\n  cert_file: a.crt\n", "cert_file and key_file are both required"),
        ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n", "is not a readable file"),
        ("http_server_config:\n  http2: false\n", "http_server_config: not supported"),
        ("basic_auth_users:\n  u: plaintext\n", "must be a bcrypt hash"),
        # A bcrypt prefix on a truncated or mangled hash: bcrypt would raise at the first login
        # (a 500 for every request), so it is refused at start with the user named.
        ("basic_auth_users:\n  u: $2b$10$tooshort\n", r"basic_auth_users\.u: must be a bcrypt hash"),
        (
            "basic_auth_users:\n  u: $2b$99$" + "a" * 53 + "\n",
            r"basic_auth_users\.u: must be a bcrypt hash",
        ),
        ("basic_auth_users:\n  u: $2b$10$" + "!" * 53 + "\n", r"basic_auth_users\.u: must be a bcrypt hash"),
        ("tls_server_config: [1]\n", "must be a mapping"),
        ("a: [", "YAML"),
    ],
)
def test_web_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(WebConfigError, match=needle):
        parse_web_config(text, tmp_path)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("  client_auth_type: RequireAnyClientCert\n", "is not supported"),
        ("  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file: required"),
        ("  min_version: SSL3\n", "min_version"),
        ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "cipher_suites: not supported"),
    ],
)
def test_tls_config_errors(tmp_path: Path, pki: PKI, extra: str, needle: str) -> None:
    with pytest.raises(WebConfigError, match=needle):
        parse_web_config(tls_config(pki, extra), tmp_path)


async def test_a_bad_web_config_stops_the_start_with_one_line(tmp_path: Path, exporter: int) -> None:
    with pytest.raises(ConfigError) as raised:
        await proxy_with(tmp_path, exporter, "basic_auth_users:\n  u: plaintext\n")
    assert str(raised.value).startswith("PROXY_WEB_CONFIG_FILE (--web-config-file): ")
    assert "\n" not in str(raised.value)


# --- TLS and basic auth to the exporter -----------------------------------------------------------------


@pytest.fixture
async def secure_exporter(pki: PKI) -> AsyncIterator[int]:
    """A fake exporter behind TLS and basic auth, as windows_exporter with --web.config.file."""

    @web.middleware
    async def auth(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:  # type: ignore[name-defined]
        if request.headers.get("Authorization") != basic("proxy", "exporter-pass"):
            return web.Response(status=401, text="Unauthorized\n")
        return await handler(request)

    app = FakeExporter(max_concurrent=0).app()
    app.middlewares.append(auth)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=context)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def test_exporter_over_tls_with_basic_auth(tmp_path: Path, pki: PKI, secure_exporter: int) -> None:
    password = tmp_path / "password"
    password.write_text("exporter-pass\n")  # a trailing newline, as `kubectl create secret` leaves it
    proxy = await proxy_with(
        tmp_path,
        secure_exporter,
        None,
        upstream_scheme="https",
        upstream_ca_file=str(pki.ca.path),
        upstream_username="proxy",
        upstream_password_file=str(password),
    )
    try:
        status, _, body = await fetch(f"http://{LOOPBACK}:{proxy.port}/metrics")
        assert status == 200
        assert b"windows_cpu_time_total" in body
    finally:
        await proxy.close()


async def test_exporter_credentials_wrong(tmp_path: Path, pki: PKI, secure_exporter: int) -> None:
    password = tmp_path / "password"
    password.write_text("nope")
    proxy = await proxy_with(
        tmp_path,
        secure_exporter,
        None,
        upstream_scheme="https",
        upstream_ca_file=str(pki.ca.path),
        upstream_username="proxy",
        upstream_password_file=str(password),
    )
    try:
        status, _, _ = await fetch(f"http://{LOOPBACK}:{proxy.port}/metrics")
        assert status == 401  # the exporter's answer, passed through
    finally:
        await proxy.close()


async def test_exporter_certificate_not_trusted(tmp_path: Path, pki: PKI, secure_exporter: int) -> None:
    proxy = await proxy_with(tmp_path, secure_exporter, None, upstream_scheme="https")
    try:
        status, _, body = await fetch(f"http://{LOOPBACK}:{proxy.port}/metrics")
        assert status == 502
        assert b"TLS handshake" in body
        assert b"unable to get local issuer certificate" in body  # OpenSSL's verify message
        _, _, metrics = await fetch(f"http://{LOOPBACK}:{proxy.port}/proxy/metrics")
        assert (
            sample_value(
                metrics.decode(), "windows_metrics_proxy_upstream_requests_total", 'outcome="tls_error"'
            )
            == 1
        )
    finally:
        await proxy.close()
    skipping = await proxy_with(
        tmp_path, secure_exporter, None, upstream_scheme="https", upstream_insecure_skip_verify="true"
    )
    try:
        assert (await fetch(f"http://{LOOPBACK}:{skipping.port}/metrics"))[0] == 401  # TLS passed; no creds
    finally:
        await skipping.close()


def test_upstream_credentials_go_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream_username and upstream_password_file go together"):
        load_settings(hostip=LOOPBACK, upstream_username="proxy")


async def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^PROXY_UPSTREAM_PASSWORD_FILE .*cannot read"):
        await proxy_with(
            tmp_path, 9, None, upstream_username="proxy", upstream_password_file=str(tmp_path / "missing")
        )


async def test_handshake_failures_do_not_stop_the_listener(tmp_path: Path, pki: PKI, exporter: int) -> None:
    proxy = await proxy_with(tmp_path, exporter, tls_config(pki))
    try:
        for _ in range(5):
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
            await writer.drain()
            await asyncio.wait_for(reader.read(100), timeout=5)
            writer.close()
        assert (await fetch(f"https://{LOOPBACK}:{proxy.port}/health", ssl=client_context(pki)))[0] == 200
    finally:
        await proxy.close()


async def test_a_tls_handshake_that_never_comes_is_closed_after_the_header_timeout(
    tmp_path: Path, pki: PKI, exporter: int
) -> None:
    """A client that connects to the TLS port and sends nothing holds a socket and a TLS object
    before any request head exists, so the header timeout never applies to it: asyncio's own
    handshake timeout (60 s) did. The handshake now gets PROXY_HEADER_TIMEOUT too."""
    proxy = await proxy_with(tmp_path, exporter, tls_config(pki), header_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        started = time.monotonic()
        try:
            closed = await asyncio.wait_for(reader.read(100), timeout=5)
        except ConnectionResetError:
            closed = b""
        took = time.monotonic() - started
        writer.close()
        assert closed == b""  # closed by the server, nothing sent
        assert 0.4 <= took < 3, took
        assert (await fetch(f"https://{LOOPBACK}:{proxy.port}/health", ssl=client_context(pki)))[0] == 200
    finally:
        await proxy.close()
