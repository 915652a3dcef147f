"""Hostile SPDY clients through the gateway: the gateway passes a SPDY exec upgrade through to the kubelet, whose SPDY
parser (:mod:`proxy.spdy`, as the simulated kubelet runs it) meets every byte the client sends.

Oversized frames, header bombs, bad stream ids, unknown control frames and wrong versions end the session with a
GOAWAY (protocol error) and a closed connection; frames for streams that do not exist are ignored as SPDY says and
the session goes on; a client that stops reading is held back by TCP, not buffered; a client that vanishes releases
everything. After each case the proxy front holds no connection and no tunnel holds a channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from collections.abc import AsyncIterator

import pytest

from proxy import spdy
from proxy.dialer import TCPStream
from tests.spdyread import read_to_end
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster

from ..proxyauth import bearer_of
from .conftest import fast_config, started

EXEC = "/api/v1/namespaces/default/pods/web-1/exec?command=cat&stdin=true&stdout=true&stderr=true"


@pytest.fixture
async def gw(cluster: DevCluster) -> AsyncIterator[Gateway]:
    gateway = await started(fast_config(cluster))
    await gateway.api_front.pods.refresh()
    try:
        yield gateway
    finally:
        await gateway.stop()



def control(kind: int, payload: bytes, flags: int = 0, version: int = spdy.VERSION) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, (flags << 24) | len(payload)) + payload


def syn_stream(stream_id: int, block: bytes) -> bytes:
    return control(spdy.SYN_STREAM, struct.pack(">IIH", stream_id, 0, 0) + block)


def header_block(headers: dict[str, str]) -> bytes:
    """A first header block, compressed with a fresh SPDY/3 context (as the first one on a connection is)."""
    return spdy.HeaderCodec().encode({k: [v] for k, v in headers.items()})


def blocks(*headers: dict[str, str]) -> list[bytes]:
    """Header blocks in one compression context, in order."""
    codec = spdy.HeaderCodec()
    return [codec.encode({k: [v] for k, v in h.items()}) for h in headers]


def bomb() -> bytes:
    """A header block that inflates from a few KiB to 8 MiB."""
    raw = struct.pack(">I", 1) + struct.pack(">I", 1) + b"x" + struct.pack(">I", 8 << 20) + b"a" * (8 << 20)
    z = zlib.compressobj(zdict=spdy.DICTIONARY)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


async def upgraded(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
    auth = bearer_of(gw.config.auth.token_file)
    writer.write(f"POST {EXEC} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n".encode()
                 + b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def released(gw: Gateway) -> None:
    await wait_for(lambda: gw.proxy.connections == 0, 15, "the proxy front's connections closed")
    await wait_for(lambda: sum(t.counters.open_channels for t in gw.pool.tunnels.values()) == 0, 15,
                   "every tunnel channel released")


HOSTILE = {
    "oversized frame": struct.pack(">II", 1, spdy.MAX_FRAME + 1),
    "oversized control frame": struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, 0xFFFFFF),
    "header bomb": syn_stream(1, bomb()),
    "garbage header block": syn_stream(1, b"\x78\x9c not zlib at all"),
    "even stream id": syn_stream(2, header_block({"streamtype": "stdin"})),
    "stream id 0": syn_stream(0, header_block({"streamtype": "stdin"})),
    "duplicate stream id": b"".join(syn_stream(1, b) for b in blocks({"streamtype": "error"}, {"streamtype": "stdin"})),
    "unknown control frame": control(42, b"\0" * 8),
    "SPDY version 2": control(spdy.PING, b"\0\0\0\1", version=2),
    "truncated RST_STREAM": control(spdy.RST_STREAM, b"\0\0"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
async def test_a_protocol_breach_ends_the_session_with_goaway(gw: Gateway, case: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await upgraded(gw)
    try:
        writer.write(HOSTILE[case])
        async with asyncio.timeout(10):
            answer = await reader.read()  # until the connection closes
    finally:
        writer.close()
    frames = spdy.FrameCodec().feed(answer)
    assert [(f.kind, f.status) for f in frames if f.kind == spdy.GOAWAY] == [(spdy.GOAWAY, spdy.RST_PROTOCOL_ERROR)]
    assert not [f for f in frames if f.kind == spdy.DATA]  # nothing ran
    await released(gw)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


async def test_frames_for_unknown_streams_are_ignored_and_the_session_goes_on(gw: Gateway) -> None:
    reader, writer = await upgraded(gw)
    session = spdy.Session(TCPStream(reader, writer), client=True)
    try:
        await session.stream.write(struct.pack(">II", 99, 5) + b"stray"  # data for a stream never opened
                                   + control(spdy.RST_STREAM, struct.pack(">II", 97, spdy.RST_CANCEL))
                                   + struct.pack(">II", 95, spdy.FLAG_FIN << 24))
        streams = {t: await session.open_stream({"streamtype": [t]}) for t in ("error", "stdin", "stdout", "stderr")}
        payload = os.urandom(100_000)
        await streams["stdin"].write(payload, fin=True)
        got = await read_to_end(streams["stdout"])
        assert got == payload
        status = await read_to_end(streams["error"])
        assert json.loads(status)["status"] == "Success"
    finally:
        await session.close()
    await released(gw)


async def test_a_client_that_stops_reading_is_held_back_then_released(gw: Gateway) -> None:
    _reader, writer = await upgraded(gw)  # and never read again: the kubelet's echo of stdin piles up towards us
    types = ("error", "stdin", "stdout", "stderr")
    writer.write(b"".join(syn_stream(2 * i + 1, b) for i, b in enumerate(blocks(*({"streamtype": t} for t in types)))))
    sent = 0
    chunk = os.urandom(256 * 1024)

    async def flood() -> None:
        nonlocal sent
        for _ in range(512):  # 128 MiB at most, on the stdin stream (id 3)
            writer.write(struct.pack(">II", 3, len(chunk)) + chunk)
            await writer.drain()
            sent += len(chunk)

    task = asyncio.create_task(flood())
    done, _ = await asyncio.wait([task], timeout=8)
    assert not done, "128 MiB went into a session whose client reads nothing"  # socket buffers, not the gateway
    task.cancel()
    writer.transport.abort()
    await released(gw)


async def test_a_client_that_vanishes_mid_session_releases_everything(gw: Gateway) -> None:
    for _ in range(3):
        reader, writer = await upgraded(gw)
        session = spdy.Session(TCPStream(reader, writer), client=True)
        streams = {t: await session.open_stream({"streamtype": [t]}) for t in ("error", "stdin", "stdout",
                                                                                 "stderr")}
        await streams["stdin"].write(b"half a line")
        assert await asyncio.wait_for(streams["stdout"].read(), 10) == b"half a line"
        writer.transport.abort()
        await session.close()
    await released(gw)
