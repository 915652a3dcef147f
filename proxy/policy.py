"""Destination policy: the gateway is not an open proxy into the cluster.

A destination is allowed only if its host is a node (name or address), an address in a node's pod CIDR, or a
service's cluster IP or endpoint, and its port is one allowed for that kind of host: a node's kubelet port plus
``node_ports``; ``pod_ports`` for pod addresses; a service's ports (and target ports, for endpoints).

:class:`PolicyDialer` is the one place the fronts' dials are checked: it wraps the dialer that carries them (as
``InstrumentedDialer`` wraps it for metrics), parses the host once, checks it, and dials the host in the normalised
form it checked, so what the node is asked to connect to is exactly what the policy allowed. The gateway swaps its
``policy`` when the inventory changes; the fronts never see a :class:`Policy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.cidr import IPAddress, IPNetwork, NetworkTable, host_key
from proxy.dialer import DestinationNotAllowed, Dialer, Stream


@dataclass(frozen=True)
class PortSet:
    """Ports as inclusive ranges."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, items: Iterable[int | str]) -> PortSet:
        """From ``[10250, "30000-32767"]``; raises ValueError on a bad item."""
        ranges = []
        for item in items:
            text = str(item).strip()
            lo, sep, hi = text.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"{item!r} is not a port or a port range")
            a, b = int(lo), int(hi) if sep else int(lo)
            if not 1 <= a <= b <= 65535:
                raise ValueError(f"{item!r} is not within 1-65535")
            ranges.append((a, b))
        return cls(tuple(ranges))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(a <= port <= b for a, b in self.ranges)


@dataclass(frozen=True)
class Policy:
    """Which ``host:port`` pairs the fronts may reach."""

    node_hosts: dict[str, int] = field(default_factory=dict)
    """Node name or address -> its kubelet port."""
    node_ports: PortSet = PortSet()
    pod_networks: tuple[IPNetwork, ...] = ()
    pod_ports: PortSet = PortSet(((1, 65535),))
    service_hosts: dict[str, frozenset[int]] = field(default_factory=dict)
    """Service cluster IP or endpoint address -> allowed ports."""
    _pod_table: NetworkTable[bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pod_table", NetworkTable((net, True) for net in self.pod_networks))

    def check(self, host: str, port: int) -> None:
        """Raise :class:`DestinationNotAllowed` unless ``host:port`` is allowed."""
        key, ip = host_key(host)
        self.check_key(key, ip, port, host)

    def check_key(self, key: str, ip: IPAddress | None, port: int, host: str) -> None:
        """:meth:`check` for a host already keyed by :func:`~proxy.cidr.host_key` (``host`` as asked, for messages)."""
        kubelet_port = self.node_hosts.get(key)
        if kubelet_port is not None:
            if port == kubelet_port or port in self.node_ports:
                return
            raise DestinationNotAllowed(f"port {port} on node {host} is not allowed (policy.node_ports)")
        ports = self.service_hosts.get(key)
        if ports is not None and port in ports:
            return
        if ip is not None and self._pod_table.lookup(ip):
            if port in self.pod_ports:
                return
            raise DestinationNotAllowed(f"port {port} on pod address {host} is not allowed (policy.pod_ports)")
        if ports is not None:
            raise DestinationNotAllowed(f"port {port} is not a port of the service at {host}")
        raise DestinationNotAllowed(f"{host} is not a node, pod or service address of this cluster")



class PolicyDialer:
    """A :class:`~proxy.dialer.Dialer` that lets through only what :attr:`policy` allows, in normalised form."""

    def __init__(self, dialer: Dialer, policy: Policy) -> None:
        self._dialer = dialer
        self.policy = policy
        """Replaced as a whole when the inventory changes; each dial reads it once."""

    async def dial(self, host: str, port: int) -> Stream:
        """Raise :class:`DestinationNotAllowed`, or dial the host as the policy keyed it (``NODE-1.`` -> ``node-1``,
        ``[::1]`` -> ``::1``), so the node is never asked for another spelling than the one checked."""
        key, ip = host_key(host)
        self.policy.check_key(key, ip, port, host)
        return await self._dialer.dial(key, port)
