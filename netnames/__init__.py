"""Names, addresses and ports: the one home for their syntax and normal forms.

Every package of the project may import this one, and it imports nothing of the project's. Patterns are always
matched whole (``fullmatch``), so a trailing newline is never part of a valid name; validators accept strings only.

* :mod:`netnames.names`: DNS subdomain names and labels, host names, IP literals, a host's normal form.
* :mod:`netnames.ports`: ports, port names, port ranges and :class:`PortSet`.
* :mod:`netnames.peercred`: the uid of a unix socket's peer (``SO_PEERCRED``).
"""

from __future__ import annotations

from netnames.names import (
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    IPAddress,
    IPNetwork,
    host_key,
    is_dns_label,
    is_dns_subdomain,
    is_host_name,
    is_ip,
    normalize_host,
    parse_host,
    parse_ip,
    parse_network,
)
from netnames.peercred import PeerCred, peer_cred, peer_uid
from netnames.ports import PortSet, is_port_name, parse_port, parse_port_range

__all__ = [
    "MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "IPAddress", "IPNetwork", "PeerCred", "PortSet", "host_key",
    "is_dns_label", "is_dns_subdomain", "is_host_name", "is_ip", "is_loopback", "is_port_name", "normalize_host",
    "parse_host", "parse_ip", "parse_network", "parse_port", "parse_port_range", "peer_cred", "peer_uid",
    "split_authority",
    "split_host_port",
]


def split_host_port(value: str) -> tuple[str, int]:
    """Split a listen address ``host:port`` / ``[v6]:port`` (port 0 allowed: any free port); the host in its normal
    form. Raises ValueError with a readable message."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not host:port")
    host, sep, port = value.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        number = parse_port(port, allow_zero=True)
        if ":" in host and not host.startswith("["):
            raise ValueError
        return parse_host(host), number
    except ValueError:
        raise ValueError(f"{value!r} is not host:port") from None


def split_authority(value: str) -> tuple[str, int]:
    """A destination ``host:port`` / ``[v6]:port`` as a peer sends it (an HTTP CONNECT target): the host in its
    normal form (what policy checks and the node is asked for), the port 1-65535. Raises ValueError."""
    if not isinstance(value, str) or not value.isascii():
        raise ValueError("expected host:port in ASCII")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError("an IPv6 address must be written in brackets: [v6]:port")
    return parse_host(host), parse_port(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    key, ip = host_key(host)
    if key == "localhost":
        return True
    return ip is not None and ip.is_loopback
