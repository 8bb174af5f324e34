"""What one worker process holds while it serves: the config snapshot and live state."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gateway.config import Config
from gateway.config.keys import Key
from gateway.config.settings import Settings
from gateway.errors import GatewayError, QuotaExhausted, RateLimited
from gateway.exchange import Outcome, Request
from gateway.families.responses import Creator, ResponseIds
from gateway.health import Health
from gateway.limits import Limiter
from gateway.relay import Relay
from gateway.state.affinity import Affinity
from gateway.state.file import StateFile
from gateway.telemetry.accesslog import AccessLog
from gateway.telemetry.accesslog import flush as flush_access_log
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.traffic import Traffic

if TYPE_CHECKING:
    from gateway.state.redis import RedisState
from gateway.strategies import Strategies
from gateway.telemetry.tracing import Tracing
from gateway.upstream.client import Upstream
from gateway.wire.usage import cache_written, usage_parts

log = logging.getLogger("gateway")


class Runtime:
    def __init__(self, settings: Settings, config: Config) -> None:
        self.settings = settings
        # Swapped whole on reload: a request reads it once and keeps that snapshot.
        self.config = config
        self.started_at = int(time.time())
        self.upstream = Upstream(settings.max_response_bytes, settings.max_event_bytes)
        self.health = Health()
        self.strategies = Strategies(self.health)
        self.limiter = Limiter()
        self.metrics = Metrics()
        self.traffic = Traffic(self.metrics)  # the console's last 15 minutes
        self.access = AccessLog(settings.log_format)
        self.state: StateFile | None = None
        # With --state redis://: the limits and Responses ids every replica shares.
        self.shared: RedisState | None = None
        self.response_ids = ResponseIds(settings.response_ids_per_key)
        # With OTEL_EXPORTER_OTLP_ENDPOINT set (and gateway[otel]): spans; else None.
        self.tracing = Tracing.from_env()
        if settings.redis:
            from gateway.state.redis import RedisState

            self.shared = RedisState(
                settings.state,
                settings.state_fail == "closed",
                self.metrics.round_trips.inc,
                ids_per_key=settings.response_ids_per_key,
                on_unavailable=self.metrics.unenforced.inc,
                on_id_dropped=self.id_dropped,
                on_id_taken=self.response_ids.drop,
            )
            self.response_ids.mirror = self.shared.remember
        elif settings.state != "none":
            self.state = StateFile(settings.state, self.limiter)
            self.state.load()
        # Sessions pinned to the entry that served them last (SPEC §14), in Redis too.
        self.affinity = Affinity(settings.affinity_sessions, self.shared)
        # Where keys' limits are counted, chosen once: every caller but the check itself
        # (sync in memory, a round trip in Redis) goes through this one.
        self.limits: Limiter | RedisState = self.limiter if self.shared is None else self.shared
        self.relay = Relay(
            self.upstream,
            self.health,
            self.metrics,
            self.response_ids,
            traced=self.tracing is not None,
        )

    def swap(self, config: Config) -> Config:
        """The new snapshot in, the old one back; state of keys that left is freed (a
        key added back later starts afresh)."""
        old, self.config = self.config, config
        kept = {key.name for key in config.keys.entries}
        gone = {key.name for key in old.keys.entries} - kept
        if gone:
            self.limits.forget(gone)
            self.metrics.forget_keys(gone)
            self.response_ids.forget(gone)
        return old

    async def stop(self) -> None:
        await self.traffic.stop()
        if self.state is not None:
            await self.state.close()
        if self.shared is not None:
            await self.shared.close()
        await self.upstream.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)  # the last batch, exported
        self.metrics.dump()
        flush_access_log()

    def served(
        self,
        req: Request,
        out: Outcome,
        key: Key | None,
        tokens: int,
        duration: float,
        client_gone: bool = False,
    ) -> None:
        """Metrics and the access-log line for a request that reached the relay."""
        m = self.metrics
        label = out.label or "(none)"
        owner = key.name if key is not None else ""
        provider = out.provider or ""
        # One lookup for the series such a request writes (Metrics.served).
        series = m.served(owner, label, provider, out.status, req.parsed.stream)
        series.requests.inc()
        series.duration.observe(duration)
        if out.ttfb is not None and series.ttfb is not None:
            series.ttfb.observe(out.ttfb)
        if out.attempts > 1:
            m.failovers(label).inc()
        if out.hedged:
            m.hedges.inc()
        cache: tuple[int, int] | None = None
        usage = out.usage
        if usage is not None:
            prompt, read, completion = usage_parts(usage)
            if prompt:
                counter = series.prompt
                if counter is None:
                    counter = series.prompt = m.tokens(owner, "prompt")
                counter.inc(prompt)
                # Kinds from the parts already read: a second pass over the usage cost
                # ~5k instructions a request (callgrind), twice with the access log.
                written = cache_written(usage)
                cache = (read, written)
                uncached = prompt - read - written
                if uncached > 0:
                    counter = series.uncached
                    if counter is None:
                        counter = series.uncached = m.prompt_tokens(
                            owner, label, provider, "uncached"
                        )
                    counter.inc(uncached)
                if read:
                    m.prompt_tokens(owner, label, provider, "cache_read").inc(read)
                if written:
                    m.prompt_tokens(owner, label, provider, "cache_write").inc(written)
                # Sessions are no metric label (unbounded): the console's per-session
                # cache-hit ratio is counted here, from the same parts; one `is None`
                # test for a request without a session.
                session = req.parsed.session_id
                if session is not None:
                    self.traffic.prompted(owner, session, read, prompt)
            if completion:
                counter = series.completion
                if counter is None:
                    counter = series.completion = m.tokens(owner, "completion")
                counter.inc(completion)
            if out.cost_usd:
                m.cost(owner, label, provider).inc(out.cost_usd)
        elif tokens:
            m.tokens(owner, "estimated").inc(tokens)
        m.changed()
        self.access.served(
            req, out, key.name if key else None, duration, tokens, client_gone, cache
        )

    def unenforced(self, key: Key, request_id: bytes) -> None:
        """A limited key's request served without its limits (Redis away, failing open):
        counted and logged with the request's id."""
        self.metrics.unenforced.inc()
        log.warning(
            "request %s of key %r served without its limits: redis is unreachable",
            request_id.decode("latin-1"),
            key.name,
        )

    def id_dropped(self, response_id: str) -> None:
        """A Responses id Redis did not store (full, or away past the pending cap):
        counted and logged; its requests can still be served by this process's map."""
        self.metrics.ids_dropped.inc()
        self.metrics.changed()
        log.warning("responses id %s was not stored in redis (full or unreachable)", response_id)

    async def find_response(self, response_id: str, owner: str) -> Creator | None:
        """The entry that created a Responses id `owner` made: this process's map, else
        (with Redis) the one every replica writes to. ResponseNotFound for an id another
        tenant made (SPEC §13)."""
        if self.shared is None:
            return self.response_ids.find(response_id, owner)
        # With Redis, Redis decides (every replica's ids, their owners, and each use
        # renewing the id's rank and TTL there); this process's map serves only what
        # Redis does not know yet (an id still in the next batch) or while it is away.
        creator = await self.shared.find(response_id, owner)
        return creator or self.response_ids.find(response_id, owner)

    def refused(
        self, exc: GatewayError, key: Key | None, request_id: bytes, path: str, duration: float
    ) -> None:
        """Metrics and the access-log line for a request refused before any upstream."""
        self.metrics.requests("(none)", "", str(exc.status), "").inc()
        if isinstance(exc, RateLimited | QuotaExhausted) and key is not None:
            limit = str(exc.details.get("limit", "token_quota"))
            self.metrics.rejections(key.name, limit).inc()
        self.metrics.changed()
        self.access.refused(request_id, key.name if key else None, path, exc, duration)
