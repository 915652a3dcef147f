"""The node inventory: which nodes exist, what changed since last time, and who owns an address.

Pure data and decisions, no I/O: the pool applies an :class:`InventoryDiff` (connect the added, drain the removed,
reconnect the changed, leave the unchanged alone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netnames import host_key
from proxy.cidr import NetworkTable
from tunneld.config import Node


@dataclass(frozen=True)
class InventoryDiff:
    """What a new inventory changes relative to the old one, by node name."""

    added: tuple[Node, ...]
    removed: tuple[Node, ...]
    changed: tuple[Node, ...]
    """New versions of nodes whose connection settings changed."""
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(old: Mapping[str, Node], new: Iterable[Node]) -> InventoryDiff:
    """Compare two inventories by node name."""
    new_map = {n.name: n for n in new}
    added = tuple(n for name, n in new_map.items() if name not in old)
    removed = tuple(n for name, n in old.items() if name not in new_map)
    changed = tuple(n for name, n in new_map.items() if name in old and old[name] != n)
    unchanged = tuple(name for name, n in new_map.items() if name in old and old[name] == n)
    return InventoryDiff(added=added, removed=removed, changed=changed, unchanged=unchanged)


class OwnerIndex:
    """Finds the node that owns a destination: by node name, node address, or an address in its pod CIDR."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self._by_key: dict[str, Node] = {}
        self._cidrs: NetworkTable[Node] = NetworkTable()  # nested CIDRs resolve to the narrower owner
        for node in nodes:
            self._by_key[node.name] = node
            self._by_key[node.address] = node
            if node.pod_cidr is not None:
                self._cidrs.add(node.pod_cidr, node)

    def owner(self, host: str) -> Node | None:
        """The node owning ``host`` (a name or an IP literal, brackets allowed), or None."""
        key, ip = host_key(host)
        node = self._by_key.get(key)
        if node is not None or ip is None:
            return node
        return self._cidrs.lookup(ip)
