"""The proxy's configuration: one object, read once, from `PROXY_*` variables and CLI flags.

The variable names are the nginx image's (`PROXY_HOSTIP`, `PROXY_PORT`), so an existing
DaemonSet keeps working when only its image changes. Every setting is also a CLI flag; a flag
wins over the environment.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PROXY_"

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class ConfigError(Exception):
    """A setting is wrong; the message is one line that names it, fit to print as-is."""


def _check_host(value: str) -> str:
    """Accept an IP literal or a DNS name, and nothing that could smuggle a path or port in."""
    candidate = value.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    name = candidate.rstrip(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError(f"must be an IPv4 or IPv6 address or a DNS name, got {value!r}")
    return name


class Settings(BaseSettings):
    """Everything the proxy needs to know; the CLI builds it once and passes it down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    hostip: str | None = Field(
        default=None,
        description="Upstream host: the node IP (status.hostIP) or a DNS name. Required to serve.",
    )
    port: int = Field(
        default=9182,
        ge=1,
        le=65535,
        description="Upstream exporter port (windows_exporter 9182; AKS built-in 19182).",
    )
    listen_address: str = Field(
        default="0.0.0.0",
        description="Address to listen on; '::' for dual stack.",
    )
    listen_port: int = Field(default=9100, ge=0, le=65535, description="Port to listen on.")
    upstream_path: str = Field(default="/metrics", description="Exporter metrics path.")
    upstream_scheme: Literal["http", "https"] = Field(default="http", description="Exporter scheme.")
    connect_timeout: float = Field(
        default=2.0, gt=0, description="Seconds to open a connection to the exporter."
    )
    scrape_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a scrape may take when the scraper sends no "
        "X-Prometheus-Scrape-Timeout-Seconds.",
    )
    max_scrape_timeout: float = Field(default=60.0, gt=0, description="Upper bound for any scrape deadline.")
    scrape_timeout_margin: float = Field(
        default=0.25,
        ge=0,
        description="Seconds kept back from the scraper's timeout so the proxy answers "
        "before the scraper gives up.",
    )
    coalesce: bool = Field(
        default=True, description="Share one upstream request among concurrent identical scrapes."
    )
    coalesce_buffer_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=0,
        description="Bytes of a response kept so a late scrape can join; past it, late "
        "scrapes go upstream on their own.",
    )
    ready_max_age: float = Field(
        default=120.0,
        gt=0,
        description="/ready is 200 without a probe if the exporter answered within this many seconds.",
    )
    shutdown_timeout: float = Field(
        default=4.0,
        ge=0,
        description="Seconds a stop lets in-flight scrapes finish before it aborts them; the whole "
        "stop takes at most this plus 0.5 s (Windows kills after ~5 s).",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        description="Client connections served at once; more are answered 503 and closed.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a complete request head, and to finish a TLS "
        "handshake (stops slowloris).",
    )
    web_config_file: str | None = Field(
        default=None,
        description="Listener TLS and basic auth, in the exporter-toolkit web config format.",
    )
    health_auth: bool = Field(
        default=False,
        description="Require basic auth on /health too (by default probes reach it without).",
    )
    upstream_ca_file: str | None = Field(
        default=None, description="CA bundle to verify an https exporter with (default: system CAs)."
    )
    upstream_username: str | None = Field(
        default=None, description="Basic auth user for an exporter run with --web.config.file."
    )
    upstream_password_file: str | None = Field(
        default=None, description="File holding that user's password (a mounted Secret)."
    )
    upstream_insecure_skip_verify: bool = Field(
        default=False, description="Do not verify the https exporter's certificate (opt-in, unsafe)."
    )
    relabel_config: str | None = Field(
        default=None,
        description="Path of a YAML file with metric_relabel_configs: applied to every sample.",
    )
    keep: str | None = Field(
        default=None, description="Shorthand: keep only metrics whose name matches this regex."
    )
    drop: str | None = Field(
        default=None, description="Shorthand: drop metrics whose name matches this regex."
    )
    relabel_expand_env: bool = Field(
        default=False, description="Expand ${VAR} in the relabel file from the environment."
    )
    name_validation: Literal["utf8", "legacy"] = Field(
        default="utf8",
        description="How relabel rules' label names are validated: 'utf8' as Prometheus 3 does by "
        "default, or 'legacy' as Prometheus 2.x (and 3.x with metric_name_validation_scheme: legacy).",
    )
    collector_pushdown: bool = Field(
        default=True,
        description="With rules set and no collect[] in the scrape, ask the exporter only for the "
        "collectors whose series the rules can keep (the output is the same).",
    )
    collector_refresh: float = Field(
        default=300.0,
        gt=0,
        description="Seconds between the full scrapes that re-learn the exporter's collectors for "
        "push-down (a restarted exporter is re-learned at once).",
    )
    relabel_cache_size: int = Field(
        default=50_000,
        ge=1,
        description="Series whose relabel outcome is remembered (an LRU keyed on the series text).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    access_log: bool = Field(default=False, description="Log every request.")

    @field_validator("hostip", mode="before")
    @classmethod
    def _validate_hostip(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return _check_host(str(value))

    @field_validator(
        "relabel_config",
        "keep",
        "drop",
        "web_config_file",
        "upstream_ca_file",
        "upstream_username",
        "upstream_password_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value == "" else value

    @field_validator("listen_address", mode="before")
    @classmethod
    def _validate_listen_address(cls, value: Any) -> Any:
        return _check_host(str(value))

    @field_validator("upstream_path")
    @classmethod
    def _validate_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in "?# \t\r\n"):
            raise ValueError(f"must be an absolute path without query or spaces, got {value!r}")
        return value

    @field_validator("log_level", "log_format", "upstream_scheme", "name_validation", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_upstream_auth(self) -> Settings:
        if (self.upstream_username is None) != (self.upstream_password_file is None):
            raise ValueError(
                "upstream_password_file: upstream_username and upstream_password_file go together"
            )
        return self

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.scrape_timeout > self.max_scrape_timeout:
            raise ValueError(
                "scrape_timeout: must not exceed max_scrape_timeout "
                f"({self.scrape_timeout} > {self.max_scrape_timeout})"
            )
        return self

    @property
    def upstream_authority(self) -> str:
        """host:port as it goes in a URL, with IPv6 literals bracketed."""
        host = self.hostip or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def upstream_url(self) -> str:
        return f"{self.upstream_scheme}://{self.upstream_authority}{self.upstream_path}"

    @property
    def has_rules(self) -> bool:
        """Whether any relabel rule is configured (the rewriter and its modules are needed)."""
        return bool(self.relabel_config or self.keep or self.drop)

    def require_upstream(self) -> None:
        """Serving needs an upstream; the subcommands that don't (fake-exporter) skip this."""
        if not self.hostip:
            raise ConfigError(
                f"{ENV_PREFIX}HOSTIP (--hostip): required, the exporter's host "
                "(in Kubernetes, the node IP from status.hostIP)"
            )


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _one_line(error: ValidationError, overrides: dict[str, Any]) -> str:
    """Turn pydantic's multi-line report into one line that names the setting as the user set it."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc and ":" in message:
        # A model-level check names its own field first: "field: message".
        field, _, message = message.partition(":")
        loc = [field.strip()]
        message = message.strip()
    if not loc:
        return f"invalid configuration: {message}"
    field = loc[0]
    where = flag_name(field) if field in overrides else env_name(field)
    other = env_name(field) if field in overrides else flag_name(field)
    value = first.get("input")
    shown = "" if value is None or isinstance(value, dict) or "got" in message else f", got {value!r}"
    return f"{where} ({other}): {message}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, apply CLI overrides, and fail with a one-line ConfigError."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        raise ConfigError(_one_line(error, given)) from None
    except Exception as error:  # pydantic-settings' own SettingsError, e.g. an unparsable env value
        raise ConfigError(f"invalid configuration: {error}") from None
