"""Which SSH packet path a tunnel uses: the lean one under AEAD ciphers, asyncssh's own when switched off, when the
cipher is not AEAD, or when the start-up check refuses the installed asyncssh (said once in the log, not per tunnel).
The client is the gateway's own :func:`tunneld.tunnels.ssh.connect` against a test-local asyncssh server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.sshecho import echo_behind_ssh
from tunneld.config import SSHSettings
from tunneld.tunnels import leanpath, ssh

from .conftest import next_base


async def _paths(short_dir: Path, cipher: str, lean: bool, links: int = 1) -> list[str]:
    """Connect ``links`` times, send a message through each; returns each link's packet path."""
    out = []
    async with echo_behind_ssh(short_dir, next_base(), cipher) as bed:
        settings = SSHSettings(user="u", private_key=bed.private_key, keepalive_interval=0, lean_packet_path=lean)
        for _ in range(links):
            link = await ssh.connect(bed.node, settings)
            try:
                stream = await link.open_stream(bed.node.address, bed.echo_port, 5)
                await stream.write(b"ping")
                assert await stream.read() == b"ping"
                await stream.close()
                out.append(link.packet_path)
            finally:
                link.close()
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
