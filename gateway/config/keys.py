"""keys.yaml -> frozen Keys; `keys new` appends an entry without rewriting the file."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.config.source import LineList, LineMap, Source, check_keys, line_of
from gateway.config.yamlsrc import parse_yaml

SECRET_PREFIX = "sk-gw-"
_KEY_FIELDS = frozenset(
    {"name", "sha256", "key", "models", "rpm", "tpm", "token_quota", "expires", "disabled",
     "budget", "admin", "count_tokens_rpm"}
)  # fmt: skip
PERIODS = ("day", "month", "total")  # UTC calendar (SPEC §11)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the secret
    models: tuple[str, ...] | None = None  # allow-list globs; None: every slug
    rpm: int | None = None
    tpm: int | None = None
    token_quota: int | None = None
    expires: datetime | None = None  # first instant at which the key is no longer valid
    disabled: bool = False
    quota_period: str = "total"  # the token_quota's period
    budget_usd: float | None = None
    budget_period: str = "total"
    admin: bool = False  # may open the console (SPEC §12)
    # Anthropic's count_tokens calls: their own limit, apart from rpm (SPEC §13).
    count_tokens_rpm: int = 600

    def allows(self, slug: str) -> bool:
        if self.models is None:
            return True
        return any(fnmatchcase(slug, glob) for glob in self.models)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


@dataclass(frozen=True, slots=True)
class Keys:
    entries: tuple[Key, ...] = ()
    by_digest: Mapping[bytes, Key] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def open(self) -> bool:
        """No keys configured: every request is let in (loopback only)."""
        return not self.entries


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _parse_expires(src: Source, raw: LineMap) -> datetime | None:
    value = raw["expires"]
    try:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, date):
            # A date means "valid through that day, UTC".
            return datetime(value.year, value.month, value.day, tzinfo=UTC) + timedelta(days=1)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if len(value) == 10:
                return parsed.replace(tzinfo=UTC) + timedelta(days=1)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except OverflowError:  # "valid through 9999-12-31" ends on a day Python cannot hold
        src.problem(line_of(raw, "expires"), "expires must be 9999-12-30 or earlier")
        return None
    except ValueError:  # 2027-13-01 and the like: YAML leaves them as text
        pass
    src.problem(
        line_of(raw, "expires"),
        f"expires must be a date (2027-01-01) or ISO timestamp, got {_shown(value)}",
    )
    return None


def _shown(value: object) -> str:
    """A YAML value as the operator wrote it, near enough (dates as dates)."""
    return repr(value.isoformat() if isinstance(value, date) else value)


def _positive_int(src: Source, raw: LineMap, key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        src.problem(line_of(raw, key), f"{key} must be a whole number of at least 1, got {value!r}")
        return None
    return value


def _parse_key(src: Source, raw: Any, line: int) -> Key | None:
    if not isinstance(raw, LineMap):
        src.problem(line, "each key must be a mapping with name: and sha256: (or key:)")
        return None
    check_keys(src, raw, _KEY_FIELDS, "a key entry")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        src.problem(raw.line, "key entry needs name: (a non-empty string)")
        name = None
    digest: bytes | None = None
    if "sha256" in raw and "key" in raw:
        src.problem(raw.line, f"key {name!r} has both sha256: and key:; keep one")
    elif "sha256" in raw:
        hexed = str(raw["sha256"])
        if not _HEX64.fullmatch(hexed):
            src.problem(line_of(raw, "sha256"), "sha256 must be 64 hexadecimal characters")
        else:
            digest = bytes.fromhex(hexed)
    elif "key" in raw:
        if not isinstance(raw["key"], str) or not raw["key"]:
            src.problem(line_of(raw, "key"), "key must be a non-empty string")
        else:
            digest = digest_of(raw["key"])
    else:
        src.problem(raw.line, f"key {name!r} needs sha256: (or key: for development)")
    models: tuple[str, ...] | None = None
    if raw.get("models") is not None:
        value = raw["models"]
        if not isinstance(value, LineList) or not all(isinstance(m, str) for m in value):
            src.problem(line_of(raw, "models"), "models must be a list of slugs or globs")
        else:
            models = tuple(value)
    expires = _parse_expires(src, raw) if raw.get("expires") is not None else None
    disabled = raw.get("disabled", False)
    if not isinstance(disabled, bool):
        src.problem(line_of(raw, "disabled"), "disabled must be true or false")
        disabled = False
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        src.problem(line_of(raw, "admin"), "admin must be true or false")
        admin = False
    rpm, tpm = _positive_int(src, raw, "rpm"), _positive_int(src, raw, "tpm")
    count_rpm = _positive_int(src, raw, "count_tokens_rpm") or 600
    quota, quota_period = _quota(src, raw)
    budget, budget_period = _budget(src, raw)
    if name is None or digest is None:
        return None
    return Key(
        name=name, digest=digest, models=models, expires=expires, disabled=disabled,
        token_quota=quota, quota_period=quota_period, budget_usd=budget,
        budget_period=budget_period, admin=admin, count_tokens_rpm=count_rpm, rpm=rpm, tpm=tpm,
    )  # fmt: skip


def _period(src: Source, holder: LineMap, where: str) -> str:
    period = holder.get("period", "total")
    if period not in PERIODS:
        src.problem(
            line_of(holder, "period"), f"{where}.period must be one of {', '.join(PERIODS)}"
        )
        return "total"
    return str(period)


def _quota(src: Source, raw: LineMap) -> tuple[int | None, str]:
    """token_quota: a bare number (the whole life of the key) or {tokens, period}."""
    value = raw.get("token_quota")
    if not isinstance(value, LineMap):
        return _positive_int(src, raw, "token_quota"), "total"
    check_keys(src, value, frozenset({"tokens", "period"}), "token_quota")
    if "tokens" not in value:
        src.problem(line_of(raw, "token_quota"), "token_quota needs tokens")
        return None, "total"
    return _positive_int(src, value, "tokens"), _period(src, value, "token_quota")


def _budget(src: Source, raw: LineMap) -> tuple[float | None, str]:
    value = raw.get("budget")
    if value is None:
        return None, "total"
    if not isinstance(value, LineMap) or "usd" not in value:
        src.problem(
            line_of(raw, "budget"), "budget must be a mapping like {usd: 50, period: month}"
        )
        return None, "total"
    check_keys(src, value, frozenset({"usd", "period"}), "budget")
    usd = value["usd"]
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not 0 < usd < math.inf:
        src.problem(line_of(value, "usd"), "budget.usd must be a positive number of dollars")
        return None, "total"
    return float(usd), _period(src, value, "budget")


def parse_keys(data: Any, src: Source) -> Keys:
    if data is None:
        return Keys()
    if not isinstance(data, LineMap):
        src.problem(getattr(data, "line", 1), "keys file must be a mapping with keys: [...]")
        return Keys()
    check_keys(src, data, frozenset({"keys"}), "the keys file")
    items = data.get("keys")
    if items is None:
        return Keys()
    if not isinstance(items, LineList):
        src.problem(line_of(data, "keys"), "keys must be a list")
        return Keys()
    entries: list[Key] = []
    names: set[str] = set()
    digests: dict[bytes, Key] = {}
    for i, raw in enumerate(items):
        key = _parse_key(src, raw, items.lines[i])  # line_of(items, i): i is in range
        if key is None:
            continue
        if key.name in names:
            src.problem(line_of(items, i), f"key name {key.name!r} is used twice")
        if key.digest in digests:
            src.problem(
                line_of(items, i),
                f"key {key.name!r} has the same secret as {digests[key.digest].name!r}",
            )
        names.add(key.name)
        digests[key.digest] = key
        entries.append(key)
    return Keys(tuple(entries), MappingProxyType(digests))


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def append_key(path: Path, name: str, secret: str) -> None:
    """Add a key entry at the end of the file, leaving every existing line as it was.

    Raises ValueError with a message meant for the operator when that cannot be done safely.
    """
    check_name(name)
    entry_fields = [
        f"name: {_quote(name)}",
        f'sha256: "{hashlib.sha256(secret.encode()).hexdigest()}"',
    ]
    if not path.exists():
        path.write_text("keys:\n" + _entry(entry_fields, 2), encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    src = Source(str(path))
    data = parse_yaml(text, src)
    keys = parse_keys(data, src)
    if src.problems:
        raise ValueError("\n".join(str(p) for p in src.problems))
    if any(k.name == name for k in keys.entries):
        raise ValueError(f"{path}: a key named {name!r} already exists")
    prefix = text if text.endswith("\n") or not text else text + "\n"
    if data is None:
        path.write_text(prefix + "keys:\n" + _entry(entry_fields, 2), encoding="utf-8")
        return
    items = data.get("keys")
    if items is None and "keys" not in data:
        path.write_text(prefix + "keys:\n" + _entry(entry_fields, 2), encoding="utf-8")
        return
    lines = text.splitlines(keepends=True)
    last_top = max(data.lines.values())
    if data.lines["keys"] != last_top:
        raise ValueError(f"{path}: keys: is not the last section; add the entry by hand")
    if items is None or (isinstance(items, LineList) and not items):
        # `keys:` or `keys: []` on its line: that one line becomes `keys:`.
        index = data.lines["keys"] - 1
        if isinstance(items, LineList) and lines[index].split("#")[0].strip() != "keys: []":
            raise ValueError(f"{path}: cannot append to this keys: list; add the entry by hand")
        lines[index] = "keys:\n"
        path.write_text(
            "".join(lines)
            + ("" if "".join(lines).endswith("\n") else "\n")
            + _entry(entry_fields, 2),
            encoding="utf-8",
        )
        return
    first = items.lines[0] - 1
    indent = len(lines[first]) - len(lines[first].lstrip(" "))
    if not lines[first].lstrip(" ").startswith("-"):
        raise ValueError(f"{path}: keys: is written in flow style; add the entry by hand")
    path.write_text(prefix + _entry(entry_fields, indent), encoding="utf-8")


def _entry(fields: list[str], indent: int) -> str:
    pad = " " * indent
    return f"{pad}- {fields[0]}\n" + "".join(f"{pad}  {f}\n" for f in fields[1:])


def check_name(name: str) -> None:
    """A key name `keys new` can write: text with no control characters (a newline
    would end the YAML line; a name is shown in logs, metrics and the console)."""
    if not name:
        raise ValueError("a key name must not be empty")
    for i, ch in enumerate(name):
        if unicodedata.category(ch) == "Cs":  # bytes the terminal's encoding could not decode
            raise ValueError(f"a key name must be text; {name!r} is not valid UTF-8")
        if unicodedata.category(ch) == "Cc":
            raise ValueError(
                f"a key name must not hold control characters; {name!r} has "
                f"U+{ord(ch):04X} at position {i + 1}"
            )


def _quote(value: str) -> str:
    """`value` as a YAML scalar that reads back as exactly that string: plain when YAML
    would resolve it to the same string (not `123`, `yes`, `null`, `2027-01-01`), else
    double-quoted with every character YAML might not keep as it is escaped."""
    plain = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value)
    if plain and yaml.safe_load(value) == value:  # 123, yes, null, 2027-01-01 are not
        return value
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():  # not line or paragraph separators, BOM, unassigned
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'
