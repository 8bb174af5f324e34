"""One access-log line per request: JSON by default, `key=value` text for humans.

The key's name is logged, never its secret; bodies and headers are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.exchange import Outcome, Request

log = logging.getLogger("gateway.access")


FLUSH_EVERY = 0.2  # seconds an access line may wait in memory before reaching stdout


class BatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Collects lines and writes them in one call shortly after: a write (and a flush)
    per request would be a syscall or two on the hot path."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.lines: list[str] = []
        self.scheduled = False
        self.broken = False  # said once on stderr: stdout cannot be written

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, line: str) -> None:
        """Take a line directly: what `emit` does, without a LogRecord per request."""
        self.lines.append(line)
        if len(self.lines) >= 512:
            self.flush()
        elif not self.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self.scheduled = True
            loop.call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """Write what waits. A stdout that cannot be written (a closed pipe, a full
        disk) loses the lines, never a request: `add` flushes inline from
        Runtime.served, outside logging's own error handling."""
        self.scheduled = False
        lines, self.lines = self.lines, []
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            super().flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            if not self.broken:
                self.broken = True
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                print(
                    f"gateway: the access log cannot be written to stdout ({reason}); "
                    "its lines are dropped",
                    file=sys.stderr,
                )


_BARE = re.compile(r"[A-Za-z0-9._:/@+-]*")


def _text(value: Any) -> str:
    """A value for `key=value` text: bare when safe, else a JSON string, so a client's
    session id can neither forge fields nor start a new line."""
    text = str(value)
    return text if _BARE.fullmatch(text) else orjson.dumps(text).decode()


def flush() -> None:
    for handler in log.handlers:
        handler.flush()


def configure(level: str) -> None:
    """Access lines go to stdout, one per line, nothing around them; diagnostics to stderr."""
    handler = BatchedHandler(sys.stdout)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(level.upper())


class AccessLog:
    def __init__(self, fmt: str = "json") -> None:
        self.text = fmt == "text"
        self._second = -1  # the last whole second formatted, and its text
        self._second_text = ""

    def _utc_now(self) -> str:
        now = time.time()
        whole = int(now)
        if whole != self._second:
            self._second = whole
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._second_text}.{int((now - whole) * 1000):03d}Z"

    def enabled(self) -> bool:
        return log.isEnabledFor(logging.INFO)

    def served(
        self,
        req: Request,
        out: Outcome,
        key_name: str | None,
        duration: float,
        charged: int = 0,
        client_gone: bool = False,
        cache: tuple[int, int] | None = None,
    ) -> None:
        """The line of a request that reached the relay; `cache`: its prompt tokens read
        from and written to the provider's cache (Runtime.served reads them once)."""
        if not self.enabled():
            return
        usage = out.usage or {}
        self._write(
            {
                "time": self._utc_now(),
                "request_id": req.request_id.decode(),
                "key": key_name,
                "session_id": req.parsed.session_id,
                "path": req.path,
                "slug": out.slug or req.parsed.slugs[0],
                "provider": out.provider,
                "upstream_model": out.upstream_model,
                "status": out.status,
                "stream": req.parsed.stream,
                "attempts": out.attempts,
                "hedged": out.hedged,
                "ttfb_ms": None if out.ttfb is None else round(out.ttfb * 1000, 2),
                "duration_ms": round(duration * 1000, 2),
                # Where counted tokens came from: the upstream's usage, or the gateway's
                # estimate (a stream cut short, or a provider that takes no stream_options).
                "usage": "upstream"
                if out.usage is not None
                else ("estimated" if charged else None),
                "tokens_charged": charged or None,
                "prompt_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
                "completion_tokens": usage.get("completion_tokens", usage.get("output_tokens")),
                "cache_read_tokens": None if cache is None else cache[0],
                "cache_write_tokens": None if cache is None else cache[1],
                "cost_usd": None if out.cost_usd is None else round(out.cost_usd, 8),
                "client_disconnected": client_gone,
            }
        )

    def refused(
        self, request_id: bytes, key_name: str | None, path: str, exc: GatewayError, duration: float
    ) -> None:
        """The line of a request refused before any upstream."""
        if not self.enabled():
            return
        self._write(
            {
                "time": self._utc_now(),
                "request_id": request_id.decode(),
                "key": key_name,
                "path": path,
                "status": exc.status,
                "code": exc.code,
                "duration_ms": round(duration * 1000, 2),
            }
        )

    def _write(self, fields: dict[str, Any]) -> None:
        if self.text:
            line = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        else:
            line = orjson.dumps(fields).decode()
        # The handler `configure` installs takes the line directly (no LogRecord per
        # request); any other set-up (tests, an embedding program) gets it via logging.
        handlers = log.handlers
        if len(handlers) == 1 and isinstance(handlers[0], BatchedHandler):
            handlers[0].add(line)
        else:
            log.info(line)
