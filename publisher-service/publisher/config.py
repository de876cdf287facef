"""Publisher configuration, read from environment variables only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable has a value the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; blanks ignored."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Config:
    """Settings of the publisher; see .env.example for each one."""

    redis_url: str = "redis://localhost:6379/0"
    publish_tokens: tuple[str, ...] = ()
    max_batch: int = 100
    max_event_bytes: int = 65536
    max_body_bytes: int = 1048576
    history_maxlen: int = 1000
    history_ttl_seconds: int = 604800
    redis_timeout_seconds: float = 2.0
    retry_after_seconds: int = 2
    idempotency_window_seconds: int = 86400
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        tokens = _list(env, "PUBLISH_TOKEN")
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            publish_tokens=tokens,
            max_batch=_int(env, "MAX_BATCH", cls.max_batch),
            max_event_bytes=_int(env, "MAX_EVENT_BYTES", cls.max_event_bytes),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes),
            history_maxlen=_int(env, "HISTORY_MAXLEN", cls.history_maxlen),
            history_ttl_seconds=_int(env, "HISTORY_TTL_SECONDS", cls.history_ttl_seconds, minimum=0),
            redis_timeout_seconds=_int(env, "REDIS_TIMEOUT_MS", 2000) / 1000,
            retry_after_seconds=_int(env, "RETRY_AFTER_SECONDS", cls.retry_after_seconds),
            idempotency_window_seconds=_int(
                env, "IDEMPOTENCY_WINDOW_SECONDS", cls.idempotency_window_seconds
            ),
            cors_origins=_list(env, "CORS_ALLOWED_ORIGINS"),
        )
