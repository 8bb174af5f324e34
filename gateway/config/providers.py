"""Providers in routes.yaml: named upstreams, ${VAR} expansion, secrets kept out of sight."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.config.shaping import NO_RULES, SHAPING_KEYS, Rules, parse_rules
from gateway.config.source import LineMap, Source, check_keys, line_of, number
from gateway.families import ALL, DEFAULT_APIS
from gateway.wire.headers import never_forwarded

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("echo",)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PROVIDER_KEYS = frozenset(
    {"base_url", "api_key", "headers", "query", "timeout", "stream_usage", "max_connections",
     "apis", "auth", "forward_headers"}
) | frozenset(SHAPING_KEYS)  # fmt: skip
DEFAULT_MAX_CONNECTIONS = 1024  # open connections to one provider at once
_TIMEOUT_KEYS = frozenset({"connect", "read", "first_byte", "total"})


class Secret:
    """A value that must never be printed: its repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    read: float = 300.0
    first_byte: float | None = None
    total: float | None = None


@dataclass(frozen=True, slots=True)
class OAuth2:
    """OAuth2 client credentials (Azure Entra ID is one instance)."""

    token_url: str
    client_id: str
    client_secret: Secret = field(repr=False)
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Gcp:
    credentials: str | None = None  # a service-account JSON file; None: application default


@dataclass(frozen=True, slots=True)
class Aws:
    region: str
    service: str = "bedrock"


@dataclass(frozen=True, slots=True)
class Auth:
    """How a provider's requests are authorised (SPEC §10): exactly one is set."""

    header: str | None = None  # api_key goes in this header instead of Authorization: Bearer
    oauth2: OAuth2 | None = None
    gcp: Gcp | None = None
    aws: Aws | None = None

    @property
    def per_request(self) -> bool:
        """A token or a signature is added to each request (not a fixed header)."""
        return self.header is None


# The optional extras a credential kind needs: (module to import, extra's name).
EXTRAS = {"gcp": ("google.auth", "gcp"), "aws": ("botocore", "aws")}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    api_key: Secret | None = field(default=None, repr=False)
    # Header values often carry credentials (Azure's api-key), so they stay out of repr too.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    query: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: Timeouts = Timeouts()
    stream_usage: bool = True
    # More requests than this wait for a free connection, at most timeout.connect.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # The API families it serves (SPEC §9); the built-in echo serves them all.
    apis: frozenset[str] = DEFAULT_APIS
    auth: Auth | None = None  # None: api_key as Authorization: Bearer (SPEC §10)
    # Client headers sent to it although the header policy would not (SPEC §13), lowercase.
    forward_headers: frozenset[str] = frozenset()
    # Its shaping keys as written (SPEC §14); each entry resolves them with its own.
    rules: Rules = NO_RULES
    # The upstream speaks the Responses WebSocket mode (SPEC §14); an entry may say
    # otherwise (Target.websocket is what holds for the entry).
    websocket: bool = False

    @property
    def builtin(self) -> str | None:
        if self.base_url.startswith(BUILTIN_PREFIX):
            return self.base_url[len(BUILTIN_PREFIX) :]
        return None


