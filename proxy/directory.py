"""What the proxy URLs can name: nodes and services (from the inventory) and pods (asked of the kubelets).

There is no apiserver to ask, so pods are found the way the kubelet knows them: ``GET /pods`` on each node's kubelet
through its tunnel. Results are cached; a lookup of an unknown pod refreshes at most once per ``min_refresh`` seconds
(single flight, bounded concurrency), and a background task refreshes every ``refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from proxy.dialer import DialError

log = logging.getLogger("proxy.pods")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str
    kubelet_port: int = 10250


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


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    ip: str
    containers: tuple[str, ...]
    ports: tuple[int, ...] = ()


class Directory:
    """Nodes and services by name; replaced as a whole on reload."""

    def __init__(self, nodes: Iterable[NodeInfo] = (), services: Iterable[ServiceInfo] = ()) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self.services: dict[tuple[str, str], ServiceInfo] = {}
        self.update(nodes, services)

    def update(self, nodes: Iterable[NodeInfo], services: Iterable[ServiceInfo]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.services = {(s.namespace, s.name): s for s in services}


def parse_pod_list(node: str, body: bytes) -> list[PodInfo]:
    """Pods from a kubelet's ``/pods`` PodList JSON."""
    data = json.loads(body)
    pods = []
    for item in data.get("items") or []:
        meta, spec, status = item.get("metadata", {}), item.get("spec", {}), item.get("status", {})
        containers = spec.get("containers") or []
        ports = tuple(
            int(p["containerPort"]) for c in containers for p in (c.get("ports") or []) if "containerPort" in p
        )
        pods.append(PodInfo(
            namespace=meta.get("namespace", "default"), name=meta.get("name", ""), node=node,
            ip=status.get("podIP", ""), containers=tuple(c.get("name", "") for c in containers), ports=ports,
        ))
    return pods


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
        self.unlisted: dict[str, str] = {}
        """Nodes whose pods the last refresh could not list, with the error: a missing pod may be on them."""
        self._refreshed_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def get(self, namespace: str, name: str) -> PodInfo | None:
        """The pod, refreshing once if it is not known yet (and the cache is not brand new)."""
        pod = self._pods.get((namespace, name))
        if pod is not None:
            return pod
        now = self._clock()
        if self._refreshed_at is None or now - self._refreshed_at >= self.min_refresh:
            await self.refresh()
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
                    log.log(logging.INFO if transient else logging.WARNING, "listing pods failed: %s", exc,
                            extra={"node": node.name})
                    unlisted[node.name] = str(exc) or type(exc).__name__
                    return None

        results = await asyncio.gather(*(one(n) for n in nodes))
        pods = {}
        for node, result in zip(nodes, results, strict=True):
            if result is None:  # keep what we knew about a node we could not reach
                result = [p for p in self._pods.values() if p.node == node.name]
            for pod in result:
                pods[(pod.namespace, pod.name)] = pod
        self._pods = pods
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
