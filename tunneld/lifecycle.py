"""Process lifecycle: event loop choice, signals, graceful shutdown.

SIGTERM/SIGINT: stop accepting, drain for the grace period, exit 0; a second one exits at once (status 1).
SIGHUP: reload the config file; an invalid file is logged and ignored (the daemon keeps its current config).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tunneld.errors import ConfigError

log = logging.getLogger("tunneld")

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is importable (``TUNNELD_LOOP=asyncio`` forces the stdlib loop)."""
    if os.environ.get("TUNNELD_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class Signals:
    """Turns SIGTERM/SIGINT/SIGHUP into a stop event and reload calls."""

    def __init__(self, reload: Callable[[], Awaitable[object]]) -> None:
        self.stop = asyncio.Event()
        self._reload = reload
        self._reloading: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: shutting down gracefully (send again to exit now)", sig.name)
        self.stop.set()

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("SIGHUP: a reload is already running")
            return
        self._reloading = asyncio.create_task(self._do_reload())

    async def _do_reload(self) -> None:
        log.info("SIGHUP: reloading configuration")
        try:
            await self._reload()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
        except Exception:
            log.exception("reload failed; keeping the current configuration")

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
