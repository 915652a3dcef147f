"""Helpers for talking to the kubelet's streaming endpoints with a real WebSocket client (the ``websockets`` library):
channel-framed messages as kubectl sends them, and reading until the server closes."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosedOK


async def recv_until_closed(conn: ClientConnection, timeout: float = 10) -> list[bytes | str]:
    """Every message until the server closes normally (bounded by ``timeout``)."""
    messages: list[bytes | str] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                messages.append(await conn.recv())
        except ConnectionClosedOK:
            return messages


def status_of(messages: list[bytes | str]) -> dict[str, object]:
    """The one metav1.Status sent on the error channel (3) of an exec/attach stream."""
    statuses = [m[1:] for m in messages if isinstance(m, bytes) and m[:1] == b"\x03"]
    assert len(statuses) == 1, messages
    return json.loads(statuses[0])


async def read_channel(conn: ClientConnection, channel: int, size: int, timeout: float = 15) -> bytes:
    """Exactly ``size`` bytes of data from ``channel`` (every message must be on that channel)."""
    got = bytearray()
    async with asyncio.timeout(timeout):
        while len(got) < size:
            msg = await conn.recv()
            assert isinstance(msg, bytes) and msg[0] == channel, msg[:40]
            got.extend(msg[1:])
    return bytes(got)
