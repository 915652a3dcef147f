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

How an API Node becomes a :class:`~tunneld.config.Node` (:func:`node_from_object`): name = ``metadata.name``,
address = the first ``InternalIP`` of ``status.addresses`` (there is no fallback to ``ExternalIP``: the gateway
belongs on the cluster's internal network, and a node's public address is not where its sshd should be reached;
a node without an InternalIP is skipped with a warning), pod CIDR = ``spec.podCIDR``, kubelet port =
``status.daemonEndpoints.kubeletEndpoint.Port`` (10250 when absent), ssh port = ``[inventory] ssh_port``.
Unschedulable (cordoned) and NotReady nodes are still nodes: a NotReady kubelet is exactly when an operator wants
logs and exec through the tunnel, and the tunnel's own state already says whether the node can be reached.

Credentials and TLS come from lightkube (a kubeconfig file, or the pod's service account); the list/watch exchange
is done here on lightkube's configured HTTP client so that bookmarks, both forms of 410 and dropped streams are
handled explicitly. Tokens are never logged: only the server URL, HTTP status and the API's Status message are.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tunneld.config import KubernetesInventorySettings, Node
from tunneld.state import Backoff

log = logging.getLogger("tunneld.k8s")

NODES_PATH = "/api/v1/nodes"
LIST_PAGE_SIZE = 500
MAX_LIST_PAGE_BYTES = 64 * 1024 * 1024
MAX_EVENT_BYTES = 8 * 1024 * 1024
DEFAULT_KUBELET_PORT = 10250

_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")

NodesCallback = Callable[[list[Node]], None]


class KubeInventoryError(Exception):
    """The Kubernetes inventory could not be read."""


class KubeCredentialsError(KubeInventoryError):
    """The kubeconfig or the in-cluster service account could not be loaded."""


class KubeAPIError(KubeInventoryError):
    """The API server answered with an error (an HTTP status, or a watch ERROR event carrying a Status)."""

    def __init__(self, code: int, reason: str, message: str, server: str = "") -> None:
        text = f"{code} {reason}: {message}" if message and message != reason else f"{code} {reason}"
        hint = _HINTS.get(code, "")
        super().__init__(f"{server}: {text}{hint}" if server else f"{text}{hint}")
        self.code = code
        self.reason = reason
        self.message = message


_HINTS = {
    401: " (the API server rejected the credentials: check the kubeconfig user's token or client certificate)",
    403: " (the user needs permission to list and watch nodes: a ClusterRole with get/list/watch on nodes)",
}


class KubeAuthError(KubeAPIError):
    """401 or 403: the credentials were rejected, or the user may not list and watch nodes."""


class ResourceExpired(KubeAPIError):
    """410 Gone: the resourceVersion is too old to watch from (compacted away); the client must relist."""


class KubeProtocolError(KubeInventoryError):
    """The server's answer is not the list/watch format (bad JSON, missing fields, oversized objects)."""


class SkipNode(Exception):
    """An API Node that cannot become an inventory node; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# Pure conversion and merging


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def node_from_object(obj: Mapping[str, Any], ssh_port: int = 22) -> Node:
    """Turn an API Node object (JSON) into an inventory node. Raises :class:`SkipNode` when it cannot."""
    name = _get(obj, "metadata", "name")
    if not isinstance(name, str) or not _SUBDOMAIN_RE.match(name):
        raise SkipNode(f"metadata.name {name!r} is not a valid node name")
    addresses = _get(obj, "status", "addresses")
    address = None
    for entry in addresses if isinstance(addresses, list) else []:
        if _get(entry, "type") == "InternalIP" and isinstance(_get(entry, "address"), str):
            try:
                address = str(ipaddress.ip_address(entry["address"]))
            except ValueError:
                continue
            break
    if address is None:
        raise SkipNode("no InternalIP in status.addresses")
    pod_cidr = None
    cidr = _get(obj, "spec", "podCIDR")
    if isinstance(cidr, str) and cidr:
        try:
            pod_cidr = ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            log.warning("ignoring invalid spec.podCIDR %r", cidr, extra={"node": name})
    port = _get(obj, "status", "daemonEndpoints", "kubeletEndpoint", "Port")
    kubelet_port = port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else None
    return Node(name=name, address=address, ssh_port=ssh_port, kubelet_port=kubelet_port or DEFAULT_KUBELET_PORT,
                pod_cidr=pod_cidr)


def merge_nodes(static: Iterable[Node], discovered: Iterable[Node]) -> tuple[list[Node], list[str]]:
    """Static ``[[nodes]]`` plus discovered nodes. A static node wins over a discovered one with the same name or
    address. Returns the merged list and one message per discovered node left out."""
    merged = list(static)
    names = {n.name for n in merged}
    addresses = {n.address: n.name for n in merged}
    dropped: list[str] = []
    for node in sorted(discovered, key=lambda n: n.name):
        if node.name in names:
            dropped.append(f"node {node.name}: the [[nodes]] entry of that name wins over the API's Node")
        elif node.address in addresses:
            dropped.append(f"node {node.name}: address {node.address} already belongs to node "
                           f"{addresses[node.address]}; skipped")
        else:
            merged.append(node)
            names.add(node.name)
            addresses[node.address] = node.name
    return merged, dropped


class NodeCache:
    """The last known state of the API's nodes, kept by name, and the inventory nodes derived from it.

    Pure: it applies list results and watch events and says whether the derived inventory changed. Nodes that
    cannot be used are remembered with the reason, which is logged once per change of reason.
    """

    def __init__(self, ssh_port: int = 22) -> None:
        self.ssh_port = ssh_port
        self.nodes: dict[str, Node] = {}
        self.skipped: dict[str, str] = {}

    def _put(self, obj: Mapping[str, Any]) -> None:
        name = _get(obj, "metadata", "name")
        try:
            node = node_from_object(obj, self.ssh_port)
        except SkipNode as exc:
            key = name if isinstance(name, str) else "?"
            self.nodes.pop(key, None)
            if self.skipped.get(key) != str(exc):
                log.warning("skipping Kubernetes node: %s", exc, extra={"node": key})
            self.skipped[key] = str(exc)
            return
        if self.skipped.pop(node.name, None) is not None:
            log.info("Kubernetes node usable again", extra={"node": node.name, "address": node.address})
        self.nodes[node.name] = node

    def replace_all(self, items: Iterable[Mapping[str, Any]]) -> bool:
        """Replace everything with a fresh list. Returns whether the inventory changed."""
        before = dict(self.nodes)
        self.nodes = {}
        old_skipped, self.skipped = self.skipped, {}
        for obj in items:
            name = _get(obj, "metadata", "name")
            if isinstance(name, str) and name in old_skipped:
                self.skipped[name] = old_skipped[name]  # already warned about; warn again only if the reason changes
            self._put(obj)
        return before != self.nodes

    def apply(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """Apply one ADDED / MODIFIED / DELETED event. Returns whether the inventory changed."""
        name = _get(obj, "metadata", "name")
        if not isinstance(name, str):
            log.warning("ignoring a %s event for an object without metadata.name", kind)
            return False
        if kind == "DELETED":
            self.skipped.pop(name, None)
            return self.nodes.pop(name, None) is not None
        before = self.nodes.get(name)
        self._put(obj)
        return self.nodes.get(name) != before

    def inventory(self) -> list[Node]:
        return [self.nodes[name] for name in sorted(self.nodes)]


# ---------------------------------------------------------------------------------------------------------------
# The API boundary: lightkube's configured HTTP client, list and watch


def _status_error(code: int, body: bytes, server: str) -> KubeAPIError:
    reason, message = "", ""
    with contextlib.suppress(ValueError, AttributeError):
        status = json.loads(body[:64 * 1024])
        reason = str(status.get("reason") or "")
        message = str(status.get("message") or "")
        code = int(status.get("code") or code)
    return _typed_error(code, reason, message[:300], server)


def _typed_error(code: int, reason: str, message: str, server: str) -> KubeAPIError:
    reason = reason or {401: "Unauthorized", 403: "Forbidden", 410: "Gone"}.get(code, "Error")
    if code in (401, 403):
        return KubeAuthError(code, reason, message, server)
    if code == 410:
        return ResourceExpired(code, reason, message, server)
    return KubeAPIError(code, reason, message, server)


def _resource_version(obj: Any) -> str | None:
    rv = _get(obj, "metadata", "resourceVersion")
    return rv if isinstance(rv, str) and rv else None


class KubeAPI:
    """List and watch Node objects over an HTTP client configured with the cluster's URL, CA and credentials.

    Every failure is raised as a :class:`KubeInventoryError` subclass.
    """

    def __init__(self, client: Any, server: str, label_selector: str | None = None) -> None:
        from lightkube.config import client_adapter

        # The httpx flavour lightkube was built against (``httpx`` or its successor ``httpx2``).
        self._httpx = client_adapter.httpx
        self.client = client
        self.server = server
        self.label_selector = label_selector
        self.page_size = LIST_PAGE_SIZE

    @classmethod
    def from_settings(cls, settings: KubernetesInventorySettings, timeout: float = 10.0) -> KubeAPI:
        """Build from a kubeconfig file (its current context) or, without one, the pod's service account."""
        try:
            from lightkube import KubeConfig
            from lightkube.config import client_adapter
        except ImportError as exc:  # pragma: no cover - lightkube is in the "kubernetes" extra
            raise KubeCredentialsError("the kubernetes inventory needs lightkube: pip install 'tunneld[kubernetes]'") \
                from exc
        where = str(settings.kubeconfig) if settings.kubeconfig else "the in-cluster service account"
        try:
            kube = KubeConfig.from_file(settings.kubeconfig) if settings.kubeconfig else \
                KubeConfig.from_service_account()
            single = kube.get()
            if single is None:
                raise KubeCredentialsError(f"{where}: no current context")
            params = client_adapter.ConnectionParams(timeout=client_adapter.httpx.Timeout(timeout), trust_env=False)
            client = client_adapter.AsyncClient(single, params)
        except KubeCredentialsError:
            raise
        except Exception as exc:  # lightkube raises ConfigError, KeyError, OSError, ssl.SSLError, yaml errors
            raise KubeCredentialsError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return cls(client, single.cluster.server, settings.label_selector)

    async def close(self) -> None:
        await self.client.aclose()

    def _params(self, **extra: str) -> dict[str, str]:
        params = dict(extra)
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    @contextlib.asynccontextmanager
    async def _get(self, params: dict[str, str], read_timeout: float) -> AsyncIterator[Any]:
        httpx = self._httpx
        timeout = httpx.Timeout(self.client.timeout.connect or 10.0, read=read_timeout)
        try:
            async with self.client.stream("GET", NODES_PATH, params=params, timeout=timeout) as resp:
                if resp.status_code != 200:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > 64 * 1024:
                            break
                    raise _status_error(resp.status_code, body, self.server)
                yield resp
        except httpx.HTTPError as exc:
            raise KubeInventoryError(f"{self.server}: {type(exc).__name__}: {exc or 'connection failed'}") from exc
        except OSError as exc:  # TLS verification failures and friends surface as OSError subclasses
            raise KubeInventoryError(f"{self.server}: {type(exc).__name__}: {exc}") from exc

    async def list_nodes(self, read_timeout: float = 60.0) -> tuple[list[dict[str, Any]], str]:
        """All nodes (in pages of :attr:`page_size`) and the resourceVersion the list is consistent at."""
        items: list[dict[str, Any]] = []
        token = ""
        for _ in range(100_000):
            params = self._params(limit=str(self.page_size))
            if token:
                params["continue"] = token
            async with self._get(params, read_timeout) as resp:
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_LIST_PAGE_BYTES:
                        raise KubeProtocolError(f"{self.server}: a NodeList page exceeds {MAX_LIST_PAGE_BYTES} bytes")
            try:
                page = json.loads(body)
            except ValueError as exc:
                raise KubeProtocolError(f"{self.server}: the NodeList is not JSON: {exc}") from exc
            page_items = page.get("items") if isinstance(page, dict) else None
            rv = _resource_version(page)
            if not isinstance(page_items, list) or rv is None:
                raise KubeProtocolError(f"{self.server}: not a NodeList (items and metadata.resourceVersion needed)")
            items.extend(i for i in page_items if isinstance(i, dict))
            token = _get(page, "metadata", "continue") or ""
            if not token:
                return items, rv
        raise KubeProtocolError(f"{self.server}: the NodeList never ends")

    async def watch_nodes(self, resource_version: str, timeout_seconds: int) \
            -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Events after ``resource_version`` until the server ends the stream. ERROR events are raised as
        :class:`KubeAPIError` (:class:`ResourceExpired` for 410); BOOKMARKs are yielded like other events."""
        params = self._params(watch="true", resourceVersion=resource_version, allowWatchBookmarks="true",
                              timeoutSeconds=str(timeout_seconds))
        async with self._get(params, read_timeout=timeout_seconds + 30.0) as resp:
            buf = bytearray()
            try:
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    while (end := buf.find(b"\n")) >= 0:
                        line = bytes(buf[:end])
                        del buf[:end + 1]
                        if line.strip():
                            yield self._event(line)
                    if len(buf) > MAX_EVENT_BYTES:
                        raise KubeProtocolError(f"{self.server}: a watch event exceeds {MAX_EVENT_BYTES} bytes")
            except self._httpx.HTTPError as exc:
                raise KubeInventoryError(f"{self.server}: watch broke: {type(exc).__name__}: {exc}") from exc
            if buf.strip():
                yield self._event(bytes(buf))

    def _event(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise KubeProtocolError(f"{self.server}: a watch event is not JSON: {exc}") from exc
        kind = _get(event, "type")
        obj = _get(event, "object")
        if not isinstance(kind, str) or not isinstance(obj, dict):
            raise KubeProtocolError(f"{self.server}: a watch event needs a type and an object")
        if kind == "ERROR":
            code = obj.get("code")
            raise _typed_error(code if isinstance(code, int) else 500, str(obj.get("reason") or ""),
                               str(obj.get("message") or "")[:300], self.server)
        return kind, obj


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
            log.warning("closing the connection to %s: %s", self.api.server, exc or type(exc).__name__)

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
                await self._watch(self.resource_version)  # type: ignore[arg-type]
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
                new_rv = _resource_version(obj)
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
