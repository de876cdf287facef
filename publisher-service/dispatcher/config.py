"""Dispatcher settings, read from environment variables only (.env.example, "Webhooks").

Parsed by the publisher's rules (publisher/config.py); the dispatcher runs from
the publisher's image, so it reads them from there rather than keeping a copy.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from publisher.config import ConfigError, _int, _number, _partitions, _redis_mode

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks: 24 to 64 random bytes
MAX_SECRET_BYTES = 64
MAX_BATCH = 100
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True)
class Endpoint:
    """One receiver: its URL, its consumer group, and a name fit for logs and metrics."""

    url: str
    index: int

    @property
    def label(self) -> str:
        """For metrics: its position in WEBHOOK_URL (a URL may carry a credential)."""
        return str(self.index)

    @property
    def shown(self) -> str:
        """For logs: scheme, host, port and path; no user, password or query."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class Config:
    """Settings of the dispatcher; see .env.example for each one."""

    redis_url: str = "redis://localhost:6379/0"
    redis_mode: str = "standalone"
    partitions: int = 1
    redis_timeout_seconds: float = 2.0
    endpoints: tuple[Endpoint, ...] = ()
    secrets: tuple[bytes, ...] = ()
    vacated_delay_seconds: float = 5.0
    timeout_seconds: float = 10.0
    retry_seconds: float = 3600.0
    backoff_max_seconds: float = 60.0
    batch_max: int = 1
    lease_seconds: float = 30.0
    port: int = 8000

    @property
    def enabled(self) -> bool:
        """Webhooks are on: at least one endpoint."""
        return bool(self.endpoints)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        endpoints = tuple(Endpoint(url, i) for i, url in enumerate(_urls(env)))
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            redis_mode=_redis_mode(env, cls.redis_mode),
            partitions=_partitions(env, cls.partitions),
            redis_timeout_seconds=_number(env, "REDIS_TIMEOUT_SECONDS", cls.redis_timeout_seconds, 0.001),
            endpoints=endpoints,
            secrets=_secrets(env) if endpoints else (),
            vacated_delay_seconds=_number(
                env, "WEBHOOK_VACATED_DELAY_SECONDS", cls.vacated_delay_seconds, 0.0
            ),
            timeout_seconds=_number(env, "WEBHOOK_TIMEOUT_SECONDS", cls.timeout_seconds, 0.1),
            retry_seconds=_number(env, "WEBHOOK_RETRY_SECONDS", cls.retry_seconds, 0.0),
            backoff_max_seconds=_number(env, "WEBHOOK_BACKOFF_MAX_SECONDS", cls.backoff_max_seconds, 0.1),
            batch_max=_int(env, "WEBHOOK_BATCH_MAX", cls.batch_max, 1),
            lease_seconds=_number(env, "WEBHOOK_LEASE_SECONDS", cls.lease_seconds, 1.0),
            port=_int(env, "DISPATCHER_PORT", cls.port, 1),
        )

    def __post_init__(self) -> None:
        if self.batch_max > MAX_BATCH:
            raise ConfigError(f"WEBHOOK_BATCH_MAX must be at most {MAX_BATCH}, got {self.batch_max}")
        # A holder starts a POST only with more than the timeout left on its lease,
        # and renews it six times per period: the lease must cover both, with room.
        if self.lease_seconds < 2 * self.timeout_seconds + 1:
            raise ConfigError(
                f"WEBHOOK_LEASE_SECONDS ({self.lease_seconds:g}) must be at least twice "
                f"WEBHOOK_TIMEOUT_SECONDS plus 1 ({2 * self.timeout_seconds + 1:g})"
            )


def _urls(env: Mapping[str, str]) -> list[str]:
    """WEBHOOK_URL: one or more absolute http(s) URLs, separated by commas or spaces."""
    urls = env.get("WEBHOOK_URL", "").replace(",", " ").split()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"WEBHOOK_URL must hold http:// or https:// URLs with a host, got {_shown(url)!r}"
            )
        if parts.fragment:
            raise ConfigError(f"WEBHOOK_URL must not have a #fragment: {_shown(url)!r}")
    if len(set(urls)) != len(urls):
        raise ConfigError("WEBHOOK_URL lists the same URL twice")
    return urls


def _shown(url: str) -> str:
    """A URL as it may appear in an error: without what follows its host (a credential may)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/..."


def _secrets(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """WEBHOOK_SECRET: one or more `whsec_<base64>` keys (several while rotating)."""
    raw = env.get("WEBHOOK_SECRET", "").replace(",", " ").split()
    if not raw:
        raise ConfigError(
            "WEBHOOK_SECRET is required with WEBHOOK_URL, so receivers can trust what they get "
            '(make one with: echo "whsec_$(openssl rand -base64 32)")'
        )
    keys = []
    for n, secret in enumerate(raw, 1):
        body = secret.removeprefix(SECRET_PREFIX)
        try:
            if not secret.startswith(SECRET_PREFIX) or not _BASE64.match(body):
                raise ValueError
            key = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            raise ConfigError(
                f"WEBHOOK_SECRET's secret #{n} must be whsec_ followed by base64 "
                '(make one with: echo "whsec_$(openssl rand -base64 32)")'
            ) from None
        if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
            raise ConfigError(
                f"WEBHOOK_SECRET's secret #{n} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
                f"got {len(key)}"
            )
        keys.append(key)
    return tuple(keys)
