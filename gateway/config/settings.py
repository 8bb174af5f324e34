"""Frozen settings from the command line and the environment, built once.

Every setting is one row of OPTIONS: its field, its flag, its variable, what it allows
and its default. `from_env` reads each row from the flag (when given) or the variable,
checks it against the row, and reports every bad value as one line naming where it came
from and what is allowed, before anything is served."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024
DEFAULT_MAX_EVENT = 16 * 1024 * 1024
# Descriptors kept back from client connections: upstream connections get as many as
# clients (one each at most), plus this for files, the listening socket and logs.
RESERVED_FDS = 64
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
STATE_FAIL = ("open", "closed")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Seconds beyond which a timeout is a typo (and asyncio's timers would overflow on inf).
MAX_SECONDS = 86_400.0
# Words an operator may write meaning "memory only": not file names they meant.
_MEMORY_WORDS = frozenset({"memory", "mem", ":memory:", "in-memory", "off", "no", "false", "null"})
_BRACKETED = re.compile(r"\[([^\]]*)\](?::([^:]*))?")
_HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?")


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
    affinity_sessions: int = 100_000  # sessions pinned to an entry, least recently used dropped

    @property
    def redis(self) -> bool:
        return self.state.startswith(REDIS_SCHEMES)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


class SettingsError(ValueError):
    """Bad operator input: one line per bad value, each naming its flag or variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Invalid(ValueError):
    """Raised by a parser: `allowed` says what the setting takes; `hint` a likely fix."""

    def __init__(self, allowed: str, hint: str = "", got: str | None = None) -> None:
        super().__init__(allowed)
        self.allowed = allowed
        self.hint = hint
        self.got = got  # the bad item of a list


Parser = Callable[[object], object]


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # the Settings field
    flag: str
    var: str
    parse: Parser  # raw value (a flag's string or list, a variable's text) -> field value
    default: object
    help: str
    kind: str = "value"  # value | repeat (a repeatable flag, a comma list) | switch


def whole(low: int, high: int | None = None) -> Parser:
    allowed = (
        f"a whole number from {low} to {high}"
        if high is not None
        else f"a whole number of at least {low}"
    )

    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise Invalid(allowed)
        try:
            number = value if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            raise Invalid(allowed) from None
        if number < low or (high is not None and number > high):
            raise Invalid(allowed)
        return number

    return parse


def seconds(value: object) -> float:
    allowed = f"a number of seconds above 0 and at most {MAX_SECONDS:g}"
    try:
        number = float(str(value).strip())
    except ValueError:
        raise Invalid(allowed) from None
    if not (math.isfinite(number) and 0 < number <= MAX_SECONDS):
        raise Invalid(allowed)
    return number


def choice(*allowed: str) -> Parser:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise Invalid(f"one of {', '.join(allowed)}")
        return text

    return parse


def text(value: object) -> str:
    if not str(value).strip():
        raise Invalid("a file path")
    return str(value)


