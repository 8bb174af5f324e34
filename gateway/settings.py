"""Frozen settings from the command line and the environment, built once."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024
DEFAULT_MAX_EVENT = 16 * 1024 * 1024
# Descriptors kept back from client connections: upstream connections get as many as
# clients (one each at most), plus this for files, the listening socket and logs.
RESERVED_FDS = 64


@dataclass(frozen=True, slots=True)
class Settings:
    routes_path: str = "routes.yaml"
    keys_path: str = "keys.yaml"
    keys_explicit: bool = False  # a named keys file must exist; the default one may not
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY
    drain_seconds: float = 30.0
    log_level: str = "info"
    log_format: str = "json"  # access log: json | text
    reload_interval: float = 1.0  # seconds between checks of the files; 0 turns it off
    # What a hostile peer may make the gateway hold or wait for (SPEC §7).
    max_header_bytes: int = 65536
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 0  # 0: from the open-file limit (default_max_connections)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE
    max_event_bytes: int = DEFAULT_MAX_EVENT
    # Where spend survives restarts (SPEC §11): a file, or "none" (memory only). The CLI
    # defaults to ./gateway.state; an app built in-process (tests, embedding) to none.
    state: str = "none"
    # With Redis (`state: redis://...`) unreachable: "open" serves without limits (each
    # such request counted and logged), "closed" answers 503.
    state_fail: str = "open"
    # The loopback sidecar without keys (SPEC §13): Host names it answers besides its
    # own address, and browser origins it serves with CORS.
    allow_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    metrics_admin: bool = False  # /metrics needs an admin key too (when keys exist)
    response_ids_per_key: int = 10_000  # each key's share of the Responses id map

    @property
    def redis(self) -> bool:
        return self.state.startswith(("redis://", "rediss://", "unix://"))

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def default_max_connections() -> int:
    """Client connections the open-file limit leaves room for: each may need one
    upstream connection too, and RESERVED_FDS stay for everything else."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - RESERVED_FDS) // 2)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Command-line values (overrides, None = not given) win over GATEWAY_* variables."""
    env = os.environ if env is None else env
    given = {k: v for k, v in overrides.items() if v is not None}

    def pick(name: str, var: str, default: object) -> object:
        if name in given:
            return given[name]
        return env.get(var, default)

    keys_explicit = "keys_path" in given or "GATEWAY_KEYS" in env
    return Settings(
        routes_path=str(pick("routes_path", "GATEWAY_ROUTES", "routes.yaml")),
        keys_path=str(pick("keys_path", "GATEWAY_KEYS", "keys.yaml")),
        keys_explicit=keys_explicit,
        host=str(pick("host", "GATEWAY_HOST", "127.0.0.1")),
        port=int(str(pick("port", "GATEWAY_PORT", 8080))),
        workers=int(str(pick("workers", "GATEWAY_WORKERS", 1))),
        max_body_bytes=int(str(pick("max_body_bytes", "GATEWAY_MAX_BODY_BYTES", DEFAULT_MAX_BODY))),
        drain_seconds=float(str(pick("drain_seconds", "GATEWAY_DRAIN_SECONDS", 30))),
        log_level=str(pick("log_level", "GATEWAY_LOG_LEVEL", "info")),
        log_format=str(pick("log_format", "GATEWAY_LOG_FORMAT", "json")),
        max_header_bytes=int(str(pick("max_header_bytes", "GATEWAY_MAX_HEADER_BYTES", 65536))),
        header_timeout=float(str(pick("header_timeout", "GATEWAY_HEADER_TIMEOUT", 10))),
        body_timeout=float(str(pick("body_timeout", "GATEWAY_BODY_TIMEOUT", 30))),
        max_connections=int(str(pick("max_connections", "GATEWAY_MAX_CONNECTIONS", 0))),
        max_response_bytes=int(
            str(pick("max_response_bytes", "GATEWAY_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE))
        ),
        max_event_bytes=int(
            str(pick("max_event_bytes", "GATEWAY_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT))
        ),
        state=str(pick("state", "GATEWAY_STATE", "gateway.state")),
        state_fail=_choice(pick("state_fail", "GATEWAY_STATE_FAIL", "open"), ("open", "closed")),
        allow_hosts=_list(pick("allow_hosts", "GATEWAY_ALLOW_HOSTS", ())),
        cors_origins=_list(pick("cors_origins", "GATEWAY_CORS_ORIGINS", ())),
        metrics_admin=_flag(pick("metrics_admin", "GATEWAY_METRICS_ADMIN", False)),
        response_ids_per_key=int(
            str(pick("response_ids_per_key", "GATEWAY_RESPONSE_IDS_PER_KEY", 10_000))
        ),
    )


def _list(value: object) -> tuple[str, ...]:
    """A repeated flag (a list) or a comma-separated variable."""
    if isinstance(value, str):
        value = value.split(",")
    assert isinstance(value, list | tuple)
    return tuple(str(v).strip() for v in value if str(v).strip())


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _choice(value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)
