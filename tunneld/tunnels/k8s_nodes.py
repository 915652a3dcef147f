"""Kubernetes Node objects as inventory nodes: the pure part of the Kubernetes node source.

How an API Node becomes a :class:`~tunneld.config.Node` (:func:`node_from_object`): name = ``metadata.name``,
address = the first ``InternalIP`` of ``status.addresses`` (no fallback to ``ExternalIP``: the gateway belongs on the
cluster's internal network; a node without an InternalIP is skipped with a warning), pod CIDR = ``spec.podCIDR``,
kubelet port = ``status.daemonEndpoints.kubeletEndpoint.Port`` (10250 when absent), ssh port = ``[inventory]
ssh_port``, mode = the label or annotation ``tunneld.io/mode`` (``dial-in`` or ``dial-out``, the default; any
other value, or a label and an annotation that disagree, skips the node rather than guess).
:class:`NodeCache` applies list results and watch events; :func:`merge_nodes` merges with ``[[nodes]]``.
The typed errors of the source live here too, so that the watch loop (:mod:`.k8s_watch`) and callers share them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from netnames import is_dns_subdomain, parse_ip, parse_network
from tunneld.config import Node
from tunneld.config.schema import NODE_MODES

log = logging.getLogger("tunneld.k8s")

DEFAULT_KUBELET_PORT = 10250
MODE_KEY = "tunneld.io/mode"


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


def get_path(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def node_from_object(obj: Mapping[str, Any], ssh_port: int = 22) -> Node:
    """Turn an API Node object (JSON) into an inventory node. Raises :class:`SkipNode` when it cannot."""
    name = get_path(obj, "metadata", "name")
    if not is_dns_subdomain(name):
        raise SkipNode(f"metadata.name {name!r} is not a valid node name")
    addresses = get_path(obj, "status", "addresses")
    address = None
    for entry in addresses if isinstance(addresses, list) else []:
        if get_path(entry, "type") == "InternalIP":
            try:
                address = str(parse_ip(get_path(entry, "address")))
            except ValueError:
                continue
            break
    if address is None:
        raise SkipNode("no InternalIP in status.addresses")
    pod_cidr = None
    cidr = get_path(obj, "spec", "podCIDR")
    if isinstance(cidr, str) and cidr:
        try:
            pod_cidr = parse_network(cidr)
        except ValueError:
            log.warning("ignoring invalid spec.podCIDR %r", cidr, extra={"node": name})
    port = get_path(obj, "status", "daemonEndpoints", "kubeletEndpoint", "Port")
    kubelet_port = port if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else None
    return Node(name=name, address=address, ssh_port=ssh_port, kubelet_port=kubelet_port or DEFAULT_KUBELET_PORT,
                pod_cidr=pod_cidr, mode=node_mode(obj))


def node_mode(obj: Mapping[str, Any]) -> str:
    """``dial-in`` or ``dial-out`` from the label or annotation ``tunneld.io/mode``; raises :class:`SkipNode`."""
    found = {where: get_path(obj, "metadata", where, MODE_KEY) for where in ("labels", "annotations")}
    values = {v for v in found.values() if v is not None}
    for value in values:
        if value not in NODE_MODES:
            shown = "".join(c if c.isascii() and c.isprintable() else "?" for c in str(value)[:40])
            raise SkipNode(f"{MODE_KEY} {shown!r} is not one of {', '.join(NODE_MODES)}")
    if len(values) > 1:
        raise SkipNode(f"the label and the annotation {MODE_KEY} disagree")
    return str(values.pop()) if values else "dial-out"


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
        name = get_path(obj, "metadata", "name")
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
            name = get_path(obj, "metadata", "name")
            if isinstance(name, str) and name in old_skipped:
                self.skipped[name] = old_skipped[name]  # already warned about; warn again only if the reason changes
            self._put(obj)
        return before != self.nodes

    def apply(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """Apply one ADDED / MODIFIED / DELETED event. Returns whether the inventory changed."""
        name = get_path(obj, "metadata", "name")
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
