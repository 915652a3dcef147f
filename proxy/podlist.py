"""A kubelet's ``GET /pods`` answer, read as hostile input: what one node may claim about pods.

A node's kubelet is trusted only for that node's pods. An item is accepted only if ``spec.nodeName`` is the node
that answered, its namespace and name are valid names, and every pod IP (``status.podIP`` and each
``status.podIPs[].ip``, dual-stack included) is in one of the node's pod CIDRs or is the node's own address (a
host-network pod); anything else is refused item by item with the reason. A list over :data:`MAX_POD_LIST_BYTES`
or :data:`MAX_POD_ITEMS` items is refused whole (:class:`PodListRefused`): one node cannot inflate the gateway's
memory or stall its loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netnames import IPNetwork, is_dns_label, is_dns_subdomain, parse_ip, parse_port
from proxy.errors import UpstreamError

MAX_POD_LIST_BYTES = 8 * 1024 * 1024
MAX_POD_ITEMS = 1000
MAX_CONTAINERS = 64


class PodListRefused(UpstreamError):
    """A node's pod list as a whole is refused (too large, not a PodList): a 502 where a request needed it."""


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    ip: str
    containers: tuple[str, ...]
    ports: tuple[int, ...] = ()
    ips: tuple[str, ...] = ()
    """Every pod IP in canonical form (``ip`` is the first)."""


@dataclass(frozen=True)
class PodList:
    """What a node's answer yields: the pods accepted, and one line per item refused."""

    pods: list[PodInfo]
    refused: list[str] = field(default_factory=list)


def parse_pod_list(node: str, body: bytes, *, address: str = "", pod_cidrs: Iterable[IPNetwork] = ()) -> PodList:
    """Read node ``node``'s ``/pods`` PodList JSON (its address and pod CIDRs say which pod IPs it may claim)."""
    if len(body) > MAX_POD_LIST_BYTES:
        raise PodListRefused(f"pod list of node {node} is larger than {MAX_POD_LIST_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PodListRefused(f"pod list of node {node} is not JSON: {str(exc)[:200]}") from None
    items = data.get("items") if isinstance(data, dict) else None
    if items is None:
        items = []
    if not isinstance(items, list):
        raise PodListRefused(f"pod list of node {node}: items is not a list")
    if len(items) > MAX_POD_ITEMS:
        raise PodListRefused(f"pod list of node {node} has {len(items)} items, more than {MAX_POD_ITEMS}")
    nets = tuple(pod_cidrs)
    pods: list[PodInfo] = []
    refused: list[str] = []
    for i, item in enumerate(items):
        try:
            pods.append(_pod(node, item, address, nets))
        except ValueError as exc:
            refused.append(f"items[{i}]: {exc}")
    return PodList(pods, refused)


def _get(obj: Any, key: str) -> Any:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if value is not None else {}


def _pod(node: str, item: Any, address: str, nets: tuple[IPNetwork, ...]) -> PodInfo:
    meta, spec, status = _get(item, "metadata"), _get(item, "spec"), _get(item, "status")
    if not all(isinstance(part, Mapping) for part in (item, meta, spec, status)):
        raise ValueError("metadata, spec and status must be objects")
    namespace, name = meta.get("namespace", "default"), meta.get("name")
    if not is_dns_label(namespace) or not is_dns_subdomain(name):
        raise ValueError(f"invalid namespace/name {_show(namespace)}/{_show(name)}")
    where = f"pod {namespace}/{name}"
    if spec.get("nodeName") != node:
        raise ValueError(f"{where}: spec.nodeName {_show(spec.get('nodeName'))} is not node {node}")
    ips = _pod_ips(status, where)
    for ip in ips:
        if ip != address and not any(parse_ip(ip) in net for net in nets):
            raise ValueError(f"{where}: pod IP {ip} is neither in the pod CIDRs of node {node} nor its address")
    containers = spec.get("containers") or []
    if not isinstance(containers, list) or len(containers) > MAX_CONTAINERS:
        raise ValueError(f"{where}: spec.containers is not a list of at most {MAX_CONTAINERS}")
    names, ports = [], []
    for c in containers:
        if not isinstance(c, Mapping) or not is_dns_label(c.get("name")):
            raise ValueError(f"{where}: a container without a valid name")
        names.append(c["name"])
        for p in c.get("ports") or []:
            if isinstance(p, Mapping) and "containerPort" in p:
                ports.append(parse_port(p["containerPort"]))
    return PodInfo(namespace, name, node, ips[0] if ips else "", tuple(names), tuple(ports), ips)


def _pod_ips(status: Mapping[str, Any], where: str) -> tuple[str, ...]:
    pod_ips = status.get("podIPs") or []
    if not isinstance(pod_ips, list) or len(pod_ips) > 2:
        raise ValueError(f"{where}: status.podIPs is not a list of at most two entries")
    try:
        first = [str(parse_ip(status["podIP"]))] if status.get("podIP") else []
        listed = [str(parse_ip(e.get("ip") if isinstance(e, Mapping) else e)) for e in pod_ips]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if first and listed and listed[0] != first[0]:
        raise ValueError(f"{where}: status.podIP is not the first of status.podIPs")
    return tuple(dict.fromkeys(first + listed))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
