"""What one worker process holds while it serves: the config snapshot and live state."""

from __future__ import annotations

import time

from gateway.config import Config
from gateway.health import Health
from gateway.limits import Limiter
from gateway.relay import Relay
from gateway.settings import Settings
from gateway.strategies import Strategies
from gateway.upstream import Upstream


class Runtime:
    def __init__(self, settings: Settings, config: Config) -> None:
        self.settings = settings
        # Swapped whole on reload: a request reads it once and keeps that snapshot.
        self.config = config
        self.started_at = int(time.time())
        self.upstream = Upstream()
        self.health = Health()
        self.limiter = Limiter()
        self.strategies = Strategies(self.health)
        self.relay = Relay(self.upstream, self.health)

    async def start(self) -> None:
        await self.upstream.start()

    async def stop(self) -> None:
        await self.upstream.close()
