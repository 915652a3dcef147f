"""What the proxy URLs can name: nodes and services (from the inventory) and pods (asked of the kubelets).

There is no apiserver to ask, so pods are found the way the kubelet knows them: ``GET /pods`` on each node's kubelet
through its tunnel. Results are cached; a lookup of an unknown pod refreshes at most once per ``min_refresh`` seconds
(single flight, bounded concurrency), and a background task refreshes every ``refresh`` seconds.

Each node speaks only for its own pods (:mod:`proxy.podlist` checks ``spec.nodeName`` and the pod IPs against the
node's pod CIDRs and address). A pod name two nodes both claim is a conflict (:class:`PodConflict`, answered 502
naming both nodes), never resolved by which node answered last. A node whose list cannot be had or is refused keeps
its previous list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from netnames import IPNetwork
from proxy.dialer import DialError
from proxy.podlist import PodInfo, PodList, PodListRefused, parse_pod_list

__all__ = ["Directory", "NodeInfo", "PodCache", "PodConflict", "PodInfo", "PodList", "PodListRefused",
           "ServiceInfo", "ServicePortInfo", "parse_pod_list"]

log = logging.getLogger("proxy.pods")
audit = logging.getLogger("proxy.audit")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str
    kubelet_port: int = 10250
    pod_cidrs: tuple[IPNetwork, ...] = ()
    """The node's pod networks (one per IP family): the only pod IPs its kubelet may claim, besides its address."""


@dataclass(frozen=True)
class ServicePortInfo:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    ports: tuple[ServicePortInfo, ...]
    cluster_ip: str | None = None
    endpoints: tuple[str, ...] = ()


class Directory:
    """Nodes and services by name; replaced as a whole on reload."""

    def __init__(self, nodes: Iterable[NodeInfo] = (), services: Iterable[ServiceInfo] = ()) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self.services: dict[tuple[str, str], ServiceInfo] = {}
        self.update(nodes, services)

    def update(self, nodes: Iterable[NodeInfo], services: Iterable[ServiceInfo]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.services = {(s.namespace, s.name): s for s in services}


class PodConflict(Exception):
    """Two or more nodes claim a pod of the same namespace and name."""

    def __init__(self, namespace: str, name: str, nodes: tuple[str, ...]) -> None:
        super().__init__(f"pod {namespace}/{name} is claimed by nodes {', '.join(nodes)}; refusing to choose")
        self.nodes = nodes


FetchPods = Callable[[NodeInfo], Awaitable[list[PodInfo]]]


class PodCache:
    """Pods of every node, refreshed from the kubelets."""

    def __init__(
        self, directory: Directory, fetch: FetchPods, *, refresh: float = 30.0, min_refresh: float = 2.0,
        concurrency: int = 32, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._fetch = fetch
        self.refresh_period = refresh
        self.min_refresh = min_refresh
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock
        self._pods: dict[tuple[str, str], PodInfo] = {}
        self._by_node: dict[str, list[PodInfo]] = {}
        self.conflicts: dict[tuple[str, str], tuple[str, ...]] = {}
        """Pod names claimed by more than one node, with the nodes."""
        self.unlisted: dict[str, str] = {}
        """Nodes whose pods the last refresh could not list, with the error: a missing pod may be on them."""
        self._refreshed_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def get(self, namespace: str, name: str) -> PodInfo | None:
        """The pod, refreshing once if it is not known yet (and the cache is not brand new). Raises
        :class:`PodConflict` for a name more than one node claims."""
        pod = self._lookup(namespace, name)
        if pod is not None:
            return pod
        now = self._clock()
        if self._refreshed_at is None or self.unlisted or now - self._refreshed_at >= self.min_refresh:
            await self.refresh()
        return self._lookup(namespace, name)

    async def listed(self) -> list[PodInfo]:
        """Every pod no two nodes claim, refreshed first unless the last refresh is under ``min_refresh`` old and
        listed every node."""
        if (self._refreshed_at is None or self.unlisted
                or self._clock() - self._refreshed_at >= self.min_refresh):
            await self.refresh()
        return sorted(self._pods.values(), key=lambda p: (p.namespace, p.name))

    def _lookup(self, namespace: str, name: str) -> PodInfo | None:
        nodes = self.conflicts.get((namespace, name))
        if nodes is not None:
            raise PodConflict(namespace, name, nodes)
        return self._pods.get((namespace, name))

    async def refresh(self) -> None:
        """Ask every node's kubelet for its pods (one refresh at a time; callers share it)."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._refresh())
        await asyncio.shield(self._inflight)

    async def _refresh(self) -> None:
        nodes = list(self._directory.nodes.values())

        unlisted: dict[str, str] = {}

        async def one(node: NodeInfo) -> list[PodInfo] | None:
            async with self._slots:
                try:
                    return await self._fetch(node)
                except Exception as exc:  # one bad kubelet must not hide the others' pods
                    # A tunnel that is (re)connecting (503) is already logged by the pool; it is retried soon.
                    transient = isinstance(exc, DialError) and exc.status == 503
                    if isinstance(exc, PodListRefused):
                        audit.warning("pod list refused, the previous one is kept: %s", exc, extra={"node": node.name})
                    log.log(logging.INFO if transient else logging.WARNING, "listing pods failed: %s", exc,
                            extra={"node": node.name})
                    unlisted[node.name] = str(exc) or type(exc).__name__
                    return None

        results = await asyncio.gather(*(one(n) for n in nodes))
        by_node: dict[str, list[PodInfo]] = {}
        for node, result in zip(nodes, results, strict=True):
            # keep what we knew about a node we could not reach, or whose list was refused
            by_node[node.name] = result if result is not None else self._by_node.get(node.name, [])
        claims: dict[tuple[str, str], list[PodInfo]] = {}
        for node_pods in by_node.values():
            for pod in node_pods:
                claims.setdefault((pod.namespace, pod.name), []).append(pod)
        conflicts = {key: tuple(sorted({p.node for p in found})) for key, found in claims.items()
                     if len({p.node for p in found}) > 1}
        for (ns, name), claimants in conflicts.items():
            if self.conflicts.get((ns, name)) != claimants:
                audit.warning("pod %s/%s is claimed by nodes %s: refused until only one does", ns, name,
                              ", ".join(claimants), extra={"status": 502})
        self._by_node = by_node
        self._pods = {key: found[0] for key, found in claims.items() if key not in conflicts}
        self.conflicts = conflicts
        self.unlisted = unlisted
        self._refreshed_at = self._clock()

    def start(self) -> None:
        """Refresh in the background every ``refresh`` seconds."""

        async def loop() -> None:
            while True:
                await self.refresh()
                # Nodes we could not ask (their tunnel still connecting, say) are asked again soon.
                await asyncio.sleep(min(self.min_refresh, self.refresh_period) if self.unlisted
                                    else self.refresh_period)

        self._loop_task = asyncio.create_task(loop(), name="pod-cache")

    async def close(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
