"""The lean SSH packet path's refusals and nonces, against an in-process asyncssh server over loopback.

Each hostile case tampers with what the server sent before the client's connection sees it; the server's payload
(``SECRET``) must never reach the client's session, the connection must close and a log line say why.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import asyncssh
import pytest
from asyncssh import encryption as _enc
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.waiting import wait_for
from tunneld.tunnels import leanpath

SECRET = b"SECRET-PAYLOAD"


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: the test is about packets after it


async def _serve(process: Any) -> None:
    await process.stdin.readline()
    process.stdout.write(SECRET)
    await process.stdin.readline()


class _Recorder(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.data += data


class _Client(asyncssh.SSHClient):
    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        assert leanpath.activate(conn) is None


async def _run(cipher: str, tamper: Callable[[Any, bytes], bytes | None],
               before: Callable[[Any], None] = lambda conn: None) -> tuple[Any, _Recorder]:
    """Connect with the lean path, arm ``tamper`` for the server's answer, ask for it; returns (conn, session)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key], server_factory=_Server,
                                   process_factory=_serve, encryption_algs=[cipher], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        conn, _ = await asyncssh.create_connection(_Client, "127.0.0.1", port, known_hosts=None, username="u",
                                                   encryption_algs=[cipher], config=None, agent_path=None)
        assert leanpath.path_of(conn) == "lean"
        chan, session = await conn.create_session(_Recorder, encoding=None)
        real = conn.data_received
        armed = [True]

        def data_received(data: bytes, datatype: Any = None) -> None:
            if armed[0]:
                armed[0] = False
                changed = tamper(conn, data)
                if changed is None:
                    conn.eof_received()
                    return
                data = changed
            real(data)

        before(conn)
        conn.data_received = data_received
        chan.write(b"go\n")
        await asyncio.wait_for(conn.wait_closed(), 10)
        return conn, session
    finally:
        server.close()


def _flip_tag(conn: Any, data: bytes) -> bytes:
    n = 4 + int.from_bytes(data[:4], "big") + 16
    return data[:n - 1] + bytes([data[n - 1] ^ 0x01]) + data[n:]


def _too_long(conn: Any, data: bytes) -> bytes:
    return (256 * 1024 + 16).to_bytes(4, "big") + data[4:]


def _truncate(conn: Any, data: bytes) -> None:
    conn.__class__.data_received(conn, data[:len(data) // 2])  # half the packet arrives, then the peer is gone
    return None


@pytest.mark.parametrize(("tamper", "said"), [
    (_flip_tag, "the AEAD tag does not verify"),
    (_too_long, "packet length 262160"),
    (_truncate, "ended inside a packet"),
])
async def test_a_tampered_packet_closes_the_connection_before_its_payload(
        caplog: pytest.LogCaptureFixture, tamper: Callable[[Any, bytes], bytes | None], said: str) -> None:
    caplog.set_level(logging.WARNING, "tunneld.ssh.lean")
    _, session = await _run("aes128-gcm@openssh.com", tamper)
    assert SECRET not in session.data
    assert any(said in r.getMessage() for r in caplog.records), caplog.text


async def test_the_untampered_exchange_delivers_the_payload() -> None:
    """The control for the cases above: the same exchange, nothing changed, delivers SECRET."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key], server_factory=_Server,
                                   process_factory=_serve, encryption_algs=["chacha20-poly1305@openssh.com"],
                                   encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u", client_factory=_Client,
                                    encryption_algs=["chacha20-poly1305@openssh.com"], config=None,
                                    agent_path=None) as conn:
            chan, session = await conn.create_session(_Recorder, encoding=None)
            chan.write(b"go\n")
            await wait_for(lambda: SECRET in session.data, 10, "the payload")
            assert leanpath.path_of(conn) == "lean" and leanpath.counts(conn)["received"] >= 1
    finally:
        server.close()


@pytest.mark.parametrize("cipher", ["aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
async def test_a_sequence_number_that_would_wrap_closes_the_connection(
        caplog: pytest.LogCaptureFixture, cipher: str) -> None:
    caplog.set_level(logging.WARNING, "tunneld.ssh.lean")

    def exhausted(conn: Any) -> None:
        conn._recv_encryption.packets = leanpath.SEQ_LIMIT  # 2**32 packets under these keys already

    _, session = await _run(cipher, lambda conn, data: data, exhausted)
    assert SECRET not in session.data
    assert any("sequence number would wrap" in r.getMessage() for r in caplog.records), caplog.text


class _RecordingAEAD:
    def __init__(self, inner: Any, seen: list[tuple[bytes, bytes]], key: bytes) -> None:
        self.inner, self.seen, self.key = inner, seen, key

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        self.seen.append((self.key, nonce))
        return self.inner.encrypt(nonce, data, aad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=12, max_size=12),
                          st.integers(min_value=1, max_value=40)), min_size=1, max_size=6, unique_by=lambda k: k[0]),
       st.booleans())
def test_gcm_nonces_never_repeat_across_rekeys(keys: list[tuple[bytes, bytes, int]], near_wrap: bool) -> None:
    """Each NEWKEYS installs a fresh cipher whose nonces start at the new IV and go up by one per packet (RFC 5647):
    no (key, nonce) pair is used twice, however many packets and rekeys, even with the counter about to wrap."""
    conn = object.__new__(leanpath.LeanConnection)
    seen: list[tuple[bytes, bytes]] = []
    for key, iv, count in keys:
        if near_wrap:
            iv = iv[:4] + (2**64 - count // 2 - 1).to_bytes(8, "big")
        conn._send_encryption = _enc.get_encryption(b"aes128-gcm@openssh.com", key, iv)
        lean = conn._send_encryption
        assert isinstance(lean, leanpath.LeanGCM)
        lean._aead = _RecordingAEAD(lean._aead, seen, key)
        start = int.from_bytes(iv[4:], "big")
        for i in range(count):
            lean.seal(i, b"\0\0\0\x20", os.urandom(32))
            assert seen[-1][1] == iv[:4] + ((start + i) % 2**64).to_bytes(8, "big")
    assert len(seen) == len(set(seen)) == sum(k[2] for k in keys)


def test_check_accepts_the_pinned_asyncssh_and_refuses_another(monkeypatch: pytest.MonkeyPatch) -> None:
    assert leanpath.check() is None
    monkeypatch.setattr(asyncssh, "__version__", "9.9.9")
    assert "9.9.9" in (leanpath.check() or "")
