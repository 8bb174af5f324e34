"""Hot reload: SIGHUP or a change of either file builds a new Config and swaps it in.

The new files are read, parsed and validated whole in a thread, off the event loop
(YAML stepwise, the cyclic collector paused, big trees freed piece by piece: see
yamlsrc), and only the swap runs on the loop. A bad file keeps the old config and logs
every problem. In-flight requests keep the snapshot they started with; health and limit
state is keyed by names, so it carries over for providers and keys that still exist,
and the state of keys that left is freed by the swap.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading

from gateway.config import Config, ConfigError, load_config
from gateway.runtime import Runtime
from gateway.tasks import cancel

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
        self._running: asyncio.Task[bool] | None = None  # one reload at a time
        self._again = False  # asked for while one ran: run once more after it

    def _fingerprint(self) -> Fingerprint:
        s = self.runtime.settings
        return (_stat(s.routes_path), _stat(s.keys_path))

    def request(self) -> None:
        """Reload soon (SIGHUP, a changed file): never two at once, none lost."""
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.ensure_future(self.reload())

    async def reload(self) -> bool:
        """Load both files in a thread; swap them in if valid. True when a new config
        is live."""
        loop = asyncio.get_running_loop()
        result = True
        while True:
            self._again = False
            self._seen = self._fingerprint()
            outcome = await loop.run_in_executor(None, self._load)
            if isinstance(outcome, ConfigError):
                for problem in outcome.problems:
                    log.error("reload refused: %s", problem)
                log.error("keeping config version %s", self.runtime.config.version)
                result = False
            elif outcome.version != self.runtime.config.version:
                holder = [self.runtime.swap(outcome)]
                log.info("reloaded config version %s", outcome.version)
                # The old snapshot is freed in the thread, unless a request still holds
                # it (then its last holder frees it).
                await loop.run_in_executor(None, _drop, holder)
                result = True
            if not self._again:
                return result

    def _load(self) -> Config | ConfigError:
        s = self.runtime.settings
        # The collector would walk every new object on the loop's time: paused for the
        # parse, and what the new config keeps is moved out of its reach afterwards.
        gc.disable()
        try:
            return load_config(s.routes_path, s.keys_path, s.keys_explicit, stepwise=True)
        except ConfigError as exc:
            return exc
        except Exception:
            # A fault in the loader itself (every bad input is a ConfigError): still
            # never an unretrieved task exception; the old config is kept and said.
            log.exception("reload failed reading %s and %s", s.routes_path, s.keys_path)
            return ConfigError([])
        finally:
            gc.freeze()
            gc.enable()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._fingerprint() != self._seen:
                self.request()

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.ensure_future(self._watch())
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request)
                self._signal = True
            except (NotImplementedError, RuntimeError):
                pass

    async def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (self._task, self._running):
            await cancel(task)


def _drop(holder: list[Config]) -> None:
    """Runs in a thread: the old snapshot's last reference goes here, not on the loop."""
    holder.clear()
