"""A simulated node's sshd (asyncssh server), for the dev cluster.

It accepts the gateway's key, presents a host key signed by the dev SSH CA, and answers ``direct-tcpip`` requests the
way a node's sshd would, except that the node's "loopback" (127.0.0.1, ::1, localhost, and its own name and
address) is mapped onto the simulated kubelet's address, because all simulated nodes share this host's loopback.
Pod destinations (pod IP, pod port) go where the node's ``resolver`` says the pod's app really listens (see
:meth:`tunneld.dev.kubelet.KubeletSim.resolve`). Everything else is refused: a simulated node reaches nothing beyond
itself and its pods.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from certs.files import write_secret

LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})

Resolver = Callable[[str, int], tuple[str, int] | None]
"""(pod IP, pod port) -> where that pod's app really listens, or None."""


@dataclass
class SSHMaterial:
    """The dev cluster's SSH trust: a CA and the gateway's client key, written under ``directory``."""

    directory: Path
    ca: asyncssh.SSHKey
    client: asyncssh.SSHKey

    @classmethod
    def generate(cls, directory: Path) -> SSHMaterial:
        ca = asyncssh.generate_private_key("ssh-ed25519", comment="tunneld-dev-ssh-ca")
        client = asyncssh.generate_private_key("ssh-ed25519", comment="tunneld-dev-gateway")
        write_secret(directory / "gateway_ed25519", client.export_private_key())
        (directory / "gateway_ed25519.pub").write_bytes(client.export_public_key())
        (directory / "ssh_ca.pub").write_bytes(ca.export_public_key())
        return cls(directory, ca, client)

    def known_hosts_line(self, pattern: str) -> str:
        """The ``@cert-authority`` line trusting host keys signed by the CA for hosts matching ``pattern``."""
        return f"@cert-authority {pattern} {self.ca.export_public_key().decode().strip()}\n"

    def host_identity(self, name: str, address: str) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = self.ca.generate_host_certificate(
            key, name, principals=[name, address], valid_after="-5m", valid_before="+1d"
        )
        return key, cert


class _NodeServer(asyncssh.SSHServer):
    def __init__(self, node: SimNode) -> None:
        self._node = node
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._node.connections += 1
        self._node.conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._node.conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def auth_completed(self) -> None:
        self._node.logins += 1

    def password_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        node = self._node
        node.requested.append((dest_host, dest_port))
        if dest_host.lower() in LOOPBACK_NAMES or dest_host in (node.name, node.address):
            assert self._conn is not None
            return self._conn.forward_connection(node.address, dest_port)
        target = node.resolver(dest_host, dest_port) if node.resolver is not None else None
        if target is not None:
            assert self._conn is not None
            return self._conn.forward_connection(*target)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED,
            f"{dest_host}:{dest_port} is not reachable from {node.name} (not the node itself nor a served pod port)",
        )


@dataclass
class SimNode:
    """One simulated node's sshd, listening on ``address:port``."""

    name: str
    address: str
    port: int
    material: SSHMaterial
    resolver: Resolver | None = None
    """Where pod destinations go (usually the node's :meth:`~tunneld.dev.kubelet.KubeletSim.resolve`)."""
    connections: int = 0
    """SSH connections accepted (TCP + version exchange)."""
    logins: int = 0
    """Successful authentications."""
    conns: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    """SSH connections open now."""
    requested: deque[tuple[str, int]] = field(default_factory=lambda: deque(maxlen=1000))
    """The last ``direct-tcpip`` destinations asked for, exactly as the gateway sent them."""
    _server: asyncssh.SSHAcceptor | None = None

    async def start(self) -> None:
        key, cert = self.material.host_identity(self.name, self.address)
        authorized = asyncssh.import_authorized_keys(self.material.client.export_public_key().decode())
        self._server = await asyncssh.create_server(
            lambda: _NodeServer(self),
            self.address,
            self.port,
            server_host_keys=[(key, cert)],
            authorized_client_keys=authorized,
            allow_scp=False,
            line_editor=False,
        )

    @property
    def active(self) -> int:
        return len(self.conns)

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a node that goes away would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self.conns):
            conn.abort()
        self.conns.clear()

    @property
    def running(self) -> bool:
        return self._server is not None
