"""CONNECT tunnels through an SSH channel are spliced in callbacks (:mod:`proxy.fastsplice`): the path is the one
taken, with the lean SSH packet path on and off, and it keeps the splice's promises: half-close both ways,
backpressure both ways, exact byte counters, a client or a node that vanishes, and the stream bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.fastsplice import BATCH, HIGH_WATER, SpliceProtocol
from proxy.splice import SPLICES
from tunneld.app import Gateway
from tunneld.config import Config, EgressSettings, PolicySettings
from tunneld.dev.cluster import DevCluster
from tunneld.tunnels.sshchannel import CHANNEL_WINDOW

from ..proxyauth import bearer_of
from ..waiting import wait_for
from .conftest import ECHO_PORT, SOURCE_PORT, NodeServers, fast_config, source_stalls, started
from .test_stream_ends import all_released, outcome

MiB = 1024 * 1024
PACKET = 32 * 1024  # the most one SSH data packet carries (asyncssh's default max_pktsize)
HALF_PORT = 7795  # sends a greeting, ends its side, then counts what it receives
DEAF_PORT = 7796  # accepts and reads nothing until told to
TRICKLE_PORT = 7797  # 1 KiB every 50 ms
UPGRADE_PORT = 7798  # answers any request with 101 and a few bytes, then echoes


def config(cluster: DevCluster, sock: Path, lean: bool = True, **limits: float) -> Config:
    cfg = fast_config(cluster, lean_packet_path=lean)
    ports = (ECHO_PORT, SOURCE_PORT, HALF_PORT, DEAF_PORT, TRICKLE_PORT, UPGRADE_PORT)
    return replace(cfg, egress=EgressSettings(socket=sock, listen="127.0.0.1:0"),
                   health=replace(cfg.health, period=3600.0),  # no probe in a tunnel's byte counters meanwhile
                   policy=PolicySettings(node_ports=tuple(map(str, ports))),
                   limits=replace(cfg.limits, **limits))  # type: ignore[arg-type]


@pytest.fixture(params=[True, False], ids=["lean", "asyncssh"])
async def gw(cluster: DevCluster, short_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    gateway = await started(config(cluster, short_dir / "egress.sock", lean=request.param))
    try:
        paths = {t.link.packet_path for t in gateway.pool.tunnels.values() if t.link is not None}
        assert paths == {"lean" if request.param else "asyncssh"}
        yield gateway
    finally:
        await gateway.stop()


async def connect(gw: Gateway, target: str, over: str = "unix") -> tuple[asyncio.StreamReader,
                                                                         asyncio.StreamWriter]:
    if over == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.egress.ports[0])
    else:
        assert gw.config.egress.socket is not None
        reader, writer = await asyncio.open_unix_connection(str(gw.config.egress.socket))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return reader, writer


def gateway_side_of(gw: Gateway, front: str = "proxy") -> Any:
    """The gateway's transport of the one client connection on a front (asyncio's or uvloop's, which does not
    subclass asyncio.Transport)."""
    writers = list((gw.proxy if front == "proxy" else gw.egress)._writers)
    assert len(writers) == 1
    return writers[0].transport


def gateway_side(gw: Gateway) -> asyncio.Transport:
    """The gateway's transport of the one client connection on the egress front, under asyncio."""
    transport = gateway_side_of(gw, "egress")
    assert isinstance(transport, asyncio.Transport)
    return transport


