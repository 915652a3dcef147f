"""Names, addresses and ports: the one home for their syntax and normal forms.

Every package of the project may import this one, and it imports nothing of the project's. Patterns are always
matched whole (``fullmatch``), so a trailing newline is never part of a valid name.
"""

from __future__ import annotations

import ipaddress


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError with a readable message."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
