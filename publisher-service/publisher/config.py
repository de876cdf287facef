"""Publisher configuration, read from environment variables only."""

from __future__ import annotations

import functools
import ipaddress
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

# Most partitions (docs/redis-contract.md); each one is a few keys and one
# script call per request that touches it.
MAX_PARTITIONS = 1024
REDIS_MODES = ("standalone", "cluster")


def _partitions(env: Mapping[str, str], default: int) -> int:
    value = _int(env, "PARTITIONS", default, 1)
    if value > MAX_PARTITIONS:
        raise ConfigError(f"PARTITIONS must be at most {MAX_PARTITIONS}, got {value}")
    return value


@functools.lru_cache(maxsize=64)
def is_loopback(host: str) -> bool:
    """True for a loopback name or address: localhost, 127.0.0.0/8, ::1 (brackets allowed)."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _redis_mode(env: Mapping[str, str], default: str) -> str:
    raw = env.get("REDIS_MODE", "").strip()
    if not raw:
        return default
    if raw.lower() not in REDIS_MODES:
        raise ConfigError(f"REDIS_MODE must be one of {', '.join(REDIS_MODES)}, got {raw!r}")
    return raw.lower()


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
    wait_replicas: int = 0
    wait_timeout_seconds: float = 0.5
    partitions: int = 1
    redis_mode: str = "standalone"
    # PUBLISH_OPEN: publishing without PUBLISH_TOKEN from any Host, by choice.
    publish_open: bool = False
    # HERALD_BIND: the host address compose publishes the stack on ("" = not told).
    herald_bind: str = ""
    # WEBHOOKS: the stream service keeps each channel's occupancy (compose sets it
    # with WEBHOOK_URL), so `GET /channels?occupied=true` has an index to list.
    webhooks: bool = False

    @property
    def exposed(self) -> bool:
        """Whether the stack is published on an address other hosts can reach."""
        return bool(self.herald_bind) and not is_loopback(self.herald_bind)

    @property
    def loopback_only(self) -> bool:
        """Publishing without a token is allowed from a loopback Host only."""
        return not self.publish_tokens and not self.publish_open

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        tokens = _list(env, "PUBLISH_TOKEN")
        return cls(
            redis_url=env.get("REDIS_URL", "").strip() or cls.redis_url,
            publish_tokens=tokens,
            max_batch=_int(env, "MAX_BATCH", cls.max_batch, 1),
            max_event_bytes=_int(env, "MAX_EVENT_BYTES", cls.max_event_bytes, 1),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", cls.max_body_bytes, 1),
            history_maxlen=_int(env, "HISTORY_MAXLEN", cls.history_maxlen, 1),
            history_ttl_seconds=_int(env, "HISTORY_TTL_SECONDS", cls.history_ttl_seconds, 0),
            redis_timeout_seconds=_number(env, "REDIS_TIMEOUT_SECONDS", cls.redis_timeout_seconds, 0.001),
            retry_after_seconds=_int(env, "RETRY_AFTER_SECONDS", cls.retry_after_seconds, 1),
            idempotency_window_seconds=_int(
                env, "IDEMPOTENCY_WINDOW_SECONDS", cls.idempotency_window_seconds, 1
            ),
            cors_origins=_list(env, "CORS_ALLOWED_ORIGINS"),
            wait_replicas=_int(env, "PUBLISH_WAIT_REPLICAS", cls.wait_replicas, 0),
            wait_timeout_seconds=_number(
                env, "PUBLISH_WAIT_TIMEOUT_SECONDS", cls.wait_timeout_seconds, 0.001
            ),
            partitions=_partitions(env, cls.partitions),
            redis_mode=_redis_mode(env, cls.redis_mode),
            publish_open=_flag(env, "PUBLISH_OPEN"),
            herald_bind=env.get("HERALD_BIND", "").strip(),
            webhooks=_flag(env, "WEBHOOKS"),
        )

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigError(f"PARTITIONS must be 1 to {MAX_PARTITIONS}, got {self.partitions}")
        if self.redis_mode not in REDIS_MODES:
            raise ConfigError(f"REDIS_MODE must be one of {', '.join(REDIS_MODES)}, got {self.redis_mode!r}")
        if not self.publish_tokens and not self.publish_open and self.exposed:
            raise ConfigError(
                f"HERALD_BIND={self.herald_bind} publishes Herald beyond this host, and PUBLISH_TOKEN "
                "is empty: anyone who reaches it could publish. Set PUBLISH_TOKEN (comma-separated "
                "bearer tokens), or PUBLISH_OPEN=true to publish without a token on purpose, or "
                "HERALD_BIND=127.0.0.1 to keep the stack on this host"
            )
        # WAIT's answer is read within the connection's own timeout.
        if self.wait_replicas and self.wait_timeout_seconds >= self.redis_timeout_seconds:
            raise ConfigError(
                "PUBLISH_WAIT_TIMEOUT_SECONDS must be below REDIS_TIMEOUT_SECONDS "
                f"({self.wait_timeout_seconds:g} >= {self.redis_timeout_seconds:g})"
            )
