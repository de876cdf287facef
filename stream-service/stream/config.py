"""Stream service configuration, read from environment variables only."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable has a value the service cannot use."""


# --- conventions shared with the other service ---------------------------------
# Both services parse settings by these same rules (tests/unit/test_conventions.py
# fails when the two copies drift): a blank value means the default; numbers are
# decimal (what float() reads, finite); whole-number settings must be whole
# ("2.0" is 2, "1.5" is refused); durations are in seconds; lists are
# comma-separated, blanks ignored; flags are true/false.


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    """A finite decimal number of at least `minimum`; `default` when blank."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """A whole number of at least `minimum`; `default` when blank."""
    value = _number(env, name, default, minimum)
    if value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {env.get(name, '').strip()!r}")
    return int(value)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; blanks ignored."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _flag(env: Mapping[str, str], name: str) -> bool:
    """true/false (also 1/0, yes/no, on/off); false when blank."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "false", "0", "no", "off"):
        return False
    if raw in ("true", "1", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be true or false, got {env.get(name, '').strip()!r}")


# --- end of the shared conventions ----------------------------------------------


MAX_PARTITIONS = 1024
MIN_SECRET_BYTES = 32  # HS256: a shorter secret can be brute-forced from one token
REDIS_MODES = ("standalone", "cluster")


@dataclass(frozen=True)
class Config:
    """Settings of the stream service; see .env.example for each one."""

    redis_url: str = "redis://localhost:6379/0"
    max_channels_per_stream: int = 16
    retry_ms: int = 3000
    heartbeat_seconds: float = 15.0
    max_connections: int = 10000
    client_buffer_bytes: int = 262144
    client_buffer_max_bytes: int = 4194304
    client_buffer_seconds: float = 10.0
    watchdog_seconds: float = 10.0
    subscribe_timeout_seconds: float = 5.0
    redis_pool_size: int = 8
    retry_after_seconds: int = 2
    subscribe_secret: str = ""
    subscribe_audience: str = ""
    subscribe_issuer: str = ""
    private_prefix: str = "private-"
    token_cookie: str = "herald_token"
    cors_origins: tuple[str, ...] = ()
    partitions: int = 1
    redis_mode: str = "standalone"
    presence_ttl_seconds: float = 30.0
    webhooks: bool = False
    webhook_vacated_delay_seconds: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from `env` (default: the process environment).

        Each default is the field's, above; the minimums are here.
        """
        env = os.environ if env is None else env
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            max_channels_per_stream=_int(env, "MAX_CHANNELS_PER_STREAM", cls.max_channels_per_stream, 1),
            retry_ms=_int(env, "RETRY_MS", cls.retry_ms, 0),
            heartbeat_seconds=_number(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds, 0.1),
            max_connections=_int(env, "MAX_CONNECTIONS", cls.max_connections, 1),
            client_buffer_bytes=_int(env, "CLIENT_BUFFER_BYTES", cls.client_buffer_bytes, 1024),
            client_buffer_max_bytes=_int(env, "CLIENT_BUFFER_MAX_BYTES", cls.client_buffer_max_bytes, 1024),
            client_buffer_seconds=_number(env, "CLIENT_BUFFER_SECONDS", cls.client_buffer_seconds, 0.1),
            watchdog_seconds=_number(env, "WATCHDOG_SECONDS", cls.watchdog_seconds, 0.5),
            subscribe_timeout_seconds=_number(
                env, "SUBSCRIBE_TIMEOUT_SECONDS", cls.subscribe_timeout_seconds, 0.1
            ),
            redis_pool_size=_int(env, "REDIS_POOL_SIZE", cls.redis_pool_size, 1),
            retry_after_seconds=_int(env, "RETRY_AFTER_SECONDS", cls.retry_after_seconds, 1),
            # The secret is taken as it is, spaces and all.
            subscribe_secret=env.get("SUBSCRIBE_SECRET", cls.subscribe_secret),
            subscribe_audience=env.get("SUBSCRIBE_AUDIENCE", "").strip() or cls.subscribe_audience,
            subscribe_issuer=env.get("SUBSCRIBE_ISSUER", "").strip() or cls.subscribe_issuer,
            # Set but blank: no private channels at all (.env.example).
            private_prefix=env.get("PRIVATE_CHANNEL_PREFIX", cls.private_prefix),
            token_cookie=env.get("SUBSCRIBE_TOKEN_COOKIE", "").strip() or cls.token_cookie,
            cors_origins=_list(env, "CORS_ALLOWED_ORIGINS") or cls.cors_origins,
            partitions=_int(env, "PARTITIONS", cls.partitions, 1),
            redis_mode=env.get("REDIS_MODE", "").strip().lower() or cls.redis_mode,
            presence_ttl_seconds=_number(env, "PRESENCE_TTL_SECONDS", cls.presence_ttl_seconds, 3.0),
            webhooks=_flag(env, "WEBHOOKS"),
            webhook_vacated_delay_seconds=_number(
                env, "WEBHOOK_VACATED_DELAY_SECONDS", cls.webhook_vacated_delay_seconds, 0.0
            ),
        )

    def __post_init__(self) -> None:
        if self.partitions > MAX_PARTITIONS:
            raise ConfigError(f"PARTITIONS must be at most {MAX_PARTITIONS}, got {self.partitions}")
        if self.subscribe_secret and len(self.subscribe_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"SUBSCRIBE_SECRET must be at least {MIN_SECRET_BYTES} bytes, got "
                f"{len(self.subscribe_secret.encode())} (make one with: openssl rand -hex 32)"
            )
        if self.client_buffer_max_bytes < self.client_buffer_bytes:
            raise ConfigError(
                f"CLIENT_BUFFER_MAX_BYTES ({self.client_buffer_max_bytes}) must be at least "
                f"CLIENT_BUFFER_BYTES ({self.client_buffer_bytes})"
            )
        if self.redis_mode not in REDIS_MODES:
            raise ConfigError(f"REDIS_MODE must be one of {', '.join(REDIS_MODES)}, got {self.redis_mode!r}")
