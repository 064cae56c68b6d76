"""The listener's TLS and basic auth, from a web config file in the Prometheus exporter-toolkit format.

Users of windows_exporter already write this file (`--web.config.file`), so the proxy reads the
same keys:

    tls_server_config:
      cert_file: /etc/tls/tls.crt
      key_file: /etc/tls/tls.key
      client_ca_file: /etc/tls/ca.crt          # optional
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...                    # bcrypt hashes

Keys it does not implement are refused rather than ignored: a security setting that silently does
nothing is worse than an error at start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version")
CLIENT_AUTH_TYPES = ("NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
# Go's crypto/tls can ask for a client certificate and not verify it; Python's ssl module cannot,
# so these two are refused with a reason instead of being weakened or strengthened silently.
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
REALM = "windows-metrics-proxy"

log = logging.getLogger("proxy.webconfig")

# bcrypt checks running at once. Each holds a thread of the loop's default executor (which
# aiohttp's resolver shares) and a core for tens to hundreds of milliseconds; on a 2-core node,
# two at a time leave the event loop and the resolver their share.
BCRYPT_SLOTS = 2
# Checks that may fail: a token bucket of FAILURE_BURST, refilled at FAILURE_RATE a second. Each
# check of a credential not remembered takes a token and a success gives it back, so a flood of
# wrong passwords costs at most FAILURE_BURST bcrypt checks at once and FAILURE_RATE a second
# after that; an attempt finding the bucket empty is answered 401 without bcrypt.
FAILURE_BURST = 10
FAILURE_RATE = 1.0
# How often the throttling is logged while it goes on.
THROTTLE_LOG_INTERVAL = 60.0
_BCRYPT_COST = re.compile(rb"^\$2[aby]\$(\d\d)\$")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(?:0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}\Z")


class WebConfigError(ValueError):
    """One line naming the key that is wrong."""


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def requires_auth(self) -> bool:
        return bool(self.users)


def _string(section: Mapping[str, Any], key: str, where: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{where}.{key}: must be a string")
    return value


def _readable(path: str, where: str, base: Path) -> str:
    resolved = (base / path) if not Path(path).is_absolute() else Path(path)
    if not resolved.is_file():
        raise WebConfigError(f"{where}: {resolved} is not a readable file")
    return str(resolved)


def parse_web_config(text: str, base: Path) -> WebConfig:
    """The listener settings; relative file names are read relative to `base`, the file's folder."""
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(f"YAML: {str(exc).splitlines()[0]}") from None
    if document is None:
        return WebConfig()
    if not isinstance(document, Mapping):
        raise WebConfigError("the document must be a mapping")
    for key in document:
        if key not in ("tls_server_config", "basic_auth_users"):
            raise WebConfigError(f"{key}: not supported by windows-metrics-proxy")
    context = _tls(document.get("tls_server_config"), base)
    users = _users(document.get("basic_auth_users"))
    return WebConfig(ssl_context=context, users=users)


def _tls(section: Any, base: Path) -> ssl.SSLContext | None:
    where = "tls_server_config"
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise WebConfigError(f"{where}: must be a mapping")
    for key in section:
        if key not in TLS_KEYS:
            raise WebConfigError(f"{where}.{key}: not supported by windows-metrics-proxy")
    cert = _string(section, "cert_file", where)
    key = _string(section, "key_file", where)
    if cert is None or key is None:
        raise WebConfigError(f"{where}: cert_file and key_file are both required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            _readable(cert, f"{where}.cert_file", base), _readable(key, f"{where}.key_file", base)
        )
    except ssl.SSLError as exc:
        raise WebConfigError(
            f"{where}.cert_file: cannot load the certificate and key: {exc.reason}"
        ) from None
    for bound in ("min_version", "max_version"):
        name = _string(section, bound, where)
        if name is None:
            continue
        if name not in TLS_VERSIONS:
            raise WebConfigError(f"{where}.{bound}: {name!r} is not one of {', '.join(TLS_VERSIONS)}")
        setattr(
            context, "minimum_version" if bound == "min_version" else "maximum_version", TLS_VERSIONS[name]
        )
    if _string(section, "min_version", where) is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default

    auth = _string(section, "client_auth_type", where) or "NoClientCert"
    ca = _string(section, "client_ca_file", where)
    if auth in UNSUPPORTED_CLIENT_AUTH:
        raise WebConfigError(
            f"{where}.client_auth_type: {auth} (accept a client certificate without verifying it) is not "
            "supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file"
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f"{where}.client_auth_type: {auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}"
        )
    if auth != "NoClientCert":
        if ca is None:
            raise WebConfigError(f"{where}.client_ca_file: required with client_auth_type {auth}")
        try:
            context.load_verify_locations(cafile=_readable(ca, f"{where}.client_ca_file", base))
        except ssl.SSLError as exc:
            raise WebConfigError(f"{where}.client_ca_file: cannot load it: {exc.reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED if auth == "RequireAndVerifyClientCert" else ssl.CERT_OPTIONAL
    elif ca is not None:
        raise WebConfigError(f"{where}.client_ca_file: set, but client_auth_type is NoClientCert")
    return context


def _users(section: Any) -> dict[str, bytes]:
    where = "basic_auth_users"
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise WebConfigError(f"{where}: must be a mapping of user names to bcrypt hashes")
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"{where}: {user!r} is not a valid user name")
        # The whole form, not only the prefix: a truncated or mangled hash makes bcrypt raise at
        # the first login, which would answer every request 500 instead of stopping at start.
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(
                f"{where}.{user}: must be a bcrypt hash ($2a$, $2b$ or $2y$, a cost from 04 to 31, "
                "then 53 characters of [./A-Za-z0-9])"
            )
        users[user] = hashed.encode()
    return users