@pytest.mark.both_loops
@pytest.mark.parametrize("over", ["unix", "tcp"])
async def test_client_ends_first_byte_exact_in_callbacks_with_exact_counters(gw: Gateway, cluster: DevCluster,
                                                                             node_servers: NodeServers,
                                                                             over: str) -> None:
    node = cluster.sim_nodes[0]
    counters = gw.pool.tunnels[node.name].counters
    before = (SPLICES["callbacks"], counters.bytes_in, counters.bytes_out)
    reader, writer = await connect(gw, f"{node.address}:{ECHO_PORT}", over)
    assert SPLICES["callbacks"] == before[0] + 1  # this stream took the callback path
    size = 16 * MiB
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        for i in range(size // MiB):
            chunk = os.urandom(MiB) if i % 2 else bytes([i]) * MiB
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()  # the client's end of data reaches the echo, which then ends its side

    received = 0
    async with asyncio.timeout(30):
        sender = asyncio.create_task(send())
        while data := await reader.read(256 * 1024):
            got.update(data)
            received += len(data)
        await sender
    assert received == size and got.digest() == sent.digest()
    writer.close()
    await all_released(gw)
    assert (counters.bytes_in - before[1], counters.bytes_out - before[2]) == (size, size)


async def test_node_ends_first_and_the_client_still_sends(gw: Gateway, cluster: DevCluster) -> None:
    received: list[int] = []

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello" * 1000)
        writer.write_eof()
        total = 0
        while data := await reader.read(65536):
            total += len(data)
        received.append(total)
        writer.close()

    node = cluster.sim_nodes[1]
    server = await asyncio.start_server(half, node.address, HALF_PORT)
    try:
        reader, writer = await connect(gw, f"{node.address}:{HALF_PORT}", "tcp")
        assert await asyncio.wait_for(reader.read(-1), 10) == b"hello" * 1000  # the node's end, as an end of data
        for _ in range(4):  # the other direction is still open
            writer.write(b"x" * MiB)
            await writer.drain()
        writer.write_eof()
        await wait_for(lambda: received == [4 * MiB], 10, "the node received everything and the client's end")
        writer.close()
        await all_released(gw)
    finally:
        server.close()


async def test_client_that_does_not_read_stalls_the_node_within_a_window(gw: Gateway, cluster: DevCluster,
                                                                         node_servers: NodeServers) -> None:
    node = cluster.sim_nodes[2]
    reader, writer = await connect(gw, f"{node.address}:{SOURCE_PORT}")
    await source_stalls(lambda: node_servers.source_written[0])
    transport = gateway_side(gw)
    splice = transport.get_protocol()
    assert isinstance(splice, SpliceProtocol)  # the callback splice holds the client connection
    in_transport = transport.get_write_buffer_size()
    held = in_transport + sum(map(len, splice.queue))
    assert in_transport <= HIGH_WATER + BATCH + PACKET, in_transport
    assert CHANNEL_WINDOW // 2 <= held <= CHANNEL_WINDOW + HIGH_WATER + PACKET, held
    received = 0
    async with asyncio.timeout(30):  # and it all comes through once the client reads again
        for i in range(64):
            assert await reader.readexactly(MiB) == bytes([i]) * MiB
            received += MiB
        assert await reader.read() == b""
    writer.close()
    await all_released(gw)


async def test_node_that_does_not_read_stops_the_clients_sends(gw: Gateway, cluster: DevCluster) -> None:
    listening = asyncio.Event()
    deaf_writers: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deaf_writers.append(writer)
        await listening.wait()
        while await reader.read(256 * 1024):
            pass
        writer.close()

    node = cluster.sim_nodes[0]
    server = await asyncio.start_server(deaf, node.address, DEAF_PORT)
    sent = [0]
    try:
        _, writer = await connect(gw, f"{node.address}:{DEAF_PORT}")

        async def send() -> None:
            for _ in range(1024):  # at most 1 GiB, far more than anything on the way can hold
                writer.write(b"y" * MiB)
                await writer.drain()
                sent[0] += MiB

        sender = asyncio.create_task(send())
        try:
            stalled_at = await source_stalls(lambda: sent[0], limit=30)
            assert stalled_at <= 64 * MiB, stalled_at
            assert not gateway_side(gw).is_reading()  # the gateway stopped reading the client
            listening.set()  # the node reads again: the client's sends resume
            await wait_for(lambda: sent[0] >= stalled_at + 32 * MiB, 20, "sending resumed")
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        await all_released(gw)
    finally:
        listening.set()
        for w in deaf_writers:
            w.close()
        server.close()


async def test_client_that_vanishes_mid_stream_releases_the_channel(gw: Gateway, cluster: DevCluster,
                                                                    node_servers: NodeServers) -> None:
    node = cluster.sim_nodes[1]
    before = SPLICES["callbacks"]
    reader, writer = await connect(gw, f"{node.address}:{SOURCE_PORT}", "tcp")
    await asyncio.wait_for(reader.readexactly(MiB), 10)
    assert SPLICES["callbacks"] == before + 1
    writer.transport.abort()
    await all_released(gw)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "asyncssh"])