def expand(value: str, missing: list[str]) -> str:
    """Replace ${VAR} and ${VAR:-default}; names of unset variables go to `missing`."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _VAR.sub(sub, value) if "${" in value else value


def _str_map(
    src: Source, parent: LineMap, key: str, missing: list[tuple[str, int]]
) -> dict[str, str]:
    value = parent[key]
    if value is None:
        return {}
    if not isinstance(value, LineMap):
        src.problem(line_of(parent, key), f"{key} must be a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            src.problem(line_of(value, name), f"{key}.{name} must be a string")
            continue
        names: list[str] = []
        out[name] = expand(str(item), names)
        missing.extend((n, line_of(value, name)) for n in names)
        if any(c in name + out[name] for c in "\r\n\0"):
            # They end up in the request head: a line break would forge headers.
            src.problem(line_of(value, name), f"{key}.{name} must not contain line breaks")
    return out


@dataclass(slots=True)
class ProviderDraft:
    provider: Provider
    missing: list[tuple[str, int]]


def parse_provider(src: Source, name: str, raw: Any, line: int) -> ProviderDraft | None:
    if not isinstance(raw, LineMap):
        src.problem(line, f"provider {name!r} must be a mapping with at least base_url")
        return None
    check_keys(src, raw, _PROVIDER_KEYS, f"provider {name!r}")
    missing: list[tuple[str, int]] = []
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url:
        src.problem(raw.line, f"provider {name!r} needs base_url (a string)")
        return None
    names: list[str] = []
    base_url = expand(base_url, names).rstrip("/")
    missing.extend((n, line_of(raw, "base_url")) for n in names)
    if base_url.startswith(BUILTIN_PREFIX):
        if base_url[len(BUILTIN_PREFIX) :] not in BUILTINS:
            src.problem(
                line_of(raw, "base_url"),
                f"unknown built-in upstream {base_url!r} (known: "
                + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                + ")",
            )
    elif not names and not base_url.startswith(("http://", "https://")):
        src.problem(
            line_of(raw, "base_url"),
            f"base_url must start with http:// or https://, got {_without_userinfo(base_url)!r}",
        )
    elif not names:
        _check_url(src, line_of(raw, "base_url"), base_url)
    api_key = None
    if raw.get("api_key") is not None:
        if not isinstance(raw["api_key"], str):
            src.problem(line_of(raw, "api_key"), "api_key must be a string")
        else:
            names = []
            api_key = Secret(expand(raw["api_key"], names))
            missing.extend((n, line_of(raw, "api_key")) for n in names)
    headers = _str_map(src, raw, "headers", missing) if "headers" in raw else {}
    query = _str_map(src, raw, "query", missing) if "query" in raw else {}
    timeout = Timeouts()
    if "timeout" in raw:
        t = raw["timeout"]
        if not isinstance(t, LineMap):
            src.problem(
                line_of(raw, "timeout"), "timeout must be a mapping like {connect: 5, read: 300}"
            )
        else:
            check_keys(src, t, _TIMEOUT_KEYS, f"provider {name!r} timeout")
            values = {k: number(src, t, k, 0.001) for k in _TIMEOUT_KEYS if k in t}
            timeout = Timeouts(**{k: float(v) for k, v in values.items() if v is not None})
    stream_usage = raw.get("stream_usage", True)
    if not isinstance(stream_usage, bool):
        src.problem(line_of(raw, "stream_usage"), "stream_usage must be true or false")
        stream_usage = True
    max_connections = DEFAULT_MAX_CONNECTIONS
    if "max_connections" in raw:
        value = number(src, raw, "max_connections", 1, integer=True)
        max_connections = DEFAULT_MAX_CONNECTIONS if value is None else int(value)
    apis = frozenset(ALL) if base_url.startswith(BUILTIN_PREFIX) else DEFAULT_APIS
    if "apis" in raw:
        value = raw["apis"]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            src.problem(line_of(raw, "apis"), "apis must be a non-empty list like [chat, messages]")
        else:
            unknown = [v for v in value if v not in ALL]
            if unknown:
                src.problem(
                    line_of(raw, "apis"),
                    f"unknown API famil{'y' if len(unknown) == 1 else 'ies'} "
                    + ", ".join(map(repr, unknown))
                    + " (known: "
                    + ", ".join(ALL)
                    + ")",
                )
            apis = frozenset(value)
    auth = _auth(src, raw, name, missing) if "auth" in raw else None
    forward = _forward_headers(src, raw, set(headers)) if "forward_headers" in raw else frozenset()
    rules = parse_rules(src, raw, f"provider {name!r}")
    if auth is not None and auth.header is not None and api_key is None:
        src.problem(line_of(raw, "auth"), f"auth.header sends api_key: provider {name!r} has none")
    if auth is not None and auth.aws is not None and rules.websocket:
        # A WebSocket upgrade is one GET whose later frames no SigV4 signature covers.
        src.problem(line_of(raw, "websocket"), f"provider {name!r}: websocket cannot be used "
                    "with aws auth (Bedrock has no Responses WebSocket mode)")  # fmt: skip
    provider = Provider(
        name=name,
        base_url=base_url,
        api_key=api_key,
        headers=MappingProxyType(headers),
        query=MappingProxyType(query),
        timeout=timeout,
        stream_usage=stream_usage,
        max_connections=max_connections,
        apis=apis,
        auth=auth,
        forward_headers=forward,
        rules=rules,
        websocket=bool(rules.websocket),
    )
    return ProviderDraft(provider, missing)


def _without_userinfo(url: str) -> str:
    """The URL for a message: whatever precedes an `@` in its authority is left out."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rpartition("@")[2]
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path


