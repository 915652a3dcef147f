"""Kubernetes node inventory: list and watch the Node objects of an API server.

The wire protocol is the API's "efficient detection of changes":

    LIST   GET /api/v1/nodes?limit=500[&continue=TOKEN][&labelSelector=SEL]
           -> a NodeList; ``metadata.resourceVersion`` is the version the whole list is consistent at.
    WATCH  GET /api/v1/nodes?watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T[&labelSelector=]
           -> a chunked stream of JSON lines ``{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}``.
              BOOKMARK carries only a newer ``metadata.resourceVersion``; ERROR carries a ``Status``.

One task runs this state machine::

    LISTING  --list ok-------------------------------> WATCHING(rv of the list)
    WATCHING --event or bookmark---------------------> WATCHING(rv of the event)
    WATCHING --stream ended or broke-----------------> WATCHING(same rv): re-watch, no relist
    WATCHING --410 Gone (HTTP 410, or ERROR event
               whose Status has code 410)------------> LISTING: the rv is too old, relist
    any      --other error---------------------------> sleep an exponential, capped, jittered backoff, same state

A relist replaces the whole cache, so deletions missed while disconnected are seen. After every change the source
hands the whole node list (debounced a little, so a burst of events is applied once) to its callback; the gateway
merges it with the static ``[[nodes]]`` (:func:`merge_nodes`) and applies the diff through the pool.

How an API Node becomes an inventory node is :mod:`tunneld.tunnels.k8s_nodes`.

Credentials and TLS come from lightkube (a kubeconfig file, or the pod's service account); the list/watch exchange
is done here on lightkube's configured HTTP client so that bookmarks, both forms of 410 and dropped streams are
handled explicitly. Tokens are never logged: only the server URL, HTTP status and the API's Status message are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunneld.config import KubernetesInventorySettings, Node
from tunneld.tunnels.k8s_api import KubeAPI, resource_version
from tunneld.tunnels.k8s_nodes import (
    KubeAuthError,
    KubeInventoryError,
    NodeCache,
    ResourceExpired,
)
from tunneld.tunnels.state import Backoff

log = logging.getLogger("tunneld.k8s")


NodesCallback = Callable[[list[Node]], None]


# ---------------------------------------------------------------------------------------------------------------
# The running source


@dataclass
class SourceStats:
    """Counters for tests and the status view."""

    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    events: int = 0
    errors: int = 0
    publishes: int = 0
    resource_version: str | None = None
    last_error: str | None = None


class KubeInventory:
    """Keeps an inventory of the API server's nodes and calls ``on_change(nodes)`` after each change."""

    def __init__(
        self,
        api: KubeAPI,
        on_change: NodesCallback,
        *,
        ssh_port: int = 22,
        backoff: Backoff | None = None,
        debounce: float = 0.2,
        watch_timeout: int = 300,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.api = api
        self.on_change = on_change
        self.cache = NodeCache(ssh_port)
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0, multiplier=2.0, jitter=0.5)
        self.debounce = debounce
        self.watch_timeout = watch_timeout
        self.rng = rng
        self.stats = SourceStats()
        self.resource_version: str | None = None
        """The last version seen (list, event or bookmark); None means the next step is a (re)list."""
        self.synced = asyncio.Event()
        """Set once the first list has been delivered to ``on_change``."""
        self._first: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._published: list[Node] | None = None

    @classmethod
    def from_settings(cls, settings: KubernetesInventorySettings, on_change: NodesCallback,
                      **kwargs: Any) -> KubeInventory:
        """Build from ``[inventory]`` settings. Raises :class:`KubeCredentialsError`."""
        return cls(KubeAPI.from_settings(settings), on_change, ssh_port=settings.ssh_port, **kwargs)

    async def start(self, wait: float = 5.0) -> None:
        """Start listing and watching. Waits up to ``wait`` seconds for the first list: if the server rejects the
        credentials then, raises :class:`KubeAuthError`; other failures are retried in the background."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="k8s-inventory")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), wait)
        except TimeoutError:
            log.warning("no node list from %s yet after %gs; still trying", self.api.server, wait)
        except KubeAuthError:
            await self.stop()
            raise
        except KubeInventoryError:
            pass  # logged by the loop, which keeps retrying

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and close the connection, within about ``timeout`` seconds. No callback is made
        afterwards."""
        tasks = [t for t in (self._task, self._publisher) if t is not None]
        self._task = self._publisher = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Cancel again while a task is still running: a library may swallow one cancellation in a race.
        while tasks and loop.time() < deadline:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.2)
            tasks = [t for t in tasks if not t.done()]
        if tasks:
            log.warning("the Kubernetes inventory did not stop within %gs", timeout)
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.5)):
                await self.api.close()
        except (TimeoutError, OSError) as exc:
            log.warning("closing the connection to %s: %s", self.api.server, str(exc) or type(exc).__name__)

    def nodes(self) -> list[Node]:
        return self.cache.inventory()

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for the status API (no credentials in it)."""
        return {
            "source": "kubernetes",
            "server": self.api.server,
            "synced": self.synced.is_set(),
            "nodes": len(self.cache.nodes),
            "skipped": dict(sorted(self.cache.skipped.items())),
            "resource_version": self.resource_version,
            "lists": self.stats.lists,
            "relists_after_gone": self.stats.relists_after_gone,
            "watches": self.stats.watches,
            "errors": self.stats.errors,
            "last_error": self.stats.last_error,
        }

    def _settle_first(self, error: BaseException | None) -> None:
        if self._first is not None and not self._first.done():
            if error is None:
                self._first.set_result(None)
            else:
                self._first.set_exception(error)
                self._first.exception()  # retrieved here, so an unawaited future never warns

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            phase = "listing" if self.resource_version is None else "watching"
            try:
                if self.resource_version is None:
                    await self._list()
                    failures = 0
                phase = "watching"
                started, seen = loop.time(), self.stats.events
                rv = self.resource_version
                assert rv is not None  # a list just set it
                await self._watch(rv)
                if self.stats.events == seen and loop.time() - started < 1.0:
                    # Ended at once with nothing in it: do not spin against a server that keeps doing that.
                    failures += 1
                    await asyncio.sleep(self.backoff.delay(failures, self.rng()))
                else:
                    failures = 0
            except ResourceExpired as exc:
                if phase == "watching":
                    log.info("resourceVersion %s expired (%s); relisting", self.resource_version,
                             exc.message or exc.reason)
                    self.stats.relists_after_gone += 1
                    self.resource_version = None
                    continue
                failures = await self._failed(exc, failures, phase)  # an expired continue token: list anew
            except KubeInventoryError as exc:
                failures = await self._failed(exc, failures, phase)
            except Exception as exc:  # a bug must not end the inventory for good
                log.exception("Kubernetes inventory loop failed unexpectedly")
                failures = await self._failed(KubeInventoryError(f"{type(exc).__name__}: {exc}"), failures, phase)

    async def _list(self) -> None:
        items, rv = await self.api.list_nodes()
        self.stats.lists += 1
        self.resource_version = self.stats.resource_version = rv
        self.cache.replace_all(items)
        log.info("listed %d Kubernetes nodes (%d usable)", len(items), len(self.cache.nodes),
                 extra={"resource_version": rv})
        self._publish_now()
        self.synced.set()
        self._settle_first(None)

    async def _failed(self, exc: KubeInventoryError, failures: int, phase: str) -> int:
        """Record an error and sleep the backoff; returns the new count of consecutive failures."""
        failures += 1
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        self._settle_first(exc)
        delay = self.backoff.delay(failures, self.rng())
        level = logging.ERROR if isinstance(exc, KubeAuthError) else logging.WARNING
        log.log(level, "Kubernetes inventory: %s nodes failed: %s; retrying in %.1fs", phase, exc, delay)
        await asyncio.sleep(delay)
        return failures

    async def _watch(self, rv: str) -> None:
        """Watch from ``rv`` until the stream ends, keeping :attr:`resource_version` at the last version seen (so a
        broken stream resumes from there)."""
        self.stats.watches += 1
        async with contextlib.aclosing(self.api.watch_nodes(rv, self._timeout_seconds())) as events:
            async for kind, obj in events:
                new_rv = resource_version(obj)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.stats.events += 1
                    if self.cache.apply(kind, obj):
                        self._schedule_publish()
                elif kind != "BOOKMARK":
                    log.debug("ignoring watch event of type %s", kind)
                if new_rv is not None:
                    self.resource_version = self.stats.resource_version = new_rv
        log.debug("watch ended; re-watching from resourceVersion %s", self.resource_version)

    def _timeout_seconds(self) -> int:
        # Spread re-watches of many gateways over time, as client-go's reflector does.
        return max(1, int(self.watch_timeout * (1.0 + self.rng())))

    def _schedule_publish(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_later(), name="k8s-inventory-publish")

    async def _publish_later(self) -> None:
        await asyncio.sleep(self.debounce)
        self._publish_now()

    def _publish_now(self) -> None:
        nodes = self.cache.inventory()
        if nodes == self._published:
            return
        self._published = nodes
        self.stats.publishes += 1
        try:
            self.on_change(nodes)
        except Exception:
            log.exception("applying the Kubernetes inventory failed")
