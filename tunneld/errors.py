"""The daemon's own typed errors.

Dial errors (what a front answers with) live in :mod:`proxy.dialer`, because the fronts must not import ``tunneld``;
they are re-exported here. Connection errors describe why a tunnel could not be brought up.
"""

from __future__ import annotations

from proxy.dialer import (
    ChannelRefused,
    DestinationNotAllowed,
    DialError,
    DialTimeout,
    NoTunnel,
    Overloaded,
    TunnelDown,
    TunnelUnavailable,
)
from proxy.errors import StreamError

__all__ = [
    "AuthFailed",
    "ChannelRefused",
    "ConfigError",
    "ConnectFailed",
    "ConnectTimeout",
    "DestinationNotAllowed",
    "DialError",
    "DialTimeout",
    "HostKeyRejected",
    "NoTunnel",
    "Overloaded",
    "StreamError",
    "TunnelDown",
    "TunnelUnavailable",
]


class ConfigError(Exception):
    """A configuration or inventory file is invalid. ``problems`` holds one message per mistake."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ConnectFailed(Exception):
    """An SSH connection to a node could not be established."""


class HostKeyRejected(ConnectFailed):
    """The node's host key is not trusted by the configured known_hosts (possible man in the middle)."""


class AuthFailed(ConnectFailed):
    """The node's sshd did not accept the gateway's key."""


class ConnectTimeout(ConnectFailed):
    """The TCP connect or SSH handshake took too long."""
