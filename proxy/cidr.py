"""Destination addresses: longest-prefix lookup of an address among many networks (pod CIDRs of thousands of
nodes) in a few dict lookups.

Networks are grouped by IP version and prefix length; a lookup masks the address once per prefix length present
(usually one or two) instead of testing every network, so a dial costs the same with 5 nodes or 5,000.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from netnames import IPAddress, IPNetwork

T = TypeVar("T")


class NetworkTable(Generic[T]):
    """Maps networks to values; :meth:`lookup` returns the value of the most specific network holding an address."""

    def __init__(self, items: Iterable[tuple[IPNetwork, T]] = ()) -> None:
        self._tables: dict[int, list[tuple[int, int, dict[int, T]]]] = {4: [], 6: []}
        for net, value in items:
            self.add(net, value)

    def add(self, net: IPNetwork, value: T) -> None:
        """Add ``net``; an equal network added earlier keeps its value."""
        tables = self._tables[net.version]
        mask = int(net.netmask)
        for prefixlen, _, table in tables:
            if prefixlen == net.prefixlen:
                table.setdefault(int(net.network_address), value)
                return
        tables.append((net.prefixlen, mask, {int(net.network_address): value}))
        tables.sort(key=lambda t: t[0], reverse=True)  # most specific first

    def lookup(self, ip: IPAddress) -> T | None:
        """The value of the longest-prefix network containing ``ip``, or None."""
        address = int(ip)
        for _, mask, table in self._tables[ip.version]:
            value = table.get(address & mask)
            if value is not None:
                return value
        return None

    def __bool__(self) -> bool:
        return any(self._tables.values())
