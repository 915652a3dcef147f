"""What the gateway puts on the wire per channel: no ``SSH_MSG_IGNORE`` padding under AEAD ciphers, kept otherwise.

A test-local asyncssh server restricted to one cipher; the client is the gateway's own
:func:`tunneld.tunnels.ssh.connect`.
Packets sent are counted by the connection's send sequence number (one per packet, RFC 4253 section 6.4).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from tunneld.config import Node, SSHSettings
from tunneld.tunnels import ssh

from .conftest import next_base


class _Forwarding(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True


@pytest.mark.parametrize(("cipher", "packets_per_message"), [
    ("aes128-gcm@openssh.com", 1),
    ("chacha20-poly1305@openssh.com", 1),
    ("aes128-ctr", 2),  # not AEAD: asyncssh's IGNORE before each packet stays
])
async def test_ignore_padding_is_dropped_only_under_aead(short_dir: Path, cipher: str,
                                                         packets_per_message: int) -> None:
    address = next_base()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    (short_dir / "host.pub").write_bytes(host_key.export_public_key())
    client_key.write_private_key(str(short_dir / "id"))
    (short_dir / "authorized").write_bytes(client_key.export_public_key())

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, address, 0)
    target_port = target.sockets[0].getsockname()[1]
    server = await asyncssh.create_server(
        _Forwarding, address, 0, server_host_keys=[host_key], encryption_algs=[cipher],
        authorized_client_keys=str(short_dir / "authorized"),
    )
    port = server.sockets[0].getsockname()[1]
    link = None
    try:
        node = Node(name="n1", address=address, ssh_port=port, host_key=short_dir / "host.pub")
        link = await ssh.connect(node, SSHSettings(user="u", private_key=short_dir / "id", keepalive_interval=0))
        conn = link._conn
        assert conn.get_extra_info("send_cipher") == cipher
        before = conn._send_seq
        stream = await link.open_stream(address, target_port, 5)  # CHANNEL_OPEN
        await stream.write(b"ping")  # CHANNEL_DATA
        assert await stream.read() == b"ping"
        await stream.close()  # CHANNEL_CLOSE
        await asyncio.sleep(0.05)  # let the peer's close arrive (it must not make us send anything)
        assert (conn._send_seq - before) % 2**32 == 3 * packets_per_message
    finally:
        if link is not None:
            link.close()
        server.close()
        target.close()
