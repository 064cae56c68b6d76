"""The one HTTP client that talks to the exporter.

The target URL is fixed at startup from settings; a request can add a query string and nothing
else, so no header, path or Host trick can point the proxy at another address.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver

from proxy import __version__
from proxy.escaping import Scheme, upstream_accept
from proxy.exposition import without_protobuf
from proxy.settings import ConfigError, Settings

log = logging.getLogger("proxy.upstream")

SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"

# The only request headers the exporter gets from a scraper: format negotiation, compression,
# and the scraper's deadline. Everything else (Host, Authorization, hop-by-hop) stays behind.
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Encoding", SCRAPE_TIMEOUT_HEADER)

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones aiohttp writes itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Date",
        "Server",
    )
)


@dataclass(slots=True)
class UpstreamFailure(Exception):
    """The exporter could not be asked, or did not answer in time; `status` is what the scraper gets."""

    outcome: str
    status: int
    reason: str

    def __str__(self) -> str:
        return self.reason


def forwarded_headers(
    scraper: Mapping[str, str], *, rewriting: bool, escaping: Scheme | None = None
) -> dict[str, str]:
    """What the exporter gets from a scraper's request headers.

    When the proxy rewrites the body it must be able to read it: no protobuf, and no compression
    (decompressing costs the proxy more CPU than the bytes cost the pod network). It also asks for
    names in one escaping scheme, `escaping`, whatever the scraper's: each scraper's copy is escaped
    for it afterwards (escaping.py), so scrapers differing only in that term share a request.
    """
    headers = {h: scraper[h] for h in FORWARDED_REQUEST_HEADERS if h in scraper}
    if rewriting:
        headers.pop("Accept-Encoding", None)
        accept = without_protobuf(headers.pop("Accept", ""))
        if accept and escaping is not None:
            accept = upstream_accept(accept, escaping)
        if accept:
            headers["Accept"] = accept
    return headers


def response_headers(upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """End-to-end headers of the exporter's answer, minus hop-by-hop ones and those named in Connection."""
    named = {
        token.strip().lower()
        for value in upstream.getall("Connection", ())  # type: ignore[attr-defined]
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in upstream.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in named
    ]


