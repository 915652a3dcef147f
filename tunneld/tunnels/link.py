"""What a tunnel holds while it is up: one :class:`Link`, whichever way the SSH connection was made.

A dial-out link (:class:`~.ssh.SSHLink`) opens ``direct-tcpip`` channels to the node's sshd; a dial-in link
(:class:`~.dialin_ssh.DialinLink`) opens ``forwarded-tcpip`` channels to the node's ``ssh -R`` forward and speaks
SOCKS5 on them. The pool, the probe and the dialer see only this protocol.
"""

from __future__ import annotations

from typing import Protocol

from tunneld.tunnels.ssh import ChannelStream


class Link(Protocol):
    """One established SSH connection carrying a node's channels."""

    node: str

    @property
    def closed(self) -> bool: ...

    @property
    def packet_path(self) -> str:
        """``lean`` (:mod:`~.leanpath`) or ``asyncssh``: who seals and opens this link's SSH packets."""
        ...

    @property
    def cipher(self) -> str:
        """The negotiated cipher (what this side sends with)."""
        ...

    async def wait_closed(self) -> str:
        """Wait until the connection is gone; returns why."""
        ...

    def close(self) -> None: ...

    async def open_stream(self, host: str, port: int, timeout: float) -> ChannelStream:
        """A stream to ``host:port`` as seen from the node; raises :class:`~tunneld.errors.DialError`."""
        ...
