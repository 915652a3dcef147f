"""What the gateway puts on the wire per channel: no ``SSH_MSG_IGNORE`` padding under AEAD ciphers, kept otherwise.

A test-local asyncssh server restricted to one cipher; the client is the gateway's own
:func:`tunneld.tunnels.ssh.connect`.
Packets sent are counted by the connection's send sequence number (one per packet, RFC 4253 section 6.4).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.sshecho import echo_behind_ssh
from tunneld.config import SSHSettings
from tunneld.tunnels import ssh

from .conftest import next_base


@pytest.mark.parametrize(("cipher", "packets_per_message"), [
    ("aes128-gcm@openssh.com", 1),
    ("chacha20-poly1305@openssh.com", 1),
    ("aes128-ctr", 2),  # not AEAD: asyncssh's IGNORE before each packet stays
])
async def test_ignore_padding_is_dropped_only_under_aead(short_dir: Path, cipher: str,
                                                         packets_per_message: int) -> None:
    async with echo_behind_ssh(short_dir, next_base(), cipher) as bed:
        link = await ssh.connect(bed.node, SSHSettings(user="u", private_key=bed.private_key, keepalive_interval=0))
        try:
            conn = link._conn
            assert conn.get_extra_info("send_cipher") == cipher
            before = conn._send_seq
            stream = await link.open_stream(bed.node.address, bed.echo_port, 5)  # CHANNEL_OPEN
            await stream.write(b"ping")  # CHANNEL_DATA
            assert await stream.read() == b"ping"
            await stream.close()  # CHANNEL_CLOSE
            await asyncio.sleep(0.05)  # let the peer's close arrive (it must not make us send anything)
            assert (conn._send_seq - before) % 2**32 == 3 * packets_per_message
        finally:
            link.close()
