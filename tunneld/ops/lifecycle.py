"""Process lifecycle: event loop choice, signals, graceful shutdown, and what the service manager is told.

    start: bind listeners, load the inventory --> READY=1 (+ watchdog pings every WATCHDOG_USEC/2 from the loop)
    SIGHUP: RELOADING=1 --> re-read config and inventory, apply the diff --> READY=1 (also when the file is refused)
    SIGTERM/SIGINT: STOPPING=1, STATUS=draining... --> stop accepting, drain for the grace period (streams still
                    open at its end are cut, and logged), exit 0
    a second SIGTERM/SIGINT: exit at once (status 1)

An invalid file on reload is logged and ignored: the daemon keeps its current configuration. The service records
each reload's outcome in a :class:`ReloadLog`, which the status API shows and ``tunneld reload`` waits on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tunneld.errors import ConfigError
from tunneld.ops.notify import Notifier, Watchdog, watchdog_interval

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


@dataclass
class ReloadLog:
    """The outcome of the last reload, for ``tunneld reload`` to wait on through the status API.

    ``generation`` counts finished reloads (applied, refused or failed) since start; ``outcome`` is ``reloaded``,
    ``refused`` (the new file is invalid: nothing changed) or ``failed`` (an unexpected error: nothing changed).
    """

    generation: int = 0
    outcome: str | None = None
    problems: list[str] = field(default_factory=list)
    at: float | None = None

    def record(self, outcome: str, problems: list[str]) -> None:
        self.generation += 1
        self.outcome = outcome
        self.problems = list(problems)
        self.at = time.time()

    def snapshot(self) -> dict[str, object]:
        return {"generation": self.generation, "outcome": self.outcome, "problems": self.problems, "at": self.at}


class Signals:
    """Turns SIGTERM/SIGINT/SIGHUP into a stop event and reload calls (announced to ``notifier`` if given)."""

    def __init__(self, reload: Callable[[], Awaitable[object]], notifier: Notifier | None = None) -> None:
        self.stop = asyncio.Event()
        self._reload = reload
        self._notifier = notifier or Notifier({})
        self._reloading: asyncio.Task[None] | None = None
        self._again = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: shutting down gracefully (send again to exit now)", sig.name)
        self._notifier.stopping("draining open streams (stop again to exit now)")
        self.stop.set()

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            # The file may have changed after the running reload read it: read it once more when that one ends
            # (several SIGHUPs meanwhile make one more reload, not several).
            log.info("SIGHUP: a reload is running; another follows it")
            self._again = True
            return
        self._reloading = asyncio.create_task(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        await self._do_reload()
        while self._again:
            self._again = False
            await self._do_reload()

    async def _do_reload(self) -> None:
        log.info("SIGHUP: reloading configuration")
        self._notifier.reloading()
        try:
            await self._reload()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            self._notifier.ready("reload refused; running the previous configuration")
        except Exception:
            log.exception("reload failed; keeping the current configuration")
            self._notifier.ready("reload failed; running the previous configuration")
        else:
            self._notifier.ready("reloaded")

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


class Collector(Protocol):
    """The garbage collector's tuning (:class:`tunneld.ops.collector.CollectorTuning`)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class Service(Protocol):
    """What :func:`serve` runs: the gateway, or anything with the same lifecycle."""

    async def start(self) -> None: ...

    async def reload(self) -> object: ...

    async def stop(self, grace: float = ...) -> None: ...


async def serve(service: Service, grace: float, notifier: Notifier | None = None,
                collector: Collector | None = None) -> None:
    """Tune the garbage ``collector``, start ``service``, tell the service manager READY, serve until SIGTERM/SIGINT,
    then stop it gracefully. The collector freezes what exists before ``service`` starts (modules, the config, the
    service's objects): tunnels come later, so a node removed by a reload leaves nothing frozen behind.

    SIGHUP reloads (announced as RELOADING=1 ... READY=1); the watchdog pings while the loop runs.
    """
    notifier = notifier or Notifier()
    watchdog = Watchdog(notifier, watchdog_interval())
    signals = Signals(service.reload, notifier)
    try:
        if collector is not None:
            collector.start()
        await service.start()
        notifier.ready("serving")
        watchdog.start()
        await signals.stop.wait()
    finally:
        if not signals.stop.is_set():  # startup failed: still say we are stopping
            notifier.stopping("startup failed; stopping")
            signals.stop.set()  # a SIGTERM from now on exits at once
        try:
            await service.stop(grace)  # the handlers stay: a second SIGTERM during the drain exits at once
        finally:
            signals.close()
            if collector is not None:
                await collector.stop()
            await watchdog.stop()
            notifier.close()
