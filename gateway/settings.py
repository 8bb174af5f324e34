"""Frozen settings from the command line and the environment, built once."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_BODY = 10 * 1024 * 1024


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

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


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
    )