def describe(exc: BaseException) -> str:
    """A short cause for logs and 502 bodies: the OS error's words rather than aiohttp's wrappers."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    seen: list[BaseException] = []
    queue: list[BaseException] = [exc]
    while queue and len(seen) < 16:
        cause = queue.pop(0)
        if cause in seen:
            continue
        seen.append(cause)
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return cause.strerror.lower()
        if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
            return os.strerror(cause.errno).lower()
        queue.extend(c for c in (cause.__cause__, cause.__context__) if c is not None)
        queue.extend(a for a in cause.args if isinstance(a, BaseException))
    for cause in seen:  # aiohttp's parser errors carry a plain-words message
        message = getattr(cause, "message", None)
        if isinstance(message, str) and message:
            return " ".join(message.split()).rstrip(".")[:200]
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def upstream_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """How an https exporter is verified: system CAs, PROXY_UPSTREAM_CA_FILE, or (opt-in) not at all."""
    if settings.upstream_scheme != "https":
        return None
    try:
        context = ssl.create_default_context(cafile=settings.upstream_ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"PROXY_UPSTREAM_CA_FILE (--upstream-ca-file): cannot load {settings.upstream_ca_file}: {reason}"
        ) from None
    if settings.upstream_insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def upstream_auth(settings: Settings) -> str | None:
    """The Authorization header for the exporter, built once from the mounted password file."""
    if settings.upstream_username is None or settings.upstream_password_file is None:
        return None
    try:
        with open(settings.upstream_password_file, encoding="utf-8") as handle:
            password = handle.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"PROXY_UPSTREAM_PASSWORD_FILE (--upstream-password-file): cannot read "
            f"{settings.upstream_password_file}: {reason}"
        ) from None
    token = base64.b64encode(f"{settings.upstream_username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _tls_reason(exc: BaseException) -> str:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc.__cause__
    reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return str(reason or describe(exc)).lower()


class Upstream:
    """A pooled keep-alive client for the configured exporter, created at startup, closed at stop."""

    def __init__(self, settings: Settings, *, resolver: AbstractResolver | None = None) -> None:
        settings.require_upstream()
        self.settings = settings
        self._ssl = upstream_ssl_context(settings)
        self._auth = upstream_auth(settings)
        self.url = settings.upstream_url
        self.health_url = f"{settings.upstream_scheme}://{settings.upstream_authority}/health"
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self.last_answer: float | None = None  # monotonic time the exporter last sent headers

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            keepalive_timeout=30,
            resolver=self._resolver,
            ssl=self._ssl if self._ssl is not None else True,
            ttl_dns_cache=10,
            family=socket.AF_UNSPEC,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding"),
            headers=self._session_headers(),
            timeout=aiohttp.ClientTimeout(total=None),
            raise_for_status=False,
            trust_env=False,
        )

    def _session_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"windows-metrics-proxy/{__version__}"}
        if self._auth is not None:
            headers["Authorization"] = self._auth
        return headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._session

    def scrape_window(self, header: str | None) -> float:
        """The scraper's timeout: its X-Prometheus-Scrape-Timeout-Seconds or the default, clamped."""
        s = self.settings
        wanted = s.scrape_timeout
        if header:
            try:
                value = float(header)
            except ValueError:
                value = 0.0
            if value > 0 and value == value:  # NaN fails the second test
                wanted = value
        return min(wanted, s.max_scrape_timeout)

    def deadline(self, header: str | None) -> float:
        """Seconds the whole upstream exchange may take: the scraper's timeout less a margin."""
        wanted = self.scrape_window(header)
        margin = self.settings.scrape_timeout_margin
        return wanted - margin if wanted > 2 * margin else wanted / 2

    def target(self, raw_query: str) -> str:
        """The configured URL plus the scraper's query string, which cannot change host or path."""
        if not raw_query:
            return self.url
        return f"{self.url}?{raw_query.replace('#', '%23')}"

    async def request(
        self, method: str, raw_query: str, headers: Mapping[str, str], deadline: float
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response headers; a failure comes back as UpstreamFailure.

        `headers` are sent as given (see `forwarded_headers`), plus the deadline header.
        """
        forwarded = dict(headers)
        # The exporter sizes its collectors' timeout from this header; give it the proxy's own
        # deadline so it gives up (and answers) before the proxy does, header or not.
        forwarded[SCRAPE_TIMEOUT_HEADER] = f"{deadline:g}"
        timeout = aiohttp.ClientTimeout(
            total=deadline, sock_connect=min(self.settings.connect_timeout, deadline)
        )
        try:
            response = await self.session.request(
                method,
                aiohttp.client.URL(self.target(raw_query), encoded=True),
                headers=forwarded,
                timeout=timeout,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectorDNSError as exc:
            raise UpstreamFailure(
                "resolve_error", 502, f"cannot resolve {self.settings.hostip}: {describe(exc)}"
            ) from exc
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError) as exc:
            raise UpstreamFailure(
                "tls_error",
                502,
                f"TLS handshake with {self.settings.upstream_authority} failed: {_tls_reason(exc)}",
            ) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamFailure(
                "connect_timeout",
                504,
                f"no connection to {self.settings.upstream_authority} within "
                f"{self.settings.connect_timeout:g}s",
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure(
                "connect_error",
                502,
                f"cannot connect to {self.settings.upstream_authority}: {describe(exc)}",
            ) from exc
        except TimeoutError as exc:
            raise UpstreamFailure("header_timeout", 504, f"no response headers within {deadline:g}s") from exc
        except (aiohttp.ClientResponseError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamFailure(
                "protocol_error", 502, f"invalid response from the exporter: {describe(exc)}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailure(
                "connect_error",
                502,
                f"request to {self.settings.upstream_authority} failed: {describe(exc)}",
            ) from exc
        self.last_answer = time.monotonic()
        return response

    async def probe(self) -> str | None:
        """Ask the exporter's /health quickly; None if it answered at all, else why not.

        Any HTTP status counts as an answer: old exporters have no /health and say 404, which
        still proves they are listening. A probe never asks for /metrics, which would run every
        collector and could take the exporter's single scrape slot.
        """
        timeout = aiohttp.ClientTimeout(total=self.settings.connect_timeout * 2)
        try:
            async with self.session.get(self.health_url, timeout=timeout) as response:
                await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"exporter at {self.settings.upstream_authority} did not answer: {describe(exc)}"
        self.last_answer = time.monotonic()
        return None


def body_failure(exc: BaseException, deadline: float) -> tuple[str, str]:
    """Outcome and reason for a body that broke off after the headers went out."""
    if isinstance(exc, asyncio.TimeoutError):
        return "body_timeout", f"body not complete within {deadline:g}s"
    # The rewriter's errors; without rules its module is never loaded, and nothing raised them.
    rewrite = sys.modules.get("proxy.rewrite")
    if rewrite is None:
        return "body_error", f"body broke off: {describe(exc)}"
    if isinstance(exc, rewrite.NamelessSeries):
        return "relabel_error", f"{exc}: Prometheus fails such a scrape, so the proxy breaks it too"
    if isinstance(exc, rewrite.LineTooLong):
        # Not body_error: nothing broke off, and the same exporter output fails every scrape
        # until it changes, which an operator should be able to tell from a flaky network.
        return "line_too_long", f"the exporter sent {exc}, more than the relabel rewriter holds"
    return "body_error", f"body broke off: {describe(exc)}"
