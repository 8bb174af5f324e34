"""Hot reload: SIGHUP or a change of either file builds a new Config and swaps it in.

The new files are validated whole first; a bad file keeps the old config and logs every
problem. In-flight requests keep the snapshot they started with; health and limit state
is keyed by names, so it carries over for providers and keys that still exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

from gateway.config import ConfigError, load_config
from gateway.runtime import Runtime

log = logging.getLogger("gateway")
Fingerprint = tuple[tuple[int, int] | None, ...]


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class Reloader:
    def __init__(self, runtime: Runtime, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.interval = interval
        self._seen = self._fingerprint()
        self._task: asyncio.Task[None] | None = None
        self._signal = False

    def _fingerprint(self) -> Fingerprint:
        s = self.runtime.settings
        return (_stat(s.routes_path), _stat(s.keys_path))

    def reload(self) -> bool:
        """Load both files; swap them in if valid. True when a new config is live."""
        s = self.runtime.settings
        self._seen = self._fingerprint()
        try:
            config = load_config(s.routes_path, s.keys_path, s.keys_explicit)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            log.error("keeping config version %s", self.runtime.config.version)
            return False
        if config.version != self.runtime.config.version:
            self.runtime.config = config
            log.info("reloaded config version %s", config.version)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._fingerprint() != self._seen:
                self.reload()

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.ensure_future(self._watch())
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
                self._signal = True
            except (NotImplementedError, RuntimeError):
                pass

    async def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
