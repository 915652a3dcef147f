"""Reading a SPDY stream (proxy/spdy.py) to its end in tests."""

from __future__ import annotations

import asyncio

from proxy import spdy


async def read_to_end(stream: spdy.SPDYStream, timeout: float = 10.0) -> bytes:
    """Everything a SPDY stream carries until the peer half-closes it (each read bounded by ``timeout``)."""
    data = b""
    while chunk := await asyncio.wait_for(stream.read(), timeout):
        data += chunk
    return data
