"""A test-local asyncssh server restricted to one cipher, with a TCP echo behind it: the gateway's own
:func:`tunneld.tunnels.ssh.connect` is the client (keys written to a directory, the host key pinned)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from tunneld.config import Node


class _Forwarding(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True


@dataclass(frozen=True)
class EchoBehindSSH:
    node: Node
    """The server as an inventory node (host key pinned)."""
    private_key: Path
    """The client key the server accepts."""
    echo_port: int
    """A TCP echo on the node's address."""


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@asynccontextmanager
async def echo_behind_ssh(directory: Path, address: str, cipher: str) -> AsyncIterator[EchoBehindSSH]:
    """An asyncssh server on ``address`` allowing only ``cipher`` and forwarding, and a TCP echo beside it."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    (directory / "host.pub").write_bytes(host_key.export_public_key())
    client_key.write_private_key(str(directory / "id"))
    (directory / "authorized").write_bytes(client_key.export_public_key())
    target = await asyncio.start_server(_echo, address, 0)
    server = await asyncssh.create_server(
        _Forwarding, address, 0, server_host_keys=[host_key], encryption_algs=[cipher],
        authorized_client_keys=str(directory / "authorized"),
    )
    try:
        node = Node(name="n1", address=address, ssh_port=server.sockets[0].getsockname()[1],
                    host_key=directory / "host.pub")
        yield EchoBehindSSH(node, directory / "id", target.sockets[0].getsockname()[1])
    finally:
        server.close()
        target.close()