def _check_url(src: Source, line: int, url: str) -> None:
    """A base_url carries no credentials (SPEC §13: they belong in api_key or auth); the
    message never repeats them."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        src.problem(line, f"base_url is not a valid URL: {_without_userinfo(url)!r}")
        return
    if parts.password is not None or parts.username is not None:
        src.problem(line, "base_url must not carry a user or password (user:password@host): "
                    "put credentials in api_key or auth")  # fmt: skip


def _forward_headers(src: Source, raw: LineMap, own: set[str]) -> frozenset[str]:
    """`forward_headers: [name, ...]`: headers the policy holds back that this provider
    gets anyway. Credentials, hop-by-hop headers and what the provider sets itself can
    never be named (the list would not do what it says)."""
    value = raw["forward_headers"]
    line = line_of(raw, "forward_headers")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        src.problem(line, "forward_headers must be a list of header names like [openai-project]")
        return frozenset()
    names: set[str] = set()
    set_here = {name.lower() for name in own}
    for item in value:
        name = item.lower()
        if not _HEADER_NAME.fullmatch(name) or "*" in name:
            src.problem(line, f"forward_headers: {item!r} is not a header name "
                        "(names are listed exactly, without patterns)")  # fmt: skip
        elif never_forwarded(name):
            src.problem(line, f"forward_headers: {item!r} is a credential or hop-by-hop "
                        "header and is never forwarded")  # fmt: skip
        elif name in set_here:
            src.problem(line, f"forward_headers: {item!r} is set by the provider's headers")
        else:
            names.add(name)
    return frozenset(names)


_AUTH_KINDS = ("header", "oauth2", "gcp", "aws")


def _auth(src: Source, raw: LineMap, name: str, missing: list[tuple[str, int]]) -> Auth | None:
    value = raw["auth"]
    line = line_of(raw, "auth")
    where = f"provider {name!r} auth"
    if not isinstance(value, LineMap) or len(value) != 1 or next(iter(value)) not in _AUTH_KINDS:
        src.problem(line, f"{where} must be one of {{header: NAME}}, {{oauth2: {{...}}}}, "
                    "{gcp: {...}}, {aws: {region, service}}")  # fmt: skip
        return None
    kind, body = next(iter(value.items()))
    here = line_of(value, kind)
    if kind == "header":
        if not isinstance(body, str) or not _HEADER_NAME.fullmatch(body):
            src.problem(here, f"{where}.header must be a header name like api-key")
            return None
        return Auth(header=body.lower())
    if kind in EXTRAS:
        module, extra = EXTRAS[kind]
        # The module itself, not its top package: `google` may be a namespace that
        # another package (protobuf) provides without google-auth.
        if not _importable(module):
            packages = "google-auth requests" if kind == "gcp" else "botocore"
            src.problem(here, f"{where}.{kind} needs the optional extra: pip install "
                        f"{packages} (from a checkout: pip install -e '.[{extra}]')")  # fmt: skip
    if not isinstance(body, LineMap) and not (kind == "gcp" and body is None):
        src.problem(here, f"{where}.{kind} must be a mapping")
        return None
    fields = body if isinstance(body, LineMap) else LineMap()
    strings = {}
    allowed = {"oauth2": ("token_url", "client_id", "client_secret", "scope"),
               "gcp": ("credentials",), "aws": ("region", "service")}[kind]  # fmt: skip
    check_keys(src, fields, frozenset(allowed), f"{where}.{kind}")
    for key in allowed:
        item = fields.get(key)
        if item is None:
            continue
        if not isinstance(item, str):
            src.problem(line_of(fields, key), f"{where}.{kind}.{key} must be a string")
            return None
        names: list[str] = []
        strings[key] = expand(item, names)
        missing.extend((n, line_of(fields, key)) for n in names)
    if kind == "oauth2":
        need = [k for k in ("token_url", "client_id", "client_secret") if k not in strings]
        if need:
            src.problem(here, f"{where}.oauth2 needs {', '.join(need)}")
            return None
        if not strings["token_url"].startswith(("http://", "https://")) and "${" not in str(
            fields.get("token_url")
        ):
            src.problem(line_of(fields, "token_url"), f"{where}.oauth2.token_url must be a URL")
            return None
        return Auth(oauth2=OAuth2(strings["token_url"], strings["client_id"],
                                  Secret(strings["client_secret"]), strings.get("scope")))  # fmt: skip
    if kind == "gcp":
        return Auth(gcp=Gcp(strings.get("credentials")))
    if "region" not in strings:
        src.problem(here, f"{where}.aws needs region")
        return None
    return Auth(aws=Aws(strings["region"], strings.get("service", "bedrock")))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules as None (blocked)
        return False
