"""Destination policy: the gateway is not an open proxy into the cluster.

A destination is allowed only if its host is a node (name or address), an address in a node's pod CIDR, or a
service's cluster IP or endpoint, and its port is one allowed for that kind of host: a node's kubelet port plus
``node_ports``; ``pod_ports`` for pod addresses; a service's ports (and target ports, for endpoints). The first
address of a pod CIDR is the node's bridge (the node itself, with every port it listens on), not a pod: it is allowed
only with ``allow_pod_gateway``.

The host is checked in its normal form (:func:`netnames.normalize_host`); dialers send that same form to the node.

:class:`PolicyDialer` is the one place the fronts' dials are checked: it wraps the dialer that carries them (as
``InstrumentedDialer`` wraps it for metrics), parses the host once, checks it, and dials the host in the normalised
form it checked, so what the node is asked to connect to is exactly what the policy allowed. The gateway swaps its
``policy`` when the inventory changes; the fronts never see a :class:`Policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netnames import IPAddress, IPNetwork, PortSet, host_key
from proxy.cidr import NetworkTable
from proxy.dialer import DestinationNotAllowed, Dialer, Stream

__all__ = ["Policy", "PortSet"]


@dataclass(frozen=True)
class Policy:
    """Which ``host:port`` pairs the fronts may reach."""

    node_hosts: dict[str, int] = field(default_factory=dict)
    """Node name or address -> its kubelet port."""
    node_ports: PortSet = field(default_factory=PortSet)
    pod_networks: tuple[IPNetwork, ...] = ()
    pod_ports: PortSet = field(default_factory=lambda: PortSet(((1, 65535),)))
    service_hosts: dict[str, frozenset[int]] = field(default_factory=dict)
    """Service cluster IP or endpoint address -> allowed ports."""
    allow_pod_gateway: bool = False
    """Whether the first address of a pod CIDR (the node's bridge) counts as a pod address."""
    _pod_table: NetworkTable[IPNetwork] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pod_table", NetworkTable((net, net) for net in self.pod_networks))

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
        net = self._pod_table.lookup(ip) if ip is not None else None
        if net is not None:
            if ip == net.network_address + 1 and net.num_addresses > 2 and not self.allow_pod_gateway:
                raise DestinationNotAllowed(f"{host} is the bridge address of pod network {net}, not a pod "
                                            "(policy.allow_pod_gateway)")
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