def load_web_config(path: str) -> WebConfig:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WebConfigError(f"cannot read {path}: {reason}") from None
    return parse_web_config(text, file.parent)


class FailureBudget:
    """A token bucket: how many bcrypt checks may still fail before the next is refused unchecked.

    Reserving before the check, rather than counting failures after it, is what bounds a flood:
    200 wrong passwords arriving at once find FAILURE_BURST tokens, not 200.
    """

    def __init__(self, burst: int, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def refund(self) -> None:
        """The check passed: it was no failure."""
        self._tokens = min(float(self.burst), self._tokens + 1.0)


class BasicAuth:
    """Checks `Authorization: Basic` against the bcrypt hashes.

    bcrypt is slow on purpose (tens to hundreds of milliseconds), so checks run off the event loop,
    and a credential that passed is remembered (by a digest keyed with a random per-process key,
    never the password itself) so a scraper pays it once, not every scrape. An unknown user costs a
    bcrypt check too, at the cost of the costliest configured hash, so timing does not tell which
    user names exist.

    A flood of wrong passwords must not take the node's CPU or the default executor's threads
    (aiohttp resolves names there): at most `slots` checks run at once, and a check of a credential
    not remembered needs a token of the FailureBudget; without one it fails at once, unchecked.
    So during a flood, scrapers whose credentials are remembered pass as fast as ever; one whose
    credentials are not (the proxy restarted, or the password changed) gets 401 until the flood
    eases, like every other guess. The answer to a throttled attempt is the 401 of a wrong
    password: a guesser cannot tell which of its guesses were checked.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        remember: int = 64,
        *,
        checkpw: Callable[[bytes, bytes], bool] | None = None,
        slots: int = BCRYPT_SLOTS,
        failure_burst: int = FAILURE_BURST,
        failure_rate: float = FAILURE_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._checkpw = checkpw  # None: bcrypt.checkpw, looked up at each call
        self._users = dict(users)
        self._passed: OrderedDict[bytes, None] = OrderedDict()
        self._remember = remember
        # Random, so the remembered digests say nothing outside this process (a key derived from
        # the hashes could be recomputed by anyone who has read the web config file).
        self._key = os.urandom(32)
        self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=_dummy_cost(self._users)))
        self._slots = asyncio.Semaphore(slots)
        self._budget = FailureBudget(failure_burst, failure_rate, clock)
        self._clock = clock
        self._throttled = 0  # attempts refused unchecked since the last warning
        self._warned_at: float | None = None

    async def check(self, header: str | None) -> bool:
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if token in self._passed:
            self._passed.move_to_end(token)
            return True
        if not self._budget.take():
            self._note_throttled()
            return False
        hashed = self._users.get(user)
        checkpw = self._checkpw or self._bcrypt.checkpw
        async with self._slots:
            ok = await asyncio.get_running_loop().run_in_executor(
                None, checkpw, password.encode(), hashed if hashed is not None else self._dummy
            )
        if ok and hashed is not None:
            self._budget.refund()
            self._passed[token] = None
            if len(self._passed) > self._remember:
                self._passed.popitem(last=False)
            return True
        return False

    def _note_throttled(self) -> None:
        """One warning when throttling starts, then one per THROTTLE_LOG_INTERVAL while it goes on:
        a flood must not fill the log either."""
        self._throttled += 1
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < THROTTLE_LOG_INTERVAL:
            return
        log.warning(
            "basic auth: too many failed logins; credentials not already accepted get 401 unchecked",
            extra={
                "fields": {
                    "refused_unchecked": self._throttled,
                    "failure_burst": self._budget.burst,
                    "failures_per_second": self._budget.per_second,
                }
            },
        )
        self._warned_at = now
        self._throttled = 0


def _dummy_cost(users: Mapping[str, bytes]) -> int:
    """The cost of the costliest configured hash (10 if none is readable), for the unknown user's
    check: a cheaper dummy would answer unknown names measurably faster."""
    costs = [int(m.group(1)) for hashed in users.values() if (m := _BCRYPT_COST.match(hashed))]
    return max(4, min(31, max(costs, default=10)))


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