def switch(value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise Invalid("true or false (1, yes, on / 0, no, off)")


def bind_host(value: object) -> str:
    host = str(value).strip()
    if not (_is_ip(host.strip("[]")) or _HOST_NAME.fullmatch(host.lower())):
        raise Invalid("an IP address or a host name to bind (no scheme, port or path)")
    return host


def allowed_host(value: object) -> str:
    """A name a client's `Host` may carry: a host name or IP (IPv6 in brackets),
    optionally with :PORT; kept in lower case, as Host is compared."""
    raw = str(value).strip().lower()
    if ":" in raw.partition("]")[0] and _is_ip(raw):
        return f"[{raw}]"  # a bare IPv6 literal, as Host carries it
    bracketed = _BRACKETED.fullmatch(raw)
    if bracketed:
        host, port = bracketed[1], bracketed[2]
        ok = _is_ip(host) and ":" in host
    else:
        host, _, port = raw.partition(":")
        ok = ":" not in port and bool(_is_ip(host) or _HOST_NAME.fullmatch(host))
    if not ok or (port and not (port.isdigit() and int(port) <= 65535)) or raw.endswith(":"):
        raise Invalid("a host name or IP address, optionally with :PORT (no scheme or path)")
    return raw


def origin(value: object) -> str:
    """A browser origin, normalised as browsers send it (lower case, no default port)."""
    allowed = "an origin scheme://host[:port] (http or https, no path), e.g. http://localhost:3000"
    raw = str(value).strip()
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise Invalid(allowed) from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if (
        scheme not in ("http", "https")
        or not host
        or parts.username is not None
        or parts.path not in ("", "/")  # http://host/ is the origin http://host
        or parts.query
        or parts.fragment
        or "?" in raw
        or "#" in raw
        or not (_is_ip(host) or _HOST_NAME.fullmatch(host))
    ):
        raise Invalid(allowed)
    shown = f"[{host}]" if ":" in host else host
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{shown}" + (f":{port}" if port is not None and port != default else "")


def state(value: object) -> str:
    raw = str(value).strip()
    allowed = "a file path, none (memory only) or redis://HOST:PORT/DB"
    if raw.lower() in _MEMORY_WORDS or not raw:
        raise Invalid(
            allowed, f"did you mean none? (for a file of that name: ./{raw})" if raw else ""
        )
    if raw.lower() == "none":
        return "none"
    if raw.startswith(REDIS_SCHEMES):
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise Invalid(allowed) from None
        path_db = parts.path.strip("/")
        if parts.scheme == "unix":
            if not parts.path:
                raise Invalid(allowed, "unix:// needs the socket's path: unix:///run/redis.sock")
        elif not parts.hostname or (path_db and not path_db.isdigit()):
            raise Invalid(allowed)
        return raw
    if "://" in raw:
        raise Invalid(allowed)
    return str(value)


def repeat(item: Parser) -> Parser:
    """A repeated flag (a list) or a comma-separated variable, each item parsed."""

    def parse(value: object) -> tuple[object, ...]:
        items = value.split(",") if isinstance(value, str) else value
        assert isinstance(items, list | tuple)
        out = []
        for v in items:
            if str(v).strip():
                try:
                    out.append(item(v))
                except Invalid as exc:
                    raise Invalid(exc.allowed, exc.hint, str(v)) from None
        return tuple(out)

    return parse


OPTIONS: tuple[Option, ...] = (
    Option("routes_path", "--routes", "GATEWAY_ROUTES", text, "routes.yaml",
           "routes file (default ./routes.yaml)"),
    Option("keys_path", "--keys", "GATEWAY_KEYS", text, "keys.yaml",
           "keys file (default ./keys.yaml)"),
    Option("host", "--host", "GATEWAY_HOST", bind_host, "127.0.0.1",
           "address to bind (default 127.0.0.1)"),
    Option("port", "--port", "GATEWAY_PORT", whole(0, 65535), 8080, "port (default 8080)"),
    Option("workers", "--workers", "GATEWAY_WORKERS", whole(1, 1024), 1,
           "worker processes (default 1)"),
    Option("max_body_bytes", "--max-body-bytes", "GATEWAY_MAX_BODY_BYTES", whole(1),
           DEFAULT_MAX_BODY, "request body limit (default 10 MiB)"),
    Option("drain_seconds", "--drain-seconds", "GATEWAY_DRAIN_SECONDS", seconds, 30.0,
           "SIGTERM drain bound, seconds (default 30)"),
    Option("log_level", "--log-level", "GATEWAY_LOG_LEVEL", choice(*LOG_LEVELS), "info",
           f"{' | '.join(LOG_LEVELS)} (default info)"),
    Option("log_format", "--log-format", "GATEWAY_LOG_FORMAT", choice(*LOG_FORMATS), "json",
           "access log format: json (default) | text"),
    Option("max_header_bytes", "--max-header-bytes", "GATEWAY_MAX_HEADER_BYTES", whole(1),
           65536, "request line plus headers (default 65536)"),
    Option("header_timeout", "--header-timeout", "GATEWAY_HEADER_TIMEOUT", seconds, 10.0,
           "seconds for a request head to arrive (default 10)"),
    Option("body_timeout", "--body-timeout", "GATEWAY_BODY_TIMEOUT", seconds, 30.0,
           "longest pause in a request body, seconds (default 30)"),
    Option("max_connections", "--max-connections", "GATEWAY_MAX_CONNECTIONS", whole(0), 0,
           "client connections (default 0: from the open-file limit)"),
    Option("max_response_bytes", "--max-response-bytes", "GATEWAY_MAX_RESPONSE_BYTES",
           whole(1), DEFAULT_MAX_RESPONSE, "decoded upstream answer (default 64 MiB)"),
    Option("max_event_bytes", "--max-event-bytes", "GATEWAY_MAX_EVENT_BYTES", whole(1),
           DEFAULT_MAX_EVENT, "one upstream SSE event (default 16 MiB)"),
    Option("state", "--state", "GATEWAY_STATE", state, "gateway.state",
           "where keys' spend survives restarts: a file (default ./gateway.state), none "
           "(memory only), or redis://HOST:PORT/DB (shared by replicas; needs: pip install redis hiredis)"),
    Option("state_fail", "--state-fail", "GATEWAY_STATE_FAIL", choice(*STATE_FAIL), "open",
           "Redis unreachable: serve without limits (open, the default) or answer 503"),
    Option("allow_hosts", "--allow-host", "GATEWAY_ALLOW_HOSTS", repeat(allowed_host), (),
           "without keys: a Host name answered besides loopback's own (repeatable)", "repeat"),
    Option("cors_origins", "--cors-origin", "GATEWAY_CORS_ORIGINS", repeat(origin), (),
           "without keys: a browser origin served with CORS, e.g. http://localhost:3000 "
           "(repeatable)", "repeat"),
    Option("metrics_admin", "--metrics-admin", "GATEWAY_METRICS_ADMIN", switch, False,
           "/metrics needs an admin key too (when keys are configured)", "switch"),
    Option("response_ids_per_key", "--response-ids-per-key", "GATEWAY_RESPONSE_IDS_PER_KEY",
           whole(1), 10_000,
           "Responses ids remembered per key (default 10000, least recently used dropped)"),
    Option("affinity_sessions", "--affinity-sessions", "GATEWAY_AFFINITY_SESSIONS", whole(1),
           100_000, "sessions pinned to a provider entry for its prompt cache (default 100000, "
           "least recently used dropped)"),
)  # fmt: skip


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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Command-line values (overrides by field name, None = not given) win over GATEWAY_*
    variables; every value is checked against its row of OPTIONS. Raises SettingsError
    with one line per bad value."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    problems: list[str] = []
    for option in OPTIONS:
        given = overrides.get(option.name)
        if given is not None:
            raw, where = given, option.flag
        elif option.var in env:
            raw, where = env[option.var], option.var
        else:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(raw)
        except Invalid as exc:
            shown = exc.got if exc.got is not None else str(raw)
            hint = f"; {exc.hint}" if exc.hint else ""
            problems.append(f"{where} must be {exc.allowed}, got {shown!r}{hint}")
    if problems:
        raise SettingsError(problems)
    keys_explicit = overrides.get("keys_path") is not None or "GATEWAY_KEYS" in env
    return Settings(keys_explicit=keys_explicit, **values)  # type: ignore[arg-type]
