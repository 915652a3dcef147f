"""Which SSH packet path a tunnel uses: the lean one under AEAD ciphers, asyncssh's own when switched off, when the
cipher is not AEAD, or when the start-up check refuses the installed asyncssh (said once in the log, not per tunnel).
The client is the gateway's own :func:`tunneld.tunnels.ssh.connect` against a test-local asyncssh server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncssh
import pytest

from tunneld.config import Node, SSHSettings
from tunneld.tunnels import leanpath, ssh

from .conftest import next_base


class _Forwarding(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True


async def _paths(short_dir: Path, cipher: str, lean: bool, links: int = 1) -> list[str]:
    """Connect ``links`` times, send a message through each; returns each link's packet path."""
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
    server = await asyncssh.create_server(
        _Forwarding, address, 0, server_host_keys=[host_key], encryption_algs=[cipher],
        authorized_client_keys=str(short_dir / "authorized"),
    )
    out = []
    try:
        node = Node(name="n1", address=address, ssh_port=server.sockets[0].getsockname()[1],
                    host_key=short_dir / "host.pub")
        settings = SSHSettings(user="u", private_key=short_dir / "id", keepalive_interval=0, lean_packet_path=lean)
        for _ in range(links):
            link = await ssh.connect(node, settings)
            try:
                stream = await link.open_stream(address, target.sockets[0].getsockname()[1], 5)
                await stream.write(b"ping")
                assert await stream.read() == b"ping"
                await stream.close()
                out.append(link.packet_path)
            finally:
                link.close()
    finally:
        server.close()
        target.close()
    return out


@pytest.mark.parametrize(("cipher", "lean", "path"), [
    ("aes128-gcm@openssh.com", True, "lean"),
    ("chacha20-poly1305@openssh.com", True, "lean"),
    ("aes128-gcm@openssh.com", False, "asyncssh"),
    ("aes128-ctr", True, "asyncssh"),  # not AEAD: nothing for the lean path to do
])
async def test_the_path_a_tunnel_uses(short_dir: Path, cipher: str, lean: bool, path: str) -> None:
    assert await _paths(short_dir, cipher, lean) == [path]


async def test_a_refused_asyncssh_falls_back_and_is_logged_once(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(leanpath, "check", lambda: "asyncssh 9.9 is not one it was written for (2.24.1)")
    monkeypatch.setattr(leanpath, "_refusal", [])
    caplog.set_level(logging.WARNING, "tunneld.ssh.lean")
    assert await _paths(short_dir, "aes128-gcm@openssh.com", True, links=3) == ["asyncssh"] * 3
    said = [r.getMessage() for r in caplog.records if "lean SSH packet path unavailable" in r.getMessage()]
    assert said == ["lean SSH packet path unavailable, using asyncssh's own: "
                    "asyncssh 9.9 is not one it was written for (2.24.1)"]
