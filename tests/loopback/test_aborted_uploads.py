"""Aborted and stalled exchanges through the proxy URLs release everything, within ``idle_timeout``.

Through the gateway and the dev cluster (real SSH channels): uploads that stop after a few bytes and close, a body
that stalls, an upstream that stalls mid-response. Each ends within ``idle_timeout`` (1 s here) with the client's
connection closed, and ``tunneld_open_channels`` read from the status API's metrics returns to 0.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests import rawhttp
from tests.proxyauth import bearer_of
from tests.waiting import wait_for, wait_value
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster

from .conftest import started
from .test_abuse import abuse_config

ECHO = "/api/v1/namespaces/default/pods/web-1/proxy/echo"


@pytest.fixture
async def gw(cluster: DevCluster, short_dir: Path) -> AsyncIterator[Gateway]:
    gateway = await started(abuse_config(cluster, short_dir, idle_timeout=1.0))
    await gateway.api_front.pods.refresh()
    try:
        yield gateway
    finally:
        await gateway.stop(0.0)


async def open_channels(gw: Gateway) -> float:
    """The sum of ``tunneld_open_channels`` as the status API's /metrics reports it."""
    assert gw.config.status.socket is not None
    conn = aiohttp.UnixConnector(path=str(gw.config.status.socket))
    async with aiohttp.ClientSession(connector=conn) as session:
        async with session.get("http://status/metrics", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            text = await resp.text()
    return sum(float(v) for v in re.findall(r"^tunneld_open_channels\{[^}]*\} (\S+)$", text, re.M))


async def released(gw: Gateway) -> None:
    await wait_value(lambda: open_channels(gw), lambda n: n == 0, 5, "channels closed", interval=0.1)
    await wait_for(lambda: gw.proxy.connections == 0, 5, "proxy connections closed")


def auth(gw: Gateway) -> str:
    """The dev cluster user's Authorization header line (system:masters)."""
    return f"Authorization: {bearer_of(gw.config.auth.token_file)}\r\n"


def upload_head(gw: Gateway, length: int = 100_000) -> bytes:
    return f"POST {ECHO} HTTP/1.1\r\nHost: g\r\n{auth(gw)}Content-Length: {length}\r\n\r\n".encode()


async def test_aborted_uploads_leave_no_channel_behind(gw: Gateway) -> None:
    for i in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
        writer.write(upload_head(gw) + b"x" * 10)
        await writer.drain()
        if i % 2:  # half of them once the echo's answer has begun: the response is under way when they leave
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
        writer.close()
    await released(gw)
    # and the node still serves: no channel slot was lost
    answer, _ = await rawhttp.raw("127.0.0.1", gw.proxy.ports[0],
                                  upload_head(gw, 5).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + b"hello")
    assert rawhttp.status_of(answer) == 200 and answer.endswith(b"hello"), answer


async def test_a_stalled_upload_ends_at_idle_timeout(gw: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
    started_at = time.monotonic()
    writer.write(upload_head(gw) + b"x" * 10)
    await writer.drain()
    await wait_for(lambda: gw.proxy.connections == 1, 5, "the upload under way")
    received = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):  # the head and the echoed bytes, then the end
                received += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started_at
    writer.close()
    assert 0.9 < elapsed < 5, elapsed
    assert rawhttp.status_of(received) in (0, 200, 408), received  # the echo may have answered before the stall
    await released(gw)


async def test_a_stalled_upstream_ends_at_idle_timeout(gw: Gateway) -> None:
    target = "/api/v1/namespaces/default/pods/web-1/proxy/stream?n=3&interval=10"
    started_at = time.monotonic()
    answer, how = await rawhttp.raw("127.0.0.1", gw.proxy.ports[0],
                                    f"GET {target} HTTP/1.1\r\nHost: g\r\n{auth(gw)}\r\n".encode(), timeout=10)
    elapsed = time.monotonic() - started_at
    assert 0.9 < elapsed < 5, elapsed
    assert rawhttp.status_of(answer) == 200 and b"chunk 0" in answer, answer
    assert not answer.endswith(b"0\r\n\r\n") and how in ("eof", "reset"), (how, answer)
    await released(gw)