async def test_node_that_vanishes_mid_stream_resets_the_client(cluster: DevCluster, node_servers: NodeServers,
                                                               short_dir: Path, lean: bool) -> None:
    gateway = await started(config(cluster, short_dir / "egress.sock", lean=lean))
    try:
        node = cluster.sim_nodes[2]
        before = SPLICES["callbacks"]
        reader, writer = await connect(gateway, f"{node.address}:{SOURCE_PORT}", "tcp")
        await asyncio.wait_for(reader.readexactly(MiB), 10)
        assert SPLICES["callbacks"] == before + 1
        await node.stop()  # every SSH connection of the node is dropped
        assert await outcome(reader) == "reset"
        writer.close()
        await all_released(gateway)
    finally:
        await gateway.stop()


async def test_busy_stream_outlives_its_idle_bound_and_is_cut_at_its_lifetime(
        cluster: DevCluster, short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One timer serves both bounds: it re-arms while bytes flow (idle 0.3 s), and cuts at the lifetime (1.5 s)."""
    caplog.set_level(logging.WARNING, logger="proxy.audit")

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(400):  # bounded: 20 s
                writer.write(b"t" * 1024)
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    node = cluster.sim_nodes[0]
    server = await asyncio.start_server(trickle, node.address, TRICKLE_PORT)
    gateway = await started(config(cluster, short_dir / "egress.sock", stream_idle_timeout=0.3,
                                   stream_max_lifetime=1.5))
    try:
        loop = asyncio.get_running_loop()
        reader, writer = await connect(gateway, f"{node.address}:{TRICKLE_PORT}", "tcp")
        opened = loop.time()
        assert await outcome(reader) == "reset"
        assert 1.4 <= loop.time() - opened < 5
        writer.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "proxy.audit"]
        assert any("stream_max_lifetime" in m for m in messages) and not any("idle" in m for m in messages)
        await all_released(gateway)
    finally:
        await gateway.stop()
        server.close()


@pytest.mark.both_loops
@pytest.mark.parametrize("ends", ["client", "node"])
async def test_upgraded_stream_through_a_proxy_url_is_spliced_in_callbacks_and_ends_as_a_whole(
        gw: Gateway, cluster: DevCluster, ends: str) -> None:
    node_saw: list[str] = []

    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            # The switch and the first bytes in one segment: they reach the gateway with the head.
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly")
            if ends == "node":
                return
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            node_saw.append("end")
        finally:
            writer.close()

    node = cluster.sim_nodes[1]
    server = await asyncio.start_server(upgrade, node.address, UPGRADE_PORT)
    try:
        before = SPLICES["callbacks"]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
        writer.write(f"GET /api/v1/nodes/{node.name}:{UPGRADE_PORT}/proxy/x HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {bearer_of(gw.config.auth.token_file)}\r\n"
                     "Connection: Upgrade\r\nUpgrade: echo\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"early"  # before anything spliced
        assert SPLICES["callbacks"] == before + 1
        if ends == "node":
            assert await outcome(reader) == "eof"  # the node's clean end ends the whole connection
        else:
            data = os.urandom(4 * MiB)
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data
            writer.close()  # the client's end ends the node's side too
            await wait_for(lambda: node_saw == ["end"], 10, "the node saw its connection end")
        writer.close()
        await all_released(gw)
    finally:
        server.close()
